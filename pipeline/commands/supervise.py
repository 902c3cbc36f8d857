"""Supervise a launcher: pass stop signals to the ranks of the job, wait for them, exit as they did.

    python -m pipeline.commands.supervise --master-port 29500 -- deepspeed --num_gpus 8 --module pipeline train ...
    python -m pipeline.commands.supervise -- torchrun --standalone --nproc_per_node 8 -m pipeline train ...

The launch/ scripts put this in front of the deepspeed launcher and torchrun, because neither passes a stop
signal on as a run needs it: deepspeed's runner dies of SIGTERM or SIGUSR1 at once and leaves its ranks
training (its single-node path installs no handler); its launch.py answers SIGTERM/SIGINT by terminating
every rank with a 30 s grace; torchrun gives its workers 30 s and does not pass SIGUSR1 on at all, and turns
a rank's exit status 75 into its own failure (1). A scheduler or container runtime signals the process it
started, and gives it a grace period before SIGKILL; this program makes that process the supervisor:
- The launcher runs in a process group of its own, so a terminal's Ctrl-C (or a signal to our group)
  reaches only the supervisor, never the launcher, which would tear the job down.
- SIGTERM, SIGUSR1 or SIGINT to the supervisor is passed to every rank of the job on this node: the
  launcher's descendants that carry RANK in their environment, and, with --master-port, every process of
  this user whose environment has RANK and that MASTER_PORT (ranks that pdsh started through ssh on this
  node are not our descendants). One rank is enough: the ranks agree at their next step that one was told
  (pipeline.train.preemption), so ranks on other nodes stop too; every rank finishes its step, saves the same
  checkpoint and exits 75. Data-loader workers (which carry RANK too) are left alone: their rank stops them.
- It then waits for the launcher. `--grace-s` after the first signal it kills whatever of the job is left
  (a rank stuck in a collective would otherwise hold the GPUs for ever), and so does a third stop signal
  (Ctrl-C three times: kill without waiting for the save); after the launcher exits, any process of the
  job still running is killed, and named.
- Its exit status is the launcher's, except that when every rank it saw exited 75 it exits 75 whatever
  the launcher made of that (each `python -m pipeline` process writes its status into a directory this
  program names in PIPELINE_EXIT_STATUS_DIR). A status above 128 is 128 + the signal that killed the launcher.
If the supervisor itself is killed outright, every rank still stops and saves: each rank watches the
launchers above it and stops when one is gone (pipeline.train.preemption).

This module imports nothing heavy (no torch): it starts in milliseconds and stays small in memory.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from pipeline.core.errors import EXIT_STATUS_DIR_ENV, PREEMPTED_EXIT_CODE, STOP_SIGNALS

POLL_S = 0.1  # how soon a signal is passed on
SCAN_S = 1.0  # how often the ranks are looked for (to know every rank that ran, for the exit status)
KILL_AFTER_SIGNALS = 3  # the third stop signal (Ctrl-C three times) kills the job without waiting for the save
LEFTOVER_WAIT_S = 10.0  # what the launcher left running gets this long to exit by itself, then SIGKILL


def log(message: str) -> None:
    print(f"supervise: {message}", file=sys.stderr, flush=True)


def _environ(process: psutil.Process) -> dict[str, str]:
    try:
        return process.environ()
    except psutil.Error:  # gone, or not ours to read
        return {}


class Job:
    """The launcher this program started, and the ranks of its job on this node."""

    def __init__(self, command: list[str], master_port: int | None, env: dict[str, str]):
        # a process group of its own: a terminal's Ctrl-C goes to the supervisor, which forwards it to the ranks
        self.launcher = subprocess.Popen(command, env=env, process_group=0)
        self.master_port = None if master_port is None else str(master_port)
        self.ranks: dict[int, psutil.Process] = {}  # every rank seen, by pid
        self.descendants: set[int] = set()  # the ranks started under us, which write their exit status for us

    def find_ranks(self) -> list[psutil.Process]:
        """The job's rank processes running now (not their data-loader workers), and remember them."""
        candidates: dict[int, psutil.Process] = {}
        try:
            candidates.update((p.pid, p) for p in psutil.Process(self.launcher.pid).children(recursive=True))
        except psutil.Error:
            pass  # the launcher has exited
        if self.master_port is not None:
            uid = os.getuid()
            for process in psutil.process_iter(["uids"]):
                uids = process.info["uids"]
                if uids is not None and uids.real == uid and process.pid != os.getpid():
                    candidates.setdefault(process.pid, process)
        with_rank = {}
        for pid, process in candidates.items():
            environ = _environ(process)
            if "RANK" in environ and (self.master_port is None or pid in self.ranks
                                      or environ.get("MASTER_PORT") == self.master_port
                                      or self._descends_from_launcher(process)):
                with_rank[pid] = process
        ranks = []
        for process in with_rank.values():
            try:
                if process.ppid() not in with_rank:  # a rank's forked workers carry RANK too
                    ranks.append(process)
            except psutil.Error:
                continue
        self.ranks.update((p.pid, p) for p in ranks)
        self.descendants.update(p.pid for p in ranks if self._descends_from_launcher(p))
        return ranks

    def _descends_from_launcher(self, process: psutil.Process) -> bool:
        try:
            return any(parent.pid == self.launcher.pid for parent in process.parents())
        except psutil.Error:
            return False

    def forward(self, signum: int) -> None:
        name = signal.Signals(signum).name
        ranks = self.find_ranks()
        if not ranks:
            # no rank has started yet: nothing to save, stop the launcher and whatever it started
            log(f"{name}: no rank is running yet; stopping the launcher")
            self.signal_group(signal.SIGTERM)
            return
        for process in ranks:
            try:
                process.send_signal(signum)
            except psutil.Error:
                pass
        log(f"{name}: passed to the ranks (pid {', '.join(str(p.pid) for p in ranks)}); each finishes its step, "
            "saves and exits 75")

    def signal_group(self, signum: int) -> None:
        try:
            os.killpg(self.launcher.pid, signum)
        except ProcessLookupError:
            pass

    def leftovers(self) -> list[psutil.Process]:
        """Processes of the job still running: in the launcher's group, or a rank seen (and its children)."""
        left: dict[int, psutil.Process] = {}
        for process in psutil.process_iter():
            try:
                # the launcher itself is our child: Popen reaps it (psutil's wait would, and lose its status)
                if process.pid != self.launcher.pid and os.getpgid(process.pid) == self.launcher.pid:
                    left[process.pid] = process
            except (ProcessLookupError, psutil.Error):
                continue
        for process in self.ranks.values():
            try:
                if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                    left[process.pid] = process
                    left.update((c.pid, c) for c in process.children(recursive=True))
            except psutil.Error:
                continue
        return list(left.values())


