"""Training-step throughput per GPU: samples/s, step time, MFU / HFU, peak memory, ours vs two open_clip peers.

    python -m pipeline bench gpu --batch-size 256                  # (make bench-gpu) ViT-B-32, 224 px, amp_bf16
    python -m pipeline bench gpu --batch-size 1024 --json runs/bench-gpu/b1024.json
    python -m pipeline bench gpu --grad-checkpointing --compile    # ours with per-block torch.compile
    python -m pipeline bench gpu --data 'shards/laion/{00000..00099}.tar' --workers 8   # through pipeline.data.dataset
    python -m pipeline bench gpu --data 'shards/laion/{00000..00099}.tar' --workers 4 --decode gpu  # nvJPEG decode
    python -m pipeline bench gpu --find-max-batch --skip-open-clip --skip-handwritten  # largest batches, 300 s budget
    deepspeed --num_gpus 8 --no_local_rank --module pipeline bench gpu --skip-open-clip  # per-GPU figures, 8 ranks
    python -m pipeline bench gpu --model tiny-clip --precision fp32 --batch-size 8 --steps 5 --warmup 2  # CPU, tiny

One run measures, one after the other, on the same model, batch, precision and synthetic batches:
  ours                    one DeepSpeed engine built by training's own builder (`pipeline.train.loop.build_engine_for`:
                          model, optimizer, LR schedule, engine, compile, seeds, and TF32 on CUDA as train.tf32 sets
                          it by default, as open_clip's trainer does; the hand-written peer runs after it in this
                          process under the same setting) from the run config these flags stand for, stepped by
                          training's own `pipeline.train.step.train_step` (plain, or GradCache with --accum-steps);
                          device-resident synthetic batches (the step alone) or --data shards (the loader included:
                          the loader's batches go into the step as in training, --decode cpu|gpu is data.decode);
  ours, synthetic data    with --data, the same engine and batch on synthetic batches right after: the table gives
                          shards / synthetic samples/s (target >= 0.95 at batch 256) and each row's wait for its
                          next batch (mean, p90, share of the step);
  open_clip_train         open_clip's trainer (`open_clip_train.main --dataset-type synthetic`) as a subprocess in
                          the peer venv that `bench data` builds; its logged batch times give its samples/s;
  hand-written (eager, compiled)  `open_clip.create_model` + fused AdamW + autocast + ClipLoss, the few lines a
                          user writes, eager and under torch.compile (compiled: default on CUDA, --peer-compile on).
Each row gives samples/s per GPU, step time, MFU, HFU and peak memory, and each peer the ratio ours / peer.
Rows are written to --json (default runs/bench-gpu.json) as each finishes, so a time-out keeps the finished
rows; a peer that fails is recorded with its error, the others still run, and the exit status is 1.

How ours is timed, three measurements kept apart because measuring perturbs what is measured:
  throughput  `--steps` steps after `--warmup`, no host synchronisation inside the loop (one at each end);
              the hand-written peer is timed the same way on the same batches;
  breakdown   `--breakdown-steps` more steps with every phase timed: CUDA events on GPU (one synchronisation at
              the end of each step), perf_counter around synchronised phases elsewhere. Phases: data wait,
              forward, all-gather, loss, backward, gradient clipping, optimizer step; the rest is `other`;
  peak        a `--peak-matmul-size`^3 matmul in the run's matmul dtype, timed once in the same process: the
              denominator of MFU and HFU for every row (on CPU it is the CPU's rate: the arithmetic is exercised).
MFU and HFU are defined in pipeline.observe.flops: MFU counts model FLOPs (3 x forward) only, the trainer's definition;
HFU adds the forward that gradient checkpointing recomputes and GradCache's feature pass.

Size: ~920 lines, one benchmark with five rows measured the same way (ours, ours on synthetic data,
open_clip_train, the hand-written step eager and compiled), its breakdown, batch search and report: one
file so that every row visibly shares the timing method.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
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
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.bench.table import cell, format_cells, write_results
from pipeline.core.errors import ConfigError

if TYPE_CHECKING:  # torch is imported where a benchmark runs, not for `bench gpu --help`
    import torch

DEFAULT_JSON = "runs/bench-gpu.json"
OPEN_CLIP_LOG_LINE = re.compile(r"Batch \(t\): (?P<batch_time>[0-9.]+), [0-9.e+]+/s, [0-9.e+]+/s/gpu")
# the rows of one run, in the order they are measured
RUN_LABELS = {
    "ours": "ours (DeepSpeed)",
    "ours_synthetic": "ours, synthetic data",
    "open_clip_train": "open_clip_train",
    "handwritten_eager": "hand-written, eager",
    "handwritten_compiled": "hand-written, compiled",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="ViT-B-32", help="model name (pipeline.model.contrastive.ModelConfig.name)")
    parser.add_argument("--precision", default="amp_bf16",
                        help="amp_bf16: fp32 master weights, bf16 autocast; amp: fp16 autocast, dynamic loss "
                        "scaling; fp32. The names are open_clip's: the same name goes to every peer")
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
    parser.add_argument("--data", default="", help="shard URLs read through pipeline.data.dataset (default: synthetic)")
    parser.add_argument("--workers", type=int, default=8, help="loader workers (ours with --data, and open_clip's)")
    parser.add_argument("--decode", default="cpu", choices=("cpu", "gpu"),
                        help="with --data: data.decode, where images are decoded (gpu: the loader's workers read the "
                        "tars, the batch is decoded with nvJPEG on the step's device)")
    parser.add_argument("--fused-adamw", default="auto", choices=("auto", "on", "off"),
                        help="torch's fused AdamW kernel, through optim.fused (auto: training's default)")
    parser.add_argument("--compile", action="store_true",
                        help="ours: torch.compile per transformer block (pipeline.parallel.parallelize.compile_blocks); "
                        "open_clip_train: --torchcompile")
    parser.add_argument("--channels-last", action="store_true",
                        help="images in channels_last (only the ViT patch embedding is a convolution)")
    parser.add_argument("--peak-matmul-size", type=int, default=0,
                        help="side of the matmul that measures peak FLOP/s (default: 8192 on GPU, 1024 on CPU)")
    parser.add_argument("--find-max-batch", action="store_true",
                        help="search the largest local batch (with and without grad checkpointing) and the largest "
                        "GradCache contrastive batch that fit")
    parser.add_argument("--find-max-batch-budget-s", type=float, default=300.0,
                        help="time budget of the batch searches: when it is spent they stop and report the largest "
                        "batches found so far")
    parser.add_argument("--batch-limit", type=int, default=0,
                        help="upper end of the batch searches (default: 131072 on GPU, 16 on CPU, where running "
                        "out of memory kills the process instead of raising)")
    parser.add_argument("--contrastive-limit", type=int, default=0,
                        help="upper end of the GradCache contrastive-batch search (default: 262144 on GPU, 32 on CPU; "
                        "the aim is 65536)")
    parser.add_argument("--skip-open-clip", action="store_true", help="do not run open_clip's trainer")
    parser.add_argument("--open-clip-venv", default=".venv-openclip",
                        help="venv for open_clip's trainer (built by `bench data` if missing)")
    parser.add_argument("--skip-handwritten", action="store_true", help="do not run the hand-written open_clip step")
    parser.add_argument("--peer-compile", nargs="?", const="on", default="auto", choices=("auto", "on", "off"),
                        help="also time the hand-written step under torch.compile (auto: on CUDA only, compiling "
                        "on CPU is slow; --peer-compile alone: on)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=DEFAULT_JSON, help="results file, rewritten as each row finishes")


# -- the batch-size search ------------------------------------------------------------------------
def largest_fitting(fits: Callable[[int], bool], start: int, limit: int,
                    should_stop: Callable[[], bool] | None = None) -> int:
    """The largest n in [start, limit] with fits(n), assuming fits is monotone (true up to some n, false after):
    double from `start` until a size fails or `limit` is reached, then bisect between the last success and
    the first failure. Returns 0 when not even `start` fits.

    `should_stop` is asked before every probe but the first; when it answers True the search ends there and
    returns the largest size that fitted so far (a lower bound of the answer)."""
    if start < 1 or limit < start:
        raise ValueError(f"need 1 <= start <= limit, got start={start}, limit={limit}")
    stop = should_stop or (lambda: False)
    if not fits(start):
        return 0
    good = start
    bad = None
    while bad is None and good < limit:
        if stop():
            return good
        candidate = min(good * 2, limit)
        if fits(candidate):
            good = candidate
        else:
            bad = candidate
    if bad is None:
        return good
    while bad - good > 1:
        if stop():
            return good
        middle = (good + bad) // 2
        if fits(middle):
            good = middle
        else:
            bad = middle
    return good


class Budget:
    """A time budget: calling it says whether the budget is spent, and `spent` remembers that it was."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic):
        self.seconds, self._clock = seconds, clock
        self._deadline = clock() + seconds
        self.spent = False

    def __call__(self) -> bool:
        self.spent = self.spent or self._clock() >= self._deadline
        return self.spent


