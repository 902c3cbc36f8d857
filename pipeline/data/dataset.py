"""Streaming loader: WebDataset tar shards -> equal, deterministic, resumable batches on every rank.

    loader = build_loader(cfg.data, cfg.data.train_urls, rank=rank, world_size=world_size, seed=cfg.seed,
                          media_transform=media_transform(cfg.model, True), tokenizer=get_tokenizer(cfg.model))
    for epoch in range(start_epoch, epochs):
        loader.set_epoch(epoch)
        for batch in loader:          # Batch(media, tokens, keys, labels, valid)
            ...                       # rows with valid False hold no real sample: outputs["valid"] = batch.valid
        state = loader.state_dict()   # (epoch, batches consumed, ...): saved with the checkpoint
        stats = sum_stats_across_ranks(loader.stats)  # counters of every rank (a collective: all ranks call it)

How an epoch is laid out (epoch mode, the default). Every rank has `workers` DataLoader workers; each
rank x worker pair reads one *stream*, S = world_size x max(workers, 1) streams in all.
  1. The shards are permuted by (seed, epoch) and laid end to end as one sample sequence, the shard
     sizes coming from sizes.json (or img2dataset's *_stats.json, or a count of the tar).
  2. The sequence, read as a circle starting at offset epoch x R, is cut into S contiguous ranges of
     the same whole number of batches. The remainder, R < S x batch_size samples after the last range,
     is not read this epoch (counted as `samples_remainder`). The start moves by R every epoch, so the
     dropped stretches of consecutive epochs do not overlap: even with one shard (no permutation to
     vary the order) a sample is dropped at most once in any floor(total / R) consecutive epochs.
     A range may start and end in the middle of a shard, so fewer shards than streams works; the
     loader fails at start only when the data set holds fewer than S x batch_size samples.
  3. Each stream passes its samples through a shuffle buffer seeded by (seed, epoch, stream). The
     buffer is simulated over sample indices up front, so the emission order of the whole stream is
     known before anything is read: after `batches consumed` the samples already emitted are known,
     and resume skips whole shards by their counts and the rest of a shard without decoding.
  4. DataLoader worker k yields whole batches; the DataLoader takes them round-robin, so batch i of
     a rank comes from stream i mod workers and the data position is (epoch, batches consumed).
Random augmentation is seeded per sample by (seed, epoch, stream, index), so a resumed run yields
the same tensors as an uninterrupted one.

Elastic resume: a position saved on another layout (world size, workers, batch size) replays what each
old stream consumed from the old plan, and cuts the rest of that epoch, in circle order, into the new
streams (StreamingDataset._slices); the next epochs are the new layout's own. Mixtures (`mixture`) lay
out each source's share of the epoch (pipeline.data.mixture) in place of the shard permutation of step 1.
Training streams run on into the next epoch in their worker, so the DataLoader prefetches across the
boundary. With `decode: gpu` a worker hands over JPEG bytes and crops (pipeline.media.imagedecode).

Resampled mode (`resampled: true`) draws shards with replacement, sources mixed by `weights`, from an
RNG seeded by (seed, epoch, stream); each stream takes `epoch_samples / S` samples (whole batches) of
the drawn shards and the rest works as above: resume regenerates the draws without reading.

Bad data. A sample is skipped, counted by reason in `loader.stats` (skipped_<reason>) and logged with
shard and key when its media is corrupt or absent, its caption is empty or not UTF-8, a member name
repeats in it or is one of webdataset's own entries (`x.__key__`: where webdataset raises; shardformat.PROBLEMS),
or it is lost with its shard: a truncated tar, a tar holding fewer samples than listed (one warning per shard names
both counts), a shard that is not there (not retried: one line names the URL), or one that still fails
after its retries (exponential backoff capped at 30 s, bounded by `retries` and `retry_max_s`; a read
that delivers nothing for `read_timeout_s` fails naming the shard). At start, shards listed in
sizes.json but absent from their directory are named in one warning with the samples they hold.
A skipped sample's slot holds no real sample: `Batch.valid` is False there (key "", label -1), and the
loss leaves the row out (a copy would be a false negative of its original). The row still repeats a
real sample's tensors (of the same batch, or when the whole batch is bad, of the nearest earlier batch
of the same stream that has one, else the nearest later one, else of another stream), so every rank
yields exactly `len(loader)` full batches of fixed shapes; such slots are counted as `samples_filled`,
and they are the same after a resume. `sum_stats_across_ranks` adds up every counter over the ranks.

Samples are what webdataset makes of a tar (keys, fields, skipped names: pipeline.data.shardformat); every
file access (fsspec, the cache of remote shards, the read timeout, retry backoff) is pipeline.core.storage.
This module stays one file of ~1,100 lines because the epoch plan (with its elastic re-layout), the stream
reader and the loader share one contract (the position (epoch, batches consumed) and the fill of bad slots)
that reads best in one place; shard sizes, device decoding and mixtures live in their own modules.

Eval loaders (`train=False`) read every sample exactly once, in shard order, without shuffling or
dropping: the sequence is cut into S nearly equal ranges and every stream yields the same number of
full batches, the slots past the end of its range (and those of bad samples) being padding, marked as
above (valid False, key "", label -1). Evaluation must ignore those rows.
"""

from __future__ import annotations

import atexit
import dataclasses
import hashlib
import io
import json
import logging
import math
import random
import tarfile
import time
import weakref
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.multiprocessing
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.core import randomness, storage
from pipeline.core.errors import ConfigError, ignore_stop_signals
from pipeline.data import mixture, shardformat
from pipeline.media import imagedecode

log = logging.getLogger(__name__)


