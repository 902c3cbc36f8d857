"""What is applied to a plain model from outside before it is trained: torch.compile per block.

    compiled = compile_blocks(model)        # every transformer block of both towers, in place

The towers (pipeline.models) know nothing of compilation, as torchtitan's model files know nothing
of parallelism. Each transformer block is compiled on its own rather than the whole model:
- compile time stays short: the blocks of a tower share one code object, so Dynamo traces one
  block per (tower width, grad mode) and reuses it for the others;
- reentrant gradient checkpointing (models.py) wraps a block call, and a compiled block inside a
  checkpoint recomputes like an eager one; a whole-model graph would have to trace through it;
- a graph break (a data-dependent branch, a DeepSpeed hook) costs one block, not the model.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

log = logging.getLogger(__name__)


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