# -- phase timing ----------------------------------------------------------------------------------
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
        import torch

        from pipeline.observe.flops import synchronize
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
                synchronize(self.device)
                began = time.perf_counter()
                yield
                synchronize(self.device)
                self._add(name, parent, time.perf_counter() - began)
        finally:
            self._stack.pop()

    def finish_step(self) -> None:
        from pipeline.observe.flops import synchronize
        synchronize(self.device)
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
    """What one benchmark process holds: the engine built by the trainer's builder and everything a step needs."""

    engine: Any
    loss_fn: Any
    model_cfg: Any
    device: torch.device
    rank: int
    world_size: int
    optimizer_kind: str
    grad_clip: float

    def step(self, micro_batches: list, engine=None, loss_fn=None, phase=None) -> torch.Tensor:
        """One optimizer step through the trainer's own `pipeline.train.step.train_step` (GradCache with several
        micro-batches, clipping, the update); `engine`, `loss_fn`, `phase`: the breakdown's timed stand-ins.
        Returns the loss tensor (not synchronised)."""
        from pipeline.train.step import train_step

        loss, _ = train_step(engine or self.engine, loss_fn or self.loss_fn, micro_batches, self.device,
                             self.grad_clip, phase=phase)
        return loss


def bench_config(args, world_size: int):
    """The run config (pipeline.train.config.RunConfig, validated as `train` validates it) that these flags stand for:
    the model, precision, ZeRO stage, compile, micro-batch x accumulation x ranks, loss chunking and seed."""
    from pipeline.train.config import RunConfig, load_config

    modality = "audio" if args.model in ("tiny-clap", "clap-base") else "image"
    overrides = [
        f"model.name={args.model}", f"model.modality={modality}", f"model.grad_checkpointing={args.grad_checkpointing}",
        f"train.precision={args.precision}", f"train.zero_stage={args.zero_stage}",
        f"train.compile={'on' if args.compile else 'off'}", f"train.seed={args.seed}",
        f"train.accum_steps={args.accum_steps}",
        f"train.global_batch_size={args.batch_size * args.accum_steps * world_size}",
        # the schedule spans far more steps than the bench runs: after the one warmup step every timed step
        # runs at the peak learning rate, as the middle of a training run does
        "train.steps=1000000", "optim.warmup_steps=1",
        "train.log_every=1000",  # DeepSpeed's own progress lines (steps_per_print) would interleave the table
        f"loss.chunk_size={args.loss_chunk_size}",
    ]
    if args.fused_adamw != "auto":  # auto: training's default
        overrides.append(f"optim.fused={args.fused_adamw == 'on'}")
    return load_config(RunConfig, None, overrides)


