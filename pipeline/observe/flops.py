"""FLOPs per training sample, the measured matmul peak, and the two utilisation figures built from them.

    flops = flops_per_sample(ModelConfig(name="ViT-B-32"), grad_checkpointing=True)  # forward / model / executed
    peak = measure_matmul_peak(torch.device("cuda"), MATMUL_DTYPE["amp_bf16"], 8192)
    figures = utilisation(flops, samples_per_s_per_gpu, peak)                      # {"mfu": ..., "hfu": ...}

One definition everywhere (the trainer's logged `mfu`, every row of `python -m pipeline bench gpu`):

  MFU = model FLOPs per sample x samples/s per GPU / peak, where model FLOPs = 3 x forward (the backward
        costs two forwards) and nothing else: no recomputation, no GradCache feature pass. Two runs that
        do the same useful work are compared on the same numerator, however they spend the GPU.
  HFU = executed FLOPs per sample x samples/s per GPU / peak, where executed FLOPs = model FLOPs + one
        forward for gradient checkpointing (every block is recomputed in backward) + one forward for
        GradCache's no-grad feature pass (accumulation > 1). HFU >= MFU; equal for a plain step.
  peak = the best FLOP/s of a size^3 matmul in the run's matmul dtype (bf16 under amp_bf16) on the same
        device, measured in the same process as the step it divides.

Forward FLOPs are counted from the model config, 2 per multiply-add, for every matmul of both towers:
patch embedding, qkv / output / MLP projections, QK^T and AV, the final projections. Norms, activations,
softmax and the contrastive logits (O(global batch) per sample) are not counted. The count matches
torch's FlopCounterMode on the real model and open_clip's published profile (tests/observe/test_flops.py).
Plain PyTorch: nothing here imports deepspeed, the trainer or the benchmarks.
"""

from __future__ import annotations

import logging
import math
import time

import torch

from pipeline.core.errors import ConfigError

log = logging.getLogger(__name__)

# the dtype the matmuls run in, per training precision (the names open_clip users type): the peak is
# measured in it. amp_bf16 / amp keep fp32 master weights and autocast the matmuls.
MATMUL_DTYPE = {"amp_bf16": torch.bfloat16, "amp": torch.float16, "fp32": torch.float32}


def transformer_flops(tokens: int, width: int, layers: int, mlp_ratio: float = 4.0) -> int:
    """Forward FLOPs of `layers` pre-norm blocks over `tokens` positions: the qkv, output and two MLP
    projections (2 x tokens x in x out each), and the two attention products QK^T and AV (2 x tokens^2 x
    width each, summed over heads). A causal mask is applied to a full product, so it is counted full."""
    hidden = int(width * mlp_ratio)
    projections = 2 * tokens * width * (3 * width + width + 2 * hidden)
    attention = 2 * 2 * tokens * tokens * width
    return layers * (projections + attention)


def tower_flops(model_cfg) -> dict[str, int]:
    """Forward FLOPs per sample of each tower of `model_cfg` (pipeline.model.config.ModelConfig)."""
    from pipeline.model.config import _audio_model_configs, _image_model_config

    if model_cfg.modality == "audio":
        spec = _audio_model_configs()[model_cfg.name]
        audio, text = spec["audio_cfg"], spec["text_cfg"]
        embed_dim = spec["embed_dim"]
        patches = (model_cfg.audio.n_mels // audio["patch_mels"]) * math.ceil(
            model_cfg.audio.num_frames / audio["patch_frames"])
        width = audio["width"]
        media = (2 * patches * audio["patch_mels"] * audio["patch_frames"] * width
                 + transformer_flops(patches, width, audio["layers"], audio.get("mlp_ratio", 4.0))
                 + 2 * width * embed_dim)  # the projection of the mean-pooled token
    else:
        spec = _image_model_config(model_cfg.name)
        vision, text = spec["vision_cfg"], spec["text_cfg"]
        embed_dim = spec["embed_dim"]
        unsupported = [key for key in ("timm_model_name", "attentional_pool") if vision.get(key)]
        if unsupported or not isinstance(vision.get("layers", 12), int):
            raise ConfigError(f"--model {model_cfg.name}: FLOPs are counted for plain ViT towers only "
                              f"(this one has {unsupported or 'a ResNet'})")
        size = vision.get("image_size", 224)
        height, width_px = (size, size) if isinstance(size, int) else size
        patch = vision.get("patch_size", 16)
        grid = (height // patch) * (width_px // patch)
        width = vision.get("width", 768)
        # patch dropout (a training forward) leaves the blocks the kept patches and the class token
        kept = max(1, int(grid * (1 - getattr(model_cfg, "patch_dropout", 0.0))))
        media = (2 * grid * 3 * patch * patch * width  # patch embedding: a stride-p convolution
                 + transformer_flops(kept + 1, width, vision.get("layers", 12), vision.get("mlp_ratio", 4.0))
                 + 2 * width * embed_dim)  # projection of the class token
    text_width = text.get("width", 512)
    text_flops = (transformer_flops(text.get("context_length", 77), text_width, text.get("layers", 12),
                                    text.get("mlp_ratio", 4.0))
                  + 2 * text_width * embed_dim)  # projection of the pooled (end-of-text) token
    return {"media": media, "text": text_flops}


def flops_per_sample(model_cfg, grad_checkpointing: bool = False, gradcache: bool = False) -> dict[str, int]:
    """`forward`: one forward of both towers; `model`: forward x 3 (MFU's numerator); `executed`: what the
    device runs (HFU's numerator), + one forward of recomputation with gradient checkpointing, + one for
    GradCache's no-grad feature pass."""
    forward = sum(tower_flops(model_cfg).values())
    passes = 3 + int(grad_checkpointing) + int(gradcache)
    return {"forward": forward, "model": 3 * forward, "executed": passes * forward}


def utilisation(flops: dict[str, int], samples_per_s_per_gpu: float, peak_flops: float) -> dict[str, float]:
    """{"mfu", "hfu"} of a run that trains `samples_per_s_per_gpu` with `flops` from `flops_per_sample`."""
    return {"mfu": flops["model"] * samples_per_s_per_gpu / peak_flops,
            "hfu": flops["executed"] * samples_per_s_per_gpu / peak_flops}


def synchronize(device: torch.device | str | None) -> None:
    """Wait for the work queued on a CUDA device; on the CPU (or with no device) there is nothing to wait for."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 5) -> float:
    """Best FLOP/s of size^3 matmuls in `dtype` on `device` (the best of several: contention only slows it)."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    torch.matmul(a, b)  # first call: kernel selection, allocator
    best = math.inf
    inner = 10 if device.type == "cuda" else 1
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(inner):
            torch.matmul(a, b)
        synchronize(device)
        best = min(best, (time.perf_counter() - start) / inner)
    return 2 * size**3 / best


PEAK_MATMUL_SIZE = 8192  # large enough to reach a GPU's dense peak, about a second to measure


def model_flops_and_peak(model_cfg, device: torch.device, precision: str) -> tuple[float, float] | None:
    """(model FLOPs per sample, measured matmul peak FLOP/s of this device in the run's matmul dtype) for the
    trainer's logged MFU, or None where there is none: on CPU, or for towers whose FLOPs are not counted."""
    if device.type != "cuda":
        return None
    try:
        flops = flops_per_sample(model_cfg)["model"]
    except (ConfigError, KeyError) as error:
        log.warning("no MFU estimate: %s", error)
        return None
    return float(flops), measure_matmul_peak(device, MATMUL_DTYPE[precision], PEAK_MATMUL_SIZE)
