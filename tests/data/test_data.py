"""Streaming loader: determinism, exact resume, eval, resampled mode, shard layouts, audio, pipe URLs.

Multi-rank tests (exactly once, bad data) are in test_data_ranks.py, S3 in test_data_s3.py.
"""

from __future__ import annotations

import pytest
import torch

from pipeline.core.errors import ConfigError
from pipeline.data.config import DataConfig
from pipeline.data.loader import build_loader, read_shard_sizes
from pipeline.data.plan import shuffle_order
from tests.data_fixtures import (
    all_keys,
    write_dataset,
    write_img2dataset,
    write_open_clip_style,
)

IMAGE_SIZE = 16


def image_transform(train: bool = True):
    """What training uses (models.media_transform): open_clip's crop/resize, uint8 out."""
    from open_clip.transform import PreprocessCfg

    from pipeline.model.image import image_pixel_transform

    return image_pixel_transform(PreprocessCfg(size=IMAGE_SIZE), is_train=train)


def tokenizer():
    import open_clip

    return open_clip.get_tokenizer("ViT-B-32")


def make_loader(urls, *, rank=0, world_size=1, seed=0, train=True, transform=None, global_batch=None, **overrides):
    settings = dict(batch_size=4, workers=2, shuffle_buffer=10, retry_backoff=0.01)
    settings.update(overrides)
    cfg = DataConfig(train_urls=str(urls), **settings)
    return build_loader(cfg, str(urls), rank=rank, world_size=world_size, seed=seed,
                        media_transform=transform or image_transform(train), tokenizer=tokenizer(),
                        train=train, image_size=IMAGE_SIZE, global_batch=global_batch)


def read_all(loader, limit=None):
    batches = []
    for batch in loader:
        batches.append(batch)
        if limit is not None and len(batches) == limit:
            break
    return batches


def assert_same_batches(left, right):
    assert len(left) == len(right)
    for i, (a, b) in enumerate(zip(left, right)):
        assert a.keys == b.keys, f"batch {i}: keys differ"
        assert torch.equal(a.media, b.media), f"batch {i}: media differ"
        assert torch.equal(a.tokens, b.tokens), f"batch {i}: tokens differ"
        assert torch.equal(a.labels, b.labels), f"batch {i}: labels differ"


SIZES = [8, 12, 4, 16, 8]  # 48 samples; multiples of 4 so that shard ends can fall on batch ends


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    directory = tmp_path_factory.mktemp("shards")
    write_dataset(directory, SIZES)
    return directory


def test_batches_shapes_and_labels(dataset):
    loader = make_loader(dataset, workers=0)
    batches = read_all(loader)
    assert len(batches) == len(loader) == 12
    batch = batches[0]
    assert batch.media.shape == (4, 3, IMAGE_SIZE, IMAGE_SIZE) and batch.media.dtype == torch.uint8
    assert batch.tokens.shape == (4, 77) and batch.tokens.dtype == torch.long
    assert batch.labels.tolist() == [int(key[-4:]) % 5 for key in batch.keys]
    assert sorted(k for b in batches for k in b.keys) == sorted(all_keys(SIZES))
    assert loader.stats["samples_read"] == 48


def test_uint8_batches_normalise_to_open_clip_float_batches(dataset):
    """Workers ship uint8 crops; normalised on the model they equal what open_clip's float transform gives
    for the same samples and the same per-sample seeds (train crops included), bit for bit."""
    import open_clip

    from pipeline.model.build import build_model
    from pipeline.model.config import ModelConfig

    model = build_model(ModelConfig(name="tiny-clip"))  # normalise_pixels does not depend on the image size
    for train in (True, False):
        pixels = read_all(make_loader(dataset, train=train))
        floats = read_all(make_loader(dataset, train=train,
                                      transform=open_clip.image_transform(IMAGE_SIZE, is_train=train)))
        assert len(pixels) == len(floats) > 0
        for ours, theirs in zip(pixels, floats):
            assert ours.keys == theirs.keys
            assert ours.media.dtype == torch.uint8 and theirs.media.dtype == torch.float32
            torch.testing.assert_close(model.normalise_pixels(ours.media), theirs.media, rtol=0, atol=0)


def test_same_seed_same_batches_next_epoch_differs(dataset):
    first = read_all(make_loader(dataset))
    second = read_all(make_loader(dataset))
    assert_same_batches(first, second)
    loader = make_loader(dataset)
    loader.set_epoch(1)
    next_epoch = read_all(loader)
    assert [b.keys for b in next_epoch] != [b.keys for b in first]
    assert sorted(k for b in next_epoch for k in b.keys) == sorted(k for b in first for k in b.keys)
    other_seed = read_all(make_loader(dataset, seed=1))
    assert [b.keys for b in other_seed] != [b.keys for b in first]


def assert_resumes_exactly(make, k: int):
    """A loader from `make()` stopped after k batches and a new one resumed from its state yield exactly the
    batches of an uninterrupted one; returns the interrupted loader."""
    full = read_all(make())
    interrupted = make()
    head = read_all(interrupted, limit=k)
    resumed = make()
    resumed.load_state_dict(interrupted.state_dict())
    assert_same_batches(head + read_all(resumed), full)
    return interrupted


