"""data.mixture: every source's exact share of each epoch, without replacement, exact resume, clear errors."""

from __future__ import annotations

import pickle
from collections import Counter
from fractions import Fraction

import numpy as np
import pytest
import yaml

from pipeline.core.errors import ConfigError
from pipeline.data.config import DataConfig
from pipeline.data.loader import build_loader
from pipeline.data.mixture import MixtureSource, epoch_counts, epoch_pieces
from pipeline.data.plan import segments_of_range
from tests.data.test_data import assert_resumes_exactly, image_transform, read_all, tokenizer
from tests.data_fixtures import all_keys, write_dataset

SOURCES = {"big": [8, 8, 8], "even": [10, 6], "small": [5, 3]}  # 24, 16 and 8 samples


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixture")
    for name, sizes in SOURCES.items():
        write_dataset(root / name, sizes, prefix=name)
    return root


def manifest(root, entries) -> str:
    path = root / f"mix-{abs(hash(str(entries)))}.yaml"
    path.write_text(yaml.safe_dump({"sources": [{"urls": str(root / name), **spec} for name, spec in entries]}))
    return str(path)


def loader(path, **overrides):
    settings = dict(batch_size=4, workers=2, shuffle_buffer=10, mixture=path)
    settings.update(overrides)
    return build_loader(DataConfig(**settings), "", rank=0, world_size=1, seed=0, media_transform=image_transform(),
                        tokenizer=tokenizer(), image_size=16)


def epoch_keys(batches) -> Counter:
    return Counter(key for batch in batches for key in batch.keys)


def by_source(keys: Counter) -> dict[str, Counter]:
    """Keys are '<source index>/<key>' with several sources: split by source, the shard keys without the index."""
    split, owner = {name: Counter() for name in SOURCES}, {}
    for key, count in keys.items():
        index, shard_key = key.split("/", 1)
        name = next(name for name in SOURCES if shard_key.startswith(name))
        assert owner.setdefault(index, name) == name, key  # one index, one source
        split[name][shard_key] += count
    return split


# big down-sampled to half, even taken whole, small up-sampled to 2.5 passes: 12 + 16 + 20 = 48 samples,
# 2 streams x 6 batches of 4: no remainder, so every count is exact
SHARES = [("big", {"samples": 12}), ("even", {"samples": 16}), ("small", {"samples": 20})]


def test_each_source_gives_its_exact_share_of_every_epoch(sources):
    mix = loader(manifest(sources, SHARES))
    assert len(mix) == 12 and mix.dataset.remainder == 0
    epochs = [by_source(epoch_keys(read_all(mix))) for _ in range(4)]
    for parts in epochs:
        assert sum(parts["big"].values()) == 12 and set(parts["big"].values()) == {1}
        assert set(parts["even"]) == all_keys(SOURCES["even"], "even") and set(parts["even"].values()) == {1}
        # 20 of 8: every sample twice, and 4 of them a third time
        assert sum(parts["small"].values()) == 20 and set(parts["small"]) == all_keys(SOURCES["small"], "small")
        assert sorted(Counter(parts["small"].values()).items()) == [(2, 4), (3, 4)]
    # the down-sampled source: epochs 0 and 1 take disjoint halves, together all of it; epochs 2 and 3 do the
    # same in the next pass (in a shard order drawn anew: test_a_pass_that_ends_inside_an_epoch_...)
    big = [set(parts["big"]) for parts in epochs]
    for first, second in ((0, 1), (2, 3)):
        assert not big[first] & big[second] and big[first] | big[second] == all_keys(SOURCES["big"], "big")
    # the up-sampled source's extra third pass moves on too
    thirds = [{k for k, n in parts["small"].items() if n == 3} for parts in epochs]
    assert thirds[0] != thirds[1]


def test_weights_share_the_epoch(sources):
    path = manifest(sources, [("big", {"weight": 1}), ("even", {"weight": 3})])
    parts = by_source(epoch_keys(read_all(loader(path, epoch_samples=32))))
    assert (sum(parts["big"].values()), sum(parts["even"].values())) == (8, 24)
    assert epoch_counts([MixtureSource("a", samples=5), MixtureSource("b", weight=1), MixtureSource("c", weight=2)],
                        [10, 10, 10], 35) == [5, 10, 20]
    assert sum(epoch_counts([MixtureSource("a", weight=1)] * 3, [7, 7, 7], 10)) == 10  # rounding keeps the total


