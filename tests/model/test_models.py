"""Towers: every model config builds and trains with checkpointing on/off, open_clip round trip, audio on tones."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from pipeline.core.args import load_config, read_yaml
from pipeline.core.errors import ConfigError
from pipeline.loss import LossConfig, build_loss
from pipeline.media.audio import AudioConfig, decode_audio
from pipeline.model.build import build_model, get_tokenizer, image_size, media_transform
from pipeline.model.config import ModelConfig, register_open_clip_configs
from pipeline.model.contrastive import media_to_device
from pipeline.model.image import ImagePixelTransform, image_preprocess
from pipeline.parallel import checkpointing

CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs"
# the tones demo setting: 2 s at 16 kHz, 32 mels -> [32, 201] log-mel
TONES_AUDIO = AudioConfig(sample_rate=16000, clip_seconds=2.0, n_mels=32, n_fft=512, hop_length=160, f_max=8000.0)
# above this many parameters the forward/backward check keeps one block per transformer stack: a
# full-depth ViT-L-14 step takes minutes on two shared CPU cores (every parameter is still built)
FULL_DEPTH_MAX_PARAMS = 20_000_000


def _tone_clips(count: int, sample_rate: int = 16000) -> list[tuple[np.ndarray, int, str]]:
    """(waveform, rate, most specific caption) decoded from the embedded `tones` set's FLAC bytes."""
    from pipeline.shards.synthetic import tones_sample

    clips = []
    for index in range(count):
        sample = tones_sample(seed=0, split="train", index=index, sample_rate=sample_rate)
        waveform, rate = decode_audio(sample.media)
        # the most specific caption: the vague ones ("a sound") repeat, and equal captions cannot be told apart
        clips.append((waveform, rate, sample.metadata["captions"][-1]))
    return clips


def _batch(cfg: ModelConfig, count: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    tokenize = get_tokenizer(cfg)
    if cfg.modality == "audio":
        transform = media_transform(cfg, is_train=False)
        clips = _tone_clips(count, cfg.audio.sample_rate)
        media = torch.stack([transform(wave, rate) for wave, rate, _ in clips])
        return media, tokenize([caption for _, _, caption in clips])
    size = image_size(cfg)
    media = torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(0))
    return media, tokenize(["a small red circle", "a shape", "a blue square", "a green triangle"][:count])


def _truncate_depth(model: torch.nn.Module) -> None:
    from open_clip.transformer import Transformer

    for module in model.modules():
        if isinstance(module, Transformer):
            module.resblocks = module.resblocks[:1]


def _own_cases() -> list[tuple[str, dict, dict]]:
    return [
        ("tiny-clip", {"name": "tiny-clip"}, {"kind": "clip"}),
        ("tiny-clip-siglip", {"name": "tiny-clip", "logit_bias": True}, {"kind": "siglip"}),
        ("tiny-clip-probabilistic", {"name": "tiny-clip", "probabilistic": True}, {"kind": "probabilistic"}),
        ("tiny-clap", {"name": "tiny-clap", "modality": "audio", "audio": vars(TONES_AUDIO)}, {"kind": "clip"}),
        ("tiny-clap-probabilistic",
         {"name": "tiny-clap", "modality": "audio", "probabilistic": True, "audio": vars(TONES_AUDIO)},
         {"kind": "probabilistic", "probabilistic_form": "gaussian"}),
    ]


def _cases() -> list[tuple[str, dict, dict]]:
    """Every model+loss of configs/*.yaml and our own variants, each distinct pair once (the test
    switches checkpointing itself, so configs differing only in grad_checkpointing are one case)."""
    distinct: dict[str, tuple[str, dict, dict]] = {}
    runs = [(path.name, read_yaml(path)) for path in sorted(CONFIGS_DIR.glob("*.yaml"))]
    found = [(name, run.get("model") or {}, run.get("loss") or {}) for name, run in runs] + _own_cases()
    for name, model_section, loss_section in found:
        model_key = {"modality": "image", **model_section, "grad_checkpointing": None}
        key = json.dumps([model_key, {"kind": "clip", **loss_section}], sort_keys=True)
        distinct.setdefault(key, (name, model_section, loss_section))
    return list(distinct.values())


