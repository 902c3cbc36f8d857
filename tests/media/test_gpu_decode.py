"""data.decode=gpu on the CPU (device="cpu" runs the same code): pixels close to the PIL path, exact resume,
fallbacks counted, bad JPEGs skipped; and training streams that run on into the next epoch."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.core.errors import ConfigError
from pipeline.media import imagedecode
from tests.data.test_data import (
    assert_resumes_exactly,
    assert_same_batches,
    image_transform,
    make_loader,
    read_all,
    tokenizer,
)
from tests.data_fixtures import rewrite_tar, write_dataset

SIZES = [8, 12, 4, 16, 8]  # 48 samples

# Tolerance against the PIL path (same crop, same size): the decoders' IDCTs (libjpeg-turbo in PIL, the
# libjpeg torchvision links; nvJPEG on a GPU) and tensor vs PIL resampling may round differently. Measured
# here on the CPU (noise JPEGs, the worst case for both): mean |difference| 0.003 levels of 255, 99th
# percentile 0, largest 1 level. The bounds leave room for another decoder.
MEAN_ABS_LEVELS = 0.5
P99_LEVELS = 2


def photo_jpeg(seed: int, width: int, height: int, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    pixels = np.stack([np.sin((4 + c) * x + 3 * y * rng.random()) * 100 + 120 for c in range(3)], -1)
    pixels = (pixels + rng.normal(0, 6, pixels.shape)).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    buffer = io.BytesIO()
    (image.convert(mode) if mode != "RGB" else image).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    directory = tmp_path_factory.mktemp("shards")
    write_dataset(directory, SIZES)
    return directory


def gpu_loader(urls, *, train=True, **overrides):
    from pipeline.data.config import DataConfig
    from pipeline.data.loader import build_loader

    settings = dict(batch_size=4, workers=2, shuffle_buffer=10, retry_backoff=0.01, decode="gpu")
    settings.update(overrides)
    return build_loader(DataConfig(train_urls=str(urls), **settings), str(urls), rank=0, world_size=1, seed=0,
                        media_transform=image_transform(train), tokenizer=tokenizer(), train=train,
                        image_size=16, device="cpu")


def test_same_keys_shapes_and_close_pixels_as_the_pil_path(dataset):
    device = read_all(gpu_loader(dataset))
    pil = read_all(make_loader(dataset, jpeg_draft=False))
    assert [b.keys for b in device] == [b.keys for b in pil]
    difference = torch.cat([(d.media.int() - p.media.int()).abs().flatten() for d, p in zip(device, pil)]).float()
    assert device[0].media.shape == pil[0].media.shape and device[0].media.dtype == torch.uint8
    assert difference.mean() <= MEAN_ABS_LEVELS, difference.mean()
    assert difference.quantile(0.99) <= P99_LEVELS
    for d, p in zip(device, pil):
        assert torch.equal(d.tokens, p.tokens) and torch.equal(d.labels, p.labels) and torch.equal(d.valid, p.valid)


def test_crop_is_the_pil_paths_crop_on_a_photo():
    """One 640x480 photo-like JPEG through both paths under one seed: the same crop, nearly the same pixels."""
    transform = image_transform(True)
    crop = imagedecode.DeviceCrop(transform)
    data = photo_jpeg(0, 64, 48)
    torch.manual_seed(5)
    pil = transform(Image.open(io.BytesIO(data)))
    torch.manual_seed(5)
    box = crop.box(imagedecode.probe_jpeg(data))
    media, failed, on_cpu = imagedecode.decode(imagedecode.collate([imagedecode.EncodedJpeg(data, box)], crop.size),
                                               crop, "cpu")
    assert failed == [] and on_cpu == 0
    assert (media[0].int() - pil.int()).abs().float().mean() < 1.0


def test_exact_resume_with_device_decoding(dataset):
    assert_resumes_exactly(lambda: gpu_loader(dataset), 5)


def test_png_and_cmyk_fall_back_to_the_cpu_path_and_are_counted(tmp_path):
    paths = write_dataset(tmp_path, [8])
    png = io.BytesIO()
    Image.open(io.BytesIO(photo_jpeg(1, 24, 24))).save(png, format="PNG")
    cmyk = photo_jpeg(2, 24, 24, mode="CMYK")
    rewrite_tar(paths[0], lambda key, files: (
        {"png": png.getvalue(), **{k: v for k, v in files.items() if k != "jpg"}} if key.endswith("0001")
        else {**files, "jpg": cmyk} if key.endswith("0002") else files))
    loader = gpu_loader(tmp_path, shuffle_buffer=0)
    device = read_all(loader)
    pil = read_all(make_loader(tmp_path, shuffle_buffer=0, jpeg_draft=False))
    assert loader.stats["decoded_on_cpu"] == 2 and loader.stats["skipped_corrupt_media"] == 0
    for d, p in zip(device, pil):
        assert d.keys == p.keys
        for row, key in enumerate(d.keys):
            if key.endswith(("0001", "0002")):  # decoded in the worker by the PIL path itself: identical
                assert torch.equal(d.media[row], p.media[row])


def test_a_jpeg_no_decoder_reads_is_skipped_counted_and_filled(tmp_path):
    paths = write_dataset(tmp_path, [8])
    good = photo_jpeg(3, 24, 24)
    # a valid header (the worker sees a JPEG) and entropy-coded data that is garbage
    broken = good[:200] + bytes(range(256)) * 4
    rewrite_tar(paths[0], lambda key, files: {**files, "jpg": broken} if key.endswith("0003") else files)
    # no decoder must read it: check the premise first
    with pytest.raises(OSError):
        imagedecode._decode_on_cpu(torch.frombuffer(bytearray(broken), dtype=torch.uint8))
    loader = gpu_loader(tmp_path, shuffle_buffer=0, workers=1)
    batches = read_all(loader)
    keys = [key for batch in batches for key in batch.keys]
    assert "data00x0003" not in keys and keys.count("") == 1
    assert loader.stats["skipped_corrupt_media"] == 1 and loader.stats["samples_filled"] == 1
    assert loader.stats["samples_read"] == 7
    batch = next(b for b in batches if "" in b.keys)
    row = batch.keys.index("")
    assert not batch.valid[row] and batch.labels[row] == -1
    assert any(torch.equal(batch.media[row], batch.media[i]) for i in range(len(batch.keys)) if i != row)


def test_other_transforms_are_refused_for_device_decoding(dataset):
    from pipeline.data.config import DataConfig
    from pipeline.data.loader import build_loader

    with pytest.raises(ConfigError, match="data.decode=gpu"):
        build_loader(DataConfig(decode="gpu"), str(dataset), rank=0, world_size=1, seed=0,
                     media_transform=lambda image: image, tokenizer=tokenizer(), device="cpu")
    with pytest.raises(ConfigError, match="data.decode"):
        DataConfig(decode="nvjpeg")


def test_eval_loaders_decode_on_the_cpu(dataset):
    loader = gpu_loader(dataset, train=False)
    assert loader.dataset.samples.device_crop is None
    assert read_all(loader)[0].media.dtype == torch.uint8


@pytest.mark.parametrize("workers", [0, 2])
def test_training_streams_run_on_into_the_next_epoch(dataset, workers):
    """One DataLoader iterator serves epoch after epoch (its workers prefetch across the boundary), and
    yields exactly what a loader started at each epoch yields."""
    loader = make_loader(dataset, workers=workers)
    first = read_all(loader)
    live = loader._live
    second = read_all(loader)
    assert loader._live is live  # not restarted
    fresh = make_loader(dataset, workers=workers)
    fresh.set_epoch(1)
    assert_same_batches(second, read_all(fresh))
    assert_same_batches(first, read_all(make_loader(dataset, workers=workers)))
    # a jump elsewhere (a resume to another position) restarts it at that position
    loader.set_epoch(0)
    loader.load_state_dict({**loader.state_dict(), "epoch": 0, "stream_position": 3 * loader.dataset.per_step})
    assert_same_batches(read_all(loader), first[3:])


def test_deferred_batches_decode_the_same_every_time_and_count_once(tmp_path):
    """GradCache with data.decode=gpu holds encoded micro-batches; each pass decodes them (materialize)."""
    from pipeline.data.loader import DeferredImages, materialize

    paths = write_dataset(tmp_path, [8])
    broken = photo_jpeg(3, 24, 24)[:200] + bytes(range(256)) * 4
    rewrite_tar(paths[0], lambda key, files: {**files, "jpg": broken} if key.endswith("0003") else files)
    eager = read_all(gpu_loader(tmp_path, shuffle_buffer=0, workers=1))
    loader = gpu_loader(tmp_path, shuffle_buffer=0, workers=1)
    loader.defer_decode = True
    deferred = read_all(loader)
    assert all(isinstance(batch.media, DeferredImages) for batch in deferred)
    for lazy, batch in zip(deferred, eager):
        first, second = materialize(lazy), materialize(lazy)
        for decoded in (first, second):
            assert torch.equal(decoded.media, batch.media) and torch.equal(decoded.valid, batch.valid)
            assert decoded.keys == batch.keys
    assert loader.stats["skipped_corrupt_media"] == 1 and loader.stats["samples_read"] == 7
