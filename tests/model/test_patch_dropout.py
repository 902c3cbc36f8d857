"""Patch dropout (FLIP, model.patch_dropout): masks by (step seed, row), exact under GradCache, off in eval.

- a sample's mask depends only on the step's seed and its row in the step's batch: any cut of the
  batch into parts gives the rows of the whole batch's masks; each patch is kept at the configured rate;
  the class token is always kept;
- evaluation keeps every patch (the output equals the same weights without patch dropout);
- GradCache: the gradients of `backward_step` with 4 micro-batches equal one pass over the whole batch
  (the same masks), on 2 gloo ranks through a DeepSpeed engine, within 1e-5 relative (fp32); a step with
  another seed, or without patch dropout, gives other gradients, so the comparison can fail.
"""

from __future__ import annotations

import pytest
import torch

from pipeline.core import randomness
from pipeline.core.errors import ConfigError
from pipeline.model.build import build_model
from pipeline.model.config import ModelConfig
from pipeline.model.patch_dropout import PatchDropout, patch_dropout_rows
from tests.distributed_helpers import run_ranks

# fp32 GradCache vs one pass: ||g_cached - g_whole|| / ||g_whole|| per parameter tensor
GRAD_RELATIVE_TOLERANCE = 1e-5


def _tokens(count: int) -> torch.Tensor:
    # [count, 197, 1]: token j of row i holds 197 * i + j, so each kept token says where it came from
    return torch.arange(count * 197).reshape(count, 197, 1).float()


def test_a_samples_mask_depends_only_on_the_step_seed_and_its_row():
    dropout = PatchDropout(0.5).train()
    tokens = _tokens(12)  # class token + 196 patches (224 px / 16)
    dropout.place(seed=7, first_row=0)
    whole = dropout(tokens)
    assert whole.shape == (12, 1 + 98, 1)
    assert torch.equal(whole[:, 0], tokens[:, 0]), "the class token is always kept"
    for cuts in ([3, 9], [1, 5, 6], [4, 4, 4]):
        parts, first = [], 0
        for size in cuts:
            dropout.place(seed=7, first_row=first)
            parts.append(dropout(tokens[first:first + size]))
            first += size
        assert torch.equal(torch.cat(parts), whole), cuts
    kept = whole[:, 1:, 0].long() % 197  # the patch index each kept token came from
    assert (kept.diff(dim=1) > 0).all(), "kept patches stay in patch order"
    assert len({tuple(row.tolist()) for row in kept}) == 12, "every row draws its own mask"
    dropout.place(seed=8, first_row=0)
    assert not torch.equal(dropout(tokens), whole), "another step seed gives other masks"
    dropout.place(seed=7, first_row=1)
    moved = dropout(tokens[:11])[:, 1:, 0].long() % 197
    assert torch.equal(moved, kept[1:]), "the mask follows the row in the step, not the content"


def test_each_patch_is_kept_at_the_configured_rate():
    rows, patches, prob = 4000, 196, 0.75
    kept = PatchDropout(prob).keep_indices(rows, patches, seed=3, first_row=0, device="cpu")
    assert kept.shape == (rows, 49)
    rate = torch.bincount(kept.flatten(), minlength=patches).float() / rows
    # binomial: standard deviation sqrt(0.25 * 0.75 / 4000) = 0.0068; 5 of them over 196 patches
    assert (rate - 0.25).abs().max() < 5 * 0.0068, rate


def test_an_unplaced_forward_draws_its_seed_from_torchs_rng():
    dropout = PatchDropout(0.5).train()
    tokens = _tokens(4)
    torch.manual_seed(0)
    first = dropout(tokens)
    assert not torch.equal(dropout(tokens), first)
    torch.manual_seed(0)
    assert torch.equal(dropout(tokens), first), "replaying torch's RNG replays the masks"


