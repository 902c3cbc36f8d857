"""Optimizer and learning-rate schedule: parameter groups (no decay on biases, norms, temperature), AdamW or
LAMB, linear warmup then cosine. Plain PyTorch (layer 2): DeepSpeed receives the optimizer built here.

    optimizer = build_optimizer(model, OptimConfig(lr=5e-4))
    scheduler = LambdaLR(optimizer, lambda step: lr_factor(step, cfg, total_steps))

LAMB is timm's (`timm.optim.Lamb`, a dependency of open_clip already): a well-kept implementation with
the trust ratio per tensor, global gradient-norm clipping off (DeepSpeed or the trainer clips).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from pipeline.core.errors import ConfigError


@dataclasses.dataclass
class OptimConfig:
    name: str = "adamw"
    """Optimizer: 'adamw' or 'lamb'. Biases, norms, the logit scale/bias and sigma heads get no weight decay."""
    lr: float = 5e-4
    """Peak learning rate, reached at the end of the linear warmup."""
    weight_decay: float = 0.1
    """Decoupled weight decay on the weight matrices."""
    beta1: float = 0.9
    """First-moment decay."""
    beta2: float = 0.98
    """Second-moment decay (0.98 as in CLIP: steadier at large batch)."""
    eps: float = 1e-6
    """Denominator epsilon."""
    warmup_steps: int = 100
    """Optimizer steps of linear warmup from 0 to `lr`."""
    min_lr_ratio: float = 0.0
    """The cosine schedule ends at `lr * min_lr_ratio`."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    fused: bool = True
    """AdamW with torch's fused kernel (one launch for all parameters instead of several per tensor, and no
    per-tensor host read); on CUDA and CPU, ignored by LAMB."""

    def __post_init__(self):
        if self.name not in ("adamw", "lamb"):
            raise ConfigError(f"optim.name must be 'adamw' or 'lamb', got {self.name!r}")
        if self.lr <= 0:
            raise ConfigError(f"optim.lr must be positive, got {self.lr}")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.grad_clip < 0:
            raise ConfigError(f"optim.grad_clip must be >= 0, got {self.grad_clip}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError("optim.beta1 and optim.beta2 must be in [0, 1)")


# parameters exempt from weight decay, besides every 0/1-dim tensor (biases, norm gains)
NO_DECAY_NAMES = ("bias", "norm", "ln_", "logit_scale", "logit_bias", "sigma")


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on weight matrices only: decaying biases, norms or the temperature hurts CLIP.

    Frozen parameters (requires_grad=False: a locked tower, model.lock_image / model.lock_text) are left
    out, so they get no optimizer state; an empty group is left out too (DeepSpeed's ZeRO optimizers
    cannot flatten one)."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if parameter.ndim < 2 or any(part in name for part in NO_DECAY_NAMES):
            no_decay.append(parameter)
        else:
            decay.append(parameter)
    if not decay and not no_decay:
        raise ConfigError("every parameter is frozen (model.lock_image, model.lock_text): nothing to train")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW or LAMB over `parameter_groups`. AdamW uses torch's fused kernel when `optim.fused` is on
    (CUDA and CPU): one kernel for all tensors, and no per-tensor host read of the step count, which
    the unfused single-tensor path makes (`.item()` per parameter per step)."""
    groups = parameter_groups(model, cfg.weight_decay)
    betas = (cfg.beta1, cfg.beta2)
    if cfg.name == "lamb":
        from timm.optim import Lamb

        # always_adapt: the trust ratio on every tensor, also those without weight decay (You et al.);
        # max_grad_norm=None: clipping is DeepSpeed's or the trainer's, once, not again in here
        return Lamb(groups, lr=cfg.lr, betas=betas, eps=cfg.eps, max_grad_norm=None, always_adapt=True)
    # fused=True is checked against the parameters' device at the first step, after DeepSpeed has
    # moved the module there; the parameter objects stay the same, so it may be set now
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.eps, fused=cfg.fused)


def lr_factor(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Linear warmup to 1, then cosine down to `min_lr_ratio` at `total_steps`."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine
