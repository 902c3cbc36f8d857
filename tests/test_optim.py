"""Optimizer and schedule (plain PyTorch, no engine): LAMB is timm's, with the trust ratio on every tensor."""

from __future__ import annotations

import pytest
import torch

from pipeline.loss import LossConfig, build_loss
from pipeline.model.build import build_model
from pipeline.model.config import ModelConfig
from pipeline.optim import OptimConfig, build_optimizer, lr_factor


def _batch(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (8, 3, 64, 64), dtype=torch.uint8, generator=generator),
            torch.randint(1, 49000, (8, 32), generator=generator))


def test_lamb_moves_every_tensor_by_lr_times_its_norm_and_trains():
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="tiny-clip"))
    lr = 1e-2
    optimizer = build_optimizer(model, OptimConfig(name="lamb", lr=lr, weight_decay=0.1))
    assert type(optimizer).__module__.startswith("timm.")
    loss_fn = build_loss(LossConfig())
    media, tokens = _batch()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss, _ = loss_fn(model(media, tokens))
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if len(losses) == 1:
            # LAMB's first step: update = Adam's direction (+ decay), scaled by ||w|| / ||update||, so every
            # tensor with weights moves by exactly lr x ||w||, with or without weight decay (always_adapt)
            for name, p in model.named_parameters():
                norm = before[name].norm()
                if norm > 0 and p.grad is not None and p.grad.abs().sum() > 0:
                    moved = (p.detach() - before[name]).norm()
                    assert float(moved) == pytest.approx(lr * float(norm), rel=1e-4), name
    assert losses[-1] < losses[0] - 0.1, losses


def test_schedule_warms_up_linearly_then_follows_the_cosine_to_the_floor():
    cfg = OptimConfig(warmup_steps=10, min_lr_ratio=0.1)
    assert [lr_factor(s, cfg, 110) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert lr_factor(60, cfg, 110) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(110, cfg, 110) == pytest.approx(0.1)
    assert lr_factor(500, cfg, 110) == pytest.approx(0.1)


def test_build_optimizer_fuses_adamw_and_exempts_norms_from_decay():
    model = build_model(ModelConfig(name="tiny-clip"))
    assert build_optimizer(model, OptimConfig()).defaults["fused"] is True
    assert not build_optimizer(model, OptimConfig(fused=False)).defaults["fused"]
    decayed, exempt = build_optimizer(model, OptimConfig(weight_decay=0.2)).param_groups
    names = {id(p): name for name, p in model.named_parameters()}
    assert decayed["weight_decay"] == 0.2 and exempt["weight_decay"] == 0.0
    assert "clip.logit_scale" in {names[id(p)] for p in exempt["params"]}
    assert "clip.visual.conv1.weight" in {names[id(p)] for p in decayed["params"]}
