"""Streaming loader: WebDataset tar shards -> equal, deterministic, resumable batches on every rank.

    loader = build_loader(cfg.data, cfg.data.train_urls, rank=rank, world_size=world_size, seed=cfg.seed,
                          media_transform=media_transform(cfg.model, True), tokenizer=get_tokenizer(cfg.model))
    for epoch in range(start_epoch, epochs):
        loader.set_epoch(epoch)
        for batch in loader:          # Batch(media, tokens, keys, labels)
            ...
        state = loader.state_dict()   # (epoch, batches consumed, ...): saved with the checkpoint

How an epoch is laid out (epoch mode, the default). Every rank has `workers` DataLoader workers; each
rank x worker pair reads one *stream*, S = world_size x max(workers, 1) streams in all.
  1. The shards are permuted by (seed, epoch) and laid end to end as one sample sequence, the shard
     sizes coming from sizes.json (or img2dataset's *_stats.json, or a count of the tar).
  2. The sequence is cut into S contiguous ranges of the same whole number of batches. The remainder,
     fewer than S x batch_size samples at the end of the permuted sequence, is not read this epoch
     (the permutation changes every epoch, so a different tail is dropped each time).
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

Resampled mode (`resampled: true`) draws shards with replacement, sources mixed by `weights`, from an
RNG seeded by (seed, epoch, stream); each stream takes `epoch_samples / S` samples (whole batches) of
the drawn shards and the rest works as above: resume regenerates the draws without reading.

Bad data. A sample with corrupt media, no caption or no media, or lost in a truncated tar or a shard
that still fails after `retries` attempts with exponential backoff, is skipped, counted by reason in
`loader.stats` and logged with shard and key. Its slot in the batch is filled with a copy of a good
sample of the same batch (or, when the whole batch is bad, of the nearest earlier batch of the same
stream that has one, else the nearest later one), counted as `samples_filled`: every rank yields
exactly `len(loader)` full batches and the fill is the same after a resume.

Eval loaders (`train=False`) read every sample exactly once, in shard order, without shuffling or
dropping: the sequence is cut into S nearly equal ranges and every stream yields the same number of
full batches, the slots past the end of its range (and those of bad samples) being padding: a copy of
a real sample with key "" and label -1. Evaluation must ignore rows whose key is "".
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import posixpath
import random
import subprocess
import tarfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import braceexpand
import fsspec
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.config import ConfigError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
AUDIO_EXTENSIONS = ("flac", "wav", "ogg", "mp3")


@dataclass
class DataConfig:
    train_urls: str = ""
    """Training shards: a data set directory (local or remote prefix), a brace-expanded URL list
    (s3://bucket/laion/{00000..41455}.tar), or several sources joined with '::'."""
    val_urls: str = ""
    """Validation shards, same forms as train_urls; empty for none."""
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
    """Resampled mode: samples per epoch over all ranks; 0 means the total size of the sources."""
    cache_dir: str | None = None
    """Local directory keeping a copy of every remote shard read; None reads remote shards directly."""
    allow_pipe: bool = False
    """Accept 'pipe:COMMAND' URLs, which run a shell command; off unless asked for."""
    caption_source: str = "txt"
    """'txt': the .txt caption; 'json': one caption picked at random from the .json 'captions' list
    when present, else the .txt."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """Passed to fsspec for remote URLs, e.g. {'endpoint_url': 'http://127.0.0.1:9000', 'anon': false}."""
    retries: int = 3
    """Attempts after the first to open or read a shard that fails, before it is skipped and counted."""
    retry_backoff: float = 1.0
    """Seconds before the first retry, doubled at each further one."""
    worker_timeout: float = 600.0
    """Seconds a worker may take to produce one batch before the loader fails instead of hanging."""

    def __post_init__(self):
        if self.modality not in ("image", "audio"):
            raise ConfigError(f"data.modality must be 'image' or 'audio', got {self.modality!r}")
        if self.caption_source not in ("txt", "json"):
            raise ConfigError(f"data.caption_source must be 'txt' or 'json', got {self.caption_source!r}")
        for key in ("batch_size",):
            if getattr(self, key) <= 0:
                raise ConfigError(f"data.{key} must be positive, got {getattr(self, key)}")
        for key in ("workers", "shuffle_buffer", "epoch_samples", "retries"):
            if getattr(self, key) < 0:
                raise ConfigError(f"data.{key} must be >= 0, got {getattr(self, key)}")
        if self.retry_backoff < 0 or self.worker_timeout <= 0:
            raise ConfigError("data.retry_backoff must be >= 0 and data.worker_timeout positive")
        if any(w < 0 for w in self.weights) or (self.weights and sum(self.weights) <= 0):
            raise ConfigError(f"data.weights must be non-negative with a positive sum, got {self.weights}")
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
    """Sample keys ('' marks eval padding)."""
    labels: torch.Tensor
    """long [B]; -1 where a sample has no label."""


# ----------------------------------------------------------------------------------------- URLs


def _source_list(urls: str | list[str]) -> list[str]:
    if isinstance(urls, str):
        return [part.strip() for part in urls.split("::") if part.strip()]
    return list(urls)


def expand_source(source: str, storage_options: dict | None = None) -> list[str]:
    """One source -> its shard URLs: brace expansion, or the sorted *.tar of a directory/prefix."""
    if source.startswith("pipe:") or source.endswith(".tar") or "{" in source:
        return list(braceexpand.braceexpand(source))
    fs, path = fsspec.core.url_to_fs(source, **(storage_options or {}))
    paths = sorted(fs.glob(path.rstrip("/") + "/*.tar"))
    if not paths:
        raise FileNotFoundError(f"no .tar shards found at '{source}'")
    return [path if _is_local(source) else fs.unstrip_protocol(path) for path in paths]


def expand_urls(urls: str | list[str], storage_options: dict | None = None) -> list[list[str]]:
    """'a::b' -> [[shards of a], [shards of b]]."""
    sources = [expand_source(source, storage_options) for source in _source_list(urls)]
    if not sources:
        raise ConfigError(f"no shard URLs given (got {urls!r})")
    return sources


def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def _shard_name(url: str) -> str:
    return posixpath.basename(url.rstrip("/"))


# ----------------------------------------------------------------------------------- shard sizes


def _read_json(url: str, storage_options: dict) -> Any | None:
    try:
        with fsspec.open(url, "rb", **storage_options) as handle:
            return json.loads(handle.read())
    except FileNotFoundError:
        return None


def read_shard_sizes(urls: str | list[str], storage_options: dict | None = None) -> dict[str, int]:
    """Sample count of every shard: from the directory's sizes.json (open_clip's form), else the shard's
    img2dataset-style *_stats.json ('successes'), else by counting the samples in the tar (which reads
    it once; a 'pipe:' URL runs its command for that)."""
    storage_options = storage_options or {}
    shard_urls = [url for source in expand_urls(urls, storage_options) for url in source]
    sizes: dict[str, int] = {}
    sizes_files: dict[str, dict | None] = {}
    uncounted = []
    for url in shard_urls:
        if url.startswith("pipe:"):
            uncounted.append(url)
            continue
        directory = posixpath.dirname(url)
        if directory not in sizes_files:
            sizes_files[directory] = _read_json(posixpath.join(directory, "sizes.json"), storage_options)
        listed = sizes_files[directory] or {}
        if _shard_name(url) in listed:
            sizes[url] = int(listed[_shard_name(url)])
            continue
        stats = _read_json(url[: -len(".tar")] + "_stats.json", storage_options) if url.endswith(".tar") else None
        if stats and "successes" in stats:
            sizes[url] = int(stats["successes"])
        else:
            uncounted.append(url)
    if uncounted:
        from tqdm import tqdm

        cfg = DataConfig(allow_pipe=True, storage_options=storage_options)
        for url in tqdm(uncounted, desc="counting samples in shards without sizes.json", unit="shard"):
            with open_shard(url, cfg) as stream:
                sizes[url] = sum(1 for _ in _iter_tar_samples(stream, lambda index: False))
    return {url: sizes[url] for url in shard_urls}


# --------------------------------------------------------------------------------- shard reading


@contextlib.contextmanager
def open_shard(url: str, cfg: DataConfig):
    """Binary stream of a shard on any fsspec protocol, a 'pipe:' command (when allowed), or the
    local cache copy of a remote shard."""
    if url.startswith("pipe:"):
        if not cfg.allow_pipe:
            raise ConfigError(f"shard URL '{url}' runs a shell command; set data.allow_pipe=true to allow it")
        process = subprocess.Popen(url[len("pipe:") :], shell=True, stdout=subprocess.PIPE)
        try:
            yield process.stdout
        finally:
            process.stdout.close()
            if process.poll() is None:  # we stopped reading early: the command has no more use
                process.kill()
            code = process.wait(timeout=60)
            if code not in (0, -9):
                raise OSError(f"'{url}' exited with status {code}")
        return
    if cfg.cache_dir and not _is_local(url):
        url = _cached_copy(url, cfg)
    with fsspec.open(url, "rb", **({} if _is_local(url) else cfg.storage_options)) as handle:
        yield handle


def _cached_copy(url: str, cfg: DataConfig) -> str:
    os.makedirs(cfg.cache_dir, exist_ok=True)
    digest = hashlib.sha1(url.encode()).hexdigest()[:12]
    local = os.path.join(cfg.cache_dir, f"{digest}-{_shard_name(url)}")
    if not os.path.exists(local):
        partial = f"{local}.{os.getpid()}.partial"
        fs, path = fsspec.core.url_to_fs(url, **cfg.storage_options)
        fs.get_file(path, partial)
        os.replace(partial, local)  # atomic: another worker never sees half a shard
    return local


def _iter_tar_samples(stream, wanted: Callable[[int], bool]) -> Iterator[tuple[int, str, dict[str, bytes] | None]]:
    """Group consecutive tar members by key (the name up to the first dot of its base name) and yield
    (index in shard, key, {extension: bytes}); the files of samples not `wanted` are never read."""
    archive = tarfile.open(fileobj=stream, mode="r|*")
    index, key, files = -1, None, None
    for member in archive:
        if not member.isfile():
            continue
        directory, base = posixpath.split(member.name)
        stem, _, extension = base.partition(".")
        if not extension or stem.startswith("__"):
            continue  # not part of a sample (e.g. __meta__ files)
        member_key = posixpath.join(directory, stem)
        if member_key != key:
            if key is not None:
                yield index, key, files
            index, key = index + 1, member_key
            files = {} if wanted(index) else None
        if files is not None:
            files[extension.lower()] = archive.extractfile(member).read()
    if key is not None:
        yield index, key, files


@dataclass(frozen=True)
class Segment:
    """Samples [first, end) of one shard, which are samples [offset, offset + end - first) of a stream."""

    url: str
    first: int
    end: int
    offset: int


class _Entry(NamedTuple):
    index: int  # in the stream
    url: str
    key: str
    files: dict[str, bytes] | None  # None: lost, see reason
    reason: str


class _StreamReader:
    """Reads the needed samples of a stream's segments in order, with retries; yields one _Entry for
    every needed index, a lost sample as an entry without files and with the reason."""

    def __init__(self, cfg: DataConfig, counts: Counter):
        self.cfg = cfg
        self.counts = counts

    def read(self, segments: list[Segment], needed: np.ndarray) -> Iterator[_Entry]:
        for segment in segments:
            window = needed[segment.offset : segment.offset + segment.end - segment.first]
            if not window.any():
                continue  # whole shard already consumed: skipped by its count, never opened
            yield from self._read_segment(segment, needed)

    def _read_segment(self, segment: Segment, needed: np.ndarray) -> Iterator[_Entry]:
        next_index = segment.first  # first shard index not yet handled
        attempt, reason = 0, ""
        while next_index < segment.end:
            try:
                with open_shard(segment.url, self.cfg) as stream:
                    def wanted(i, start=next_index):
                        return start <= i < segment.end and bool(needed[segment.offset + i - segment.first])

                    for index, key, files in _iter_tar_samples(stream, wanted):
                        if index < next_index:
                            continue
                        if index >= segment.end:
                            break
                        next_index = index + 1
                        if files is not None:
                            yield _Entry(segment.offset + index - segment.first, segment.url, key, files, "")
                if next_index < segment.end:
                    reason = "missing_from_shard"  # the tar holds fewer samples than sizes.json says
                    self.counts["shards_short"] += 1
                    log.warning("shard %s ends after %d samples, fewer than its listed size", segment.url, next_index)
                break
            except (tarfile.TarError, EOFError) as error:
                # a damaged archive reads the same way every time: no retry
                reason = "truncated_shard"
                self.counts["shards_truncated"] += 1
                log.warning("shard %s is damaged after sample %d (%s): the rest is skipped", segment.url, next_index, error)
                break
            except ConfigError:
                raise
            except Exception as error:  # network, permissions, a vanished file: worth retrying
                if attempt >= self.cfg.retries:
                    reason = "shard_failed"
                    self.counts["shards_failed"] += 1
                    log.warning("shard %s failed %d times (%s): skipped", segment.url, attempt + 1, error)
                    break
                delay = self.cfg.retry_backoff * 2**attempt
                self.counts["shard_retries"] += 1
                log.warning("shard %s failed (%s); retry %d/%d in %.1f s", segment.url, error, attempt + 1,
                            self.cfg.retries, delay)
                time.sleep(delay)
                attempt += 1
        for index in range(next_index, segment.end):
            stream_index = segment.offset + index - segment.first
            if needed[stream_index]:
                yield _Entry(stream_index, segment.url, f"#{index}", None, reason)


# ---------------------------------------------------------------------------------- stream plans


def shuffle_order(length: int, buffer_size: int, rng: np.random.Generator) -> np.ndarray:
    """Emission order of items 0..length-1 read in order through a shuffle buffer of `buffer_size`:
    once full, each incoming item replaces a uniformly chosen one, which is emitted; the rest is
    emitted in random order at the end. Cheap enough to replay a whole stream on resume."""
    if buffer_size <= 1 or length <= 1:
        return np.arange(length, dtype=np.int64)
    order = np.empty(length, dtype=np.int64)
    picks = rng.random(length)
    buffer: list[int] = []
    emitted = 0
    for item in range(length):
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        slot = int(picks[item] * buffer_size)
        order[emitted] = buffer[slot]
        buffer[slot] = item
        emitted += 1
    order[emitted:] = rng.permutation(np.asarray(buffer, dtype=np.int64))
    return order


def _segments_of_range(shards: list[tuple[str, int]], start: int, end: int) -> list[Segment]:
    """Samples [start, end) of the shards laid end to end."""
    segments, position = [], 0
    for url, size in shards:
        lo, hi = max(start, position), min(end, position + size)
        if lo < hi:
            segments.append(Segment(url, lo - position, hi - position, lo - start))
        position += size
        if position >= end:
            break
    return segments


@dataclass
class StreamPlan:
    segments: list[Segment]
    order: np.ndarray
    """Stream indices in emission order (a permutation of range(length))."""
    batches: int
    """Batches this stream yields."""


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


class _RateLimitedLog:
    """Every bad sample is counted; the first few of each reason are logged in full, then every 1000th."""

    def __init__(self):
        self.seen = Counter()

    def __call__(self, reason: str, url: str, key: str, detail: str = ""):
        self.seen[reason] += 1
        count = self.seen[reason]
        if count <= 10 or count % 1000 == 0:
            log.warning("skipped sample %s in %s: %s%s (%d so far with this reason in this stream)",
                        key, url, reason, f" ({detail})" if detail else "", count)


class StreamingDataset(IterableDataset):
    """The per-worker side: plans this worker's stream and yields (Batch, stats delta) pairs."""

    def __init__(self, cfg: DataConfig, sources: list[list[tuple[str, int]]], *, rank: int, world_size: int,
                 seed: int, media_transform, tokenizer, train: bool, image_size: int | None, weights: list[float]):
        sources = [[shard for shard in source if shard[1] > 0] for source in sources]  # empty shards hold nothing
        if cfg.resampled and any(weight > 0 and not source for weight, source in zip(weights, sources)):
            raise ValueError("a data source with a positive weight holds no samples; drop it or give it weight 0")
        self.cfg, self.sources, self.rank, self.world_size = cfg, sources, rank, world_size
        self.seed, self.media_transform, self.tokenizer = seed, media_transform, tokenizer
        self.train, self.image_size, self.weights = train, image_size, weights
        self.workers = max(cfg.workers, 1)
        self.streams = world_size * self.workers
        self.shards = [shard for source in sources for shard in source]
        self.total = sum(size for _, size in self.shards)
        # (epoch, first batch to yield): written by the loader before each pass, read by the workers
        self.position = torch.zeros(2, dtype=torch.int64).share_memory_()
        if train:
            samples = (cfg.epoch_samples or self.total) if cfg.resampled else self.total
            self.stream_batches = samples // (self.streams * cfg.batch_size)
            if self.stream_batches == 0:
                raise ValueError(
                    f"the data set has {samples} samples, fewer than one batch per stream: "
                    f"world_size {world_size} x workers {self.workers} x batch_size {cfg.batch_size} = "
                    f"{self.streams * cfg.batch_size} needed; lower data.batch_size or data.workers"
                )
        else:
            if self.total < self.streams:
                raise ValueError(f"the eval set has {self.total} samples, fewer than the {self.streams} streams "
                                 f"(world_size x workers); lower data.workers")
            self.stream_batches = math.ceil(math.ceil(self.total / self.streams) / cfg.batch_size)

    # --- plans
    def plan(self, epoch: int, stream: int) -> StreamPlan:
        batch = self.cfg.batch_size
        if not self.train:
            start, end = stream * self.total // self.streams, (stream + 1) * self.total // self.streams
            segments = _segments_of_range(self.shards, start, end)
            return StreamPlan(segments, np.arange(end - start, dtype=np.int64), self.stream_batches)
        length = self.stream_batches * batch
        if self.cfg.resampled:
            rng = np.random.default_rng([self.seed, epoch, stream, 1])
            probabilities = np.asarray(self.weights, dtype=np.float64)
            probabilities /= probabilities.sum()
            segments, filled = [], 0
            while filled < length:
                source = self.sources[rng.choice(len(self.sources), p=probabilities)]
                url, size = source[rng.integers(len(source))]
                take = min(size, length - filled)
                if take > 0:
                    segments.append(Segment(url, 0, take, filled))
                    filled += take
        else:
            permutation = np.random.default_rng([self.seed, epoch, 0]).permutation(len(self.shards))
            shards = [self.shards[i] for i in permutation]
            segments = _segments_of_range(shards, stream * length, (stream + 1) * length)
        order = shuffle_order(length, self.cfg.shuffle_buffer, np.random.default_rng([self.seed, epoch, stream, 2]))
        return StreamPlan(segments, order, self.stream_batches)

    # --- decoding
    def _sample_seed(self, epoch: int, stream: int, index: int) -> int:
        return int(np.random.SeedSequence([self.seed, epoch, stream, index]).generate_state(1)[0])

    def _decode(self, entry: _Entry, sample_seed: int, note) -> tuple | None:
        """-> (media, caption, label), or None when the sample is bad (counted and logged)."""
        files = entry.files
        if files is None:
            note(entry.reason, entry.url, entry.key)
            return None
        extensions = IMAGE_EXTENSIONS if self.cfg.modality == "image" else AUDIO_EXTENSIONS
        media_ext = next((ext for ext in extensions if ext in files), None)
        if media_ext is None:
            note("missing_media", entry.url, entry.key)
            return None
        metadata = {}
        if "json" in files:
            try:
                metadata = json.loads(files["json"])
            except ValueError:
                metadata = {}
        picker = random.Random(sample_seed)
        captions = metadata.get("captions") if isinstance(metadata, dict) else None
        if self.cfg.caption_source == "json" and isinstance(captions, list) and captions:
            caption = str(picker.choice(captions))
        elif "txt" in files:
            caption = files["txt"].decode("utf-8", errors="replace").strip()
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
            from pipeline.audio import decode_audio

            waveform, rate = decode_audio(data)
            generator = torch.Generator().manual_seed(sample_seed) if self.train else None
            return self.media_transform(waveform, rate, generator)
        from PIL import Image

        image = Image.open(io.BytesIO(data))
        if self.image_size and image.format == "JPEG":
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
        media = _stack([sample[0] for sample in samples])
        tokens = self.tokenizer([sample[1] for sample in samples])
        labels = torch.tensor([sample[2] for sample in samples], dtype=torch.long)
        return Batch(media, tokens, keys, labels)

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

    def stream_batches_from(self, epoch: int, stream: int, done: int) -> Iterator[tuple[Batch, dict]]:
        plan = self.plan(epoch, stream)
        batch_size = self.cfg.batch_size
        length = len(plan.order)
        counts: Counter = Counter()
        note = _RateLimitedLog()

        def count_bad(reason, url, key, detail=""):
            counts[f"skipped_{reason}"] += 1
            note(reason, url, key, detail)

        needed = np.zeros(length, dtype=bool)
        remaining = plan.order[done * batch_size :]
        needed[remaining] = True
        entries = _StreamReader(self.cfg, counts).read(plan.segments, needed)
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
                keys.append(entry.key)
            counts["samples_read"] += len(good)
            real = list(zip(good, keys))
            padding = holes if self.train else batch_size - len(good)
            if real:
                last_good = real
            elif padding and not last_good:
                last_good = self._fill_source(plan, epoch, stream, batch_index)
            for hole in range(padding):
                sample, key = (real or last_good)[hole % len(real or last_good)]
                if self.train:  # a hole is filled by a repeat of a good sample, key and label included
                    good.append(sample)
                    keys.append(key)
                else:  # eval padding: marked by an empty key and no label
                    good.append((sample[0], sample[1], -1))
                    keys.append("")
            if padding:
                counts["samples_filled" if self.train else "samples_padded"] += padding
            yield self._collate(good, keys), dict(counts)
            counts.clear()

    def _fill_source(self, plan: StreamPlan, epoch: int, stream: int, batch_index: int) -> list[tuple]:
        """Good samples of the nearest earlier batch of this stream that has any, else the nearest later
        one: read again by position, so a resumed run fills a bad batch exactly as an uninterrupted one."""
        batch_size = self.cfg.batch_size
        candidates = list(range(batch_index - 1, -1, -1)) + list(range(batch_index + 1, plan.batches))
        silent = Counter()
        for candidate in candidates:
            targets = plan.order[candidate * batch_size : (candidate + 1) * batch_size]
            needed = np.zeros(len(plan.order), dtype=bool)
            needed[targets] = True
            found = []
            for entry in _StreamReader(self.cfg, silent).read(plan.segments, needed):
                sample = self._decode(entry, self._sample_seed(epoch, stream, entry.index), lambda *a: None)
                if sample is not None:
                    found.append((entry.index, sample, entry.key))
            if found:
                # in emission order, as the batch itself would have held them
                rank_in_batch = {int(t): i for i, t in enumerate(targets)}
                found.sort(key=lambda item: rank_in_batch[item[0]])
                return [(sample, key) for _, sample, key in found]
        raise RuntimeError(f"stream {stream} of epoch {epoch} holds no decodable sample; check its shards: "
                           + ", ".join(sorted({s.url for s in plan.segments})))


