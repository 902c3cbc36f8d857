"""Contrastive losses over the global batch: CLIP/CLAP InfoNCE, SigLIP, and the probabilistic loss.

    loss_fn = build_loss(LossConfig(kind="clip"), rank, world_size)
    loss, metrics = loss_fn(model(media, tokens))

Each rank all-gathers the features of every rank with an autograd-aware gather and computes only
its own b rows against the W*b gathered columns, in both directions (labels offset by rank*b):
logits take b x W*b memory per rank, never (W*b)^2.

Gradient scale. DeepSpeed and DDP *average* parameter gradients over ranks, so every per-rank loss
here is defined so that the AVERAGE over ranks of its value equals the single-process loss L over
the global batch. The gather's backward sums the gradients that all ranks' losses send to a rank's
features, so rank r's features receive W * dL/df_r; after the tower's backward and the averaging over
ranks, every parameter gradient is exactly dL/dtheta. Parameters that enter the loss directly
(logit scale, bias) receive d loss_r / d theta on rank r, whose average is dL/dtheta too. Tests check
all of this against one process on the concatenated batch (tests/test_losses.py).

Slots without a real sample (`outputs["valid"]`, bool [b] per rank, False for a slot the loader
filled; see pipeline.data.dataset.Batch.valid). An invalid row takes no part in any loss on any rank: not as
anchor (its rows are dropped) nor as negative (its columns are masked; the mask is all-gathered with
the features). Every per-rank loss is then normalised by the number N of valid rows over all ranks,
a device tensor taken from the gathered mask (no host sync, no extra collective): rank r's loss is
W / N times the sum of its valid rows' terms, so the average over ranks, and every gradient, equals
the single-process loss of the batch with the invalid rows removed. Without "valid" in the outputs the
code path is the unmasked one, unchanged.

Logits are computed in fp32 whatever the feature dtype (bf16/fp16 features are cast before the gather,
so the gather's gradient all-reduce is fp32 too). World size 1 never touches torch.distributed.

Chunking (`loss.chunk_size`, clip and siglip). Even b x W*b is too much for a 65,536-sample contrastive
batch on one GPU: two 16 GiB fp32 logit blocks plus cross-entropy's saved log-softmax and the backward's
gradient of the same size. With chunk_size > 0, `chunked_logit_loss` walks the local rows `chunk_size`
at a time and keeps only per-row scalars (log-sum-exp) for backward, which recomputes each chunk's
logits. Loss, gradients and top-1 metrics equal the unchunked path up to fp32 summation order.

Size: one module for the three losses (~530 lines) because they share every piece that makes them
exact: the autograd-aware gather, the row mask of invalid slots, and the chunked logit function with its
hand-written backward; split apart, each loss would import the same internals from a sibling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pipeline.core.errors import ConfigError

KINDS = ("clip", "siglip", "probabilistic")
CHUNKED_KINDS = ("clip", "siglip")
PROBABILISTIC_FORMS = ("contrastive", "gaussian")


@dataclass
class LossConfig:
    kind: str = "clip"
    """"clip" (symmetric InfoNCE, CLAP too), "siglip" (sigmoid, needs model.logit_bias) or
    "probabilistic" (per-sample sigma, needs model.probabilistic)."""
    label_smoothing: float = 0.0
    """Label smoothing of both cross-entropies (clip, probabilistic); 0 disables."""
    probabilistic_form: str = "contrastive"
    """"contrastive": logit_ij = -ln sigma_j - ||x_i - mu_j||^2 / sigma_j^2;
    "gaussian": the exact isotropic Gaussian log-likelihood -D ln sigma_j - ||x_i - mu_j||^2 / (2 sigma_j^2)."""
    chunk_size: int = 0
    """Local logit rows computed at a time by the clip and siglip losses: peak logit memory drops from
    b x W*b to a few chunk_size x W*b fp32 blocks, and nothing of that size is kept for backward (it is
    recomputed: one extra logit matmul). Same loss and gradients. 0 computes all b rows at once. The
    probabilistic loss is not chunked and refuses a non-zero value."""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConfigError(f"loss.kind must be one of {list(KINDS)}, got {self.kind!r}")
        if self.probabilistic_form not in PROBABILISTIC_FORMS:
            raise ConfigError(
                f"loss.probabilistic_form must be one of {list(PROBABILISTIC_FORMS)}, got {self.probabilistic_form!r}"
            )
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"loss.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.kind == "siglip" and self.label_smoothing:
            raise ConfigError("loss.label_smoothing applies to the clip and probabilistic losses, not siglip")
        if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size < 0:
            raise ConfigError(f"loss.chunk_size must be an integer >= 0 (0: unchunked), got {self.chunk_size!r}")
        if self.chunk_size and self.kind not in CHUNKED_KINDS:
            raise ConfigError(
                f"loss.chunk_size is implemented for {list(CHUNKED_KINDS)}, not {self.kind!r}: set loss.chunk_size=0"
            )


class _GatherWithGrad(torch.autograd.Function):
    """all_gather forward; backward: sum every rank's gradient of the gathered tensor, keep our slice."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
        ctx.rank, ctx.rows = rank, local.shape[0]
        parts = [torch.empty_like(local) for _ in range(world_size)]
        dist.all_gather(parts, local.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad_gathered: torch.Tensor):
        grad = grad_gathered.contiguous().clone()
        # gloo has no reduce_scatter; an all-reduce of a [W*b, D] feature gradient is small
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = ctx.rank * ctx.rows
        return grad[start : start + ctx.rows], None, None