def _load(cls, section: dict, tmp_path: Path, name: str):
    """Through the same loader as the trainer: a YAML file holding just the section."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(section))
    return load_config(cls, path)


@pytest.mark.parametrize("case", _cases(), ids=lambda case: case[0])
def test_config_builds_and_checkpointing_gives_equal_loss_and_grads(case, tmp_path, monkeypatch):
    name, model_section, loss_section = case
    cfg = _load(ModelConfig, model_section, tmp_path, "model")
    loss_fn = build_loss(_load(LossConfig, loss_section, tmp_path, "loss"))
    torch.manual_seed(0)
    model = build_model(cfg)
    assert all(p.dim() > 0 for p in model.parameters()), "0-dim parameters crash DeepSpeed"
    if sum(p.numel() for p in model.parameters()) > FULL_DEPTH_MAX_PARAMS:
        _truncate_depth(model)
    media, tokens = _batch(cfg)

    reentrant_calls = []
    real_checkpoint = checkpointing.checkpoint

    def recording_checkpoint(*args, use_reentrant, **kwargs):
        reentrant_calls.append(use_reentrant)
        return real_checkpoint(*args, use_reentrant=use_reentrant, **kwargs)

    monkeypatch.setattr(checkpointing, "checkpoint", recording_checkpoint)
    results = {}
    for enabled in (False, True):
        checkpointing.apply_activation_checkpointing(model, enabled)
        model.zero_grad()
        loss, metrics = loss_fn(model(media, tokens))
        assert torch.isfinite(loss)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[enabled] = (loss.detach(), grads)
    # every transformer block and ResNet stage of both towers went through reentrant checkpointing, only when on
    from open_clip.modified_resnet import ModifiedResNet

    blocks = sum(len(m.resblocks) for m in model.modules() if hasattr(m, "resblocks"))
    blocks += 4 * sum(isinstance(m, ModifiedResNet) for m in model.modules())
    assert reentrant_calls == [True] * blocks
    checkpointing.apply_activation_checkpointing(model, False)  # and off again restores the plain forward
    model(media, tokens)
    assert len(reentrant_calls) == blocks
    (loss_off, grads_off), (loss_on, grads_on) = results[False], results[True]
    assert loss_on == loss_off
    assert grads_on.keys() == grads_off.keys()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(grads_off) == trainable, f"parameters without gradient: {trainable - set(grads_off)}"
    for key in grads_off:
        torch.testing.assert_close(grads_on[key], grads_off[key], rtol=1e-5, atol=1e-7)


def test_open_clip_state_dict_round_trip(tmp_path):
    import open_clip

    register_open_clip_configs()
    cfg = ModelConfig(name="tiny-clip", probabilistic=True, logit_bias=True)
    model = build_model(cfg).eval()
    with torch.no_grad():
        model.clip.logit_scale.fill_(3.0)  # not the initial value, so loading it is observable
    path = tmp_path / "tiny-clip.pt"
    torch.save(model.open_clip_state_dict(), path)
    loaded, _, preprocess = open_clip.create_model_and_transforms("tiny-clip", pretrained=str(path))
    loaded.eval()
    media, tokens = _batch(cfg)
    with torch.no_grad():
        ours = model(media, tokens)
        torch.testing.assert_close(loaded.encode_image(media, normalize=True), ours["media_features"])
        torch.testing.assert_close(loaded.encode_text(tokens, normalize=True), ours["text_features"])
        torch.testing.assert_close(loaded.logit_scale.exp().reshape(1), ours["logit_scale"])
    # open_clip's eval preprocessing is ours: uint8 from the transform, normalised by the model
    picture = Image.new("RGB", (90, 70), (200, 30, 30))
    pixels = media_transform(cfg, is_train=False)(picture)
    assert pixels.dtype == torch.uint8
    torch.testing.assert_close(model.normalise_pixels(pixels[None])[0], preprocess(picture), rtol=0, atol=0)

    # and the exported file is a `pretrained` checkpoint for our own model
    reloaded = build_model(ModelConfig(name="tiny-clip", pretrained=str(path))).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(media, tokens)["media_features"], ours["media_features"])


def test_audio_pretrained_checkpoint_loads(tmp_path):
    cfg = ModelConfig(name="tiny-clap", modality="audio", audio=TONES_AUDIO)
    model = build_model(cfg).eval()
    path = tmp_path / "tiny-clap.pt"
    torch.save(model.state_dict(), path)
    reloaded = build_model(ModelConfig(name="tiny-clap", modality="audio", audio=TONES_AUDIO, pretrained=str(path)))
    media, tokens = _batch(cfg)
    with torch.no_grad():
        expected, actual = model(media, tokens), reloaded.eval()(media, tokens)
    for key in ("media_features", "text_features"):
        torch.testing.assert_close(actual[key], expected[key])
    with pytest.raises(ValueError, match="audio model"):
        model.open_clip_state_dict()


def test_audio_tower_learns_tones():
    """A few steps on real tones clips separate their captions: the tower sees what the captions say."""
    cfg = ModelConfig(name="tiny-clap", modality="audio", audio=TONES_AUDIO)
    torch.manual_seed(0)
    model = build_model(cfg)
    transform = media_transform(cfg, is_train=True)
    clips = _tone_clips(8)
    generator = torch.Generator().manual_seed(0)
    media = torch.stack([transform(wave, rate, generator) for wave, rate, _ in clips])
    assert media.shape == (8, TONES_AUDIO.n_mels, TONES_AUDIO.num_frames)
    assert torch.isfinite(media).all()
    tokens = get_tokenizer(cfg)([caption for _, _, caption in clips])
    loss_fn = build_loss(LossConfig())
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(12):
        loss, metrics = loss_fn(model(media, tokens))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert metrics["media_to_text_top1"] > 0.5


def test_audio_transform_crops_at_random_in_training_only():
    cfg = ModelConfig(name="tiny-clap", modality="audio", audio=TONES_AUDIO)
    rate = 22050  # not the model's rate: the transform resamples
    t = np.arange(int(rate * 5.0)) / rate
    chirp = (0.5 * np.sin(2 * np.pi * (200 + 300 * t) * t)).astype(np.float32)  # pitch changes over time
    train, evaluation = media_transform(cfg, is_train=True), media_transform(cfg, is_train=False)
    first = train(chirp, rate, torch.Generator().manual_seed(1))
    second = train(chirp, rate, torch.Generator().manual_seed(2))
    assert first.shape == (32, 201)
    assert not torch.allclose(first, second)
    torch.testing.assert_close(train(chirp, rate, torch.Generator().manual_seed(1)), first)
    torch.testing.assert_close(evaluation(chirp, rate, None), evaluation(chirp, rate, torch.Generator()))
    short = evaluation(chirp[: rate // 2], rate, None)  # 0.5 s is zero-padded to 2 s
    assert short.shape == (32, 201)


def test_image_transform_and_tokenizer():
    cfg = ModelConfig(name="tiny-clip")
    assert image_size(cfg) == 64
    assert image_size(ModelConfig(name="tiny-clap", modality="audio", audio=TONES_AUDIO)) is None
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 90, 3), dtype=np.uint8))
    evaluation = media_transform(cfg, is_train=False)
    assert evaluation(picture).shape == (3, 64, 64)
    torch.testing.assert_close(evaluation(picture), evaluation(picture))
    train = media_transform(cfg, is_train=True)
    torch.manual_seed(0)
    crops = [train(picture) for _ in range(3)]
    assert crops[0].shape == (3, 64, 64)
    assert not all(torch.equal(crops[0], crop) for crop in crops[1:])
    tokens = get_tokenizer(cfg)(["a small red circle at the top left", "a shape"])
    assert tokens.dtype == torch.long and tokens.shape == (2, 32)
    assert (tokens[0] != 0).sum() > (tokens[1] != 0).sum()


def test_grad_cache_parts_combine_to_forward():
    cfg = ModelConfig(name="tiny-clip", probabilistic=True, logit_bias=True)
    model = build_model(cfg).eval()
    media, tokens = _batch(cfg, count=4)
    with torch.no_grad():
        whole = model(media, tokens)
        parts = [(model.encode_media(media[i : i + 2]), model.encode_text(tokens[i : i + 2])) for i in (0, 2)]
        media_part = {k: torch.cat([p[0][k] for p in parts]) for k in parts[0][0]}
        text_part = {k: torch.cat([p[1][k] for p in parts]) for k in parts[0][1]}
        combined = model.combine(media_part, text_part)
    assert combined.keys() == whole.keys() == {
        "media_features", "text_features", "media_log_sigma", "text_log_sigma", "logit_scale", "logit_bias"}
    for key in whole:
        torch.testing.assert_close(combined[key], whole[key])


def test_logit_scale_bias_and_sigma_heads():
    cfg = ModelConfig(name="tiny-clap", modality="audio", audio=TONES_AUDIO, probabilistic=True, logit_bias=True)
    model = build_model(cfg)
    media, tokens = _batch(cfg)
    outputs = model(media, tokens)
    assert outputs["logit_scale"].shape == (1,)
    torch.testing.assert_close(outputs["logit_scale"], torch.tensor([1 / 0.07]))
    torch.testing.assert_close(outputs["logit_bias"], torch.tensor([-10.0]))
    # at init every sample's sigma^2 is 1 / logit_scale: CLIP's temperature
    torch.testing.assert_close(outputs["media_log_sigma"], torch.full([2], 0.5 * math.log(0.07)))
    with torch.no_grad():
        model.logit_scale.fill_(10.0)  # exp(10) > max_logit_scale
        model.text_log_sigma_head.bias.fill_(50.0)
    outputs = model(media, tokens)
    assert float(outputs["logit_scale"].detach()) == pytest.approx(100.0)
    assert torch.all(outputs["text_log_sigma"] == cfg.log_sigma_max)
    # the heads' features are L2-normalised means
    torch.testing.assert_close(outputs["media_features"].norm(dim=-1), torch.ones(2))


@pytest.mark.parametrize("values, key", [
    ({"name": "ViT-Q-99"}, "model.name"),
    ({"name": "tiny-clap"}, "model.modality=audio"),
    ({"name": "tiny-clip", "modality": "audio"}, "model.name"),
    ({"modality": "video"}, "model.modality"),
    ({"name": "ViT-B-16-SigLIP"}, "Hugging Face"),
    ({"pretrained": "/nonexistent/weights.pt"}, "model.pretrained"),
    ({"log_sigma_min": 1.0, "log_sigma_max": 0.0}, "model.log_sigma_min"),
    ({"init_logit_scale": 5.0}, "model.init_logit_scale"),
    ({"max_logit_scale": 0.0}, "model.max_logit_scale"),
    ({"name": "tiny-clap", "modality": "audio", "audio": AudioConfig(n_mels=60)}, "model.audio.n_mels"),
])
def test_bad_model_config_names_the_key(values, key):
    with pytest.raises(ConfigError, match=key):
        ModelConfig(**values)


def test_audio_tower_rejects_wrong_feature_shape():
    model = build_model(ModelConfig(name="tiny-clap", modality="audio", audio=TONES_AUDIO))
    tokens = get_tokenizer(model.cfg)(["a tone"])
    with pytest.raises(ValueError, match=r"\[batch, 32, 201\]"):
        model(torch.zeros(1, 64, 201), tokens)


def _photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth gradients plus noise: crops and resampling of it differ visibly when geometry differs."""
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    rng = np.random.default_rng(seed)
    pixels = np.stack([200 * x, 200 * y, 100 + 80 * np.sin(9 * x * y)], axis=-1) + rng.normal(0, 20, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def test_uint8_pixels_normalised_on_the_model_equal_open_clip_preprocessing():
    """The loader ships uint8 crops; encode_media normalises them: same features as open_clip's float path."""
    from open_clip.transform import image_transform_v2

    cfg = ModelConfig(name="tiny-clip")
    model = build_model(cfg).eval()
    pictures = [_photo(120, 90, 0), _photo(70, 130, 1), Image.new("L", (80, 80), 77)]  # a grey one: RGB conversion
    for is_train in (False, True):
        ours, theirs = media_transform(cfg, is_train), image_transform_v2(image_preprocess(cfg), is_train)
        pixels, reference = [], []
        for index, picture in enumerate(pictures):
            # the same seed gives the same random crop: our transform draws exactly what open_clip's does
            torch.manual_seed(100 + index)
            pixels.append(ours(picture))
            torch.manual_seed(100 + index)
            reference.append(theirs(picture))
        pixels, reference = torch.stack(pixels), torch.stack(reference)
        assert pixels.dtype == torch.uint8 and pixels.shape == reference.shape == (3, 3, 64, 64)
        # the geometry (crop, resize, RGB) is open_clip's bit for bit, train and eval
        torch.testing.assert_close(model.normalise_pixels(pixels), reference, rtol=0, atol=0)
        with torch.no_grad():
            from_pixels = model.encode_media(pixels)["media_features"]
            from_floats = model.encode_media(reference)["media_features"]
        torch.testing.assert_close(from_pixels, from_floats, rtol=0, atol=1e-5)
    # another seed, another crop: the train transform is random, not a fixed crop
    torch.manual_seed(1)
    first = media_transform(cfg, True)(pictures[0])
    torch.manual_seed(2)
    assert not torch.equal(first, media_transform(cfg, True)(pictures[0]))


def test_pixel_normalisation_leaves_the_state_dict_alone_and_follows_the_tower_dtype():
    cfg = ModelConfig(name="tiny-clip")
    model = build_model(cfg)
    keys_before = set(model.state_dict())
    pixels = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    model.encode_media(pixels)
    assert set(model.state_dict()) == keys_before  # the mean/std are no buffers: export unchanged
    assert "media_mean" not in model.open_clip_state_dict()
    model = model.to(torch.bfloat16)
    normalised = model.normalise_pixels(pixels)
    assert normalised.dtype == torch.bfloat16
    # the mean/std stay float32 under the cast: only the result is rounded, once
    exact = model.normalise_pixels(pixels.clone()).float()
    expected = (pixels.float() / 255 - torch.tensor(image_preprocess(cfg).mean).view(3, 1, 1)) / torch.tensor(
        image_preprocess(cfg).std).view(3, 1, 1)
    torch.testing.assert_close(exact, expected.bfloat16().float(), rtol=0, atol=0)
    assert model.encode_media(pixels)["media_features"].dtype == torch.bfloat16
    audio = build_model(ModelConfig(name="tiny-clap", modality="audio", audio=TONES_AUDIO))
    with pytest.raises(ValueError, match="audio model"):
        audio.encode_media(torch.zeros(1, 32, 201, dtype=torch.uint8))


def test_pixel_transform_refuses_a_transform_it_cannot_split():
    from torchvision import transforms

    with pytest.raises(ValueError, match="ToTensor and Normalize"):
        ImagePixelTransform(transforms.Compose([transforms.Resize(8), transforms.ToTensor()]))


def test_media_to_device_casts_floats_and_keeps_pixels_uint8():
    pixels = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    moved = media_to_device(pixels, "cpu", torch.bfloat16)
    assert moved.dtype == torch.uint8 and torch.equal(moved, pixels)  # the model normalises them
    mel = torch.randn(2, 32, 201)
    assert media_to_device(mel, "cpu", torch.bfloat16).dtype == torch.bfloat16


def test_building_a_tower_does_not_claim_a_random_init_it_does_not_keep(caplog):
    # open_clip warns "No pretrained weights loaded ... initialized randomly" on the root logger whenever
    # pretrained is None; resume, export and eval load weights right after, so the line is dropped while
    # the tower is built, and only then (other root-logger warnings pass)
    with caplog.at_level(logging.WARNING):
        build_model(ModelConfig(name="demo-clip"))
        logging.warning("No pretrained weights loaded for model 'x' (outside the build)")
    messages = [record.getMessage() for record in caplog.records]
    assert messages == ["No pretrained weights loaded for model 'x' (outside the build)"]


@pytest.mark.parametrize(("name", "hint"), [("vit-b-33", "did you mean 'ViT-B-32'?"), ("tiny-clap", "model.modality=audio"),
                                            ("resnet-9000-xyz", "see open_clip.list_models()")])
def test_an_unknown_model_name_is_refused_with_the_nearest_known_one(name, hint):
    with pytest.raises(ConfigError, match=r"model.name '[\w-]+' is not an open_clip image-text model") as error:
        ModelConfig(name=name)
    assert hint in str(error.value)
