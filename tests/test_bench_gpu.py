"""The GPU throughput harness, run on CPU so it never rots: the FLOP count, the batch search, the command itself.

The figures it prints on CPU are not GPU figures; what is checked here is that the harness measures
consistently (the breakdown adds up to the step, MFU is a fraction, the searches end where they must).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.bench_gpu import flops_per_sample, largest_fitting, tower_flops, transformer_flops
from pipeline.models import ModelConfig, build_model

REPO = Path(__file__).resolve().parent.parent


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


@pytest.mark.parametrize("largest", [1, 2, 3, 7, 8, 100, 1000, 65536])
@pytest.mark.parametrize("limit", [8, 1000, 131072])
def test_largest_fitting_finds_the_boundary_in_logarithmic_probes(largest, limit):
    probes = []

    def fits(n):
        probes.append(n)
        return n <= largest

    assert largest_fitting(fits, 1, limit) == min(largest, limit)
    assert max(probes) <= limit
    assert len(probes) <= 2 * (limit.bit_length() + 1)


def test_largest_fitting_when_nothing_fits_and_bad_bounds():
    assert largest_fitting(lambda n: False, 4, 64) == 0
    assert largest_fitting(lambda n: n <= 40, 4, 64) == 40  # doubling from 4 then bisecting
    with pytest.raises(ValueError, match="start"):
        largest_fitting(lambda n: True, 0, 8)


def _bench(tmp_path: Path, *flags: str) -> dict:
    out = tmp_path / "bench.json"
    command = [sys.executable, "-m", "pipeline", "bench", "gpu", "--model", "tiny-clip", "--batch-size", "4",
               "--steps", "3", "--warmup", "1", "--breakdown-steps", "2", "--peak-matmul-size", "512",
               "--json", str(out), *flags]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=240,
                            env={**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "samples/s per GPU" in result.stdout
    return json.loads(out.read_text())


@pytest.mark.slow
def test_bench_on_a_tiny_model_reports_consistent_figures(tmp_path):
    result = _bench(tmp_path, "--skip-open-clip", "--find-max-batch", "--batch-limit", "4",
                    "--contrastive-limit", "16")
    ours = result["ours"]
    assert result["precision"] == "bf16" and result["model"] == "tiny-clip"
    assert ours["samples_per_s_per_gpu"] > 0 and ours["step_s"] > 0
    assert ours["samples_per_s_per_gpu"] == pytest.approx(4 / ours["step_s"])
    assert 0 < ours["mfu"] <= 1
    assert ours["mfu"] == pytest.approx(result["flops_per_sample"]["executed"] * ours["samples_per_s_per_gpu"]
                                        / result["peak_flops"])
    assert ours["peak_memory_gb"] is None and ours["host_peak_rss_gb"] > 0  # no GPU here
    assert torch.isfinite(torch.tensor(ours["final_loss"]))

    breakdown = ours["breakdown"]
    for phase in ("forward", "loss", "backward", "optimizer_step"):
        assert breakdown[phase] > 0, phase
    named = sum(v for k, v in breakdown.items() if k not in ("step", "other"))
    assert named == pytest.approx(breakdown["step"], rel=0.1), breakdown
    assert named <= breakdown["step"] * 1.001

    found = result["max_batch"]
    assert found["max_local_batch"] == 4 and found["max_local_batch_checkpointing"] == 4  # the limit: no OOM on CPU
    assert found["gradcache_micro_batch"] == 4 and found["gradcache_accum_steps"] == 4
    assert found["max_contrastive_batch_gradcache"] == 16


@pytest.mark.slow
def test_open_clip_trainer_runs_side_by_side(tmp_path):
    if not (REPO / ".venv-openclip" / ".bench-ready").exists():
        pytest.skip("the open_clip peer venv is built by `python -m pipeline bench data` (needs the package index)")
    result = _bench(tmp_path, "--precision", "fp32", "--workers", "1")
    peer = result["open_clip"]
    assert peer["samples_per_s_per_gpu"] > 0 and peer["windows"] >= 1
    assert 0 < peer["mfu"] <= 1
    assert result["ratio_samples_per_s"] == pytest.approx(
        result["ours"]["samples_per_s_per_gpu"] / peer["samples_per_s_per_gpu"])
