"""The loader on a real S3 endpoint (moto's server on loopback): the same batches as from local disk,
a local cache of remote shards, and a shard that keeps failing is retried, then skipped and counted."""

from __future__ import annotations

from pathlib import Path

import s3fs
import torch

from tests.data_fixtures import all_keys, write_dataset
from tests.test_data import assert_same_batches, make_loader, read_all

SIZES = [6, 10, 8]


def upload(server, local: Path, bucket: str, prefix: str) -> None:
    fs = s3fs.S3FileSystem(**server.storage_options)
    if not fs.exists(bucket):
        fs.mkdir(bucket)
    for path in sorted(local.iterdir()):
        fs.put_file(str(path), f"{bucket}/{prefix}/{path.name}")


def test_s3_reads_equal_local_reads_and_cache(s3_server, tmp_path):
    write_dataset(tmp_path / "local", SIZES)
    upload(s3_server, tmp_path / "local", "loader-data", "train")
    local = read_all(make_loader(tmp_path / "local"))
    remote = read_all(make_loader("s3://loader-data/train", storage_options=s3_server.storage_options))
    assert_same_batches(remote, local)

    cache = tmp_path / "cache"
    cached_loader = make_loader("s3://loader-data/train/data-{000000..000002}.tar", workers=0,
                                storage_options=s3_server.storage_options, cache_dir=str(cache))
    cached = read_all(cached_loader)
    assert sorted(p.name.split("-", 1)[1] for p in cache.iterdir()) == [f"data-{i:06d}.tar" for i in range(3)]
    assert sorted(k for b in cached for k in b.keys) == sorted(all_keys(SIZES))


def test_failing_s3_shard_is_retried_then_skipped_and_counted(s3_server, tmp_path):
    write_dataset(tmp_path / "local", SIZES)
    upload(s3_server, tmp_path / "local", "loader-data", "flaky")
    # sizes.json still lists the shard, but its object is gone: every attempt fails
    s3fs.S3FileSystem(**s3_server.storage_options).rm("loader-data/flaky/data-000001.tar")
    loader = make_loader("s3://loader-data/flaky/data-{000000..000002}.tar", workers=2, retries=2,
                         retry_backoff=0.01, storage_options=s3_server.storage_options)
    batches = read_all(loader)
    assert len(batches) == len(loader) == 6  # 24 samples / (2 workers x 4): full batches regardless
    keys = [k for b in batches for k in b.keys]
    assert not any(k.startswith("data01") for k in keys)
    assert loader.stats["shards_failed"] == 1
    assert loader.stats["shard_retries"] == 2  # two retries after the first failure, then skipped
    assert loader.stats["skipped_shard_failed"] == 10
    assert loader.stats["samples_filled"] == 10
    assert all(torch.isfinite(b.media).all() for b in batches)