def test_resume_inside_a_mixed_epoch_is_exact(sources):
    path = manifest(sources, SHARES)
    interrupted = assert_resumes_exactly(lambda: loader(path), 5)
    # another share is another data set: its position does not apply
    other = loader(manifest(sources, [("big", {"samples": 16}), ("even", {"samples": 16}), ("small", {"samples": 16})]))
    with pytest.raises(ValueError, match="data set"):
        other.load_state_dict(interrupted.state_dict())


@pytest.mark.parametrize("entries, message", [
    ([("big", {"weight": 1, "samples": 3})], "exactly one of"),
    ([("big", {})], "exactly one of"),
    ([("big", {"weight": -1})], "weight must be a positive"),
    ([("big", {"samples": 2.5})], "samples must be a positive whole"),
    ([("big", {"sample": 3})], "unknown keys"),
])
def test_bad_manifests_name_the_file_and_source(sources, entries, message):
    path = manifest(sources, entries)
    with pytest.raises(ConfigError, match=message) as error:
        loader(path)
    assert f"data.mixture '{path}', source 0 (urls: '{sources / 'big'}')" in str(error.value)


def _entry(path: str, index: int, urls) -> str:
    return f"data.mixture '{path}', source {index} (urls: '{urls}')"


def test_a_source_that_cannot_be_read_is_named_by_its_manifest_entry_not_the_joined_urls(sources):
    from pipeline.train.config import RunConfig, load_config
    from pipeline.train.loop import validate

    # a directory that is not there, and a URL list none of whose shards exists: the loader and the trainer's
    # check name the manifest file, the entry's index and its urls, never the '::' list the loader joins
    for name, reason in (("absent", "no .tar shards found at"),
                         ("gone/part-{000000..000001}.tar", "none of the 2 shards of")):
        path = manifest(sources, [("big", {"weight": 1}), (name, {"weight": 1})])
        cfg = load_config(RunConfig, "configs/demo-clip.yaml", [f"data.mixture={path}", "data.train_urls=",
                                                                "data.val_urls=", "train.global_batch_size=8"])
        for check, argument in ((loader, path), (lambda run_config: validate(run_config, 1), cfg)):
            with pytest.raises(ConfigError) as error:
                check(argument)
            message = str(error.value)
            assert message.startswith(f"{_entry(path, 1, sources / name)} cannot be read: {reason}"), message
            assert "::" not in message

    # a source that holds no samples, and 'samples' entries that leave nothing to the 'weight' entries
    (sources / "empty").mkdir(exist_ok=True)
    write_dataset(sources / "empty", [0], prefix="empty")
    path = manifest(sources, [("big", {"weight": 1}), ("empty", {"weight": 1})])
    with pytest.raises(ConfigError) as error:
        loader(path)
    assert str(error.value) == f"{_entry(path, 1, sources / 'empty')} holds no samples"
    path = manifest(sources, [("big", {"samples": 48}), ("even", {"weight": 1})])
    with pytest.raises(ConfigError) as error:
        loader(path)
    assert f"data.mixture '{path}': the 'samples' entries (source 0 (48): 48 in all) leave nothing" in str(error.value)
    # too few samples for one batch per stream: the mixture is named
    path = manifest(sources, [("small", {"samples": 3})])
    with pytest.raises(ValueError, match=f"the mixture of data.mixture '{path}' has 3 samples"):
        loader(path)
    # a manifest that is not a readable file
    with pytest.raises(ConfigError, match=f"manifest '{sources}' cannot be read: IsADirectoryError"):
        loader(str(sources))


def test_a_source_error_reaches_every_rank_whole():
    import pickle

    from pipeline.data.shardindex import SourceError

    copy = pickle.loads(pickle.dumps(SourceError(2, "s3://b/x", "no .tar shards found at 's3://b/x'")))
    assert (copy.position, copy.source, copy.reason, str(copy)) == (2, "s3://b/x", "no .tar shards found at "
                                                                    "'s3://b/x'", "no .tar shards found at 's3://b/x'")


