"""Canonical streams (pipeline.data.plan) on the loader side: global batch i holds the same samples on every
layout that fits data.canonical_streams, in the same order when the accumulation is the same, and a
position saved on one layout resumes on another with exactly the batches the uninterrupted run reads
(the engine side is tests/multiprocess/test_elastic_resume.py)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from pipeline.core.errors import ConfigError
from tests.data.test_data import make_loader, read_all
from tests.data_fixtures import all_keys, write_dataset

SIZES = [8, 12, 4, 16, 8, 9]  # 57 samples: 7 global batches of 8 per epoch, 1 left over
GLOBAL = 8
CANONICAL = 4


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    directory = tmp_path_factory.mktemp("shards")
    write_dataset(directory, SIZES)
    return directory


def ranks(dataset, world_size, accum=1, workers=1, **settings):
    micro = GLOBAL // (world_size * accum)
    return [make_loader(dataset, rank=rank, world_size=world_size, batch_size=micro, workers=workers,
                        canonical_streams=CANONICAL, global_batch=GLOBAL, **settings) for rank in range(world_size)]


def global_batches(loaders, accum=1, limit=None):
    """[(keys, media)] per global batch: micro-batch j of every rank, ranks in order, accum micro-batches a batch."""
    per_rank = [read_all(loader, None if limit is None else limit * accum) for loader in loaders]
    out = []
    for index in range(len(per_rank[0]) // accum):
        parts = [batch for step in range(index * accum, (index + 1) * accum) for batches in per_rank
                 for batch in [batches[step]]]
        out.append(([key for part in parts for key in part.keys], torch.cat([part.media for part in parts])))
    return out


def by_key(batch):
    keys, media = batch
    return {key: media[i] for i, key in enumerate(keys)}


LAYOUTS = [  # (world size, accumulation, workers): every one fits 4 canonical streams at global batch 8
    (1, 1, 1), (1, 1, 2), (1, 1, 4), (2, 1, 1), (2, 1, 2), (4, 1, 1), (1, 2, 2), (1, 2, 1), (2, 2, 1),
]


@pytest.mark.parametrize("world_size, accum, workers", LAYOUTS)
def test_every_fitting_layout_reads_the_same_global_batches(dataset, world_size, accum, workers):
    reference = global_batches(ranks(dataset, 1, workers=0))
    batches = global_batches(ranks(dataset, world_size, accum, workers), accum)
    assert len(batches) == len(reference) == 7
    for index, (batch, expected) in enumerate(zip(batches, reference)):
        if accum == 1:  # the same order too
            assert batch[0] == expected[0], f"batch {index}: keys differ"
            assert torch.equal(batch[1], expected[1]), f"batch {index}: media differ"
        else:  # the same samples, the same tensors; the accumulation splits them in another order
            assert sorted(batch[0]) == sorted(expected[0]), f"batch {index}: keys differ"
            mine, theirs = by_key(batch), by_key(expected)
            assert all(torch.equal(mine[key], theirs[key]) for key in mine)


@pytest.mark.parametrize("old, new", [((2, 1, 2), (1, 1, 1)), ((1, 1, 2), (2, 1, 1)), ((1, 1, 1), (4, 1, 1)),
                                      ((2, 1, 1), (1, 2, 2))])
def test_a_position_resumed_on_another_layout_continues_the_same_batches(dataset, old, new):
    reference = global_batches(ranks(dataset, 1, workers=0))
    before = ranks(dataset, old[0], old[1], old[2])
    head = global_batches(before, old[1], limit=3)
    state = before[0].state_dict()
    after = ranks(dataset, *new)
    for loader in after:
        loader.load_state_dict(state)
    rest = global_batches(after, new[1])
    assert [sorted(keys) for keys, _ in head + rest] == [sorted(keys) for keys, _ in reference]
    epoch = Counter(key for keys, _ in head + rest for key in keys)
    assert max(epoch.values()) == 1 and len(all_keys(SIZES)) - len(epoch) == 1  # the one left over
    # the next epoch goes on on the new layout, the same as the reference's next epoch
    assert [sorted(k) for k, _ in global_batches(after, new[1])] == [sorted(k) for k, _ in global_batches(
        [_at_epoch(loader, 1) for loader in ranks(dataset, 1, workers=0)])]


def _at_epoch(loader, epoch):
    loader.set_epoch(epoch)
    return loader


def test_a_layout_that_does_not_fit_is_refused_naming_the_ones_that_do(dataset):
    with pytest.raises(ConfigError, match=r"does not fit world_size 1 x data.workers 3 .*layouts that fit: "
                                          r"world_size 1 x data.workers 4"):
        ranks(dataset, 1, workers=3)
    with pytest.raises(ConfigError, match="data.canonical_streams 3 does not divide the global batch 8"):
        make_loader(dataset, batch_size=8, workers=1, canonical_streams=3, global_batch=8)


def test_a_resume_that_changes_the_canonical_streams_is_refused(dataset):
    loader = ranks(dataset, 1, workers=2)[0]
    read_all(loader, 2)
    other = make_loader(dataset, batch_size=8, workers=1, canonical_streams=8, global_batch=8)
    with pytest.raises(ConfigError, match="data.canonical_streams is 8, but the run being resumed was planned over 4"):
        other.load_state_dict(loader.state_dict())
    auto = make_loader(dataset, batch_size=8, workers=1, global_batch=8)  # 0: the saved value is kept
    auto.load_state_dict(loader.state_dict())
    assert auto.dataset.canonical == 4 and auto.batches_consumed == 2