@dataclass
class DataConfig:
    train_urls: str = ""
    """Training shards: a data set directory (local or remote prefix), a brace-expanded URL list
    (s3://bucket/laion/{00000..41455}.tar), or several sources joined with '::'."""
    val_urls: str = ""
    """Validation shards, same forms as train_urls; empty for none."""
    mixture: str = ""
    """A mixture manifest (YAML, local or remote): sources with their share of every epoch, taken without
    replacement (pipeline.data.mixture); instead of train_urls, epoch mode only."""
    weights: list[float] = field(default_factory=list)
    """Sampling weight per '::' source (resampled mode); empty means equal weights."""
    modality: str = "image"
    """'image' (.jpg/.jpeg/.png/.webp) or 'audio' (.flac/.wav/.ogg/.mp3)."""
    batch_size: int = 64
    """Samples per batch on each rank. Training derives it from train.global_batch_size (leave it unset)."""
    workers: int = 2
    """DataLoader worker processes per rank (0 reads in the training process)."""
    shuffle_buffer: int = 1000
    """Samples held by each stream's shuffle buffer (raw bytes, decoded on the way out); 0 or 1: no shuffle."""
    resampled: bool = False
    """Draw shards with replacement (sources mixed by weights) instead of one pass over every shard."""
    epoch_samples: int = 0
    """Resampled mode and data.mixture: samples per epoch over all ranks; 0 means the total size of the sources."""
    cache_dir: str | None = None
    """Local directory keeping a copy of every remote shard read; None reads remote shards directly."""
    cache_max_gb: float = 0.0
    """Most gigabytes (GB, 10^9 bytes: 1.5 is 1,500,000,000 bytes) `cache_dir` may hold: the least recently
    used shards are evicted past it (never one being read); 0 means no limit."""
    decode: str = "cpu"
    """'cpu': workers decode and crop every image. 'gpu': workers hand over the JPEG bytes with each
    sample's crop, and the training process decodes the batch on its device (nvJPEG through
    torchvision.io.decode_jpeg) and crops and resizes there; other formats, CMYK and JPEGs the device
    cannot decode are decoded on the CPU (counted as decoded_on_cpu). Training loaders only."""
    jpeg_draft: bool = True
    """Decode a JPEG at 1/2, 1/4 or 1/8 scale (libjpeg's DCT-domain downscale, PIL's draft()) when that
    still covers the output size (CPU decoding)."""
    allow_pipe: bool = False
    """Accept 'pipe:COMMAND' URLs, which run a shell command; off unless asked for."""
    caption_source: str = "txt"
    """'txt': the .txt caption; 'json': one caption picked at random from the .json 'captions' list
    when present, else the .txt."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """Passed to fsspec for remote URLs, e.g. {'endpoint_url': 'http://127.0.0.1:9000', 'anon': false}."""
    retries: int = 10
    """Most retries of a shard that fails to open or read (a transient error: network, server, a stalled
    read), before it is skipped and counted. A shard that is not there (FileNotFoundError, S3 NoSuchKey,
    HTTP 404) is not retried."""
    retry_max_s: float = 180.0
    """Most seconds a failing shard is retried for, from the start of its first failing attempt; with
    `retries` (whichever ends first) this rides out a storage outage of a minute or two."""
    retry_backoff: float = 1.0
    """Seconds before the first retry, doubled at each further one up to 30 s between tries."""
    read_timeout_s: float = 120.0
    """Seconds a shard's stream may deliver no byte before the read fails naming the shard (then it is
    retried like any failure); 0 disables the timeout (and the reader thread that enforces it)."""
    worker_timeout: float = 600.0
    """Seconds a worker may take to produce one batch before the loader fails instead of hanging."""

    def __post_init__(self):
        if self.modality not in ("image", "audio"):
            raise ConfigError(f"data.modality must be 'image' or 'audio', got {self.modality!r}")
        if self.decode not in ("cpu", "gpu"):
            raise ConfigError(f"data.decode must be 'cpu' or 'gpu', got {self.decode!r}")
        if self.modality == "audio" and self.decode == "gpu":
            raise ConfigError("data.decode=gpu decodes JPEG images; audio is decoded on the CPU (data.decode=cpu)")
        if self.caption_source not in ("txt", "json"):
            raise ConfigError(f"data.caption_source must be 'txt' or 'json', got {self.caption_source!r}")
        for key in ("batch_size",):
            if getattr(self, key) <= 0:
                raise ConfigError(f"data.{key} must be positive, got {getattr(self, key)}")
        for key in ("workers", "shuffle_buffer", "epoch_samples", "retries", "retry_max_s", "read_timeout_s",
                    "cache_max_gb"):
            if getattr(self, key) < 0:
                raise ConfigError(f"data.{key} must be >= 0, got {getattr(self, key)}")
        if self.retry_backoff < 0 or self.worker_timeout <= 0:
            raise ConfigError("data.retry_backoff must be >= 0 and data.worker_timeout positive")
        if any(w < 0 for w in self.weights) or (self.weights and sum(self.weights) <= 0):
            raise ConfigError(f"data.weights must be non-negative with a positive sum, got {self.weights}")
        if self.mixture and (self.train_urls or self.resampled or self.weights):
            raise ConfigError("data.mixture lists the training sources and their shares: leave data.train_urls and "
                              "data.weights empty, and data.resampled false (a mixture is taken without replacement)")
        if self.weights and self.train_urls:
            sources = len(self.train_urls.split("::"))
            if len(self.weights) != sources:
                raise ConfigError(
                    f"data.weights has {len(self.weights)} entries but data.train_urls has {sources} "
                    "'::'-separated sources"
                )
        for key in ("train_urls", "val_urls"):
            if "pipe:" in getattr(self, key) and not self.allow_pipe:
                raise ConfigError(f"data.{key} holds a 'pipe:' URL; set data.allow_pipe=true to run shell commands")


class Batch(NamedTuple):
    media: torch.Tensor
    """uint8 [B, 3, H, W] images (the model normalises them on the device: ContrastiveModel.encode_media)
    or float [B, n_mels, frames] log-mel audio."""
    tokens: torch.Tensor
    """long [B, context]."""
    keys: list[str]
    """Sample keys; '' where a slot holds no real sample (see `valid`). With several sources, '<source index>/<key>'
    (the index in data.mixture's list or the `::` list)."""
    labels: torch.Tensor
    """long [B]; -1 where a sample has no label or a slot no real sample."""
    valid: torch.Tensor | None = None
    """bool [B]: False where a slot holds no real sample (a bad or lost sample's slot in training, eval
    padding): its row repeats a real sample of the batch only so that shapes stay fixed, and must take no
    part in the loss (outputs["valid"], see pipeline.loss) nor in evaluation. The loader always sets it;
    None (a Batch built by hand) means every slot is real."""


# ----------------------------------------------------------------------------------------- URLs
# shard URLs and sizes: pipeline.data.shardindex (read once on rank 0, in parallel, and shared with every rank);
# the names stay importable from here
from pipeline.data.shardindex import (  # noqa: E402, F401
    SourceError,
    _warn_missing,
    expand_source,
    expand_urls,
    missing_listed_shards,
    prefetch_shard_index,
    read_shard_sizes,
    shard_index,
)


def source_error(cfg: DataConfig, setting: str, urls: str, error: Exception) -> ConfigError:
    """A failure to read the shards of data.<setting> (`urls`) as the user is told it: the setting and its
    value; for data.mixture the manifest file and, where one source is at fault (SourceError), its entry."""
    if setting == "mixture" and isinstance(error, SourceError):
        entry = mixture.read_manifest(cfg.mixture, cfg.storage_options)[error.position]
        return ConfigError(f"{entry.where} cannot be read: {error.reason}")
    if setting == "mixture":
        return ConfigError(f"data.mixture '{cfg.mixture}': its sources cannot be read: {error}")
    return ConfigError(f"data.{setting} '{urls}' cannot be read: {error}")


# --------------------------------------------------------------------------------- shard reading
GB = 10**9  # data.cache_max_gb counts decimal gigabytes, as its name says (not GiB)


def open_shard(url: str, cfg: DataConfig):
    """storage.open_shard with the loader's settings (storage options, cache, read timeout, pipes)."""
    return storage.open_shard(url, storage_options=cfg.storage_options, cache_dir=cfg.cache_dir,
                              cache_max_bytes=round(cfg.cache_max_gb * GB), read_timeout_s=cfg.read_timeout_s,
                              allow_pipe=cfg.allow_pipe)


@dataclass(frozen=True)
class Segment:
    """Samples [first, end) of one shard, which are samples [offset, offset + end - first) of a stream."""

    url: str
    first: int
    end: int
    offset: int
    size: int = 0
    """The shard's listed size (sizes.json): what a short tar is compared with."""


class _Entry(NamedTuple):
    index: int  # in the stream
    url: str
    key: str
    files: dict[str, bytes] | None  # None: lost, see reason
    reason: str

_warned: set[tuple[str, str]] = set()  # (what, shard) already told in this process


def _warn_once(what: str, url: str, message: str, *args) -> None:
    """A shard's problem is logged once per process, however many streams or epochs meet it."""
    if (what, url) not in _warned:
        _warned.add((what, url))
        log.warning(message, *args)


class _StreamReader:
    """Reads the needed samples of a stream's segments in order, with retries; yields one _Entry for
    every needed index, a lost sample as an entry without files and with the reason."""

    def __init__(self, cfg: DataConfig, counts: Counter, missing: frozenset[str] | set[str] = frozenset()):
        self.cfg = cfg
        self.counts = counts
        self.missing = missing  # shards known absent since the start: not opened, their samples lost
        self.quiet = False  # no log lines (a second read of the same shards)

    def _warn(self, what: str, url: str, message: str, *args) -> None:
        if not self.quiet:
            _warn_once(what, url, message, *args)

    def _log(self, message: str, *args) -> None:
        if not self.quiet:
            log.warning(message, *args)

    def read(self, segments: list[Segment], needed: np.ndarray) -> Iterator[_Entry]:
        for segment in segments:
            window = needed[segment.offset : segment.offset + segment.end - segment.first]
            if not window.any():
                continue  # whole shard already consumed: skipped by its count, never opened
            yield from self._read_segment(segment, needed)

    def _read_segment(self, segment: Segment, needed: np.ndarray) -> Iterator[_Entry]:
        next_index = segment.first  # first shard index not yet handled
        retry = storage.RetryBudget(self.cfg.retries, self.cfg.retry_max_s, self.cfg.retry_backoff)
        reason = "shard_not_found" if segment.url in self.missing else ""  # told at start: not again
        while next_index < segment.end and not reason:
            attempt_start, progress_from = time.monotonic(), next_index
            intact = 0  # samples of the tar got through in this read, from its start (read or skipped unread)
            try:
                with open_shard(segment.url, self.cfg) as stream:
                    def wanted(i, start=next_index):
                        return start <= i < segment.end and bool(needed[segment.offset + i - segment.first])

                    for sample in shardformat.iter_samples(stream, wanted):
                        intact = sample.index + 1
                        if sample.index < next_index:
                            continue
                        next_index = sample.index + 1
                        if sample.problem and wanted(sample.index):  # webdataset raises here: we skip the sample
                            yield _Entry(segment.offset + sample.index - segment.first, segment.url, sample.key,
                                         None, sample.problem)
                        elif sample.files is not None:
                            yield _Entry(segment.offset + sample.index - segment.first, segment.url, sample.key,
                                         sample.files, "")
                        if next_index >= segment.end:
                            break  # the segment is done: not a byte more of this shard
                if next_index < segment.end:
                    reason = "missing_from_shard"  # the tar holds fewer samples than sizes.json says
                    self.counts["shards_short"] += 1
                    self._warn("short", segment.url, "shard %s holds %d samples, but its listed size (sizes.json) "
                               "is %d: the %d missing ones are skipped", segment.url, next_index, segment.size,
                               segment.size - next_index)
            except (tarfile.TarError, EOFError) as error:
                # a damaged archive reads the same way every time: no retry
                reason = "truncated_shard"
                self.counts["shards_truncated"] += 1
                # `intact` counts from the tar's start; this stream's part of the shard may begin further on
                self._warn("damaged", segment.url, "shard %s is damaged after %d complete samples (%s): this stream "
                           "reads samples %d-%d of it (listed size %d), and skips %d-%d", segment.url, intact, error,
                           segment.first, segment.end - 1, segment.size, next_index, segment.end - 1)
            except ConfigError:
                raise
            except Exception as error:
                if storage.is_not_found(error):  # retrying will not bring it back
                    reason = "shard_not_found"
                    self.counts["shards_not_found"] += 1
                    self._warn("not found", segment.url, "shard %s not found (%s): its samples are skipped",
                               segment.url, error)
                    break
                # network, server, a stalled read: worth retrying
                if isinstance(error, storage.ShardReadTimeout):
                    self.counts["shard_timeouts"] += 1
                delay = retry.next_delay(attempt_start, progressed=next_index > progress_from)
                if delay is None:
                    reason = "shard_failed"
                    self.counts["shards_failed"] += 1
                    self._log("shard %s failed %d times in %.0f s (%s): skipped", segment.url, retry.attempt + 1,
                              retry.spent, storage.describe(error))
                    break
                self.counts["shard_retries"] += 1
                self._log("shard %s failed (%s); retry %d in %.1f s", segment.url, storage.describe(error),
                          retry.attempt, delay)
                time.sleep(delay)
        for index in range(next_index, segment.end):
            stream_index = segment.offset + index - segment.first
            if needed[stream_index]:
                yield _Entry(stream_index, segment.url, f"#{index}", None, reason)


# ---------------------------------------------------------------------------------- stream plans


def shuffle_order(length: int, buffer_size: int, rng: np.random.Generator, first: int | None = None) -> np.ndarray:
    """Emission order of items 0..length-1 read in order through a shuffle buffer of `buffer_size`:
    once full, each incoming item replaces a uniformly chosen one, which is emitted; the rest is
    emitted in random order at the end. Cheap enough to replay a whole stream on resume. With `first`,
    only the first `first` items of that order (the same ones), simulated no further than needed."""
    first = length if first is None else min(first, length)
    if buffer_size <= 1 or length <= 1:
        return np.arange(first, dtype=np.int64)
    order = np.empty(length, dtype=np.int64)
    picks = rng.random(length)
    buffer: list[int] = []
    emitted = 0
    for item in range(length):
        if emitted >= first:
            return order[:first]
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        slot = int(picks[item] * buffer_size)
        order[emitted] = buffer[slot]
        buffer[slot] = item
        emitted += 1
    order[emitted:] = rng.permutation(np.asarray(buffer, dtype=np.int64))
    return order[:first]


def _whole(shards: list[tuple[str, int]]) -> list[tuple[str, int, int, int]]:
    """(url, size) shards as pieces (url, first, end, shard size) covering each shard."""
    return [(url, 0, size, size) for url, size in shards]


def _segments_of_range(pieces: list[tuple[str, int, int, int]], start: int, end: int) -> list[Segment]:
    """Samples [start, end) of the pieces (url, first, end, shard size: samples [first, end) of a shard) laid
    end to end in a circle: positions past the last sample go on at the first piece again (end - start must
    not exceed the total)."""
    total = sum(stop - first for _, first, stop, _ in pieces)
    segments, offset = [], 0
    while start < end:  # at most twice: the range before the wrap and the range after it
        lap = start // total * total
        lap_end = min(end, lap + total)
        position = lap
        for url, first, stop, shard_size in pieces:
            size = stop - first
            lo, hi = max(start, position), min(lap_end, position + size)
            if lo < hi:
                segments.append(Segment(url, first + lo - position, first + hi - position, offset + lo - start,
                                        shard_size))
            position += size
            if position >= lap_end:
                break
        offset += lap_end - start
        start = lap_end
    return segments


@dataclass
class StreamPlan:
    segments: list[Segment]
    order: np.ndarray
    """Stream indices in emission order: a permutation of range(span), or after an elastic resume of part of it
    (the indices the segments cover but the stream does not read were consumed before the resume)."""
    batches: int
    """Batches this stream yields."""

    @property
    def span(self) -> int:
        """Stream indices the segments cover."""
        return sum(segment.end - segment.first for segment in self.segments)


@dataclass(frozen=True)
class Layout:
    """How an epoch was cut: world size, workers per rank, samples per batch (and the shuffle buffer)."""

    world_size: int
    workers: int
    batch_size: int
    shuffle_buffer: int

    @property
    def streams(self) -> int:
        return self.world_size * max(self.workers, 1)

    def consumed_batches(self, local_stream: int, batches_consumed: int) -> int:
        """Batches stream `local_stream` of a rank had yielded when the rank had consumed `batches_consumed`."""
        workers = max(self.workers, 1)
        return batches_consumed // workers + (1 if local_stream < batches_consumed % workers else 0)


# ------------------------------------------------------------------------------------- the dataset


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """torch.stack; in a DataLoader worker, straight into shared memory, so that handing the batch to
    the training process moves a file descriptor instead of copying the batch once more."""
    if get_worker_info() is None:
        return torch.stack(tensors)
    first = tensors[0]
    storage = first._typed_storage()._new_shared(len(tensors) * first.numel(), device=first.device)
    out = first.new(storage).resize_(len(tensors), *first.shape)
    return torch.stack(tensors, out=out)


# samples lost with their shard: the shard's own warning names it and the count, once
SHARD_REASONS = ("truncated_shard", "missing_from_shard", "shard_not_found", "shard_failed")


class _RateLimitedLog:
    """Every bad sample is counted; the first few of each reason are logged in full, then every 1000th
    (a sample lost with its shard is not: its shard was told)."""

    def __init__(self):
        self.seen = Counter()

    def __call__(self, reason: str, url: str, key: str, detail: str = "", skipped: bool = True):
        if reason in SHARD_REASONS:
            return
        self.seen[reason] += 1
        count = self.seen[reason]
        if count <= 10 or count % 1000 == 0:
            log.warning("%s sample %s in %s: %s%s (%d so far with this reason in this stream)",
                        "skipped" if skipped else "used", key, url, reason, f" ({detail})" if detail else "", count)


class StreamingDataset(IterableDataset):
    """The per-worker side: plans this worker's stream and yields (Batch, stats delta) pairs."""

    def __init__(self, cfg: DataConfig, sources: list[list[tuple[str, int]]], *, rank: int, world_size: int,
                 seed: int, media_transform, tokenizer, train: bool, image_size: int | None, weights: list[float],
                 missing: frozenset[str] = frozenset(), mixture_counts: list[int] | None = None):
        sources = [[shard for shard in source if shard[1] > 0] for source in sources]  # empty shards hold nothing
        if cfg.resampled and any(weight > 0 and not source for weight, source in zip(weights, sources)):
            raise ValueError("a data source with a positive weight holds no samples; drop it or give it weight 0")
        self.cfg, self.sources, self.rank, self.world_size = cfg, sources, rank, world_size
        self.seed, self.media_transform, self.tokenizer = seed, media_transform, tokenizer
        self.train, self.image_size, self.weights = train, image_size, weights
        self.missing = missing  # shard URLs found absent at start: never opened
        # data.decode=gpu: workers hand over JPEG bytes and crops, the training process decodes (imagedecode)
        self.device_crop = (imagedecode.DeviceCrop(media_transform)
                            if cfg.decode == "gpu" and train and cfg.modality == "image" else None)
        self.workers = max(cfg.workers, 1)
        self.streams = world_size * self.workers
        self.shards = [shard for source in sources for shard in source]
        self.total = sum(size for _, size in self.shards)
        # several sources (data.mixture, `::`): a sample's key is '<source index>/<key in its shard>', so that the
        # keys of sets that number their samples alike (every set `shards build` makes starts at 000000000)
        # stay apart in Batch.keys and the logged keys
        self.source_of = ({url: index for index, source in reversed(list(enumerate(sources))) for url, _ in source}
                          if len(sources) > 1 else {})
        # data.mixture: samples of each source in every epoch (pipeline.data.mixture); the epoch holds their sum
        self.mixture_counts = mixture_counts if train else None
        self.epoch_total = sum(mixture_counts) if self.mixture_counts else self.total
        # elastic resume: (epoch, [(layout, batches consumed), ...]): the layouts that read part of `epoch`
        # before this one, oldest first; the rest of that epoch is laid out over this layout's streams
        self.elastic: tuple[int, list[tuple[Layout, int]]] | None = None
        self._elastic_slices: dict[int, tuple[int, list[np.ndarray], int]] = {}
        # (epoch, first batch to yield): written by the loader before each pass, read by the workers
        self.position = torch.zeros(2, dtype=torch.int64).share_memory_()
        if train:
            samples = (cfg.epoch_samples or self.total) if cfg.resampled else self.epoch_total
            self.stream_batches = samples // (self.streams * cfg.batch_size)
            if self.stream_batches == 0:
                what = f"the mixture of data.mixture '{cfg.mixture}'" if self.mixture_counts else "the data set"
                raise ValueError(
                    f"{what} has {samples} samples, fewer than one batch per stream: "
                    f"world_size {world_size} x workers {self.workers} x batch_size {cfg.batch_size} = "
                    f"{self.streams * cfg.batch_size} needed; lower data.batch_size or data.workers"
                )
            # samples not read in an epoch (one pass over the shards): the end of the laid-out circle
            self.remainder = 0 if cfg.resampled else self.epoch_total - self.streams * self.stream_batches * cfg.batch_size
        else:
            self.remainder = 0
            if self.total < self.streams:
                raise ValueError(f"the eval set has {self.total} samples, fewer than the {self.streams} streams "
                                 f"(world_size x workers); lower data.workers")
            self.stream_batches = math.ceil(math.ceil(self.total / self.streams) / cfg.batch_size)

    # --- plans
    @property
    def layout(self) -> Layout:
        return Layout(self.world_size, self.workers, self.cfg.batch_size, self.cfg.shuffle_buffer)

    def _is_elastic(self, epoch: int) -> bool:
        return self.train and self.elastic is not None and self.elastic[0] == epoch

    def batches_in(self, epoch: int) -> int:
        """Batches each stream yields in `epoch` (fewer in an epoch resumed on another layout)."""
        if self._is_elastic(epoch):
            return len(self._slices(epoch)[1][0]) // self.cfg.batch_size
        return self.stream_batches

    def remainder_of(self, epoch: int) -> int:
        """Samples of `epoch` no stream reads (in an elastic epoch: of the part left at the resume)."""
        return self._slices(epoch)[2] if self._is_elastic(epoch) else self.remainder

    def source_counts(self, epoch: int) -> list[int] | None:
        """Samples each source gives the streams in `epoch` as planned on this layout (its share, less what
        falls in the epoch's remainder). An epoch resumed elastically is not broken down: its plan replays
        several layouts: None."""
        if self._is_elastic(epoch):
            return None
        start, length = self._cut(epoch, self.layout)
        end, total = start + self.layout.streams * length, self.epoch_total
        counts, position = [0] * len(self.sources), 0
        for url, first, last, _ in self._pieces(epoch):
            size = last - first
            # the read window is [start, end) on the circle of the epoch's positions: it may wrap past its end
            for low, high in ((start, end), (start - total, end - total)):
                counts[self.source_of.get(url, 0)] += max(0, min(position + size, high) - max(position, low))
            position += size
        return counts

    def _pieces(self, epoch: int) -> list[tuple[str, int, int, int]]:
        """The epoch's shard pieces in their (seed, epoch) order, end to end."""
        if self.mixture_counts:  # each source's share of this epoch (pipeline.data.mixture)
            return mixture.epoch_pieces(self.sources, self.mixture_counts, self.seed, epoch)
        permutation = randomness.generator(self.seed, "shard_order", epoch).permutation(len(self.shards))
        return _whole([self.shards[i] for i in permutation])

    def _cut(self, epoch: int, layout: Layout) -> tuple[int, int]:
        """(first position in the circle, samples per stream) of `epoch` laid out over `layout`'s streams."""
        length = self.epoch_total // (layout.streams * layout.batch_size) * layout.batch_size
        # the dropped remainder moves on by its own length every epoch (module docstring, step 2)
        return epoch * (self.epoch_total - layout.streams * length) % self.epoch_total, length

    def _layer_order(self, epoch: int, layer: int, stream: int, layout: Layout, length: int,
                     first: int | None = None) -> np.ndarray:
        """Emission order (positions in the stream) of `stream` of layer `layer` of an epoch: layer 0 is the
        epoch's own layout (the order every plan uses), later layers are elastic resumes."""
        draws = (randomness.generator(self.seed, "shuffle_buffer", epoch, stream) if layer == 0
                 else randomness.generator(self.seed, "elastic_shuffle_buffer", epoch, stream, layer))
        return shuffle_order(length, layout.shuffle_buffer, draws, first)

    def _slices(self, epoch: int) -> tuple[int, list[np.ndarray], int]:
        """Elastic epoch: (circle start, the positions each of this layout's streams reads, samples left
        unread). Positions count from the circle start of the epoch's first layout. The samples each earlier
        layout consumed are replayed from its plans (their shuffle orders, no further than consumed); what is
        left, in circle order, is cut into this layout's streams like a data set of its own. Holds one int64 per
        sample of the epoch while it computes (8 bytes x epoch size, once per process)."""
        if epoch in self._elastic_slices:
            return self._elastic_slices[epoch]
        chain = self.elastic[1]
        start, length = self._cut(epoch, chain[0][0])
        remaining = np.arange(chain[0][0].streams * length, dtype=np.int64)
        layers = [layout for layout, _ in chain] + [self.layout]
        for layer, layout in enumerate(layers):
            if layer == 0:
                slices = [remaining[s * length:(s + 1) * length] for s in range(layout.streams)]
            else:
                per = len(remaining) // (layout.streams * layout.batch_size) * layout.batch_size
                slices = [remaining[s * per:(s + 1) * per] for s in range(layout.streams)]
            if layer == len(chain):
                left = len(remaining) - sum(len(piece) for piece in slices)
                self._elastic_slices[epoch] = (start, slices, left)
                return self._elastic_slices[epoch]
            consumed = []
            for stream, positions in enumerate(slices):
                take = layout.consumed_batches(stream % max(layout.workers, 1), chain[layer][1]) * layout.batch_size
                if take:
                    consumed.append(positions[self._layer_order(epoch, layer, stream, layout, len(positions), take)])
            if consumed:
                remaining = np.setdiff1d(remaining, np.concatenate(consumed), assume_unique=True)
        raise AssertionError("unreachable")

    def _elastic_plan(self, epoch: int, stream: int) -> StreamPlan:
        start, slices, _ = self._slices(epoch)
        positions = slices[stream]
        if not len(positions):
            return StreamPlan([], np.zeros(0, dtype=np.int64), 0)
        low = int(positions[0])
        segments = _segments_of_range(self._pieces(epoch), start + low, start + int(positions[-1]) + 1)
        order = self._layer_order(epoch, len(self.elastic[1]), stream, self.layout, len(positions))
        return StreamPlan(segments, (positions - low)[order], len(positions) // self.cfg.batch_size)

    def plan(self, epoch: int, stream: int) -> StreamPlan:
        batch = self.cfg.batch_size
        if self._is_elastic(epoch):
            return self._elastic_plan(epoch, stream)
        if not self.train:
            start, end = stream * self.total // self.streams, (stream + 1) * self.total // self.streams
            segments = _segments_of_range(_whole(self.shards), start, end)
            return StreamPlan(segments, np.arange(end - start, dtype=np.int64), self.stream_batches)
        length = self.stream_batches * batch
        if self.cfg.resampled:
            draws = randomness.generator(self.seed, "resampled_shards", epoch, stream)
            probabilities = np.asarray(self.weights, dtype=np.float64)
            probabilities /= probabilities.sum()
            segments, filled = [], 0
            while filled < length:
                source = self.sources[draws.choice(len(self.sources), p=probabilities)]
                url, size = source[draws.integers(len(source))]
                take = min(size, length - filled)
                if take > 0:
                    segments.append(Segment(url, 0, take, filled, size))
                    filled += take
        else:
            start, _ = self._cut(epoch, self.layout)
            start += stream * length
            segments = _segments_of_range(self._pieces(epoch), start, start + length)
        return StreamPlan(segments, self._layer_order(epoch, 0, stream, self.layout, length), self.stream_batches)

    # --- decoding
    def _sample_seed(self, epoch: int, stream: int, index: int) -> int:
        return randomness.seed_int(self.seed, "sample", epoch, stream, index)

    def _decode(self, entry: _Entry, sample_seed: int, note) -> tuple | None:
        """-> (media, caption, label), or None when the sample is bad (counted and logged)."""
        files = entry.files
        if files is None:  # a sample webdataset raises on says what is wrong with it; one lost with its shard was told
            note(entry.reason, entry.url, entry.key, shardformat.PROBLEMS.get(entry.reason, ""))
            return None
        extensions = shardformat.IMAGE_FIELDS if self.cfg.modality == "image" else shardformat.AUDIO_FIELDS
        media_ext = next((ext for ext in extensions if ext in files), None)
        if media_ext is None:
            note("missing_media", entry.url, entry.key)
            return None
        metadata = {}
        if "json" in files:
            try:
                metadata = json.loads(files["json"])
            except ValueError as error:  # not JSON, or not UTF-8: the sample goes on without label / captions
                note("metadata_unreadable", entry.url, entry.key, f"{type(error).__name__}: {error}", skipped=False)
                metadata = {}
        picker = random.Random(sample_seed)
        captions = metadata.get("captions") if isinstance(metadata, dict) else None
        if self.cfg.caption_source == "json" and isinstance(captions, list) and captions:
            caption = str(picker.choice(captions))
        elif "txt" in files:
            try:
                caption = files["txt"].decode("utf-8").strip()
            except UnicodeDecodeError as error:  # replacement characters would train on noise
                note("bad_caption", entry.url, entry.key, f"not UTF-8: {error}")
                return None
        else:
            caption = ""
        if not caption:
            note("missing_caption", entry.url, entry.key)
            return None
        label = metadata.get("label", -1) if isinstance(metadata, dict) else -1
        label = label if isinstance(label, int) and not isinstance(label, bool) else -1
        try:
            media = self._decode_media(files[media_ext], sample_seed)
        except Exception as error:
            note("corrupt_media", entry.url, entry.key, f"{type(error).__name__}: {error}")
            return None
        return media, caption, label

    def _decode_media(self, data: bytes, sample_seed: int) -> torch.Tensor:
        if self.cfg.modality == "audio":
            from pipeline.media.audio import decode_audio

            waveform, rate = decode_audio(data)
            generator = torch.Generator().manual_seed(sample_seed) if self.train else None
            return self.media_transform(waveform, rate, generator)
        from PIL import Image

        if self.device_crop is not None:
            header = imagedecode.probe_jpeg(data)  # only the header: no pixel decoded here
            if header is not None:
                with torch.random.fork_rng(devices=[]):  # the draws the CPU path's RandomResizedCrop makes
                    torch.default_generator.manual_seed(sample_seed)
                    return imagedecode.EncodedJpeg(data, self.device_crop.box(header))
        image = Image.open(io.BytesIO(data))
        if self.image_size and image.format == "JPEG" and self.cfg.jpeg_draft:
            # decode at 1/2, 1/4 or 1/8 scale when that still covers the target size
            image.draft("RGB", (self.image_size, self.image_size))
        if image.mode != "RGB":  # convert() copies even an RGB image: a full-size copy per sample saved
            image = image.convert("RGB")
        # per-sample seed: the augmentation of a sample is the same after a resume; fork_rng keeps the
        # caller's RNG untouched when workers=0 reads in the training process
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only: torch.manual_seed also queues CUDA seeding, 3 ms a call
            torch.default_generator.manual_seed(sample_seed)
            random.seed(sample_seed)
            return self.media_transform(image)

    def _collate(self, samples: list[tuple], keys: list[str]) -> Batch:
        if self.device_crop is not None:
            media = imagedecode.collate([sample[0] for sample in samples], self.device_crop.size)
        else:
            media = _stack([sample[0] for sample in samples])
        tokens = self.tokenizer([sample[1] for sample in samples])
        labels = torch.tensor([sample[2] for sample in samples], dtype=torch.long)
        return Batch(media, tokens, keys, labels, torch.tensor([key != "" for key in keys], dtype=torch.bool))

    # --- iteration
    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        epoch, start_batch = (int(v) for v in self.position.tolist())
        # The DataLoader asks worker 0 first; batch `start_batch` belongs to stream start_batch mod W,
        # so worker w serves stream (w + start_batch) mod W and the round-robin order is unchanged.
        local_stream = (worker + start_batch) % self.workers
        done = start_batch // self.workers + (1 if local_stream < start_batch % self.workers else 0)
        stream = self.rank * self.workers + local_stream
        yield from self.stream_batches_from(epoch, stream, done)
        while self.train:
            # a training stream goes on into the next epoch: the DataLoader keeps prefetching across the
            # boundary, so the first step of an epoch waits no longer than any other (StreamingLoader)
            epoch += 1
            yield from self.stream_batches_from(epoch, stream, 0)

    def stream_batches_from(self, epoch: int, stream: int, done: int) -> Iterator[tuple[Batch, dict]]:
        plan = self.plan(epoch, stream)
        batch_size = self.cfg.batch_size
        length = plan.span
        counts: Counter = Counter()
        note = _RateLimitedLog()

        def count_bad(reason, url, key, detail="", skipped=True):
            counts[f"skipped_{reason}" if skipped else reason] += 1
            note(reason, url, key, detail, skipped)

        needed = np.zeros(length, dtype=bool)
        remaining = plan.order[done * batch_size :]
        needed[remaining] = True
        entries = _StreamReader(self.cfg, counts, self.missing).read(plan.segments, needed)
        pending: dict[int, _Entry] = {}
        last_good: list[tuple] = []  # good samples of the latest batch that had any (fill source)
        for batch_index in range(done, plan.batches):
            targets = plan.order[batch_index * batch_size : (batch_index + 1) * batch_size]
            good, keys, holes = [], [], 0
            for target in targets:
                while target not in pending:
                    entry = next(entries)
                    pending[entry.index] = entry
                entry = pending.pop(int(target))
                sample = self._decode(entry, self._sample_seed(epoch, stream, int(target)), count_bad)
                if sample is None:
                    holes += 1
                    continue
                good.append(sample)
                keys.append(f"{self.source_of[entry.url]}/{entry.key}" if self.source_of else entry.key)
                if self.device_crop is not None and isinstance(sample[0], torch.Tensor):
                    counts["decoded_on_cpu"] += 1  # not a JPEG the device decodes: the worker did
            counts["samples_read"] += len(good)
            real = list(zip(good, keys))
            padding = holes if self.train else batch_size - len(good)
            if real:
                last_good = real
            elif padding and not last_good:
                last_good = self._fill_source(plan, epoch, stream, batch_index)
            for hole in range(padding):
                # a slot without a real sample: a real sample's tensors (fixed shapes), marked by an empty
                # key (-> Batch.valid False) and no label; the loss and evaluation leave the row out
                sample, _key = (real or last_good)[hole % len(real or last_good)]
                good.append((sample[0], sample[1], -1))
                keys.append("")
            if padding:
                counts["samples_filled" if self.train else "samples_padded"] += padding
            yield self._collate(good, keys), dict(counts)
            counts.clear()

    def _fill_source(self, plan: StreamPlan, epoch: int, stream: int, batch_index: int) -> list[tuple]:
        """Good samples of the nearest earlier batch of this stream that has any, else the nearest later
        one, else the first batch of another stream (in stream order) that has any: read again by
        position, so a resumed run fills a bad batch exactly as an uninterrupted one. Only their tensors
        are used (the slots are marked invalid); failing shards are tried once, not retried."""
        batch_size = self.cfg.batch_size
        reader = _StreamReader(dataclasses.replace(self.cfg, retries=0), Counter(), set(self.missing))
        reader.quiet = True  # these shards were read (and their problems told) for the batches themselves
        unreadable: list[str] = []  # shards that failed in this search: not opened again
        candidates = [(stream, plan, b) for b in [*range(batch_index - 1, -1, -1), *range(batch_index + 1, plan.batches)]]
        for other in [*range(stream + 1, self.streams), *range(stream)]:
            other_plan = self.plan(epoch, other)
            candidates += [(other, other_plan, b) for b in range(other_plan.batches)]
        for source_stream, source_plan, candidate in candidates:
            targets = source_plan.order[candidate * batch_size : (candidate + 1) * batch_size]
            needed = np.zeros(source_plan.span, dtype=bool)
            needed[targets] = True
            found = []
            for entry in reader.read(source_plan.segments, needed):
                if entry.reason in ("shard_failed", "shard_not_found") and entry.url not in reader.missing:
                    reader.missing.add(entry.url)
                    unreadable.append(entry.url)
                    if len(unreadable) >= 3:  # the storage is down, not a shard: say so instead of trying them all
                        raise RuntimeError(f"no sample can be read to stand in for the lost ones of stream {stream}, "
                                           f"epoch {epoch}: shards {', '.join(unreadable)} all fail")
                seed = self._sample_seed(epoch, source_stream, entry.index)
                sample = self._decode(entry, seed, lambda *args, **kwargs: None)
                if sample is not None:
                    found.append((entry.index, sample, entry.key))
            if found:
                # in emission order, as the batch itself would have held them
                rank_in_batch = {int(t): i for i, t in enumerate(targets)}
                found.sort(key=lambda item: rank_in_batch[item[0]])
                return [(sample, key) for _, sample, key in found]
        raise RuntimeError(f"epoch {epoch} holds no decodable sample in any stream; check the shards: "
                           + ", ".join(sorted({url for url, _ in self.shards})))


# ------------------------------------------------------------------------------------- the loader


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)  # one core per worker: decoding is parallel across workers, not inside one
    # a stop signal sent to the job's whole process tree must not kill a worker while its rank finishes the
    # step and saves (deepspeed's launch.py signals every descendant); the rank stops its workers itself
    ignore_stop_signals()


_open_loaders: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_open_loaders() -> None:
    """At exit multiprocessing ends daemon children with SIGTERM and waits for them: our workers ignore it, so
    stop them in order first (a loader that an exception's traceback keeps alive is still open here), then
    kill what is left. Registered after multiprocessing's own exit hook, so it runs before it."""
    for loader in list(_open_loaders):
        loader.close()
    for child in torch.multiprocessing.active_children():
        if child.daemon:
            child.kill()
            child.join()


STAT_MEANINGS = {
    "samples_read": "real samples delivered",
    "samples_filled": "training slots without a real sample (Batch.valid False, left out of the loss): one per "
                      "skipped sample",
    "samples_padded": "evaluation slots past the end of a stream's range, or of a skipped sample (left out of the "
                      "figures)",
    "samples_remainder": "samples not read: the end of an epoch that does not fill one more batch on every "
                         "stream (counted once per epoch started; the next epoch drops a different stretch)",
    "samples_not_found": "samples of shards listed in a directory's sizes.json but absent: left out (rank 0, at "
                         "start)",
    "skipped_corrupt_media": "samples skipped: the media does not decode",
    "skipped_missing_media": "samples skipped: no image/audio member",
    "skipped_missing_caption": "samples skipped: no caption, or an empty one",
    "skipped_bad_caption": "samples skipped: a .txt caption that is not UTF-8",
    "skipped_duplicate_member": "samples skipped: a field twice in one sample (x.jpg twice), which webdataset "
                                "refuses",
    "skipped_reserved_field": "samples skipped: a member named like webdataset's own entries (x.__key__, "
                              "x.__url__), which webdataset refuses",
    "skipped_truncated_shard": "samples lost after the point where a tar is damaged",
    "skipped_missing_from_shard": "samples lost: the tar holds fewer samples than listed",
    "skipped_shard_not_found": "samples lost: their shard is not there",
    "skipped_shard_failed": "samples lost: their shard still failed after its retries",
    "metadata_unreadable": "samples used without their .json (not JSON or not UTF-8): no label, .txt caption",
    "shards_not_found": "shards found missing: at start (rank 0), or by a reader when it opened the shard",
    "shards_failed": "shard reads given up after their retries",
    "shards_truncated": "shard reads that met a damaged tar",
    "shards_short": "shard reads that met a tar with fewer samples than listed",
    "shard_retries": "retries of failed shard reads",
    "shard_timeouts": "shard reads that delivered nothing for data.read_timeout_s",
    "decoded_on_cpu": "images data.decode=gpu left to the CPU (not JPEG, CMYK, or rejected by nvJPEG)",
}
"""Every counter of `StreamingLoader.stats` and what it counts, in words (the trainer's closing summary prints
them). A shard that several streams read, or that is read again in later epochs, counts in shards_* each
time it is read; samples count once per epoch they are lost in."""
STAT_KEYS = tuple(STAT_MEANINGS)


def sum_stats_across_ranks(stats: dict[str, int]) -> dict[str, int]:
    """Every STAT_KEYS counter of `stats` (a rank's `loader.stats`) summed over all ranks with one
    all_reduce (gloo or NCCL), every key present. A collective: every rank must call it at the same
    point. Without an initialised process group (or with one rank) it returns the local counters."""
    import torch.distributed as dist

    local = {key: int(stats.get(key, 0)) for key in STAT_KEYS}
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    values = torch.tensor([local[key] for key in STAT_KEYS], dtype=torch.int64, device=device)
    dist.all_reduce(values)
    return dict(zip(STAT_KEYS, values.tolist()))


class StreamingLoader:
    """Iterable of Batch; `len()` batches per epoch on every rank; position (epoch, batches consumed).

    Iterating yields the rest of the current epoch and then moves the loader to the next epoch, so
    `while True: yield from loader` streams epoch after epoch. `stats` holds this rank's counters, every
    one of STAT_KEYS (0 until it happens); `sum_stats_across_ranks(loader.stats)` adds up all ranks'.
    """

    def __init__(self, dataset: StreamingDataset, cfg: DataConfig, fingerprint: str,
                 device: torch.device | str | None = None):
        self.dataset, self.cfg, self.fingerprint = dataset, cfg, fingerprint
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.epoch, self.batches_consumed = 0, 0
        # the DataLoader iterator in use and the position (epoch, batch) it yields next: a training stream
        # runs on into the next epoch (StreamingDataset.__iter__), so the next epoch continues it
        self._live: Iterator | None = None
        self._live_next: tuple[int, int] | None = None
        # data.decode=gpu: hand out batches with their images still encoded (DeferredImages), decoded by
        # `materialize` when a pass needs them; GradCache sets it, so a step of k micro-batches holds k
        # batches of JPEG bytes rather than k batches of pixels (a million 224-px images: 147 GiB of pixels)
        self.defer_decode = False
        self.stats: dict[str, int] = Counter(dict.fromkeys(STAT_KEYS, 0))
        self._loader = self._data_loader()
        _open_loaders.add(self)

    def _data_loader(self) -> DataLoader:
        """A DataLoader over the dataset as it is now (its workers get a copy of it when they start)."""
        cfg = self.cfg
        return DataLoader(
            self.dataset, batch_size=None, num_workers=cfg.workers, persistent_workers=cfg.workers > 0,
            pin_memory=torch.cuda.is_available(), worker_init_fn=_worker_init if cfg.workers else None,
            timeout=cfg.worker_timeout if cfg.workers else 0,
            # its own generator: otherwise every new iterator draws from the global torch RNG, and a resumed
            # run (which restores that RNG before its first iterator) would continue it from another position
            generator=torch.Generator(),
        )

    def __len__(self) -> int:
        """Batches of the current epoch on this rank (the same every epoch, except one resumed elastically)."""
        return self.dataset.batches_in(self.epoch) * self.dataset.workers

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its beginning, unless it is the epoch the loader is already in (resume)."""
        if epoch != self.epoch:
            self.epoch, self.batches_consumed = epoch, 0

    def __iter__(self) -> Iterator[Batch]:
        total = len(self)
        if self.batches_consumed < total:
            if self.batches_consumed == 0 and self.dataset.rank == 0:  # counted once over the ranks
                self.stats["samples_remainder"] += self.dataset.remainder_of(self.epoch)
            if self._live is None or self._live_next != (self.epoch, self.batches_consumed):
                self.dataset.position[0] = self.epoch  # read by the workers when the iterator (re)starts
                self.dataset.position[1] = self.batches_consumed
                self._live = iter(self._loader)
            batches = self._live
            while True:
                try:
                    batch, delta = next(batches)
                except StopIteration:
                    break
                except RuntimeError as error:
                    if "timed out" not in str(error):
                        raise
                    raise RuntimeError(f"{error}: {self._waited_on()}; raise data.worker_timeout if the "
                                       "storage is only slow") from error
                self.stats.update(delta)
                if isinstance(batch.media, imagedecode.EncodedImages):
                    batch = (batch._replace(media=DeferredImages(batch.media, self)) if self.defer_decode
                             else self._decode_on_device(batch))
                self.batches_consumed += 1  # before yielding: a state taken now counts this batch
                self._live_next = (self.epoch, self.batches_consumed)
                yield batch
                if self.batches_consumed >= total:
                    break
        self.epoch, self.batches_consumed = self.epoch + 1, 0
        if self.dataset.train:
            self._live_next = (self.epoch, 0)
        else:  # an eval stream ends with its range: the next pass starts a new iterator
            self._live = self._live_next = None

    def _decode_on_device(self, batch: Batch, count: bool = True) -> Batch:
        """data.decode=gpu: the batch's JPEGs decoded, cropped and resized on `self.device`. A row no
        decoder reads loses its sample like a corrupt one in a worker: marked invalid, counted, filled.
        The same every time for the same batch (`count`: whether this time counts in the stats)."""
        media, failed, on_cpu = imagedecode.decode(batch.media, self.dataset.device_crop, self.device)
        if count:
            self.stats["decoded_on_cpu"] += on_cpu
        if not failed:
            return batch._replace(media=media)
        keys, labels, valid = list(batch.keys), batch.labels.clone(), batch.valid.clone()
        for row in failed:
            if count:
                log.warning("skipped sample %s: corrupt_media (no decoder reads its JPEG)", keys[row])
            keys[row], labels[row], valid[row] = "", -1, False
        good = valid.nonzero().flatten().tolist()
        for index, row in enumerate(failed):
            if good:  # a real sample's pixels (fixed shapes); the slot is marked invalid
                media[row] = media[good[index % len(good)]]
        if count:
            self.stats["skipped_corrupt_media"] += len(failed)
            self.stats["samples_read"] -= len(failed)
            self.stats["samples_filled"] += len(failed)
        return Batch(media, batch.tokens, keys, labels, valid)

    def _waited_on(self) -> str:
        """Which shards the batch that did not come was to be read from (for the DataLoader's timeout)."""
        dataset, batch = self.dataset, self.batches_consumed
        stream = dataset.rank * dataset.workers + batch % dataset.workers
        plan = dataset.plan(self.epoch, stream)
        size = self.cfg.batch_size
        targets = plan.order[batch // dataset.workers * size : (batch // dataset.workers + 1) * size]
        urls = sorted({seg.url for seg in plan.segments for t in targets.tolist()
                       if seg.offset <= t < seg.offset + seg.end - seg.first})
        return f"epoch {self.epoch} batch {batch} (stream {stream}) was to be read from {', '.join(urls)}"

    def close(self) -> None:
        """Stop the workers now. A run that stops on a signal cannot leave this to the garbage collector (the
        exception's traceback keeps the loader alive until interpreter exit), and at exit multiprocessing ends
        daemon workers with SIGTERM, which they ignore (`_worker_init`): they would be waited on for ever."""
        live, self._live, self._live_next = self._live, None, None
        self._loader._iterator = None  # persistent workers: the DataLoader keeps its iterator too
        if live is None:
            return
        workers = list(getattr(live, "_workers", ()))  # torch's multi-process iterator; none with workers=0
        shutdown = getattr(live, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()  # what the iterator's __del__ does: each worker is told to exit and joined (5 s at most)
        for worker in workers:
            if worker.is_alive():  # stuck in a read past the orderly shutdown
                worker.kill()
                worker.join()

    def state_dict(self) -> dict[str, Any]:
        dataset = self.dataset
        elastic = dataset.elastic[1] if dataset._is_elastic(self.epoch) else []
        return {
            "epoch": self.epoch, "batches_consumed": self.batches_consumed, "seed": dataset.seed,
            "world_size": dataset.world_size, "workers": dataset.workers,
            "batch_size": self.cfg.batch_size, "shuffle_buffer": self.cfg.shuffle_buffer,
            "resampled": self.cfg.resampled, "weights": list(dataset.weights), "dataset": self.fingerprint,
            # the layouts that read part of this epoch before this one (an elastic resume), oldest first
            "elastic": [[*dataclasses.astuple(layout), consumed] for layout, consumed in elastic],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position. With the same layout (world size, workers, batch size) the batches
        are exactly those of the uninterrupted run. With another layout (an elastic resume) the samples the saved
        run consumed in its epoch are replayed from its plan, and the rest of that epoch is laid out over this
        layout's streams: no sample of the epoch is read twice and none is skipped except the new remainder
        (fewer than one batch per stream, counted in samples_remainder); the next epochs are this layout's."""
        mine = self.state_dict()
        for key in ("seed", "resampled", "weights", "dataset"):
            if state.get(key) != mine[key]:
                what = "data set (shard names and sizes)" if key == "dataset" else key
                raise ValueError(
                    f"cannot resume the data position: the saved loader state has {what} {state.get(key)!r}, "
                    f"this loader has {mine[key]!r}; resuming needs the same seed, mode and data set (or start "
                    "the data at a new epoch)"
                )
        epoch, consumed = int(state["epoch"]), int(state["batches_consumed"])
        saved = Layout(int(state["world_size"]), int(state["workers"]), int(state["batch_size"]),
                       int(state.get("shuffle_buffer", self.cfg.shuffle_buffer)))
        chain = [(Layout(*(int(v) for v in layer[:4])), int(layer[4])) for layer in state.get("elastic", [])]
        if saved != self.dataset.layout:
            if self.cfg.resampled or not self.dataset.train:
                # drawn with replacement: nothing to replay; the next epoch starts on this layout
                log.warning("data position saved with %s, resumed with %s: resampled mode starts epoch %d afresh",
                            saved, self.dataset.layout, epoch + (consumed > 0))
                epoch, consumed, chain = epoch + (consumed > 0), 0, []
            elif consumed or chain:
                chain = [*chain, (saved, consumed)]
                consumed = 0
        self.dataset.elastic = (epoch, chain) if chain else None
        self.dataset._elastic_slices.clear()
        self._loader, self._live, self._live_next = self._data_loader(), None, None  # workers see the new plan
        self.epoch = epoch
        if not 0 <= consumed <= len(self):
            raise ValueError(f"saved batches_consumed {consumed} is outside 0..{len(self)}")
        self.batches_consumed = consumed
        if chain and self.dataset.rank == 0:
            log.info("elastic resume of epoch %d: %s; this layout reads the rest in %d batches per rank (%d "
                     "samples left over)", epoch, ", then ".join(f"{layout} consumed {n} batches per rank"
                                                                 for layout, n in chain),
                     len(self), self.dataset.remainder_of(epoch))


class DeferredImages:
    """A batch's images still encoded (StreamingLoader.defer_decode): `materialize(batch)` decodes them on
    the loader's device, each time a pass needs them; the first time counts in the loader's stats."""

    def __init__(self, encoded: imagedecode.EncodedImages, loader: StreamingLoader):
        self.encoded, self.loader, self.counted = encoded, loader, False

    def __len__(self) -> int:
        return len(self.encoded)


def materialize(batch: Batch) -> Batch:
    """The batch with its images decoded when the loader deferred them (else the batch itself). Decoding
    is deterministic, so every call gives the same pixels and the same `valid` rows."""
    if not isinstance(batch.media, DeferredImages):
        return batch
    deferred = batch.media
    decoded = deferred.loader._decode_on_device(batch._replace(media=deferred.encoded), count=not deferred.counted)
    deferred.counted = True
    return decoded


def build_loader(cfg: DataConfig, urls: str, *, rank: int, world_size: int, seed: int, media_transform,
                 tokenizer, train: bool = True, image_size: int | None = None,
                 device: torch.device | str | None = None) -> StreamingLoader:
    """A loader over `urls` for this rank; `media_transform` and `tokenizer` come from the model side.
    `device`: where data.decode=gpu decodes (default CUDA when present, else the CPU). With data.mixture set, a
    training loader reads the manifest's sources (`urls` is not used)."""
    manifest = mixture.read_manifest(cfg.mixture, cfg.storage_options) if cfg.mixture and train else None
    if manifest:
        urls = "::".join(source.urls for source in manifest)
    if not urls:
        raise ConfigError("no shard URLs given (data.train_urls / data.val_urls is empty)")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    # read on rank 0 and broadcast: every rank calls build_loader at the same point (a collective)
    try:
        index = shard_index(urls, cfg.storage_options, world_size=world_size)
    except SourceError as error:
        if manifest:  # the user wrote the manifest's entries, not this '::' list: name the entry
            raise source_error(cfg, "mixture", urls, error) from None
        raise
    shard_urls, sizes, left_out, absent = index.sources, index.sizes, index.left_out, index.absent
    absent = [(url, size) for url, size in absent if size > 0]  # a counted shard that was not there is told
    if rank == 0:  # every rank finds the same: one of them tells
        _warn_missing(left_out, absent)
    sources = [[(url, sizes[url]) for url in source] for source in shard_urls]
    weights = list(cfg.weights) or [1.0] * len(sources)
    if len(weights) != len(sources):
        raise ConfigError(f"data.weights has {len(weights)} entries for {len(sources)} sources in '{urls}'")
    counts = None
    if manifest:
        counts = mixture.epoch_counts(manifest, [sum(n for _, n in source) for source in sources], cfg.epoch_samples)
        if rank == 0:
            log.info("data.mixture %s: samples per epoch %s", cfg.mixture,
                     ", ".join(f"{source.urls}: {count}" for source, count in zip(manifest, counts)))
    names = json.dumps([[(storage.base_name(u), n) for u, n in source] for source in sources])
    names += json.dumps(counts) if counts else ""  # a mixture's shares are part of what the data set is
    fingerprint = hashlib.sha1(names.encode()).hexdigest()[:16]
    dataset = StreamingDataset(cfg, sources, rank=rank, world_size=world_size, seed=seed,
                               media_transform=media_transform, tokenizer=tokenizer, train=train,
                               image_size=image_size, weights=weights, missing=frozenset(url for url, _ in absent),
                               mixture_counts=counts)
    loader = StreamingLoader(dataset, cfg, fingerprint, device)
    if rank == 0:  # found once for the whole data set: counted on one rank
        loader.stats["shards_not_found"] += len(left_out) + len(absent)
        loader.stats["samples_not_found"] += sum(size for _, size in left_out)
    return loader
