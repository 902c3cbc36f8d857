"""The `model` section of a run config: `ModelConfig`, checked against the model configs it names.

Image-text models are open_clip's (any open_clip config name, or ours in pipeline/model/model_configs/,
registered with open_clip by `register_open_clip_configs`); audio-text models are our JSON files with an
`audio_cfg`, which open_clip does not know.
"""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import open_clip

from pipeline.core.errors import ConfigError
from pipeline.media.audio import AudioConfig

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
    """Recompute every transformer block in the backward pass (reentrant checkpointing, ZeRO-3 safe).
    Applied by the trainer (pipeline.parallel.checkpointing), not by the model."""
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
            self._validate_audio_name()
        else:
            self._validate_image_name()
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

    def _validate_audio_name(self) -> None:
        known = _audio_model_configs()
        if self.name not in known:
            raise ConfigError(
                f"model.name {self.name!r} is not an audio model; audio models: {sorted(known)} "
                f"(JSON files with audio_cfg in {MODEL_CONFIG_DIR})"
            )
        _validate_audio_tower(known[self.name]["audio_cfg"], self.audio, self.name)

    def _validate_image_name(self) -> None:
        model_cfg = _image_model_config(self.name)
        if model_cfg is None:
            hint = " (an audio model: set model.modality=audio)" if self.name in _audio_model_configs() else ""
            if not hint:  # a typo or another case: the nearest known name, e.g. 'vit-b-33' -> 'ViT-B-32'
                names = {name.lower(): name for name in open_clip.list_models()}
                close = difflib.get_close_matches(self.name.lower(), names, n=1)
                hint = f" (did you mean '{names[close[0]]}'?)" if close else ""
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
