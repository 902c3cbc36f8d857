"""Training-step throughput: samples/s per GPU, step-time breakdown, peak memory and MFU, vs open_clip's trainer.

    python -m pipeline bench gpu                                   # (make bench-gpu) ViT-B-32, 224 px, bf16, batch 256
    python -m pipeline bench gpu --batch-size 512 --grad-checkpointing --json runs/bench-gpu.json
    python -m pipeline bench gpu --data 'shards/laion/{00000..00099}.tar' --workers 8   # through pipeline.data
    python -m pipeline bench gpu --find-max-batch --skip-open-clip  # largest local / GradCache contrastive batch
    deepspeed --num_gpus 8 --no_local_rank --module pipeline bench gpu --skip-open-clip  # per-GPU figures, 8 ranks
    python -m pipeline bench gpu --model tiny-clip --precision fp32 --batch-size 8 --steps 5 --warmup 2  # CPU, tiny

One DeepSpeed engine built exactly as training builds it (pipeline.distributed), stepped by training's own
`pipeline.train.backward_step` (plain step, or GradCache with --accum-steps > 1), on device-resident synthetic
batches (the step alone) or on real shards read by `pipeline.data.build_loader` (the loader included).

Three measurements, kept apart because measuring perturbs what is measured:
  throughput  `--steps` steps after `--warmup`, no host synchronisation inside a step (one at each end);
  breakdown   `--breakdown-steps` more steps with every phase timed: CUDA events on GPU (one synchronisation at
              the end of each step), perf_counter around synchronised phases elsewhere. Phases: data wait,
              forward, all-gather, loss, backward, optimizer step; the rest of the step is `other`;
  peak        a `--peak-matmul-size`^3 matmul in the run's dtype, timed in the same process: the denominator
              of MFU (on CPU it is the CPU's matmul rate, so the arithmetic is exercised, not the GPU's).
MFU = model FLOPs per sample (counted from the model config: every matmul of both towers, forward x3 for
forward + backward, + one forward for recomputation under gradient checkpointing, + one for GradCache's
feature pass) x samples/s per GPU / peak. The contrastive logits (O(batch) per sample) are not counted.

open_clip's trainer (`open_clip_train.main --dataset-type synthetic`, same model, batch, precision, workers)
runs afterwards as a subprocess in the peer venv that `bench data` builds (webdataset 0.2.86 + pandas), and its
logged per-window batch times give its samples/s for the side-by-side ratio; --skip-open-clip leaves it out.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.config import ConfigError

# open_clip is run as its users run it: fp32 master weights under autocast
OPEN_CLIP_PRECISION = {"bf16": "amp_bf16", "fp32": "fp32"}
OPEN_CLIP_LOG_LINE = re.compile(r"Batch \(t\): (?P<batch_time>[0-9.]+), [0-9.e+]+/s, [0-9.e+]+/s/gpu")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="ViT-B-32", help="model name (pipeline.models.ModelConfig.name)")
    parser.add_argument("--precision", default="bf16", choices=sorted(OPEN_CLIP_PRECISION),
                        help="training precision (DeepSpeed bf16: bf16 weights, fp32 master copy)")
    parser.add_argument("--batch-size", type=int, default=256, help="local micro-batch per GPU")
    parser.add_argument("--accum-steps", type=int, default=1,
                        help="GradCache micro-batches per step: the contrastive batch is batch x accum x world")
    parser.add_argument("--loss-chunk-size", type=int, default=0,
                        help="loss.chunk_size: compute the contrastive loss this many rows at a time (0: all at once); "
                             "e.g. 4096 for contrastive batches of 65,536")
    parser.add_argument("--steps", type=int, default=50, help="timed steps (throughput)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (allocator, cuDNN, compile)")
    parser.add_argument("--breakdown-steps", type=int, default=5, help="instrumented steps for the breakdown")
    parser.add_argument("--zero-stage", type=int, default=0, choices=(0, 1, 2, 3))
    parser.add_argument("--grad-checkpointing", action="store_true", help="recompute tower blocks in backward")
    parser.add_argument("--data", default="", help="shard URLs read through pipeline.data (default: synthetic)")
    parser.add_argument("--workers", type=int, default=8, help="loader workers (ours with --data, and open_clip's)")
    parser.add_argument("--fused-adamw", default="auto", choices=("auto", "on", "off"),
                        help="torch's fused AdamW kernel, through optim.fused (auto/on: on with CUDA; off: never)")
    parser.add_argument("--compile", action="store_true", help="torch.compile both towers")
    parser.add_argument("--channels-last", action="store_true",
                        help="images in channels_last (only the ViT patch embedding is a convolution)")
    parser.add_argument("--peak-matmul-size", type=int, default=0,
                        help="side of the matmul that measures peak FLOP/s (default: 8192 on GPU, 1024 on CPU)")
    parser.add_argument("--find-max-batch", action="store_true",
                        help="search the largest local batch (with and without grad checkpointing) and the largest "
                        "GradCache contrastive batch that fit")
    parser.add_argument("--batch-limit", type=int, default=0,
                        help="upper end of the batch searches (default: 131072 on GPU, 16 on CPU, where running "
                        "out of memory kills the process instead of raising)")
    parser.add_argument("--contrastive-limit", type=int, default=0,
                        help="upper end of the GradCache contrastive-batch search (default: 262144 on GPU, 32 on CPU; "
                        "the aim is 65536)")
    parser.add_argument("--skip-open-clip", action="store_true", help="do not run open_clip's trainer")
    parser.add_argument("--open-clip-venv", default=".venv-openclip",
                        help="venv for open_clip's trainer (built by `bench data` if missing)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="", help="also write the results to this JSON file")


# -- model FLOPs, counted from the config ----------------------------------------------------------
def transformer_flops(tokens: int, width: int, layers: int, mlp_ratio: float = 4.0) -> int:
    """Forward FLOPs of `layers` pre-norm blocks over `tokens` positions: the qkv, output and two MLP
    projections (2 x tokens x in x out each), and the two attention products QK^T and AV (2 x tokens^2 x
    width each, summed over heads). A causal mask is applied to a full product, so it is counted full."""
    hidden = int(width * mlp_ratio)
    projections = 2 * tokens * width * (3 * width + width + 2 * hidden)
    attention = 2 * 2 * tokens * tokens * width
    return layers * (projections + attention)


def tower_flops(model_cfg) -> dict[str, int]:
    """Forward FLOPs per sample of each tower of `model_cfg` (pipeline.models.ModelConfig)."""
    from pipeline.models import _audio_model_configs, _image_model_config

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
        media = (2 * grid * 3 * patch * patch * width  # patch embedding: a stride-p convolution
                 + transformer_flops(grid + 1, width, vision.get("layers", 12), vision.get("mlp_ratio", 4.0))
                 + 2 * width * embed_dim)  # projection of the class token
    text_width = text.get("width", 512)
    text_flops = (transformer_flops(text.get("context_length", 77), text_width, text.get("layers", 12),
                                    text.get("mlp_ratio", 4.0))
                  + 2 * text_width * embed_dim)  # projection of the pooled (end-of-text) token
    return {"media": media, "text": text_flops}


def flops_per_sample(model_cfg, grad_checkpointing: bool = False, gradcache: bool = False) -> dict[str, int]:
    """`model`: forward x 3 (forward + backward, which costs two forwards); `executed`: what the GPU runs,
    + one forward of recomputation with gradient checkpointing, + GradCache's no-grad feature pass."""
    forward = sum(tower_flops(model_cfg).values())
    passes = 3 + int(grad_checkpointing) + int(gradcache)
    return {"forward": forward, "model": 3 * forward, "executed": passes * forward}


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 5) -> float:
    """Best FLOP/s of size^3 matmuls in `dtype` on `device` (the best of several: contention only slows it)."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    torch.matmul(a, b)  # first call: kernel selection, allocator
    best = math.inf
    inner = 10 if device.type == "cuda" else 1
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        for _ in range(inner):
            torch.matmul(a, b)
        _synchronize(device)
        best = min(best, (time.perf_counter() - start) / inner)
    return 2 * size**3 / best


# -- the batch-size search ------------------------------------------------------------------------
def largest_fitting(fits: Callable[[int], bool], start: int, limit: int) -> int:
    """The largest n in [start, limit] with fits(n), assuming fits is monotone (true up to some n, false after):
    double from `start` until a size fails or `limit` is reached, then bisect between the last success and
    the first failure. Returns 0 when not even `start` fits."""
    if start < 1 or limit < start:
        raise ValueError(f"need 1 <= start <= limit, got start={start}, limit={limit}")
    if not fits(start):
        return 0
    good = start
    bad = None
    while bad is None and good < limit:
        candidate = min(good * 2, limit)
        if fits(candidate):
            good = candidate
        else:
            bad = candidate
    if bad is None:
        return good
    while bad - good > 1:
        middle = (good + bad) // 2
        if fits(middle):
            good = middle
        else:
            bad = middle
    return good


# -- phase timing ----------------------------------------------------------------------------------
def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PhaseClock:
    """Exclusive time per named phase: a phase opened inside another is subtracted from the outer one.

    On CUDA, phases are bracketed by events on the current stream, read after one synchronisation in
    `finish_step`; elsewhere by perf_counter around synchronised boundaries.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.use_events = device.type == "cuda"
        self.totals: dict[str, float] = {}
        self._stack: list[str] = []
        self._pending: list[tuple[str, str | None, Any, Any]] = []

    def _add(self, name: str, parent: str | None, seconds: float) -> None:
        self.totals[name] = self.totals.get(name, 0.0) + seconds
        if parent is not None:
            self.totals[parent] = self.totals.get(parent, 0.0) - seconds

    @contextlib.contextmanager
    def phase(self, name: str, host: bool = False):
        """`host`: a phase of host work (waiting for data) timed with perf_counter even on CUDA."""
        parent = self._stack[-1] if self._stack else None
        self._stack.append(name)
        try:
            if self.use_events and not host:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                yield
                end.record()
                self._pending.append((name, parent, start, end))
            else:
                _synchronize(self.device)
                began = time.perf_counter()
                yield
                _synchronize(self.device)
                self._add(name, parent, time.perf_counter() - began)
        finally:
            self._stack.pop()

    def finish_step(self) -> None:
        _synchronize(self.device)
        for name, parent, start, end in self._pending:
            self._add(name, parent, start.elapsed_time(end) / 1000.0)
        self._pending.clear()


