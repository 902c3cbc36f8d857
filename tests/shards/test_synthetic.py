"""The embedded data sets: deterministic by (seed, split, index), disjoint splits, consistent labels."""

import hashlib
import io
import json

import numpy as np
import pytest
import soundfile
from PIL import Image

from pipeline.core.errors import ConfigError
from pipeline.shards import synthetic


def _digest(sample) -> str:
    return hashlib.sha256(sample.media + sample.caption.encode() + json.dumps(sample.metadata).encode()).hexdigest()


@pytest.mark.parametrize("source", ["shapes", "tones"])
def test_same_seed_same_bytes_other_seed_other_bytes(source):
    first = [synthetic.generate(source, 7, "train", i) for i in range(8)]
    again = [synthetic.generate(source, 7, "train", i) for i in reversed(range(8))][::-1]  # any order
    other = [synthetic.generate(source, 8, "train", i) for i in range(8)]
    assert [_digest(s) for s in first] == [_digest(s) for s in again]
    assert not {s.media for s in first} & {s.media for s in other}


@pytest.mark.parametrize("source,count", [("shapes", 300), ("tones", 60)])
def test_train_and_val_share_no_sample(source, count):
    train = {hashlib.sha256(synthetic.generate(source, 0, "train", i).media).digest() for i in range(count)}
    val = {hashlib.sha256(synthetic.generate(source, 0, "val", i).media).digest() for i in range(count)}
    assert len(train) == count and len(val) == count  # no duplicates inside a split either
    assert not train & val


def test_shapes_image_matches_its_label():
    for index in range(40):
        sample = synthetic.shapes_sample(3, "val", index, image_size=96)
        image = np.asarray(Image.open(io.BytesIO(sample.media)).convert("RGB")).astype(int)
        assert image.shape == (96, 96, 3)
        meta = sample.metadata
        colour, shape = meta["label_name"].split(" ")
        assert synthetic.SHAPE_CLASSES[meta["label"]] == meta["label_name"]
        assert (meta["attributes"]["colour"], meta["attributes"]["shape"]) == (colour, shape)
        # the shape pixels (far from the light background) have the label's colour
        background = np.median(image.reshape(-1, 3), axis=0)  # shapes cover less than half the image
        saturated = image[np.abs(image - background).sum(axis=2) > 150]
        assert len(saturated) > 20
        mean = saturated.mean(axis=0)
        nearest = min(synthetic.COLOURS, key=lambda c: np.abs(np.array(synthetic.COLOURS[c]) - mean).sum())
        assert nearest == colour
        assert sample.caption in meta["captions"]
        assert meta["caption_specificity"][meta["captions"].index(sample.caption)] == meta["specificity"]
        level2 = [c for c, level in zip(meta["captions"], meta["caption_specificity"]) if level == 2]
        assert all(colour in c and shape in c for c in level2)
        if meta["attributes"]["count"] == 1:
            level3 = [c for c, level in zip(meta["captions"], meta["caption_specificity"]) if level == 3]
            assert all(meta["attributes"]["size"] in c for c in level3)


def test_caption_levels_favour_specific_captions():
    levels = [synthetic.shapes_sample(0, "train", i).metadata["specificity"] for i in range(400)]
    share = np.bincount(levels, minlength=4) / len(levels)
    assert 0.04 < share[0] < 0.18 and 0.08 < share[1] < 0.24 and share[2] + share[3] > 0.6


def test_tones_decode_with_their_settings():
    kinds = set()
    for index in range(24):
        sample = synthetic.tones_sample(1, "train", index, sample_rate=22050)
        waveform, rate = soundfile.read(io.BytesIO(sample.media))
        assert rate == 22050 and sample.media_ext == "flac"
        assert 1.0 <= len(waveform) / rate <= 4.0
        assert len(waveform) / rate == pytest.approx(sample.metadata["attributes"]["seconds"], abs=1e-3)
        assert 0.05 < np.abs(waveform).max() <= 1.0
        kinds.add(sample.metadata["attributes"]["kind"])
        assert synthetic.TONE_CLASSES[sample.metadata["label"]] == sample.metadata["label_name"]
        assert sample.caption in sample.metadata["captions"]
    assert kinds == {"tone", "chirp", "beeps", "noise"}


def test_out_of_range_settings_are_refused():
    with pytest.raises(ConfigError, match="image_size"):
        synthetic.shapes_sample(0, "train", 0, image_size=32)
    with pytest.raises(ConfigError, match="sample_rate"):
        synthetic.tones_sample(0, "train", 0, sample_rate=8000)
    with pytest.raises(ConfigError, match="split"):
        synthetic.shapes_sample(0, "test", 0)


def test_classes_json():
    shapes = json.loads(synthetic.classes_json("shapes"))
    tones = json.loads(synthetic.classes_json("tones"))
    assert len(shapes["classes"]) == 12 and shapes["classes"][0] == "red circle"
    assert 8 <= len(tones["classes"]) <= 12
    assert all("{}" in t for t in shapes["templates"] + tones["templates"])