def build_run(args) -> BenchRun:
    """Process group, then model, optimizer, schedule and engine by the trainer's own builder
    (`pipeline.train.loop.build_engine_for`: seeds, TF32 on CUDA, compile, per-rank dropout seed), and its loss."""
    from pipeline.loss import build_loss
    from pipeline.parallel import distributed
    from pipeline.train.loop import build_engine_for

    world_size = int(distributed.launcher_environment().get("WORLD_SIZE", "1"))
    cfg = bench_config(args, world_size)  # a bad flag is refused before the process group starts
    dist = distributed.init_distributed(cfg.train.collective_timeout_s)
    engine, _, _, _ = build_engine_for(cfg, dist, cfg.train.micro_batch_size(dist.world_size))
    engine.train()
    loss_fn = build_loss(cfg.loss, dist.rank, dist.world_size)
    kind = "AdamW (fused)" if cfg.optim.fused else "AdamW"
    return BenchRun(engine=engine, loss_fn=loss_fn, model_cfg=cfg.model, device=dist.device, rank=dist.rank,
                    world_size=dist.world_size, optimizer_kind=kind, grad_clip=cfg.optim.grad_clip)


def _media_shape(model_cfg) -> tuple[int, ...]:
    from pipeline.model.contrastive import image_size

    if model_cfg.modality == "audio":
        return (model_cfg.audio.n_mels, model_cfg.audio.num_frames)
    side = image_size(model_cfg)
    return (3, side, side)


def _context_length(model_cfg) -> int:
    from pipeline.model.contrastive import get_tokenizer

    return get_tokenizer(model_cfg).context_length


def synthetic_batches(model_cfg, device: torch.device, batch_size: int, count: int, rank: int = 0,
                      channels_last: bool = False) -> list:
    """`count` distinct random batches, already on the device in fp32 (autocast casts): the step alone. The
    same values for every caller with the same rank, so ours and the peers see the same data."""
    import torch

    from pipeline.data.dataset import Batch

    generator = torch.Generator().manual_seed(1000 + rank)
    context = _context_length(model_cfg)
    batches = []
    for _ in range(count):
        media = torch.randn(batch_size, *_media_shape(model_cfg), generator=generator)
        media = media.to(device=device)
        if channels_last and media.dim() == 4:
            media = media.contiguous(memory_format=torch.channels_last)
        tokens = torch.randint(1, 49407, (batch_size, context), generator=generator).to(device)
        batches.append(Batch(media, tokens, [""] * batch_size, torch.full((batch_size,), -1, device=device)))
    return batches


