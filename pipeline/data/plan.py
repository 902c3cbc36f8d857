"""The epoch plan: which samples each stream reads and in which order. Pure numpy over shard sizes, no I/O.

Training cuts every epoch into C *canonical streams* (`data.canonical_streams`), whatever the layout:
  1. The shards are permuted by (seed, epoch) (a mixture: each source's share of the epoch, as
     pipeline.data.mixture lays it out) and laid end to end as one sample sequence.
  2. The sequence, read as a circle starting at offset epoch x R, is cut into C contiguous ranges of L
     samples each, L a whole number of global batches' shares (g = global batch / C samples per stream
     per global batch). The remainder R < C x g is not read this epoch; the start moves by R every epoch,
     so consecutive epochs drop different stretches.
  3. Each canonical stream passes its range through its own shuffle buffer seeded by (seed, epoch,
     stream): its emission order is known up front (`shuffle_order`), so a resume needs no replay.
  4. Global batch i is positions [i g, (i + 1) g) of every canonical stream's emission order. A layout of
     W ranks x K workers x micro-batch m serves it when W K divides C and C divides W m: each (rank, worker)
     serves C / (W K) whole streams, and a loader step takes q = W m / C samples of each stream. With
     accumulation A (W m A = global batch), A steps make one global batch: the same samples on any layout.
  5. The data position is the number of samples each canonical stream has emitted (the same for all):
     a resume on another fitting layout continues at the same position, with O(streams + shards) memory.

Resampled mode (`data.resampled`) draws each canonical stream's shards with replacement from an RNG
seeded by (seed, epoch, stream). Evaluation (`train=False`) is not canonical: every sample once, the
sequence cut into W K nearly equal ranges in shard order (`eval_range`).

We keep our own plan rather than webdataset's shard splitting because the latter assigns whole shards
to workers (the batches then depend on the layout) and cannot resume mid-shard.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.core import randomness


@dataclass(frozen=True)
class Segment:
    """Samples [first, end) of one shard, which are samples [offset, offset + end - first) of a stream."""

    url: str
    first: int
    end: int
    offset: int
    size: int = 0
    """The shard's listed size (sizes.json): what a short tar is compared with."""


@dataclass
class StreamPlan:
    segments: list[Segment]
    order: np.ndarray
    """Stream indices in emission order: a permutation of range(span)."""

    @property
    def span(self) -> int:
        """Stream indices the segments cover."""
        return sum(segment.end - segment.first for segment in self.segments)


def shuffle_order(length: int, buffer_size: int, rng: np.random.Generator, first: int | None = None) -> np.ndarray:
    """Emission order of items 0..length-1 read in order through a shuffle buffer of `buffer_size`:
    once full, each incoming item replaces a uniformly chosen one, which is emitted; the rest is
    emitted in random order at the end. With `first`, only the first `first` items of that order
    (the same ones), simulated no further than needed. O(length) time; the simulation walks the items in
    chunks of plain ints (O(buffer + chunk) beside the order itself)."""
    first = length if first is None else min(first, length)
    if buffer_size <= 1 or length <= 1:
        return np.arange(first, dtype=np.int64)
    order = np.empty(length, dtype=np.int64)
    picks = rng.random(length)
    if first == 0:
        return order[:0]
    buffer = list(range(min(buffer_size, length)))  # the first items fill the buffer, emitting nothing
    # from item `buffer_size` on, item i emits the one in slot int(picks[i] x buffer_size) and takes its place:
    # emission number i - buffer_size; the first `first` emissions need items up to buffer_size + first
    stop = min(length, buffer_size + first)
    for low in range(buffer_size, stop, _SHUFFLE_CHUNK):
        high = min(low + _SHUFFLE_CHUNK, stop)
        emitted = []
        for item, slot in zip(range(low, high), (picks[low:high] * buffer_size).astype(np.int64).tolist()):
            emitted.append(buffer[slot])
            buffer[slot] = item
        order[low - buffer_size:high - buffer_size] = emitted
    if stop < length:  # stopped before the last item: the buffer's final order is not drawn
        return order[:first]
    order[max(length - buffer_size, 0):] = rng.permutation(np.asarray(buffer, dtype=np.int64))
    return order[:first]


_SHUFFLE_CHUNK = 65536


def whole(shards: list[tuple[str, int]]) -> list[tuple[str, int, int, int]]:
    """(url, size) shards as pieces (url, first, end, shard size) covering each shard."""
    return [(url, 0, size, size) for url, size in shards]


