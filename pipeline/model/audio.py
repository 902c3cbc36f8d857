"""Audio-text towers (CLAP): a log-mel patch transformer with open_clip's text transformer, behind the
`Towers` interface, and the per-clip transform that feeds them (decoding and the log-mel math themselves
are pipeline.media.audio's)."""

from __future__ import annotations

import math

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import _build_text_tower
from open_clip.transformer import LayerNorm, Transformer
from torch import nn

from pipeline.core.errors import ConfigError
from pipeline.media.audio import AudioConfig, fit_length, log_mel, resample
from pipeline.model.config import ModelConfig, _audio_model_configs
from pipeline.model.towers import Towers


class AudioTransformer(nn.Module):
    """Log-mel [B, n_mels, frames] -> patch embedding -> transformer -> mean pool -> projection [B, D]."""

    def __init__(self, embed_dim: int, features: AudioConfig, width: int, layers: int, heads: int,
                 patch_mels: int, patch_frames: int, mlp_ratio: float = 4.0,
                 input_mean: float = -6.0, input_std: float = 3.0):
        super().__init__()
        self.n_mels, self.num_frames = features.n_mels, features.num_frames
        self.patch_frames = patch_frames
        # fixed standardisation, not per clip: loudness is part of what captions describe
        self.input_mean, self.input_std = input_mean, input_std
        self.patch_embed = nn.Conv2d(1, width, kernel_size=(patch_mels, patch_frames),
                                     stride=(patch_mels, patch_frames), bias=False)
        num_patches = (self.n_mels // patch_mels) * math.ceil(self.num_frames / patch_frames)
        self.positional_embedding = nn.Parameter(torch.randn(num_patches, width) * width**-0.5)
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, mlp_ratio=mlp_ratio)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(torch.randn(width, embed_dim) * width**-0.5)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        if mel.dim() != 3 or mel.shape[1] != self.n_mels or mel.shape[2] != self.num_frames:
            raise ValueError(
                f"audio tower expects log-mel [batch, {self.n_mels}, {self.num_frames}] "
                f"(model.audio settings), got {list(mel.shape)}"
            )
        x = (mel.to(self.proj.dtype) - self.input_mean) / self.input_std
        pad = (-self.num_frames) % self.patch_frames
        x = F.pad(x, (0, pad))
        x = self.patch_embed(x.unsqueeze(1)).flatten(2).transpose(1, 2)  # [B, patches, width]
        x = self.ln_pre(x + self.positional_embedding.to(x.dtype))
        x = self.transformer(x)
        return self.ln_post(x.mean(dim=1)) @ self.proj


class AudioTextTowers(Towers):
    """Our `AudioTransformer` (`audio`) and open_clip's text transformer (`text`); the temperature is the
    model's own. `cfg.pretrained` is a ContrastiveModel state dict, loaded once the model is assembled."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        spec = _audio_model_configs()[cfg.name]
        self.embed_dim = spec["embed_dim"]
        self.audio = AudioTransformer(self.embed_dim, cfg.audio, **spec["audio_cfg"])
        self.text = _build_text_tower(self.embed_dim, spec["text_cfg"])

    def parts(self) -> dict[str, nn.Module]:
        return {"audio": self.audio, "text": self.text}

    def pretrained_state(self) -> dict[str, torch.Tensor] | None:
        return _read_state_dict(self.cfg.pretrained) if self.cfg.pretrained else None

    def normalise_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        raise ValueError(f"{self.cfg.name} is an audio model: uint8 media are images, audio comes as float log-mel")

    def encode_media(self, media: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.audio(media), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text(tokens), dim=-1)

    def media_parameters(self) -> list[nn.Parameter]:
        return list(self.audio.parameters())

    def text_parameters(self) -> list[nn.Parameter]:
        return list(self.text.parameters())

    def lock_media(self) -> None:  # ModelConfig refuses model.lock_image for audio models
        raise ConfigError(f"model.lock_image: {self.cfg.name} is an audio model; lock_image applies to image towers")

    def lock_text(self) -> None:
        self.text.lock(unlocked_layers=self.cfg.lock_text_unlocked_layers)

    def open_clip_state_dict(self) -> dict[str, torch.Tensor]:
        raise ValueError(f"{self.cfg.name} is an audio model: open_clip has no audio tower to load it into")

    @staticmethod
    def media_transform(cfg: ModelConfig, is_train: bool) -> _AudioTransform:
        return _AudioTransform(cfg.audio, is_train)

    @staticmethod
    def tokenizer(cfg: ModelConfig) -> open_clip.SimpleTokenizer:
        context = _audio_model_configs()[cfg.name]["text_cfg"]["context_length"]
        return open_clip.SimpleTokenizer(context_length=context)


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(loaded, dict) and "state_dict" in loaded:
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise ConfigError(f"model.pretrained: {path} does not hold a state dict")
    return {k.removeprefix("module."): v for k, v in loaded.items()}


class _AudioTransform:
    """A class rather than a closure so data-loader workers can pickle it."""

    def __init__(self, features: AudioConfig, is_train: bool):
        self.features, self.is_train = features, is_train

    def __call__(self, waveform: np.ndarray, sample_rate: int, generator: torch.Generator | None = None) -> torch.Tensor:
        wave = torch.as_tensor(np.asarray(waveform, dtype=np.float32))
        if wave.dim() != 1:
            raise ValueError(f"audio transform expects a mono waveform [samples], got shape {list(wave.shape)}")
        wave = resample(wave, int(sample_rate), self.features.sample_rate)
        wave = fit_length(wave, self.features.num_samples, generator if self.is_train else None)
        return log_mel(wave, self.features)
