"""One sample from its tar members to tensors: caption choice, label, media decoding and augmentation (seeded
per sample, so a resumed run gives the same tensors), and a part's collation into a Batch."""

from __future__ import annotations

import io
import json
import logging
import random
from collections import Counter

import torch
from torch.utils.data import get_worker_info

from pipeline.data import shardformat
from pipeline.data.config import Batch, DataConfig
from pipeline.data.reader import Entry
from pipeline.media import imagedecode

log = logging.getLogger("pipeline.data")


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


class RateLimitedLog:
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


class SampleDecoder:
    """Decodes entries into (media, caption, label) and collates them; the model side gives the transforms."""

    def __init__(self, cfg: DataConfig, media_transform, tokenizer, train: bool, image_size: int | None):
        self.cfg, self.media_transform, self.tokenizer = cfg, media_transform, tokenizer
        self.train, self.image_size = train, image_size
        # data.decode=gpu: workers hand over JPEG bytes and crops, the training process decodes (imagedecode)
        self.device_crop = (imagedecode.DeviceCrop(media_transform)
                            if cfg.decode == "gpu" and train and cfg.modality == "image" else None)

    def decode(self, entry: Entry, sample_seed: int, note) -> tuple | None:
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
            media = self.decode_media(files[media_ext], sample_seed)
        except Exception as error:
            note("corrupt_media", entry.url, entry.key, f"{type(error).__name__}: {error}")
            return None
        return media, caption, label

    def decode_media(self, data: bytes, sample_seed: int) -> torch.Tensor:
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

    def collate(self, samples: list[tuple], keys: list[str]) -> Batch:
        if self.device_crop is not None:
            media = imagedecode.collate([sample[0] for sample in samples], self.device_crop.size)
        else:
            media = _stack([sample[0] for sample in samples])
        tokens = self.tokenizer([sample[1] for sample in samples])
        labels = torch.tensor([sample[2] for sample in samples], dtype=torch.long)
        return Batch(media, tokens, keys, labels, torch.tensor([key != "" for key in keys], dtype=torch.bool))