def test_mixture_excludes_train_urls_and_resampling(sources):
    with pytest.raises(ConfigError, match="data.mixture"):
        DataConfig(mixture="mix.yaml", train_urls=str(sources / "big"))
    with pytest.raises(ConfigError, match="data.mixture"):
        DataConfig(mixture="mix.yaml", resampled=True)
    with pytest.raises(ConfigError, match="not found"):
        loader(str(sources / "absent.yaml"))


def test_the_trainer_accepts_a_mixture_instead_of_train_urls(sources):
    from pipeline.train.config import RunConfig, load_config
    from pipeline.train.loop import validate

    path = manifest(sources, SHARES)
    cfg = load_config(RunConfig, "configs/demo-clip.yaml", [f"data.mixture={path}", "data.train_urls=",
                                                             "data.val_urls=", "train.global_batch_size=8"])
    assert validate(cfg, 1) == 8
    cfg = load_config(RunConfig, "configs/demo-clip.yaml", [f"data.mixture={sources / 'absent.yaml'}",
                                                            "data.train_urls=", "data.val_urls="])
    with pytest.raises(ConfigError, match="absent.yaml"):
        validate(cfg, 1)


@pytest.mark.parametrize("epoch_samples", [0, 30])  # 30: 2 samples of every epoch left over
def test_source_counts_say_what_each_source_gave_each_epoch(sources, epoch_samples):
    from pipeline.train.loop import mixture_epoch_line

    path = manifest(sources, [("big", {"weight": 2}), ("small", {"weight": 1})])
    mix = loader(path, epoch_samples=epoch_samples, workers=1)
    for epoch in range(3):
        read = Counter(key.split("/", 1)[0] for batch in read_all(mix) for key in batch.keys)
        planned = mix.dataset.source_counts(epoch)
        assert planned == [read["0"], read["1"]], (epoch, planned, read)
        assert sum(planned) + mix.dataset.remainder_of(epoch) == (epoch_samples or 32)
        line = mixture_epoch_line(mix, epoch, ["shards/big", "shards/small"], path)
        assert line == (f"epoch {epoch} of data.mixture {path}: source 0 (shards/big) {planned[0]} samples, "
                        f"source 1 (shards/small) {planned[1]} samples; {mix.dataset.remainder_of(epoch)} left over")


# The case of issue 19: A (480 samples, weight 3) and B (200, weight 1) in epochs of 330 samples, read as 20
# global batches of 16 (R = 320: 10 samples of every epoch are cut). Exact shares of what is read: 3/4 and
# 1/4 of 320, A 240 and B 80 every epoch (the old plan cut all 10 from whichever source lay at the cut:
# A 238 or 248, B 82 or 72, and skipped what it cut, so A came again after 470 of its 480, B after 190 of 200).
A_B = {"a": [60, 100, 40, 120, 80, 80], "b": [30, 70, 50, 50]}


def walk_checks(epochs: list[Counter], universe: set, count: int):
    """`epochs`: one source's samples (key -> times read) in each epoch, which reads `count` of the source's
    samples `universe`. No sample comes again before every sample came as often: at every epoch's end the
    times read differ by at most one, and so do they inside every epoch (a down-sampled source gives none
    twice); a pass that ends inside an epoch is read to its end in it."""
    total: Counter = Counter()
    for number, keys in enumerate(epochs):
        assert set(keys) <= universe and sum(keys.values()) == count, number
        inside = [keys[key] for key in universe]
        assert max(inside) - min(inside) <= 1, (number, Counter(inside))
        before = total.copy()
        total.update(keys)
        after = [total[key] for key in universe]
        assert max(after) - min(after) <= 1, (number, Counter(after))
        passes, done = divmod(sum(before.values()), len(universe))
        if done and done + count > len(universe):  # the pass ends in this epoch: all it has not read comes
            assert {key for key in universe if before[key] == passes} <= set(keys), number


