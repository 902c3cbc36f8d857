"""The loader's counters (`StreamingLoader.stats`): what each counts, and their sum over ranks."""

from __future__ import annotations

import torch

STAT_MEANINGS = {
    "samples_read": "real samples delivered",
    "samples_filled": "training slots without a real sample (Batch.valid False, left out of the loss): one per "
                      "skipped sample",
    "samples_padded": "evaluation slots past the end of a stream's range, or of a skipped sample (left out of the "
                      "figures)",
    "samples_remainder": "samples not read: the end of an epoch that does not fill one more global batch "
                         "(counted once per epoch started; the next epoch drops a different stretch)",
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
