"""Evaluation: media<->text retrieval R@1/5/10 both ways and zero-shot classification.

    python -m pipeline eval runs/demo-clip --data shards/shapes/val
    python -m pipeline eval export.pt --config configs/demo-clip.yaml --data shards/shapes/val --json eval.json

From the trainer (every rank calls it; under ZeRO-3 every rank must, since forwards gather
parameters collectively):

    metrics = evaluate(engine.module, loader, tokenizer=tokenizer, classes_json=read_classes(url, opts),
                       device=device, rank=rank, world_size=world_size)

Definitions, so the figures can be compared with other runs:
- Features are L2-normalised here and scored by dot product (cosine similarity); probabilistic
  models are scored on their normalised means.
- Retrieval pairs the i-th media with the i-th caption, over the whole held-out set (gathered from
  every rank; rows with key "", the eval loader's padding, are left out). R@k is the fraction of queries whose partner is among the top k candidates.
- Ties count fairly: a query whose partner ties with t other candidates, with g candidates scoring
  strictly higher, scores the probability that a uniformly random tie-break puts the partner in the
  top k, min(1, max(0, (k - g) / (t + 1))). Identical captions (common in the embedded sets) then
  neither win nor lose by accident of ordering, the result does not depend on the order samples
  arrive in (so 2 ranks give what 1 rank gives), and constant features score exactly the chance
  level k/N. Scores within `tie_tolerance` (1e-6) are ties: float32 features carry ~1e-7 of
  rounding noise that depends on batch composition.
- Zero-shot: each class is the normalised mean of its normalised prompt embeddings over the
  templates of classes.json (prompt ensembling, as in CLIP); top-1/top-5 with the same tie rule;
  samples without a label (-1) are left out of it.
Every figure comes with its chance level: `chance_R@k` = k/N, `chance_zero_shot_topk` = k/C.

The same weights and data give the same figures here during training (every rank, its share of the
set) and in `python -m pipeline eval` (one process, the whole set), to the last digit: the trainer
averages BatchNorm running statistics over the ranks before each evaluation and each save
(`pipeline.parallel.distributed.average_buffers`), so the checkpoint holds the model that was evaluated.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.core.errors import ConfigError
from pipeline.core.storage import url_to_fs

log = logging.getLogger(__name__)

RECALL_KS = (1, 5, 10)
ZERO_SHOT_KS = (1, 5)
TIE_TOLERANCE = 1e-6
# rows of the similarity matrix scored at once: bounds memory at CHUNK x N doubles
CHUNK = 2048


def expected_hits(scores: torch.Tensor, target: torch.Tensor, ks: Sequence[int],
                  tie_tolerance: float = TIE_TOLERANCE) -> dict[int, torch.Tensor]:
    """For each row of `scores` [n, M] with the right answer at column `target[n]`: the probability,
    under a uniformly random tie-break, that it ranks in the top k. Returns {k: float64 [n]}."""
    true_score = scores.gather(1, target[:, None])
    higher = (scores > true_score + tie_tolerance).sum(dim=1).double()
    ties = ((scores - true_score).abs() <= tie_tolerance).sum(dim=1).double() - 1  # minus itself
    return {k: ((k - higher) / (ties + 1)).clamp(0.0, 1.0) for k in ks}


def _recall(queries: torch.Tensor, candidates: torch.Tensor, ks: Sequence[int],
            tie_tolerance: float) -> dict[int, float]:
    totals = dict.fromkeys(ks, 0.0)
    for start in range(0, len(queries), CHUNK):
        block = queries[start:start + CHUNK] @ candidates.T
        target = torch.arange(start, start + len(block), device=block.device)
        for k, hits in expected_hits(block, target, ks, tie_tolerance).items():
            totals[k] += hits.sum().item()
    return {k: totals[k] / len(queries) for k in ks}


def retrieval_metrics(media_features: torch.Tensor, text_features: torch.Tensor, ks: Sequence[int] = RECALL_KS,
                      tie_tolerance: float = TIE_TOLERANCE) -> dict[str, float]:
    """R@k media->text and text->media for paired features [N, D] (row i of each is a pair), scored by
    dot product (pass normalised features for cosine), with the chance level k/N beside each k."""
    if media_features.ndim != 2 or media_features.shape != text_features.shape:
        raise ValueError(f"retrieval needs paired features of equal shape [N, D], got media "
                         f"{tuple(media_features.shape)} and text {tuple(text_features.shape)}")
    n = len(media_features)
    if n == 0:
        raise ValueError("retrieval needs at least one pair; the evaluation set is empty")
    # float64: similarities of different pairs must not tie by rounding
    media = media_features.double()
    text = text_features.to(media.device).double()
    metrics: dict[str, float] = {}
    for k, value in _recall(media, text, ks, tie_tolerance).items():
        metrics[f"media_to_text_R@{k}"] = value
    for k, value in _recall(text, media, ks, tie_tolerance).items():
        metrics[f"text_to_media_R@{k}"] = value
    for k in ks:
        metrics[f"chance_R@{k}"] = min(k, n) / n
    return metrics


def _features(output: Any, key: str) -> torch.Tensor:
    # our towers return a dict; a bare tensor (open_clip's encode_*) works too
    return output[key] if isinstance(output, dict) else output


def zero_shot_classifier(model, tokenizer, class_names: Sequence[str], templates: Sequence[str], device,
                         batch_size: int = 256) -> torch.Tensor:
    """Class embeddings [D, C] by prompt ensembling: per class, the mean of the normalised text
    embeddings of every template filled with the class name, renormalised. Calls only
    `model.encode_text`; under ZeRO-3 every rank must call this with the same classes."""
    if not class_names:
        raise ValueError("zero-shot classification needs at least one class name")
    if not templates:
        raise ValueError("zero-shot classification needs at least one prompt template, e.g. 'a {}.'")
    for template in templates:
        if "{}" not in template:
            raise ValueError(f"prompt template {template!r} has no '{{}}' for the class name")
    prompts = [template.format(name) for name in class_names for template in templates]
    embeddings = []
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            tokens = tokenizer(prompts[start:start + batch_size]).to(device)
            features = _features(model.encode_text(tokens), "text_features").float()
            embeddings.append(F.normalize(features, dim=-1))
    per_prompt = torch.cat(embeddings).view(len(class_names), len(templates), -1)
    classes = F.normalize(per_prompt.mean(dim=1), dim=-1)
    return classes.T.contiguous()


def zero_shot_accuracy(media_features: torch.Tensor, labels: torch.Tensor, classifier: torch.Tensor,
                       ks: Sequence[int] = ZERO_SHOT_KS, tie_tolerance: float = TIE_TOLERANCE) -> dict[str, float]:
    """Top-k accuracy of `media_features` [N, D] against `classifier` [D, C], for labels in [0, C);
    rows labelled -1 (no label) are skipped. Returns zero_shot_top{k}, chance_zero_shot_top{k}
    and zero_shot_samples."""
    num_classes = classifier.shape[1]
    labels = labels.to(media_features.device).long()
    labelled = labels >= 0
    if (labels >= num_classes).any():
        bad = int(labels[labels >= num_classes][0])
        raise ValueError(f"sample label {bad} is outside the {num_classes} classes of classes.json: "
                         "the classes file does not match the shards")
    features, labels = media_features[labelled], labels[labelled]
    metrics: dict[str, float] = {"zero_shot_samples": float(len(labels))}
    if len(labels) == 0:
        return metrics
    logits = features.double() @ classifier.to(features.device).double()
    for k, hits in expected_hits(logits, labels, ks, tie_tolerance).items():
        metrics[f"zero_shot_top{k}"] = hits.mean().item()
        metrics[f"chance_zero_shot_top{k}"] = min(k, num_classes) / num_classes
    return metrics


def _parameter_dtype(model) -> torch.dtype:
    # float media (log-mel) must match the weights' dtype: fp32 from training, whatever a loaded model holds
    for parameter in model.parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    return torch.float32


def _encode_local(model, loader: Iterable, device, distributed: bool, progress: bool,
                  max_batches: int | None) -> dict[str, Any]:
    """Encode this rank's share. Under ZeRO-3 a forward is a collective, so while any rank still has
    batches, ranks that have run out forward a one-sample stand-in batch and discard it."""
    from pipeline.model.contrastive import media_to_device

    media_dtype = _parameter_dtype(model)
    media_parts, text_parts, label_parts, keys = [], [], [], []
    own_template, template = None, None
    batches = iter(loader)
    # on a terminal only (None: tqdm's test of its stream): in a log file a bar is a line of carriage returns
    bar = tqdm(desc="eval", unit="batch", disable=None if progress else True, leave=False)
    count = 0
    while True:
        batch = None
        if max_batches is None or count < max_batches:
            batch = next(batches, None)
        if batch is not None and own_template is None:
            own_template = (batch.media[:1].cpu(), batch.tokens[:1].cpu())
        if distributed:
            active = torch.tensor([0 if batch is None else 1], device=device)
            dist.all_reduce(active)
            ranks_with_data = int(active.item())
            if ranks_with_data == 0:
                break
            if ranks_with_data < dist.get_world_size() and template is None:
                # every rank takes this branch together (ranks_with_data is global), once per evaluation
                offered: list = [None] * dist.get_world_size()
                dist.all_gather_object(offered, own_template)
                template = next(t for t in offered if t is not None)
        elif batch is None:
            break
        if batch is None:
            media, tokens = template
            model.encode_media(media_to_device(media, device, media_dtype))
            model.encode_text(tokens.to(device))
            continue
        media = media_to_device(batch.media, device, media_dtype)
        media_features = _features(model.encode_media(media), "media_features")
        text_features = _features(model.encode_text(batch.tokens.to(device)), "text_features")
        # the eval loader pads every rank to the same number of full batches with key "" rows
        real = torch.tensor([key != "" for key in batch.keys], dtype=torch.bool)
        media_parts.append(F.normalize(media_features.float(), dim=-1).cpu()[real])
        text_parts.append(F.normalize(text_features.float(), dim=-1).cpu()[real])
        labels = getattr(batch, "labels", None)
        labels = labels.cpu().long() if labels is not None else torch.full((len(batch.keys),), -1)
        label_parts.append(labels[real])
        keys.extend(key for key in batch.keys if key != "")
        count += 1
        bar.update()
    bar.close()
    empty = torch.empty(0, 0)
    return {
        "media": torch.cat(media_parts) if media_parts else empty,
        "text": torch.cat(text_parts) if text_parts else empty,
        "labels": torch.cat(label_parts) if label_parts else torch.empty(0, dtype=torch.long),
        "keys": keys,
    }


def _gather(local: dict[str, Any], world_size: int) -> dict[str, Any]:
    """Every rank's features, concatenated in rank order (every rank gets the whole set)."""
    if world_size == 1:
        return local
    shares: list = [None] * world_size
    dist.all_gather_object(shares, local)
    shares = [share for share in shares if len(share["keys"])]
    if not shares:
        return local
    return {
        "media": torch.cat([s["media"] for s in shares]),
        "text": torch.cat([s["text"] for s in shares]),
        "labels": torch.cat([s["labels"] for s in shares]),
        "keys": [key for s in shares for key in s["keys"]],
    }