# ------------------------------------------------------------------------------------- the loader


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)  # one core per worker: decoding is parallel across workers, not inside one


class StreamingLoader:
    """Iterable of Batch; `len()` batches per epoch on every rank; position (epoch, batches consumed).

    Iterating yields the rest of the current epoch and then moves the loader to the next epoch, so
    `while True: yield from loader` streams epoch after epoch. `stats` sums the workers' counters:
    samples_read, samples_filled (train holes) / samples_padded (eval), skipped_<reason> per bad sample
    (corrupt_media, missing_caption, missing_media, truncated_shard, missing_from_shard, shard_failed),
    shards_failed, shards_truncated, shards_short, shard_retries.
    """

    def __init__(self, dataset: StreamingDataset, cfg: DataConfig, fingerprint: str):
        self.dataset, self.cfg, self.fingerprint = dataset, cfg, fingerprint
        self.epoch, self.batches_consumed = 0, 0
        self.stats: dict[str, int] = Counter()
        self._loader = DataLoader(
            dataset, batch_size=None, num_workers=cfg.workers, persistent_workers=cfg.workers > 0,
            pin_memory=torch.cuda.is_available(), worker_init_fn=_worker_init if cfg.workers else None,
            timeout=cfg.worker_timeout if cfg.workers else 0,
        )

    def __len__(self) -> int:
        return self.dataset.stream_batches * self.dataset.workers

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its beginning, unless it is the epoch the loader is already in (resume)."""
        if epoch != self.epoch:
            self.epoch, self.batches_consumed = epoch, 0

    def __iter__(self) -> Iterator[Batch]:
        total = len(self)
        if self.batches_consumed < total:
            self.dataset.position[0] = self.epoch
            self.dataset.position[1] = self.batches_consumed
            for batch, delta in self._loader:
                self.stats.update(delta)
                self.batches_consumed += 1  # before yielding: a state taken now counts this batch
                yield batch
                if self.batches_consumed >= total:
                    break
        self.epoch, self.batches_consumed = self.epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch, "batches_consumed": self.batches_consumed, "seed": self.dataset.seed,
            "world_size": self.dataset.world_size, "workers": self.dataset.workers,
            "batch_size": self.cfg.batch_size, "resampled": self.cfg.resampled,
            "weights": list(self.dataset.weights), "dataset": self.fingerprint,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()
        for key in ("world_size", "workers", "batch_size", "seed", "resampled", "weights", "dataset"):
            if state.get(key) != mine[key]:
                what = "data set (shard names and sizes)" if key == "dataset" else key
                raise ValueError(
                    f"cannot resume the data position: the saved loader state has {what} {state.get(key)!r}, "
                    f"this loader has {mine[key]!r}; exact resume needs the same world size, workers, batch "
                    "size, seed, mode and data set (or start the data at a new epoch)"
                )
        if not 0 <= state["batches_consumed"] <= len(self):
            raise ValueError(f"saved batches_consumed {state['batches_consumed']} is outside 0..{len(self)}")
        self.epoch, self.batches_consumed = int(state["epoch"]), int(state["batches_consumed"])


def build_loader(cfg: DataConfig, urls: str, *, rank: int, world_size: int, seed: int, media_transform,
                 tokenizer, train: bool = True, image_size: int | None = None) -> StreamingLoader:
    """A loader over `urls` for this rank; `media_transform` and `tokenizer` come from the model side."""
    if not urls:
        raise ConfigError("no shard URLs given (data.train_urls / data.val_urls is empty)")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    shard_urls = expand_urls(urls, cfg.storage_options)
    sizes = read_shard_sizes(urls, cfg.storage_options)
    sources = [[(url, sizes[url]) for url in source] for source in shard_urls]
    weights = list(cfg.weights) or [1.0] * len(sources)
    if len(weights) != len(sources):
        raise ConfigError(f"data.weights has {len(weights)} entries for {len(sources)} sources in '{urls}'")
    names = json.dumps([[(_shard_name(u), n) for u, n in source] for source in sources])
    fingerprint = hashlib.sha1(names.encode()).hexdigest()[:16]
    dataset = StreamingDataset(cfg, sources, rank=rank, world_size=world_size, seed=seed,
                               media_transform=media_transform, tokenizer=tokenizer, train=train,
                               image_size=image_size, weights=weights)
    return StreamingLoader(dataset, cfg, fingerprint)
