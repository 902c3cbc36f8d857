"""Global-batch losses: multi-rank (real gloo processes) equals one process on the concatenated batch.

The per-rank convention under test (pipeline/loss.py): the mean over ranks of the per-rank loss and
of every replicated parameter's gradient equals the single-process value; a rank's own input features
receive W times the single-process gradient (the gather sums what every rank's loss sends them), which
the data-parallel average of parameter gradients then divides by W.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.core.errors import ConfigError
from pipeline.loss import KINDS, LossConfig, build_loss, gather_features
from tests.distributed_helpers import run_ranks

GLOBAL_BATCH, RAW_DIM, EMBED_DIM = 8, 12, 6
# one bf16 ulp is 2^-8 ~ 0.4% relative: fp32 differences in reduction order can flip a rounding
BF16_RTOL = 1e-2
# bf16 features against fp32 features: the rounding of every feature element (0.4%) moves the loss by
# well under 2%
BF16_VS_FP32_RTOL = 2e-2


def _global_inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    """Raw per-sample inputs and replicated 'tower' parameters, identical on every rank."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "raw_media": torch.randn(GLOBAL_BATCH, RAW_DIM, generator=gen),
        "raw_text": torch.randn(GLOBAL_BATCH, RAW_DIM, generator=gen),
        "media_proj": torch.randn(RAW_DIM, EMBED_DIM, generator=gen),
        "text_proj": torch.randn(RAW_DIM, EMBED_DIM, generator=gen),
        "media_sigma_head": 0.3 * torch.randn(RAW_DIM, generator=gen),
        "text_sigma_head": 0.3 * torch.randn(RAW_DIM, generator=gen),
        "log_logit_scale": torch.tensor([2.3]),
        "logit_bias": torch.tensor([-4.0]),
    }


PARAMS = ("media_proj", "text_proj", "media_sigma_head", "text_sigma_head", "log_logit_scale", "logit_bias")


def _loss_and_grads(
    kind: str, dtype: torch.dtype, rank: int, world_size: int, smoothing: float = 0.0, chunk_size: int = 0
) -> dict:
    """One rank's loss, its local feature gradients and its parameter gradients."""
    inputs = _global_inputs()
    rows = GLOBAL_BATCH // world_size
    local = slice(rank * rows, (rank + 1) * rows)
    params = {name: inputs[name].clone().requires_grad_(True) for name in PARAMS}
    media = F.normalize(inputs["raw_media"][local] @ params["media_proj"], dim=-1).to(dtype)
    text = F.normalize(inputs["raw_text"][local] @ params["text_proj"], dim=-1).to(dtype)
    outputs = {"media_features": media, "text_features": text, "logit_scale": params["log_logit_scale"].exp()}
    if kind == "siglip":
        outputs["logit_bias"] = params["logit_bias"]
    if kind == "probabilistic":
        outputs["media_log_sigma"] = (inputs["raw_media"][local] @ params["media_sigma_head"] - 1.0).to(dtype)
        outputs["text_log_sigma"] = (inputs["raw_text"][local] @ params["text_sigma_head"] - 1.0).to(dtype)
    for value in outputs.values():
        if not value.is_leaf:
            value.retain_grad()
    cfg = LossConfig(kind=kind, label_smoothing=smoothing, chunk_size=chunk_size)
    loss_fn = build_loss(cfg, rank, world_size)
    loss, metrics = loss_fn(outputs)
    loss.backward()
    feature_keys = [k for k in outputs if k.endswith(("features", "log_sigma"))]
    return {
        "loss": loss.detach(),
        "loss_dtype": loss.dtype,
        "features": {k: outputs[k].grad.float() for k in feature_keys},
        "params": {k: p.grad.clone() for k, p in params.items() if p.grad is not None},
        "logits_shape": loss_fn.last_logits_shape,
        "metrics": {k: float(v) for k, v in metrics.items()},
    }


def ranks_loss_and_grads(rank: int, world_size: int) -> dict:
    """Runs on every rank: every loss kind, fp32 and bf16 features."""
    results = {}
    for kind in KINDS:
        for dtype in (torch.float32, torch.bfloat16):
            results[(kind, dtype)] = _loss_and_grads(kind, dtype, rank, world_size)
    for name, (kind, smoothing, chunk_size) in VARIANTS.items():
        results[(name, torch.float32)] = _loss_and_grads(kind, torch.float32, rank, world_size, smoothing, chunk_size)
    return results