class _PhaseTimedEngine:
    """The DeepSpeed engine as `backward_step` uses it, with each call timed as its phase."""

    def __init__(self, engine, clock: PhaseClock):
        self._engine, self._clock = engine, clock

    def __call__(self, *args, **kwargs):
        with self._clock.phase("forward"):
            return self._engine(*args, **kwargs)

    def backward(self, loss, **kwargs):
        with self._clock.phase("backward"):
            return self._engine.backward(loss, **kwargs)

    def step(self):
        with self._clock.phase("optimizer_step"):
            return self._engine.step()

    def __getattr__(self, name):
        return getattr(self._engine, name)


class _PhaseTimedLoss:
    """The loss with its feature all-gather timed apart (the gather's backward all-reduce lands in backward)."""

    def __init__(self, loss_fn, clock: PhaseClock):
        self._loss_fn, self._clock = loss_fn, clock
        gather = loss_fn.gather

        def timed_gather(local):
            with clock.phase("all_gather"):
                return gather(local)

        loss_fn.gather = timed_gather  # an instance attribute shadows the method for this loss object only

    def __call__(self, outputs):
        with self._clock.phase("loss"):
            return self._loss_fn(outputs)


# -- set-up ----------------------------------------------------------------------------------------
@dataclass
class BenchRun:
    """What one benchmark process holds: the engine and everything a step needs."""

    engine: Any
    loss_fn: Any
    model_cfg: Any
    device: torch.device
    media_dtype: torch.dtype
    rank: int
    world_size: int
    optimizer_kind: str


