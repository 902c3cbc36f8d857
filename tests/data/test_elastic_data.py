"""Elastic resume of the data position: an epoch begun on one layout (world size, workers, batch size) is
finished on another, every sample of the epoch read exactly once over both (the loader side; the engine
side is tests/multiprocess/test_elastic_resume.py)."""

from __future__ import annotations

from collections import Counter

import pytest

from tests.data.test_data import assert_same_batches, make_loader, read_all
from tests.data_fixtures import all_keys, write_dataset

SIZES = [8, 12, 4, 16, 8]  # 48 samples


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    directory = tmp_path_factory.mktemp("shards")
    write_dataset(directory, SIZES)
    return directory


def ranks(dataset, world_size, **settings):
    return [make_loader(dataset, rank=rank, world_size=world_size, **settings) for rank in range(world_size)]


def consume(loaders, batches: int) -> Counter:
    keys = Counter()
    for loader in loaders:
        keys.update(key for batch in read_all(loader, limit=batches) for key in batch.keys)
    return keys


def finish(loaders) -> Counter:
    keys = Counter()
    for loader in loaders:
        keys.update(key for batch in read_all(loader) for key in batch.keys)
    return keys


def resume(dataset, state, world_size, **settings):
    loaders = ranks(dataset, world_size, **settings)
    for loader in loaders:
        loader.load_state_dict(state)
    return loaders


@pytest.mark.parametrize("old, new", [
    ((2, dict(batch_size=4, workers=2)), (1, dict(batch_size=8, workers=1))),  # 2 -> 1 ranks
    ((1, dict(batch_size=8, workers=2)), (2, dict(batch_size=4, workers=1))),  # 1 -> 2 ranks
])
def test_an_epoch_resumed_on_another_layout_reads_every_sample_once(dataset, old, new):
    before = ranks(dataset, old[0], **old[1])
    first = consume(before, 3 if old[0] == 2 else 2)
    after = resume(dataset, before[0].state_dict(), new[0], **new[1])
    assert after[0].epoch == 0 and after[0].batches_consumed == 0
    rest = finish(after)
    assert not set(first) & set(rest)
    assert max((first + rest).values()) == 1
    # the sizes are chosen so that what is left divides into the new streams: nothing is left over
    assert set(first + rest) == all_keys(SIZES) and after[0].dataset.remainder_of(0) == 0
    # the next epoch is the new layout's own, complete
    assert set(finish(after)) == all_keys(SIZES)


def test_resume_inside_an_elastic_epoch_is_exact_and_a_second_change_still_reads_once(dataset):
    before = ranks(dataset, 2, batch_size=4, workers=2)
    first = consume(before, 3)
    state = before[0].state_dict()
    # uninterrupted on the new layout
    single = resume(dataset, state, 1, batch_size=8, workers=1)[0]
    whole = read_all(single)
    # the same, stopped after one batch and resumed with the same layout: the same batches
    interrupted = resume(dataset, state, 1, batch_size=8, workers=1)[0]
    head = read_all(interrupted, limit=1)
    mid = interrupted.state_dict()
    assert mid["elastic"] and mid["batches_consumed"] == 1
    again = make_loader(dataset, batch_size=8, workers=1)
    again.load_state_dict(mid)
    assert_same_batches(head + read_all(again), whole)
    # or resumed once more on 2 ranks: still every sample of the epoch once
    second = Counter(key for batch in head for key in batch.keys)
    third = finish(resume(dataset, mid, 2, batch_size=4, workers=1))
    total = first + second + third
    assert max(total.values()) == 1
    left = sum(1 for _ in all_keys(SIZES)) - sum(total.values())
    assert left < 2 * 4  # at most the new remainder: fewer than one batch per stream


def test_a_workers_change_alone_is_elastic_too(dataset):
    loader = make_loader(dataset, batch_size=4, workers=2)
    first = Counter(key for batch in read_all(loader, limit=5) for key in batch.keys)
    other = make_loader(dataset, batch_size=4, workers=1)
    other.load_state_dict(loader.state_dict())
    rest = Counter(key for batch in read_all(other) for key in batch.keys)
    assert max((first + rest).values()) == 1
    assert len(all_keys(SIZES)) - sum((first + rest).values()) == other.dataset.remainder_of(0) < 1 * 4