def synthetic_micro_batches(run: BenchRun, batch_size: int, count: int, channels_last: bool = False) -> list:
    """Our micro-batches: `synthetic_batches` seeded by this rank."""
    return synthetic_batches(run.model_cfg, run.device, batch_size, count, run.rank, channels_last)


def _batch_source(run: BenchRun, args, synthetic: bool = False) -> Iterator[list]:
    """Step after step, the `accum_steps` micro-batches of one step: synthetic ones already on the device, or
    (--data, unless `synthetic`) the loader's batches exactly as training gets them (the step copies them to
    the device; with --decode gpu the loader hands them over there)."""
    import torch
    if synthetic or not args.data:
        batches = synthetic_micro_batches(run, args.batch_size, args.accum_steps, args.channels_last)
        while True:
            yield batches
    from pipeline.data.dataset import DataConfig, build_loader
    from pipeline.model.contrastive import get_tokenizer, image_size, media_to_device, media_transform

    data_cfg = DataConfig(train_urls=args.data, modality=run.model_cfg.modality, batch_size=args.batch_size,
                          workers=args.workers, decode=args.decode)
    placement = {"device": run.device} if args.decode == "gpu" else {}
    loader = build_loader(data_cfg, args.data, rank=run.rank, world_size=run.world_size, seed=args.seed,
                          media_transform=media_transform(run.model_cfg, True),
                          tokenizer=get_tokenizer(run.model_cfg), image_size=image_size(run.model_cfg), **placement)

    def forever():
        while True:  # the loader moves itself to the next epoch, as in pipeline.train.loop
            yield from loader

    stream = forever()
    while True:
        step = []
        for _ in range(args.accum_steps):
            batch = next(stream)
            if args.channels_last and batch.media.dim() == 4:
                media = media_to_device(batch.media, run.device, torch.float32)
                batch = batch._replace(media=media.contiguous(memory_format=torch.channels_last))
            step.append(batch)
        yield step


class WaitTimed:
    """Wraps a batch source: `waits` holds, for each `next()`, the host seconds it took (the time the step
    waited for its batch)."""

    def __init__(self, source: Iterator):
        self.source, self.waits = source, []

    def __iter__(self):
        return self

    def __next__(self):
        asked = time.perf_counter()
        item = next(self.source)
        self.waits.append(time.perf_counter() - asked)
        return item


def wait_summary(waits: list[float], step_s: float) -> dict[str, float]:
    """Mean and 90th percentile (nearest rank) of the data waits in ms, and the mean's share of the step."""
    ordered = sorted(waits)
    p90 = ordered[max(math.ceil(0.9 * len(ordered)) - 1, 0)]
    mean = statistics.fmean(ordered)
    return {"data_wait_ms_mean": mean * 1e3, "data_wait_ms_p90": p90 * 1e3, "data_wait_share": mean / step_s}


# -- measurements ----------------------------------------------------------------------------------
def time_steps(step: Callable[[Any], torch.Tensor], source: Iterator, steps: int,
               device: torch.device) -> dict[str, float]:
    """Mean seconds per `step(next(source))` over `steps` calls, with no host synchronisation between the
    first and the last: one synchronisation before, one after. Every row of the bench is timed by this."""
    from pipeline.observe.flops import synchronize
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        loss = step(next(source))
    synchronize(device)
    seconds = time.perf_counter() - start
    return {"step_s": seconds / steps, "final_loss": float(loss)}


def measure_breakdown(run: BenchRun, source: Iterator[list], steps: int) -> dict[str, float]:
    """Mean seconds per step of each phase, and of the whole (instrumented) step."""
    from pipeline.observe.flops import synchronize
    clock = PhaseClock(run.device)
    engine, loss_fn = _PhaseTimedEngine(run.engine, clock), _PhaseTimedLoss(run.loss_fn, clock)
    step_seconds = 0.0
    for _ in range(steps):
        synchronize(run.device)
        began = time.perf_counter()
        with clock.phase("data_wait", host=True):
            micro_batches = next(source)
        run.step(micro_batches, engine=engine, loss_fn=loss_fn, phase=clock.phase)
        clock.finish_step()
        step_seconds += time.perf_counter() - began
    phases = {name: clock.totals.get(name, 0.0) / steps
              for name in ("data_wait", "forward", "all_gather", "loss", "backward", "grad_clip", "optimizer_step")}
    phases["step"] = step_seconds / steps
    phases["other"] = phases["step"] - sum(v for k, v in phases.items() if k != "step")
    return phases


def _is_out_of_memory(error: BaseException) -> bool:
    import torch
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def _release_after_failure(run: BenchRun) -> None:
    import torch
    run.engine.zero_grad()
    gc.collect()
    if run.device.type == "cuda":
        torch.cuda.empty_cache()