# further fp32 cases of the multi-rank test: name -> (kind, label smoothing, loss.chunk_size); a chunk of
# 3 rows does not divide the 4 local rows at W=2 and exceeds the 2 local rows at W=4
VARIANTS = {
    "clip-smoothed": ("clip", 0.1, 0),
    "clip-chunked": ("clip", 0.0, 3),
    "clip-smoothed-chunked": ("clip", 0.1, 3),
    "siglip-chunked": ("siglip", 0.0, 3),
}


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str) -> None:
    # relative to the tensor's scale: a few gradient entries are ~0, where elementwise rtol means nothing
    atol = rtol * float(expected.abs().max()) + 1e-12
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 4])
def test_multi_rank_equals_single_process(world_size):
    per_rank = run_ranks(ranks_loss_and_grads, world_size, timeout=240)
    rows = GLOBAL_BATCH // world_size
    for (kind, dtype) in per_rank[0]:
        loss_kind, smoothing, chunk_size = VARIANTS.get(kind, (kind, 0.0, 0))
        # chunked variants are held to the unchunked single process: chunking must change nothing
        reference = _loss_and_grads(loss_kind, dtype, 0, 1, smoothing)
        rtol = 1e-5 if dtype == torch.float32 else BF16_RTOL
        label = f"{kind} {dtype} W={world_size}"
        ranks = [result[(kind, dtype)] for result in per_rank]
        assert all(r["loss_dtype"] == torch.float32 for r in ranks), "logits and loss must be fp32"
        mean_loss = torch.stack([r["loss"] for r in ranks]).mean()
        _close(mean_loss, reference["loss"], 1e-5, f"{label} loss")
        for key, expected in reference["features"].items():
            gathered = torch.cat([r["features"][key] for r in ranks]) / world_size
            _close(gathered, expected, rtol, f"{label} d loss / d {key}")
        assert set(reference["params"]) == set(ranks[0]["params"])
        for name, expected in reference["params"].items():
            mean_grad = torch.stack([r["params"][name] for r in ranks]).mean(0)
            _close(mean_grad, expected, rtol, f"{label} d loss / d {name}")
        # b x W*b per rank (chunk x W*b when chunked), never (W*b)^2
        local_rows = min(chunk_size, rows) if chunk_size else rows
        assert all(r["logits_shape"] == (local_rows, GLOBAL_BATCH) for r in ranks)
        assert all(r["metrics"].keys() == reference["metrics"].keys() for r in ranks)
        if chunk_size:  # per-rank top-1 (over the local rows) as the unchunked loss on the same rank
            unchunked = "clip-smoothed" if smoothing else loss_kind
            for rank, result in enumerate(per_rank):
                assert result[(kind, dtype)]["metrics"] == pytest.approx(result[(unchunked, dtype)]["metrics"]), rank
        assert reference["logits_shape"] == (GLOBAL_BATCH, GLOBAL_BATCH)
    # the parameters each loss must train
    assert "logit_bias" in per_rank[0][("siglip", torch.float32)]["params"]
    assert {"media_sigma_head", "text_sigma_head"} <= set(per_rank[0][("probabilistic", torch.float32)]["params"])


def test_bf16_features_close_to_fp32():
    for kind in KINDS:
        fp32 = _loss_and_grads(kind, torch.float32, 0, 1)
        bf16 = _loss_and_grads(kind, torch.bfloat16, 0, 1)
        assert bf16["loss_dtype"] == torch.float32
        _close(bf16["loss"], fp32["loss"], BF16_VS_FP32_RTOL, f"{kind} bf16 vs fp32 loss")


