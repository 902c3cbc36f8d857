"""Mixture manifests (`data.mixture=mix.yaml`): several sources, each with its share of every epoch,
taken without replacement.

    sources:
      - urls: s3://bucket/laion/{00000..41455}.tar   # any data.train_urls form for one source
        weight: 3            # a share of the epoch: epoch size x weight / sum of weights
      - urls: shards/cc12m
        samples: 2000000     # or a fixed number of samples per epoch
      - urls: shards/curated
        samples: 500000      # more than the source holds: whole passes plus a part

The epoch size is `data.epoch_samples`, or the sources' total size; `samples` entries take theirs first and
`weight` entries share the rest (`epoch_counts`: whole samples for the log line and the data set's identity,
with the exact fractional shares they round).

What an epoch reads. The streams read the epoch cut to whole global batches (pipeline.data.plan): R of its
T samples. Each source reads its exact share of R, x = R x share / T, rounded per epoch: every source gets
floor(x) or floor(x) + 1, and the extra samples go round with the epoch (to the sources furthest behind
their exact total, soonest due first), so that each source's total over the epochs stays within one sample
of x x epochs: what the cut leaves out is spread over the sources in proportion to their shares, not taken
from whichever source lies at the cut. (3:1 of T = 330 read as R = 320: 240 and 80 every epoch.)

Which samples. Each source walks through passes over its samples: pass p is its shards in an order drawn
by (seed, source, p), and an epoch takes the next samples of that walk, as many as it reads, so a source
is read to its end before any of its samples comes again, and a down-sampled source reads another subset
every epoch. In an epoch that ends a pass and begins the next, the new pass first takes samples the
epoch does not already hold (they come before that epoch's part of the old pass, in the walk), so no
sample comes twice in an epoch unless every one of that source's samples comes at least that often.
(Inside one epoch the pieces are shuffled over the streams, so the old pass's last samples and the new
pass's first ones are read in a mixed order in time.) A pass is a list of shard ranges, each shard in at
most two: the work is O(shards) per pass begun and per epoch, never O(samples).

The sources' pieces of the epoch are shuffled by (seed, epoch) and laid on the epoch's circle of T
positions so that the R positions the streams read (pipeline.data.plan's read window) hold them; the
T - R positions nobody reads hold stand-ins (the first pieces again). Every count is fixed by (seed,
epoch) and the cut, so resume is exact as for a single source. The walk's position after e epochs is the
sum of what the epochs before read: it is computed forward from epoch 0 (O(epochs x shards) once per
process, then one epoch at a time).

MosaicML streaming mixes without replacement too, but only in its own MDS format; webdataset's
`RandomMix` draws with replacement. Neither fits tar shards with an exact, resumable epoch plan, so this
is our own.

Every error names the manifest file, and where one source is at fault its entry (index in `sources:`, urls):
`data.mixture 'mix.yaml', source 1 (urls: 'shards/cc12m') cannot be read: no .tar shards found at ...`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np

from pipeline.core import randomness, storage
from pipeline.core.errors import ConfigError


@dataclass(frozen=True)
class MixtureSource:
    urls: str
    weight: float | None = None
    samples: int | None = None
    manifest: str = ""
    """The manifest file the source is listed in."""
    index: int = 0
    """Its entry in the manifest's `sources:` list (0, 1, ...)."""

    @property
    def where(self) -> str:
        """The source as errors name it: manifest file, entry and urls."""
        return _where(self.manifest, self.index, self.urls)


def _where(manifest: str, index: int, urls: Any) -> str:
    return f"data.mixture '{manifest}', source {index} (urls: {urls!r})"


def read_manifest(url: str, storage_options: dict | None = None) -> list[MixtureSource]:
    """The sources of a manifest file (local path or fsspec URL), validated: errors name the file and entry."""
    import yaml

    try:
        with storage.open_url(url, "rb", storage_options) as handle:
            document = yaml.safe_load(handle.read())
    except FileNotFoundError:
        raise ConfigError(f"data.mixture: manifest '{url}' not found") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"data.mixture: '{url}' is not YAML: {error}") from None
    except Exception as error:  # whatever the storage says (no permission, a failing store): name the file
        raise ConfigError(f"data.mixture: manifest '{url}' cannot be read: {storage.describe(error)}") from None
    entries = document.get("sources") if isinstance(document, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"data.mixture: '{url}' needs a non-empty 'sources:' list")
    return [_source(url, index, entry) for index, entry in enumerate(entries)]


