"""Slots without a real sample (`outputs["valid"]` False) take no part in any loss.

Contract under test (pipeline/loss.py): a batch with k rows marked invalid gives the loss and the
gradients of the same batch with those k rows removed, for every loss kind, chunked or not, on one
process and across ranks (the marked rows on one rank only), where the per-rank losses average to it.
Tolerance: 1e-5 relative to the largest entry of each tensor, fp32 (the sums run in another order).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.loss import LossConfig, build_loss
from tests.distributed_helpers import run_ranks
from tests.test_losses import GLOBAL_BATCH, PARAMS, _close, _global_inputs

RTOL = 1e-5
INVALID = (5, 6)  # global rows marked invalid: both on rank 1 at W=2 (rows 4..7)
# name -> (kind, label smoothing, loss.chunk_size); a chunk of 3 does not divide the 4 local rows at W=2
CASES = {
    "clip": ("clip", 0.0, 0),
    "clip-smoothed": ("clip", 0.1, 0),
    "clip-chunked": ("clip", 0.0, 3),
    "clip-smoothed-chunked": ("clip", 0.1, 3),
    "siglip": ("siglip", 0.0, 0),
    "siglip-chunked": ("siglip", 0.0, 3),
    "probabilistic": ("probabilistic", 0.0, 0),
    "probabilistic-smoothed": ("probabilistic", 0.1, 0),
}


def _loss_and_grads(kind, smoothing, chunk_size, rank, world_size, rows_used, valid=None, scramble=False):
    """One rank's loss and gradients over the global rows `rows_used` (its slice of them), with the
    per-row `valid` flags of those rows when given. `scramble`: the invalid rows get other features,
    as a filled slot holds a copy of some other sample."""
    inputs = _global_inputs()
    rows_used = torch.as_tensor(rows_used)
    local_rows = len(rows_used) // world_size
    mine = rows_used[rank * local_rows : (rank + 1) * local_rows]
    raw_media, raw_text = inputs["raw_media"][mine].clone(), inputs["raw_text"][mine].clone()
    local_valid = None if valid is None else torch.as_tensor(valid)[rank * local_rows : (rank + 1) * local_rows]
    if scramble and local_valid is not None:
        raw_media[~local_valid] = inputs["raw_media"][0]
        raw_text[~local_valid] = inputs["raw_text"][0]
    params = {name: inputs[name].clone().requires_grad_(True) for name in PARAMS}
    media = F.normalize(raw_media @ params["media_proj"], dim=-1)
    text = F.normalize(raw_text @ params["text_proj"], dim=-1)
    outputs = {"media_features": media, "text_features": text, "logit_scale": params["log_logit_scale"].exp()}
    if kind == "siglip":
        outputs["logit_bias"] = params["logit_bias"]
    if kind == "probabilistic":
        outputs["media_log_sigma"] = raw_media @ params["media_sigma_head"] - 1.0
        outputs["text_log_sigma"] = raw_text @ params["text_sigma_head"] - 1.0
    if local_valid is not None:
        outputs["valid"] = local_valid
    for value in outputs.values():
        if value.requires_grad and not value.is_leaf:
            value.retain_grad()
    loss_fn = build_loss(LossConfig(kind=kind, label_smoothing=smoothing, chunk_size=chunk_size), rank, world_size)
    loss, metrics = loss_fn(outputs)
    loss.backward()
    return {
        "loss": loss.detach(),
        "features": {k: outputs[k].grad for k in outputs if k.endswith(("features", "log_sigma"))},
        "params": {k: p.grad.clone() for k, p in params.items() if p.grad is not None},
        "metrics": {k: float(v) for k, v in metrics.items()},
    }


def _reference(kind, smoothing):
    """One process over the batch without the invalid rows, unchunked, no mask."""
    kept = [row for row in range(GLOBAL_BATCH) if row not in INVALID]
    return _loss_and_grads(kind, smoothing, 0, 0, 1, kept)


def _valid_flags():
    return [row not in INVALID for row in range(GLOBAL_BATCH)]


def _check(ranks: list[dict], reference: dict, label: str) -> None:
    world_size = len(ranks)
    mean_loss = torch.stack([r["loss"] for r in ranks]).mean()
    _close(mean_loss, reference["loss"], RTOL, f"{label} loss")
    assert set(ranks[0]["params"]) == set(reference["params"])
    for name, expected in reference["params"].items():
        mean_grad = torch.stack([r["params"][name] for r in ranks]).mean(0)
        _close(mean_grad, expected, RTOL, f"{label} d loss / d {name}")
    valid = torch.tensor(_valid_flags())
    for key, expected in reference["features"].items():
        gathered = torch.cat([r["features"][key] for r in ranks]) / world_size
        assert torch.count_nonzero(gathered[~valid]) == 0, f"{label}: an invalid row received a gradient ({key})"
        _close(gathered[valid], expected, RTOL, f"{label} d loss / d {key}")


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("scramble", [False, True])
def test_marked_rows_equal_removed_rows_one_process(name, scramble):
    kind, smoothing, chunk_size = CASES[name]
    masked = _loss_and_grads(kind, smoothing, chunk_size, 0, 1, range(GLOBAL_BATCH), _valid_flags(), scramble)
    _check([masked], _reference(kind, smoothing), name)
    # top-1 (and the probabilistic sigma means) over the 6 valid rows, as the reference's
    assert masked["metrics"] == pytest.approx(_reference(kind, smoothing)["metrics"])


@pytest.mark.parametrize("name", ["clip", "clip-smoothed-chunked", "siglip", "siglip-chunked", "probabilistic"])
def test_all_valid_equals_no_mask(name):
    kind, smoothing, chunk_size = CASES[name]
    plain = _loss_and_grads(kind, smoothing, chunk_size, 0, 1, range(GLOBAL_BATCH))
    masked = _loss_and_grads(kind, smoothing, chunk_size, 0, 1, range(GLOBAL_BATCH), [True] * GLOBAL_BATCH)
    _close(masked["loss"], plain["loss"], RTOL, f"{name} loss")
    for key, expected in plain["params"].items():
        _close(masked["params"][key], expected, RTOL, f"{name} d loss / d {key}")
    assert masked["metrics"] == pytest.approx(plain["metrics"])


@pytest.mark.parametrize("name", ["clip", "clip-chunked", "siglip", "siglip-chunked", "probabilistic"])
def test_no_valid_row_gives_zero_loss_and_gradient(name):
    kind, smoothing, chunk_size = CASES[name]
    result = _loss_and_grads(kind, smoothing, chunk_size, 0, 1, range(GLOBAL_BATCH), [False] * GLOBAL_BATCH)
    assert float(result["loss"]) == 0.0
    assert all(torch.count_nonzero(g) == 0 for g in result["params"].values())


def test_mask_of_the_wrong_length_is_refused():
    media = F.normalize(torch.randn(4, 3), dim=-1)
    outputs = {"media_features": media, "text_features": media, "logit_scale": torch.tensor([10.0]),
               "valid": torch.ones(3, dtype=torch.bool)}
    with pytest.raises(ValueError, match="3 entries for 4 feature rows"):
        build_loss(LossConfig())(outputs)


def test_world_size_one_mask_never_touches_torch_distributed(monkeypatch):
    import torch.distributed as dist

    def refuse(*args, **kwargs):
        raise AssertionError("torch.distributed called at world size 1")

    for name in ("all_gather", "all_reduce", "get_rank", "get_world_size"):
        monkeypatch.setattr(dist, name, refuse)
    for kind, smoothing, chunk_size in CASES.values():
        _loss_and_grads(kind, smoothing, chunk_size, 0, 1, range(GLOBAL_BATCH), _valid_flags())


def ranks_masked(rank: int, world_size: int) -> dict:
    return {name: _loss_and_grads(kind, smoothing, chunk_size, rank, world_size, range(GLOBAL_BATCH), _valid_flags())
            for name, (kind, smoothing, chunk_size) in CASES.items()}


@pytest.mark.slow
def test_marked_rows_on_one_rank_equal_removed_rows_two_ranks():
    per_rank = run_ranks(ranks_masked, 2, timeout=240)
    for name, (kind, smoothing, _chunk_size) in CASES.items():
        _check([result[name] for result in per_rank], _reference(kind, smoothing), f"{name} W=2")