@pytest.mark.parametrize("kind", KINDS)
def test_logits_stay_fp32_under_autocast(kind):
    inputs = {k: v for k, v in _global_inputs().items()}
    media = F.normalize(inputs["raw_media"] @ inputs["media_proj"], dim=-1)
    text = F.normalize(inputs["raw_text"] @ inputs["text_proj"], dim=-1)
    outputs = {"media_features": media, "text_features": text, "logit_scale": torch.tensor([10.0]),
               "logit_bias": torch.tensor([-4.0]), "media_log_sigma": torch.full([GLOBAL_BATCH], -1.0),
               "text_log_sigma": torch.full([GLOBAL_BATCH], -0.5)}
    loss_fn = build_loss(LossConfig(kind=kind))
    plain, _ = loss_fn(outputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast, _ = loss_fn(outputs)
    assert autocast.dtype == torch.float32
    torch.testing.assert_close(autocast, plain, rtol=1e-6, atol=0)


def _features(n: int = 6, dim: int = 5, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    media = F.normalize(torch.randn(n, dim, generator=gen), dim=-1)
    text = F.normalize(torch.randn(n, dim, generator=gen), dim=-1)
    return media, text


@pytest.mark.parametrize("with_bias", [False, True])
def test_clip_loss_equals_open_clip(with_bias):
    from open_clip.loss import ClipLoss as OpenClipLoss

    media, text = _features()
    scale, bias = torch.tensor([14.0]), torch.tensor([-2.0])
    outputs = {"media_features": media, "text_features": text, "logit_scale": scale}
    if with_bias:
        outputs["logit_bias"] = bias
    ours, _ = build_loss(LossConfig(kind="clip"))(outputs)
    theirs = OpenClipLoss()(media, text, scale, logit_bias=bias if with_bias else None)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)


def test_siglip_loss_equals_open_clip():
    from open_clip.loss import SigLipLoss as OpenSigLipLoss

    media, text = _features()
    scale, bias = torch.tensor([10.0]), torch.tensor([-10.0])
    outputs = {"media_features": media, "text_features": text, "logit_scale": scale, "logit_bias": bias}
    ours, metrics = build_loss(LossConfig(kind="siglip"))(outputs)
    theirs = OpenSigLipLoss()(media, text, scale, bias)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    assert metrics["logit_bias"] == -10.0


def test_row_and_column_terms_differ_and_both_are_needed():
    # two media, two texts: each media's best text is its own, but text 1 is closer to media 0
    media = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = F.normalize(torch.tensor([[1.0, 0.0], [0.8, 0.6]]), dim=-1)
    scale = torch.tensor([5.0])
    logits = scale * media @ text.T
    assert not torch.allclose(logits, logits.T), "the similarity matrix must not be symmetric here"
    labels = torch.arange(2)
    row_term = F.cross_entropy(logits, labels)  # media -> text
    column_term = F.cross_entropy(logits.T, labels)  # text -> media
    assert column_term > row_term + 0.1
    loss, metrics = build_loss(LossConfig(kind="clip"))(
        {"media_features": media, "text_features": text, "logit_scale": scale}
    )
    torch.testing.assert_close(loss, (row_term + column_term) / 2)
    # rows alone call this batch perfectly retrieved; only the column term sees text 1 -> media 0
    assert metrics["media_to_text_top1"] == 1.0
    assert metrics["text_to_media_top1"] == 0.5
    # and the two terms pull the features in different directions
    text_leaf = text.clone().requires_grad_(True)
    row_grad = torch.autograd.grad(F.cross_entropy(scale * media @ text_leaf.T, labels), text_leaf)[0]
    column_grad = torch.autograd.grad(F.cross_entropy(scale * text_leaf @ media.T, labels), text_leaf)[0]
    assert not torch.allclose(row_grad, column_grad, atol=1e-3)


@pytest.mark.parametrize("form", ["contrastive", "gaussian"])
def test_probabilistic_logits_follow_the_formula(form):
    media, text = _features(n=4, dim=3)
    media_log_sigma = torch.tensor([-1.0, -0.5, 0.0, 0.3])
    text_log_sigma = torch.tensor([-0.2, -1.2, 0.1, -0.7])
    loss, metrics = build_loss(LossConfig(kind="probabilistic", probabilistic_form=form))({
        "media_features": media, "text_features": text, "logit_scale": torch.tensor([1.0]),
        "media_log_sigma": media_log_sigma, "text_log_sigma": text_log_sigma[:, None],  # [b] or [b, 1]
    })
    dims, half = (3, 0.5) if form == "gaussian" else (1, 1.0)

    def logits(queries, candidates, log_sigma):  # written out pair by pair, with the candidate's sigma
        return torch.tensor([[
            -dims * float(log_sigma[j]) - half * float(((q - c) ** 2).sum()) / float(log_sigma[j].exp() ** 2)
            for j, c in enumerate(candidates)] for q in queries])

    labels = torch.arange(4)
    expected = (F.cross_entropy(logits(media, text, text_log_sigma), labels)
                + F.cross_entropy(logits(text, media, media_log_sigma), labels)) / 2
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics["media_sigma"], media_log_sigma.exp().mean())
    torch.testing.assert_close(metrics["text_sigma"], text_log_sigma.exp().mean())