def _source(url: str, index: int, entry: Any) -> MixtureSource:
    where = _where(url, index, entry.get("urls") if isinstance(entry, dict) else None)
    if not isinstance(entry, dict) or not isinstance(entry.get("urls"), str) or not entry["urls"].strip():
        raise ConfigError(f"{where}: needs 'urls' (a shard directory or URL pattern), got the entry {entry!r}")
    unknown = set(entry) - {"urls", "weight", "samples"}
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)} (known: urls, weight, samples)")
    if ("weight" in entry) == ("samples" in entry):
        raise ConfigError(f"{where}: give exactly one of 'weight' (share of the epoch) or 'samples' (per epoch)")
    if "::" in entry["urls"]:
        raise ConfigError(f"{where}: one source per entry ('::' joins sources in data.train_urls, not here)")
    if "weight" in entry:
        weight = entry["weight"]
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0:
            raise ConfigError(f"{where}: weight must be a positive number, got {weight!r}")
        return MixtureSource(entry["urls"].strip(), weight=float(weight), manifest=url, index=index)
    samples = entry["samples"]
    if isinstance(samples, bool) or not isinstance(samples, int) or samples <= 0:
        raise ConfigError(f"{where}: samples must be a positive whole number, got {samples!r}")
    return MixtureSource(entry["urls"].strip(), samples=samples, manifest=url, index=index)


class EpochCounts(list):
    """The samples each source gives an epoch, as whole numbers (a list of ints: what the log line prints and the
    data set's fingerprint holds; the epoch's size is their sum), with `shares`: the exact shares they round
    (Fractions), which epoch_pieces rounds per epoch instead, so that no source always gains the rounding."""

    def __init__(self, counts, shares):
        super().__init__(int(count) for count in counts)
        self.shares = tuple(Fraction(share) for share in shares)


def epoch_counts(sources: list[MixtureSource], sizes: list[int], epoch_samples: int = 0) -> EpochCounts:
    """Samples each source gives every epoch (whole numbers by largest remainder; `.shares`: the exact ones)."""
    for source, size in zip(sources, sizes):
        if size <= 0:
            raise ConfigError(f"{source.where} holds no samples")
    fixed = sum(source.samples or 0 for source in sources)
    total = epoch_samples or sum(sizes)
    # the weights as written (0.3, not the float nearest it), so that shares such as 3:1 stay exact
    weights = [Fraction(repr(source.weight)) if source.weight else Fraction(0) for source in sources]
    rest = total - fixed
    if sum(weights) and rest <= 0:
        entries = ", ".join(f"source {s.index} ({s.samples})" for s in sources if s.samples)
        raise ConfigError(f"data.mixture '{sources[0].manifest}': the 'samples' entries ({entries}: {fixed} in all) "
                          f"leave nothing of the epoch ({total}) to the 'weight' entries; set data.epoch_samples "
                          "higher")
    shares = [Fraction(source.samples) if source.samples else weight / sum(weights) * rest
              for source, weight in zip(sources, weights)]
    # whole samples by largest remainder (ties to the earlier source): they add up to the epoch exactly
    counts = [math.floor(share) for share in shares]
    order = sorted(range(len(shares)), key=lambda i: -(shares[i] - counts[i]))
    for i in order[: int(sum(shares)) - sum(counts)]:
        counts[i] += 1
    return EpochCounts(counts, shares)