def gather_features(local: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """[b, ...] on each rank -> [W*b, ...] in rank order, differentiable (every rank must pass the same b)."""
    if world_size == 1:
        return local
    return _GatherWithGrad.apply(local, rank, world_size)


def gather_mask(local: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """bool [b] on each rank -> bool [W*b] in rank order; no autograd (a mask has no gradient)."""
    if world_size == 1:
        return local
    parts = [torch.empty_like(local, dtype=torch.uint8) for _ in range(world_size)]
    dist.all_gather(parts, local.to(torch.uint8).contiguous())  # gloo has no bool all_gather
    return torch.cat(parts).bool()


class RowMask(NamedTuple):
    """Which rows and columns of a rank's [b, W*b] logits hold real samples, and each row's weight."""

    rows: torch.Tensor
    """bool [b]: this rank's valid rows."""
    columns: torch.Tensor
    """bool [W*b]: the valid samples of every rank (the gathered `rows`)."""
    count: torch.Tensor
    """fp32 0-dim: valid samples over all ranks (at least 1, so that an all-invalid batch gives loss 0)."""
    row_weight: torch.Tensor
    """fp32 [b]: W / count for a valid row, 0 for an invalid one; the sum of row terms times this is the
    per-rank loss whose average over ranks is the mean over the valid rows of the global batch."""


# masked logits: exp() of it is exactly 0 and it stays finite (-inf would make 0 * inf = nan in backward)
MASKED_LOGIT = torch.finfo(torch.float32).min

CRITERIA = ("softmax", "sigmoid")


def _chunk_logits(queries, candidates, scale, bias, start, stop, columns=None):
    """scale * q[start:stop] @ candidates.T (+ bias), fp32, one [stop - start, N] block; the columns
    outside the `columns` mask (when given) set to MASKED_LOGIT."""
    logits = queries[start:stop] @ candidates.T
    logits.mul_(scale)
    if bias is not None:
        logits.add_(bias)
    if columns is not None:
        logits.masked_fill_(~columns[None, :], MASKED_LOGIT)
    return logits


def _log_sum_exp_(logits):
    """torch.logsumexp(logits, dim=1) computed inside `logits`, which it overwrites: logsumexp itself
    allocates two temporaries of the block's size (shifted logits, their exp)."""
    peak = logits.amax(dim=1, keepdim=True)
    return logits.sub_(peak).exp_().sum(dim=1).log_().add_(peak.squeeze(1))


def _chunk_forward(logits, labels, criterion, smoothing, mask=None, start=0, stop=None, overwrite=False):
    """(loss of these rows, per-row log-sum-exp or None, number of rows whose argmax is the label).

    Unmasked: the plain sum of the row losses. Masked (`mask`, a RowMask of the whole local batch, these
    being its rows start:stop, invalid columns already at MASKED_LOGIT): the sum over the valid rows of
    row loss x row weight, each row's softmax and smoothing over the valid columns only. `overwrite`
    (no autograd through `logits`) lets the softmax log-sum-exp reuse the block instead of allocating two more."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    target = logits[rows, labels]
    hits = logits.argmax(dim=1) == labels
    if mask is not None:
        hits &= mask.rows[start:stop]
    correct = hits.sum()
    if criterion == "sigmoid":
        # -log sigmoid(-z) for every negative and -log sigmoid(z) = softplus(z) - z for the positive
        # (a masked column adds softplus(MASKED_LOGIT) = 0)
        if mask is None:
            return F.softplus(logits).sum() - target.sum(), None, correct
        row_loss = F.softplus(logits).sum(dim=1) - target
        log_sum_exp = None
    else:
        # cross-entropy against (1 - eps) one-hot + eps / N, as F.cross_entropy(label_smoothing=eps)
        if smoothing and mask is None:
            mean_logit = logits.mean(dim=1)
        elif smoothing:  # the mean over the valid columns: MASKED_LOGIT x 0 adds 0
            mean_logit = (logits @ mask.columns.float()) / mask.count
        log_sum_exp = _log_sum_exp_(logits) if overwrite else torch.logsumexp(logits, dim=1)
        row_loss = log_sum_exp - (1.0 - smoothing) * target
        if smoothing:
            row_loss = row_loss - smoothing * mean_logit
        if mask is None:
            return row_loss.sum(), log_sum_exp, correct
    # where(), not a product: an invalid row's own (masked) target makes its row loss huge
    row_loss = torch.where(mask.rows[start:stop], row_loss, 0.0) * mask.row_weight[start:stop]
    return row_loss.sum(), log_sum_exp, correct


class _ChunkedLogitLoss(torch.autograd.Function):
    """Mean over the local rows of a softmax cross-entropy (InfoNCE) or sigmoid (SigLIP) loss of the logits
    scale * queries @ candidates.T + bias, walked `chunk_size` rows at a time.

    Both criteria have d loss / d logit = (p - target) / rows, with p the softmax (from the saved per-row
    log-sum-exp) or the sigmoid of the logit, so backward recomputes each chunk's logits and turns them
    into that gradient in place. Saved for backward: the two feature blocks and b scalars, never a
    [b, N] tensor. With a RowMask, 1 / rows becomes each row's weight and a masked column's p is 0.
    """

    @staticmethod
    def forward(ctx, queries, candidates, scale, bias, first_label, chunk_size, criterion, smoothing,
                mask_rows, mask_columns, mask_count, mask_row_weight):
        rows = queries.shape[0]
        mask = None if mask_rows is None else RowMask(mask_rows, mask_columns, mask_count, mask_row_weight)
        columns = None if mask is None else mask.columns
        labels = torch.arange(rows, device=queries.device) + first_label
        loss = torch.zeros((), dtype=torch.float32, device=queries.device)
        correct = torch.zeros((), dtype=torch.long, device=queries.device)
        log_sum_exps = []
        with torch.autocast(device_type=queries.device.type, enabled=False):
            for start in range(0, rows, chunk_size):
                stop = min(start + chunk_size, rows)
                logits = _chunk_logits(queries, candidates, scale, bias, start, stop, columns)
                chunk_loss, log_sum_exp, chunk_correct = _chunk_forward(
                    logits, labels[start:stop], criterion, smoothing, mask, start, stop, overwrite=True
                )
                loss += chunk_loss
                correct += chunk_correct
                log_sum_exps.append(log_sum_exp)
                del logits  # free this block before the next one is allocated
        log_sum_exp = torch.cat(log_sum_exps) if criterion == "softmax" else None
        ctx.save_for_backward(queries, candidates, scale, bias, log_sum_exp, *(mask or ()))
        ctx.first_label, ctx.chunk_size, ctx.criterion, ctx.smoothing = first_label, chunk_size, criterion, smoothing
        ctx.masked = mask is not None
        if mask is None:
            top1 = correct.float() / rows
            loss = loss / rows
        else:
            top1 = correct.float() / mask.rows.sum().clamp_min(1)
        ctx.mark_non_differentiable(top1)
        return loss, top1

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_top1):
        queries, candidates, scale, bias, log_sum_exp, *mask = ctx.saved_tensors
        mask = RowMask(*mask) if ctx.masked else None
        columns = None if mask is None else mask.columns
        rows, classes = queries.shape[0], candidates.shape[0]
        labels = torch.arange(rows, device=queries.device) + ctx.first_label
        smoothing = ctx.smoothing if ctx.criterion == "softmax" else 0.0
        if mask is None:
            off_target = smoothing / classes
            # d (mean over rows) / d (row loss), times the upstream gradient
            row_weight = grad_loss / rows
        else:  # eps / N on the valid columns only; each row its own weight (0: an invalid row)
            off_target = (smoothing / mask.count) * mask.columns.float() if smoothing else 0.0
            row_weight = (grad_loss * mask.row_weight)[:, None]
        # unscaled accumulators: multiplying by the scale tensor once at the end avoids a host sync; the
        # two [rows | N, D] accumulators are the only feature-sized tensors backward allocates (the scale's
        # gradient is summed chunk by chunk, the scaling is in place)
        grad_queries = torch.empty_like(queries)  # (d loss / d logits) @ candidates
        grad_candidates = torch.zeros_like(candidates)
        grad_bias = torch.zeros((), dtype=torch.float32, device=queries.device)
        # logit = scale * <q, c> + bias: d/d scale sums <q_i, sum_j g_ij c_j> over rows
        unscaled_grad_scale = torch.zeros((), dtype=torch.float32, device=queries.device)
        with torch.autocast(device_type=queries.device.type, enabled=False):
            for start in range(0, rows, ctx.chunk_size):
                stop = min(start + ctx.chunk_size, rows)
                grad_logits = _chunk_logits(queries, candidates, scale, bias, start, stop, columns)
                if ctx.criterion == "softmax":
                    grad_logits.sub_(log_sum_exp[start:stop, None]).exp_()
                else:
                    grad_logits.sigmoid_()
                if smoothing:
                    grad_logits.sub_(off_target)
                chunk_rows = torch.arange(stop - start, device=queries.device)
                grad_logits[chunk_rows, labels[start:stop]] -= 1.0 - smoothing
                grad_logits.mul_(row_weight if mask is None else row_weight[start:stop])
                if bias is not None:
                    grad_bias += grad_logits.sum()
                torch.mm(grad_logits, candidates, out=grad_queries[start:stop])
                grad_candidates.addmm_(grad_logits.T, queries[start:stop])
                if ctx.needs_input_grad[2]:
                    unscaled_grad_scale += torch.vdot(queries[start:stop].reshape(-1),
                                                      grad_queries[start:stop].reshape(-1))
                del grad_logits
        grad_queries_out = grad_candidates_out = grad_scale = grad_bias_out = None
        if ctx.needs_input_grad[0]:
            grad_queries_out = grad_queries.mul_(scale)
        if ctx.needs_input_grad[1]:
            grad_candidates_out = grad_candidates.mul_(scale)
        if ctx.needs_input_grad[2]:
            grad_scale = unscaled_grad_scale.reshape(scale.shape)
        if bias is not None and ctx.needs_input_grad[3]:
            grad_bias_out = grad_bias.reshape(bias.shape)
        return (grad_queries_out, grad_candidates_out, grad_scale, grad_bias_out) + (None,) * 8


def chunked_logit_loss(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    first_label: int,
    chunk_size: int,
    criterion: str = "softmax",
    smoothing: float = 0.0,
    mask: RowMask | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss over the b query rows, top-1 accuracy) of the logits scale * queries @ candidates.T + bias
    without ever holding more than one [chunk_size, N] logit block (plus its gradient block in backward).

    queries [b, D] are this rank's rows, candidates [N, D] the gathered other tower (fp32 both), row i's
    positive is candidate first_label + i. criterion "softmax": cross-entropy with label smoothing, as
    F.cross_entropy; "sigmoid": SigLIP's sum of -log sigmoid(+-logit) over the row, divided by b.
    With `mask` the invalid rows and columns take no part: the loss is the sum over the valid rows of
    row loss x mask.row_weight, and top-1 is over the valid rows.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {list(CRITERIA)}, got {criterion!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if bias is not None:
        bias = bias.float()
    return _ChunkedLogitLoss.apply(
        queries.float(), candidates.float(), scale.float(), bias, first_label, chunk_size, criterion, smoothing,
        *(mask or (None,) * 4)
    )


def _require(outputs: dict, keys: tuple[str, ...], kind: str, hint: str) -> None:
    missing = [k for k in keys if outputs.get(k) is None]
    if missing:
        raise KeyError(f"the {kind} loss needs {missing} in the model outputs ({hint})")


class _GlobalBatchLoss(nn.Module):
    """Shared bookkeeping: rank, world size, the labels of the local rows, the logits shape seen.
    Subclasses define `compute(outputs) -> (loss, metrics)`."""

    def __init__(self, cfg: LossConfig, rank: int, world_size: int):
        super().__init__()
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad rank {rank} for world size {world_size}")
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.last_logits_shape: tuple[int, ...] | None = None
        """Shape of the per-rank logits of the last call: (b, W*b), observable by tests and benches."""

    def forward(self, outputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # autocast would run the logit matmuls in bf16/fp16 even on fp32 inputs: logits stay fp32
        with torch.autocast(device_type=outputs["media_features"].device.type, enabled=False):
            return self.compute(outputs)

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        return gather_features(local.float(), self.rank, self.world_size)

    def local_labels(self, rows: int, device: torch.device) -> torch.Tensor:
        return torch.arange(rows, device=device) + self.rank * rows

    def row_mask(self, outputs: dict[str, torch.Tensor], rows: int, device: torch.device) -> RowMask | None:
        """The RowMask of `outputs["valid"]` (bool [b], False for a slot without a real sample), gathered
        over the ranks; None when the outputs carry no "valid"."""
        valid = outputs.get("valid")
        if valid is None:
            return None
        valid = valid.to(device=device, dtype=torch.bool, non_blocking=True).reshape(-1)
        if valid.shape[0] != rows:
            raise ValueError(f'outputs["valid"] has {valid.shape[0]} entries for {rows} feature rows')
        columns = gather_mask(valid, self.rank, self.world_size)
        count = columns.sum().float().clamp_min(1.0)  # stays on the device: no host sync
        return RowMask(valid, columns, count, valid.float() * (self.world_size / count))

    def symmetric_cross_entropy(
        self, logits_per_media: torch.Tensor, logits_per_text: torch.Tensor, mask: RowMask | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean of the media->text and text->media cross-entropies over this rank's rows [b, W*b],
        with the in-batch top-1 accuracy of each direction (over the valid rows and columns of `mask`)."""
        self.last_logits_shape = tuple(logits_per_media.shape)
        labels = self.local_labels(logits_per_media.shape[0], logits_per_media.device)
        smoothing = self.cfg.label_smoothing
        if mask is not None:
            rows = labels.shape[0]
            logits_per_media = logits_per_media.masked_fill(~mask.columns[None, :], MASKED_LOGIT)
            logits_per_text = logits_per_text.masked_fill(~mask.columns[None, :], MASKED_LOGIT)
            media_loss, _, _ = _chunk_forward(logits_per_media, labels, "softmax", smoothing, mask, 0, rows)
            text_loss, _, _ = _chunk_forward(logits_per_text, labels, "softmax", smoothing, mask, 0, rows)
            metrics = {
                "media_to_text_top1": self.top1(logits_per_media, labels, mask),
                "text_to_media_top1": self.top1(logits_per_text, labels, mask),
            }
            return (media_loss + text_loss) / 2, metrics
        loss = (
            F.cross_entropy(logits_per_media, labels, label_smoothing=smoothing)
            + F.cross_entropy(logits_per_text, labels, label_smoothing=smoothing)
        ) / 2
        metrics = {
            "media_to_text_top1": self.top1(logits_per_media, labels),
            "text_to_media_top1": self.top1(logits_per_text, labels),
        }
        return loss, metrics

    @staticmethod
    def top1(logits: torch.Tensor, labels: torch.Tensor, mask: RowMask | None = None) -> torch.Tensor:
        """Fraction of the rows whose largest logit is the label (the valid rows only, when masked:
        their invalid columns must already be masked)."""
        hits = logits.detach().argmax(dim=1) == labels
        if mask is None:
            return hits.float().mean()
        return (hits & mask.rows).sum().float() / mask.rows.sum().clamp_min(1)


class ClipLoss(_GlobalBatchLoss):
    """Symmetric InfoNCE: cross-entropy along rows (media -> text) and columns (text -> media), averaged."""

    def compute(self, outputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        media, text = outputs["media_features"].float(), outputs["text_features"].float()
        scale = outputs["logit_scale"].float()
        all_media, all_text = self.gather(media), self.gather(text)
        mask = self.row_mask(outputs, media.shape[0], media.device)
        bias = outputs.get("logit_bias")
        if self.cfg.chunk_size:
            loss, metrics = self.chunked_symmetric_cross_entropy(media, text, all_media, all_text, scale, bias, mask)
        else:
            # the local rows of both directions: media_i vs every text, text_i vs every media
            logits_per_media = scale * media @ all_text.T
            logits_per_text = scale * text @ all_media.T
            if bias is not None:
                logits_per_media = logits_per_media + bias.float()
                logits_per_text = logits_per_text + bias.float()
            loss, metrics = self.symmetric_cross_entropy(logits_per_media, logits_per_text, mask)
        metrics["logit_scale"] = scale.detach().reshape(())
        if bias is not None:
            metrics["logit_bias"] = bias.detach().float().reshape(())
        return loss, metrics

    def chunked_symmetric_cross_entropy(self, media, text, all_media, all_text, scale, bias, mask=None):
        """symmetric_cross_entropy of the same logits, `loss.chunk_size` rows at a time."""
        rows, chunk = media.shape[0], self.cfg.chunk_size
        self.last_logits_shape = (min(chunk, rows), all_text.shape[0])
        first_label, smoothing = self.rank * rows, self.cfg.label_smoothing
        media_loss, media_top1 = chunked_logit_loss(
            media, all_text, scale, bias, first_label, chunk, "softmax", smoothing, mask
        )
        text_loss, text_top1 = chunked_logit_loss(
            text, all_media, scale, bias, first_label, chunk, "softmax", smoothing, mask
        )
        metrics = {"media_to_text_top1": media_top1, "text_to_media_top1": text_top1}
        return (media_loss + text_loss) / 2, metrics


class SigLipLoss(_GlobalBatchLoss):
    """Sigmoid loss over every (media, text) pair of the global batch, normalised as open_clip's SigLipLoss.

    Rank r sums -log sigmoid(+-logit) over its b media rows against all W*b texts and divides by b;
    the average over ranks is the single-process sum over (W*b)^2 pairs divided by W*b. Masked: the sum
    over valid pairs times W / N (N valid samples over all ranks), i.e. the loss of the valid rows alone.
    """

    def compute(self, outputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        _require(outputs, ("logit_bias",), "siglip", "set model.logit_bias=true")
        media, text = outputs["media_features"].float(), outputs["text_features"].float()
        scale, bias = outputs["logit_scale"].float(), outputs["logit_bias"].float()
        all_text = self.gather(text)
        mask = self.row_mask(outputs, media.shape[0], media.device)
        if self.cfg.chunk_size:
            return self.compute_chunked(media, text, all_text, scale, bias, mask)
        logits = scale * media @ all_text.T + bias
        self.last_logits_shape = tuple(logits.shape)
        rows = media.shape[0]
        labels = self.local_labels(rows, media.device)
        if mask is None:
            signs = -torch.ones_like(logits)
            signs[torch.arange(rows, device=media.device), labels] = 1.0
            loss = -F.logsigmoid(signs * logits).sum() / rows
        else:  # a masked column adds softplus(MASKED_LOGIT) = 0, an invalid row nothing
            logits = logits.masked_fill(~mask.columns[None, :], MASKED_LOGIT)
            loss, _, _ = _chunk_forward(logits, labels, "sigmoid", 0.0, mask, 0, rows)
        with torch.no_grad():  # the other direction only for the accuracy metric
            all_media = gather_features(media.detach(), self.rank, self.world_size)
            logits_per_text = scale * text @ all_media.T
            if mask is not None:
                logits_per_text.masked_fill_(~mask.columns[None, :], MASKED_LOGIT)
        metrics = {
            "media_to_text_top1": self.top1(logits, labels, mask),
            "text_to_media_top1": self.top1(logits_per_text, labels, mask),
            "logit_scale": scale.detach().reshape(()),
            "logit_bias": bias.detach().reshape(()),
        }
        return loss, metrics

    def compute_chunked(self, media, text, all_text, scale, bias, mask=None):
        """The same loss and metrics, `loss.chunk_size` rows at a time."""
        rows, chunk = media.shape[0], self.cfg.chunk_size
        self.last_logits_shape = (min(chunk, rows), all_text.shape[0])
        first_label = self.rank * rows
        loss, media_top1 = chunked_logit_loss(media, all_text, scale, bias, first_label, chunk, "sigmoid", 0.0, mask)
        with torch.no_grad():  # the other direction only for the accuracy metric
            all_media = gather_features(media.detach(), self.rank, self.world_size)
            _, text_top1 = chunked_logit_loss(text, all_media, scale, None, first_label, chunk, "sigmoid", 0.0, mask)
        metrics = {
            "media_to_text_top1": media_top1,
            "text_to_media_top1": text_top1,
            "logit_scale": scale.detach().reshape(()),
            "logit_bias": bias.detach().reshape(()),
        }
        return loss, metrics


class ProbabilisticLoss(_GlobalBatchLoss):
    """InfoNCE with per-candidate uncertainty: logit_ij = -c ln sigma_j - ||x_i - mu_j||^2 / (k sigma_j^2).

    Query i's mean x_i is scored against every candidate j of the other tower with the candidate's
    sigma; c = 1, k = 1 for the "contrastive" form, c = D, k = 2 for the exact Gaussian likelihood.
    Both directions, as in CLIP. The model's logit scale enters through sigma (see pipeline/model/contrastive.py).
    """

    def _logits(self, queries: torch.Tensor, candidates: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
        # ||x - mu||^2 expanded so that only a b x W*b matrix is ever formed
        squared = (
            queries.pow(2).sum(1, keepdim=True) + candidates.pow(2).sum(1)[None, :] - 2 * queries @ candidates.T
        ).clamp_min(0.0)
        if self.cfg.probabilistic_form == "gaussian":
            dims = queries.shape[1]
            return -dims * log_sigma[None, :] - squared * torch.exp(-2 * log_sigma)[None, :] / 2
        return -log_sigma[None, :] - squared * torch.exp(-2 * log_sigma)[None, :]

    def compute(self, outputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        _require(outputs, ("media_log_sigma", "text_log_sigma"), "probabilistic", "set model.probabilistic=true")
        media, text = outputs["media_features"].float(), outputs["text_features"].float()
        media_log_sigma = outputs["media_log_sigma"].float().reshape(-1)
        text_log_sigma = outputs["text_log_sigma"].float().reshape(-1)
        all_media, all_text = self.gather(media), self.gather(text)
        all_media_log_sigma, all_text_log_sigma = self.gather(media_log_sigma), self.gather(text_log_sigma)
        logits_per_media = self._logits(media, all_text, all_text_log_sigma)
        logits_per_text = self._logits(text, all_media, all_media_log_sigma)
        mask = self.row_mask(outputs, media.shape[0], media.device)
        loss, metrics = self.symmetric_cross_entropy(logits_per_media, logits_per_text, mask)
        metrics["logit_scale"] = outputs["logit_scale"].detach().float().reshape(())
        for name, log_sigma in (("media_sigma", media_log_sigma), ("text_sigma", text_log_sigma)):
            sigma = log_sigma.detach().exp()
            metrics[name] = sigma.mean() if mask is None else (sigma * mask.rows).sum() / mask.rows.sum().clamp_min(1)
        return loss, metrics


def build_loss(cfg: LossConfig, rank: int = 0, world_size: int = 1) -> nn.Module:
    """`loss_fn(outputs) -> (loss, metrics)`; metrics are detached 0-dim tensors over the local (valid) rows.
    `outputs` may hold "valid" (bool [b]): rows marked False take no part (see the module docstring)."""
    loss_class = {"clip": ClipLoss, "siglip": SigLipLoss, "probabilistic": ProbabilisticLoss}[cfg.kind]
    return loss_class(cfg, rank, world_size)