def test_probabilistic_sigma_down_weights_a_candidate():
    # a candidate with a larger sigma is a weaker (flatter) negative for every query
    media, text = _features(n=4, dim=3)
    base = {"media_features": media, "text_features": text, "logit_scale": torch.tensor([1.0]),
            "media_log_sigma": torch.full([4], -1.0)}
    loss_fn = build_loss(LossConfig(kind="probabilistic"))
    sharp, _ = loss_fn({**base, "text_log_sigma": torch.full([4], -1.5)})
    vague, _ = loss_fn({**base, "text_log_sigma": torch.full([4], 0.5)})
    assert not torch.isclose(sharp, vague)


def test_losses_need_their_model_outputs():
    media, text = _features()
    outputs = {"media_features": media, "text_features": text, "logit_scale": torch.tensor([10.0])}
    with pytest.raises(KeyError, match="model.logit_bias"):
        build_loss(LossConfig(kind="siglip"))(outputs)
    with pytest.raises(KeyError, match="model.probabilistic"):
        build_loss(LossConfig(kind="probabilistic"))(outputs)


def test_world_size_one_never_touches_torch_distributed(monkeypatch):
    import torch.distributed as dist

    def refuse(*args, **kwargs):
        raise AssertionError("torch.distributed called at world size 1")

    for name in ("all_gather", "all_reduce", "get_rank", "get_world_size"):
        monkeypatch.setattr(dist, name, refuse)
    media, text = _features()
    outputs = {"media_features": media.requires_grad_(True), "text_features": text, "logit_scale": torch.tensor([10.0]),
               "logit_bias": torch.tensor([-5.0]), "media_log_sigma": torch.zeros(6), "text_log_sigma": torch.zeros(6)}
    for kind in KINDS:
        loss, _ = build_loss(LossConfig(kind=kind), rank=0, world_size=1)(outputs)
        loss.backward()
    assert gather_features(media, 0, 1) is media
    assert not dist.is_initialized()


@pytest.mark.parametrize("values, key", [
    ({"kind": "infonce"}, "loss.kind"),
    ({"probabilistic_form": "laplace"}, "loss.probabilistic_form"),
    ({"label_smoothing": 1.5}, "loss.label_smoothing"),
    ({"kind": "siglip", "label_smoothing": 0.1}, "loss.label_smoothing"),
    ({"chunk_size": -1}, "loss.chunk_size"),
    ({"chunk_size": 2.5}, "loss.chunk_size"),
    ({"kind": "probabilistic", "chunk_size": 64}, "loss.chunk_size"),
])
def test_bad_loss_config_names_the_key(values, key):
    with pytest.raises(ConfigError, match=key):
        LossConfig(**values)


def test_bad_rank_is_refused():
    with pytest.raises(ValueError, match="rank 2"):
        build_loss(LossConfig(), rank=2, world_size=2)


def _correlated_outputs(rows: int, dim: int, with_bias: bool, seed: int = 3) -> dict[str, torch.Tensor]:
    """Leaf features where text i is a noisy copy of media i, so top-1 is neither 0 nor 1."""
    gen = torch.Generator().manual_seed(seed)
    media = F.normalize(torch.randn(rows, dim, generator=gen), dim=-1)
    text = F.normalize(media + 0.6 * torch.randn(rows, dim, generator=gen), dim=-1)
    outputs = {"media_features": media.requires_grad_(True), "text_features": text.requires_grad_(True),
               "logit_scale": torch.tensor([14.0], requires_grad=True)}
    if with_bias:
        outputs["logit_bias"] = torch.tensor([-3.0], requires_grad=True)
    return outputs


def _value_grads_metrics(cfg: LossConfig, rows: int = 12, dim: int = 8, with_bias: bool = False) -> dict:
    outputs = _correlated_outputs(rows, dim, with_bias)
    loss_fn = build_loss(cfg)
    loss, metrics = loss_fn(outputs)
    loss.backward()
    return {"loss": loss.detach(), "grads": {k: v.grad for k, v in outputs.items()},
            "metrics": {k: float(v) for k, v in metrics.items()}, "logits_shape": loss_fn.last_logits_shape}


