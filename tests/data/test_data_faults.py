"""The loader against faults a user meets: short, damaged, absent, stalled, failing and flaky shards,
bad captions, and the end-of-epoch remainder. Nothing is lost without a word (a warning naming the
shard, a counter in loader.stats), no slot holds a copy of a real sample, nothing hangs.

The stores that misbehave are real: a local HTTP server read through fsspec (tests/data_fixtures.py,
ShardHttpServer) and 'pipe:' commands that stop writing; the S3 cases are in test_data_s3.py."""

from __future__ import annotations

import json
import logging
import time

import pytest
import torch

from pipeline.data.loader import STAT_KEYS, build_loader, read_shard_sizes, sum_stats_across_ranks
from tests.data.test_data import assert_same_batches, make_loader, read_all
from tests.data_fixtures import ShardHttpServer, all_keys, rewrite_tar, write_bad_dataset, write_dataset
from tests.distributed_helpers import run_ranks

LOGGER = "pipeline.data"


def warnings_about(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and text in r.getMessage()]


def marked_slots(batches) -> int:
    for batch in batches:
        assert batch.valid.dtype == torch.bool and batch.valid.shape == (len(batch.keys),)
        assert batch.valid.tolist() == [key != "" for key in batch.keys]
        assert all(label == -1 for label, ok in zip(batch.labels.tolist(), batch.valid.tolist()) if not ok)
    return sum(int((~batch.valid).sum()) for batch in batches)


def real_keys(batches) -> list[str]:
    return [key for batch in batches for key in batch.keys if key]


# ------------------------------------------------------------------------- marking instead of copies


def test_bad_samples_leave_marked_slots_never_copies(tmp_path):
    planted = write_bad_dataset(tmp_path, [8, 8, 8, 8])
    loader = make_loader(tmp_path, workers=2, batch_size=4)
    batches = read_all(loader)
    keys = real_keys(batches)
    assert len(keys) == len(set(keys)), "a real sample appears twice: a copy is a false negative"
    for bad in (planted["corrupt"], planted["no_caption"], planted["no_media"]):
        assert bad not in keys
    assert marked_slots(batches) == loader.stats["samples_filled"] >= 4
    assert loader.stats["samples_read"] + loader.stats["samples_filled"] == 32
    assert all(b.media.shape == batches[0].media.shape for b in batches)
    # resumed in the middle: the same batches, marks included
    resumed = make_loader(tmp_path, workers=2, batch_size=4)
    head = read_all(resumed, limit=3)
    state = resumed.state_dict()
    again = make_loader(tmp_path, workers=2, batch_size=4)
    again.load_state_dict(state)
    tail = read_all(again)
    assert_same_batches(head + tail, batches)
    assert [b.valid.tolist() for b in head + tail] == [b.valid.tolist() for b in batches]


def test_stream_without_any_readable_sample_is_filled_from_another_stream(tmp_path):
    paths = write_dataset(tmp_path, [8, 8])
    loader = make_loader(tmp_path / "data-{000000..000001}.tar", workers=2, batch_size=4, shuffle_buffer=0)
    (tmp_path / "data-000001.tar").unlink()  # after the start: one stream's whole range is gone
    batches = read_all(loader)
    assert len(batches) == 4 and marked_slots(batches) == 8
    assert sorted(real_keys(batches)) == sorted(all_keys([8])) and paths
    assert loader.stats["skipped_shard_not_found"] == 8


# ---------------------------------------------------------------------------------- short, damaged


def test_short_shard_is_told_once_with_both_counts(tmp_path, caplog):
    write_dataset(tmp_path, [8, 8])
    sizes = json.loads((tmp_path / "sizes.json").read_text())
    sizes["data-000001.tar"] = 11  # three more than the tar holds
    (tmp_path / "sizes.json").write_text(json.dumps(sizes))
    loader = make_loader(tmp_path, workers=0, batch_size=4)
    with caplog.at_level("WARNING", logger=LOGGER):
        epochs = [read_all(loader) for _ in range(3)]
    told = warnings_about(caplog, "data-000001.tar")
    assert len(told) == 1, told
    assert "holds 8 samples" in told[0] and "listed size (sizes.json) is 11" in told[0]
    assert loader.stats["shards_short"] >= 1
    # the 3 listed samples that are not there are lost in each epoch whose range holds them
    assert sum(marked_slots(batches) for batches in epochs) == loader.stats["skipped_missing_from_shard"] >= 3


