"""Stopping cleanly when the job is told to: SIGTERM / SIGUSR1 -> checkpoint, exit 75, requeue, resume.

    stop = StopSignals(every_minutes=cfg.checkpoint.every_minutes).install()   # every rank, after the process group
    ...
    check = stop.poll()          # once per step (or every few steps), every rank together: one tiny all-reduce
    if check.stop or check.save_due:
        save()
    if check.stop:
        raise Preempted(step, check.reason)     # `python -m pipeline` prints one line and exits 75

SLURM sends SIGUSR1 ahead of the time limit when asked (`#SBATCH --signal=B:USR1@120`, forwarded to the
ranks by launch/slurm.sbatch) and SIGTERM when it preempts or cancels a job; torchrun and the deepspeed
launcher pass SIGTERM on to their ranks. A signal only sets a flag: the step in progress finishes, then
every rank learns at the same poll that some rank was signalled, saves the same checkpoint and stops.
`poll` also says when `every_minutes` have passed since the last save on any rank (time-based saves),
through the same collective. Exit status 75 (EX_TEMPFAIL, "try again later") tells the batch script to
requeue the job, which continues with train.resume=auto.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass

import torch

# sysexits.h EX_TEMPFAIL: a temporary failure, the command may be retried (here: requeued and resumed)
PREEMPTED_EXIT_CODE = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """The run stopped early on a signal after saving a checkpoint; `python -m pipeline` exits 75."""

    exit_code = PREEMPTED_EXIT_CODE

    def __init__(self, step: int, reason: str):
        self.step = step
        super().__init__(f"stopped at step {step} ({reason}); a checkpoint was saved: continue with "
                         "train.resume=auto")


@dataclass(frozen=True)
class Check:
    """What every rank agreed at one `poll`."""

    stop: bool
    """Some rank received a stop signal: save a checkpoint and stop."""
    save_due: bool
    """`every_minutes` have passed since the last save on some rank: save a checkpoint now."""
    reason: str = ""
    """For the message: which signal this rank received, or that another rank was signalled."""


class StopSignals:
    """SIGTERM / SIGUSR1 handling and time-based save deadlines, agreed across ranks at each `poll`.

    Create it on every rank after the process group is up (with NCCL it builds a small gloo group, a
    collective call) and before the first step. `poll` costs one all-reduce of two ints on the CPU (gloo):
    it never waits for the GPU, and the host read is of a CPU tensor.
    """

    def __init__(self, every_minutes: float = 0.0, signals: tuple[signal.Signals, ...] = STOP_SIGNALS, clock=None):
        self.every_s = every_minutes * 60.0
        self.signals = tuple(signals)
        self.clock = clock or time.monotonic
        self.received: int | None = None
        self.last_save = self.clock()
        self._previous: dict[int, object] = {}
        self._pid = os.getpid()
        self._group = None
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            # a CPU flag reduced over NCCL would need a device copy and a GPU sync at every poll
            if torch.distributed.get_backend() != "gloo":
                self._group = torch.distributed.new_group(backend="gloo")

    # -- signals ------------------------------------------------------------------------------------
    def install(self) -> StopSignals:
        """Catch the stop signals in this process (main thread only; elsewhere there is nothing to install)."""
        if threading.current_thread() is not threading.main_thread():
            return self
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def uninstall(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def __enter__(self) -> StopSignals:
        return self.install()

    def __exit__(self, *exc_info) -> None:
        self.uninstall()

    def _on_signal(self, signum: int, frame) -> None:
        if os.getpid() != self._pid:
            # a forked child (a data loader worker) inherited this handler: behave as it would without it
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        # only a flag: printing or saving from a signal handler could interrupt the very code it needs
        self.received = signum

    # -- agreement ----------------------------------------------------------------------------------
    def poll(self, now: float | None = None) -> Check:
        """Whether any rank was signalled, and whether a time-based save is due on any rank; every rank calls
        it at the same point and gets the same answer. A due save restarts the clock (the caller saves)."""
        now = self.clock() if now is None else now
        local_due = self.every_s > 0 and now - self.last_save >= self.every_s
        flags = torch.tensor([self.received is not None, local_due], dtype=torch.int32)
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX, group=self._group)
        stop, save_due = (bool(flag) for flag in flags.tolist())
        if save_due or stop:
            self.last_save = now
        if self.received is not None:
            reason = f"{signal.Signals(self.received).name} received"
        else:
            reason = "another rank received a stop signal" if stop else ""
        return Check(stop=stop, save_due=save_due, reason=reason)

    def saved(self, now: float | None = None) -> None:
        """Restart the time-based save clock after a save made for another reason (checkpoint.every_steps)."""
        self.last_save = self.clock() if now is None else now