@pytest.mark.parametrize("kind, smoothing, with_bias", [
    ("clip", 0.0, False), ("clip", 0.1, False), ("clip", 0.1, True), ("siglip", 0.0, True),
])
@pytest.mark.parametrize("chunk_size", [1, 4, 5, 12, 50])  # 4 divides the 12 rows, 5 does not, 50 > 12
def test_chunked_equals_unchunked(kind, smoothing, with_bias, chunk_size):
    unchunked = _value_grads_metrics(LossConfig(kind=kind, label_smoothing=smoothing), with_bias=with_bias)
    chunked = _value_grads_metrics(
        LossConfig(kind=kind, label_smoothing=smoothing, chunk_size=chunk_size), with_bias=with_bias
    )
    assert chunked["loss"].dtype == torch.float32
    torch.testing.assert_close(chunked["loss"], unchunked["loss"], rtol=1e-6, atol=0)
    for name, expected in unchunked["grads"].items():
        if kind == "clip" and name == "logit_bias":
            # 0 up to rounding both ways: a shift of every logit leaves the softmax unchanged
            assert abs(float(chunked["grads"][name])) < 1e-6 and abs(float(expected)) < 1e-6
        else:
            _close(chunked["grads"][name], expected, 1e-6, f"d loss / d {name}")
    assert chunked["metrics"] == unchunked["metrics"]
    assert 0.0 < chunked["metrics"]["media_to_text_top1"] < 1.0  # the accuracy check can fail either way
    assert chunked["logits_shape"] == (min(chunk_size, 12), 12)


def test_chunked_bf16_features_and_autocast_stay_fp32():
    outputs = _correlated_outputs(10, 8, with_bias=False)
    bf16 = {**outputs, "media_features": outputs["media_features"].bfloat16(),
            "text_features": outputs["text_features"].bfloat16()}
    unchunked, _ = build_loss(LossConfig())(bf16)
    loss_fn = build_loss(LossConfig(chunk_size=3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        chunked, _ = loss_fn(bf16)
        chunked.backward()  # backward under autocast too: the recomputed logits must stay fp32
    assert chunked.dtype == torch.float32
    torch.testing.assert_close(chunked, unchunked, rtol=1e-6, atol=0)
    assert outputs["logit_scale"].grad is not None and outputs["logit_scale"].grad.dtype == torch.float32


# large enough that a [b, b] block stands out from every [b, D] feature block
MEMORY_ROWS, MEMORY_DIM, MEMORY_CHUNK = 512, 16, 64


def _largest_tensors(chunk_size: int, kind: str = "clip") -> tuple[int, int]:
    """(largest tensor saved for backward, largest tensor any op produced in forward + backward), in elements."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestOutput(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            for value in result if isinstance(result, (tuple, list)) else [result]:
                if isinstance(value, torch.Tensor):
                    LargestOutput.largest = max(LargestOutput.largest, value.numel())
            return result

    saved = []

    def pack(tensor):
        saved.append(tensor.numel())
        return tensor

    outputs = _correlated_outputs(MEMORY_ROWS, MEMORY_DIM, with_bias=kind == "siglip")
    loss_fn = build_loss(LossConfig(kind=kind, chunk_size=chunk_size))
    with LargestOutput(), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss, _ = loss_fn(outputs)
        loss.backward()
    assert saved, "nothing was saved for backward: the hook saw nothing"
    return max(saved), LargestOutput.largest


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_chunked_loss_never_holds_a_full_logit_block(kind):
    full_block = MEMORY_ROWS * MEMORY_ROWS  # b x W*b at W = 1
    unchunked_saved, unchunked_largest = _largest_tensors(0, kind)
    # the unchunked path keeps b x W*b blocks for backward: what chunking removes
    assert unchunked_saved >= full_block and unchunked_largest >= full_block
    chunked_saved, chunked_largest = _largest_tensors(MEMORY_CHUNK, kind)
    # only features and per-row scalars are saved; no op ever makes more than one chunk x W*b block
    assert chunked_saved <= MEMORY_ROWS * MEMORY_DIM
    assert chunked_largest <= MEMORY_CHUNK * MEMORY_ROWS
