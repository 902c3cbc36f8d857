"""The loader on a real S3 endpoint (moto's server on loopback): the same batches as from local disk,
a local cache of remote shards, and a shard that keeps failing is retried, then skipped and counted."""

from __future__ import annotations

from pathlib import Path

import s3fs
import torch

from tests.data.test_data import assert_same_batches, make_loader, read_all
from tests.data_fixtures import all_keys, write_dataset

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


def test_deleted_s3_shard_is_named_at_start_not_retried_and_marked(s3_server, tmp_path, caplog):
    write_dataset(tmp_path / "local", SIZES)
    upload(s3_server, tmp_path / "local", "loader-data", "deleted")
    # sizes.json still lists the shard, but its object is gone: one listing of the prefix tells
    s3fs.S3FileSystem(**s3_server.storage_options).rm("loader-data/deleted/data-000001.tar")
    with caplog.at_level("WARNING", logger="pipeline.data"):
        loader = make_loader("s3://loader-data/deleted/data-{000000..000002}.tar", workers=2, retries=2,
                             retry_backoff=0.01, storage_options=s3_server.storage_options)
    told = [r.getMessage() for r in caplog.records if "data-000001.tar" in r.getMessage()]
    assert len(told) == 1 and "1 shards listed in sizes.json holding 10 samples are not there" in told[0]
    batches = read_all(loader)
    assert len(batches) == len(loader) == 6  # 24 samples / (2 workers x 4): full batches regardless
    keys = [k for b in batches for k in b.keys]
    assert not any(k.startswith("data01") for k in keys)
    assert loader.stats["shards_not_found"] == 1 and loader.stats["shards_failed"] == 0
    assert loader.stats["shard_retries"] == 0  # not there is not transient
    assert loader.stats["skipped_shard_not_found"] == 10
    assert loader.stats["samples_filled"] == 10 == sum(int((~b.valid).sum()) for b in batches)
    assert keys.count("") == 10 and len(set(keys) - {""}) == 14
    assert all(torch.isfinite(b.media).all() for b in batches)


def test_s3_shard_deleted_after_start_is_not_retried(s3_server, tmp_path, caplog):
    write_dataset(tmp_path / "local", SIZES)
    upload(s3_server, tmp_path / "local", "loader-data", "vanishing")
    loader = make_loader("s3://loader-data/vanishing/data-{000000..000002}.tar", workers=0, retries=3,
                         retry_backoff=0.01, storage_options=s3_server.storage_options)
    s3fs.S3FileSystem(**s3_server.storage_options).rm("loader-data/vanishing/data-000002.tar")
    with caplog.at_level("WARNING", logger="pipeline.data"):
        batches = read_all(loader)
    assert len(batches) == len(loader) == 6
    assert loader.stats["shard_retries"] == 0 and loader.stats["shards_failed"] == 0
    assert loader.stats["shards_not_found"] == 1 and loader.stats["skipped_shard_not_found"] == 8
    told = [r.getMessage() for r in caplog.records if "not found" in r.getMessage()]
    assert len(told) == 1 and "s3://loader-data/vanishing/data-000002.tar" in told[0]