def step_fits(run: BenchRun, batch_size: int, accum_steps: int = 1) -> bool:
    """Whether one full step (forward, backward, optimizer) at this micro-batch and accumulation runs."""
    from pipeline.observe.flops import synchronize
    run.engine.set_train_micro_batch_size(batch_size)
    run.engine.set_train_batch_size(batch_size * accum_steps * run.world_size)
    micro_steps = run.engine.micro_steps
    try:
        # one micro-batch repeated: the same memory and work as distinct ones, without holding accum copies
        micro_batches = synthetic_micro_batches(run, batch_size, 1) * accum_steps
        run.step(micro_batches)
        synchronize(run.device)
        return True
    except RuntimeError as error:
        if not _is_out_of_memory(error):
            raise
        # a step cut short leaves DeepSpeed's micro-step count mid-accumulation: realign the next boundary
        run.engine.micro_steps = micro_steps
        _release_after_failure(run)
        return False


def find_max_batches(run: BenchRun, limit: int, contrastive_limit: int, budget_s: float = math.inf,
                     progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Largest local batch without and with grad checkpointing, then the largest GradCache contrastive
    batch on one rank (micro-batch: the largest power of two that fit with checkpointing).

    The three searches share `budget_s` seconds. When it is spent, the search under way returns the largest
    batch that fitted so far (a lower bound), the searches not yet started are None, and `stopped_on_budget`
    says so."""
    from pipeline.model.contrastive import ContrastiveModel

    model: ContrastiveModel = run.engine.module
    configured = (run.engine.train_micro_batch_size_per_gpu(), run.engine.gradient_accumulation_steps())
    checkpointing_was = model.grad_checkpointing
    budget = Budget(budget_s)
    started = time.monotonic()
    results: dict[str, Any] = {"limit": limit, "contrastive_limit": contrastive_limit, "budget_s": budget_s,
                               "max_local_batch": None, "max_local_batch_checkpointing": None,
                               "gradcache_micro_batch": None, "gradcache_accum_steps": None,
                               "max_contrastive_batch_gradcache": None}
    for checkpointing in (False, True):
        if budget():
            break
        model.set_grad_checkpointing(checkpointing)

        def fits(batch, checkpointing=checkpointing):
            ok = step_fits(run, batch)
            progress(f"  local batch {batch:>7} grad checkpointing {'on ' if checkpointing else 'off'}: "
                     f"{'fits' if ok else 'out of memory'}")
            return ok

        key = "max_local_batch_checkpointing" if checkpointing else "max_local_batch"
        results[key] = largest_fitting(fits, 1, limit, should_stop=budget)
    fitted = results["max_local_batch_checkpointing"]
    if fitted is not None and not budget():
        micro = 2 ** int(math.log2(fitted)) if fitted else 0
        results["gradcache_micro_batch"] = micro
        if micro:
            def fits_accum(accum):
                ok = step_fits(run, micro, accum)
                progress(f"  GradCache {micro} x {accum} = {micro * accum} contrastive batch: "
                         f"{'fits' if ok else 'out of memory'}")
                return ok

            accum = largest_fitting(fits_accum, 1, max(1, contrastive_limit // (micro * run.world_size)),
                                    should_stop=budget)
            results["gradcache_accum_steps"] = accum
            results["max_contrastive_batch_gradcache"] = micro * accum * run.world_size
    results["stopped_on_budget"] = budget.spent
    results["elapsed_s"] = time.monotonic() - started
    model.set_grad_checkpointing(checkpointing_was)
    run.engine.set_train_micro_batch_size(configured[0])
    run.engine.set_train_batch_size(configured[0] * configured[1] * run.world_size)
    return results


def peak_memory_gb(device: torch.device) -> float | None:
    import torch
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def host_peak_rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def _release(device: torch.device, compiled: bool = False) -> None:
    """Free what the previous row left behind, so the next row's peak memory is its own."""
    import torch
    if compiled:
        torch._dynamo.reset()  # compiled graphs hold the previous model's tensors
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# -- peer 1: open_clip's trainer -------------------------------------------------------------------
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
    from pipeline.model.contrastive import MODEL_CONFIG_DIR

    log_every = max(1, args.warmup)
    batches = 1 + log_every + math.ceil(args.steps / log_every) * log_every
    command = [
        python, "-c", OPEN_CLIP_SCRIPT, str(MODEL_CONFIG_DIR),
        "--dataset-type", "synthetic", "--train-num-samples", str(batches * args.batch_size * args.accum_steps),
        "--model", args.model, "--batch-size", str(args.batch_size), "--accum-freq", str(args.accum_steps),
        "--precision", args.precision, "--workers", str(args.workers),
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
    from pipeline.bench.data import ensure_open_clip_venv

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
    return figures


# -- peer 2: the hand-written open_clip step -------------------------------------------------------
def handwritten_step(args, device: torch.device, compiled: bool) -> Callable[[Any], torch.Tensor]:
    """The step a user writes around open_clip: its model in fp32, torch's AdamW (fused on CUDA), autocast
    in the run's precision (a GradScaler for fp16), open_clip's ClipLoss. Returns step(batch) -> loss."""
    import open_clip
    import torch

    from pipeline.model.contrastive import register_open_clip_configs
    from pipeline.observe.flops import MATMUL_DTYPE

    register_open_clip_configs()  # tiny-clip and our other configs, by name
    torch.manual_seed(args.seed)
    model = open_clip.create_model(args.model, device=device, output_dict=True)
    model.train()
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    # weight decay on matrices only, as open_clip_train does: the same kernels, the same work
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=5e-4, fused=device.type == "cuda")
    loss_fn = open_clip.ClipLoss()
    forward = torch.compile(model) if compiled else model
    dtype = MATMUL_DTYPE[args.precision]
    scaler = torch.amp.GradScaler(device.type) if args.precision == "amp" else None

    def autocast():
        if args.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=dtype)

    def step(batch) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            out = forward(batch.media, batch.tokens)
            loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        return loss.detach()

    return step


