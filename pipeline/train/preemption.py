"""Stopping cleanly when the job is told to: a stop signal -> checkpoint, exit 75, requeue, resume.

    stop = StopSignals(every_minutes=cfg.checkpoint.every_minutes).install()   # every rank, after the process group
    ...
    check = stop.poll()          # once per step, every rank together: one tiny all-reduce
    if check.stop or check.save_due:
        save()
    if check.stop:
        stop.stopping()                         # further stop signals are ignored while the rank winds down
        raise Preempted(step, check.reason)     # `python -m pipeline` prints one line and exits 75

What stops a run, and how it reaches the ranks:
- SIGTERM, SIGUSR1 or SIGINT (Ctrl-C) to a rank. SLURM's srun passes them to every task (launch/slurm.sbatch
  asks for SIGUSR1 before the time limit); `pipeline.commands.supervise`, which our launch/ scripts put in front of
  the deepspeed launcher and torchrun, passes them to the ranks of the job. One signalled rank is enough:
  the others learn of it at the next `poll`.
- The launcher that started this rank going away. The deepspeed launcher's runner dies of a SIGTERM without
  passing it on (its single-node path installs no handler), and a launcher killed outright (SIGKILL, the
  OOM killer) leaves its ranks orphaned. At `install`, each rank notes the chain of launcher processes above
  it (deepspeed's runner and launch.py, torchrun, pipeline.commands.supervise: known by their command lines) and a
  thread checks every second that they still run; when one is gone the rank stops as if signalled. A rank
  started from a shell, pytest or srun has no such chain and watches nothing.
A signal only sets a flag: the step in progress finishes, then every rank learns at the same poll that some
rank was told to stop, saves the same checkpoint and stops. `poll` also says when `every_minutes` have passed
since the last save on any rank (time-based saves), through the same collective. Data-loader workers ignore
the stop signals (`ignore_stop_signals`): a launcher that signals a whole process tree (deepspeed's
launch.py does) must not kill the workers of a rank that is still finishing its step.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass

import psutil
import torch

from pipeline.core.errors import PREEMPTED_EXIT_CODE, STOP_SIGNALS, ignore_stop_signals

__all__ = ["PREEMPTED_EXIT_CODE", "STOP_SIGNALS", "Check", "Preempted", "StopSignals", "ignore_stop_signals",
           "launcher_chain"]

# `python -m <module>` launchers, and console scripts (argv[0], or argv[1] after the interpreter)
LAUNCHER_MODULES = ("deepspeed.launcher.launch", "deepspeed.launcher.runner", "torch.distributed.run",
                    "torch.distributed.launch", "pipeline.commands.supervise")
LAUNCHER_SCRIPTS = ("deepspeed", "torchrun")


def launcher_name(cmdline: list[str]) -> str | None:
    """The launcher a process's command line shows (`deepspeed.launcher.launch`, `torchrun`, ...), or None."""
    for flag, module in zip(cmdline, cmdline[1:]):
        if flag == "-m" and module in LAUNCHER_MODULES:
            return module
    for arg in cmdline[:2]:
        if os.path.basename(arg) in LAUNCHER_SCRIPTS:
            return os.path.basename(arg)
    return None


@dataclass(frozen=True)
class Launcher:
    """One launcher process above this rank, known by pid and start time (a reused pid is another process)."""

    pid: int
    name: str
    create_time: float

    def running(self) -> bool:
        try:
            process = psutil.Process(self.pid)
            return process.create_time() == self.create_time and process.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False


def launcher_chain(pid: int | None = None) -> list[Launcher]:
    """The launcher processes directly above `pid` (default: this process), nearest first, up to the first
    ancestor that is not a launcher (the user's shell, a batch script, pytest, slurmstepd)."""
    chain = []
    try:
        process = psutil.Process(pid or os.getpid()).parent()
        while process is not None and process.pid > 1:
            name = launcher_name(process.cmdline())
            if name is None:
                break
            chain.append(Launcher(process.pid, name, process.create_time()))
            process = process.parent()
    except psutil.Error:
        pass  # an ancestor exited while we looked: watch what was found
    return chain


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
    """Some rank was told to stop (a stop signal, or its launcher gone): save a checkpoint and stop."""
    save_due: bool
    """`every_minutes` have passed since the last save on some rank: save a checkpoint now."""
    reason: str = ""
    """For the message: what this rank was told (the signal, or which launcher is gone), or that another
    rank was told."""


