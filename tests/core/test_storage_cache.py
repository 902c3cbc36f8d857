"""The size-limited cache of remote shards (storage.cached_copy / evict_cached, data.cache_max_gb), on the
real moto S3 server: least recently used shards go first, the cache stays under its limit, a shard
that a reader of another process holds is never deleted, and the loader yields the same samples with
the limit as without the cache."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import pytest

from pipeline.core import storage
from tests.data.test_data import make_loader, read_all
from tests.data.test_data_s3 import upload
from tests.data_fixtures import write_dataset, write_tar

SHARDS = 5
PAYLOAD = 20_000  # bytes of each shard's one sample: every shard has the same size


@pytest.fixture(scope="module")
def remote(s3_server, tmp_path_factory) -> tuple[list[str], list[bytes]]:
    """Five equal-sized tar shards on S3: (their URLs, their bytes)."""
    local = tmp_path_factory.mktemp("cache-shards")
    for index in range(SHARDS):
        write_tar(local / f"part-{index:06d}.tar", [(f"sample{index}", {"bin": os.urandom(PAYLOAD)})])
    upload(s3_server, local, "cache-test", "equal")
    names = sorted(path.name for path in local.iterdir())
    return [f"s3://cache-test/equal/{name}" for name in names], [(local / name).read_bytes() for name in names]


def read(url: str, cache: Path, limit: int, options: dict, timeout: float = 30.0) -> bytes:
    with storage.open_shard(url, storage_options=options, cache_dir=str(cache), cache_max_bytes=limit,
                            read_timeout_s=timeout) as stream:
        return stream.read()


def cached(cache: Path) -> dict[str, int]:
    """Shard name -> bytes of every finished copy in the cache."""
    return {path.name.split("-", 1)[1]: path.stat().st_size for path in cache.iterdir()
            if "-" in path.name and not path.name.endswith(".partial")}


def test_lru_eviction_keeps_the_cache_under_its_limit(remote, s3_server, tmp_path, caplog):
    urls, data = remote
    size = len(data[0])
    assert all(len(shard) == size for shard in data)
    limit = int(2.5 * size)
    cache, options = tmp_path / "cache", s3_server.storage_options
    with caplog.at_level("INFO", logger="pipeline.core.storage"):
        for index in (0, 1, 2):
            assert read(urls[index], cache, limit, options) == data[index]
            assert sum(cached(cache).values()) <= limit
        assert sorted(cached(cache)) == ["part-000001.tar", "part-000002.tar"]  # the oldest went
        assert len([r for r in caplog.records if "evicted 1 least recently used" in r.getMessage()]) == 1

        # 1 read again (from the cache: the same file, not a new download) is now more recent than 2
        inode = next(p for p in cache.iterdir() if p.name.endswith("part-000001.tar")).stat().st_ino
        assert read(urls[1], cache, limit, options, timeout=0) == data[1]
        assert next(p for p in cache.iterdir() if p.name.endswith("part-000001.tar")).stat().st_ino == inode
        assert read(urls[3], cache, limit, options) == data[3]
        assert sorted(cached(cache)) == ["part-000001.tar", "part-000003.tar"]
        assert read(urls[4], cache, limit, options, timeout=0) == data[4]
        assert sorted(cached(cache)) == ["part-000003.tar", "part-000004.tar"]

        # an evicted shard needed again is downloaded again
        assert read(urls[0], cache, limit, options) == data[0]
        assert sorted(cached(cache)) == ["part-000000.tar", "part-000004.tar"]
    passes = [r.getMessage() for r in caplog.records if "evicted" in r.getMessage()]
    assert len(passes) == 4 and all(f"evicted 1 least recently used shards ({size} bytes)" in line for line in passes)


def test_no_limit_keeps_every_shard_and_other_files_are_left_alone(remote, s3_server, tmp_path):
    urls, data = remote
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "notes.txt").write_bytes(b"x" * 10 * len(data[0]))  # not a cached copy: never evicted
    (cache / f"{'0' * 12}-old.tar.1.2.partial").write_bytes(b"x" * len(data[0]))  # a download in progress
    for url, shard in zip(urls, data):
        assert read(url, cache, 0, s3_server.storage_options) == shard
    assert len(cached(cache)) == SHARDS
    assert read(urls[0], cache, 1, s3_server.storage_options) == data[0]  # a hit: no eviction pass
    assert len(cached(cache)) == SHARDS
    assert storage.evict_cached(str(cache), 1) == (SHARDS, SHARDS * len(data[0]))
    assert sorted(p.name for p in cache.iterdir()) == [f"{'0' * 12}-old.tar.1.2.partial", "notes.txt"]


def test_a_shard_larger_than_the_limit_stays_while_read(remote, s3_server, tmp_path, caplog):
    urls, data = remote
    cache, options = tmp_path / "cache", s3_server.storage_options
    limit = len(data[0]) // 2
    with caplog.at_level("INFO", logger="pipeline.core.storage"):
        with storage.open_shard(urls[0], storage_options=options, cache_dir=str(cache), cache_max_bytes=limit) as stream:
            assert sorted(cached(cache)) == ["part-000000.tar"]
            assert stream.read() == data[0]
        over = [r.getMessage() for r in caplog.records if "over its limit" in r.getMessage()]
        assert len(over) == 1 and "1 shards in use" in over[0]
        assert read(urls[1], cache, limit, options) == data[1]
    assert sorted(cached(cache)) == ["part-000001.tar"]  # 0 went at the next pass; 1 stayed while read


def _hold_shard(url, cache, limit, options, ready, release, results) -> None:
    """Another process (a DataLoader worker of another rank): opens a shard through the cache, reads a
    little, says so, and keeps it open until told; then reads the rest."""
    with storage.open_shard(url, storage_options=options, cache_dir=cache, cache_max_bytes=limit) as stream:
        head = stream.read(100)
        ready.set()
        if not release.wait(60):
            results.put(None)
            return
        results.put(head + stream.read())


def test_a_shard_held_by_another_process_is_not_evicted(remote, s3_server, tmp_path, caplog):
    urls, data = remote
    cache, options = tmp_path / "cache", s3_server.storage_options
    limit = int(2.5 * len(data[0]))
    context = multiprocessing.get_context("spawn")
    ready, release, results = context.Event(), context.Event(), context.Queue()
    holder = context.Process(target=_hold_shard, args=(urls[0], str(cache), limit, options, ready, release, results))
    holder.start()
    try:
        assert ready.wait(60), "the holding process did not open its shard"
        with caplog.at_level("INFO", logger="pipeline.core.storage"):
            for index in (1, 2, 3):  # 0 is the least recently used, but held: 1 and then 2 go instead
                assert read(urls[index], cache, limit, options) == data[index]
                assert "part-000000.tar" in cached(cache)
                assert sum(cached(cache).values()) <= limit
        assert sorted(cached(cache)) == ["part-000000.tar", "part-000003.tar"]
        assert all("passing over 1 in use" in r.getMessage() for r in caplog.records if "evicted" in r.getMessage())
        release.set()
        assert results.get(timeout=60) == data[0]  # the holder read its whole shard
        holder.join(60)
        assert holder.exitcode == 0
    finally:
        release.set()
        holder.join(10)
        if holder.is_alive():
            holder.kill()
    assert read(urls[4], cache, limit, options) == data[4]  # released: now 0 is simply the oldest
    assert sorted(cached(cache)) == ["part-000003.tar", "part-000004.tar"]


def test_loader_with_a_limited_cache_reads_the_same_samples(s3_server, tmp_path):
    local = tmp_path / "local"
    write_dataset(local, [8] * 5)
    upload(s3_server, local, "cache-test", "loader")
    largest = max(path.stat().st_size for path in local.glob("*.tar"))
    limit = int(2.5 * largest)
    urls = "s3://cache-test/loader/data-{000000..000004}.tar"
    options = s3_server.storage_options
    cache = tmp_path / "cache"

    def two_epochs(**settings) -> list[list[str]]:
        loader = make_loader(urls, workers=2, storage_options=options, **settings)
        epochs = []
        for epoch in range(2):
            loader.set_epoch(epoch)
            epochs.append([key for batch in read_all(loader) for key in batch.keys])
        return epochs

    plain = two_epochs()
    with_cache = two_epochs(cache_dir=str(cache), cache_max_gb=limit / 10**9)
    assert with_cache == plain and all(len(keys) == 40 for keys in plain)
    left = cached(cache)
    assert 0 < len(left) < 5 and sum(left.values()) <= limit


def test_cache_max_gb_counts_decimal_gigabytes(tmp_path, monkeypatch):
    from pipeline.data import reader as data

    opened = []
    monkeypatch.setattr(storage, "open_shard", lambda url, **settings: opened.append(settings["cache_max_bytes"]))
    for gigabytes, expected in ((1.5, 1_500_000_000), (0.25, 250_000_000), (0.0, 0)):
        cfg = data.DataConfig(train_urls="s3://bucket/x.tar", cache_dir=str(tmp_path), cache_max_gb=gigabytes)
        data.open_shard("s3://bucket/x.tar", cfg)
        assert opened[-1] == expected  # 2**30 per GB would give 1,610,612,736 for 1.5
