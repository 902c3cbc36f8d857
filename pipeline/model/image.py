"""Image-text towers: open_clip's CLIP behind the `Towers` interface, and the image transform it is fed.

Any open_clip config name, or ours in pipeline/model/model_configs/; the weights export to a state dict
that `open_clip.create_model_and_transforms` loads. The transform is the PIL part of open_clip's own, and
the float part (to [0, 1], mean/std) runs on the device (`ImageTextTowers.normalise_pixels`), bit-identical.
"""

from __future__ import annotations

import logging

import numpy as np
import open_clip
import torch
from open_clip.transform import MaybeConvertMode, PreprocessCfg, _convert_to_rgb, image_transform_v2
from torch import nn
from torchvision.transforms import Normalize, ToTensor

from pipeline.core.errors import ConfigError
from pipeline.model.config import ModelConfig, _image_model_config, register_open_clip_configs
from pipeline.model.patch_dropout import PatchDropout
from pipeline.model.towers import Towers


class ImageTextTowers(Towers):
    """open_clip's CLIP (`clip`): both towers and the temperature in one module, loaded from `cfg.pretrained`
    (an open_clip state dict) by open_clip itself; FLIP's patch dropout is ours (`PatchDropout`)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
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
        self.embed_dim = _image_model_config(cfg.name)["embed_dim"]
        if cfg.patch_dropout:
            self.clip.visual.patch_dropout = PatchDropout(cfg.patch_dropout)
        self._pixel_statistics: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def parts(self) -> dict[str, nn.Module]:
        return {"clip": self.clip}

    def temperature_owner(self) -> nn.Module:
        return self.clip

    def normalise_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 images [B, 3, H, W] (the loader's) -> open_clip's input: /255, minus mean, over std, in
        the vision tower's dtype. The same float32 operations as ToTensor + Normalize, so the result is
        bit-identical to open_clip's preprocessing before the cast."""
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

    def encode_media(self, media: torch.Tensor) -> torch.Tensor:
        # through open_clip's forward, not encode_image: ZeRO-3 gathers a module's own partitioned
        # parameters (text_projection, ...) only in a forward hook of that module
        return self.clip(image=media)["image_features"]

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.clip(text=tokens)["text_features"]

    def media_parameters(self) -> list[nn.Parameter]:
        return list(self.clip.visual.parameters())

    def text_parameters(self) -> list[nn.Parameter]:
        owners = [self.clip.token_embedding, self.clip.positional_embedding, self.clip.transformer,
                  self.clip.ln_final, self.clip.text_projection]
        return [p for owner in owners if owner is not None
                for p in ([owner] if isinstance(owner, nn.Parameter) else owner.parameters())]

    def lock_media(self) -> None:
        cfg = self.cfg
        try:
            self.clip.lock_image_tower(unlocked_groups=cfg.lock_image_unlocked_groups,
                                       freeze_bn_stats=cfg.lock_image_freeze_bn_stats)
        except AssertionError as error:  # open_clip's ResNet and timm towers lock only whole
            raise ConfigError(f"model.lock_image_unlocked_groups={cfg.lock_image_unlocked_groups}: "
                              f"{cfg.name}'s image tower: {error}") from None

    def lock_text(self) -> None:
        self.clip.lock_text_tower(unlocked_layers=self.cfg.lock_text_unlocked_layers)

    def open_clip_state_dict(self) -> dict[str, torch.Tensor]:
        state = {k: v.detach().clone() for k, v in self.clip.state_dict().items()}
        state["logit_scale"] = state["logit_scale"].reshape(())
        if "logit_bias" in state:
            if "init_logit_bias" in _image_model_config(self.cfg.name):
                state["logit_bias"] = state["logit_bias"].reshape(())
            else:
                del state["logit_bias"]
        return state

    @staticmethod
    def media_transform(cfg: ModelConfig, is_train: bool) -> ImagePixelTransform:
        return image_pixel_transform(image_preprocess(cfg), is_train)

    @staticmethod
    def tokenizer(cfg: ModelConfig):
        register_open_clip_configs()
        return open_clip.get_tokenizer(cfg.name)

    @staticmethod
    def image_size(cfg: ModelConfig) -> int:
        size = _image_model_config(cfg.name)["vision_cfg"]["image_size"]
        return max(size) if isinstance(size, (list, tuple)) else int(size)


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


# ---------------------------------------------------------------- the image transform


def image_preprocess(cfg: ModelConfig) -> PreprocessCfg:
    """open_clip's preprocessing settings for an image model: size, mean, std, interpolation, resize mode."""
    model_cfg = _image_model_config(cfg.name)
    return PreprocessCfg(**{**model_cfg.get("preprocess_cfg", {}), "size": model_cfg["vision_cfg"]["image_size"]})


def image_pixel_transform(preprocess: PreprocessCfg, is_train: bool) -> ImagePixelTransform:
    """open_clip's `image_transform_v2(preprocess, is_train)` without its ToTensor and Normalize steps."""
    return ImagePixelTransform(image_transform_v2(preprocess, is_train=is_train), preprocess.mode)


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
