"""Process group and DeepSpeed engine set-up, for every way a run is started.

    deepspeed --num_gpus 2 --no_local_rank --module pipeline train --config configs/demo-clip.yaml     # one node
    deepspeed --hostfile hosts --no_local_rank --module pipeline train --config configs/vit-b-32.yaml  # several nodes
    torchrun --nproc_per_node 2 -m pipeline train --config configs/demo-clip.yaml
    srun python -m pipeline train --config configs/vit-b-32.yaml                 # SLURM
    python -m pipeline train --config configs/demo-clip.yaml                      # one process

With no GPU everything runs on DeepSpeed's CPU accelerator with gloo; nothing to set by hand.
This is, with train.py and checkpoint.py, the only place that imports deepspeed.
"""

from __future__ import annotations

import datetime
import os
import socket
import subprocess
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.config import ConfigError


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


def deepspeed_config(
    *, micro_batch_size: int, accum_steps: int, world_size: int, zero_stage: int, precision: str,
    grad_clip: float, log_every: int,
) -> dict[str, Any]:
    """The DeepSpeed JSON config for one engine, generated from our run config."""
    if zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"train.zero_stage must be 0, 1, 2 or 3, got {zero_stage}")
    config: dict[str, Any] = {
        "train_batch_size": micro_batch_size * accum_steps * world_size,
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": accum_steps,
        "gradient_clipping": grad_clip,
        "steps_per_print": max(log_every, 1) * 1000,  # our own logger reports; keep DeepSpeed's quiet
        "wall_clock_breakdown": False,
        "zero_optimization": {"stage": zero_stage},
        "zero_allow_untested_optimizer": True,  # our AdamW / LAMB are plain torch optimizers
    }
    if zero_stage == 3:
        # gather small parameters (norms, logit scale) once instead of on every use
        config["zero_optimization"].update(stage3_param_persistence_threshold=10_000)
    if precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif precision == "fp16":
        # dynamic loss scaling: start high, halve on overflow, grow back after a quiet window
        config["fp16"] = {
            "enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
            "hysteresis": 2, "min_loss_scale": 1,
        }
    elif precision != "fp32":
        raise ConfigError(f"train.precision must be fp32, bf16 or fp16, got {precision!r}")
    return config


def check_precision(precision: str) -> None:
    """ConfigError naming train.precision when this accelerator cannot train in it, before any work.

    fp16 fails instead of falling back to another precision: a silent switch would change the
    numerics and memory of the run the user configured. DeepSpeed's CPU accelerator has fp16 only on
    CPUs with AVX512-FP16 (oneDNN); elsewhere it has no fp16 at all.
    """
    if precision != "fp16" or not on_cpu():
        return
    from deepspeed.accelerator import get_accelerator

    if not get_accelerator().is_fp16_supported():
        raise ConfigError(
            "train.precision=fp16 is not available on this machine: DeepSpeed runs on its CPU accelerator, "
            "which has no fp16 on this CPU (it needs AVX512-FP16). Use train.precision=bf16 or fp32 on CPU; "
            "fp16 runs on GPUs."
        )


def build_engine(model: torch.nn.Module, optimizer, scheduler, ds_config: dict[str, Any]):
    """One engine holding both towers (DESIGN.md: two engines only work at ZeRO-1)."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
        dist_init_required=False,
    )
    return engine


def model_dtype(precision: str) -> torch.dtype:
    """The dtype DeepSpeed casts the module to, which its float inputs must match."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def broadcast_object(value: Any, src: int = 0) -> Any:
    if not torch.distributed.is_initialized():
        return value
    holder = [value]
    torch.distributed.broadcast_object_list(holder, src=src)
    return holder[0]


def all_gather_objects(value: Any) -> list[Any]:
    if not torch.distributed.is_initialized():
        return [value]
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, value)
    return gathered