def test_every_source_keeps_its_share_of_the_epoch_cut_to_whole_batches():
    shares = epoch_counts([MixtureSource("a", weight=3), MixtureSource("b", weight=1)], [480, 200], 330)
    assert shares == [248, 82] and shares.shares == (Fraction(495, 2), Fraction(165, 2))  # 247.5 and 82.5
    assert pickle.loads(pickle.dumps(shares)).shares == shares.shares  # as DataLoader workers get them
    sources = [[(f"{name}{i}", n) for i, n in enumerate(sizes)] for name, sizes in A_B.items()]
    offsets = [dict(zip((url for url, _ in source), np.cumsum([0] + [n for _, n in source]).tolist()))
               for source in sources]
    seen: list[list[Counter]] = [[], []]
    for epoch in range(12):
        start = epoch * 10 % 330  # where pipeline.data.plan starts the read window
        pieces = epoch_pieces(sources, shares, seed=0, epoch=epoch, read=(start, start + 320))
        assert sum(end - first for _, first, end, _ in pieces) == 330
        parts = [Counter(), Counter()]
        for segment in segments_of_range(pieces, start, start + 320):
            source = 0 if segment.url.startswith("a") else 1
            parts[source].update(range(offsets[source][segment.url] + segment.first,
                                       offsets[source][segment.url] + segment.end))
        assert [sum(part.values()) for part in parts] == [240, 80], epoch
        for source in (0, 1):
            seen[source].append(parts[source])
    walk_checks(seen[0], set(range(480)), 240)
    walk_checks(seen[1], set(range(200)), 80)
    # without the cut (a plain list of counts: its numbers are the shares) every position is read
    pieces = epoch_pieces(sources, [248, 82], seed=0, epoch=0)
    assert Counter(url[0] for url, first, end, _ in pieces for _ in range(first, end)) == {"a": 248, "b": 82}


