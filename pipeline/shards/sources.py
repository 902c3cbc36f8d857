"""Where the samples of a build come from, and how each becomes the files of one tar sample: a folder (media
files with sidecar .txt/.json captions) or a manifest (a CSV/TSV/JSONL/Parquet table of paths and captions),
listed up front by the parent (`list_folder`, `list_manifest`), then read, checked and converted by a worker
(`prepare_item`: images decoded and resized, audio decoded, WAV re-encoded to FLAC); and the embedded
generated sets (`prepare_synthetic`, from pipeline.shards.synthetic). A bad input raises SkippedSample, which
the builder (pipeline.shards.build) counts under its reason; an input that cannot be listed at all raises
ShardBuildError.
"""

from __future__ import annotations

import csv
import io
import json
import os
import posixpath
from dataclasses import dataclass, field
from typing import Any

from pipeline.core import storage
from pipeline.shards import synthetic
from pipeline.shards.config import MANIFEST_FORMATS, BuildConfig, ShardBuildError

IMAGE_EXTENSIONS = {"jpg": "jpg", "jpeg": "jpg", "png": "png", "webp": "webp"}
AUDIO_EXTENSIONS = {"flac": "flac", "wav": "wav"}
PIL_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}


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
        key = sanitize_key(str(row.get(cfg.key_column))) if has_keys else _key_from_index(row_number)
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


def sanitize_key(key: str) -> str:
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


# ---------------------------------------------------------------- samples


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