def resume_matches(dataset, k, **overrides):
    full = read_all(make_loader(dataset, **overrides))
    loader = make_loader(dataset, **overrides)
    head = read_all(loader, limit=k)
    state = loader.state_dict()
    assert state["batches_consumed"] == k
    resumed = make_loader(dataset, **overrides)
    resumed.load_state_dict(state)
    tail = read_all(resumed)
    assert len(head) + len(tail) == len(full)
    assert_same_batches(head + tail, full)
    # the interrupted loader itself, iterated again, goes on from where the caller stopped
    assert_same_batches(read_all(loader), tail)
    return resumed


def test_exact_resume_inside_a_shard_with_shuffle(dataset):
    resumed = resume_matches(dataset, 3)
    # the resumed loader skipped what was consumed: it read (decoded) only the rest
    assert resumed.stats["samples_read"] == 48 - 3 * 4


def test_exact_resume_at_a_shard_boundary(dataset):
    # without a shuffle buffer a stream emits its range in order; find k where stream 0 has
    # consumed exactly its first shard segment
    loader = make_loader(dataset, shuffle_buffer=0)
    plan = loader.dataset.plan(0, 0)
    first_segment = plan.segments[0].end - plan.segments[0].first
    assert first_segment % 4 == 0 and len(plan.segments) > 1
    k = 2 * (first_segment // 4) - 1  # batches 0, 2, ... come from stream 0
    resume_matches(dataset, k, shuffle_buffer=0)


def test_resume_at_epoch_end_and_second_epoch(dataset):
    loader = make_loader(dataset)
    read_all(loader)
    state = loader.state_dict()
    assert (state["epoch"], state["batches_consumed"]) == (1, 0)
    epoch1 = read_all(loader)
    resumed = make_loader(dataset)
    resumed.load_state_dict(state)
    assert_same_batches(read_all(resumed), epoch1)


def test_state_from_another_data_set_or_seed_is_refused(dataset, tmp_path):
    # (another layout, world size or workers, is an elastic resume: tests/data/test_elastic_data.py)
    state = make_loader(dataset, workers=0).state_dict()
    with pytest.raises(ValueError, match="seed"):
        make_loader(dataset, workers=0, seed=1).load_state_dict(state)
    write_dataset(tmp_path, [8, 8], prefix="other")
    with pytest.raises(ValueError, match="data set"):
        make_loader(tmp_path, workers=0).load_state_dict(state)


def test_eval_reads_every_sample_once_in_order(tmp_path):
    sizes = [5, 3, 6]
    write_dataset(tmp_path, sizes)
    loaders = [make_loader(tmp_path, rank=r, world_size=2, train=False, workers=2) for r in range(2)]
    per_rank = [read_all(loader) for loader in loaders]
    assert len(per_rank[0]) == len(per_rank[1]) == len(loaders[0])
    keys = [k for batches in per_rank for b in batches for k in b.keys]
    real = [k for k in keys if k]
    assert sorted(real) == sorted(all_keys(sizes)) and len(real) == len(set(real))
    assert all(b.media.shape[0] == 4 for batches in per_rank for b in batches)
    padded = [lab for batches in per_rank for b in batches for k, lab in zip(b.keys, b.labels.tolist()) if not k]
    assert padded and set(padded) == {-1}
    assert_same_batches(per_rank[0], read_all(make_loader(tmp_path, rank=0, world_size=2, train=False)))


def test_resampled_mode_mixes_by_weight_deterministic_and_resumes(tmp_path):
    write_dataset(tmp_path / "a", [8, 8], prefix="a")
    write_dataset(tmp_path / "b", [8, 8], prefix="b")
    urls = f"{tmp_path / 'a'}::{tmp_path / 'b'}"
    only_a = read_all(make_loader(urls, resampled=True, weights=[1.0, 0.0], epoch_samples=40))
    assert len(only_a) == 10 and all(k.startswith("0/a") for b in only_a for k in b.keys)  # source 0: a
    settings = dict(resampled=True, weights=[1.0, 3.0], epoch_samples=48)
    mixed = read_all(make_loader(urls, **settings))
    keys = [k for b in mixed for k in b.keys]
    assert all(k.startswith(("0/a", "1/b")) for k in keys)
    assert sum(k.startswith("1/b") for k in keys) > sum(k.startswith("0/a") for k in keys)
    assert_same_batches(mixed, read_all(make_loader(urls, **settings)))
    loader = make_loader(urls, **settings)
    head = read_all(loader, limit=5)
    resumed = make_loader(urls, **settings)
    resumed.load_state_dict(loader.state_dict())
    assert_same_batches(head + read_all(resumed), mixed)


def test_json_captions_are_picked_from_the_list(tmp_path):
    write_dataset(tmp_path, [8], captions=True)
    loader = make_loader(tmp_path, workers=0, caption_source="json", batch_size=8)
    batch = read_all(loader)[0]
    tok = tokenizer()
    for key, tokens in zip(batch.keys, batch.tokens):
        options = [tok([f"first caption of {key}"])[0], tok([f"second caption of {key}"])[0]]
        assert any(torch.equal(tokens, option) for option in options)
    txt = read_all(make_loader(tmp_path, workers=0, batch_size=8))[0]
    assert torch.equal(txt.tokens[0], tok([f"caption of {txt.keys[0]}"])[0])


def test_img2dataset_shards_load_unchanged(tmp_path):
    keys = write_img2dataset(tmp_path, [6, 9])
    assert read_shard_sizes(str(tmp_path)) == {str(tmp_path / "00000.tar"): 6, str(tmp_path / "00001.tar"): 9}
    loader = make_loader(tmp_path, workers=0, train=False)
    seen = [k for b in read_all(loader) for k in b.keys if k]
    assert sorted(seen) == sorted(keys)
    assert all(label == -1 for b in read_all(loader) for label in b.labels.tolist())


def test_open_clip_style_shards_load_unchanged(tmp_path):
    keys = write_open_clip_style(tmp_path, [7, 5, 4])
    urls = str(tmp_path / "{00000..00002}.tar")
    assert sum(read_shard_sizes(urls).values()) == 16
    seen = [k for b in read_all(make_loader(urls, workers=2, train=False)) for k in b.keys if k]
    assert sorted(seen) == sorted(keys)


def test_sizes_counted_from_tar_when_no_metadata(tmp_path):
    write_dataset(tmp_path, [3, 5], sizes_json=False)
    assert list(read_shard_sizes(str(tmp_path)).values()) == [3, 5]


def test_audio_shards_give_log_mel_batches(tmp_path):
    from pipeline.media.audio import AudioConfig

    audio = AudioConfig(sample_rate=8000, clip_seconds=0.5, n_mels=16, n_fft=256, hop_length=128, f_max=4000)

    write_dataset(tmp_path, [6, 6], modality="audio")
    loader = make_loader(tmp_path, workers=0, modality="audio", transform=AudioTransform(audio))
    batches = read_all(loader)
    assert len(batches) == 3
    assert batches[0].media.shape == (4, audio.n_mels, audio.num_frames)
    assert torch.isfinite(batches[0].media).all()
    again = read_all(make_loader(tmp_path, workers=0, modality="audio", transform=AudioTransform(audio)))
    assert_same_batches(batches, again)  # the random crop is seeded per sample
    # clips are 0.75 s, cut to 0.5 s: at a random offset in training, from the start in eval
    key = batches[0].keys[0]
    evaluated = {k: m for b in read_all(make_loader(tmp_path, workers=0, modality="audio", train=False,
                                                    transform=AudioTransform(audio))) for k, m in zip(b.keys, b.media)}
    assert evaluated[key].shape == batches[0].media[0].shape


class AudioTransform:
    """waveform, rate, generator -> log-mel, as models.media_transform builds it for audio."""

    def __init__(self, audio):
        self.audio = audio

    def __call__(self, waveform, sample_rate, generator):
        from pipeline.media.audio import fit_length, log_mel, resample

        wave = resample(torch.from_numpy(waveform), sample_rate, self.audio.sample_rate)
        return log_mel(fit_length(wave, self.audio.num_samples, generator), self.audio)


def test_pipe_urls_need_allow_pipe(tmp_path):
    paths = write_dataset(tmp_path, [8])
    url = f"pipe:cat {paths[0]}"
    with pytest.raises(ConfigError, match="allow_pipe"):
        make_loader(url, workers=0)
    cfg = DataConfig(train_urls=url, allow_pipe=True, batch_size=4, workers=0)
    loader = build_loader(cfg, url, rank=0, world_size=1, seed=0, media_transform=image_transform(),
                          tokenizer=tokenizer())
    assert sorted(k for b in read_all(loader) for k in b.keys) == sorted(all_keys([8]))


def test_too_few_samples_fails_at_start_naming_the_need(tmp_path):
    write_dataset(tmp_path, [5])
    with pytest.raises(ValueError, match="5 samples, fewer than one global batch of 8"):
        make_loader(tmp_path, world_size=2)


@pytest.mark.parametrize("key, value", [("batch_size", 0), ("modality", "video"), ("workers", -1),
                                        ("caption_source", "csv"), ("weights", [1.0, -1.0]),
                                        ("retry_max_s", -1.0), ("read_timeout_s", -1.0)])
def test_config_errors_name_the_key(key, value):
    with pytest.raises(ConfigError, match=f"data.{key}"):
        DataConfig(**{key: value})


def test_shuffle_order_is_a_permutation_within_buffer_reach():
    import numpy as np

    order = shuffle_order(1000, 16, np.random.default_rng(0))
    assert sorted(order.tolist()) == list(range(1000))
    assert order.tolist() != list(range(1000))
    # an item cannot leave before it was read: the i-th emitted item was read at most at i + 16
    assert all(item <= i + 16 for i, item in enumerate(order.tolist()))
