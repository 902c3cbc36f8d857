"""Process group and DeepSpeed engine set-up, for every way a run is started.

    deepspeed --num_gpus 2 --no_local_rank --module pipeline train --config configs/demo-clip.yaml     # one node
    deepspeed --hostfile hosts --no_local_rank --module pipeline train --config configs/vit-b-32.yaml  # several nodes
    torchrun --nproc_per_node 2 -m pipeline train --config configs/demo-clip.yaml
    srun python -m pipeline train --config configs/vit-b-32.yaml                 # SLURM
    python -m pipeline train --config configs/demo-clip.yaml                      # one process

With no GPU everything runs on DeepSpeed's CPU accelerator with gloo; nothing to set by hand.
Process groups only; what is applied to the model (engine, precision, compile) is pipeline.parallel.parallelize.
With parallelize.py, pipeline/checkpoint/ and the trainer, among the places that import deepspeed (pipeline/model,
data, loss and the other library packages never do: pyproject.toml's forbidden contract).
"""

from __future__ import annotations

import datetime
import os
import socket
import subprocess
from dataclasses import dataclass
from typing import Any

import torch


def _default_accelerator() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# DeepSpeed picks its accelerator when it is first imported, so the default must be in the
# environment before any `import deepspeed` in this process.
os.environ.setdefault("DS_ACCELERATOR", _default_accelerator())


def on_cpu() -> bool:
    return os.environ.get("DS_ACCELERATOR") == "cpu"


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _slurm_master_addr() -> str:
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST", "")
    try:  # scontrol expands "node[01-04]" the way SLURM itself does
        hosts = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30, check=True
        ).stdout.split()
        if hosts:
            return hosts[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return nodelist.split(",")[0].split("[")[0] or "127.0.0.1"


def launcher_environment() -> dict[str, str]:
    """RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT from whichever launcher started us.

    deepspeed and torchrun set them; SLURM's srun sets SLURM_* instead; a plain process sets
    nothing and becomes a world of one on a free local port.
    """
    env = {}
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        env.update(RANK=os.environ["RANK"], WORLD_SIZE=os.environ["WORLD_SIZE"],
                   LOCAL_RANK=os.environ.get("LOCAL_RANK", "0"))
    elif "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        env.update(
            RANK=os.environ["SLURM_PROCID"], WORLD_SIZE=os.environ["SLURM_NTASKS"],
            LOCAL_RANK=os.environ.get("SLURM_LOCALID", "0"),
        )
        env.setdefault("MASTER_ADDR", os.environ.get("MASTER_ADDR") or _slurm_master_addr())
        # every task derives the same port from the job id, so no rendezvous is needed for it
        job_port = 20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000
        env.setdefault("MASTER_PORT", os.environ.get("MASTER_PORT") or str(job_port))
    else:
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    env.setdefault("MASTER_ADDR", os.environ.get("MASTER_ADDR", "127.0.0.1"))
    env.setdefault("MASTER_PORT", os.environ.get("MASTER_PORT") or str(_free_port()))
    return env


def init_distributed(timeout_s: float = 1800.0) -> DistInfo:
    """Join (or create) the process group through DeepSpeed: nccl on GPU, gloo on CPU.

    `timeout_s` bounds every collective, so a rank that dies makes its peers fail instead of
    waiting forever.
    """
    os.environ.update(launcher_environment())
    import deepspeed
    import deepspeed.ops

    if on_cpu() and os.environ.get("PIPELINE_DS_SHM_COMM", "0") != "1":
        # DeepSpeed's CPU shared-memory all-reduce is a C++ op JIT-compiled on first use (about
        # two minutes); gloo does the same reductions without it. PIPELINE_DS_SHM_COMM=1 keeps it.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    local_rank = int(os.environ["LOCAL_RANK"])
    if on_cpu():
        device = torch.device("cpu")
        backend = "gloo"
        # ranks on one machine share its cores: one intra-op pool per rank oversubscribes them
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_ranks))
    else:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "nccl"
    deepspeed.init_distributed(
        dist_backend=backend, auto_mpi_discovery=False, timeout=datetime.timedelta(seconds=timeout_s)
    )
    return DistInfo(
        rank=torch.distributed.get_rank(), world_size=torch.distributed.get_world_size(),
        local_rank=local_rank, device=device,
    )


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def broadcast_object(value: Any, src: int = 0) -> Any:
    if not torch.distributed.is_initialized():
        return value
    holder = [value]
    torch.distributed.broadcast_object_list(holder, src=src)
    return holder[0]


def average_buffers(module: torch.nn.Module) -> None:
    """Replace every floating-point buffer (BatchNorm running statistics) by its mean over the ranks.

    Each rank updates such buffers from its own micro-batches and DeepSpeed never syncs them (DDP
    broadcasts rank 0's), so the ranks drift apart; a checkpoint keeps only rank 0's copy. Averaged
    before every evaluation and every save, the evaluated model is the saved one on every rank, and
    `eval` of the checkpoint gives the figures the run logged. Training is unaffected: train-mode
    BatchNorm normalises with the batch's own statistics."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return
    world_size = torch.distributed.get_world_size()
    for buffer in module.buffers():
        if buffer.is_floating_point():
            # summed in float64: exact for equal values, so averaging twice (before an eval, then before the
            # save of the same step) leaves them unchanged to the last bit
            total = buffer.data.double()
            torch.distributed.all_reduce(total)
            buffer.data.copy_(total / world_size)
