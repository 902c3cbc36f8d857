"""data.mixture: every source's exact share of each epoch, without replacement, exact resume, clear errors."""

from __future__ import annotations

from collections import Counter

import pytest
import yaml

from pipeline.core.errors import ConfigError
from pipeline.data.dataset import DataConfig, build_loader
from pipeline.data.mixture import MixtureSource, epoch_counts
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
    epochs = [by_source(epoch_keys(read_all(mix))) for _ in range(3)]
    for parts in epochs:
        assert sum(parts["big"].values()) == 12 and set(parts["big"].values()) == {1}
        assert set(parts["even"]) == all_keys(SOURCES["even"], "even") and set(parts["even"].values()) == {1}
        # 20 of 8: every sample twice, and 4 of them a third time
        assert sum(parts["small"].values()) == 20 and set(parts["small"]) == all_keys(SOURCES["small"], "small")
        assert sorted(Counter(parts["small"].values()).items()) == [(2, 4), (3, 4)]
    # the down-sampled source: epochs 0 and 1 take disjoint halves, together all of it; epoch 2 starts over
    big = [set(parts["big"]) for parts in epochs]
    assert not big[0] & big[1] and big[0] | big[1] == all_keys(SOURCES["big"], "big")
    assert big[2] == big[0]
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
