"""Mixture manifests (`data.mixture=mix.yaml`): several sources, each with its share of every epoch,
taken without replacement.

    sources:
      - urls: s3://bucket/laion/{00000..41455}.tar   # any data.train_urls form for one source
        weight: 3            # a share of the epoch: epoch size x weight / sum of weights
      - urls: shards/cc12m
        samples: 2000000     # or a fixed number of samples per epoch
      - urls: shards/curated
        samples: 500000      # more than the source holds: whole passes plus a part

The epoch size is `data.epoch_samples`, or the sources' total size; `samples` entries take theirs first and
`weight` entries share the rest. Each epoch a source with n samples of its S contributes floor(n / S) whole
passes plus a window of n mod S consecutive samples of its sequence (its shards in an order fixed by the
seed); the window starts where the previous epoch's ended, so a down-sampled source is read to its end
before any of its samples comes again, and the subset changes every epoch. The pieces of all sources are
then shuffled by (seed, epoch) and laid out over the streams as one data set's shards are
(pipeline.data.dataset): every count is fixed by (seed, epoch), so resume is exact as for a single source.

MosaicML streaming mixes without replacement too, but only in its own MDS format; webdataset's
`RandomMix` draws with replacement. Neither fits tar shards with an exact, resumable epoch plan, so this
is our own.

Every error names the manifest file, and where one source is at fault its entry (index in `sources:`, urls):
`data.mixture 'mix.yaml', source 1 (urls: 'shards/cc12m') cannot be read: no .tar shards found at ...`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.core import randomness, storage
from pipeline.core.errors import ConfigError


@dataclass(frozen=True)
class MixtureSource:
    urls: str
    weight: float | None = None
    samples: int | None = None
    manifest: str = ""
    """The manifest file the source is listed in."""
    index: int = 0
    """Its entry in the manifest's `sources:` list (0, 1, ...)."""

    @property
    def where(self) -> str:
        """The source as errors name it: manifest file, entry and urls."""
        return _where(self.manifest, self.index, self.urls)


def _where(manifest: str, index: int, urls: Any) -> str:
    return f"data.mixture '{manifest}', source {index} (urls: {urls!r})"


def read_manifest(url: str, storage_options: dict | None = None) -> list[MixtureSource]:
    """The sources of a manifest file (local path or fsspec URL), validated: errors name the file and entry."""
    import yaml

    try:
        with storage.open_url(url, "rb", storage_options) as handle:
            document = yaml.safe_load(handle.read())
    except FileNotFoundError:
        raise ConfigError(f"data.mixture: manifest '{url}' not found") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"data.mixture: '{url}' is not YAML: {error}") from None
    except Exception as error:  # whatever the storage says (no permission, a failing store): name the file
        raise ConfigError(f"data.mixture: manifest '{url}' cannot be read: {storage.describe(error)}") from None
    entries = document.get("sources") if isinstance(document, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"data.mixture: '{url}' needs a non-empty 'sources:' list")
    return [_source(url, index, entry) for index, entry in enumerate(entries)]


def _source(url: str, index: int, entry: Any) -> MixtureSource:
    where = _where(url, index, entry.get("urls") if isinstance(entry, dict) else None)
    if not isinstance(entry, dict) or not isinstance(entry.get("urls"), str) or not entry["urls"].strip():
        raise ConfigError(f"{where}: needs 'urls' (a shard directory or URL pattern), got the entry {entry!r}")
    unknown = set(entry) - {"urls", "weight", "samples"}
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)} (known: urls, weight, samples)")
    if ("weight" in entry) == ("samples" in entry):
        raise ConfigError(f"{where}: give exactly one of 'weight' (share of the epoch) or 'samples' (per epoch)")
    if "::" in entry["urls"]:
        raise ConfigError(f"{where}: one source per entry ('::' joins sources in data.train_urls, not here)")
    if "weight" in entry:
        weight = entry["weight"]
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0:
            raise ConfigError(f"{where}: weight must be a positive number, got {weight!r}")
        return MixtureSource(entry["urls"].strip(), weight=float(weight), manifest=url, index=index)
    samples = entry["samples"]
    if isinstance(samples, bool) or not isinstance(samples, int) or samples <= 0:
        raise ConfigError(f"{where}: samples must be a positive whole number, got {samples!r}")
    return MixtureSource(entry["urls"].strip(), samples=samples, manifest=url, index=index)


def epoch_counts(sources: list[MixtureSource], sizes: list[int], epoch_samples: int = 0) -> list[int]:
    """Samples each source gives every epoch."""
    for source, size in zip(sources, sizes):
        if size <= 0:
            raise ConfigError(f"{source.where} holds no samples")
    fixed = sum(source.samples or 0 for source in sources)
    total = epoch_samples or sum(sizes)
    weights = [source.weight or 0.0 for source in sources]
    rest = total - fixed
    if sum(weights) and rest <= 0:
        entries = ", ".join(f"source {s.index} ({s.samples})" for s in sources if s.samples)
        raise ConfigError(f"data.mixture '{sources[0].manifest}': the 'samples' entries ({entries}: {fixed} in all) "
                          f"leave nothing of the epoch ({total}) to the 'weight' entries; set data.epoch_samples "
                          "higher")
    shares = np.asarray(weights) / sum(weights) * rest if sum(weights) else np.zeros(len(sources))
    # whole samples by largest remainder: the shares add up to `rest` exactly
    counts = np.floor(shares).astype(np.int64)
    if sum(weights):
        order = np.argsort(-(shares - counts), kind="stable")
        counts[order[: int(rest - counts.sum())]] += 1
    return [int(source.samples) if source.samples else int(count) for source, count in zip(sources, counts)]


def epoch_pieces(sources: list[list[tuple[str, int]]], counts: list[int], seed: int,
                 epoch: int) -> list[tuple[str, int, int, int]]:
    """(url, first, end, shard size) ranges of every source's share of `epoch`, in a (seed, epoch) order."""
    pieces: list[tuple[str, int, int, int]] = []
    for index, (shards, count) in enumerate(zip(sources, counts)):
        # the source's sequence: its shards in an order fixed by the seed (not the epoch), so that the
        # windows of consecutive epochs follow each other through the same sequence
        order = randomness.generator(seed, "source_shard_order", index).permutation(len(shards))
        shards = [shards[i] for i in order]
        size = sum(n for _, n in shards)
        whole, part = divmod(count, size)
        pieces += [(url, 0, n, n) for _ in range(whole) for url, n in shards]
        start = epoch * part % size
        pieces += _window(shards, start, part)
    order = randomness.generator(seed, "mixture_piece_order", epoch).permutation(len(pieces))
    return [pieces[i] for i in order]


def _window(shards: list[tuple[str, int]], start: int, length: int) -> list[tuple[str, int, int, int]]:
    """Samples [start, start + length) of the shards laid end to end in a circle, as per-shard ranges."""
    size = sum(n for _, n in shards)
    out = []
    for lap_start in (start, start - size):  # the part before the end of the sequence, then after the wrap
        position = 0
        for url, n in shards:
            lo, hi = max(lap_start, position), min(lap_start + length, position + n)
            if lo < hi:
                out.append((url, lo - position, hi - position, n))
            position += n
    return out
