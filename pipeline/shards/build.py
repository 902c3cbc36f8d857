"""The shard builder: `build_shards(BuildConfig(...))`, what `python -m pipeline shards build` runs.

A data set is `{prefix}-{index:06d}.tar` shards, `sizes.json` (shard name -> samples, as open_clip
reads it), `{prefix}-{index:06d}_stats.json` per shard (img2dataset-like) and `classes.json` for the
embedded labelled sets.

The format itself (member names -> keys and fields, the tar writer, sizes.json and *_stats.json) is
pipeline.data.shardformat, the one the loader reads with; file access is pipeline.core.storage. What a build is
asked for is pipeline.shards.config, where its samples come from pipeline.shards.sources; verify and ls are
pipeline.shards.verify and pipeline.shards.ls, the command line pipeline.shards.cli.

Determinism: the input is cut into fixed chunks of `samples_per_shard` input items; each chunk is
built by one worker into one tar (or several, when `max_shard_bytes` cuts it) with fixed member
metadata, and the parent names the parts in chunk order. So the bytes never depend on the number
of workers or their timing. Parts are staged on local disk and then moved (local output) or
uploaded with fsspec `put_file` (remote output), so a remote object always completes, unlike
webdataset's `ShardWriter(opener=...)` which never closes its stream.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import posixpath
import shutil
import tarfile
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

from pipeline.core import storage
from pipeline.core.progress import progress_bar
from pipeline.data import shardformat
from pipeline.shards import synthetic
from pipeline.shards.config import BuildConfig, ShardBuildError
from pipeline.shards.sources import (
    AUDIO_EXTENSIONS,
    IMAGE_EXTENSIONS,
    Sample,
    SkippedSample,
    SourceItem,
    list_folder,
    list_manifest,
    prepare_item,
    prepare_synthetic,
    sanitize_key,
)

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------- writing


@dataclass
class ShardPart:
    """One tar built by a worker in the staging directory, not yet named."""

    staged_path: str
    samples: int
    bytes: int
    stats: dict[str, Any]


class _PartWriter:
    """Writes samples into a staged tar (shardformat.TarSampleWriter: deterministic bytes) and counts
    the skipped ones for its *_stats.json."""

    def __init__(self, path: str):
        self.path = path
        self.tar = shardformat.TarSampleWriter(path)
        self.samples = 0
        self.failed: Counter[str] = Counter()
        self.start = time.time()

    def write(self, sample: Sample) -> None:
        self.tar.write(sample.key, sample.files)
        self.samples += 1

    def close(self) -> ShardPart:
        self.tar.close()
        size = os.path.getsize(self.path)
        failed = sum(self.failed.values())
        stats = {
            "count": self.samples + failed,
            "successes": self.samples,
            "failed_to_decode": self.failed.get("failed_to_decode", 0),
            "failed_to_resize": self.failed.get("failed_to_resize", 0),
            "failed_to_read": sum(n for r, n in self.failed.items() if r in ("missing_file", "unreadable_file")),
            "failed_by_reason": dict(sorted(self.failed.items())),
            "bytes": size,
            # durations vary from run to run, so they stay out of the (deterministic) shard and go here only
            "duration": round(time.time() - self.start, 3),
        }
        return ShardPart(self.path, self.samples, size, stats)


# per-process state of the worker pool: the config and the listed items, sent once per worker
_WORKER: dict[str, Any] = {}


def _init_worker(cfg: BuildConfig, items: list[SourceItem] | None, staging: str) -> None:
    _WORKER.update(cfg=cfg, items=items, staging=staging)


def _approx_size(sample: Sample) -> int:
    # each member: a 512-byte header plus data padded to 512 bytes
    return sum(512 + -(-len(data) // 512) * 512 for data in sample.files.values())


def _tar_file_size(member_bytes: int) -> int:
    # tarfile ends an archive with two zero blocks and pads it to a whole record (20 blocks)
    record = tarfile.RECORDSIZE
    return -(-(member_bytes + 2 * tarfile.BLOCKSIZE) // record) * record


def build_chunk(chunk_index: int) -> list[ShardPart]:
    """Build the shards of input chunk `chunk_index` into the staging directory (runs in a worker)."""
    cfg: BuildConfig = _WORKER["cfg"]
    items: list[SourceItem] | None = _WORKER["items"]
    per_shard = cfg.samples_per_shard
    total = len(items) if items is not None else cfg.count
    start, stop = chunk_index * per_shard, min(total, (chunk_index + 1) * per_shard)
    parts: list[ShardPart] = []

    def new_writer() -> _PartWriter:
        return _PartWriter(os.path.join(_WORKER["staging"], f"chunk{chunk_index:06d}-part{len(parts):03d}.tar"))

    writer, written_bytes = new_writer(), 0
    for index in range(start, stop):
        try:
            sample = prepare_synthetic(index, cfg) if items is None else prepare_item(items[index], cfg)
        except SkippedSample as skipped:
            writer.failed[skipped.reason] += 1
            logger.warning("skipping sample %s: %s", index if items is None else items[index].media_path, skipped)
            continue
        size = _approx_size(sample)
        if cfg.max_shard_bytes and writer.samples and _tar_file_size(written_bytes + size) > cfg.max_shard_bytes:
            parts.append(writer.close())
            writer, written_bytes = new_writer(), 0
        writer.write(sample)
        written_bytes += size
    parts.append(writer.close())
    return parts


@dataclass
class BuildSummary:
    output: str
    prefix: str
    shard_sizes: dict[str, int]
    inputs: int
    failed_by_reason: dict[str, int]
    seconds: float

    @property
    def samples(self) -> int:
        return sum(self.shard_sizes.values())

    def describe(self) -> str:
        skipped = sum(self.failed_by_reason.values())
        lines = [f"{self.prefix}: {self.samples} samples in {len(self.shard_sizes)} shards -> {self.output} "
                 f"({self.inputs} inputs, {skipped} skipped, {self.seconds:.1f} s, "
                 f"{self.inputs / max(self.seconds, 1e-9):.0f} samples/s)"]
        lines += [f"  skipped {count} x {reason}" for reason, count in sorted(self.failed_by_reason.items())]
        return "\n".join(lines)


class _Output:
    """The destination (local dir or fsspec URL): checked writable up front; parts are moved or uploaded."""

    def __init__(self, url: str, storage_options: dict[str, Any]):
        self.url = url
        try:
            self.fs, self.root = storage.url_to_fs(url, storage_options)
        except (ValueError, ImportError) as error:
            raise ShardBuildError(f"output '{url}' cannot be opened: {error}") from None
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))
        probe = self.path(".write-probe")
        try:
            self.created = not self.fs.exists(self.root)  # then a failed build removes it again
            self.fs.makedirs(self.root, exist_ok=True)
            with self.fs.open(probe, "wb") as handle:
                handle.write(b"ok")
            self.fs.rm(probe)
        except Exception as error:  # any backend error means the same thing: we cannot write there
            self.discard()
            raise ShardBuildError(f"output '{url}' is not writable: {error}") from None

    def path(self, name: str) -> str:
        return posixpath.join(self.root, name) if not self.local else os.path.join(self.root, name)

    def staging_dir(self) -> str:
        # local output: stage beside the shards so that publishing a part is a rename, not a copy
        return tempfile.mkdtemp(prefix=".staging-", dir=self.root if self.local else None)

    def put(self, local_path: str, name: str) -> None:
        if self.local:
            os.replace(local_path, self.path(name))
        else:
            self.fs.put_file(local_path, self.path(name))
            os.remove(local_path)

    def write_text(self, name: str, text: str) -> None:
        with self.fs.open(self.path(name), "wb") as handle:  # closed here: a remote object really completes
            handle.write(text.encode("utf-8"))

    def discard(self) -> None:
        """After a failed build: remove the destination if this build created it (what was there before stays)."""
        if getattr(self, "created", False) and self.fs.exists(self.root):
            self.fs.rm(self.root, recursive=True)

    def remove_stale(self, prefix: str, keep: set[str]) -> list[str]:
        """Shards of an earlier, larger build with the same prefix would be mistaken for part of this one."""
        stale = []
        for path in self.fs.glob(self.path(f"{prefix}-*")):
            name = posixpath.basename(path)
            stem = name[len(prefix) + 1 :].split("_")[0].split(".")[0]
            if stem.isdigit() and (name.endswith(".tar") or name.endswith("_stats.json")) and name not in keep:
                self.fs.rm(path)
                stale.append(name)
        return stale


def default_prefix(cfg: BuildConfig) -> str:
    if cfg.prefix:
        return cfg.prefix
    if cfg.source in synthetic.SOURCES:
        return f"{cfg.source}-{cfg.split}"
    name = cfg.input.rstrip("/").rsplit("/", 1)[-1].split(".")[0]
    return sanitize_key(name).replace("_", "-") or "shards"


def build_shards(cfg: BuildConfig, progress: bool = True) -> BuildSummary:
    """Build the data set described by `cfg`; returns what was written. Raises ShardBuildError up front
    when the input or output cannot be used, and at the end when no sample was written (no input, or every
    input skipped: the reasons counted); a build that fails removes the output directory it created."""
    started = time.time()
    cfg = _with_defaults(cfg)
    output = _Output(cfg.output, cfg.storage_options)  # fail before any work if it cannot be written
    try:
        return _build_into(output, cfg, progress, started)
    except BaseException:
        output.discard()
        raise


def _build_into(output: _Output, cfg: BuildConfig, progress: bool, started: float) -> BuildSummary:
    if cfg.source == "folder":
        items = list_folder(cfg.input, cfg.storage_options)
    elif cfg.source == "manifest":
        items = list_manifest(cfg)
    else:
        items = None
    total = len(items) if items is not None else cfg.count
    chunks = -(-total // cfg.samples_per_shard)
    prefix = default_prefix(cfg)
    staging = output.staging_dir()
    shard_sizes: dict[str, int] = {}
    failed: Counter[str] = Counter()
    bar = progress_bar(total=total, desc=f"building {prefix}", unit="sample", disable=not progress)
    pool = None
    try:
        if cfg.workers == 1 or chunks <= 1:
            _init_worker(cfg, items, staging)
            results = map(build_chunk, range(chunks))
        else:
            # spawn, not fork: the parent may hold torch/thread state that a fork would copy half-way.
            # A process pool executor, not multiprocessing.Pool: a dying worker fails the build
            # (BrokenProcessPool) instead of being replaced forever.
            pool = ProcessPoolExecutor(min(cfg.workers, chunks), mp_context=multiprocessing.get_context("spawn"),
                                       initializer=_init_worker, initargs=(cfg, items, staging))
            results = pool.map(build_chunk, range(chunks))  # in chunk order, whatever the finishing order
        for parts in results:
            for part in parts:
                bar.update(part.stats["count"])
                failed.update(part.stats["failed_by_reason"])
                if part.samples == 0:  # a chunk whose every input failed: counted, but no empty shard
                    os.remove(part.staged_path)
                    continue
                name = f"{prefix}-{len(shard_sizes):06d}.tar"
                output.put(part.staged_path, name)
                output.write_text(storage.base_name(shardformat.stats_url(name)), shardformat.stats_json(name, part.stats))
                shard_sizes[name] = part.samples
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
        shutil.rmtree(staging, ignore_errors=True)
    if not shard_sizes:  # before anything of an earlier build is touched: it stays as it was
        raise ShardBuildError(_nothing_written(cfg, total, failed))
    keep = set(shard_sizes) | {shardformat.stats_url(name) for name in shard_sizes}
    for name in output.remove_stale(prefix, keep):
        logger.warning("removed %s left by an earlier build with prefix '%s'", name, prefix)
    output.write_text(shardformat.SIZES_FILE, shardformat.sizes_json(shard_sizes))
    if cfg.source in synthetic.SOURCES:
        output.write_text("classes.json", synthetic.classes_json(cfg.source))
    return BuildSummary(cfg.output, prefix, shard_sizes, total, dict(sorted(failed.items())), time.time() - started)


def _nothing_written(cfg: BuildConfig, total: int, failed: Counter[str]) -> str:
    """Why a build wrote no sample: no input at all, or every input skipped (with the count per reason)."""
    if cfg.source in synthetic.SOURCES:
        return f"no samples written: count is {cfg.count}"
    if not total:
        media = "media files (" + ", ".join([*IMAGE_EXTENSIONS, *AUDIO_EXTENSIONS]) + ")"
        return f"no samples written: {cfg.source} '{cfg.input}' holds no " + (media if cfg.source == "folder" else "rows")
    reasons = ", ".join(f"{count} x {reason}" for reason, count in sorted(failed.items()))
    return f"no samples written: all {total} inputs of {cfg.source} '{cfg.input}' were skipped ({reasons})"


def _with_defaults(cfg: BuildConfig) -> BuildConfig:
    from dataclasses import replace

    updates = {}
    if cfg.samples_per_shard is None:
        updates["samples_per_shard"] = synthetic.DEFAULT_SAMPLES_PER_SHARD.get(cfg.source, 1000)
    if cfg.count is None and cfg.source in synthetic.SOURCES:
        updates["count"] = synthetic.DEFAULT_COUNTS[(cfg.source, cfg.split)]
    return replace(cfg, **updates) if updates else cfg