def test_evaluation_keeps_every_patch():
    torch.manual_seed(0)
    dropping = build_model(ModelConfig(name="tiny-clip", patch_dropout=0.5))
    plain = build_model(ModelConfig(name="tiny-clip"))
    plain.load_state_dict(dropping.state_dict())
    pixels = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    tokens = torch.randint(1, 49000, (4, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        dropping.eval(), plain.eval()
        assert torch.equal(dropping(pixels, tokens)["media_features"], plain(pixels, tokens)["media_features"])
        dropping.train(), plain.train()
        assert not torch.allclose(dropping(pixels, tokens)["media_features"], plain(pixels, tokens)["media_features"])
    assert dropping.open_clip_state_dict().keys() == plain.open_clip_state_dict().keys()


def test_only_models_that_drop_patches_draw_a_seed():
    plain = build_model(ModelConfig(name="tiny-clip"))
    dropping = build_model(ModelConfig(name="tiny-clip", patch_dropout=0.5))
    state = torch.get_rng_state()
    assert patch_dropout_rows(plain).modules == []
    assert torch.equal(torch.get_rng_state(), state), "a run without patch dropout keeps its random stream"
    assert patch_dropout_rows(dropping).modules == [dropping.clip.visual.patch_dropout]
    assert not torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("values, message", [
    ({"patch_dropout": 1.0}, "model.patch_dropout must be in"),
    ({"patch_dropout": -0.1}, "model.patch_dropout must be in"),
    ({"name": "tiny-clap", "modality": "audio", "patch_dropout": 0.5}, "model.patch_dropout: tiny-clap is an audio"),
    ({"name": "RN50", "patch_dropout": 0.5}, "model.patch_dropout: RN50 has no ViT image tower"),
])
def test_bad_patch_dropout_names_the_key(values, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**values)


# -- GradCache, on 2 gloo ranks through DeepSpeed ---------------------------------------------------
def _gradients(rank: int, world_size: int, accum_steps: int, step_seed: int, patch_dropout: float) -> dict:
    from deepspeed.utils import safe_get_full_grad

    from pipeline.data.config import Batch
    from pipeline.loss import LossConfig, build_loss
    from pipeline.parallel import parallelize
    from pipeline.train.step import backward_step

    torch.manual_seed(0)
    model = build_model(ModelConfig(name="tiny-clip", patch_dropout=patch_dropout))
    local_batch = 8
    micro = local_batch // accum_steps
    ds_config = parallelize.deepspeed_config(
        micro_batch_size=micro, accum_steps=accum_steps, world_size=world_size, zero_stage=0,
        precision="fp32", grad_clip=0.0, log_every=1,
    )
    engine = parallelize.build_engine(model, torch.optim.AdamW(model.parameters(), lr=1e-3), None, ds_config)
    generator = torch.Generator().manual_seed(100 + rank)
    pixels = torch.randint(0, 256, (local_batch, 3, 64, 64), dtype=torch.uint8, generator=generator)
    tokens = torch.randint(1, 49000, (local_batch, 32), generator=generator)
    batches = [Batch(pixels[i * micro:(i + 1) * micro], tokens[i * micro:(i + 1) * micro],
                     [str(k) for k in range(micro)], torch.full((micro,), -1)) for i in range(accum_steps)]
    torch.manual_seed(randomness.seed_int(step_seed, "rank_stream", rank))  # as the trainer: each rank its own stream
    loss, _ = backward_step(engine, build_loss(LossConfig(), rank, world_size), batches, torch.device("cpu"))
    grads = {name: safe_get_full_grad(p).clone() for name, p in engine.module.named_parameters()}
    return {"loss": float(loss), "grads": grads}


def _runs(rank: int, world_size: int) -> dict:
    from pipeline.parallel import distributed

    distributed.init_distributed(120)
    return {
        "whole": _gradients(rank, world_size, 1, 1, 0.5),
        "cached": _gradients(rank, world_size, 4, 1, 0.5),
        "other_seed": _gradients(rank, world_size, 4, 2, 0.5),
        "no_dropout": _gradients(rank, world_size, 4, 1, 0.0),
    }


def _relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours - reference).norm() / reference.norm().clamp_min(1e-30))


def _worst(a: dict, b: dict) -> float:
    return max(_relative_error(a["grads"][name], grad) for name, grad in b["grads"].items())


def test_gradcache_gradients_equal_one_pass_over_the_whole_batch_with_the_same_masks():
    for rank, runs in enumerate(run_ranks(_runs, 2, timeout=300)):
        whole = runs["whole"]
        assert runs["cached"]["loss"] == pytest.approx(whole["loss"], rel=1e-6)
        assert whole["grads"]["clip.visual.conv1.weight"].abs().sum() > 0
        worst = _worst(runs["cached"], whole)
        print(f"rank {rank}: GradCache (4 micro-batches) vs one pass, worst relative gradient error {worst:.2e}")
        assert worst < GRAD_RELATIVE_TOLERANCE, f"rank {rank}: relative error {worst:.2e}"
        # the masks matter, and they follow the step's seed: otherwise this test could not fail
        assert _worst(runs["other_seed"], whole) > 1e-3
        assert _worst(runs["no_dropout"], whole) > 1e-3


def test_mfu_counts_the_blocks_on_the_kept_patches_only():
    from pipeline.observe.flops import tower_flops, transformer_flops

    full = tower_flops(ModelConfig(name="ViT-B-32"))["media"]
    half = tower_flops(ModelConfig(name="ViT-B-32", patch_dropout=0.5))["media"]
    # ViT-B-32 at 224 px: 49 patches + the class token, 24 kept + the class token
    assert full - half == transformer_flops(50, 768, 12) - transformer_flops(25, 768, 12)
