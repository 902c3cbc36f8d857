"""Embedded data sets, generated on the fly and deterministic by seed: `shapes` (images) and `tones` (audio).

    python -m pipeline shards build --source shapes --split train --output shards/shapes/train
    python -m pipeline shards build --source tones --split val --count 500 --output shards/tones/val

Every sample derives from (seed, split, index) alone, through its own numpy SeedSequence, so any
worker can generate any index range and the same seed gives the same bytes. Train and val draw from
different streams (the split is part of the seed sequence), so they never share a sample.

Captions come at several specificity levels for the same kind of sample (level 0 "a shape", ...,
level 3 "a small red circle at the top left"); the `.txt` caption is one of them, drawn with weights
favouring the specific levels so that a tiny model learns colour x shape quickly, and the `.json`
keeps all of them with their levels (what the probabilistic-loss experiment needs).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from pipeline.core import randomness
from pipeline.core.errors import ConfigError

SPLITS = ("train", "val")
# numbers mixed into every sample's seed sequence: a source or split never shares a stream with another
_SOURCE_STREAM = {"shapes": 1, "tones": 2}
_SPLIT_STREAM = {"train": 0, "val": 1}
# probability of the .txt caption's specificity level 0..3: mostly specific, so colour x shape is learnt fast
LEVEL_WEIGHTS = (0.10, 0.15, 0.35, 0.40)
# zero-shot prompts written to classes.json, one list per source
TEMPLATES = {
    "shapes": ["a {}.", "a photo of a {}.", "a picture of a {}.", "a drawing of a {}.", "an image of a {}."],
    "tones": ["{}.", "a sound of {}.", "the sound of {}.", "a recording of {}.", "an audio clip of {}."],
}
KEY_DIGITS = 9


@dataclass
class SyntheticSample:
    """One generated sample, ready to be written to a shard."""

    key: str
    """Zero-padded index, no dots."""
    media_ext: str
    """`png` for shapes, `flac` for tones."""
    media: bytes
    """Encoded image or audio."""
    caption: str
    """The `.txt` caption."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """The `.json`: label, label_name, captions (all levels), specificity, attributes."""


def sample_key(index: int) -> str:
    return f"{index:0{KEY_DIGITS}d}"


def _rng(source: str, seed: int, split: str, index: int) -> np.random.Generator:
    if split not in _SPLIT_STREAM:
        raise ConfigError(f"split must be one of {list(SPLITS)}, got {split!r}")
    return randomness.generator(seed, "synthetic_sample", _SOURCE_STREAM[source], _SPLIT_STREAM[split], index)


def _pick_caption(rng: np.random.Generator, captions_by_level: list[list[str]]) -> tuple[str, int]:
    level = int(rng.choice(len(LEVEL_WEIGHTS), p=LEVEL_WEIGHTS))
    options = captions_by_level[level]
    return options[int(rng.integers(len(options)))], level


def _caption_metadata(captions_by_level: list[list[str]]) -> dict[str, Any]:
    captions = [c for level in captions_by_level for c in level]
    levels = [i for i, level in enumerate(captions_by_level) for _ in level]
    return {"captions": captions, "caption_specificity": levels}


# ---------------------------------------------------------------- shapes

COLOURS = {"red": (215, 40, 40), "green": (40, 160, 60), "blue": (40, 70, 215), "yellow": (235, 195, 20)}
SHAPE_TYPES = ("circle", "square", "triangle")
SHAPE_CLASSES = [f"{colour} {shape}" for colour in COLOURS for shape in SHAPE_TYPES]
POSITIONS = ("top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom", "bottom right")
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 64, 224


def _plural(shape: str, count: int) -> str:
    return shape if count == 1 else shape + "s"


def _shape_captions(colour: str, shape: str, size: str, count: int, position: str | None) -> list[list[str]]:
    one = count == 1
    noun = _plural(shape, count)
    many = COUNT_WORDS[count]
    where = f" at the {position}" if position and position != "centre" else " in the centre" if position else ""
    level0 = ["a shape", "an object", "a simple drawing"] if one else ["some shapes", "a few objects", "a simple drawing"]
    level1 = (
        [f"a {colour} shape", f"a {shape}", f"something {colour}"]
        if one
        else [f"{many} shapes", f"some {colour} shapes", f"some {noun}"]
    )
    level2 = (
        [f"a {colour} {shape}", f"a picture of a {colour} {shape}", f"one {colour} {shape}"]
        if one
        else [f"{many} {colour} {noun}", f"a picture of {many} {colour} {noun}", f"{colour} {noun}"]
    )
    level3 = (
        [f"a {size} {colour} {shape}{where}", f"a picture of a {size} {colour} {shape}{where}"]
        if one
        else [f"{many} {size} {colour} {noun}", f"a picture of {many} {size} {colour} {noun}"]
    )
    return [level0, level1, level2, level3]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, radius: float, fill) -> None:
    if shape == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=fill)
    elif shape == "square":
        half = radius * 0.88  # a square of the same visual weight as the circle
        draw.rectangle([cx - half, cy - half, cx + half, cy + half], fill=fill)
    else:
        draw.polygon([(cx, cy - radius), (cx - radius * 0.95, cy + radius * 0.8), (cx + radius * 0.95, cy + radius * 0.8)], fill=fill)


def shapes_sample(seed: int, split: str, index: int, image_size: int = 64) -> SyntheticSample:
    """Image of 1-3 shapes sharing one colour and one type on a light background, as PNG."""
    if not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE:
        raise ConfigError(f"image_size must be within {MIN_IMAGE_SIZE}-{MAX_IMAGE_SIZE} px, got {image_size}")
    rng = _rng("shapes", seed, split, index)
    label = int(rng.integers(len(SHAPE_CLASSES)))
    colour, shape = SHAPE_CLASSES[label].split(" ")
    count = int(rng.integers(1, 4))
    size = "small" if rng.random() < 0.5 else "large"
    cells = rng.choice(len(POSITIONS), size=count, replace=False)
    position = POSITIONS[int(cells[0])] if count == 1 else None

    background = tuple(int(v) for v in rng.integers(225, 256, size=3))
    image = Image.new("RGB", (image_size, image_size), background)
    draw = ImageDraw.Draw(image)
    cell = image_size / 3
    base_radius = cell * (0.25 if size == "small" else 0.45)
    fill = tuple(int(np.clip(v + rng.integers(-20, 21), 0, 255)) for v in COLOURS[colour])
    for cell_index in cells:
        row, column = divmod(int(cell_index), 3)
        radius = base_radius * rng.uniform(0.9, 1.1)
        slack = max(0.0, cell / 2 - radius)  # jitter inside the cell without leaving it
        cx = (column + 0.5) * cell + rng.uniform(-slack, slack) * 0.5
        cy = (row + 0.5) * cell + rng.uniform(-slack, slack) * 0.5
        _draw_shape(draw, shape, cx, cy, radius, fill)
    # faint pixel noise: no two samples are identical images, so splits cannot collide by chance
    pixels = np.asarray(image, dtype=np.int16) + rng.integers(-3, 4, size=(image_size, image_size, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=6)

    captions_by_level = _shape_captions(colour, shape, size, count, position)
    caption, level = _pick_caption(rng, captions_by_level)
    metadata = {
        "label": label,
        "label_name": SHAPE_CLASSES[label],
        "caption": caption,
        "specificity": level,
        **_caption_metadata(captions_by_level),
        "attributes": {"colour": colour, "shape": shape, "count": count, "size": size, "position": position},
        "source": {"name": "shapes", "seed": seed, "split": split, "index": index},
    }
    return SyntheticSample(sample_key(index), "png", buffer.getvalue(), caption, metadata)


# ---------------------------------------------------------------- tones

TONE_CLASSES = [
    "low tone", "high tone", "rising chirp", "falling chirp", "low beeps", "high beeps", "low noise", "high noise",
]
WAVEFORMS = ("sine", "square", "sawtooth")
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 16000, 48000
# pitch ranges (Hz), both well below the Nyquist frequency of the lowest rate (8 kHz)
LOW_PITCH, HIGH_PITCH = (150.0, 400.0), (1000.0, 3000.0)


def _oscillator(phase: np.ndarray, waveform: str) -> np.ndarray:
    if waveform == "sine":
        return np.sin(phase)
    if waveform == "square":
        return np.sign(np.sin(phase))
    return 2.0 * ((phase / (2 * np.pi)) % 1.0) - 1.0


def _fade(signal: np.ndarray, sample_rate: int, seconds: float = 0.01) -> np.ndarray:
    """Short fade in/out: no click at the edges, which would add broadband energy to every clip."""
    ramp = min(len(signal) // 2, int(sample_rate * seconds))
    envelope = np.ones_like(signal)
    envelope[:ramp] = np.linspace(0.0, 1.0, ramp)
    envelope[len(signal) - ramp :] = np.linspace(1.0, 0.0, ramp)
    return signal * envelope


def _tone_captions(kind: str, pitch: str, direction: str | None, rhythm: str | None, waveform: str | None,
                   loudness: str, seconds: float) -> list[list[str]]:
    length = f"{seconds:g} second"
    wave = f"{waveform} " if waveform else ""
    if kind == "tone":
        level1 = ["a tone", f"a {pitch} sound", f"a {loudness} sound"]
        level2 = [f"a {pitch} tone", f"a {pitch} pitched tone", f"a steady {pitch} tone"]
        level3 = [f"a {loudness} {pitch} {wave}tone", f"a {length} {loudness} {pitch} {wave}tone"]
    elif kind == "chirp":
        level1 = ["a chirp", f"a {direction} sound", f"a {loudness} sound"]
        level2 = [f"a {direction} chirp", f"a sweep with {direction} pitch", f"a {direction} tone"]
        level3 = [f"a {loudness} {direction} {wave}chirp", f"a {length} {loudness} {direction} {wave}chirp"]
    elif kind == "beeps":
        level1 = ["beeping", f"a {pitch} sound", "a rhythmic sound"]
        level2 = [f"{pitch} beeps", f"a series of {pitch} beeps", f"{pitch} pitched beeping"]
        level3 = [f"{rhythm} {loudness} {pitch} {wave}beeps", f"a {length} series of {rhythm} {pitch} {wave}beeps"]
    else:
        level1 = ["noise", f"a {pitch} sound", f"a {loudness} sound"]
        level2 = [f"{pitch} noise", f"a burst of {pitch} noise", f"{'rumbling' if pitch == 'low' else 'hissing'} noise"]
        level3 = [f"a {loudness} burst of {pitch} noise", f"a {length} {loudness} burst of {pitch} noise"]
    level0 = ["a sound", "an audio clip", "something audible"]
    return [level0, level1, level2, level3]


def tones_sample(seed: int, split: str, index: int, sample_rate: int = 16000) -> SyntheticSample:
    """1-4 s clip of a tone, chirp, beeps or noise burst, as 16-bit FLAC."""
    if not MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE:
        raise ConfigError(f"sample_rate must be within {MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz, got {sample_rate}")
    import soundfile  # here, not at the top: image-only users need no libsndfile

    rng = _rng("tones", seed, split, index)
    label = int(rng.integers(len(TONE_CLASSES)))
    first, kind = TONE_CLASSES[label].split(" ")  # e.g. "low", "beeps"
    seconds = float(rng.integers(2, 9)) / 2  # 1.0, 1.5, ..., 4.0
    loudness = "quiet" if rng.random() < 0.5 else "loud"
    amplitude = rng.uniform(0.1, 0.25) if loudness == "quiet" else rng.uniform(0.55, 0.85)
    samples = int(sample_rate * seconds)
    t = np.arange(samples) / sample_rate
    pitch, direction, rhythm, waveform = first, None, None, None

    if kind in ("tone", "beeps", "chirp"):
        waveform = WAVEFORMS[int(rng.integers(len(WAVEFORMS)))]
    if kind in ("tone", "beeps"):
        low, high = LOW_PITCH if pitch == "low" else HIGH_PITCH
        frequency = rng.uniform(low, high)
        signal = _oscillator(2 * np.pi * frequency * t, waveform)
        if kind == "beeps":
            rhythm = "slow" if rng.random() < 0.5 else "fast"
            rate = rng.uniform(1.5, 2.5) if rhythm == "slow" else rng.uniform(5.0, 7.0)
            signal = signal * ((t * rate) % 1.0 < 0.5)  # on for half of each beat
    elif kind == "chirp":
        direction = first
        start, end = rng.uniform(*LOW_PITCH), rng.uniform(*HIGH_PITCH)
        if direction == "falling":
            start, end = end, start
        pitch = None
        # exponential sweep: the phase is the integral of f(t) = start * (end/start)^(t/T)
        ratio = end / start
        phase = 2 * np.pi * start * seconds / np.log(ratio) * (ratio ** (t / seconds) - 1.0)
        signal = _oscillator(phase, waveform)
    else:
        white = rng.standard_normal(samples)
        if pitch == "low":  # moving average: a low-pass, heard as a rumble
            width = max(2, sample_rate // 500)
            signal = np.convolve(white, np.ones(width) / width, mode="same")
        else:  # first difference: a high-pass, heard as a hiss
            signal = np.diff(white, prepend=0.0)
        signal = signal / (np.abs(signal).max() + 1e-9)
    signal = _fade(amplitude * signal, sample_rate)

    buffer = io.BytesIO()
    pcm = np.round(np.clip(signal, -1.0, 1.0) * 32767).astype(np.int16)
    soundfile.write(buffer, pcm, sample_rate, format="FLAC", subtype="PCM_16")

    captions_by_level = _tone_captions(kind, pitch, direction, rhythm, waveform, loudness, seconds)
    caption, level = _pick_caption(rng, captions_by_level)
    metadata = {
        "label": label,
        "label_name": TONE_CLASSES[label],
        "caption": caption,
        "specificity": level,
        **_caption_metadata(captions_by_level),
        "attributes": {
            "kind": kind, "pitch": pitch, "direction": direction, "rhythm": rhythm, "waveform": waveform,
            "loudness": loudness, "seconds": seconds, "sample_rate": sample_rate,
        },
        "source": {"name": "tones", "seed": seed, "split": split, "index": index},
    }
    return SyntheticSample(sample_key(index), "flac", buffer.getvalue(), caption, metadata)


# ---------------------------------------------------------------- registry

SOURCES = {"shapes": (shapes_sample, SHAPE_CLASSES), "tones": (tones_sample, TONE_CLASSES)}
DEFAULT_COUNTS = {("shapes", "train"): 10000, ("shapes", "val"): 1000, ("tones", "train"): 3000, ("tones", "val"): 500}
DEFAULT_SAMPLES_PER_SHARD = {"shapes": 1000, "tones": 500}


def generate(source: str, seed: int, split: str, index: int, image_size: int = 64, sample_rate: int = 16000) -> SyntheticSample:
    """The sample `index` of the embedded set `source` ("shapes" or "tones")."""
    if source == "shapes":
        return shapes_sample(seed, split, index, image_size)
    if source == "tones":
        return tones_sample(seed, split, index, sample_rate)
    raise ConfigError(f"source must be one of {list(SOURCES)}, got {source!r}")


def classes_json(source: str) -> str:
    """Contents of `classes.json` for zero-shot evaluation of an embedded set."""
    return json.dumps({"classes": SOURCES[source][1], "templates": TEMPLATES[source]}, indent=1) + "\n"
