"""What a shard build is asked for: `BuildConfig` (the flags of `shards build`, one to one), its choices, and
`ShardBuildError`, how a build that cannot start or writes nothing fails. The builder is pipeline.shards.build,
the inputs it reads pipeline.shards.sources.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.core.errors import ConfigError
from pipeline.shards import synthetic

RESIZE_MODES = ("no", "keep_ratio", "center_crop", "border")
MANIFEST_FORMATS = ("csv", "tsv", "jsonl", "parquet")
SOURCES = ("shapes", "tones", "folder", "manifest")


class ShardBuildError(ConfigError):
    """The build cannot start or go on (bad manifest, unwritable output) or wrote nothing (no input, every input
    skipped): the message names the cause. The build leaves nothing behind in an output it created."""


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
