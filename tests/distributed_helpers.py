"""Run a function on `world_size` real processes joined in a gloo process group.

    results = run_ranks(my_fn, 2, arg1, arg2)   # my_fn(rank, world_size, arg1, arg2) on each rank

`my_fn` must be a module-level function (processes are spawned, so it is imported by name).
Each rank's return value comes back in rank order; an exception on any rank fails the caller
with that rank's traceback. A rank that does not finish in `timeout` seconds fails the test
instead of hanging it.
"""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
import traceback
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank, world_size, port, out_dir, fn, args):
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


def run_ranks(fn, world_size: int, *args, timeout: float = 300.0) -> list:
    with tempfile.TemporaryDirectory() as out_dir:
        context = mp.start_processes(
            _worker, args=(world_size, free_port(), out_dir, fn, args), nprocs=world_size,
            join=False, start_method="spawn",
        )
        import time

        deadline = time.monotonic() + timeout
        while not context.join(timeout=1.0):
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