def _fused_adamw(choice: str, device: torch.device) -> bool:
    return choice == "on" or (choice == "auto" and device.type == "cuda")


def build_run(args) -> BenchRun:
    """Process group, model, optimizer and engine, the way `pipeline.train.train` builds them."""
    from pipeline import distributed
    from pipeline.config import OptimConfig
    from pipeline.losses import LossConfig, build_loss
    from pipeline.models import ModelConfig, build_model
    from pipeline.train import build_optimizer

    modality = "audio" if args.model in ("tiny-clap", "clap-base") else "image"
    model_cfg = ModelConfig(name=args.model, modality=modality, grad_checkpointing=args.grad_checkpointing)
    dist = distributed.init_distributed()
    torch.manual_seed(args.seed)
    model = build_model(model_cfg)
    if args.compile:
        tower = model.clip.visual if modality == "image" else model.audio
        text = model.clip.transformer if modality == "image" else model.text
        tower.compile()
        text.compile()
    optim_cfg = OptimConfig(warmup_steps=1)
    fused = _fused_adamw(args.fused_adamw, dist.device) and dist.device.type == "cuda"
    optimizer = build_optimizer(model, dataclasses.replace(optim_cfg, fused=fused), dist.device)
    kind = "AdamW (fused)" if fused else "AdamW"
    ds_config = distributed.deepspeed_config(
        micro_batch_size=args.batch_size, accum_steps=args.accum_steps, world_size=dist.world_size,
        zero_stage=args.zero_stage, precision=args.precision, grad_clip=optim_cfg.grad_clip, log_every=1000,
    )
    engine = distributed.build_engine(model, optimizer, None, ds_config)
    engine.train()
    return BenchRun(engine=engine, loss_fn=build_loss(LossConfig(chunk_size=args.loss_chunk_size), dist.rank, dist.world_size), model_cfg=model_cfg,
                    device=dist.device, media_dtype=distributed.model_dtype(args.precision), rank=dist.rank,
                    world_size=dist.world_size, optimizer_kind=kind)


def _media_shape(model_cfg) -> tuple[int, ...]:
    from pipeline.models import image_size

    if model_cfg.modality == "audio":
        return (model_cfg.audio.n_mels, model_cfg.audio.num_frames)
    side = image_size(model_cfg)
    return (3, side, side)


def _context_length(model_cfg) -> int:
    from pipeline.models import get_tokenizer

    return get_tokenizer(model_cfg).context_length


def synthetic_micro_batches(run: BenchRun, batch_size: int, count: int, channels_last: bool = False) -> list:
    """`count` distinct random micro-batches, already on the device in the model's dtype: the step alone."""
    from pipeline.data import Batch

    generator = torch.Generator().manual_seed(1000 + run.rank)
    context = _context_length(run.model_cfg)
    batches = []
    for _ in range(count):
        media = torch.randn(batch_size, *_media_shape(run.model_cfg), generator=generator)
        media = media.to(device=run.device, dtype=run.media_dtype)
        if channels_last and media.dim() == 4:
            media = media.contiguous(memory_format=torch.channels_last)
        tokens = torch.randint(1, 49407, (batch_size, context), generator=generator).to(run.device)
        batches.append(Batch(media, tokens, [""] * batch_size, torch.full((batch_size,), -1, device=run.device)))
    return batches


def _batch_source(run: BenchRun, args) -> Iterator[list]:
    """Step after step, the `accum_steps` micro-batches of one step, on the device."""
    if not args.data:
        batches = synthetic_micro_batches(run, args.batch_size, args.accum_steps, args.channels_last)
        while True:
            yield batches
    from pipeline.data import Batch, DataConfig, build_loader
    from pipeline.models import get_tokenizer, image_size, media_to_device, media_transform

    data_cfg = DataConfig(train_urls=args.data, modality=run.model_cfg.modality, batch_size=args.batch_size,
                          workers=args.workers)
    loader = build_loader(data_cfg, args.data, rank=run.rank, world_size=run.world_size, seed=args.seed,
                          media_transform=media_transform(run.model_cfg, True),
                          tokenizer=get_tokenizer(run.model_cfg), image_size=image_size(run.model_cfg))

    def forever():
        while True:  # the loader moves itself to the next epoch
            yield from loader

    stream = forever()
    while True:
        step = []
        for _ in range(args.accum_steps):
            batch = next(stream)
            media = media_to_device(batch.media, run.device, run.media_dtype)
            if args.channels_last and media.dim() == 4:
                media = media.contiguous(memory_format=torch.channels_last)
            step.append(Batch(media, batch.tokens.to(run.device, non_blocking=True), batch.keys, batch.labels))
        yield step