class _Rounding:
    """Samples each source reads in epochs 0, 1, ...: floor(x) or floor(x) + 1 of its exact share x of what the
    epoch reads, the extra ones to sources whose total lags behind x x epochs, the one due soonest (whose lag
    would first reach a whole sample) first, ties going round with the epoch (a Tijdeman-style schedule: the
    totals stay within one sample of x x epochs, and are exact wherever x x epochs is whole)."""

    def __init__(self, shares: tuple[Fraction, ...], read: int):
        total = sum(shares)
        self.exact = [Fraction(read) * share / total for share in shares]
        self.base = [math.floor(x) for x in self.exact]
        self.fraction = [x - base for x, base in zip(self.exact, self.base)]
        self.extra = read - sum(self.base)
        self.lag = [Fraction(0)] * len(shares)  # exact total so far less the samples given
        self.epochs: list[list[int]] = []

    def __call__(self, epoch: int) -> list[int]:
        n = len(self.exact)
        while len(self.epochs) <= epoch:
            rotation = len(self.epochs)
            due = [lag + fraction for lag, fraction in zip(self.lag, self.fraction)]
            behind = sorted((i for i in range(n) if due[i] > 0 and self.fraction[i]),
                            key=lambda i: ((1 - due[i]) / self.fraction[i], (i - rotation) % n))
            others = sorted((i for i in range(n) if i not in behind), key=lambda i: (-due[i], (i - rotation) % n))
            counts = list(self.base)
            for i in (behind + others)[: self.extra]:
                counts[i] += 1
            self.lag = [lag + x - count for lag, x, count in zip(self.lag, self.exact, counts)]
            self.epochs.append(counts)
        return self.epochs[epoch]


# A pass is a list of (shard index, first, end) ranges of a source's shards; a walk state is
# (walk position, pass holding it, that pass's ranges).
_Pass = list[tuple[int, int, int]]


class _Walk:
    """One source's walk through its passes (module docstring)."""

    def __init__(self, shards: list[tuple[str, int]], seed: int, index: int):
        self.shards, self.seed, self.index = shards, seed, index
        self.size = sum(n for _, n in shards)

    def start(self) -> tuple[int, int, _Pass]:
        return 0, 0, self.fresh(0)

    def shard_order(self, number: int) -> np.ndarray:
        return randomness.generator(self.seed, "mixture_pass_order", self.index, number).permutation(len(self.shards))

    def fresh(self, number: int) -> _Pass:
        return [(int(i), 0, self.shards[i][1]) for i in self.shard_order(number)]

    def after(self, state: tuple[int, int, _Pass], count: int) -> tuple[int, int, _Pass]:
        """The state after an epoch that reads `count` samples from `state`."""
        position, number, ranges = state
        end = position + count
        following = end // self.size
        if following == number:
            return end, number, ranges
        if end % self.size == 0 or position % self.size == 0:  # no part of an old pass shares the epoch with it
            return end, following, self.fresh(following)
        # the epoch ends inside pass `following` and began inside pass `number`: the new pass takes first what
        # the epoch's part of the old one (its last samples) does not hold
        old_part = _span(ranges, position - number * self.size, self.size)
        return end, following, self.avoiding(following, old_part, end - following * self.size)

    def avoiding(self, number: int, taken: _Pass, head: int) -> _Pass:
        """Pass `number`: its first `head` samples (or all it has) outside `taken` (ranges [t, end of shard): a
        pass's part after any position covers each shard's end), in its shard order, then the rest in that order."""
        tail_from = {}
        for shard, first, _ in taken:
            tail_from[shard] = min(tail_from.get(shard, first), first)
        order = self.shard_order(number)
        heads, cut, need = [], {}, head
        for i in order.tolist():
            if need == 0:
                break
            take = min(tail_from.get(i, self.shards[i][1]), need)
            if take:
                heads.append((i, 0, take))
                cut[i] = take
                need -= take
        rest = [(i, cut.get(i, 0), self.shards[i][1]) for i in order.tolist() if cut.get(i, 0) < self.shards[i][1]]
        return heads + rest

    def pieces(self, state: tuple[int, int, _Pass], count: int,
               following: tuple[int, int, _Pass]) -> list[tuple[str, int, int, int]]:
        """(url, first, end, shard size) of the `count` samples an epoch reads from `state` (`following`: the state
        after it, which holds the order of the pass it ends in)."""
        position, number, ranges = state
        end, out = position + count, []
        while position < end:
            current = position // self.size
            if current == number:
                order = ranges
            elif current == following[1]:
                order = following[2]
            else:  # a whole pass inside the epoch
                order = self.fresh(current)
            low = position - current * self.size
            high = min(self.size, end - current * self.size)
            out += [(self.shards[i][0], first, stop, self.shards[i][1]) for i, first, stop in _span(order, low, high)]
            position = current * self.size + high
        return out