def test_a_zero_byte_shard_is_told_with_the_samples_read_not_where_the_stream_starts(tmp_path, caplog):
    paths = write_dataset(tmp_path, [8, 4])
    open(paths[0], "wb").close()  # emptied after sizes.json listed its 8 samples
    # eval order, 2 streams of 6: rank 1's stream starts at sample 6 of the empty shard
    loader = make_loader(tmp_path, rank=1, world_size=2, workers=0, batch_size=2, train=False)
    with caplog.at_level("WARNING", logger=LOGGER):
        batches = read_all(loader)
    told = warnings_about(caplog, paths[0])
    assert len(told) == 1 and "is damaged after 0 complete samples (empty file)" in told[0], told
    assert "this stream reads samples 6-7 of it (listed size 8), and skips 6-7" in told[0]
    assert loader.stats["skipped_truncated_shard"] == 2 and loader.stats["shards_truncated"] == 1
    assert sorted(real_keys(batches)) == sorted(all_keys([0, 4]))


def test_counting_a_damaged_tar_without_sizes_json_counts_what_is_readable(tmp_path, caplog):
    paths = write_dataset(tmp_path, [8, 9], sizes_json=False)
    data = open(paths[1], "rb").read()
    open(paths[1], "wb").write(data[: len(data) // 2])
    with caplog.at_level("WARNING", logger=LOGGER):
        sizes = read_shard_sizes(str(tmp_path))
    counted = sizes[paths[1]]
    assert sizes[paths[0]] == 8 and 0 < counted < 9
    told = warnings_about(caplog, paths[1])
    assert len(told) == 1 and f"counted as {counted} samples" in told[0]
    # and the loader starts and reads every counted sample
    batches = read_all(make_loader(tmp_path, workers=0, batch_size=1, train=False))
    assert len(real_keys(batches)) == 8 + counted


# --------------------------------------------------------------------------------------- not found


def test_shard_listed_but_absent_from_directory_is_named_at_start(tmp_path, caplog):
    write_dataset(tmp_path, [8, 12, 8])
    (tmp_path / "data-000001.tar").unlink()
    with caplog.at_level("WARNING", logger=LOGGER):
        loader = make_loader(tmp_path, workers=0, batch_size=4)
    told = warnings_about(caplog, "data-000001.tar")
    assert len(told) == 1 and "holding 12 samples" in told[0] and "left out" in told[0]
    assert loader.stats["shards_not_found"] == 1 and loader.stats["samples_not_found"] == 12
    batches = read_all(loader)
    assert sorted(real_keys(batches)) == sorted(all_keys([8, 0, 8])) and marked_slots(batches) == 0


def test_shard_of_a_url_list_absent_is_named_at_start_and_never_retried(tmp_path, caplog):
    write_dataset(tmp_path, [8, 12, 8])
    (tmp_path / "data-000002.tar").unlink()
    with caplog.at_level("WARNING", logger=LOGGER):
        loader = make_loader(tmp_path / "data-{000000..000002}.tar", workers=0, batch_size=4, retries=5)
        batches = read_all(loader)
    told = warnings_about(caplog, "data-000002.tar")
    assert len(told) == 1 and "holding 8 samples are not there" in told[0]
    assert loader.stats["shards_not_found"] == 1 and loader.stats["shard_retries"] == 0
    assert loader.stats["skipped_shard_not_found"] == 8 == marked_slots(batches) == loader.stats["samples_filled"]


# ----------------------------------------------------------------------------- remote misbehaviour


@pytest.fixture
def http_store(tmp_path):
    write_dataset(tmp_path / "store", [8, 8, 8])
    server = ShardHttpServer(tmp_path / "store")
    yield server
    server.stop()


def http_loader(server, **overrides):
    settings = dict(workers=0, batch_size=4, retry_backoff=0.05, storage_options={"block_size": 0})
    settings.update(overrides)
    return make_loader(server.url + "/data-{000000..000002}.tar", **settings)


def test_http_404_is_not_retried_and_named(http_store, caplog):
    loader = http_loader(http_store, retries=5)
    (http_store.root / "data-000001.tar").unlink()
    with caplog.at_level("WARNING", logger=LOGGER):
        batches = read_all(loader)
    told = warnings_about(caplog, "not found")
    assert len(told) == 1 and http_store.url + "/data-000001.tar" in told[0]
    assert http_store.requests["data-000001.tar"] == 1
    assert loader.stats["shards_not_found"] == 1 and loader.stats["shard_retries"] == 0
    assert marked_slots(batches) == 8


def test_brown_out_is_ridden_out_without_losing_a_sample(http_store):
    loader = http_loader(http_store, retries=10, retry_max_s=60)
    http_store.fail["data-000001.tar"] = 4  # 503 four times, then served
    batches = read_all(loader)
    assert sorted(real_keys(batches)) == sorted(all_keys([8, 8, 8])) and marked_slots(batches) == 0
    assert loader.stats["shard_retries"] == 4 and loader.stats["shards_failed"] == 0


def test_retries_stop_after_retry_max_s(http_store, caplog):
    loader = http_loader(http_store, retries=1000, retry_backoff=0.2, retry_max_s=1.0)
    http_store.fail["data-000001.tar"] = 10**6  # down for good
    with caplog.at_level("WARNING", logger=LOGGER):
        batches = read_all(loader)
    # backoff 0.2, 0.4, then 0.8 would pass the 1 s budget: given up after a few tries, not 1000
    assert 1 <= loader.stats["shard_retries"] <= 4 and loader.stats["shards_failed"] == 1
    assert loader.stats["skipped_shard_failed"] == 8 == marked_slots(batches)
    assert len(warnings_about(caplog, "skipped")) >= 1


@pytest.mark.parametrize("workers", [0, 2])
def test_stalled_http_read_times_out_naming_the_shard(http_store, caplog, workers):
    http_store.stall["data-000001.tar"] = 3000  # a few members, then the connection stays silent
    loader = http_loader(http_store, workers=workers, retries=1, read_timeout_s=1.0)
    started = time.monotonic()
    with caplog.at_level("WARNING", logger=LOGGER):
        batches = read_all(loader)
    assert time.monotonic() - started < loader.cfg.worker_timeout  # ended by the read timeout, not the loader's
    assert len(batches) == len(loader)
    assert loader.stats["shard_timeouts"] == 2 and loader.stats["shards_failed"] == 1
    assert marked_slots(batches) == loader.stats["samples_filled"] >= 1
    if workers == 0:  # worker processes log on their own
        told = warnings_about(caplog, "no data for 1 s (data.read_timeout_s)")
        assert told and all(http_store.url + "/data-000001.tar" in message for message in told)


def test_stalled_pipe_times_out_naming_the_shard(tmp_path, caplog):
    paths = write_dataset(tmp_path, [8])
    # the first run (counting the samples at start) writes the whole tar; later ones write a few of its
    # members, then keep the pipe open without writing
    marker = tmp_path / "counted"
    url = (f"pipe:if [ -e {marker} ]; then head -c 20000 {paths[0]}; sleep 30; "
           f"else cat {paths[0]}; touch {marker}; fi")
    loader = make_loader(url, workers=0, batch_size=4, allow_pipe=True, retries=0, read_timeout_s=1.0)
    with caplog.at_level("WARNING", logger=LOGGER):
        batches = read_all(loader)
    assert len(batches) == 2 and loader.stats["shard_timeouts"] == 1 and loader.stats["shards_failed"] == 1
    told = warnings_about(caplog, "no data for 1 s")
    assert told and url in told[0]
    assert marked_slots(batches) == loader.stats["samples_filled"]


def test_dataloader_timeout_names_the_shards_it_waited_on(tmp_path):
    paths = write_dataset(tmp_path, [8])
    marker = tmp_path / "counted"  # counting at start reads the tar at once; reading it for training hangs
    url = f"pipe:if [ -e {marker} ]; then sleep 20; fi; cat {paths[0]}; touch {marker}"
    # read_timeout_s=0: nothing but the DataLoader's worker timeout stops the wait
    loader = make_loader(url, workers=1, batch_size=4, allow_pipe=True, read_timeout_s=0, worker_timeout=2)
    with pytest.raises(RuntimeError, match="timed out") as raised:
        read_all(loader)
    assert url in str(raised.value) and "data.worker_timeout" in str(raised.value)


# ----------------------------------------------------------------------------------------- captions


def test_non_utf8_caption_is_skipped_counted_and_logged(tmp_path, caplog):
    paths = write_dataset(tmp_path, [8])
    bad = "data00x0003"
    rewrite_tar(paths[0], lambda key, files: {**files, "txt": b"caf\xe9 \xff"} if key == bad else files)
    loader = make_loader(tmp_path, workers=0, batch_size=4)
    with caplog.at_level("WARNING", logger=LOGGER):
        batches = read_all(loader)
    assert bad not in real_keys(batches) and len(real_keys(batches)) == 7
    assert loader.stats["skipped_bad_caption"] == 1 == marked_slots(batches)
    told = warnings_about(caplog, "bad_caption")
    assert len(told) == 1 and bad in told[0] and paths[0] in told[0]


def test_unreadable_metadata_is_counted_and_the_sample_used(tmp_path):
    paths = write_dataset(tmp_path, [8])
    rewrite_tar(paths[0], lambda key, files: {**files, "json": b"{not json"} if key == "data00x0002" else files)
    loader = make_loader(tmp_path, workers=0, batch_size=4)
    batches = read_all(loader)
    assert "data00x0002" in real_keys(batches) and loader.stats["metadata_unreadable"] == 1


# ---------------------------------------------------------------------------------------- remainder


def test_remainder_rotates_so_every_sample_is_seen_with_one_shard(tmp_path):
    write_dataset(tmp_path, [250])
    loader = make_loader(tmp_path, workers=2, batch_size=8, shuffle_buffer=16)
    remainder = 250 - len(loader) * 8  # 31 global batches of 8 = 248: 2 dropped per epoch
    assert remainder == 2
    seen: dict[str, int] = {}
    for _ in range(6):
        keys = real_keys(read_all(loader))
        assert len(keys) == len(set(keys)) == 248
        for key in keys:
            seen[key] = seen.get(key, 0) + 1
    assert set(seen) == all_keys([250]), f"never seen: {sorted(all_keys([250]) - set(seen))}"
    assert min(seen.values()) >= 5  # the dropped stretches of 6 epochs do not overlap
    assert loader.stats["samples_remainder"] == 6 * remainder


def test_exact_resume_in_a_rotated_epoch(tmp_path):
    write_dataset(tmp_path, [37, 21])  # 58 samples: 9 global batches of 6, remainder 4
    settings = dict(workers=2, batch_size=6, shuffle_buffer=8)
    full = make_loader(tmp_path, **settings)
    full.set_epoch(3)
    expected = read_all(full)
    head_loader = make_loader(tmp_path, **settings)
    head_loader.set_epoch(3)
    head = read_all(head_loader, limit=3)
    resumed = make_loader(tmp_path, **settings)
    resumed.load_state_dict(head_loader.state_dict())
    assert_same_batches(head + read_all(resumed), expected)
    # the rotated range wraps around the end of the laid-out shards and still reads each sample once
    keys = real_keys(expected)
    assert len(keys) == len(set(keys)) == 54


# -------------------------------------------------------------------------------------------- stats


def test_every_counter_is_listed_and_present(tmp_path):
    write_bad_dataset(tmp_path, [8, 8, 8])
    loader = make_loader(tmp_path, workers=0, batch_size=4)
    read_all(loader)
    assert set(loader.stats) == set(STAT_KEYS)
    assert sum_stats_across_ranks(loader.stats) == {key: loader.stats[key] for key in STAT_KEYS}


def ranks_sum_stats(rank, world_size):
    from collections import Counter

    return sum_stats_across_ranks(Counter({"samples_read": 10 + rank, "shards_failed": rank}))


@pytest.mark.slow
def test_sum_stats_across_two_ranks():
    per_rank = run_ranks(ranks_sum_stats, 2, timeout=120)
    assert per_rank[0] == per_rank[1]
    assert per_rank[0]["samples_read"] == 21 and per_rank[0]["shards_failed"] == 1
    assert set(per_rank[0]) == set(STAT_KEYS)


def test_build_loader_signature_is_unchanged():
    import inspect

    assert list(inspect.signature(build_loader).parameters)[:2] == ["cfg", "urls"]
