"""The data layer's config section (`DataConfig`, `data.*` in a run config) and what a loader yields (`Batch`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from pipeline.core.errors import ConfigError


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
    canonical_streams: int = 0
    """Streams every training epoch is cut into, whatever the layout (pipeline.data.plan): global batch i is the
    same slice of every stream, so any world size x workers x accumulation that fits reads the same batches and
    gives the same loss curve. Fits when world_size x workers divides it and it divides world_size x
    micro-batch. Fixed for a run (saved in the checkpoint). 0: world_size x workers of the run's first start."""
    shuffle_buffer: int = 1000
    """Samples held by each canonical stream's shuffle buffer (raw bytes, decoded on the way out; a worker holds
    one per stream it serves); 0 or 1: no shuffle."""
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
        for key in ("workers", "canonical_streams", "shuffle_buffer", "epoch_samples", "retries", "retry_max_s", "read_timeout_s",
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