def handwritten_skip_reason(args, model_cfg) -> str | None:
    if model_cfg.modality != "image":
        return f"{args.model} is an audio model: open_clip has no audio tower"
    if args.accum_steps > 1:
        return "a plain step: it has no GradCache accumulation to compare with --accum-steps > 1"
    return None


def measure_handwritten(args, model_cfg, device: torch.device, compiled: bool) -> dict[str, Any]:
    """The hand-written step timed as ours is: `--warmup` steps (compilation included), then `--steps`
    steps with no host synchronisation in between, on the same synthetic batches (fp32: autocast casts)."""
    import torch

    from pipeline.observe.flops import synchronize
    batch = synthetic_batches(model_cfg, device, args.batch_size, 1, 0, args.channels_last)[0]

    def batches():
        while True:
            yield batch

    source = batches()
    step = handwritten_step(args, device, compiled)
    for _ in range(args.warmup):
        step(next(source))
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timed = time_steps(step, source, args.steps, device)
    return {**timed, "samples_per_s_per_gpu": args.batch_size / timed["step_s"],
            "peak_memory_gb": peak_memory_gb(device)}


# -- results ---------------------------------------------------------------------------------------
# the table's columns after the run's label: (title, width)
COLUMNS = (("samples/s", 11), ("step ms", 10), ("MFU %", 8), ("HFU %", 8), ("peak GiB", 10), ("ours / this", 14),
           ("wait ms", 9), ("p90 ms", 9), ("wait %", 8))


def format_row(name: str, row: dict[str, Any]) -> str:
    label = row.get("label", RUN_LABELS[name])
    if "error" in row:
        return f"{label:34}failed: {row['error'].splitlines()[0][:120]}"
    if "skipped" in row:
        return f"{label:34}skipped: {row['skipped']}"
    percent = {key: row[key] * 100 if row.get(key) is not None else None for key in ("mfu", "hfu")}
    ratio = row.get("ours_vs_this")
    share = row["data_wait_share"] * 100 if row.get("data_wait_share") is not None else None
    values = ((row["samples_per_s_per_gpu"], "{:.1f}"), (row["step_s"] * 1e3, "{:.1f}"), (percent["mfu"], "{:.2f}"),
              (percent["hfu"], "{:.2f}"), (row.get("peak_memory_gb"), "{:.2f}"), (ratio, "{:.2f}x"),
              (row.get("data_wait_ms_mean"), "{:.2f}"), (row.get("data_wait_ms_p90"), "{:.2f}"), (share, "{:.1f}"))
    return f"{label:34}" + format_cells((value, fmt, width) for (value, fmt), (_, width) in zip(values, COLUMNS))


