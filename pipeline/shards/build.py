"""Build, verify, list and index WebDataset tar shards: `python -m pipeline shards build|verify|ls|index`.

    python -m pipeline shards build --source shapes --split train --output shards/shapes/train
    python -m pipeline shards build --source folder --input photos/ --resize 256 --output s3://bucket/photos \\
        --storage-option client_kwargs.endpoint_url=http://127.0.0.1:9000
    python -m pipeline shards build --source manifest --input pairs.parquet --output shards/pairs --workers 4
    python -m pipeline shards verify shards/shapes/train s3://bucket/photos/photos-000000.tar
    python -m pipeline shards ls shards/shapes/train --limit 5 [--json]   # keys and fields as the loader sees them
    python -m pipeline shards index s3://bucket/laion400m --workers 64   # sizes.json for img2dataset output

A data set is `{prefix}-{index:06d}.tar` shards, `sizes.json` (shard name -> samples, as open_clip
reads it), `{prefix}-{index:06d}_stats.json` per shard (img2dataset-like) and `classes.json` for the
embedded labelled sets.

The format itself (member names -> keys and fields, the tar writer, sizes.json and *_stats.json) is
pipeline.data.shardformat, the one the loader reads with; file access is pipeline.core.storage. This module is long
(~1000 lines) because it is the whole `shards` program: inputs (folder, manifest), media checks and
resizing, the parallel deterministic build, verify, ls and their CLI. `index` writes sizes.json with the
loader's own reader of shard sizes (pipeline.data.shardindex).

Determinism: the input is cut into fixed chunks of `samples_per_shard` input items; each chunk is
built by one worker into one tar (or several, when `max_shard_bytes` cuts it) with fixed member
metadata, and the parent names the parts in chunk order. So the bytes never depend on the number
of workers or their timing. Parts are staged on local disk and then moved (local output) or
uploaded with fsspec `put_file` (remote output), so a remote object always completes, unlike
webdataset's `ShardWriter(opener=...)` which never closes its stream.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import logging
import multiprocessing
import os
import posixpath
import shutil
import sys
import tarfile
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from pipeline.core import storage
from pipeline.core.args import parse_overrides
from pipeline.core.errors import ConfigError
from pipeline.data import shardformat, shardindex
from pipeline.shards import synthetic

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {"jpg": "jpg", "jpeg": "jpg", "png": "png", "webp": "webp"}
AUDIO_EXTENSIONS = {"flac": "flac", "wav": "wav"}
PIL_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
RESIZE_MODES = ("no", "keep_ratio", "center_crop", "border")
MANIFEST_FORMATS = ("csv", "tsv", "jsonl", "parquet")
SOURCES = ("shapes", "tones", "folder", "manifest")


class ShardBuildError(ConfigError):
    """The build cannot start or go on (bad manifest, unwritable output) or wrote nothing (no input, every input
    skipped): the message names the cause. The build leaves nothing behind in an output it created."""


class UnreadableShard(ConfigError):
    """A shard that cannot be read (`shards ls`, `shards index`): the CLI exits 1 with the message, as `shards
    verify` does when it finds a problem, not 2 (a bad setting)."""

    exit_status = 1


@dataclass
class BuildConfig:
    """Everything `shards build` needs; the CLI flags map one to one onto these fields."""

    source: str
    """`shapes` or `tones` (embedded, generated), `folder` (media + sidecar captions) or `manifest` (table)."""
    output: str
    """Local directory or fsspec URL (s3://bucket/prefix) the shards go to."""
    split: str = "train"
    """Embedded sets: `train` or `val` (held out; a different random stream, no shared samples)."""
    count: int | None = None
    """Embedded sets: number of samples (default 10000/1000 for shapes train/val, 3000/500 for tones)."""
    seed: int = 0
    """Embedded sets: the seed; the same seed gives byte-identical shards."""
    image_size: int = 64
    """shapes: image side in pixels (64-224)."""
    sample_rate: int = 16000
    """tones: sample rate in Hz (16000-48000)."""
    input: str | None = None
    """folder: the directory; manifest: the table's path or URL."""
    path_column: str = "path"
    """manifest: column with each sample's media path (local, relative to the manifest, or any fsspec URL)."""
    caption_column: str = "caption"
    """manifest: column with the caption."""
    key_column: str = "key"
    """manifest: optional column with sample keys; when absent keys are zero-padded row numbers."""
    format: str | None = None
    """manifest: csv, tsv, jsonl or parquet; default from the file extension."""
    prefix: str | None = None
    """Shard name prefix; default `{source}-{split}` for embedded sets, else the input's name."""
    samples_per_shard: int | None = None
    """Input samples per shard (skipped ones leave a shard smaller); default 1000 (tones 500)."""
    max_shard_bytes: int | None = None
    """Start a new shard before one would exceed this many bytes (0/None: no limit)."""
    resize: int = 0
    """Images: target size of the shorter side (keep_ratio) or of the square (center_crop, border); 0: off."""
    resize_mode: str = "keep_ratio"
    """no, keep_ratio, center_crop or border (as in img2dataset); never upscales."""
    jpeg_quality: int = 95
    """Quality of re-encoded (resized) JPEG and WebP images."""
    workers: int = 1
    """Worker processes; each builds whole shards. The output does not depend on it."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """fsspec options for the output, the manifest and remote media (e.g. S3 endpoint and keys)."""

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ConfigError(f"source must be one of {list(SOURCES)}, got {self.source!r}")
        if self.source in ("folder", "manifest") and not self.input:
            raise ConfigError(f"source '{self.source}' needs input (the {self.source} path)")
        if self.split not in synthetic.SPLITS:
            raise ConfigError(f"split must be one of {list(synthetic.SPLITS)}, got {self.split!r}")
        if self.count is not None and self.count < 0:
            raise ConfigError(f"count must be >= 0, got {self.count}")
        if self.samples_per_shard is not None and self.samples_per_shard <= 0:
            raise ConfigError(f"samples_per_shard must be positive, got {self.samples_per_shard}")
        if self.max_shard_bytes is not None and self.max_shard_bytes < 0:
            raise ConfigError(f"max_shard_bytes must be >= 0, got {self.max_shard_bytes}")
        if self.resize < 0:
            raise ConfigError(f"resize must be >= 0 (0 turns it off), got {self.resize}")
        if self.resize_mode not in RESIZE_MODES:
            raise ConfigError(f"resize_mode must be one of {list(RESIZE_MODES)}, got {self.resize_mode!r}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ConfigError(f"jpeg_quality must be within 1-100, got {self.jpeg_quality}")
        if self.workers < 1:
            raise ConfigError(f"workers must be >= 1, got {self.workers}")
        if self.format is not None and self.format not in MANIFEST_FORMATS:
            raise ConfigError(f"format must be one of {list(MANIFEST_FORMATS)}, got {self.format!r}")
        if self.prefix is not None and (not self.prefix or "/" in self.prefix or "." in self.prefix):
            raise ConfigError(f"prefix must be a non-empty name without '/' or '.', got {self.prefix!r}")
        if self.source == "shapes" and not synthetic.MIN_IMAGE_SIZE <= self.image_size <= synthetic.MAX_IMAGE_SIZE:
            raise ConfigError(f"image_size must be within {synthetic.MIN_IMAGE_SIZE}-{synthetic.MAX_IMAGE_SIZE} px, "
                              f"got {self.image_size}")
        if self.source == "tones" and not synthetic.MIN_SAMPLE_RATE <= self.sample_rate <= synthetic.MAX_SAMPLE_RATE:
            raise ConfigError(f"sample_rate must be within {synthetic.MIN_SAMPLE_RATE}-{synthetic.MAX_SAMPLE_RATE} Hz, "
                              f"got {self.sample_rate}")


# ---------------------------------------------------------------- inputs


@dataclass(frozen=True)
class SourceItem:
    """One input sample of a folder or manifest, listed by the parent; read and checked by a worker."""

    key: str
    media_path: str
    caption: str | None = None
    """From the manifest; None for folders (then read from the sidecars)."""
    caption_path: str | None = None
    json_path: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    skip_reason: str | None = None
    """Set at listing time for problems only the whole list shows (duplicate keys)."""


@dataclass
class Sample:
    key: str
    files: dict[str, bytes]
    """extension -> bytes, e.g. {"jpg": ..., "txt": ..., "json": ...}."""


class SkippedSample(Exception):
    """One bad input sample: skipped, counted under `reason`."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def _join(base: str, relative: str) -> str:
    if storage.is_remote(relative) or os.path.isabs(relative):
        return relative
    return posixpath.join(base, relative) if storage.is_remote(base) else os.path.join(base, relative)


def _key_from_index(index: int) -> str:
    return synthetic.sample_key(index)


def list_folder(folder: str, storage_options: dict[str, Any]) -> list[SourceItem]:
    """Media files under `folder` (sorted by path) with their sidecar .txt/.json; keys are zero-padded indices."""
    fs, root = storage.url_to_fs(folder, storage_options)
    if not fs.isdir(root):
        raise ShardBuildError(f"input folder '{folder}' does not exist or is not a directory")
    paths = sorted(fs.find(root))
    present = set(paths)
    items, owner_of_stem = [], {}
    for path in paths:
        stem, _, ext = path.rpartition(".")
        ext = ext.lower()
        if ext not in IMAGE_EXTENSIONS and ext not in AUDIO_EXTENSIONS:
            continue
        url = fs.unstrip_protocol(path) if storage.is_remote(folder) else path
        key = _key_from_index(len(items))
        caption_path = stem + ".txt" if stem + ".txt" in present else None
        json_path = stem + ".json" if stem + ".json" in present else None
        if storage.is_remote(folder):
            caption_path = caption_path and fs.unstrip_protocol(caption_path)
            json_path = json_path and fs.unstrip_protocol(json_path)
        skip = None
        if stem in owner_of_stem:  # x.jpg and x.png would share one caption: ambiguous, keep the first
            skip = "duplicate_key"
        owner_of_stem.setdefault(stem, path)
        items.append(SourceItem(key, url, None, caption_path, json_path,
                                {"source_path": os.path.relpath(path, root) if not storage.is_remote(folder) else url}, skip))
    return items


def _manifest_format(path: str, fmt: str | None) -> str:
    if fmt:
        return fmt
    name = path.lower().split("?")[0]
    for suffix, found in ((".csv", "csv"), (".tsv", "tsv"), (".jsonl", "jsonl"), (".ndjson", "jsonl"),
                          (".parquet", "parquet")):
        if name.endswith(suffix):
            return found
    raise ShardBuildError(f"cannot tell the format of manifest '{path}' from its extension; pass --format "
                          f"({', '.join(MANIFEST_FORMATS)})")


def read_manifest_rows(path: str, fmt: str | None, storage_options: dict[str, Any]) -> tuple[list[str], list[dict]]:
    """(column names, rows) of a CSV/TSV/JSONL/Parquet table, local or remote."""
    fmt = _manifest_format(path, fmt)
    try:
        raw = storage.read_bytes(path, storage_options)
    except FileNotFoundError:
        raise ShardBuildError(f"manifest '{path}' does not exist") from None
    try:
        if fmt == "parquet":
            import pyarrow.parquet

            table = pyarrow.parquet.read_table(io.BytesIO(raw))
            return list(table.column_names), table.to_pylist()
        text = raw.decode("utf-8-sig")
        if fmt == "jsonl":
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
            if not all(isinstance(row, dict) for row in rows):
                raise ValueError("every line must be a JSON object")
            columns = list(dict.fromkeys(column for row in rows for column in row))
            return columns, rows
        reader = csv.DictReader(io.StringIO(text), delimiter="\t" if fmt == "tsv" else ",")
        rows = list(reader)
        return list(reader.fieldnames or []), rows
    except (ValueError, UnicodeDecodeError, OSError) as error:
        raise ShardBuildError(f"manifest '{path}' is not valid {fmt}: {error}") from None


def list_manifest(cfg: BuildConfig) -> list[SourceItem]:
    columns, rows = read_manifest_rows(cfg.input, cfg.format, cfg.storage_options)
    for role, column in (("path column", cfg.path_column), ("caption column", cfg.caption_column)):
        if column not in columns:
            raise ShardBuildError(f"manifest '{cfg.input}' has no {role} '{column}' (columns: {', '.join(columns)}); "
                                  f"name it with --{role.replace(' ', '-')}")
    base = posixpath.dirname(cfg.input) if storage.is_remote(cfg.input) else os.path.dirname(os.path.abspath(cfg.input))
    has_keys = cfg.key_column in columns
    items, seen = [], set()
    for row_number, row in enumerate(rows):
        media = row.get(cfg.path_column)
        key = _sanitize_key(str(row.get(cfg.key_column))) if has_keys else _key_from_index(row_number)
        identity = key if has_keys else media  # without keys, the same media twice is the duplicate
        skip = "duplicate_key" if identity in seen else None
        seen.add(identity)
        if not media:
            skip = skip or "missing_path"
        extra = {k: v for k, v in row.items() if k not in (cfg.path_column, cfg.caption_column, cfg.key_column)}
        extra["source_path"] = media
        caption = row.get(cfg.caption_column)
        items.append(SourceItem(key, _join(base, str(media)) if media else "", "" if caption is None else caption,
                                None, None, extra, skip))
    return items


def _sanitize_key(key: str) -> str:
    # webdataset splits a member name at the first dot: a key must not contain one (nor a path separator)
    return key.replace(".", "_").replace("/", "_").strip() or "_"


def _read_bytes(path: str, storage_options: dict[str, Any]) -> bytes:
    try:
        return storage.read_bytes(path, storage_options)
    except FileNotFoundError:
        raise SkippedSample("missing_file", path) from None
    except OSError as error:
        raise SkippedSample("unreadable_file", f"{path}: {error}") from None


def _decode_caption(data: bytes, where: str) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise SkippedSample("undecodable_caption", where) from None
    return text


def _clean_caption(caption: Any, where: str) -> str:
    if isinstance(caption, float) and caption != caption:  # NaN: an empty cell in a parquet/pandas table
        caption = ""
    caption = str(caption).strip()
    if not caption:
        raise SkippedSample("empty_caption", where)
    return caption


# ---------------------------------------------------------------- media


def _resized_size(width: int, height: int, target: int, mode: str) -> tuple[int, int]:
    """Size before any crop/pad: scaled down so that the constraint holds, never up."""
    if mode == "border":
        scale = min(1.0, target / max(width, height))
    else:
        scale = min(1.0, target / min(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def resize_image(data: bytes, ext: str, target: int, mode: str, quality: int) -> tuple[bytes, str]:
    """Decode (checking it is a valid image), resize as asked; bytes are kept as they are when nothing changes."""
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data))
        original = image.size
        new_size = _resized_size(*original, target, mode) if mode != "no" and target > 0 else original
        if new_size != original and image.format == "JPEG":
            # decode at a reduced DCT scale (still at least new_size): most of the decode time saved
            image.draft(image.mode if image.mode in ("RGB", "L") else "RGB", new_size)
        image.load()
    except Exception as error:  # PIL raises many types (OSError, SyntaxError, ValueError) for bad data
        raise SkippedSample("failed_to_decode", str(error)) from None
    if mode == "no" or target <= 0:
        return data, ext
    needs_crop = mode == "center_crop" and new_size[0] != new_size[1]
    needs_pad = mode == "border" and new_size != (target, target)
    if new_size == original and not needs_crop and not needs_pad:
        return data, ext  # already small enough: keep the original bytes
    try:
        if image.mode not in ("RGB", "L") and ext == "jpg":
            image = image.convert("RGB")
        elif image.mode not in ("RGB", "RGBA", "L", "LA"):
            image = image.convert("RGBA" if "A" in image.getbands() or "transparency" in image.info else "RGB")
        if new_size != image.size:
            image = image.resize(new_size, Image.BICUBIC, reducing_gap=3.0)
        if needs_crop:
            side = min(new_size)
            left, top = (new_size[0] - side) // 2, (new_size[1] - side) // 2
            image = image.crop((left, top, left + side, top + side))
        if needs_pad:  # paste centred on a black square: ImageOps.pad would scale the image up to fit
            canvas = Image.new(image.mode, (target, target))
            canvas.paste(image, ((target - image.size[0]) // 2, (target - image.size[1]) // 2))
            image = canvas
        buffer = io.BytesIO()
        options = {"quality": quality} if ext in ("jpg", "webp") else {}
        image.save(buffer, format=PIL_FORMATS[ext], **options)
    except Exception as error:
        raise SkippedSample("failed_to_resize", str(error)) from None
    return buffer.getvalue(), ext


def check_audio(data: bytes, ext: str) -> tuple[bytes, str]:
    """Decode fully (so corrupt files are caught); FLAC bytes are kept, WAV is re-encoded to FLAC."""
    import soundfile

    try:
        with soundfile.SoundFile(io.BytesIO(data)) as sound:
            waveform = sound.read(dtype="int32" if sound.subtype != "PCM_16" else "int16", always_2d=True)
            rate, subtype = sound.samplerate, sound.subtype
    except Exception as error:  # soundfile raises LibsndfileError/RuntimeError for bad data
        raise SkippedSample("failed_to_decode", str(error)) from None
    if waveform.shape[0] == 0:
        raise SkippedSample("failed_to_decode", "audio holds no samples")
    if ext == "flac":
        return data, "flac"
    buffer = io.BytesIO()
    try:
        soundfile.write(buffer, waveform, rate, format="FLAC", subtype="PCM_16" if subtype == "PCM_16" else "PCM_24")
    except Exception as error:
        raise SkippedSample("failed_to_encode", str(error)) from None
    return buffer.getvalue(), "flac"


def prepare_item(item: SourceItem, cfg: BuildConfig) -> Sample:
    """Read, check and convert one folder/manifest item; raises SkippedSample for a bad one."""
    if item.skip_reason:
        raise SkippedSample(item.skip_reason, item.media_path or item.key)
    ext = item.media_path.rpartition(".")[2].lower().split("?")[0]
    if ext not in IMAGE_EXTENSIONS and ext not in AUDIO_EXTENSIONS:
        raise SkippedSample("unsupported_format", item.media_path)
    metadata = dict(item.extra)
    captions = None
    if item.json_path:
        try:
            sidecar = json.loads(_read_bytes(item.json_path, cfg.storage_options))
        except (ValueError, UnicodeDecodeError):
            raise SkippedSample("undecodable_metadata", item.json_path) from None
        if isinstance(sidecar, dict):
            metadata.update(sidecar)
            captions = sidecar.get("captions")
    if item.caption is not None:
        caption = _clean_caption(item.caption, item.media_path)
    elif item.caption_path:
        caption = _clean_caption(_decode_caption(_read_bytes(item.caption_path, cfg.storage_options),
                                                 item.caption_path), item.caption_path)
    elif metadata.get("caption") is not None:
        caption = _clean_caption(metadata["caption"], item.json_path)
    elif isinstance(captions, list) and captions:
        caption = _clean_caption(captions[0], item.json_path)
    else:
        raise SkippedSample("missing_caption", item.media_path)
    data = _read_bytes(item.media_path, cfg.storage_options)
    if ext in IMAGE_EXTENSIONS:
        media, media_ext = resize_image(data, IMAGE_EXTENSIONS[ext], cfg.resize, cfg.resize_mode, cfg.jpeg_quality)
    else:
        media, media_ext = check_audio(data, ext)
    return Sample(item.key, {media_ext: media, "txt": caption.encode("utf-8"), "json": _json_bytes(metadata)})


def _json_bytes(metadata: dict[str, Any]) -> bytes:
    return json.dumps(metadata, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8")


def prepare_synthetic(index: int, cfg: BuildConfig) -> Sample:
    generated = synthetic.generate(cfg.source, cfg.seed, cfg.split, index, cfg.image_size, cfg.sample_rate)
    media, ext = generated.media, generated.media_ext
    if ext in PIL_FORMATS and cfg.resize:
        media, ext = resize_image(media, ext, cfg.resize, cfg.resize_mode, cfg.jpeg_quality)
    return Sample(generated.key, {ext: media, "txt": generated.caption.encode("utf-8"),
                                  "json": _json_bytes(generated.metadata)})


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
    return _sanitize_key(name).replace("_", "-") or "shards"


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
    bar = tqdm(total=total, desc=f"building {prefix}", unit="sample", disable=not progress, file=sys.stderr)
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


# ---------------------------------------------------------------- verify


@dataclass
class VerifyReport:
    shards: int = 0
    samples: int = 0
    problems: list[str] = field(default_factory=list)


class DamagedTar(Exception):
    """A tar that cannot be read to its end; `complete` samples came before the damage."""

    def __init__(self, complete: int, error: Exception):
        super().__init__(str(error))
        self.complete = complete


def _count_tar_samples(handle) -> tuple[int, list[str]]:
    """Samples in a tar stream, grouped as the loader groups them (shardformat.iter_samples, every member
    read so truncation is caught: DamagedTar, with the samples complete before it), and their problems."""
    keys, problems = [], []
    media_fields = set(shardformat.IMAGE_FIELDS) | set(shardformat.AUDIO_FIELDS)
    try:
        for sample in shardformat.iter_samples(handle):
            keys.append(sample.key)
            if sample.problem:
                problems.append(f"sample {sample.key} {shardformat.PROBLEMS[sample.problem]} (the loader skips it)")
                continue
            files = sample.files
            if not media_fields & set(files):
                problems.append(f"sample {sample.key} has no image/audio member")
            elif "txt" not in files:
                problems.append(f"sample {sample.key} has no .txt caption")
            else:
                try:
                    files["txt"].decode("utf-8")
                except UnicodeDecodeError:
                    problems.append(f"sample {sample.key} has a .txt caption that is not UTF-8 (the loader skips it)")
    except (tarfile.TarError, EOFError) as error:
        raise DamagedTar(len(keys), error) from error
    if len(set(keys)) != len(keys):
        problems.append("samples of one key are not contiguous or a key repeats")
    return len(keys), problems[:10]


def _expected_count(url: str, sizes: dict[str, int] | None, storage_options: dict) -> tuple[int | None, str]:
    """(the shard's listed count, where it is listed): sizes.json, else its *_stats.json (img2dataset)."""
    name = storage.base_name(url)
    if sizes and name in sizes:
        return sizes[name], "sizes.json"
    stats = shardformat.read_stats(url, storage_options)
    if stats is not None:
        return stats["successes"], storage.base_name(shardformat.stats_url(url))
    return None, ""


def _read_sizes(directory: str, report: VerifyReport, storage_options: dict) -> dict[str, int] | None:
    try:
        return shardformat.read_sizes(directory, storage_options)
    except shardformat.SizesError as error:
        report.problems.append(str(error))
        return None


def verify(urls: list[str], storage_options: dict[str, Any] | None = None, progress: bool = True) -> VerifyReport:
    """Check data set directories or shard URLs: tars readable, samples complete, per-shard counts equal
    sizes.json (or, without one, each shard's *_stats.json, as img2dataset writes; with neither, the
    loader counts the tar and so does this)."""
    import braceexpand

    storage_options = storage_options or {}
    report = VerifyReport()
    # (shard url, expected count or None, where the expectation comes from)
    targets: list[tuple[str, int | None, str]] = []
    for pattern in urls:
        for url in braceexpand.braceexpand(pattern):
            fs, path = storage.url_to_fs(url, storage_options)
            if path.endswith(".tar"):
                if not fs.exists(path):
                    report.problems.append(f"{url}: does not exist")
                    continue
                sizes = _read_sizes(posixpath.dirname(url), report, storage_options)
                targets.append((url, *_expected_count(url, sizes, storage_options)))
                continue
            if not fs.isdir(path):
                report.problems.append(f"{url}: neither a .tar shard nor a data set directory")
                continue
            sizes = _read_sizes(url, report, storage_options)
            shard_urls = storage.list_tars(url, storage_options)
            present = {storage.base_name(u) for u in shard_urls}
            if sizes is not None:
                for name in sorted(present - set(sizes)):
                    report.problems.append(f"{url}: shard {name} is not listed in sizes.json")
                for name, expected in sizes.items():
                    if name not in present:
                        report.problems.append(f"{url}: shard {name} listed in sizes.json is missing ({expected} samples)")
            targets += [(u, *_expected_count(u, sizes, storage_options)) for u in shard_urls
                        if sizes is None or storage.base_name(u) in sizes]
    for url, expected, listed_in in tqdm(targets, desc="verifying", unit="shard", disable=not progress,
                                         file=sys.stderr):
        report.shards += 1
        try:
            with storage.open_url(url, "rb", storage_options) as handle:
                count, problems = _count_tar_samples(handle)
        except DamagedTar as error:
            listed = f"; {listed_in} says {expected}" if expected is not None else ""
            report.problems.append(f"{url}: unreadable tar ({error}): {error.complete} complete samples before the "
                                   f"damage{listed}")
            report.samples += error.complete
            continue
        except OSError as error:
            report.problems.append(f"{url}: unreadable tar ({error})")
            continue
        report.samples += count
        report.problems += [f"{url}: {p}" for p in problems]
        if expected is not None and count != expected:
            report.problems.append(f"{url}: holds {count} samples but {listed_in} says {expected}")
    return report


# ---------------------------------------------------------------- ls


def list_samples(urls: list[str], storage_options: dict[str, Any] | None = None,
                 limit: int = 0) -> Iterator[dict[str, Any]]:
    """Every sample of the shards as the loader sees it (same reader, same grouping): {"shard", "key",
    "fields": {field: bytes}} plus "skipped": reason for a sample the loader skips at read."""
    import braceexpand

    storage_options = storage_options or {}
    shown = 0
    for pattern in urls:
        for source in braceexpand.braceexpand(pattern):
            fs, path = storage.url_to_fs(source, storage_options)
            shard_urls = [source] if path.endswith(".tar") or not fs.isdir(path) else storage.list_tars(source,
                                                                                                        storage_options)
            for url in shard_urls:
                with storage.open_shard(url, storage_options=storage_options) as stream:
                    for sample in shardformat.iter_samples(stream, wanted=lambda index: False):
                        record = {"shard": url, "key": sample.key, "fields": dict(sorted(sample.sizes.items()))}
                        if sample.problem:
                            record["skipped"] = sample.problem
                        yield record
                        shown += 1
                        if limit and shown >= limit:
                            return


# ---------------------------------------------------------------- CLI


def parse_storage_options(pairs: list[str]) -> dict[str, Any]:
    """["client_kwargs.endpoint_url=http://...", "anon=true"] -> nested dict (dots make sub-dicts), parsed as
    the trainer's dot-list overrides are (pipeline.core.args): values are YAML scalars."""
    try:
        return parse_overrides(pairs or [])
    except ConfigError as error:
        raise ConfigError(f"--storage-option: {error}") from None


# the build options' defaults are BuildConfig's, declared once
_BUILD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(BuildConfig)}


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where there is one (options whose default depends on the source say so)."""

    def _get_help_string(self, action):
        if action.default is None or action.default == [] or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _add_storage_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                        help="fsspec option for remote paths, repeatable; dots nest, e.g. "
                             "client_kwargs.endpoint_url=http://127.0.0.1:9000, key=..., secret=..., anon=true")


def register_cli(subparsers) -> None:
    parser = subparsers.add_parser("shards", help="build, verify, list or index WebDataset tar shards",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="shards_command", metavar="{build,verify,ls,index}")
    parser.set_defaults(func=lambda args: parser.print_help() or 2)

    build = commands.add_parser(
        "build", help="build shards from an embedded set, a folder or a manifest",
        description="Build WebDataset shards ({prefix}-{index:06d}.tar, sizes.json, *_stats.json, classes.json). "
                    "Bad samples (corrupt or missing media, empty captions, duplicate keys) are skipped and "
                    "counted; a missing manifest column or an unwritable output stops the build at once, and a "
                    "build that writes no sample fails; a failed build leaves no output directory it created.",
        formatter_class=_DefaultsFormatter)
    build.add_argument("--source", choices=SOURCES, required=True,
                       help="shapes/tones: the embedded generated sets; folder: media files with sidecar .txt/.json "
                            "captions; manifest: a table with a path and a caption column")
    build.add_argument("--output", required=True, help="local directory or fsspec URL (s3://bucket/prefix)")
    build.add_argument("--split", choices=synthetic.SPLITS, default=_BUILD_DEFAULTS["split"],
                       help="embedded sets: train, or val (held out: a different random stream)")
    build.add_argument("--count", type=int, default=None,
                       help="embedded sets: samples to generate (default: shapes 10000/1000, tones 3000/500 for "
                            "train/val)")
    build.add_argument("--seed", type=int, default=_BUILD_DEFAULTS["seed"], help="embedded sets: seed; same seed, same bytes")
    build.add_argument("--image-size", type=int, default=_BUILD_DEFAULTS["image_size"], help="shapes: image side in pixels (64-224)")
    build.add_argument("--sample-rate", type=int, default=_BUILD_DEFAULTS["sample_rate"], help="tones: sample rate in Hz (16000-48000)")
    build.add_argument("--input", default=None,
                       help="folder: the directory (images jpg/png/webp or audio flac/wav, sidecar .txt and/or "
                            ".json with 'caption' or 'captions'); manifest: the table's path or URL")
    build.add_argument("--path-column", default=_BUILD_DEFAULTS["path_column"],
                       help="manifest: column of media paths (local, relative to the manifest, or fsspec URLs)")
    build.add_argument("--caption-column", default=_BUILD_DEFAULTS["caption_column"], help="manifest: column of captions")
    build.add_argument("--key-column", default=_BUILD_DEFAULTS["key_column"],
                       help="manifest: column of sample keys, used when present (dots become '_'); "
                            "otherwise keys are zero-padded row numbers. Other columns go into each .json")
    build.add_argument("--format", choices=MANIFEST_FORMATS, default=None,
                       help="manifest format (default: from the extension)")
    build.add_argument("--prefix", default=None,
                       help="shard name prefix (default: SOURCE-SPLIT for embedded sets, else the input's name)")
    build.add_argument("--samples-per-shard", type=int, default=None,
                       help="input samples per shard (default 1000, tones 500); skipped ones leave it smaller")
    build.add_argument("--max-shard-bytes", type=int, default=0,
                       help="start a new shard before one would exceed this many bytes (0: no limit)")
    build.add_argument("--resize", type=int, default=_BUILD_DEFAULTS["resize"],
                       help="images: target size in pixels of the shorter side (keep_ratio) or of the square "
                            "(center_crop, border); never upscales; 0: keep images as they are")
    build.add_argument("--resize-mode", choices=RESIZE_MODES, default=_BUILD_DEFAULTS["resize_mode"],
                       help="no: keep; keep_ratio: shorter side to --resize; center_crop: then crop the centre "
                            "square; border: longer side to --resize, then pad to a square")
    build.add_argument("--jpeg-quality", type=int, default=_BUILD_DEFAULTS["jpeg_quality"], help="quality of re-encoded JPEG/WebP images")
    build.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                       help="worker processes, each building whole shards; the output is the same for any number")
    _add_storage_option(build)
    build.add_argument("--quiet", action="store_true", help="no progress bar")
    build.set_defaults(func=_run_build)

    check = commands.add_parser(
        "verify", help="check shards: tars readable, counts equal sizes.json or *_stats.json",
        description="Check data set directories or shard URLs (local or fsspec, brace patterns allowed): every "
                    "tar readable to the end, every sample has media and a caption (samples grouped as the loader "
                    "groups them), per-shard counts equal sizes.json or, without one, each shard's *_stats.json "
                    "(img2dataset). Lists the problems; exits 1 when there is any, 2 when there is no shard to check.")
    check.add_argument("urls", nargs="+", metavar="URL", help="data set directory or shard (.tar) URL")
    _add_storage_option(check)
    check.add_argument("--quiet", action="store_true", help="no progress bar")
    check.set_defaults(func=_run_verify)

    listing = commands.add_parser(
        "ls", help="list each sample's key and fields with their sizes, as the loader sees them",
        description="List the samples of shards exactly as the loader groups them (webdataset's keys: the "
                    "member name up to the first dot of its base name, directory included; the field is the "
                    "rest, lower-cased; names webdataset skips, such as .hidden or macOS ._* files, are "
                    "skipped). One line per sample: KEY  FIELD=BYTES ...; a sample the loader skips (a member "
                    "name twice) is marked 'skipped: REASON'. Samples are read in shard order without decoding. "
                    "Where there is no sample to list, it says so and exits 2.",
        formatter_class=_DefaultsFormatter)
    listing.add_argument("urls", nargs="+", metavar="URL",
                         help="data set directory, shard (.tar) URL or brace pattern, local or fsspec")
    listing.add_argument("--limit", type=int, default=0, help="stop after this many samples (0: all)")
    listing.add_argument("--json", action="store_true",
                         help='one JSON object per sample: {"shard": URL, "key": KEY, "fields": {"jpg": 10233, '
                              '"txt": 41}} (and "skipped": REASON where the loader skips it)')
    _add_storage_option(listing)
    listing.set_defaults(func=_run_ls)

    index = commands.add_parser(
        "index", help="write sizes.json for an existing data set directory (img2dataset output, or tars only)",
        description="Write URL/sizes.json (shard name -> samples, open_clip's form) for the *.tar directly in a "
                    "data set directory, local or fsspec (s3://bucket/laion400m). Each count is the shard's "
                    "*_stats.json 'successes' where img2dataset wrote one, else the samples counted in the tar "
                    "(grouped as the loader groups them; a damaged tar counts the samples before the damage, "
                    "with a warning naming it). Shards are read on --workers threads. With a sizes.json, a "
                    "training run reads one file per directory at start instead of one per shard. Prints the "
                    "totals; an existing sizes.json is replaced only with --force (and is not read then).",
        formatter_class=_DefaultsFormatter)
    index.add_argument("url", metavar="URL", help="data set directory or prefix holding the *.tar shards")
    index.add_argument("--workers", type=int, default=shardindex.READ_THREADS,
                       help="threads reading *_stats.json files or counting tars")
    index.add_argument("--force", action="store_true", help="replace an existing sizes.json")
    _add_storage_option(index)
    index.add_argument("--quiet", action="store_true", help="no progress bar")
    index.set_defaults(func=_run_index)


def _run_build(args) -> int:
    cfg = BuildConfig(
        source=args.source, output=args.output, split=args.split, count=args.count, seed=args.seed,
        image_size=args.image_size, sample_rate=args.sample_rate, input=args.input,
        path_column=args.path_column, caption_column=args.caption_column, key_column=args.key_column,
        format=args.format, prefix=args.prefix, samples_per_shard=args.samples_per_shard,
        max_shard_bytes=args.max_shard_bytes or None, resize=args.resize, resize_mode=args.resize_mode,
        jpeg_quality=args.jpeg_quality, workers=args.workers,
        storage_options=parse_storage_options(args.storage_option),
    )
    print(build_shards(cfg, progress=not args.quiet).describe())
    return 0


def _run_verify(args) -> int:
    report = verify(args.urls, parse_storage_options(args.storage_option), progress=not args.quiet)
    if not report.shards and not report.problems:  # an empty directory: nothing was checked
        raise ConfigError(f"no .tar shards found at {', '.join(repr(url) for url in args.urls)}: nothing to verify")
    for problem in report.problems:
        print(f"problem: {problem}")
    print(f"{report.shards} shards, {report.samples} samples, {len(report.problems)} problems")
    return 1 if report.problems else 0


def _run_ls(args) -> int:
    if args.limit < 0:
        raise ConfigError(f"--limit must be >= 0, got {args.limit}")
    listed = 0
    try:
        for record in list_samples(args.urls, parse_storage_options(args.storage_option), args.limit):
            listed += 1
            if args.json:
                print(json.dumps(record))
                continue
            fields = "  ".join(f"{name}={size}" for name, size in record["fields"].items())
            skipped = f"  (skipped: {record['skipped']})" if "skipped" in record else ""
            print(f"{record['key']}  {fields}{skipped}")
    except FileNotFoundError as error:
        raise ConfigError(f"not found: {error}") from None
    except (tarfile.TarError, EOFError) as error:
        raise UnreadableShard(f"damaged tar ({error})") from None
    except BrokenPipeError:  # the reader stopped early (`| head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python flushes stdout again at exit
        return 0
    if not listed:
        raise ConfigError(f"no samples found at {', '.join(repr(url) for url in args.urls)}: nothing to list")
    return 0


def _run_index(args) -> int:
    if args.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {args.workers}")
    try:
        summary = shardindex.write_sizes_json(args.url, parse_storage_options(args.storage_option),
                                              threads=args.workers, force=args.force, progress=not args.quiet)
    except shardformat.SizesError as error:
        raise ConfigError(str(error)) from None
    except shardindex.ShardIndexError as error:  # names the shard
        raise UnreadableShard(f"cannot read shard {error}") from None
    print(summary.describe())
    return 0
