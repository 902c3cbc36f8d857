"""Towers: open_clip image-text models, our audio tower for CLAP, transforms and tokenizers.

    cfg = ModelConfig(name="tiny-clip")                      # or "ViT-B-32", "tiny-clap" (modality="audio")
    model = build_model(cfg)
    outputs = model(media, tokens)                           # the dict every loss takes (docs/ARCHITECTURE.md)
    preprocess, tokenize = media_transform(cfg, is_train=True), get_tokenizer(cfg)

Image-text models are open_clip's own (any open_clip config name, or ours in pipeline/model/model_configs/),
so their weights export to a state dict that `open_clip.create_model_and_transforms` loads. Audio-text
models pair a log-mel patch transformer with open_clip's text transformer. Plain PyTorch: no deepspeed.
LiT (`lock_image`, `lock_text`) freezes towers with open_clip's own lock methods; FLIP's patch dropout
(`patch_dropout`) is our `PatchDropout`, whose masks GradCache can reproduce (see its docstring).

Size: ~730 lines, the towers plus what they are fed with (the image transform, log-mel features, the
tokenizer): a model and its input contract change together, and the export test checks both at once.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import _build_text_tower
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transform import MaybeConvertMode, PreprocessCfg, _convert_to_rgb, image_transform_v2
from open_clip.transformer import CustomTransformer, LayerNorm, Transformer
from torch import nn
from torch.utils.checkpoint import checkpoint
from torchvision.transforms import Normalize, ToTensor

from pipeline.core.errors import ConfigError
from pipeline.media.audio import AudioConfig, fit_length, log_mel, resample

log = logging.getLogger(__name__)

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
MODALITIES = ("image", "audio")
_registered = False


def register_open_clip_configs() -> None:
    """Make open_clip know our image-text configs (tiny-clip, ...) by name; idempotent."""
    global _registered
    if not _registered:
        open_clip.add_model_config(MODEL_CONFIG_DIR)
        _registered = True


def _audio_model_configs() -> dict[str, dict[str, Any]]:
    """Our audio-text configs: JSON files with `audio_cfg` (open_clip does not register them)."""
    configs = {}
    for path in sorted(MODEL_CONFIG_DIR.glob("*.json")):
        loaded = json.loads(path.read_text())
        if "audio_cfg" in loaded:
            configs[path.stem] = loaded
    return configs


def _image_model_config(name: str) -> dict[str, Any] | None:
    register_open_clip_configs()
    model_cfg = open_clip.get_model_config(name)
    if model_cfg is None or "vision_cfg" not in model_cfg:
        return None
    return model_cfg


@dataclass
class ModelConfig:
    name: str = "tiny-clip"
    """open_clip model name ("ViT-B-32", "ViT-B-16", "ViT-L-14", ...) or one of pipeline/model/model_configs/
    ("tiny-clip" for images, "tiny-clap" / "clap-base" for audio)."""
    modality: str = "image"
    """"image" (open_clip vision tower) or "audio" (log-mel transformer); must match `name`."""
    pretrained: str = ""
    """Local checkpoint file to start from: an open_clip state dict for image models, a
    ContrastiveModel state dict for audio models; empty for random initialisation."""
    lock_image: bool = False
    """LiT: freeze the image tower (typically loaded from `pretrained`); its parameters get no gradient, no
    optimizer state and no gradient reduction, and a fully locked tower runs its forward without autograd."""
    lock_image_unlocked_groups: int = 0
    """With `lock_image`: leave the last N layer groups of the image tower trainable (open_clip's
    `lock_image_tower(unlocked_groups)`; for a ViT: the projection, then the last block with ln_post, then
    each earlier block, then the patch/position embeddings)."""
    lock_image_freeze_bn_stats: bool = False
    """With `lock_image` on a ResNet image tower: also freeze the BatchNorm running statistics of the locked
    stages (open_clip's `freeze_bn_stats`)."""
    lock_text: bool = False
    """Freeze the text tower, as `lock_image` does the image tower."""
    lock_text_unlocked_layers: int = 0
    """With `lock_text`: leave the last N layer groups of the text tower trainable (open_clip's
    `lock_text_tower(unlocked_layers)`: the projection, then the last block with ln_final, then each earlier
    block, then the token/position embeddings)."""
    patch_dropout: float = 0.0
    """FLIP: fraction of the image patches each training sample drops (0.5-0.75 in the paper); the class
    token is always kept and evaluation keeps every patch. A sample's kept patches depend only on the step
    and the sample's row in the step's batch, so GradCache (train.accum_steps) gives the gradients of one
    pass over the whole batch. ViT image towers only; replaces an open_clip config's own patch_dropout."""
    grad_checkpointing: bool = False
    """Recompute every transformer block in the backward pass (reentrant checkpointing, ZeRO-3 safe)."""
    probabilistic: bool = False
    """Add per-sample log-sigma heads to both towers (the probabilistic loss needs them)."""
    logit_bias: bool = False
    """Learnable logit bias (SigLIP), initialised to `init_logit_bias`."""
    init_logit_bias: float = -10.0
    """Initial logit bias when `logit_bias` is on (SigLIP paper: -10)."""
    init_logit_scale: float = math.log(1 / 0.07)
    """Initial log of the logit scale (inverse temperature); CLIP: ln(1/0.07)."""
    max_logit_scale: float = 100.0
    """The exponentiated logit scale is clamped to this in the forward pass."""
    log_sigma_min: float = -5.0
    """Lower clamp of the per-sample log sigma (probabilistic); keeps 1/sigma^2 finite in fp32."""
    log_sigma_max: float = 2.0
    """Upper clamp of the per-sample log sigma (probabilistic)."""
    audio: AudioConfig = field(default_factory=AudioConfig)
    """Log-mel feature settings the audio tower is built for (ignored for image models)."""

    def __post_init__(self):
        if self.modality not in MODALITIES:
            raise ConfigError(f"model.modality must be one of {list(MODALITIES)}, got {self.modality!r}")
        if self.modality == "audio":
            known = _audio_model_configs()
            if self.name not in known:
                raise ConfigError(
                    f"model.name {self.name!r} is not an audio model; audio models: {sorted(known)} "
                    f"(JSON files with audio_cfg in {MODEL_CONFIG_DIR})"
                )
            _validate_audio_tower(known[self.name]["audio_cfg"], self.audio, self.name)
        else:
            model_cfg = _image_model_config(self.name)
            if model_cfg is None:
                hint = " (an audio model: set model.modality=audio)" if self.name in _audio_model_configs() else ""
                raise ConfigError(
                    f"model.name {self.name!r} is not an open_clip image-text model{hint}; "
                    f"see open_clip.list_models() or {MODEL_CONFIG_DIR}"
                )
            text_cfg = model_cfg.get("text_cfg", {})
            if text_cfg.get("hf_model_name") or text_cfg.get("hf_tokenizer_name") or "siglip" in self.name.lower():
                raise ConfigError(
                    f"model.name {self.name!r} needs a Hugging Face download (text tower or tokenizer); "
                    "pick a model with open_clip's bundled BPE tokenizer (ViT-B-32, ViT-B-16, ViT-L-14, tiny-clip)"
                )
        self._validate_locks_and_patch_dropout()
        if self.pretrained and not Path(self.pretrained).is_file():
            raise ConfigError(f"model.pretrained: checkpoint file {self.pretrained!r} does not exist")
        if not self.max_logit_scale > 0:
            raise ConfigError(f"model.max_logit_scale must be positive, got {self.max_logit_scale}")
        if self.init_logit_scale > math.log(self.max_logit_scale):
            raise ConfigError(
                f"model.init_logit_scale ({self.init_logit_scale}) exceeds ln(model.max_logit_scale) "
                f"= {math.log(self.max_logit_scale):.3f}: the clamp would leave the scale without gradient"
            )
        if not self.log_sigma_min < self.log_sigma_max:
            raise ConfigError(
                f"model.log_sigma_min ({self.log_sigma_min}) must be below model.log_sigma_max ({self.log_sigma_max})"
            )


    def _validate_locks_and_patch_dropout(self) -> None:
        for key, count, lock_key in (("lock_image_unlocked_groups", self.lock_image_unlocked_groups, "lock_image"),
                                     ("lock_text_unlocked_layers", self.lock_text_unlocked_layers, "lock_text")):
            if count < 0:
                raise ConfigError(f"model.{key} must be >= 0, got {count}")
            if count and not getattr(self, lock_key):
                raise ConfigError(f"model.{key}={count} only applies with model.{lock_key}=true")
        if self.lock_image_freeze_bn_stats and not self.lock_image:
            raise ConfigError("model.lock_image_freeze_bn_stats only applies with model.lock_image=true")
        if not 0 <= self.patch_dropout < 1:
            raise ConfigError(f"model.patch_dropout must be in [0, 1), got {self.patch_dropout}")
        if self.modality != "image":
            for key in ("lock_image", "patch_dropout"):
                if getattr(self, key):
                    raise ConfigError(f"model.{key}: {self.name} is an audio model; {key} applies to image towers")
        elif self.patch_dropout:
            vision_cfg = _image_model_config(self.name)["vision_cfg"]
            if vision_cfg.get("timm_model_name") or isinstance(vision_cfg.get("layers"), (list, tuple)):
                raise ConfigError(f"model.patch_dropout: {self.name} has no ViT image tower (patch dropout drops ViT "
                                  "patch tokens; ResNet and timm towers have none)")


def _validate_audio_tower(audio_cfg: dict[str, Any], features: AudioConfig, name: str) -> None:
    patch_mels = audio_cfg["patch_mels"]
    if features.n_mels % patch_mels:
        raise ConfigError(
            f"model.audio.n_mels ({features.n_mels}) must be a multiple of the patch height "
            f"patch_mels={patch_mels} of audio model {name!r}"
        )
    if audio_cfg["width"] % audio_cfg["heads"]:
        raise ConfigError(f"audio model {name!r}: audio_cfg width must be a multiple of heads")


# ---------------------------------------------------------------- gradient checkpointing


def _run_block(block: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
    return block(x, attn_mask=attn_mask)


def _reentrant_checkpointed_forward(transformer: nn.Module, x: torch.Tensor, attn_mask=None) -> torch.Tensor:
    """open_clip's Transformer.forward, with each block under *reentrant* checkpointing.

    open_clip checkpoints with use_reentrant=False, which DeepSpeed ZeRO-3 breaks ("recomputed
    shape" errors: the partitioned parameters are gathered differently on recomputation).
    """
    if not transformer.batch_first:
        x = x.transpose(0, 1).contiguous()
    for block in transformer.resblocks:
        if torch.is_grad_enabled() and x.requires_grad:
            x = checkpoint(_run_block, block, x, attn_mask, use_reentrant=True)
        else:
            # no grad (GradCache's feature pass, a locked tower): nothing to save or recompute. An input
            # without grad (the first trainable block after locked ones, model.lock_*_unlocked_*) runs
            # plainly too: a reentrant checkpoint would leave that block's parameters without gradient
            x = block(x, attn_mask=attn_mask)
    if not transformer.batch_first:
        x = x.transpose(0, 1)
    return x


def _checkpointed_stage_forward(stage: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """A ResNet stage (nn.Sequential of bottlenecks) recomputed in backward, reentrant like the blocks above.
    Its BatchNorm layers see the same batch on recomputation, so outputs and gradients are unchanged;
    only their running statistics take a second momentum update per step."""
    if torch.is_grad_enabled() and x.requires_grad:  # see _reentrant_checkpointed_forward
        return checkpoint(nn.Sequential.forward, stage, x, use_reentrant=True)
    return nn.Sequential.forward(stage, x)


def _set_reentrant_checkpointing(module: nn.Module, enable: bool) -> int:
    """Switch every open_clip transformer stack and ResNet tower inside `module`; returns how many were switched."""
    count = 0
    for child in module.modules():
        if isinstance(child, (Transformer, CustomTransformer)):
            child.grad_checkpointing = False  # never open_clip's own (non-reentrant) path
            stages = [(child, _reentrant_checkpointed_forward)]
        elif isinstance(child, ModifiedResNet):
            stages = [(getattr(child, f"layer{i}"), _checkpointed_stage_forward) for i in range(1, 5)]
        else:
            continue
        for stage, forward in stages:
            if enable:
                # an instance attribute shadows the class's forward; the state dict is unchanged
                stage.forward = _BoundCheckpointedForward(stage, forward)
            elif "forward" in stage.__dict__:
                del stage.forward
        count += 1
    return count


class _BoundCheckpointedForward:
    """Picklable stand-in for a bound method (torch.save(model) and deepcopy keep working)."""

    def __init__(self, module: nn.Module, forward):
        self.module, self.forward = module, forward

    def __call__(self, x, *args, **kwargs):
        return self.forward(self.module, x, *args, **kwargs)


# ---------------------------------------------------------------- audio tower


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


# ---------------------------------------------------------------- patch dropout (FLIP)

_LOW32 = 0xFFFFFFFF


def _mix32(x):
    """A bijective integer hash of values in [0, 2**32) (xor-shift-multiply), for int64 tensors and Python
    ints alike; the multiplier is below 2**27, so no product leaves int64 on any device."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & _LOW32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _LOW32
    return (x >> 16) ^ x


class PatchDropout(nn.Module):
    """FLIP's patch dropout whose mask of a sample depends only on (step seed, the sample's row in the step).

    Ours rather than open_clip's PatchDropout: that one draws one random matrix for the micro-batch from
    torch's global RNG, so a sample's mask depends on how the step's batch is cut into micro-batches and on
    every draw before it. Here the score of patch j of the sample in row r is a counter-based hash of
    (seed, r, j), computed on the device in one pass; the top `keep` scores are kept, in patch order. The
    class token (the first `num_prefix_tokens` tokens) is always kept. The trainer says where the rows of
    the next forward sit with `place(seed, first_row)` (see `patch_dropout_rows`), once per forward; a
    forward that was not placed draws a fresh seed from torch's RNG and numbers its rows from 0, as any
    dropout would. Evaluation (`eval()`) keeps every patch.
    """

    def __init__(self, prob: float, num_prefix_tokens: int = 1):
        super().__init__()
        if not 0 <= prob < 1:
            raise ValueError(f"patch dropout probability must be in [0, 1), got {prob}")
        self.prob, self.num_prefix_tokens = prob, num_prefix_tokens
        self._placement: tuple[int, int] | None = None

    def place(self, seed: int, first_row: int) -> None:
        """The rows of the next forward are rows first_row, first_row + 1, ... of the step seeded `seed`."""
        self._placement = (int(seed) & _LOW32, int(first_row))

    def keep_indices(self, rows: int, patches: int, seed: int, first_row: int, device) -> torch.Tensor:
        """Long[rows, keep]: the patches (0-based, after the prefix tokens) each row keeps, ascending."""
        keep = max(1, int(patches * (1 - self.prob)))
        # the seed's hash is a Python int: a kernel argument, no copy to the device
        row_ids = (torch.arange(first_row, first_row + rows, device=device) & _LOW32) ^ _mix32(seed & _LOW32)
        patch_ids = torch.arange(patches, device=device)
        scores = _mix32(_mix32(row_ids)[:, None] ^ (patch_ids * 0x9E3779B1 & _LOW32))
        # scores * patches + j: every score distinct, so the top-k (and the mask) never depends on tie-breaking
        chosen = (scores * patches + patch_ids).topk(keep, dim=1).indices
        return chosen.sort(dim=1).values

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        placement, self._placement = self._placement, None
        if not self.training or self.prob == 0:
            return x
        seed, first_row = placement if placement is not None else (int(torch.randint(0, 2**31, (1,))), 0)
        prefix, patches = x[:, :self.num_prefix_tokens], x[:, self.num_prefix_tokens:]
        kept = self.keep_indices(x.shape[0], patches.shape[1], seed, first_row, x.device)
        patches = patches.gather(1, kept.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        return torch.cat([prefix, patches], dim=1)

    def extra_repr(self) -> str:
        return f"prob={self.prob}"


class PatchDropoutRows:
    """Where the rows of a model's next forward sit in the step's batch, for its PatchDropout modules.

        rows = patch_dropout_rows(model)     # once per step: the step's seed, from torch's RNG
        rows.place(first_row); model(...)    # before each forward of the step (each micro-batch, each pass)
    """

    def __init__(self, modules: list[PatchDropout], seed: int):
        self.modules, self.seed = modules, seed

    def place(self, first_row: int) -> None:
        for module in self.modules:
            module.place(self.seed, first_row)


def patch_dropout_rows(model: nn.Module) -> PatchDropoutRows:
    """A step's `PatchDropoutRows` for `model`. The seed is drawn from torch's RNG only when the model drops
    patches, so runs without patch dropout keep their random stream."""
    modules = [module for module in model.modules() if isinstance(module, PatchDropout) and module.prob > 0]
    seed = int(torch.randint(0, 2**31, (1,))) if modules else 0
    return PatchDropoutRows(modules, seed)


# ---------------------------------------------------------------- the two-tower model


class ContrastiveModel(nn.Module):
    """Media tower + text tower + learnable temperature (and bias, and log-sigma heads).

    For GradCache the trainer calls `encode_media` and `encode_text` separately (per micro-batch,
    possibly without grad), concatenates each key, and calls `combine` to attach the logit scale
    and bias, which gives the same dict as `forward` on the whole batch.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.modality == "image":
            register_open_clip_configs()
            # nonscalar_logit_scale: DeepSpeed crashes on 0-dim parameters
            # force_patch_dropout=0: open_clip's own patch dropout (global RNG) never runs; ours replaces it
            with _without_random_init_warning():
                self.clip = open_clip.create_model(
                    cfg.name, pretrained=cfg.pretrained or None, nonscalar_logit_scale=True,
                    init_logit_scale=cfg.init_logit_scale,
                    init_logit_bias=cfg.init_logit_bias if cfg.logit_bias else None, output_dict=True,
                    force_patch_dropout=0.0,
                    # open_clip moves the model to `device` (cpu by default): under `with torch.device("meta")`
                    # (the dry run's parameter count) it must stay there
                    device=torch.get_default_device(),
                )
            embed_dim = _image_model_config(cfg.name)["embed_dim"]
            if cfg.patch_dropout:
                self.clip.visual.patch_dropout = PatchDropout(cfg.patch_dropout)
        else:
            spec = _audio_model_configs()[cfg.name]
            embed_dim = spec["embed_dim"]
            self.audio = AudioTransformer(embed_dim, cfg.audio, **spec["audio_cfg"])
            self.text = _build_text_tower(embed_dim, spec["text_cfg"])
            self.logit_scale = nn.Parameter(torch.full([1], cfg.init_logit_scale))
            self.logit_bias = nn.Parameter(torch.full([1], cfg.init_logit_bias)) if cfg.logit_bias else None
        self.embed_dim = embed_dim
        self._pixel_statistics: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        if cfg.probabilistic:
            # zero weights: every sample starts at the same sigma, set by the logit scale (see _log_sigma)
            self.media_log_sigma_head = nn.Linear(embed_dim, 1)
            self.text_log_sigma_head = nn.Linear(embed_dim, 1)
            for head in (self.media_log_sigma_head, self.text_log_sigma_head):
                nn.init.zeros_(head.weight)
                nn.init.zeros_(head.bias)
        if cfg.modality == "audio" and cfg.pretrained:
            self.load_state_dict(_read_state_dict(cfg.pretrained))
        self.media_locked = self.text_locked = False
        self.lock_towers()
        self.set_grad_checkpointing(cfg.grad_checkpointing)

    # -- parameters shared by both towers

    @property
    def _logit_scale_param(self) -> nn.Parameter:
        return self.clip.logit_scale if self.cfg.modality == "image" else self.logit_scale

    @property
    def _logit_bias_param(self) -> nn.Parameter | None:
        owner = self.clip if self.cfg.modality == "image" else self
        return getattr(owner, "logit_bias", None)

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

    def _text_tower_parameters(self) -> list[nn.Parameter]:
        if self.cfg.modality != "image":
            return list(self.text.parameters())
        owners = [self.clip.token_embedding, self.clip.positional_embedding, self.clip.transformer,
                  self.clip.ln_final, self.clip.text_projection]
        return [p for owner in owners if owner is not None
                for p in ([owner] if isinstance(owner, nn.Parameter) else owner.parameters())]

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
            try:
                self.clip.lock_image_tower(unlocked_groups=cfg.lock_image_unlocked_groups,
                                           freeze_bn_stats=cfg.lock_image_freeze_bn_stats)
            except AssertionError as error:  # open_clip's ResNet and timm towers lock only whole
                raise ConfigError(f"model.lock_image_unlocked_groups={cfg.lock_image_unlocked_groups}: "
                                  f"{cfg.name}'s image tower: {error}") from None
            trainable = [p for p in self.clip.visual.parameters() if p.requires_grad]
            if trainable and len(trainable) == len(list(self.clip.visual.parameters())):
                raise ConfigError(f"model.lock_image_unlocked_groups={cfg.lock_image_unlocked_groups} unlocks the "
                                  f"whole image tower of {cfg.name}: use fewer groups, or model.lock_image=false")
            self.media_locked = not trainable
        if cfg.lock_text:
            if cfg.modality == "image":
                self.clip.lock_text_tower(unlocked_layers=cfg.lock_text_unlocked_layers)
            else:
                self.text.lock(unlocked_layers=cfg.lock_text_unlocked_layers)
            parameters = self._text_tower_parameters()
            trainable = [p for p in parameters if p.requires_grad]
            if trainable and len(trainable) == len(parameters):
                raise ConfigError(f"model.lock_text_unlocked_layers={cfg.lock_text_unlocked_layers} unlocks the "
                                  f"whole text tower of {cfg.name}: use fewer layers, or model.lock_text=false")
            self.text_locked = not trainable

    def normalise_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 images [B, 3, H, W] (the loader's) -> open_clip's input: /255, minus mean, over std, in
        the vision tower's dtype. The same float32 operations as ToTensor + Normalize, so the result is
        bit-identical to open_clip's preprocessing before the cast."""
        if self.cfg.modality != "image":
            raise ValueError(f"{self.cfg.name} is an audio model: uint8 media are images, audio comes as float log-mel")
        mean, std = self._pixel_statistics.get(pixels.device, (None, None))
        if mean is None:
            # plain tensors, not buffers: the state dict and the open_clip export stay unchanged, and a
            # bf16/fp16 cast of the module cannot round them
            preprocess = image_preprocess(self.cfg)
            mean = torch.tensor(preprocess.mean, dtype=torch.float32, device=pixels.device).view(-1, 1, 1)
            std = torch.tensor(preprocess.std, dtype=torch.float32, device=pixels.device).view(-1, 1, 1)
            self._pixel_statistics[pixels.device] = (mean, std)
        dtype = next(self.clip.visual.parameters()).dtype
        return pixels.float().div_(255).sub_(mean).div_(std).to(dtype)

    def encode_media(self, media: torch.Tensor) -> dict[str, torch.Tensor]:
        """Images [B, 3, H, W] (uint8 from the loader, normalised here; or float, already normalised) or
        log-mel [B, n_mels, frames] -> media_features (and media_log_sigma)."""
        if media.dtype == torch.uint8:
            media = self.normalise_pixels(media)
        if self.cfg.modality == "image":
            # through open_clip's forward, not encode_image: ZeRO-3 gathers a module's own partitioned
            # parameters (text_projection, ...) only in a forward hook of that module
            with torch.set_grad_enabled(torch.is_grad_enabled() and not self.media_locked):
                features = self.clip(image=media)["image_features"]
        else:
            features = F.normalize(self.audio(media), dim=-1)
        part = {"media_features": features}
        if self.cfg.probabilistic:
            part["media_log_sigma"] = self._log_sigma(self.media_log_sigma_head, features)
        return part

    def encode_text(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """Tokens [B, context] -> text_features (and text_log_sigma)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.text_locked):  # a locked tower: no graph
            if self.cfg.modality == "image":
                features = self.clip(text=tokens)["text_features"]
            else:
                features = F.normalize(self.text(tokens), dim=-1)
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

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Reentrant checkpointing of every transformer block and ResNet stage in both towers."""
        if self.cfg.modality == "image":
            unsupported = [type(m).__name__ for m in self.clip.modules()
                           if type(m).__name__ in ("TimmModel", "HFTextEncoder")]
            if enable and unsupported:
                raise ConfigError(
                    f"model.grad_checkpointing: {self.cfg.name} has a {unsupported[0]} tower, which we do not "
                    "checkpoint (only open_clip transformer and ResNet towers)"
                )
        switched = _set_reentrant_checkpointing(self, enable)
        if enable and switched < 2:
            raise ConfigError(f"model.grad_checkpointing: found {switched} transformer stacks in {self.cfg.name}, expected 2")
        self.grad_checkpointing = enable

    def open_clip_state_dict(self) -> dict[str, torch.Tensor]:
        """State dict that `open_clip.create_model_and_transforms(name, pretrained=path)` loads after torch.save.

        Drops our log-sigma heads; logit_scale back to open_clip's 0-dim shape; logit_bias kept only
        where the open_clip config declares one (open_clip's strict loading rejects it otherwise).
        """
        if self.cfg.modality != "image":
            raise ValueError(f"{self.cfg.name} is an audio model: open_clip has no audio tower to load it into")
        state = {k: v.detach().clone() for k, v in self.clip.state_dict().items()}
        state["logit_scale"] = state["logit_scale"].reshape(())
        if "logit_bias" in state:
            if "init_logit_bias" in _image_model_config(self.cfg.name):
                state["logit_bias"] = state["logit_bias"].reshape(())
            else:
                del state["logit_bias"]
        return state


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(loaded, dict) and "state_dict" in loaded:
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise ConfigError(f"model.pretrained: {path} does not hold a state dict")
    return {k.removeprefix("module."): v for k, v in loaded.items()}


class _RandomInitWarningFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded for model")


class _without_random_init_warning:
    """Drops open_clip's root-logger warning "No pretrained weights loaded for model '...'. Model initialized
    randomly." (open_clip.factory.create_model, whenever `pretrained` is None) while a tower is built. It is
    wrong for every command that loads weights right after building (resume, export, eval of a run), and a
    fresh run's random start is the configuration's choice (an empty model.pretrained), which the trainer
    states itself; a `pretrained` that open_clip cannot load raises (ConfigError, checked up front)."""

    def __enter__(self):
        self.filter = _RandomInitWarningFilter()
        logging.getLogger().addFilter(self.filter)

    def __exit__(self, *exc_info):
        logging.getLogger().removeFilter(self.filter)


def build_model(cfg: ModelConfig) -> ContrastiveModel:
    """Randomly initialised, or loaded from cfg.pretrained; gradient checkpointing as configured."""
    model = ContrastiveModel(cfg)
    zero_dim = [name for name, p in model.named_parameters() if p.dim() == 0]
    if zero_dim:  # DeepSpeed's ZeRO partitioning crashes on them
        raise ValueError(f"0-dim parameters in {cfg.name}: {zero_dim}")
    return model


# ---------------------------------------------------------------- transforms and tokenizers


def image_size(cfg: ModelConfig) -> int | None:
    """Side of the square image the vision tower takes (None for audio models)."""
    if cfg.modality != "image":
        return None
    size = _image_model_config(cfg.name)["vision_cfg"]["image_size"]
    return max(size) if isinstance(size, (list, tuple)) else int(size)


def image_preprocess(cfg: ModelConfig) -> PreprocessCfg:
    """open_clip's preprocessing settings for an image model: size, mean, std, interpolation, resize mode."""
    model_cfg = _image_model_config(cfg.name)
    return PreprocessCfg(**{**model_cfg.get("preprocess_cfg", {}), "size": model_cfg["vision_cfg"]["image_size"]})


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
    if cfg.modality == "image":
        return image_pixel_transform(image_preprocess(cfg), is_train)
    return _AudioTransform(cfg.audio, is_train)


def image_pixel_transform(preprocess: PreprocessCfg, is_train: bool) -> ImagePixelTransform:
    """open_clip's `image_transform_v2(preprocess, is_train)` without its ToTensor and Normalize steps."""
    return ImagePixelTransform(image_transform_v2(preprocess, is_train=is_train), preprocess.mode)


def media_to_device(media: torch.Tensor, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
    """A batch's media on the device, ready for `encode_media`: float media (log-mel, normalised images) in
    the model's dtype; uint8 images stay uint8, the model normalises them. Copy first (asynchronous from
    pinned memory), then cast on the device: a cast on the host makes a fresh, unpinned tensor."""
    media = media.to(device, non_blocking=True)
    return media.to(dtype) if media.is_floating_point() else media


class ImagePixelTransform:
    """PIL image -> uint8 Tensor[3, H, W] through the PIL steps of an open_clip transform.

    open_clip's own Compose is built and its float tail (ToTensor, Normalize) dropped, so crop sizes,
    interpolation and random draws stay exactly open_clip's; any other step (a tensor augmentation, a
    timm transform) is refused rather than silently changed.
    """

    def __init__(self, open_clip_transform, mode: str = "RGB"):
        steps = list(getattr(open_clip_transform, "transforms", [open_clip_transform]))
        kinds = [type(step) for step in steps]
        if len(steps) < 2 or not issubclass(kinds[-2], ToTensor) or not issubclass(kinds[-1], Normalize):
            raise ValueError(
                "image transform: expected open_clip's PIL steps followed by ToTensor and Normalize, got "
                + ", ".join(kind.__name__ for kind in kinds)
            )
        # open_clip's RGB conversion copies even an RGB image: ours converts only other modes
        self.steps = [_ConvertMode(mode) if isinstance(step, MaybeConvertMode) or step is _convert_to_rgb else step
                      for step in steps[:-2]]
        self.mode = mode

    def __call__(self, image) -> torch.Tensor:
        for step in self.steps:
            image = step(image)
        if image.mode != self.mode:
            image = image.convert(self.mode)
        # HWC uint8 -> a CHW view, no float copy; stacking the batch makes it contiguous. np.array, not
        # asarray: PIL hands out read-only bytes, which torch must not wrap
        return torch.from_numpy(np.array(image)).permute(2, 0, 1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(repr(step) for step in self.steps)})"


class _ConvertMode:
    def __init__(self, mode: str):
        self.mode = mode

    def __call__(self, image):
        return image if image.mode == self.mode else image.convert(self.mode)

    def __repr__(self) -> str:
        return f"ConvertMode({self.mode})"


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


def get_tokenizer(cfg: ModelConfig) -> Callable[[list[str]], torch.Tensor]:
    """open_clip's bundled BPE tokenizer at the text tower's context length: list[str] -> Long[B, context]."""
    if cfg.modality == "image":
        register_open_clip_configs()
        tokenizer = open_clip.get_tokenizer(cfg.name)
    else:
        context = _audio_model_configs()[cfg.name]["text_cfg"]["context_length"]
        tokenizer = open_clip.SimpleTokenizer(context_length=context)
    if not isinstance(tokenizer, open_clip.SimpleTokenizer):
        raise ConfigError(f"model.name {cfg.name!r}: tokenizer {type(tokenizer).__name__} needs a download")
    return tokenizer