def train_step(run: BenchRun, micro_batches: list, engine=None, loss_fn=None) -> torch.Tensor:
    """One optimizer step through training's own code path; returns the loss tensor (not synchronised)."""
    from pipeline.train import backward_step

    engine = engine or run.engine
    loss, _ = backward_step(engine, loss_fn or run.loss_fn, micro_batches, run.device, run.media_dtype)
    engine.step()
    return loss


# -- measurements ----------------------------------------------------------------------------------
def measure_throughput(run: BenchRun, source: Iterator[list], steps: int) -> dict[str, float]:
    """Mean step time over `steps` steps with no synchronisation inside them."""
    _synchronize(run.device)
    start = time.perf_counter()
    for _ in range(steps):
        loss = train_step(run, next(source))
    _synchronize(run.device)
    seconds = time.perf_counter() - start
    return {"step_s": seconds / steps, "final_loss": float(loss)}


def measure_breakdown(run: BenchRun, source: Iterator[list], steps: int) -> dict[str, float]:
    """Mean seconds per step of each phase, and of the whole (instrumented) step."""
    clock = PhaseClock(run.device)
    engine, loss_fn = _PhaseTimedEngine(run.engine, clock), _PhaseTimedLoss(run.loss_fn, clock)
    step_seconds = 0.0
    for _ in range(steps):
        _synchronize(run.device)
        began = time.perf_counter()
        with clock.phase("data_wait", host=True):
            micro_batches = next(source)
        train_step(run, micro_batches, engine=engine, loss_fn=loss_fn)
        clock.finish_step()
        step_seconds += time.perf_counter() - began
    phases = {name: clock.totals.get(name, 0.0) / steps
              for name in ("data_wait", "forward", "all_gather", "loss", "backward", "optimizer_step")}
    phases["step"] = step_seconds / steps
    phases["other"] = phases["step"] - sum(v for k, v in phases.items() if k != "step")
    return phases


def _is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def _release_after_failure(run: BenchRun) -> None:
    run.engine.zero_grad()
    gc.collect()
    if run.device.type == "cuda":
        torch.cuda.empty_cache()


def step_fits(run: BenchRun, batch_size: int, accum_steps: int = 1) -> bool:
    """Whether one full step (forward, backward, optimizer) at this micro-batch and accumulation runs."""
    run.engine.set_train_micro_batch_size(batch_size)
    run.engine.set_train_batch_size(batch_size * accum_steps * run.world_size)
    micro_steps = run.engine.micro_steps
    try:
        # one micro-batch repeated: the same memory and work as distinct ones, without holding accum copies
        micro_batches = synthetic_micro_batches(run, batch_size, 1) * accum_steps
        train_step(run, micro_batches)
        _synchronize(run.device)
        return True
    except RuntimeError as error:
        if not _is_out_of_memory(error):
            raise
        # a step cut short leaves DeepSpeed's micro-step count mid-accumulation: realign the next boundary
        run.engine.micro_steps = micro_steps
        _release_after_failure(run)
        return False


