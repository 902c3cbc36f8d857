"""The two-tower model: `ContrastiveModel` composes one modality's `Towers` with a learnable temperature.

    model = build_model(ModelConfig(name="tiny-clip"))      # pipeline.model.build; "tiny-clap": modality="audio"
    outputs = model(media, tokens)                          # the dict every loss takes (docs/ARCHITECTURE.md)

Plain PyTorch: no deepspeed, and nothing of how the model is trained (activation checkpointing, compile and
precision are applied from outside, pipeline.parallel). LiT (`lock_image`, `lock_text`) freezes towers with
open_clip's own lock methods; FLIP's patch dropout is pipeline.model.patch_dropout.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from pipeline.core.errors import ConfigError
from pipeline.model.config import ModelConfig
from pipeline.model.towers import Towers

log = logging.getLogger(__name__)


class ContrastiveModel(nn.Module):
    """Media tower + text tower (a `Towers`) + learnable temperature (and bias, and log-sigma heads).

    For GradCache the trainer calls `encode_media` and `encode_text` separately (per micro-batch,
    possibly without grad), concatenates each key, and calls `combine` to attach the logit scale
    and bias, which gives the same dict as `forward` on the whole batch.
    """

    def __init__(self, cfg: ModelConfig, towers: Towers):
        super().__init__()
        self.cfg, self.towers = cfg, towers
        for name, module in towers.parts().items():  # the state dict's prefixes: clip.*, or audio.* and text.*
            setattr(self, name, module)
        if towers.temperature_owner() is None:
            self.logit_scale = nn.Parameter(torch.full([1], cfg.init_logit_scale))
            self.logit_bias = nn.Parameter(torch.full([1], cfg.init_logit_bias)) if cfg.logit_bias else None
        self.embed_dim = embed_dim = towers.embed_dim
        if cfg.probabilistic:
            # zero weights: every sample starts at the same sigma, set by the logit scale (see _log_sigma)
            self.media_log_sigma_head = nn.Linear(embed_dim, 1)
            self.text_log_sigma_head = nn.Linear(embed_dim, 1)
            for head in (self.media_log_sigma_head, self.text_log_sigma_head):
                nn.init.zeros_(head.weight)
                nn.init.zeros_(head.bias)
        pretrained = towers.pretrained_state()
        if pretrained is not None:
            self.load_state_dict(pretrained)
        self.media_locked = self.text_locked = False
        self.lock_towers()

    # -- parameters shared by both towers

    def _temperature_owner(self) -> nn.Module:
        owner = self.towers.temperature_owner()
        return self if owner is None else owner

    @property
    def _logit_scale_param(self) -> nn.Parameter:
        return self._temperature_owner().logit_scale

    @property
    def _logit_bias_param(self) -> nn.Parameter | None:
        return getattr(self._temperature_owner(), "logit_bias", None)

    def _log_logit_scale(self) -> torch.Tensor:
        # clamping the log is clamping exp(.) to max_logit_scale, with the same gradient
        return self._logit_scale_param.clamp(max=math.log(self.cfg.max_logit_scale))

    def _log_sigma(self, head: nn.Linear, features: torch.Tensor) -> torch.Tensor:
        # sigma_j = exp(head_j) / sqrt(logit_scale): the learnable temperature stays global, the head
        # learns how much each sample deviates from it; at init sigma^2 = 1 / logit_scale, so the
        # logits -||x - mu||^2 / sigma^2 start as CLIP's scaled cosine up to a constant per row.
        # The head reads the normalised mean: open_clip's forward (which ZeRO-3 needs) only returns that.
        log_sigma = head(features).squeeze(-1) - 0.5 * self._log_logit_scale().to(features.dtype)
        return log_sigma.clamp(self.cfg.log_sigma_min, self.cfg.log_sigma_max)

    # -- towers

    def lock_towers(self) -> None:
        """LiT (model.lock_image / model.lock_text): freeze the towers with open_clip's own lock methods, so
        the unlocked groups are open_clip's. Frozen parameters have requires_grad=False, which keeps them out
        of the optimizer (pipeline.optim) and out of DeepSpeed's gradient reduction at every ZeRO stage.
        A tower with no trainable parameter left runs its forward under torch.no_grad (`media_locked`,
        `text_locked`): no activations are kept for it."""
        cfg = self.cfg
        if (cfg.lock_image or cfg.lock_text) and not cfg.pretrained:
            log.warning("model.lock_image / model.lock_text without model.pretrained: the locked weights stay at "
                        "their random initialisation")
        if cfg.lock_image:
            self.towers.lock_media()
            self.media_locked = _fully_locked(
                self.towers.media_parameters(),
                f"model.lock_image_unlocked_groups={cfg.lock_image_unlocked_groups} unlocks the whole image tower "
                f"of {cfg.name}: use fewer groups, or model.lock_image=false")
        if cfg.lock_text:
            self.towers.lock_text()
            self.text_locked = _fully_locked(
                self.towers.text_parameters(),
                f"model.lock_text_unlocked_layers={cfg.lock_text_unlocked_layers} unlocks the whole text tower "
                f"of {cfg.name}: use fewer layers, or model.lock_text=false")

    def normalise_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 images [B, 3, H, W] (the loader's) -> open_clip's input: /255, minus mean, over std, in
        the vision tower's dtype, bit-identical to open_clip's preprocessing before the cast."""
        return self.towers.normalise_pixels(pixels)

    def encode_media(self, media: torch.Tensor) -> dict[str, torch.Tensor]:
        """Images [B, 3, H, W] (uint8 from the loader, normalised here; or float, already normalised) or
        log-mel [B, n_mels, frames] -> media_features (and media_log_sigma)."""
        if media.dtype == torch.uint8:
            media = self.normalise_pixels(media)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.media_locked):  # a locked tower: no graph
            features = self.towers.encode_media(media)
        part = {"media_features": features}
        if self.cfg.probabilistic:
            part["media_log_sigma"] = self._log_sigma(self.media_log_sigma_head, features)
        return part

    def encode_text(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """Tokens [B, context] -> text_features (and text_log_sigma)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.text_locked):  # a locked tower: no graph
            features = self.towers.encode_text(tokens)
        part = {"text_features": features}
        if self.cfg.probabilistic:
            part["text_log_sigma"] = self._log_sigma(self.text_log_sigma_head, features)
        return part

    def combine(self, media_part: dict[str, torch.Tensor], text_part: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Both towers' outputs + logit_scale (exp'd, clamped, shape [1]) and logit_bias -> the loss input."""
        outputs = {**media_part, **text_part, "logit_scale": self._log_logit_scale().exp()}
        bias = self._logit_bias_param
        if bias is not None:
            outputs["logit_bias"] = bias
        return outputs

    def forward(self, media: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.combine(self.encode_media(media), self.encode_text(tokens))

    def open_clip_state_dict(self) -> dict[str, torch.Tensor]:
        """State dict that `open_clip.create_model_and_transforms(name, pretrained=path)` loads after torch.save.

        Drops our log-sigma heads; logit_scale back to open_clip's 0-dim shape; logit_bias kept only
        where the open_clip config declares one (open_clip's strict loading rejects it otherwise).
        A ValueError for audio models: open_clip has no audio tower.
        """
        return self.towers.open_clip_state_dict()


def _fully_locked(parameters: list[nn.Parameter], whole_tower_unlocked: str) -> bool:
    """Whether a tower, after its lock method, has no trainable parameter left; a ConfigError saying
    `whole_tower_unlocked` when the lock left every parameter trainable."""
    trainable = [p for p in parameters if p.requires_grad]
    if trainable and len(trainable) == len(parameters):
        raise ConfigError(whole_tower_unlocked)
    return not trainable


def media_to_device(media: torch.Tensor, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
    """A batch's media on the device, ready for `encode_media`: float media (log-mel, normalised images) in
    the model's dtype; uint8 images stay uint8, the model normalises them. Copy first (asynchronous from
    pinned memory), then cast on the device: a cast on the host makes a fresh, unpinned tensor."""
    media = media.to(device, non_blocking=True)
    return media.to(dtype) if media.is_floating_point() else media
