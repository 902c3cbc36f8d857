"""What the trainer asks of a `ModelConfig`: the model, its media transform, its tokenizer, its image size.

    model = build_model(cfg)                                 # randomly initialised, or from cfg.pretrained
    preprocess, tokenize = media_transform(cfg, is_train=True), get_tokenizer(cfg)

`cfg.modality` picks the `Towers` (TOWERS); nothing else here depends on it.
"""

from __future__ import annotations

from collections.abc import Callable

import open_clip
import torch

from pipeline.core.errors import ConfigError
from pipeline.model.audio import AudioTextTowers
from pipeline.model.config import ModelConfig
from pipeline.model.contrastive import ContrastiveModel
from pipeline.model.image import ImageTextTowers
from pipeline.model.towers import Towers

TOWERS: dict[str, type[Towers]] = {"image": ImageTextTowers, "audio": AudioTextTowers}


def build_model(cfg: ModelConfig) -> ContrastiveModel:
    """Randomly initialised, or loaded from cfg.pretrained. Nothing of training is applied: activation
    checkpointing (cfg.grad_checkpointing) is the trainer's, pipeline.parallel.checkpointing."""
    model = ContrastiveModel(cfg, TOWERS[cfg.modality](cfg))
    zero_dim = [name for name, p in model.named_parameters() if p.dim() == 0]
    if zero_dim:  # DeepSpeed's ZeRO partitioning crashes on them
        raise ValueError(f"0-dim parameters in {cfg.name}: {zero_dim}")
    return model


def image_size(cfg: ModelConfig) -> int | None:
    """Side of the square image the vision tower takes (None for audio models)."""
    return TOWERS[cfg.modality].image_size(cfg)


def media_transform(cfg: ModelConfig, is_train: bool) -> Callable:
    """Per-sample preprocessing for the model's media tower.

    image: callable(PIL.Image) -> uint8 Tensor[3, H, W]: the geometric part of open_clip's transform for
    the model (train: random resized crop; eval: resize + centre crop; RGB), with the same parameters and
    the same draws from torch's RNG. The float part (to [0, 1], mean/std) happens in
    `ContrastiveModel.encode_media` on the device: batches are 4x smaller and the loader workers skip two
    full-image float passes.
    audio: callable(waveform float32 mono, sample_rate, generator | None) -> log-mel [n_mels, frames]:
    resample, crop (random offset from `generator` in training, the start in eval) or pad, log-mel.
    """
    return TOWERS[cfg.modality].media_transform(cfg, is_train)


def get_tokenizer(cfg: ModelConfig) -> Callable[[list[str]], torch.Tensor]:
    """open_clip's bundled BPE tokenizer at the text tower's context length: list[str] -> Long[B, context]."""
    tokenizer = TOWERS[cfg.modality].tokenizer(cfg)
    if not isinstance(tokenizer, open_clip.SimpleTokenizer):
        raise ConfigError(f"model.name {cfg.name!r}: tokenizer {type(tokenizer).__name__} needs a download")
    return tokenizer
