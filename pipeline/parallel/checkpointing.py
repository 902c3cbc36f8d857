"""Activation (gradient) checkpointing, switched on from outside the model: `apply_activation_checkpointing`.

    apply_activation_checkpointing(model, cfg.model.grad_checkpointing)    # after build_model, before compile

Every open_clip transformer stack (both towers of an image-text model, the audio tower and the text tower
of an audio-text model) and every ResNet stage recomputes its blocks in the backward pass, with *reentrant*
checkpointing, which DeepSpeed ZeRO-3 needs. The model's code knows nothing of it: an instance attribute
shadows each stack's `forward`; the state dict, parameters and checkpoint layout are unchanged.
"""

from __future__ import annotations

import torch
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import CustomTransformer, Transformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from pipeline.core.errors import ConfigError

# towers whose blocks we do not checkpoint (open_clip's would be non-reentrant, which ZeRO-3 breaks)
UNSUPPORTED_TOWERS = ("TimmModel", "HFTextEncoder")


def apply_activation_checkpointing(model: nn.Module, enable: bool = True) -> int:
    """Reentrant checkpointing of every transformer block and ResNet stage in both towers of `model` (on or
    off); returns how many stacks were switched. A ConfigError naming model.grad_checkpointing when a tower
    cannot be checkpointed, or fewer than two stacks (one per tower) are found."""
    name = getattr(getattr(model, "cfg", None), "name", type(model).__name__)
    unsupported = [type(m).__name__ for m in model.modules() if type(m).__name__ in UNSUPPORTED_TOWERS]
    if enable and unsupported:
        raise ConfigError(
            f"model.grad_checkpointing: {name} has a {unsupported[0]} tower, which we do not "
            "checkpoint (only open_clip transformer and ResNet towers)"
        )
    switched = _set_reentrant_checkpointing(model, enable)
    if enable and switched < 2:
        raise ConfigError(f"model.grad_checkpointing: found {switched} transformer stacks in {name}, expected 2")
    return switched


def activation_checkpointing_on(model: nn.Module) -> bool:
    """Whether `apply_activation_checkpointing` left checkpointing on in `model`."""
    return any(isinstance(module.__dict__.get("forward"), _BoundCheckpointedForward) for module in model.modules())


def _run_block(block: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
    return block(x, attn_mask=attn_mask)


def _reentrant_checkpointed_forward(transformer: nn.Module, x: torch.Tensor, attn_mask=None) -> torch.Tensor:
    """open_clip's Transformer.forward, with each block under *reentrant* checkpointing.

    open_clip checkpoints with use_reentrant=False, which DeepSpeed ZeRO-3 breaks ("recomputed
    shape" errors: the partitioned parameters are gathered differently on recomputation).
    """
    if not transformer.batch_first:
        x = x.transpose(0, 1).contiguous()
    for block in transformer.resblocks:
        if torch.is_grad_enabled() and x.requires_grad:
            x = checkpoint(_run_block, block, x, attn_mask, use_reentrant=True)
        else:
            # no grad (GradCache's feature pass, a locked tower): nothing to save or recompute. An input
            # without grad (the first trainable block after locked ones, model.lock_*_unlocked_*) runs
            # plainly too: a reentrant checkpoint would leave that block's parameters without gradient
            x = block(x, attn_mask=attn_mask)
    if not transformer.batch_first:
        x = x.transpose(0, 1)
    return x


def _checkpointed_stage_forward(stage: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """A ResNet stage (nn.Sequential of bottlenecks) recomputed in backward, reentrant like the blocks above.
    Its BatchNorm layers see the same batch on recomputation, so outputs and gradients are unchanged;
    only their running statistics take a second momentum update per step."""
    if torch.is_grad_enabled() and x.requires_grad:  # see _reentrant_checkpointed_forward
        return checkpoint(nn.Sequential.forward, stage, x, use_reentrant=True)
    return nn.Sequential.forward(stage, x)


def _set_reentrant_checkpointing(module: nn.Module, enable: bool) -> int:
    """Switch every open_clip transformer stack and ResNet tower inside `module`; returns how many were switched."""
    count = 0
    for child in module.modules():
        if isinstance(child, (Transformer, CustomTransformer)):
            child.grad_checkpointing = False  # never open_clip's own (non-reentrant) path
            stages = [(child, _reentrant_checkpointed_forward)]
        elif isinstance(child, ModifiedResNet):
            stages = [(getattr(child, f"layer{i}"), _checkpointed_stage_forward) for i in range(1, 5)]
        else:
            continue
        for stage, forward in stages:
            if enable:
                # an instance attribute shadows the class's forward; the state dict is unchanged
                stage.forward = _BoundCheckpointedForward(stage, forward)
            elif "forward" in stage.__dict__:
                del stage.forward
        count += 1
    return count


class _BoundCheckpointedForward:
    """Picklable stand-in for a bound method (torch.save(model) and deepcopy keep working)."""

    def __init__(self, module: nn.Module, forward):
        self.module, self.forward = module, forward

    def __call__(self, x, *args, **kwargs):
        return self.forward(self.module, x, *args, **kwargs)
