"""The interface between `ContrastiveModel` and one modality's pair of towers: `Towers`.

A `Towers` builds the media tower and the text tower for a `ModelConfig` and says how to run, lock and
export them, and what they are fed with (the per-sample media transform, the tokenizer, the image size).
`ContrastiveModel` composes one and adds what every modality shares: the temperature (unless the towers
bring their own), the log-sigma heads, the no-grad forward of a locked tower, GradCache's parts.
Implementations: `pipeline.model.image.ImageTextTowers` (open_clip's CLIP) and
`pipeline.model.audio.AudioTextTowers` (CLAP).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import open_clip
import torch
from torch import nn

from pipeline.model.config import ModelConfig


class Towers(ABC):
    """One modality's media and text towers. The modules are registered on the model (`parts`); this
    object only holds references to them, and no state of its own that a checkpoint would need."""

    embed_dim: int
    """Width of both towers' features."""

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg

    # -- what the model holds

    @abstractmethod
    def parts(self) -> dict[str, nn.Module]:
        """Modules for `ContrastiveModel` to register, by attribute name: the names are the state dict's
        prefixes (the checkpoint layout), and their order is the parameters' order."""

    def temperature_owner(self) -> nn.Module | None:
        """The module whose `logit_scale` (and `logit_bias`) the towers bring (open_clip's CLIP), or None:
        `ContrastiveModel` makes its own."""
        return None

    def pretrained_state(self) -> dict[str, torch.Tensor] | None:
        """A ContrastiveModel state dict for the model to load once assembled (the `cfg.pretrained` of towers
        that do not load it themselves when built), or None."""
        return None

    # -- forward

    @abstractmethod
    def normalise_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 images [B, 3, H, W] -> the media tower's float input; a ValueError for non-image towers."""

    @abstractmethod
    def encode_media(self, media: torch.Tensor) -> torch.Tensor:
        """Float media (normalised images, log-mel) -> L2-normalised features [B, embed_dim]."""

    @abstractmethod
    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens [B, context] -> L2-normalised features [B, embed_dim]."""

    # -- LiT

    @abstractmethod
    def media_parameters(self) -> list[nn.Parameter]:
        """Every parameter of the media tower."""

    @abstractmethod
    def text_parameters(self) -> list[nn.Parameter]:
        """Every parameter of the text tower."""

    @abstractmethod
    def lock_media(self) -> None:
        """Freeze the media tower but its last `cfg.lock_image_unlocked_groups` layer groups."""

    @abstractmethod
    def lock_text(self) -> None:
        """Freeze the text tower but its last `cfg.lock_text_unlocked_layers` layer groups."""

    # -- export

    @abstractmethod
    def open_clip_state_dict(self) -> dict[str, torch.Tensor]:
        """See ContrastiveModel.open_clip_state_dict; a ValueError for towers open_clip cannot load."""

    # -- what the towers are fed with: no towers are built for these

    @staticmethod
    @abstractmethod
    def media_transform(cfg: ModelConfig, is_train: bool) -> Callable:
        """Per-sample preprocessing for the media tower (see pipeline.model.build.media_transform)."""

    @staticmethod
    @abstractmethod
    def tokenizer(cfg: ModelConfig) -> open_clip.SimpleTokenizer:
        """The text tower's tokenizer (checked by pipeline.model.build.get_tokenizer)."""

    @staticmethod
    def image_size(cfg: ModelConfig) -> int | None:
        """Side of the square image the media tower takes; None for other media."""
        return None
