"""FLOPs per training sample (pipeline.observe.flops): a hand count, open_clip's published profile, torch's own FLOP
counter on the real model, and MFU / HFU from them."""

from __future__ import annotations

import pytest
import torch

from pipeline.model.build import build_model
from pipeline.model.config import ModelConfig
from pipeline.observe.flops import flops_per_sample, tower_flops, transformer_flops, utilisation


def test_tiny_clip_flops_match_a_hand_count():
    # tiny-clip: 64 px images in 16 px patches (16 + 1 class token = 17 positions), width 64, 2 layers,
    # MLP 256; text: 32 positions, width 64, 2 layers; embed 64. Forward FLOPs = 2 x multiply-adds.
    patch_embedding = 2 * 16 * (3 * 16 * 16) * 64
    per_vision_block = (2 * 17 * 64 * 192 + 2 * 17 * 64 * 64 + 2 * 17 * 64 * 256 + 2 * 17 * 256 * 64
                        + 2 * 17 * 17 * 64 + 2 * 17 * 17 * 64)
    per_text_block = (2 * 32 * 64 * 192 + 2 * 32 * 64 * 64 + 2 * 32 * 64 * 256 + 2 * 32 * 256 * 64
                      + 2 * 32 * 32 * 64 + 2 * 32 * 32 * 64)
    projection = 2 * 64 * 64
    vision = patch_embedding + 2 * per_vision_block + projection
    text = 2 * per_text_block + projection
    assert tower_flops(ModelConfig(name="tiny-clip")) == {"media": vision, "text": text}
    assert vision + text == 11_895_296

    flops = flops_per_sample(ModelConfig(name="tiny-clip"))
    assert flops == {"forward": vision + text, "model": 3 * (vision + text), "executed": 3 * (vision + text)}
    recompute = flops_per_sample(ModelConfig(name="tiny-clip"), grad_checkpointing=True, gradcache=True)
    assert recompute["model"] == flops["model"] and recompute["executed"] == 5 * (vision + text)


def test_vit_b_32_flops_match_open_clips_published_profile():
    # open_clip's model profile lists ViT-B-32 at 4.41 image GMACs and 2.96 text GMACs per sample
    towers = tower_flops(ModelConfig(name="ViT-B-32"))
    assert towers["media"] / 2e9 == pytest.approx(4.41, rel=0.01)
    assert towers["text"] / 2e9 == pytest.approx(2.96, rel=0.01)
    assert transformer_flops(50, 768, 12) < towers["media"]  # the patch embedding and projection come on top


def test_flop_count_agrees_with_torchs_flop_counter_on_the_real_model():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    cfg = ModelConfig(name="tiny-clip")
    model = build_model(cfg).train()
    batch = 3
    counter = FlopCounterMode(display=False)
    # the math attention kernel is made of matmuls torch's counter sees (it has no formula for the fused
    # CPU kernel); norms, activations and the loss are in neither count
    with sdpa_kernel(SDPBackend.MATH), counter:
        model(torch.randn(batch, 3, 64, 64), torch.randint(1, 49000, (batch, 32)))
    assert counter.get_total_flops() == batch * flops_per_sample(cfg)["forward"]


def test_mfu_counts_model_flops_and_hfu_what_is_executed():
    cfg = ModelConfig(name="tiny-clip")
    forward = flops_per_sample(cfg)["forward"]
    plain = utilisation(flops_per_sample(cfg), samples_per_s_per_gpu=100.0, peak_flops=1e12)
    assert plain["mfu"] == pytest.approx(3 * forward * 100.0 / 1e12) and plain["hfu"] == plain["mfu"]
    # recomputation is work the device does, not work the model needs: HFU rises, MFU does not
    checkpointed = utilisation(flops_per_sample(cfg, grad_checkpointing=True), 100.0, 1e12)
    assert checkpointed["mfu"] == plain["mfu"] and checkpointed["hfu"] == pytest.approx(4 / 3 * plain["mfu"])
    both = utilisation(flops_per_sample(cfg, grad_checkpointing=True, gradcache=True), 100.0, 1e12)
    assert both["mfu"] == plain["mfu"] and both["hfu"] == pytest.approx(5 / 3 * plain["mfu"])
