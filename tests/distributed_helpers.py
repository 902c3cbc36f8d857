"""Run a function on `world_size` real processes joined in a gloo process group; run a command line.

    results = run_ranks(my_fn, 2, arg1, arg2)   # my_fn(rank, world_size, arg1, arg2) on each rank
    result = run_command(["train", "--config", ...], env={...})  # `python -m pipeline train ...`, its output

`my_fn` must be a module-level function (it is pickled by name). Each rank is a fresh process forked from a
forkserver that imported torch, DeepSpeed, open_clip and the trainer once (PRELOAD): a spawned interpreter spends
about 5 s of CPU importing them, and the suite starts about 80 ranks. The forkserver is started once per test
process with the ranks' environment, DeepSpeed's CPU accelerator (these ranks are gloo ranks on the CPU); every
rank then takes the caller's current environment and working directory, as a spawned one would. Inside the ranks,
new processes (DataLoader workers) start with the platform's default method, fork on Linux, as they do under
`python -m pipeline train` (a rank started any other way would make that way its default: spawned workers are
fresh interpreters, 4-9 s a loader on 2 cores).
"""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp

PRELOAD = ["torch", "torch.distributed", "deepspeed", "open_clip", "pipeline.train.loop", "pipeline.commands.runs"]
"""Imported once by the forkserver the ranks are forked from."""
CPU_ONLY = {"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _enter(environment: dict, cwd: str) -> None:
    """In a process forked from the server: the caller's environment and directory, and the platform's default
    start method for the processes it starts (fork on Linux, as under `python -m pipeline`)."""
    import multiprocessing

    multiprocessing.set_start_method(multiprocessing.get_all_start_methods()[0], force=True)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(environment)


def _worker(rank, world_size, port, out_dir, environment, cwd, fn, args):
    _enter(environment, cwd)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    result_path = Path(out_dir) / f"rank{rank}.pkl"
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = ("ok", fn(rank, world_size, *args))
    except BaseException:  # report every failure to the parent, with its traceback
        result = ("error", traceback.format_exc())
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    with open(result_path, "wb") as handle:
        pickle.dump(result, handle)


_forkserver_started = False


def _start_forkserver() -> None:
    """Start this process's forkserver (once) with PRELOAD imported, in the ranks' CPU environment."""
    import multiprocessing
    from multiprocessing import forkserver

    global _forkserver_started
    if _forkserver_started:
        return
    multiprocessing.set_forkserver_preload(PRELOAD)
    saved = {key: os.environ.get(key) for key in CPU_ONLY}
    os.environ.update(CPU_ONLY)
    try:
        forkserver.ensure_running()
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
    _forkserver_started = True


def run_ranks(fn, world_size: int, *args, timeout: float = 300.0) -> list:
    import time

    _start_forkserver()
    environment = {**os.environ, **CPU_ONLY}
    with tempfile.TemporaryDirectory() as out_dir:
        context = mp.start_processes(
            _worker, args=(world_size, free_port(), out_dir, environment, os.getcwd(), fn, args), nprocs=world_size,
            join=False, start_method="forkserver",
        )
        deadline = time.monotonic() + timeout
        while not context.join(timeout=0.2):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                raise TimeoutError(f"{fn.__name__} did not finish on {world_size} ranks in {timeout:.0f} s")
        results = []
        for rank in range(world_size):
            path = Path(out_dir) / f"rank{rank}.pkl"
            if not path.exists():
                raise RuntimeError(f"rank {rank} of {fn.__name__} exited without a result")
            status, value = pickle.loads(path.read_bytes())
            if status == "error":
                raise RuntimeError(f"rank {rank} of {fn.__name__} failed:\n{value}")
            results.append(value)
        return results


def _command(args, environment, cwd, out_dir):
    """`python -m pipeline *args` in this forked process: its output into out_dir, its status as the exit code."""
    import logging

    from pipeline.__main__ import run

    _enter(environment, cwd)
    for fd, name in ((1, "stdout"), (2, "stderr")):
        getattr(sys, name).flush()
        target = os.open(Path(out_dir) / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)
    sys.argv = [str(Path(cwd) / "pipeline" / "__main__.py"), *args]
    status = 1
    try:
        status = run()
    except SystemExit as exit_:  # as the interpreter ends on it
        status = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
        if not isinstance(exit_.code, int) and exit_.code is not None:
            print(exit_.code, file=sys.stderr)
    except BaseException:  # as the interpreter reports an uncaught exception: its traceback, status 1
        traceback.print_exc()
    finally:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(status)


def run_command(args: list[str], env: dict | None = None, cwd: str | Path | None = None,
                timeout: float = 300.0) -> subprocess.CompletedProcess:
    """`python -m pipeline *args` as subprocess.run(..., capture_output=True, text=True) returns it, run by the
    same entry point (pipeline.__main__.run: argument parsing, the command, the rank-0 error report, the exit
    status) in a process forked from the preloaded forkserver instead of a fresh interpreter: the command's
    heavy imports are done (about 4 s of CPU a call on 2 cores). `env` is the whole environment (default: this
    one); `cwd` the working directory (default: this one). Where what is checked is the interpreter's start
    itself (--help importing nothing heavy) or a launcher, start `python -m pipeline` for real."""
    import multiprocessing

    _start_forkserver()
    environment = dict(os.environ if env is None else env)
    directory = str(cwd or os.getcwd())
    with tempfile.TemporaryDirectory() as out_dir:
        process = multiprocessing.get_context("forkserver").Process(
            target=_command, args=(list(args), environment, directory, out_dir))
        process.start()
        process.join(timeout)
        if process.exitcode is None:
            process.kill()
            process.join()
            raise subprocess.TimeoutExpired(["python", "-m", "pipeline", *args], timeout)
        outputs = [(Path(out_dir) / name).read_text(errors="replace") if (Path(out_dir) / name).exists() else ""
                   for name in ("stdout", "stderr")]
    return subprocess.CompletedProcess(["python", "-m", "pipeline", *args], process.exitcode, *outputs)