def kill_all(processes: list[psutil.Process], wait_s: float) -> list[psutil.Process]:
    """Wait up to `wait_s` for them to exit, then SIGKILL the rest; returns those killed."""
    _, alive = psutil.wait_procs(processes, timeout=wait_s)
    for process in alive:
        try:
            process.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)
    return alive


def read_statuses(directory: Path) -> dict[int, int]:
    statuses = {}
    for path in directory.iterdir():
        try:
            statuses[int(path.name)] = int(path.read_text().strip())
        except ValueError:
            continue
    return statuses


def supervise(command: list[str], master_port: int | None = None, grace_s: float = 600.0) -> int:
    status_dir = Path(tempfile.mkdtemp(prefix="pipeline-exit-"))
    pending: list[int] = []
    previous = {signum: signal.signal(signum, lambda signum, frame: pending.append(signum)) for signum in STOP_SIGNALS}
    try:
        job = Job(command, master_port, {**os.environ, EXIT_STATUS_DIR_ENV: str(status_dir)})
        deadline, received, last_scan = None, 0, 0.0
        while job.launcher.poll() is None:
            while pending:
                signum, received = pending.pop(0), received + 1
                if received >= KILL_AFTER_SIGNALS:
                    log(f"{signal.Signals(signum).name} for the third time: killing the job without a save")
                    deadline = time.monotonic()
                    break
                job.forward(signum)
                deadline = deadline or time.monotonic() + grace_s
            if deadline is not None and time.monotonic() >= deadline:
                if received < KILL_AFTER_SIGNALS:
                    log(f"the job has not stopped {grace_s:.0f} s after the signal: killing it")
                kill_all(job.leftovers(), wait_s=0)
                job.launcher.kill()
                deadline = float("inf")
            if time.monotonic() - last_scan >= SCAN_S:
                job.find_ranks()
                last_scan = time.monotonic()
            time.sleep(POLL_S)
        status = job.launcher.returncode
        status = 128 - status if status < 0 else status  # killed by signal N: 128 + N, as a shell reports it
        killed = kill_all(job.leftovers(), wait_s=LEFTOVER_WAIT_S)
        if killed:
            log("killed what the launcher left running: " + ", ".join(f"pid {p.pid}" for p in killed))
        statuses = read_statuses(status_dir)
        if job.ranks:
            log(f"the launcher exited {status}; ranks on this node: " + ", ".join(
                f"pid {pid} exited {statuses[pid]}" if pid in statuses
                else f"pid {pid} left no status" if pid in job.descendants
                else f"pid {pid} (started through ssh: its launcher reports its status)"
                for pid in sorted(job.ranks)))
        if status != 0 and job.descendants and all(statuses.get(pid) == PREEMPTED_EXIT_CODE for pid in job.descendants):
            status = PREEMPTED_EXIT_CODE  # torchrun reports a rank's 75 as its own failure
        return status
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        shutil.rmtree(status_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.commands.supervise",
        description="Run a launcher (deepspeed, torchrun) so that SIGTERM, SIGUSR1 or SIGINT to this process "
        "reaches every rank: each finishes its step, saves a checkpoint and exits 75, and so does this process.",
    )
    parser.add_argument("--master-port", type=int, default=None,
                        help="the job's MASTER_PORT: also signal this node's ranks that are not descendants of the "
                        "launcher (multi-node: pdsh starts them through ssh)")
    parser.add_argument("--grace-s", type=float, default=float(os.environ.get("STOP_GRACE_S", 600)),
                        help="seconds after the first signal before whatever is left of the job is killed "
                        "(default: $STOP_GRACE_S or 600)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the launcher's command line")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command: give the launcher's command line after --")
    return supervise(command, master_port=args.master_port, grace_s=args.grace_s)


if __name__ == "__main__":
    sys.exit(main())