class Pieces:
    """Pieces laid end to end, held as arrays rather than a tuple each: piece i is samples [first[i], end[i])
    of shard shard[i] of `shards` ((url, listed size) pairs, shared, not copied). Reads as the list of (url,
    first, end, shard size) tuples it stands for; `bounds` are the cumulative sizes (bounds[i]: the position of
    piece i). An epoch of 200k whole shards is three arrays of 200k int64 (5 MB) instead of 200k tuples."""

    def __init__(self, shards: Sequence[tuple[str, int]], shard: np.ndarray, first: np.ndarray, end: np.ndarray):
        self.shards, self.shard, self.first, self.end = shards, shard, first, end
        self.bounds = np.zeros(len(shard) + 1, dtype=np.int64)
        np.cumsum(end - first, out=self.bounds[1:])

    @classmethod
    def whole(cls, shards: Sequence[tuple[str, int]], order: np.ndarray) -> Pieces:
        """Every shard of `shards` whole, in `order` (a permutation of their indices): what `whole` gives for
        the shards in that order."""
        ends = np.fromiter((size for _, size in shards), dtype=np.int64, count=len(shards))[order]
        return cls(shards, order, np.broadcast_to(np.int64(0), ends.shape), ends)

    def __len__(self) -> int:
        return len(self.shard)

    def __getitem__(self, index: int) -> tuple[str, int, int, int]:
        url, size = self.shards[int(self.shard[index])]
        return url, int(self.first[index]), int(self.end[index]), size

    def __iter__(self) -> Iterator[tuple[str, int, int, int]]:
        return (self[index] for index in range(len(self)))


def segments_of_range(pieces: Pieces | list[tuple[str, int, int, int]], start: int, end: int) -> list[Segment]:
    """Samples [start, end) of the pieces (url, first, end, shard size: samples [first, end) of a shard) laid
    end to end in a circle: positions past the last sample go on at the first piece again (end - start must
    not exceed the total). Binary search over the pieces' cumulative sizes: O(log pieces) plus the pieces the
    range covers for `Pieces`; a list pays O(pieces) first for the sizes."""
    if isinstance(pieces, Pieces):
        bounds = pieces.bounds
    else:
        sizes = np.fromiter((stop - first for _, first, stop, _ in pieces), dtype=np.int64, count=len(pieces))
        bounds = np.concatenate([[0], np.cumsum(sizes)])
    total = int(bounds[-1])
    segments, offset = [], 0
    while start < end:  # at most twice: the range before the wrap and the range after it
        lap = start // total * total
        lap_end = min(end, lap + total)
        lo_piece = int(np.searchsorted(bounds, start - lap, side="right")) - 1
        for index in range(lo_piece, len(pieces)):
            position = lap + int(bounds[index])
            if position >= lap_end:
                break
            url, first, stop, shard_size = pieces[index]
            lo, hi = max(start, position), min(lap_end, position + stop - first)
            if lo < hi:
                segments.append(Segment(url, first + lo - position, first + hi - position, offset + lo - start,
                                        shard_size))
        offset += lap_end - start
        start = lap_end
    return segments


@dataclass(frozen=True)
class Layout:
    """Where a training loader runs: ranks, DataLoader workers per rank, samples per rank per loader step."""

    world_size: int
    workers: int
    batch_size: int

    @property
    def streams(self) -> int:
        """Worker streams: one per (rank, worker); workers=0 reads in the rank's own process (one stream)."""
        return self.world_size * max(self.workers, 1)


def fit_problem(canonical: int, layout: Layout, global_batch: int) -> str | None:
    """Why `layout` cannot serve `canonical` streams at `global_batch` samples per global batch, or None."""
    step = layout.world_size * layout.batch_size
    if global_batch % canonical:
        return (f"data.canonical_streams {canonical} does not divide the global batch {global_batch}: every "
                f"canonical stream gives the same number of samples to each global batch")
    reasons = []
    if canonical % layout.streams:
        reasons.append(f"each (rank, worker) serves whole canonical streams: {layout.streams} must divide {canonical}")
    if step % canonical:
        reasons.append(f"every canonical stream gives each micro-batch step the same number of samples: {canonical} "
                       f"must divide world_size x micro-batch = {layout.world_size} x {layout.batch_size} = {step}")
    if reasons:
        return (f"data.canonical_streams {canonical} does not fit world_size {layout.world_size} x data.workers "
                f"{max(layout.workers, 1)} x micro-batch {layout.batch_size} ({'; '.join(reasons)})")
    return None


