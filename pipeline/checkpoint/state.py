"""What a checkpoint must get right about the training process beside DeepSpeed's engine state: every
global random generator (`seed_everything`, `rng_state`, `set_rng_state`: a resume draws exactly what the
saving process would have drawn) and the weights being finite (`all_finite`, the guard before a save).

DeepSpeed's checkpoint holds the engine (module, optimizer, LR schedule), not the process's global generators,
and it saves whatever weights the engine has, diverged or not. The trainer state (pipeline.train.state)
carries the generators' states through these functions; `CheckpointManager.save` refuses non-finite weights.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators (torch.manual_seed seeds every CUDA device too),
    so that nothing a run draws from a global generator depends on the process it happens to run in."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every global generator's state: Python, numpy, torch CPU and (once CUDA is in use) every CUDA device."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Put every generator `rng_state` recorded back where it was: the next draws equal those the saving
    process would have made."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def all_finite(module: torch.nn.Module) -> bool:
    """Whether every parameter of `module` is finite, agreed by every rank.

    One max-abs reduction per dtype over all parameters (under ZeRO-3 each rank's own partition), one
    all-reduce of the result when a process group is up, and one host read: cheap enough before each save."""
    tensors = [getattr(parameter, "ds_tensor", parameter).detach() for parameter in module.parameters()]
    tensors = [tensor for tensor in tensors if tensor.numel()]
    device = tensors[0].device if tensors else torch.device("cpu")
    finite = torch.ones((), dtype=torch.int32, device=device)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for tensor in tensors:
        by_dtype.setdefault(tensor.dtype, []).append(tensor)
    for group in by_dtype.values():
        # the inf-norm is the largest |x|: it cannot overflow, and NaN or inf anywhere makes it non-finite
        peak = torch.stack(torch._foreach_norm(group, float("inf"))).amax()
        finite = finite & torch.isfinite(peak).to(torch.int32)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        if torch.distributed.get_backend() == "nccl" and finite.device.type != "cuda":
            finite = finite.cuda()
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
    return bool(finite.item())
