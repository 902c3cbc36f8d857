"""Streaming loader on real ranks (gloo processes) with real DataLoader workers: exactly once over
uneven shards, fewer shards than rank x worker streams, and planted bad data with equal batch counts."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.data_fixtures import all_keys, write_bad_dataset, write_dataset
from tests.distributed_helpers import run_ranks


def read_jobs(rank, world_size, jobs):
    """Several data sets in one spawn (starting processes is the expensive part)."""
    return [read_epochs(rank, world_size, *job) for job in jobs]


def read_epochs(rank, world_size, urls, batch_size, workers, epochs):
    """On each rank: read `epochs` epochs; return keys per epoch, batch counts and stats. Batch
    counts are also checked with an all_reduce, the collective a trainer would hang in."""
    import open_clip

    from pipeline.data.config import DataConfig
    from pipeline.data.loader import build_loader, sum_stats_across_ranks

    cfg = DataConfig(train_urls=urls, batch_size=batch_size, workers=workers, shuffle_buffer=6,
                     retries=1, retry_backoff=0.01)
    loader = build_loader(cfg, urls, rank=rank, world_size=world_size, seed=3,
                          media_transform=open_clip.image_transform(16, is_train=True),
                          tokenizer=open_clip.get_tokenizer("ViT-B-32"), image_size=16)
    result = {"len": len(loader), "epochs": [], "counts": [], "invalid": []}
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        keys, count, invalid = [], 0, 0
        for batch in loader:
            assert batch.media.shape[0] == batch_size
            assert batch.valid.tolist() == [key != "" for key in batch.keys]  # marked slots: key ""
            keys.extend(batch.keys)
            invalid += int((~batch.valid).sum())
            count += 1
            dist.all_reduce(torch.ones(1))  # a rank with fewer batches would hang here
        result["epochs"].append(keys)
        result["counts"].append(count)
        result["invalid"].append(invalid)
    result["stats"] = dict(loader.stats)
    result["summed"] = sum_stats_across_ranks(loader.stats)
    return result


SIZES = [7, 13, 3, 21, 10, 5]  # 59 samples, uneven
BAD_SIZES = [8, 8, 8, 8]


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    """Per data set, the results of both ranks: uneven (2 epochs), two shards, planted bad data."""
    root = tmp_path_factory.mktemp("ranks")
    write_dataset(root / "uneven", SIZES)
    write_dataset(root / "two", [9, 8], prefix="two")
    planted = write_bad_dataset(root / "bad", BAD_SIZES)
    jobs = [(str(root / "uneven"), 4, 2, 2), (str(root / "two"), 2, 2, 1), (str(root / "bad"), 4, 2, 1)]
    per_rank = run_ranks(read_jobs, 2, jobs)
    results = {name: [per_rank[0][i], per_rank[1][i]] for i, name in enumerate(["uneven", "two", "bad"])}
    results["planted"] = planted
    return results


def test_exactly_once_two_ranks_two_workers(rank_results):
    batch_size, world_size = 4, 2
    results = rank_results["uneven"]
    steps = sum(SIZES) // (world_size * batch_size)  # 7 global batches of 8 (4 canonical streams x 2 each)
    for result in results:
        assert result["counts"] == [result["len"]] * 2 == [steps] * 2
    for epoch in range(2):
        keys = results[0]["epochs"][epoch] + results[1]["epochs"][epoch]
        assert len(keys) == len(set(keys)), "a sample was read twice in one epoch"
        missing = all_keys(SIZES) - set(keys)
        assert len(missing) == sum(SIZES) - steps * world_size * batch_size  # the documented remainder, 3
        assert set(keys) <= all_keys(SIZES)
    assert results[0]["epochs"][0] != results[0]["epochs"][1]


def test_fewer_shards_than_streams(rank_results):
    # 2 shards for 4 streams: ranges cut through shards, every stream still gets whole batches
    results = rank_results["two"]
    keys = results[0]["epochs"][0] + results[1]["epochs"][0]
    assert results[0]["counts"] == results[1]["counts"] == [4]
    assert len(keys) == len(set(keys)) == 16 and set(keys) <= all_keys([9, 8], prefix="two")


def test_bad_data_is_skipped_counted_and_marked(rank_results):
    results, planted = rank_results["bad"], rank_results["planted"]
    assert results[0]["counts"] == results[1]["counts"] == [results[0]["len"]] == [4]
    stats = {}
    for result in results:
        for name, value in result["stats"].items():
            stats[name] = stats.get(name, 0) + value
    keys = results[0]["epochs"][0] + results[1]["epochs"][0]
    for bad in (planted["corrupt"], planted["no_caption"], planted["no_media"]):
        assert bad not in keys
    assert stats["skipped_corrupt_media"] == 1
    assert stats["skipped_missing_caption"] == 1
    assert stats["skipped_missing_media"] == 1
    lost = stats.get("skipped_truncated_shard", 0) + stats.get("skipped_missing_from_shard", 0)
    assert lost >= 1 and stats.get("shards_truncated", 0) + stats.get("shards_short", 0) == 1
    assert stats["samples_filled"] == 3 + lost
    assert stats["samples_read"] + stats["samples_filled"] == 32
    # a hole is a marked slot (key "", valid False), never a copy of a real sample under its key
    real = [key for key in keys if key]
    assert len(keys) == 32 and len(real) == len(set(real)) == 32 - stats["samples_filled"]
    assert results[0]["invalid"][0] + results[1]["invalid"][0] == stats["samples_filled"]
    # sum_stats_across_ranks gives every rank the same totals, every counter present
    assert results[0]["summed"] == results[1]["summed"]
    assert {k: v for k, v in results[0]["summed"].items() if v} == {k: v for k, v in stats.items() if v}