def fitting_layouts(canonical: int, layout: Layout, global_batch: int, limit: int = 4) -> list[str]:
    """Nearest layouts (world size, workers) that fit, nearest world size first, then workers; each a phrase."""
    found = []
    current = max(global_batch // max(layout.world_size * layout.batch_size, 1), 1)  # today's accumulation first
    accums = [current, *(a for a in (1, 2, 4, 8, 16) if a != current)]
    for world in sorted(range(1, 2 * canonical + 1), key=lambda w: (abs(w - layout.world_size), -w)):
        if global_batch % world:
            continue
        for workers in sorted(range(1, canonical + 1), key=lambda k: (abs(k - max(layout.workers, 1)), -k)):
            for accum in accums:
                micro = global_batch // (world * accum) if global_batch % (world * accum) == 0 else 0
                if micro and fit_problem(canonical, Layout(world, workers, micro), global_batch) is None:
                    found.append(f"world_size {world} x data.workers {workers}"
                                 + (f" x train.accum_steps {accum}" if accum != 1 or current != 1 else ""))
                    break
            if len(found) >= limit:
                return found
            if found and found[-1].startswith(f"world_size {world} "):
                break
    return found


def fit_error(canonical: int, layout: Layout, global_batch: int, auto: bool = False,
              resumed: bool = False) -> str | None:
    """One line naming what does not fit and the nearest layouts that do (None when `layout` fits). `auto`:
    `canonical` is data.canonical_streams 0's choice, world_size x workers: the workers are what to change.
    `resumed`: `canonical` is a checkpoint's, which the resume keeps: only the layout can change."""
    problem = fit_problem(canonical, layout, global_batch)
    if problem is None:
        return None
    if auto:
        divisors = [k for k in range(1, min(layout.batch_size, 64) + 1) if layout.batch_size % k == 0]
        return (f"data.workers {max(layout.workers, 1)} cannot split the micro-batch of {layout.batch_size} samples "
                f"per rank into equal parts (data.canonical_streams 0 plans world_size x data.workers = {canonical} "
                f"canonical streams, each giving every step the same number of samples): set data.workers to a "
                f"divisor of {layout.batch_size} ({', '.join(map(str, divisors[:8]))}), or train.global_batch_size "
                f"to a multiple of world_size x data.workers, or data.canonical_streams explicitly")
    nearest = fitting_layouts(canonical, layout, global_batch)
    return problem + (f"; layouts that fit: {'; '.join(nearest)}" if nearest else "") + (
        "; the run keeps its canonical streams on a resume (they decide the batches): change the layout"
        if resumed else "; or set data.canonical_streams to one that fits (fixed for a run: the loss curve depends on it)")


class EpochPlan:
    """The canonical streams of every epoch of one training data set (pure: the same on every process)."""

    def __init__(self, pieces_of, epoch_total: int, canonical: int, per_batch: int, shuffle_buffer: int, seed: int,
                 resampled: tuple[list[list[tuple[str, int]]], list[float]] | None = None, epoch_samples: int = 0):
        """`pieces_of(epoch)`: the epoch's pieces (url, first, end, shard size) in order, a list or Pieces (asked
        for again by every stream: whole shards cost O(shards) numpy); `per_batch`: samples of a canonical stream
        in each global batch (global batch / canonical); `resampled`: (sources, weights)."""
        self.pieces_of, self.epoch_total, self.canonical = pieces_of, epoch_total, canonical
        self.per_batch, self.shuffle_buffer, self.seed, self.resampled = per_batch, shuffle_buffer, seed, resampled
        samples = (epoch_samples or epoch_total) if resampled else epoch_total
        self.length = samples // (canonical * per_batch) * per_batch
        """Samples each canonical stream yields per epoch (a whole number of global batches' shares)."""
        self.remainder = 0 if resampled else epoch_total - canonical * self.length

    def start(self, epoch: int) -> int:
        """First position of the epoch's circle: the dropped remainder moves on by its own length each epoch."""
        return epoch * self.remainder % self.epoch_total if self.epoch_total else 0

    def stream(self, epoch: int, stream: int) -> StreamPlan:
        if self.resampled:
            segments = self._drawn(epoch, stream)
        else:
            start = self.start(epoch) + stream * self.length
            segments = segments_of_range(self.pieces_of(epoch), start, start + self.length)
        draws = randomness.generator(self.seed, "shuffle_buffer", epoch, stream)
        return StreamPlan(segments, shuffle_order(self.length, self.shuffle_buffer, draws))

    def _drawn(self, epoch: int, stream: int) -> list[Segment]:
        sources, weights = self.resampled
        draws = randomness.generator(self.seed, "resampled_shards", epoch, stream)
        probabilities = np.asarray(weights, dtype=np.float64)
        probabilities /= probabilities.sum()
        segments, filled = [], 0
        while filled < self.length:
            source = sources[draws.choice(len(sources), p=probabilities)]
            url, size = source[draws.integers(len(source))]
            take = min(size, self.length - filled)
            if take > 0:
                segments.append(Segment(url, 0, take, filled, size))
                filled += take
        return segments

    def read_window(self, epoch: int) -> tuple[int, int]:
        """[start, end) on the circle of the epoch's positions that the streams read (end may pass the total)."""
        start = self.start(epoch)
        return start, start + self.canonical * self.length


def eval_range(total: int, streams: int, stream: int) -> tuple[int, int]:
    """Samples [start, end) of the shard-order sequence that evaluation stream `stream` of `streams` reads."""
    return stream * total // streams, (stream + 1) * total // streams
