"""A million-sample contrastive batch on one GPU (train.global_batch_size=1048576, train.accum_steps=4096,
loss.chunk_size), proven at CPU scale:

- GradCache over 64 micro-batches with the chunked loss gives the loss, metrics and every parameter gradient of
  one pass over the whole batch with the unchunked loss, through pipeline.train.step.backward_step on a real
  DeepSpeed engine, clip and siglip, with slots marked invalid. fp32; they differ only by summation order:
  loss rel 1e-5, gradients rtol 1e-4 / atol 1e-6 (the largest relative difference seen is about 1e-6);
- the chunked loss never creates a tensor larger than one chunk x N logit block (every operator's output
  recorded), and its peak memory, forward + backward, grows linearly in N: measured in a fresh process by
  pipeline.bench.loss, x2 per doubling of N (asserted in (1.5, 2.6)), where the unchunked loss measured the
  same way grows x4 (asserted > 3.2: the measurement can tell the two apart);
- the million-sample config validates (micro-batch 256) and its DeepSpeed engine builds.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pipeline.loss import LossConfig, build_loss
from tests.distributed_helpers import run_ranks

REPO = Path(__file__).resolve().parents[2]
BATCH, MICRO_BATCHES, CHUNK = 128, 64, 16
MILLION, ACCUM = 1_048_576, 4096


def _gradients(kind: str, accum_steps: int, chunk_size: int) -> dict:
    """Loss, metrics and every parameter gradient of one backward_step over BATCH samples cut into
    `accum_steps` micro-batches, on a fresh engine of the same initial weights."""
    from deepspeed.utils import safe_get_full_grad

    from pipeline.data.config import Batch
    from pipeline.model.build import build_model
    from pipeline.model.config import ModelConfig
    from pipeline.parallel import parallelize
    from pipeline.train.step import backward_step

    torch.manual_seed(0)
    model = build_model(ModelConfig(name="tiny-clip", logit_bias=kind == "siglip"))
    micro = BATCH // accum_steps
    ds_config = parallelize.deepspeed_config(
        micro_batch_size=micro, accum_steps=accum_steps, world_size=1, zero_stage=0, precision="fp32",
        grad_clip=0.0, log_every=1,
    )
    engine = parallelize.build_engine(model, torch.optim.AdamW(model.parameters(), lr=1e-3), None, ds_config)
    generator = torch.Generator().manual_seed(7)
    media = torch.randint(0, 256, (BATCH, 3, 64, 64), dtype=torch.uint8, generator=generator)  # as the loader gives
    tokens = torch.randint(1, 49000, (BATCH, 32), generator=generator)
    valid = torch.ones(BATCH, dtype=torch.bool)
    valid[[5, 70, 127]] = False  # slots without a real sample, in three different micro-batches
    batches = [
        Batch(media[i:i + micro], tokens[i:i + micro], [str(k) for k in range(i, i + micro)],
              torch.full((micro,), -1), valid[i:i + micro])
        for i in range(0, BATCH, micro)
    ]
    loss_fn = build_loss(LossConfig(kind=kind, chunk_size=chunk_size))
    loss, metrics = backward_step(engine, loss_fn, batches, torch.device("cpu"))
    grads = {name: safe_get_full_grad(p).clone() for name, p in engine.module.named_parameters()}
    return {"loss": float(loss), "metrics": {k: float(v) for k, v in metrics.items()}, "grads": grads}


def _in_process(rank: int, world_size: int) -> dict:
    from pipeline.model.build import build_model
    from pipeline.model.config import ModelConfig
    from pipeline.parallel import distributed, parallelize

    distributed.init_distributed(120)
    results = {}
    for kind in ("clip", "siglip"):
        results[kind] = {
            "whole": _gradients(kind, 1, 0),
            "cached": _gradients(kind, MICRO_BATCHES, CHUNK),
        }
    # the million-sample step's engine: 4096 micro-batches of 256 per optimizer step
    model = build_model(ModelConfig(name="tiny-clip"))
    ds_config = parallelize.deepspeed_config(
        micro_batch_size=MILLION // ACCUM, accum_steps=ACCUM, world_size=1, zero_stage=0, precision="fp32",
        grad_clip=1.0, log_every=1,
    )
    engine = parallelize.build_engine(model, torch.optim.AdamW(model.parameters(), lr=1e-3), None, ds_config)
    results["million_engine"] = (engine.train_batch_size(), engine.train_micro_batch_size_per_gpu(),
                                 engine.gradient_accumulation_steps())
    return results


@pytest.fixture(scope="module")
def engine_results() -> dict:
    return run_ranks(_in_process, 1, timeout=300)[0]


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_gradcache_64_micro_batches_chunked_equals_one_pass_over_the_batch(engine_results, kind):
    whole, cached = engine_results[kind]["whole"], engine_results[kind]["cached"]
    assert cached["loss"] == pytest.approx(whole["loss"], rel=1e-5)
    assert cached["metrics"] == pytest.approx(whole["metrics"], rel=1e-5)
    assert set(cached["grads"]) == set(whole["grads"])
    for name, expected in whole["grads"].items():
        torch.testing.assert_close(cached["grads"][name], expected, rtol=1e-4, atol=1e-6, msg=name)
    # the comparison has teeth: both towers, the temperature (and SigLIP's bias) receive gradients
    for name in ("clip.visual.conv1.weight", "clip.token_embedding.weight", "clip.logit_scale"):
        assert whole["grads"][name].abs().sum() > 0, name
    if kind == "siglip":
        assert whole["grads"]["clip.logit_bias"].abs().sum() > 0


def test_million_sample_config_validates_and_its_engine_builds(engine_results):
    from pipeline.core.errors import ConfigError
    from pipeline.train.config import RunConfig, load_config

    overrides = [f"train.global_batch_size={MILLION}", f"train.accum_steps={ACCUM}", "loss.chunk_size=1024"]
    cfg = load_config(RunConfig, str(REPO / "configs/vit-b-32.yaml"), overrides)
    assert cfg.train.micro_batch_size(1) == 256
    assert cfg.loss.chunk_size == 1024
    assert engine_results["million_engine"] == (MILLION, 256, ACCUM)
    with pytest.raises(ConfigError, match="train.accum_steps"):
        load_config(RunConfig, str(REPO / "configs/vit-b-32.yaml"),
                    [f"train.global_batch_size={MILLION}", "train.accum_steps=3000"])


class _LargestOutput(TorchDispatchMode):
    """Records the element count of the largest tensor any operator returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(value, torch.Tensor):
                self.largest = max(self.largest, value.numel())
        return out


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_chunked_loss_never_creates_an_n_by_n_tensor(kind):
    from pipeline.bench.loss import _loss_inputs

    n, dim, chunk = 2048, 32, 64
    for chunk_size, largest in ((chunk, chunk * n), (0, n * n)):  # the unchunked loss shows the check can fail
        inputs = _loss_inputs(kind, n, dim, "cpu")
        with _LargestOutput() as recorder:
            loss, _ = build_loss(LossConfig(kind=kind, chunk_size=chunk_size))(inputs)
            loss.backward()
        assert recorder.largest == largest, (kind, chunk_size)
        assert inputs["media_features"].grad.abs().sum() > 0


def _ratios(rows: list[dict]) -> list[float]:
    return [later["peak_bytes"] / earlier["peak_bytes"] for earlier, later in zip(rows, rows[1:])]


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_chunked_loss_peak_memory_grows_linearly_in_n(kind):
    from pipeline.bench.loss import measure

    sizes = [2048, 4096, 8192]
    rows = measure(kind, sizes, dim=128, chunk_size=256)
    ratios = _ratios(rows)
    assert all(1.5 < ratio < 2.6 for ratio in ratios), (ratios, rows)
    # far below one N x N fp32 block at the largest size (256 MiB; the unchunked loss holds several)
    assert rows[-1]["peak_bytes"] < sizes[-1] ** 2 * 4 / 4, rows


def test_unchunked_loss_peak_memory_grows_quadratically_as_measured():
    from pipeline.bench.loss import measure

    rows = measure("clip", [1024, 2048, 4096], dim=128, chunk_size=0)
    ratios = _ratios(rows)
    assert all(ratio > 3.2 for ratio in ratios), (ratios, rows)