def find_max_batches(run: BenchRun, limit: int, contrastive_limit: int, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Largest local batch without and with grad checkpointing, then the largest GradCache contrastive
    batch on one rank (micro-batch: the largest power of two that fit with checkpointing)."""
    from pipeline.models import ContrastiveModel

    model: ContrastiveModel = run.engine.module
    configured = (run.engine.train_micro_batch_size_per_gpu(), run.engine.gradient_accumulation_steps())
    checkpointing_was = model.grad_checkpointing
    results: dict[str, Any] = {"limit": limit, "contrastive_limit": contrastive_limit}
    for checkpointing in (False, True):
        model.set_grad_checkpointing(checkpointing)

        def fits(batch, checkpointing=checkpointing):
            ok = step_fits(run, batch)
            progress(f"  local batch {batch:>7} grad checkpointing {'on ' if checkpointing else 'off'}: "
                     f"{'fits' if ok else 'out of memory'}")
            return ok

        key = "max_local_batch_checkpointing" if checkpointing else "max_local_batch"
        results[key] = largest_fitting(fits, 1, limit)
    micro = 2 ** int(math.log2(results["max_local_batch_checkpointing"])) if results["max_local_batch_checkpointing"] else 0
    results["gradcache_micro_batch"] = micro
    if micro:
        def fits_accum(accum):
            ok = step_fits(run, micro, accum)
            progress(f"  GradCache {micro} x {accum} = {micro * accum} contrastive batch: "
                     f"{'fits' if ok else 'out of memory'}")
            return ok

        accum = largest_fitting(fits_accum, 1, max(1, contrastive_limit // (micro * run.world_size)))
        results["gradcache_accum_steps"] = accum
        results["max_contrastive_batch_gradcache"] = micro * accum * run.world_size
    model.set_grad_checkpointing(checkpointing_was)
    run.engine.set_train_micro_batch_size(configured[0])
    run.engine.set_train_batch_size(configured[0] * configured[1] * run.world_size)
    return results


def peak_memory_gb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def host_peak_rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


# -- open_clip's trainer ---------------------------------------------------------------------------
OPEN_CLIP_SCRIPT = r"""
import json, sys
import open_clip, torch
open_clip.add_model_config(sys.argv[1])  # our configs (tiny-clip) too; open_clip's own names are unaffected
from open_clip_train.main import main
main(sys.argv[2:])
peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
print("BENCH_RESULT " + json.dumps({"peak_memory_gb": peak}), flush=True)
"""


def open_clip_command(args, python: str, logs: str) -> list[str]:
    """open_clip_train.main on its synthetic data set: same model, batch, precision, workers, checkpointing.
    It logs a window-average batch time every `log_every` steps; the first two windows (step 1, then
    warmup) are dropped."""
    from pipeline.models import MODEL_CONFIG_DIR

    log_every = max(1, args.warmup)
    batches = 1 + log_every + math.ceil(args.steps / log_every) * log_every
    command = [
        python, "-c", OPEN_CLIP_SCRIPT, str(MODEL_CONFIG_DIR),
        "--dataset-type", "synthetic", "--train-num-samples", str(batches * args.batch_size * args.accum_steps),
        "--model", args.model, "--batch-size", str(args.batch_size), "--accum-freq", str(args.accum_steps),
        "--precision", OPEN_CLIP_PRECISION[args.precision], "--workers", str(args.workers),
        "--epochs", "1", "--lr", "5e-4", "--warmup", "1", "--wd", "0.1", "--seed", str(args.seed),
        "--log-every-n-steps", str(log_every), "--save-frequency", "0", "--logs", logs, "--name", "bench",
        "--local-loss", "--gather-with-grad",
    ]
    if args.grad_checkpointing:
        command.append("--grad-checkpointing")
    if args.compile:
        command.append("--torchcompile")
    return command


def parse_open_clip_log(text: str, samples_per_step: int) -> dict[str, Any]:
    """Samples/s from open_clip's `Batch (t): <window mean>` log lines, first two windows dropped."""
    windows = [float(match["batch_time"]) for match in OPEN_CLIP_LOG_LINE.finditer(text)]
    measured = [t for t in windows[2:] if t > 0]
    if not measured:
        raise RuntimeError(f"open_clip's trainer logged {len(windows)} timing windows, need 3 or more:\n{text[-3000:]}")
    step_s = statistics.fmean(measured)
    return {"step_s": step_s, "samples_per_s_per_gpu": samples_per_step / step_s, "windows": len(measured)}


def run_open_clip(args) -> dict[str, Any]:
    from pipeline.bench_data import ensure_open_clip_venv

    python = ensure_open_clip_venv(Path(args.open_clip_venv))
    with tempfile.TemporaryDirectory() as logs:
        command = open_clip_command(args, str(python), logs)
        # its own webdataset; our package must not shadow anything on its path
        env = {**os.environ, "PYTHONPATH": ""}
        result = subprocess.run(command, capture_output=True, text=True, timeout=3600, env=env)
        console = result.stdout + result.stderr
        # its logger writes every line both to the console and to out.log: read one of them
        log_file = Path(logs, "bench", "out.log")
        log_text = log_file.read_text() if log_file.is_file() else console
    if result.returncode != 0:
        raise RuntimeError(f"open_clip's trainer failed (exit {result.returncode}):\n{console[-4000:]}")
    figures = parse_open_clip_log(log_text, args.batch_size * args.accum_steps)
    for line in console.splitlines():
        if line.startswith("BENCH_RESULT "):
            figures.update(json.loads(line.removeprefix("BENCH_RESULT ")))
    figures["precision"] = OPEN_CLIP_PRECISION[args.precision]
    return figures


# -- the command -----------------------------------------------------------------------------------
def _validate(args) -> None:
    for flag in ("batch_size", "accum_steps", "steps", "breakdown_steps"):
        if getattr(args, flag) <= 0:
            raise ConfigError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    for flag in ("warmup", "workers", "peak_matmul_size", "batch_limit", "contrastive_limit"):
        if getattr(args, flag) < 0:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")


def format_table(result: dict[str, Any]) -> str:
    ours, peer = result["ours"], result.get("open_clip")
    lines = [f"{result['model']} {result['precision']}, local batch {result['batch_size']} x accum "
             f"{result['accum_steps']} x {result['world_size']} ranks, {result['device']}, data: {result['data']}",
             f"{'':28}{'ours':>14}" + (f"{'open_clip':>14}{'ratio':>9}" if peer else "")]

    def row(label, mine, theirs=None, fmt="{:.1f}"):
        cell = fmt.format(mine) if mine is not None else "-"
        text = f"{label:28}{cell:>14}"
        if peer:
            other = fmt.format(theirs) if theirs is not None else "-"
            ratio = f"{mine / theirs:.2f}x" if mine and theirs else "-"
            text += f"{other:>14}{ratio:>9}"
        return text

    lines.append(row("samples/s per GPU", ours["samples_per_s_per_gpu"], peer and peer["samples_per_s_per_gpu"]))
    lines.append(row("step time (ms)", ours["step_s"] * 1e3, peer and peer["step_s"] * 1e3))
    lines.append(row("MFU (%)", ours["mfu"] * 100, peer and peer.get("mfu", 0) * 100, "{:.2f}"))
    lines.append(row("peak GPU memory (GiB)", ours["peak_memory_gb"], peer and peer.get("peak_memory_gb"), "{:.2f}"))
    flops = result["flops_per_sample"]
    lines.append(f"model FLOPs/sample {flops['model'] / 1e9:.3f} G (executed {flops['executed'] / 1e9:.3f} G); "
                 f"measured peak {result['peak_flops'] / 1e12:.3f} TFLOP/s ({result['peak_matmul']})")
    breakdown = ours["breakdown"]
    lines.append(f"breakdown over {result['breakdown_steps']} instrumented steps (ms; step "
                 f"{breakdown['step'] * 1e3:.2f}, slower than un-instrumented: it synchronises):")
    lines.append("  " + "  ".join(f"{name} {seconds * 1e3:.2f}" for name, seconds in breakdown.items()
                                  if name != "step"))
    if "max_batch" in result:
        found = result["max_batch"]
        lines.append(f"largest local batch: {found['max_local_batch']} (checkpointing: "
                     f"{found['max_local_batch_checkpointing']}); GradCache contrastive batch: "
                     f"{found.get('max_contrastive_batch_gradcache', 0)} (micro {found['gradcache_micro_batch']}); "
                     f"search limits {found['limit']} / {found['contrastive_limit']}")
    return "\n".join(lines)


def run(args) -> int:
    _validate(args)
    from tqdm import tqdm

    from pipeline import distributed

    bench = build_run(args)
    main = bench.rank == 0
    on_gpu = bench.device.type == "cuda"
    flops = flops_per_sample(bench.model_cfg, args.grad_checkpointing, args.accum_steps > 1)
    size = args.peak_matmul_size or (8192 if on_gpu else 1024)
    peak = measure_matmul_peak(bench.device, bench.media_dtype, size)

    source = _batch_source(bench, args)
    for _ in tqdm(range(args.warmup), desc="warmup steps", disable=not main):
        train_step(bench, next(source))
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(bench.device)
    timed = measure_throughput(bench, source, args.steps)
    memory = peak_memory_gb(bench.device)
    breakdown = measure_breakdown(bench, source, args.breakdown_steps)
    samples_per_step = args.batch_size * args.accum_steps
    ours = {
        "step_s": timed["step_s"], "samples_per_s_per_gpu": samples_per_step / timed["step_s"],
        "final_loss": timed["final_loss"], "peak_memory_gb": memory, "host_peak_rss_gb": host_peak_rss_gb(),
        "breakdown": breakdown, "optimizer": bench.optimizer_kind,
    }
    ours["mfu"] = flops["executed"] * ours["samples_per_s_per_gpu"] / peak
    ours["mfu_model_flops_3x"] = flops["model"] * ours["samples_per_s_per_gpu"] / peak
    result: dict[str, Any] = {
        "model": args.model, "precision": args.precision, "batch_size": args.batch_size,
        "accum_steps": args.accum_steps, "contrastive_batch": samples_per_step * bench.world_size,
        "world_size": bench.world_size, "zero_stage": args.zero_stage,
        "grad_checkpointing": args.grad_checkpointing, "compile": args.compile, "channels_last": args.channels_last,
        "device": torch.cuda.get_device_name(bench.device) if on_gpu else f"CPU ({torch.get_num_threads()} threads)",
        "data": args.data or "synthetic (device-resident)", "steps": args.steps, "warmup": args.warmup,
        "breakdown_steps": args.breakdown_steps, "flops_per_sample": flops, "peak_flops": peak,
        "peak_matmul": f"{size}^3 {str(bench.media_dtype).removeprefix('torch.')}", "ours": ours,
    }
    if args.find_max_batch:
        limit = args.batch_limit or (131072 if on_gpu else 16)
        contrastive_limit = args.contrastive_limit or (262144 if on_gpu else 32)
        if main:
            print(f"searching the largest batches (local limit {limit}, contrastive limit {contrastive_limit})",
                  flush=True)
        result["max_batch"] = find_max_batches(bench, limit, contrastive_limit,
                                               progress=print if main else (lambda _: None))
    distributed.barrier()
    if main and not args.skip_open_clip:
        if bench.world_size > 1:
            print("open_clip's trainer is compared on one GPU: run this bench with one rank for the ratio")
        else:
            print("running open_clip's trainer on the same model, batch and precision...", flush=True)
            peer = run_open_clip(args)
            peer["mfu"] = flops["executed"] * peer["samples_per_s_per_gpu"] / peak
            result["open_clip"] = peer
            result["ratio_samples_per_s"] = ours["samples_per_s_per_gpu"] / peer["samples_per_s_per_gpu"]
    if main:
        print(format_table(result), flush=True)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(result, indent=2))
            print(f"results: {args.json}")
    sys.stdout.flush()
    return 0
