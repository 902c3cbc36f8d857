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

from pipeline.config import ConfigError, check_precision_name


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


# Elements per ZeRO-1/2 communication bucket (DeepSpeed's default is 5e8, which for a ViT-B-32 of 151M
# parameters is one bucket: its reduction starts only after the whole backward). 5e7 elements (200 MB in
# fp32) cuts ViT-B-32 into about 3 buckets and ViT-L-14 into about 9, so the first buckets' reductions
# overlap the rest of the backward (overlap_comm) while each transfer stays large enough (~1 ms over
# NVLink) that per-bucket latency is noise. contiguous_gradients copies each gradient into one flat
# buffer as it is produced, so a bucket is reduced from contiguous memory without a gather.
ZERO_BUCKET_ELEMENTS = 50_000_000


def resolve_precision(precision: str) -> str:
    """`train.precision` -> one of PRECISIONS: 'auto' is amp_bf16 on CUDA and fp32 on CPU (bf16 autocast on a
    CPU is slower than fp32 on most CPUs); a former or unknown name is a ConfigError naming the right one."""
    check_precision_name(precision)
    if precision == "auto":
        return "amp_bf16" if not on_cpu() else "fp32"
    return precision


def deepspeed_config(
    *, micro_batch_size: int, accum_steps: int, world_size: int, zero_stage: int, precision: str,
    grad_clip: float, log_every: int,
) -> dict[str, Any]:
    """The DeepSpeed JSON config for one engine, generated from our run config.

    Mixed precision is torch autocast inside the engine's forward (DeepSpeed's `torch_autocast`
    section): fp32 weights and optimizer, bf16/fp16 matmuls. DeepSpeed's `bf16` section is not used:
    its optimizer works per parameter tensor with host-synchronising checks (~300 `.item()` calls a
    step for ViT-B-32), 70 of 142 ms per step on an H100, whatever the batch (DESIGN.md).
    `amp` (fp16) gets torch's GradScaler from DeepSpeed: dynamic loss scaling whose overflow check is
    one fused kernel over all gradients and one host read per step.
    At ZeRO-0, gradient clipping is ours (`clip_gradients`, one foreach kernel chain, no host read):
    `gradient_clipping` is set only for ZeRO 1-3, whose optimizers hold the partitioned gradients.
    """
    if zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"train.zero_stage must be 0, 1, 2 or 3, got {zero_stage}")
    precision = resolve_precision(precision)
    config: dict[str, Any] = {
        "train_batch_size": micro_batch_size * accum_steps * world_size,
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": accum_steps,
        "gradient_clipping": grad_clip if zero_stage > 0 else 0.0,
        "steps_per_print": max(log_every, 1) * 1000,  # our own logger reports; keep DeepSpeed's quiet
        "wall_clock_breakdown": False,
        "zero_optimization": {"stage": zero_stage},
        "zero_allow_untested_optimizer": True,  # our AdamW / LAMB are plain torch optimizers
    }
    if zero_stage in (1, 2):
        config["zero_optimization"].update(
            overlap_comm=True, contiguous_gradients=True, reduce_scatter=True,
            reduce_bucket_size=ZERO_BUCKET_ELEMENTS, allgather_bucket_size=ZERO_BUCKET_ELEMENTS,
        )
    if zero_stage == 3:
        # gather small parameters (norms, logit scale) once instead of on every use
        config["zero_optimization"].update(
            stage3_param_persistence_threshold=10_000, overlap_comm=True, contiguous_gradients=True,
            reduce_bucket_size=ZERO_BUCKET_ELEMENTS,
        )
    if precision in ("amp_bf16", "amp"):
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16" if precision == "amp_bf16" else "float16"}
    return config


def check_precision(precision: str) -> None:
    """ConfigError naming train.precision when it is unknown or this accelerator cannot train in it, before
    any work. A mode fails instead of falling back to another: a silent switch would change the numerics
    and memory of the run the user configured."""
    precision = resolve_precision(precision)
    if precision == "amp" and on_cpu():
        probe = torch.ones(2, 2)
        try:
            with torch.autocast("cpu", dtype=torch.float16):
                ok = (probe @ probe).dtype == torch.float16
        except RuntimeError:
            ok = False
        if not ok:
            raise ConfigError("train.precision=amp: this CPU build of torch has no fp16 autocast; use fp32 or amp_bf16")


def clip_gradients(engine, max_norm: float) -> torch.Tensor | None:
    """Clip the global gradient norm at ZeRO-0 (DeepSpeed clips at ZeRO 1-3) without a host read.

    Called after the last backward of a step (gradients already all-reduced) and before `engine.step()`.
    Under `amp` the gradients are unscaled first, which GradScaler's step then knows.
    Returns the (device) norm, or None where DeepSpeed clips or clipping is off.
    """
    if max_norm <= 0 or engine.zero_optimization():
        return None
    scaler = getattr(engine, "torch_autocast_z0_gradscaler", None)
    if scaler is not None:
        scaler.unscale_(engine.optimizer)
    parameters = [p for p in engine.module.parameters() if p.grad is not None]
    # foreach: a few kernels for all tensors; error_if_nonfinite would read the norm on the host
    return torch.nn.utils.clip_grad_norm_(parameters, max_norm, foreach=True)


def build_engine(model: torch.nn.Module, optimizer, scheduler, ds_config: dict[str, Any]):
    """One engine holding both towers (DESIGN.md: two engines only work at ZeRO-1)."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
        dist_init_required=False,
    )
    return engine


def model_dtype(precision: str) -> torch.dtype:
    """The dtype of the module's weights, which its float inputs must match: fp32 in every mode (autocast
    lowers the matmuls, not the weights)."""
    resolve_precision(precision)
    return torch.float32


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