def evaluate(model, loader: Iterable, *, tokenizer, classes_json: dict | None, device, rank: int = 0,
             world_size: int = 1, max_batches: int | None = None, progress: bool | None = None) -> dict[str, float]:
    """Retrieval (and zero-shot when `classes_json` is given and samples carry labels) over every
    sample of `loader` on every rank. Every rank must call it; every rank gets the same flat dict of
    floats. Runs in eval mode under no_grad and restores the model's training mode afterwards."""
    distributed = world_size > 1
    if distributed and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"evaluate(world_size={world_size}) needs an initialised torch.distributed process group")
    device = torch.device(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            local = _encode_local(model, loader, device, distributed,
                                  progress=(rank == 0) if progress is None else progress, max_batches=max_batches)
            everything = _gather(local, world_size)
            # built on every rank: under ZeRO-3 encode_text is a collective
            classifier = (zero_shot_classifier(model, tokenizer, classes_json["classes"], classes_json["templates"],
                                               device) if classes_json else None)
    finally:
        model.train(was_training)
    keys = everything["keys"]
    if not keys:
        raise ValueError("evaluation read no samples: the held-out shards are empty or unreadable")
    if len(set(keys)) != len(keys):
        log.warning("evaluation saw %d duplicate sample keys among %d samples: some samples were read twice",
                    len(keys) - len(set(keys)), len(keys))
    # every rank scores the whole set (on its device): all return the same figures, no broadcast needed
    metrics = retrieval_metrics(everything["media"].to(device), everything["text"].to(device))
    metrics["samples"] = float(len(keys))
    if classifier is not None:
        metrics.update(zero_shot_accuracy(everything["media"].to(device), everything["labels"], classifier))
    return metrics


def read_classes(dataset_url: str, storage_options: dict | None = None) -> dict | None:
    """classes.json of a data set (next to its sizes.json), or None when it has none. `dataset_url`
    is the data set directory or one of its shard URLs (brace patterns allowed), on any fsspec
    protocol; with several '::'-joined sources, those that have a classes.json must agree (labels
    index into one list)."""
    found = {}
    for source in [part.strip() for part in dataset_url.split("::") if part.strip()]:
        classes = _read_one_classes(f"{_dataset_dir(source)}/classes.json", storage_options or {})
        if classes is not None:
            found[source] = classes
    if len({json.dumps(c["classes"]) for c in found.values()}) > 1:
        raise ValueError(f"the sources of '{dataset_url}' have different classes.json class lists: "
                         f"{', '.join(found)}; zero-shot labels need one list")
    return next(iter(found.values()), None)


def _read_one_classes(path: str, storage_options: dict) -> dict | None:
    fs, fs_path = url_to_fs(path, storage_options)
    if not fs.exists(fs_path):
        return None
    try:
        with fs.open(fs_path, "r") as handle:
            classes = json.load(handle)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(classes, dict) or not isinstance(classes.get("classes"), list) or not classes["classes"]:
        raise ValueError(f"{path} must hold {{\"classes\": [names...], \"templates\": [...]}} with at least one class")
    if not all(isinstance(name, str) and name for name in classes["classes"]):
        raise ValueError(f"{path}: every entry of 'classes' must be a non-empty string")
    templates = classes.get("templates") or ["a {}."]
    if not isinstance(templates, list) or not all(isinstance(t, str) and "{}" in t for t in templates):
        raise ValueError(f"{path}: 'templates' must be a list of strings each holding '{{}}' for the class name")
    return {"classes": list(classes["classes"]), "templates": list(templates)}


def _dataset_dir(dataset_url: str) -> str:
    """The directory of a data set from its directory, a sizes.json, or a shard URL / brace pattern."""
    url = dataset_url.rstrip("/")
    last = url.rsplit("/", 1)[-1]
    if last.endswith((".tar", ".json")) or "{" in last or "*" in last:
        url = url.rsplit("/", 1)[0] if "/" in url else "."
    return url


def format_table(metrics: dict[str, float]) -> str:
    """A plain-text table of the figures with the chance level beside each."""
    rows = [("figure", "value", "chance")]
    for k in RECALL_KS:
        for direction in ("media_to_text", "text_to_media"):
            key = f"{direction}_R@{k}"
            if key in metrics:
                rows.append((key.replace("_to_", "->").replace("_R@", " R@"), f"{100 * metrics[key]:.2f}%",
                             f"{100 * metrics[f'chance_R@{k}']:.2f}%"))
    for k in ZERO_SHOT_KS:
        key = f"zero_shot_top{k}"
        if key in metrics:
            rows.append((f"zero-shot top-{k}", f"{100 * metrics[key]:.2f}%",
                         f"{100 * metrics[f'chance_zero_shot_top{k}']:.2f}%"))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["  ".join(cell.ljust(width) if i == 0 else cell.rjust(width) for i, (cell, width)
                       in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    footer = f"{int(metrics.get('samples', 0))} samples"
    if "zero_shot_samples" in metrics:
        footer += f", {int(metrics['zero_shot_samples'])} labelled"
    return "\n".join(lines + [footer])


@dataclasses.dataclass
class EvalConfig:
    every_steps: int = 0
    """Evaluate on data.val_urls every this many steps (0: only at the end; no data.val_urls: never)."""
    batch_size: int = 128
    """Per-rank evaluation batch."""

    def __post_init__(self):
        if self.every_steps < 0:
            raise ConfigError(f"eval.every_steps must be >= 0, got {self.every_steps}")
        if self.batch_size <= 0:
            raise ConfigError(f"eval.batch_size must be positive, got {self.batch_size}")
