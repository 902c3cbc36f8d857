"""What is applied to a plain model from outside to train it: precision, the DeepSpeed engine, compile.

    precision = resolve_precision(cfg.train.precision)          # 'auto' -> amp_bf16 on CUDA, fp32 on CPU
    compiled = compile_blocks(model)                            # every transformer block, in place
    engine = build_engine(model, optimizer, scheduler, deepspeed_config(...))
    clip_gradients(engine, max_norm)                            # ZeRO-0, before engine.step()

The towers (pipeline.model) know nothing of compilation, as torchtitan's model files know nothing
of parallelism. Each transformer block is compiled on its own rather than the whole model:
- compile time stays short: the blocks of a tower share one code object, so Dynamo traces one
  block per (tower width, grad mode) and reuses it for the others;
- reentrant gradient checkpointing (pipeline.parallel.checkpointing) wraps a block call, and a compiled block inside a
  checkpoint recomputes like an eager one; a whole-model graph would have to trace through it;
- a graph break (a data-dependent branch, a DeepSpeed hook) costs one block, not the model.
"""

from __future__ import annotations

import difflib
import logging
import time
from typing import Any

import torch
from torch import nn

from pipeline.core.errors import ConfigError
from pipeline.parallel.distributed import on_cpu

log = logging.getLogger(__name__)

# Training precisions, under the names open_clip users type (open_clip_train --precision); 'auto' picks one.
PRECISIONS = ("amp_bf16", "amp", "fp32")
# Former names, refused with a pointer to the new one: the modes behind them changed.
RENAMED_PRECISIONS = {"bf16": "amp_bf16", "fp16": "amp", "amp_bfloat16": "amp_bf16"}


def check_precision_name(precision: str) -> None:
    """ConfigError for a precision name that is not 'auto' or one of PRECISIONS, with the name meant."""
    if precision == "auto" or precision in PRECISIONS:
        return
    choices = f"choices: auto, {', '.join(PRECISIONS)}"
    if precision in RENAMED_PRECISIONS:
        raise ConfigError(
            f"train.precision={precision} was renamed: did you mean train.precision={RENAMED_PRECISIONS[precision]}? "
            f"({choices})"
        )
    if precision == "pure_bf16":
        raise ConfigError(
            "train.precision=pure_bf16 is not offered: bf16 weights measured slower end to end than amp_bf16 "
            "(DeepSpeed's bf16 optimizer: 1805 vs 2574 samples/s, ViT-B-32 on an H100); use train.precision=amp_bf16"
        )
    close = difflib.get_close_matches(precision, PRECISIONS, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise ConfigError(f"train.precision: {hint}got {precision!r} ({choices})")


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
    grad_clip: float, log_every: int, load_universal: bool = False,
) -> dict[str, Any]:
    """The DeepSpeed JSON config for one engine, generated from our run config.

    Mixed precision is torch autocast inside the engine's forward (DeepSpeed's `torch_autocast`
    section): fp32 weights and optimizer, bf16/fp16 matmuls. DeepSpeed's `bf16` section is not used:
    its optimizer works per parameter tensor with host-synchronising checks (~300 `.item()` calls a
    step for ViT-B-32), 70 of 142 ms per step on an H100, whatever the batch (docs/PERFORMANCE.md).
    `amp` (fp16) gets torch's GradScaler from DeepSpeed: dynamic loss scaling whose overflow check is
    one fused kernel over all gradients and one host read per step.
    At ZeRO-0, gradient clipping is ours (`clip_gradients`, one foreach kernel chain, no host read):
    `gradient_clipping` is set only for ZeRO 1-3, whose optimizers hold the partitioned gradients.
    `load_universal`: the engine will load a DeepSpeed universal checkpoint (a resume at another world size,
    pipeline.checkpoint.manager.CheckpointManager.loads_universal).
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
    if load_universal:
        config["checkpoint"] = {"load_universal": True}
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
    """One engine holding both towers: DeepSpeed runs two engines in one process only at ZeRO-1."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
        dist_init_required=False,
    )
    return engine


def _is_block(module: nn.Module) -> bool:
    # open_clip's blocks (ResidualAttentionBlock and its custom variant) serve both towers and our audio tower
    return type(module).__name__ in ("ResidualAttentionBlock", "CustomResidualAttentionBlock")


def compile_blocks(model: nn.Module, mode: str | None = None) -> int:
    """Compile every transformer block of `model` in place (`nn.Module.compile`); returns how many.

    The state dict, parameters and checkpoint layout are unchanged: compilation is a wrapper around
    each block's call, not a new module. Compilation itself happens at the first forward.
    """
    count = 0
    for module in model.modules():
        if _is_block(module):
            module.compile(mode=mode, dynamic=False)
            count += 1
    if count == 0:
        log.warning("train.compile: no transformer blocks found in %s; nothing compiled", type(model).__name__)
    return count


def should_compile(setting: str, device: torch.device, zero_stage: int) -> bool:
    """train.compile -> compile or not. 'auto': on CUDA at ZeRO 0-2 (ZeRO-3's parameter gather hooks
    inside each block break its graphs), off on CPU, where inductor's compile time outweighs the gain."""
    if setting == "on":
        return True
    if setting == "off":
        return False
    return device.type == "cuda" and zero_stage < 3


class CompileTimer:
    """Wall time of the first steps, when compilation happens, kept apart from steady-state throughput:
    `first_steps_s` is reported once, and the throughput window restarts after it."""

    def __init__(self, enabled: bool, steps: int = 2):
        self.enabled, self.steps = enabled, steps
        self.started = time.perf_counter()
        self.first_steps_s: float | None = None

    def compiling(self, step_in_run: int) -> bool:
        """Whether step `step_in_run` (1-based, of this invocation) is one of the first, compiling steps."""
        return self.enabled and step_in_run <= self.steps

    def after_step(self, step_in_run: int) -> bool:
        """True exactly once, after the first `steps` steps of this invocation when compiling."""
        if not self.enabled or self.first_steps_s is not None or step_in_run < self.steps:
            return False
        self.first_steps_s = time.perf_counter() - self.started
        return True
