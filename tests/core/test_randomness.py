"""Named random streams: every purpose has its own key space, so no two purposes (and no two index tuples of
one purpose) ever draw the same stream; the code draws only through pipeline.core.randomness."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import numpy as np
import pytest

from pipeline.core import randomness

REPO = Path(__file__).resolve().parents[2]


def test_every_purpose_has_its_own_id():
    ids = {randomness.purpose_id(name) for name in randomness.PURPOSES}
    assert len(ids) == len(randomness.PURPOSES)
    assert all(0 <= i < 2**32 for i in ids)  # one SeedSequence word: the indices never shift


def test_no_two_purposes_or_index_tuples_share_a_key_or_a_stream():
    seen_keys, seen_states = {}, {}
    for purpose, names in randomness.PURPOSES.items():
        for indices in itertools.product(range(3), repeat=len(names)):
            key = tuple(randomness.key(7, purpose, *indices))
            assert key not in seen_keys, (purpose, indices, seen_keys.get(key))
            seen_keys[key] = (purpose, indices)
            state = tuple(randomness.seed_sequence(7, purpose, *indices).generate_state(4))
            assert state not in seen_states, (purpose, indices, seen_states.get(state))
            seen_states[state] = (purpose, indices)
    # the old keys' accident: a stream's sample at position 2 seeded like the stream's shuffle buffer
    assert randomness.seed_int(7, "sample", 0, 0, 2) != int(
        randomness.seed_sequence(7, "shuffle_buffer", 0, 0).generate_state(1)[0])


def test_a_purpose_takes_exactly_its_indices():
    with pytest.raises(KeyError, match="unknown random purpose 'shuffle'"):
        randomness.generator(0, "shuffle", 1)
    with pytest.raises(TypeError, match=r"takes 2 indices \('epoch', 'stream'\)"):
        randomness.generator(0, "shuffle_buffer", 1)  # [.., 1] and [.., 1, 0] would be one stream
    with pytest.raises(ValueError, match="non-negative"):
        randomness.seed_int(0, "rank_stream", -1)


def test_draws_are_repeatable_and_differ_by_seed():
    first = randomness.generator(3, "shard_order", 5).permutation(100)
    assert np.array_equal(first, randomness.generator(3, "shard_order", 5).permutation(100))
    assert not np.array_equal(first, randomness.generator(4, "shard_order", 5).permutation(100))


def test_the_library_draws_only_through_named_streams():
    """No ad-hoc keyed generator is left in the library (benchmarks draw inputs, not run streams)."""
    adhoc = re.compile(r"default_rng\(\[|SeedSequence\(\[|manual_seed\(cfg|random\.seed\(\d")
    found = [f"{path.name}:{number}: {line.strip()}"
             for path in sorted((REPO / "pipeline").glob("*.py")) if not path.name.startswith("bench")
             for number, line in enumerate(path.read_text().splitlines(), 1) if adhoc.search(line)]
    assert not found, found