def format_table(result: dict[str, Any]) -> str:
    flops = result["flops_per_sample"]
    lines = [f"{result['model']} {result['precision']}, local batch {result['batch_size']} x accum "
             f"{result['accum_steps']} x {result['world_size']} ranks, {result['device']}, data: {result['data']}",
             f"FLOPs/sample: model {flops['model'] / 1e9:.3f} G (MFU), executed {flops['executed'] / 1e9:.3f} G "
             f"(HFU); measured matmul peak {result['peak_flops'] / 1e12:.3f} TFLOP/s ({result['peak_matmul']})",
             f"{'run':34}" + format_cells((title, "{}", width) for title, width in COLUMNS)]
    lines += [format_row(name, row) for name, row in result["runs"].items()]
    if result.get("data_vs_synthetic") is not None:
        lines.append(f"shards / synthetic data: {result['data_vs_synthetic']:.3f} of the samples/s at batch "
                     f"{result['batch_size']} (target >= 0.95 at batch 256); wait: the step's wait for its next batch "
                     "(host time in the loader, mean and p90 over the timed steps, and the mean's share of the step)")
    ours = result["runs"].get("ours", {})
    if "breakdown" in ours:
        breakdown = ours["breakdown"]
        lines.append(f"breakdown of ours over {result['breakdown_steps']} instrumented steps (ms; step "
                     f"{breakdown['step'] * 1e3:.2f}, slower than un-instrumented: it synchronises):")
        lines.append("  " + "  ".join(f"{name} {seconds * 1e3:.2f}" for name, seconds in breakdown.items()
                                      if name != "step"))
    if "max_batch" in result:
        found = result["max_batch"]
        stopped = (f"; stopped on the {found['budget_s']:g} s budget: the figures are lower bounds, '-' not searched"
                   if found["stopped_on_budget"] else "")
        lines.append(f"largest local batch: {cell(found['max_local_batch'], '{}')} (checkpointing: "
                     f"{cell(found['max_local_batch_checkpointing'], '{}')}); GradCache contrastive batch: "
                     f"{cell(found['max_contrastive_batch_gradcache'], '{}')} (micro "
                     f"{cell(found['gradcache_micro_batch'], '{}')}); search limits {found['limit']} / "
                     f"{found['contrastive_limit']}, {found['elapsed_s']:.0f} s{stopped}")
    return "\n".join(lines)


# -- the command -----------------------------------------------------------------------------------
def _validate(args) -> None:
    from pipeline.parallel.parallelize import check_precision_name

    if args.precision == "auto":
        raise ConfigError("--precision: name amp_bf16, amp or fp32 (the same name goes to every peer)")
    check_precision_name(args.precision)
    for flag in ("batch_size", "accum_steps", "steps", "breakdown_steps", "find_max_batch_budget_s"):
        if getattr(args, flag) <= 0:
            raise ConfigError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    for flag in ("warmup", "workers", "peak_matmul_size", "batch_limit", "contrastive_limit"):
        if getattr(args, flag) < 0:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
    if args.decode == "gpu" and not args.data:
        raise ConfigError("--decode gpu decodes the images of --data shards; give --data (synthetic batches "
                          "need no decoding)")


def measure_ours(bench: BenchRun, args, synthetic: bool = False) -> dict[str, Any]:
    """Ours on --data (or synthetic batches): `--warmup` steps, then the timed steps with the wait for each
    batch recorded (host time in the loader, the loop otherwise unsynchronised), then the breakdown (not
    for the synthetic companion row of a --data run)."""
    import torch
    source = _batch_source(bench, args, synthetic)
    for _ in range(args.warmup):
        bench.step(next(source))
    if bench.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(bench.device)
    waited = WaitTimed(source)
    timed = time_steps(bench.step, waited, args.steps, bench.device)
    memory = peak_memory_gb(bench.device)
    row = {**timed, "samples_per_s_per_gpu": args.batch_size * args.accum_steps / timed["step_s"],
           **wait_summary(waited.waits, timed["step_s"]), "peak_memory_gb": memory,
           "host_peak_rss_gb": host_peak_rss_gb(), "optimizer": bench.optimizer_kind}
    if not synthetic:
        row["breakdown"] = measure_breakdown(bench, source, args.breakdown_steps)
    return row


def _peer_plan(args, model_cfg, device: torch.device,
               world_size: int) -> list[tuple[str, Callable[[], dict[str, Any]] | None, str | None]]:
    """(row name, how to measure it, or None and why not) for each peer, in the order they run."""
    plan: list[tuple[str, Callable[[], dict[str, Any]] | None, str | None]] = []
    if not args.skip_open_clip:
        plan.append(("open_clip_train", functools.partial(run_open_clip, args), None))
    if not args.skip_handwritten:
        why = handwritten_skip_reason(args, model_cfg)
        compiled_too = args.peer_compile == "on" or (args.peer_compile == "auto" and device.type == "cuda")
        for compiled in (False, True) if compiled_too else (False,):
            measure = functools.partial(measure_handwritten, args, model_cfg, device, compiled)
            plan.append(("handwritten_compiled" if compiled else "handwritten_eager", None if why else measure, why))
    if world_size > 1:
        return [(name, None, "peers run on one GPU: run this bench with one rank for them") for name, _, _ in plan]
    return plan


