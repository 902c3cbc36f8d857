"""Named random streams: every generator and seed of a run comes from (run seed, purpose, indices).

    order = randomness.generator(seed, "shard_order", epoch).permutation(len(shards))
    sample_seed = randomness.seed_int(seed, "sample", epoch, stream, position)

Each purpose is declared once in PURPOSES with the indices it takes. Its key is
`[purpose id, seed, *indices]`: the purpose id (the first 32 bits of the name's SHA-256) comes first, so two
purposes never share a key, and the number of indices is fixed per purpose, so two index tuples of one
purpose never collide either (numpy's SeedSequence pads short entropy with zeros: [a, b] and [a, b, 0] would
be the same stream). Before this module the keys were ad-hoc lists such as `[seed, epoch, stream, 2]`, and
the sample seed of position 2 of a stream was the entropy of that stream's shuffle generator.

Leaf module (numpy only): the data, model and training layers all draw from it.
"""

from __future__ import annotations

import hashlib

import numpy as np

PURPOSES: dict[str, tuple[str, ...]] = {
    # the data plan (pipeline.data.dataset, pipeline.data.mixture)
    "shard_order": ("epoch",),  # the permutation of an epoch's shards
    "mixture_pass_order": ("source", "pass"),  # the shard order of a mixture source's pass over its samples
    "mixture_piece_order": ("epoch",),  # the order of the pieces of every source's share of an epoch
    "shuffle_buffer": ("epoch", "stream"),  # a stream's shuffle buffer
    "elastic_shuffle_buffer": ("epoch", "stream", "layer"),  # the same, for a layout resumed elastically
    "resampled_shards": ("epoch", "stream"),  # data.resampled: which shards a stream draws
    "sample": ("epoch", "stream", "position"),  # one sample's augmentation and caption pick
    # the model and the training process (pipeline.train.loop, pipeline.checkpoint.manager)
    "model_init": (),  # the initial weights: the same on every rank
    "rank_stream": ("rank",),  # each rank's torch stream (dropout, patch dropout)
    "new_rank": ("step", "rank"),  # a rank that a checkpoint of fewer ranks has no generator state for
    # the embedded data sets (pipeline.shards.synthetic)
    "synthetic_sample": ("source", "split", "index"),
}


def purpose_id(purpose: str) -> int:
    """The 32-bit number that stands for `purpose` in its keys."""
    return int.from_bytes(hashlib.sha256(purpose.encode()).digest()[:4], "little")


def key(seed: int, purpose: str, *indices: int) -> list[int]:
    """The SeedSequence entropy of `purpose` at `indices` in the run seeded `seed`."""
    names = PURPOSES.get(purpose)
    if names is None:
        raise KeyError(f"unknown random purpose {purpose!r}: declare it in pipeline.core.randomness.PURPOSES")
    if len(indices) != len(names):
        raise TypeError(f"random purpose {purpose!r} takes {len(names)} indices {names}, got {indices}")
    if any(int(i) < 0 for i in (seed, *indices)):
        raise ValueError(f"seeds and indices are non-negative: {purpose} seed {seed} indices {indices}")
    return [purpose_id(purpose), int(seed), *(int(i) for i in indices)]


def seed_sequence(seed: int, purpose: str, *indices: int) -> np.random.SeedSequence:
    return np.random.SeedSequence(key(seed, purpose, *indices))


def generator(seed: int, purpose: str, *indices: int) -> np.random.Generator:
    """A numpy generator of its own for `purpose` at `indices`."""
    return np.random.default_rng(seed_sequence(seed, purpose, *indices))


def seed_int(seed: int, purpose: str, *indices: int) -> int:
    """A 32-bit seed for another generator (torch, Python's random) for `purpose` at `indices`."""
    return int(seed_sequence(seed, purpose, *indices).generate_state(1)[0])
