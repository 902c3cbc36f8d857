"""Ours, the row `bench gpu` (pipeline.bench.gpu) compares the peers with: one DeepSpeed engine built by
training's own builder from the run config the flags stand for (`build_run`), stepped by training's own
`pipeline.train.step.train_step` on synthetic batches or the loader's (`measure_ours`), and the breakdown of its
step into phases (`measure_breakdown`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.bench.gpu_measure import (
    PhaseClock,
    WaitTimed,
    host_peak_rss_gb,
    peak_memory_gb,
    synthetic_batches,
    time_steps,
    wait_summary,
)

if TYPE_CHECKING:  # torch is imported where a benchmark runs, not for `bench gpu --help`
    import torch


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
    from pipeline.data.config import DataConfig
    from pipeline.data.loader import build_loader
    from pipeline.model.build import get_tokenizer, image_size, media_transform
    from pipeline.model.contrastive import media_to_device

    data_cfg = DataConfig(train_urls=args.data, modality=run.model_cfg.modality, batch_size=args.batch_size,
                          workers=args.workers, decode=args.decode)
    placement = {"device": run.device} if args.decode == "gpu" else {}
    loader = build_loader(data_cfg, args.data, rank=run.rank, world_size=run.world_size, seed=args.seed,
                          media_transform=media_transform(run.model_cfg, True),
                          tokenizer=get_tokenizer(run.model_cfg), image_size=image_size(run.model_cfg),
                          global_batch=run.world_size * args.batch_size * args.accum_steps, **placement)

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


# -- measurements ----------------------------------------------------------------------------------
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


# -- the breakdown ---------------------------------------------------------------------------------
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