def run(args) -> int:
    import torch

    from pipeline.observe.flops import MATMUL_DTYPE, flops_per_sample, measure_matmul_peak, utilisation
    _validate(args)
    from pipeline.parallel import distributed

    bench = build_run(args)
    main = bench.rank == 0
    device = bench.device
    on_gpu = device.type == "cuda"
    flops = flops_per_sample(bench.model_cfg, args.grad_checkpointing, args.accum_steps > 1)
    size = args.peak_matmul_size or (8192 if on_gpu else 1024)
    peak = measure_matmul_peak(device, MATMUL_DTYPE[args.precision], size)
    results_path = Path(args.json)
    result: dict[str, Any] = {
        "model": args.model, "precision": args.precision, "batch_size": args.batch_size,
        "accum_steps": args.accum_steps, "contrastive_batch": args.batch_size * args.accum_steps * bench.world_size,
        "world_size": bench.world_size, "zero_stage": args.zero_stage,
        "grad_checkpointing": args.grad_checkpointing, "compile": args.compile, "channels_last": args.channels_last,
        "device": torch.cuda.get_device_name(device) if on_gpu else f"CPU ({torch.get_num_threads()} threads)",
        "data": (f"{args.data} (decode={args.decode}, {args.workers} workers)" if args.data
                 else "synthetic (device-resident)"), "steps": args.steps, "warmup": args.warmup,
        "breakdown_steps": args.breakdown_steps, "flops_per_sample": flops, "peak_flops": peak,
        "peak_matmul": f"{size}^3 {str(MATMUL_DTYPE[args.precision]).removeprefix('torch.')}", "runs": {},
    }

    def finish_row(name: str, row: dict[str, Any]) -> None:
        """Record one row (the ratio and MFU / HFU derived here, once for all rows) and rewrite the file."""
        row = {"label": RUN_LABELS[name], "precision": args.precision, **row}
        if "samples_per_s_per_gpu" in row:
            row.update(utilisation(flops, row["samples_per_s_per_gpu"], peak))
            if name == "ours_synthetic":  # shards vs synthetic data through the same engine: the loader's cost
                row["ours_vs_this"] = result["runs"]["ours"]["samples_per_s_per_gpu"] / row["samples_per_s_per_gpu"]
                result["data_vs_synthetic"] = row["ours_vs_this"]
            elif name != "ours":  # the peers run on synthetic data: compared with ours on the same
                reference = result["runs"].get("ours_synthetic", result["runs"]["ours"])
                row["ours_vs_this"] = reference["samples_per_s_per_gpu"] / row["samples_per_s_per_gpu"]
        result["runs"][name] = row
        if main:
            print(format_row(name, row), flush=True)
            write_results(results_path, result)

    if main:
        print(f"measuring ours: {args.warmup} warmup + {args.steps} timed + {args.breakdown_steps} instrumented "
              f"steps; rows go to {results_path} as they finish", flush=True)
    label = "ours (DeepSpeed, compiled blocks)" if args.compile else RUN_LABELS["ours"]
    if args.data:
        label = f"ours, shards (decode={args.decode}{', compiled' if args.compile else ''})"
    finish_row("ours", {**measure_ours(bench, args), "label": label})
    if args.data:  # the same engine on synthetic batches, at the same batch: what the loader costs
        if main:
            print("measuring ours on synthetic data (same engine and batch)...", flush=True)
        synthetic_label = f"ours, synthetic data{' (compiled)' if args.compile else ''}"
        finish_row("ours_synthetic", {**measure_ours(bench, args, synthetic=True), "label": synthetic_label})
    if args.find_max_batch:
        limit = args.batch_limit or (131072 if on_gpu else 16)
        contrastive_limit = args.contrastive_limit or (262144 if on_gpu else 32)
        if main:
            print(f"searching the largest batches (local limit {limit}, contrastive limit {contrastive_limit}, "
                  f"budget {args.find_max_batch_budget_s:g} s)", flush=True)
        result["max_batch"] = find_max_batches(bench, limit, contrastive_limit, args.find_max_batch_budget_s,
                                               progress=print if main else (lambda _: None))
        if main:
            write_results(results_path, result)
    distributed.barrier()
    model_cfg = bench.model_cfg
    plan = _peer_plan(args, model_cfg, device, bench.world_size) if main else []
    del bench  # ours' engine, optimizer state and batches: the peers' peak memory is their own
    _release(device, compiled=args.compile)
    failed = []
    for name, measure, why in plan:
        if measure is None:
            finish_row(name, {"skipped": why})
            continue
        print(f"measuring {RUN_LABELS[name]} ({model_cfg.name}, batch {args.batch_size}, {args.precision})...",
              flush=True)
        try:
            row = measure()
        except Exception as error:  # one failing peer must not cost the rows of the others
            traceback.print_exc()
            failed.append(name)
            row = {"error": f"{type(error).__name__}: {error}"}
        finish_row(name, row)
        _release(device, compiled=name == "handwritten_compiled")
    if main:
        print(format_table(result), flush=True)
        print(f"results: {results_path}")
        if failed:
            print(f"failed: {', '.join(failed)} (their errors are in the table and the results file)", flush=True)
    sys.stdout.flush()
    return 1 if failed else 0