def test_the_rounding_goes_round_and_totals_stay_exact():
    # three equal weights of an epoch of 31 read as 29: 29/3 each, so every epoch one source gets 9 and the
    # others 10; over every 3 epochs each gets exactly 29, and each is the short one in turn
    sources = [[(f"{name}{i}", n) for i, n in enumerate(sizes)] for name, sizes in (("p", [7]), ("q", [5, 6]),
                                                                                    ("r", [13]))]
    counts = epoch_counts([MixtureSource(name, weight=1) for name in "pqr"], [7, 11, 13], 31)
    per_epoch = [source_counts(sources, counts, epoch, 2) for epoch in range(30)]
    assert all(sorted(counts) == [9, 10, 10] for counts in per_epoch)
    for first in range(0, 30, 3):
        assert [sum(c[i] for c in per_epoch[first:first + 3]) for i in range(3)] == [29, 29, 29]
    # uneven shares, up-sampled and down-sampled sources: each epoch floor or ceil of the exact share, the
    # totals within one sample of it, exact wherever the exact total is whole
    weights, sizes = [5, 3, 1.5, 0.25], [400, 9, 60, 1]
    sources = [[(f"{index}-{i}", 1 + (i % 3)) for i in range(size // 2)] + [(f"{index}-x", size - size // 2)]
               for index, size in enumerate(sizes)]
    sources[3] = [("3-x", 1)]
    counts = epoch_counts([MixtureSource(str(i), weight=w) for i, w in enumerate(weights)], sizes, 157)
    exact = [Fraction(157 - 7) * share / 157 for share in counts.shares]
    totals = [0] * 4
    for epoch in range(60):
        got = source_counts(sources, counts, epoch, 7)
        assert all(x - 1 < n < x + 1 for n, x in zip(got, exact)), (epoch, got)
        totals = [t + n for t, n in zip(totals, got)]
        lags = [x * (epoch + 1) - t for x, t in zip(exact, totals)]
        assert all(-1 < lag < 1 for lag in lags), (epoch, lags)
        assert all(lag == 0 for lag in lags if lag.denominator == 1), (epoch, lags)


def test_the_rounding_stays_within_one_sample_of_every_share():
    """The per-epoch rounding alone, over random mixtures: each epoch floor or ceil of the exact share, the
    epoch's total exact, every source's total within one sample of its exact total (so exact where that is
    whole)."""
    from pipeline.data.mixture import _Rounding

    rng = np.random.default_rng(0)
    for _ in range(150):
        shares = tuple(Fraction(int(n), int(d)) for n, d in zip(rng.integers(1, 400, 8), rng.integers(1, 9, 8)))
        shares = shares[: int(rng.integers(2, 9))]
        total = sum(shares)
        read = int(rng.integers(1, int(total) + 1))
        rounding, exact = _Rounding(shares, read), [read * share / total for share in shares]
        totals = [0] * len(shares)
        for epoch in range(80):
            counts = rounding(epoch)
            assert sum(counts) == read and all(x - 1 < n < x + 1 for n, x in zip(counts, exact))
            totals = [t + n for t, n in zip(totals, counts)]
            assert all(-1 < x * (epoch + 1) - t < 1 for x, t in zip(exact, totals)), (shares, read, epoch)


def source_counts(sources, counts, epoch: int, remainder: int) -> list[int]:
    """What each source gives the read window of `epoch` (cut by `remainder` as pipeline.data.plan cuts it)."""
    total = sum(counts)
    start = epoch * remainder % total
    read = [0] * len(sources)
    index = {url: i for i, source in enumerate(sources) for url, _ in source}
    for segment in segments_of_range(epoch_pieces(sources, counts, 0, epoch, (start, start + total - remainder)),
                                     start, start + total - remainder):
        read[index[segment.url]] += segment.end - segment.first
    return read


@pytest.mark.parametrize("seed", range(4))
def test_a_pass_that_ends_inside_an_epoch_is_read_to_its_end_first(seed):
    # counts that move the pass ends around inside the epochs, for down-sampled (17 of 40, 33 of 40) and
    # up-sampled (61 of 40) sources; shards of uneven sizes, and more samples than shards
    sizes = [3, 9, 1, 7, 4, 6, 10]
    sources = [[(f"s{i}", n) for i, n in enumerate(sizes)]]
    offsets = np.cumsum([0] + sizes).tolist()
    for count in (17, 20, 33, 40, 61):
        epochs = []
        for epoch in range(25):
            pieces = epoch_pieces(sources, [count], seed, epoch)
            assert len(pieces) <= 2 * len(sizes) * (count // 40 + 2)  # shard ranges, never single samples
            keys = Counter()
            for url, first, end, _ in pieces:
                keys.update(range(offsets[int(url[1:])] + first, offsets[int(url[1:])] + end))
            epochs.append(keys)
        walk_checks(epochs, set(range(40)), count)
        if count == 20:  # every pass is two epochs, each pass in a shard order of its own: other halves
            assert len({frozenset(keys) for keys in epochs[::2]}) > 3


@pytest.fixture(scope="module")
def issue_sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixture-issue")
    for name, sizes in A_B.items():
        write_dataset(root / name, sizes, prefix=name)
    path = root / "mix.yaml"
    path.write_text(yaml.safe_dump({"sources": [{"urls": str(root / "a"), "weight": 3},
                                                {"urls": str(root / "b"), "weight": 1}]}))
    return str(path)


def test_the_loader_reads_every_share_exactly_and_each_source_to_its_end(issue_sources):
    mix = loader(issue_sources, epoch_samples=330, batch_size=16)
    assert len(mix) == 20 and mix.dataset.remainder_of(0) == 10
    seen: dict[str, list[Counter]] = {"0": [], "1": []}
    for epoch in range(6):  # B's first pass ends inside epoch 2 (its samples 160..240), its second with epoch 4
        keys = Counter()
        for batch in read_all(mix):
            keys.update(batch.keys)
        parts = {index: Counter({key.split("/", 1)[1]: n for key, n in keys.items() if key.startswith(index + "/")})
                 for index in seen}
        assert [sum(parts[i].values()) for i in seen] == [240, 80] == mix.dataset.source_counts(epoch), epoch
        for index in seen:
            seen[index].append(parts[index])
    walk_checks(seen["0"], all_keys(A_B["a"], "a"), 240)
    walk_checks(seen["1"], all_keys(A_B["b"], "b"), 80)
    assert set().union(*seen["0"][:2]) == all_keys(A_B["a"], "a") and set().union(*seen["1"][:3]) == \
        all_keys(A_B["b"], "b")
