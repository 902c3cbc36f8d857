"""How a command ends: errors a user can fix, the exit statuses, the signals that stop a run.

The CLI prints such an error as one line (`error: ...`, exit status 2, rank 0 only); every other
exception is an internal error and keeps its traceback. Leaf module: imports nothing of ours, and
nothing heavy, so that `pipeline.commands.supervise` (which must start in milliseconds) shares these, and so that
data-loader workers (the data layer) can ignore the stop signals.
"""

import os
import signal

USER_ERROR_EXIT_CODE = 2
"""A bad setting or input, or a diverged run: one `error:` line names what to fix."""
PREEMPTED_EXIT_CODE = 75
"""sysexits.h EX_TEMPFAIL, "try again later": the run saved a checkpoint on a stop signal and stopped;
requeue it with train.resume=auto."""
EXIT_STATUS_DIR_ENV = "PIPELINE_EXIT_STATUS_DIR"
"""Set by `pipeline.commands.supervise`: every `python -m pipeline` process under it writes its exit status into
this directory (one file per process id), so the supervisor can report each rank's status even where
the launcher in between (torchrun) turns a rank's 75 into its own failure status."""


class ConfigError(ValueError):
    """A bad configuration, command line or input: the message names the key or setting at fault."""


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
"""Each makes every rank finish its step, save and exit 75 (pipeline.train.preemption); pipeline.commands.supervise passes
them on to the ranks."""


def ignore_stop_signals() -> None:
    """Ignore the stop signals in this process: a data-loader worker (its rank stops it), or a rank that has
    saved and is exiting (a launcher terminating the job's process tree must not turn its 75 into -15)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def write_exit_status(status: int) -> None:
    """Under pipeline.commands.supervise: leave this process's exit status where the supervisor reads it."""
    directory = os.environ.get(EXIT_STATUS_DIR_ENV)
    if directory:
        with open(os.path.join(directory, str(os.getpid())), "w") as status_file:
            status_file.write(f"{status}\n")