def _span(ranges: list, low: int, high: int) -> list:
    """Positions [low, high) of ranges (key, first, end, *rest) laid end to end, as ranges of the same form."""
    out, position = [], 0
    for key, first, stop, *rest in ranges:
        size = stop - first
        lo, hi = max(low, position), min(high, position + size)
        if lo < hi:
            out.append((key, first + lo - position, first + hi - position, *rest))
        position += size
        if position >= high:
            break
    return out


class _Plan:
    """Every source's walk over the epochs of one run (a mixture, a seed and the samples an epoch reads)."""

    def __init__(self, sources: list[list[tuple[str, int]]], shares: tuple[Fraction, ...], read: int, seed: int):
        self.rounding = _Rounding(shares, read)
        self.walks = [_Walk(shards, seed, index) for index, shards in enumerate(sources)]
        self.states = {0: [walk.start() for walk in self.walks]}  # epoch -> the walks' states at its start
        self.laid: dict[tuple[int, int], list] = {}  # (epoch, read start) -> epoch_pieces' answer: every stream asks

    def state(self, epoch: int) -> list[tuple[int, int, _Pass]]:
        known = max(e for e in self.states if e <= epoch)
        states = self.states[known]
        for e in range(known, epoch):
            states = [walk.after(state, count) for walk, state, count in zip(self.walks, states, self.rounding(e))]
        self.states[epoch] = states
        for old in sorted(self.states)[1:-3]:  # epoch 0 and the latest few
            del self.states[old]
        return states

    def pieces(self, epoch: int) -> list[tuple[str, int, int, int]]:
        states, following = self.state(epoch), self.state(epoch + 1)
        return [piece for walk, state, count, after in zip(self.walks, states, self.rounding(epoch), following)
                for piece in walk.pieces(state, count, after)]


_PLANS: dict[tuple, _Plan] = {}


def epoch_pieces(sources: list[list[tuple[str, int]]], counts: list[int], seed: int, epoch: int,
                 read: tuple[int, int] | None = None) -> list[tuple[str, int, int, int]]:
    """(url, first, end, shard size) ranges laid end to end on the epoch's circle of sum(counts) positions.
    `read`: [start, end) of the positions the streams read (pipeline.data.plan's read window; end may pass the
    total); default all of them. Those hold every source's exact share of what is read, in a (seed, epoch)
    order; the rest hold stand-ins. `counts`: epoch_counts' answer (a plain list: its numbers are the shares)."""
    total = sum(counts)
    start, end = read if read is not None else (0, total)
    if not 0 < end - start <= total:
        raise ValueError(f"the read window [{start}, {end}) does not fit the epoch's {total} samples")
    shares = tuple(getattr(counts, "shares", None) or (Fraction(count) for count in counts))
    key = (seed, end - start, shares, tuple(tuple(shards) for shards in sources))
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= 4:
            _PLANS.clear()
        plan = _PLANS[key] = _Plan(sources, shares, end - start, seed)
    if (epoch, start) not in plan.laid:
        pieces = plan.pieces(epoch)
        order = randomness.generator(seed, "mixture_piece_order", epoch).permutation(len(pieces))
        pieces = [pieces[i] for i in order]
        pieces += _span(pieces, 0, total - (end - start))  # the positions nobody reads: stand-ins
        # position `start` of the circle holds the first read sample
        offset = (total - start) % total
        if len(plan.laid) >= 2:
            plan.laid.clear()
        plan.laid[epoch, start] = _span(pieces, offset, total) + _span(pieces, 0, offset)
    return list(plan.laid[epoch, start])