class StopSignals:
    """Stop signals, the launcher watch and time-based save deadlines, agreed across ranks at each `poll`.

    Create it on every rank after the process group is up (with NCCL it builds a small gloo group, a
    collective call) and before the first step. `poll` costs one all-reduce of two ints on the CPU (gloo):
    it never waits for the GPU, and the host read is of a CPU tensor.
    """

    def __init__(self, every_minutes: float = 0.0, signals: tuple[signal.Signals, ...] = STOP_SIGNALS, clock=None,
                 watch_launchers: bool = True, watch_interval_s: float = 1.0):
        self.every_s = every_minutes * 60.0
        self.signals = tuple(signals)
        self.clock = clock or time.monotonic
        self.received: int | None = None
        self.launcher_gone: str | None = None  # set by the watch thread: which launcher went away
        self.last_save = self.clock()
        self._previous: dict[int, object] = {}
        self._pid = os.getpid()
        self._group = None
        self._watch_launchers, self._watch_interval_s = watch_launchers, watch_interval_s
        self._watch_done = threading.Event()
        self._watch_thread: threading.Thread | None = None
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            # a CPU flag reduced over NCCL would need a device copy and a GPU sync at every poll
            if torch.distributed.get_backend() != "gloo":
                self._group = torch.distributed.new_group(backend="gloo")

    # -- signals and the launcher watch ---------------------------------------------------------------
    def install(self) -> StopSignals:
        """Catch the stop signals in this process (main thread only; elsewhere there is nothing to install)
        and start watching the launchers above it."""
        if threading.current_thread() is not threading.main_thread():
            return self
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._on_signal)
        chain = launcher_chain() if self._watch_launchers else []
        if chain:
            self._watch_thread = threading.Thread(target=self._watch, args=(chain,), name="launcher-watch",
                                                  daemon=True)
            self._watch_thread.start()
        return self

    def uninstall(self) -> None:
        """Give the signals back to their previous handlers and stop watching (the run ended normally)."""
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()
        self._stop_watch()

    def stopping(self) -> None:
        """The run is saved and winding down: ignore further stop signals instead of dying of them (a launcher
        that terminates the job's processes when the first rank exits would otherwise turn this rank's 75
        into -15), and stop watching."""
        if threading.current_thread() is threading.main_thread():
            ignore_stop_signals()
        self._previous.clear()
        self._stop_watch()

    def __enter__(self) -> StopSignals:
        return self.install()

    def __exit__(self, *exc_info) -> None:
        self.uninstall()

    def _on_signal(self, signum: int, frame) -> None:
        if os.getpid() != self._pid:
            # a forked child (a data-loader worker) inherited this handler: its rank stops it, not the signal
            return
        # only a flag: printing or saving from a signal handler could interrupt the very code it needs
        self.received = signum

    def _watch(self, chain: list[Launcher]) -> None:
        while not self._watch_done.wait(self._watch_interval_s):
            for launcher in chain:
                if not launcher.running():
                    self.launcher_gone = f"its launcher {launcher.name} (pid {launcher.pid}) is gone"
                    return

    def _stop_watch(self) -> None:
        self._watch_done.set()
        if self._watch_thread is not None:
            self._watch_thread.join()
            self._watch_thread = None

    # -- agreement ----------------------------------------------------------------------------------
    def poll(self, now: float | None = None) -> Check:
        """Whether any rank was told to stop, and whether a time-based save is due on any rank; every rank
        calls it at the same point and gets the same answer. A due save restarts the clock (the caller saves)."""
        now = self.clock() if now is None else now
        told = self.received is not None or self.launcher_gone is not None
        local_due = self.every_s > 0 and now - self.last_save >= self.every_s
        flags = torch.tensor([told, local_due], dtype=torch.int32)
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX, group=self._group)
        stop, save_due = (bool(flag) for flag in flags.tolist())
        if save_due or stop:
            self.last_save = now
        if self.received is not None:
            reason = f"{signal.Signals(self.received).name} received"
        elif self.launcher_gone is not None:
            reason = self.launcher_gone
        else:
            reason = "another rank was told to stop" if stop else ""
        return Check(stop=stop, save_due=save_due, reason=reason)

    def saved(self, now: float | None = None) -> None:
        """Restart the time-based save clock after a save made for another reason (checkpoint.every_steps)."""
        self.last_save = self.clock() if now is None else now
