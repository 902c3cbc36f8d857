"""The worker side of the streaming loader: a DataLoader worker serves its streams and yields one *part* per step.

Training: worker k of rank r serves canonical streams r C/W + k C/(W K) + [0, C/(W K)) (pipeline.data.plan);
at each loader step it takes the next q = W m / C samples of each of its streams, in stream order, and
yields them as one Batch part with its counters; the loader joins its workers' parts of the step into the
rank's micro-batch. Evaluation: each worker reads one range of the shard-order sequence and yields whole
batches, padded at the end of its range.

A bad sample is skipped, counted by reason and logged (pipeline.data.reader, pipeline.data.samples). Its slot
holds no real sample (`Batch.valid` False, key "", label -1): it repeats a real sample's tensors of the same
part, or when the whole part is bad, of the nearest earlier part of the same worker that had one, else of
the nearest position of its streams or of another stream; `samples_filled` counts such slots.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import Counter
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from pipeline.core import randomness
from pipeline.core.errors import ConfigError
from pipeline.data import mixture
from pipeline.data.config import Batch, DataConfig
from pipeline.data.plan import (
    EpochPlan,
    Layout,
    Pieces,
    StreamPlan,
    eval_range,
    fit_error,
    segments_of_range,
    whole,
)
from pipeline.data.reader import Entry, StreamReader
from pipeline.data.samples import RateLimitedLog, SampleDecoder

log = logging.getLogger("pipeline.data")


class StreamCursor:
    """One stream of one epoch being read: its plan, its reader and the entries read ahead of their turn."""

    def __init__(self, plan: StreamPlan, cfg: DataConfig, counts: Counter, missing, first: int):
        self.plan = plan
        needed = np.zeros(plan.span, dtype=bool)
        needed[plan.order[first:]] = True
        self.entries = StreamReader(cfg, counts, missing).read(plan.segments, needed)
        self.pending: dict[int, Entry] = {}

    def take(self, target: int) -> Entry:
        while target not in self.pending:
            entry = next(self.entries)
            self.pending[entry.index] = entry
        return self.pending.pop(target)


class StreamingDataset(IterableDataset):
    """Plans this worker's streams and yields (Batch part, counters delta) pairs."""

    def __init__(self, cfg: DataConfig, sources: list[list[tuple[str, int]]], *, rank: int, world_size: int,
                 seed: int, media_transform, tokenizer, train: bool, image_size: int | None, weights: list[float],
                 missing: frozenset[str] = frozenset(), mixture_counts: list[int] | None = None,
                 global_batch: int | None = None):
        sources = [[shard for shard in source if shard[1] > 0] for source in sources]  # empty shards hold nothing
        if cfg.resampled and any(weight > 0 and not source for weight, source in zip(weights, sources)):
            raise ValueError("a data source with a positive weight holds no samples; drop it or give it weight 0")
        self.cfg, self.sources, self.rank, self.world_size = cfg, sources, rank, world_size
        self.seed, self.train, self.weights = seed, train, weights
        self.samples = SampleDecoder(cfg, media_transform, tokenizer, train, image_size)
        self.missing = missing  # shard URLs found absent at start: never opened
        self.workers = max(cfg.workers, 1)
        self.shards = [shard for source in sources for shard in source]
        self.total = sum(size for _, size in self.shards)
        # several sources (data.mixture, `::`): a sample's key is '<source index>/<key in its shard>', so that the
        # keys of sets that number their samples alike (every set `shards build` makes starts at 000000000)
        # stay apart in Batch.keys and the logged keys
        self.source_of = ({url: index for index, source in reversed(list(enumerate(sources))) for url, _ in source}
                          if len(sources) > 1 else {})
        # data.mixture: samples of each source in every epoch (pipeline.data.mixture); the epoch holds their sum
        self.mixture_counts = mixture_counts if train else None
        self.epoch_total = sum(mixture_counts) if self.mixture_counts else self.total
        self.global_batch = global_batch or world_size * cfg.batch_size
        # (epoch, loader step to yield next): written by the loader before each pass, read by the workers
        self.position = torch.zeros(2, dtype=torch.int64).share_memory_()
        if train:
            self.set_canonical(cfg.canonical_streams or world_size * max(cfg.workers, 1))
        else:
            self.streams = world_size * self.workers
            if self.total < self.streams:
                raise ValueError(f"the eval set has {self.total} samples, fewer than the {self.streams} streams "
                                 f"(world_size x workers); lower data.workers")
            self.steps = math.ceil(math.ceil(self.total / self.streams) / cfg.batch_size)

    @property
    def layout(self) -> Layout:
        return Layout(self.world_size, self.cfg.workers, self.cfg.batch_size)

    def set_canonical(self, canonical: int) -> None:
        """Plan training over `canonical` streams (data.canonical_streams, or the value a resumed run saved)."""
        problem = fit_error(canonical, self.layout, self.global_batch, auto=not self.cfg.canonical_streams)
        if problem:
            raise ConfigError(problem)
        resampled = (self.sources, self.weights) if self.cfg.resampled else None
        self.canonical = canonical
        self.epoch_plan = EpochPlan(self._pieces, self.epoch_total, canonical, self.global_batch // canonical,
                                    self.cfg.shuffle_buffer, self.seed, resampled, self.cfg.epoch_samples)
        self.per_step = self.world_size * self.cfg.batch_size // canonical
        self.steps = self.epoch_plan.length // self.per_step
        if self.steps == 0:
            samples = (self.cfg.epoch_samples or self.total) if self.cfg.resampled else self.epoch_total
            what = f"the mixture of data.mixture '{self.cfg.mixture}'" if self.mixture_counts else "the data set"
            raise ConfigError(
                f"{what} has {samples} samples, fewer than one global batch of {self.global_batch} "
                f"(data.canonical_streams {canonical} x {self.global_batch // canonical} samples); lower "
                "train.global_batch_size")
        self.remainder = self.epoch_plan.remainder
        self._plans: dict[tuple[int, int], StreamPlan] = {}

    # --- plans
    def _pieces(self, epoch: int) -> Pieces | list[tuple[str, int, int, int]]:
        """The epoch's shard pieces in their (seed, epoch) order, end to end: whole shards as arrays (Pieces: a
        permutation and sizes, O(shards) numpy, no tuple per shard), a mixture's pieces as a list."""
        if self.mixture_counts:  # each source's share of this epoch (pipeline.data.mixture)
            return mixture.epoch_pieces(self.sources, self.mixture_counts, self.seed, epoch,
                                        self.epoch_plan.read_window(epoch))
        permutation = randomness.generator(self.seed, "shard_order", epoch).permutation(len(self.shards))
        return Pieces.whole(self.shards, permutation)

    def remainder_of(self, epoch: int) -> int:
        """Samples of `epoch` no stream reads."""
        return self.remainder if self.train else 0

    def source_counts(self, epoch: int) -> list[int]:
        """Samples each source gives the streams in `epoch` (its share, less what falls in the remainder)."""
        start, end = self.epoch_plan.read_window(epoch)
        counts, position, total = [0] * len(self.sources), 0, self.epoch_total
        for url, first, last, _ in self._pieces(epoch):
            size = last - first
            # the read window is [start, end) on the circle of the epoch's positions: it may wrap past its end
            for low, high in ((start, end), (start - total, end - total)):
                counts[self.source_of.get(url, 0)] += max(0, min(position + size, high) - max(position, low))
            position += size
        return counts

    def streams_of(self, worker: int) -> list[int]:
        """The streams (canonical in training) worker `worker` of this rank serves."""
        if not self.train:
            return [self.rank * self.workers + worker]
        per_worker = self.canonical // (self.world_size * self.workers)
        first = (self.rank * self.workers + worker) * per_worker
        return list(range(first, first + per_worker))

    def plan(self, epoch: int, stream: int) -> StreamPlan:
        if not self.train:
            start, end = eval_range(self.total, self.streams, stream)
            return StreamPlan(segments_of_range(whole(self.shards), start, end), np.arange(end - start, dtype=np.int64))
        key = (epoch, stream)
        if key not in self._plans:
            if len(self._plans) > 4 * self.canonical:  # a worker holds its own streams' plans of about one epoch
                self._plans.clear()
            self._plans[key] = self.epoch_plan.stream(epoch, stream)
        return self._plans[key]

    def _sample_seed(self, epoch: int, stream: int, index: int) -> int:
        """A sample's augmentation seed: (epoch, canonical stream, position in it) names the sample on any layout."""
        return randomness.seed_int(self.seed, "sample", epoch, stream, index)

    # --- iteration
    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        epoch, step = (int(v) for v in self.position.tolist())
        streams = self.streams_of(worker)
        yield from self.parts_from(epoch, streams, step)
        while self.train:
            # a training worker goes on into the next epoch: the DataLoader keeps prefetching across the
            # boundary, so the first step of an epoch waits no longer than any other (StreamingLoader)
            epoch += 1
            yield from self.parts_from(epoch, streams, 0)

    def parts_from(self, epoch: int, streams: list[int], step: int) -> Iterator[tuple[Batch, dict]]:
        """This worker's part of every loader step of `epoch` from `step` on."""
        per_step = self.per_step if self.train else self.cfg.batch_size
        counts: Counter = Counter()
        note = RateLimitedLog()

        def count_bad(reason, url, key, detail="", skipped=True):
            counts[f"skipped_{reason}" if skipped else reason] += 1
            note(reason, url, key, detail, skipped)

        cursors = [StreamCursor(self.plan(epoch, s), self.cfg, counts, self.missing, step * per_step) for s in streams]
        last_good: list[tuple] = []  # good samples of the latest part that had any (fill source)
        for index in range(step, self.steps):
            good, keys, holes = [], [], 0
            for stream, cursor in zip(streams, cursors):
                for target in cursor.plan.order[index * per_step : (index + 1) * per_step].tolist():
                    entry = cursor.take(target)
                    sample = self.samples.decode(entry, self._sample_seed(epoch, stream, target), count_bad)
                    if sample is None:
                        holes += 1
                        continue
                    good.append(sample)
                    keys.append(f"{self.source_of[entry.url]}/{entry.key}" if self.source_of else entry.key)
                    if self.samples.device_crop is not None and isinstance(sample[0], torch.Tensor):
                        counts["decoded_on_cpu"] += 1  # not a JPEG the device decodes: the worker did
            counts["samples_read"] += len(good)
            real = list(zip(good, keys))
            padding = holes if self.train else per_step - len(good)
            if real:
                last_good = real
            elif padding and not last_good:
                last_good = self._fill_source(epoch, streams[0], index, per_step)
            for hole in range(padding):
                # a slot without a real sample: a real sample's tensors (fixed shapes), marked by an empty
                # key (-> Batch.valid False) and no label; the loss and evaluation leave the row out
                sample, _key = (real or last_good)[hole % len(real or last_good)]
                good.append((sample[0], sample[1], -1))
                keys.append("")
            if padding:
                counts["samples_filled" if self.train else "samples_padded"] += padding
            yield self.samples.collate(good, keys), dict(counts)
            counts.clear()

    def _fill_source(self, epoch: int, stream: int, index: int, per_step: int) -> list[tuple]:
        """Good samples of the nearest earlier step of `stream` that has any, else the nearest later one, else
        the first step of another stream (in stream order) that has any: read again by position, so a resumed
        run fills a bad part exactly as an uninterrupted one. Only their tensors are used (the slots are marked
        invalid); failing shards are tried once, not retried."""
        reader = StreamReader(dataclasses.replace(self.cfg, retries=0), Counter(), set(self.missing))
        reader.quiet = True  # these shards were read (and their problems told) for the parts themselves
        unreadable: list[str] = []  # shards that failed in this search: not opened again
        plan = self.plan(epoch, stream)
        count = self.canonical if self.train else self.streams
        candidates = [(stream, plan, i) for i in [*range(index - 1, -1, -1), *range(index + 1, self.steps)]]
        for other in [*range(stream + 1, count), *range(stream)]:
            other_plan = self.plan(epoch, other)
            candidates += [(other, other_plan, i) for i in range(self.steps)]
        for source_stream, source_plan, candidate in candidates:
            targets = source_plan.order[candidate * per_step : (candidate + 1) * per_step]
            needed = np.zeros(source_plan.span, dtype=bool)
            needed[targets] = True
            found = []
            for entry in reader.read(source_plan.segments, needed):
                if entry.reason in ("shard_failed", "shard_not_found") and entry.url not in reader.missing:
                    reader.missing.add(entry.url)
                    unreadable.append(entry.url)
                    if len(unreadable) >= 3:  # the storage is down, not a shard: say so instead of trying them all
                        raise RuntimeError(f"no sample can be read to stand in for the lost ones of stream {stream}, "
                                           f"epoch {epoch}: shards {', '.join(unreadable)} all fail")
                seed = self._sample_seed(epoch, source_stream, entry.index)
                sample = self.samples.decode(entry, seed, lambda *args, **kwargs: None)
                if sample is not None:
                    found.append((entry.index, sample, entry.key))
            if found:
                # in emission order, as the part itself would have held them
                rank_in_part = {int(t): i for i, t in enumerate(targets)}
                found.sort(key=lambda item: rank_in_part[item[0]])
                return [(sample, key) for _, sample, key in found]
        raise RuntimeError(f"epoch {epoch} holds no decodable sample in any stream; check the shards: "
                           + ", ".join(sorted({url for url, _ in self.shards})))
