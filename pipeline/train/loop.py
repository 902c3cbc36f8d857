"""Training: one DeepSpeed engine over both towers, GradCache accumulation, exact resume.

    python -m pipeline train --config configs/demo-clip.yaml                        # one process (CPU or GPU)
    deepspeed --num_gpus 2 --no_local_rank --module pipeline train --config configs/demo-clip.yaml  # 2 local ranks
    torchrun --nproc_per_node 2 -m pipeline train --config configs/vit-b-32.yaml train.zero_stage=2
    python -m pipeline train --config configs/demo-clip.yaml train.resume=auto      # continue where it stopped

`train()` reads top to bottom: validate the config (before any work), join the process group, check
what the run starts from and build the loaders (both before anything is written), build the engine, restore the
checkpoint when resuming, then per step: take `accum_steps` micro-batches, step (pipeline.train.step: the
contrastive loss over all of them, GradCache), log every `log_every` steps, evaluate, checkpoint, and
stop cleanly on SIGTERM / SIGUSR1. Everything it calls lives in the packages below `train`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from pipeline.checkpoint.manager import CheckpointManager
from pipeline.checkpoint.state import seed_everything
from pipeline.checkpoint.store import check_reachable
from pipeline.core import randomness
from pipeline.core.errors import ConfigError
from pipeline.data.config import DataConfig
from pipeline.data.loader import (
    STAT_MEANINGS,
    build_loader,
    prefetch_shard_index,
    source_error,
    sum_stats_across_ranks,
)
from pipeline.data.mixture import read_manifest
from pipeline.data.plan import Layout, fit_error
from pipeline.eval.evaluate import evaluate, format_table, read_classes
from pipeline.loss import build_loss
from pipeline.model.build import build_model, get_tokenizer, image_size, media_transform
from pipeline.observe.flops import model_flops_and_peak
from pipeline.observe.metrics import MetricsLogger, finite, read_metrics, truncate_after
from pipeline.observe.plots import plot_run
from pipeline.observe.progress import StepProgress
from pipeline.optim import build_optimizer, lr_factor
from pipeline.parallel import distributed
from pipeline.parallel.checkpointing import apply_activation_checkpointing
from pipeline.parallel.parallelize import (
    CompileTimer,
    build_engine,
    check_precision,
    compile_blocks,
    deepspeed_config,
    resolve_precision,
    should_compile,
)
from pipeline.train.config import RunConfig, dump_config, load_config, to_dict
from pipeline.train.preemption import Preempted, StopSignals
from pipeline.train.state import TrainState
from pipeline.train.step import LogWindow, train_step


def validate(cfg, world_size: int, probe_checkpoints: bool = True, read_data: bool = True) -> int:
    """Everything that can be checked before any work; returns the per-rank micro-batch. `probe_checkpoints`:
    create the checkpoint directory and write a probe file there (off for a dry run, which writes nothing).
    `read_data`: read the shard sizes of every source (`check_data`; the dry run calls it apart)."""
    micro = cfg.train.micro_batch_size(world_size)
    # the trainer derives the loader's batch from train.global_batch_size: a different one set by hand
    # would be silently ignored, so it is refused
    if cfg.data.batch_size not in (micro, DataConfig.batch_size):
        raise ConfigError(
            f"data.batch_size ({cfg.data.batch_size}) is derived in training: train.global_batch_size "
            f"({cfg.train.global_batch_size}) / (world size {world_size} x train.accum_steps "
            f"{cfg.train.accum_steps}) = {micro}; set train.global_batch_size instead"
        )
    canonical = cfg.data.canonical_streams or world_size * max(cfg.data.workers, 1)
    problem = fit_error(canonical, Layout(world_size, cfg.data.workers, micro), cfg.train.global_batch_size,
                        auto=not cfg.data.canonical_streams)
    if problem:  # 0 is world_size x workers for a fresh start; a resume keeps the saved C (checkpoint.plan checks it)
        raise ConfigError(problem)
    if not cfg.data.train_urls and not cfg.data.mixture:
        raise ConfigError("data.train_urls is empty: set it to the training shards (or data.mixture)")
    # the shard sizes are read on rank 0 alone and kept for its loader, which shares them with every rank
    # (one reading per data set, not one per rank); the launcher ends the other ranks if rank 0 fails here
    if read_data and int(distributed.launcher_environment()["RANK"]) == 0:
        check_data(cfg)
    if cfg.train.resume not in ("none", "auto") and not cfg.train.resume.strip():
        raise ConfigError("train.resume must be 'none', 'auto' or a checkpoint path")
    check_precision(cfg.train.precision)
    if probe_checkpoints:
        check_reachable(cfg.checkpoint.dir or str(run_dir_of(cfg) / "checkpoints"), cfg.checkpoint.storage_options)
    return micro


def check_data(cfg) -> None:
    """Read the shard sizes of the training sources (or the mixture's) and of data.val_urls: a ConfigError
    naming the setting (for a mixture, its file and entry) when one cannot be read or holds no shards."""
    for key in ("train_urls", "val_urls"):
        urls = getattr(cfg.data, key)
        if key == "train_urls" and cfg.data.mixture:  # the manifest's sources, as the loader joins them
            key, urls = "mixture", "::".join(s.urls for s in read_manifest(cfg.data.mixture, cfg.data.storage_options))
        if not urls:
            continue
        try:
            sizes = prefetch_shard_index(urls, cfg.data.storage_options).sizes
        except Exception as error:  # whatever the storage says, name the setting (a mixture: file and entry)
            raise source_error(cfg.data, key, urls, error) from None
        if not sizes:
            raise ConfigError(f"data.{key} '{urls}' holds no shards")


def run_dir_of(cfg) -> Path:
    return Path(cfg.train.output_dir) / cfg.train.name


def _batches_forever(loader) -> Iterator:
    while True:  # the loader moves itself to the next epoch when one ends
        yield from loader


def build_engine_for(cfg, dist, micro: int, load_universal: bool = False) -> tuple[Any, Any, str, bool]:
    """(engine, scheduler, resolved precision, compiled): the same init on every rank. `load_universal`: built to
    load a checkpoint of another world size (CheckpointManager.loads_universal)."""
    seed_everything(randomness.seed_int(cfg.train.seed, "model_init"))  # the same initial weights on every rank
    if dist.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.train.tf32
    model = build_model(cfg.model)
    apply_activation_checkpointing(model, cfg.model.grad_checkpointing)
    precision = resolve_precision(cfg.train.precision)
    compiled = should_compile(cfg.train.compile, dist.device, cfg.train.zero_stage)
    if compiled:
        compile_blocks(model)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg.optim, cfg.train.steps))
    ds_config = deepspeed_config(
        micro_batch_size=micro, accum_steps=cfg.train.accum_steps, world_size=dist.world_size,
        zero_stage=cfg.train.zero_stage, precision=precision, grad_clip=cfg.optim.grad_clip,
        log_every=cfg.train.log_every, load_universal=load_universal,
    )
    engine = build_engine(model, optimizer, scheduler, ds_config)
    torch.manual_seed(randomness.seed_int(cfg.train.seed, "rank_stream", dist.rank))  # each rank its own dropout stream
    return engine, scheduler, precision, compiled


def build_loaders(cfg, dist, micro: int):
    """(train loader, eval loader or None, classes.json or None, tokenizer)."""
    data_cfg = dataclasses.replace(cfg.data, batch_size=micro)
    tokenizer = get_tokenizer(cfg.model)
    common = dict(rank=dist.rank, world_size=dist.world_size, seed=cfg.train.seed, tokenizer=tokenizer,
                  image_size=image_size(cfg.model), device=dist.device)
    loader = build_loader(data_cfg, data_cfg.train_urls, media_transform=media_transform(cfg.model, True),
                          train=True, global_batch=cfg.train.global_batch_size, **common)
    # GradCache holds a step's micro-batches through two passes: with data.decode=gpu as JPEG bytes, decoded
    # on the device in each pass (pipeline.train.step), not as pixels
    loader.defer_decode = cfg.train.accum_steps > 1
    if not data_cfg.val_urls:
        return loader, None, None, tokenizer
    eval_loader = build_loader(dataclasses.replace(data_cfg, batch_size=cfg.eval.batch_size), data_cfg.val_urls,
                               media_transform=media_transform(cfg.model, False), train=False, **common)
    return loader, eval_loader, read_classes(data_cfg.val_urls, data_cfg.storage_options), tokenizer


class KeyAudit:
    """train.log_sample_keys: every step's sample keys in `keys_rank{r}.jsonl`, cut back to the checkpoint
    on resume (a killed run may have logged steps it will read again)."""

    def __init__(self, run_dir: Path, rank: int, enabled: bool, resumed_at: int | None):
        self.path, self.enabled = run_dir / f"keys_rank{rank}.jsonl", enabled
        if enabled and resumed_at is not None:
            truncate_after(self.path, resumed_at)
        elif enabled:
            self.path.unlink(missing_ok=True)

    def append(self, step: int, micro_batches: list) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"step": step, "keys": [k for b in micro_batches for k in b.keys]}) + "\n")


def train(cfg) -> dict[str, Any]:
    """Run (or continue) training as configured; every rank calls it. Returns the last eval metrics.

    One function of ~115 lines on purpose: it reads top to bottom in the order a run happens (check, plan the
    start, build, resume, loop, stop or finish), each part a named call (validate, build_engine_for,
    build_loaders, train_step, log_record, summary); cut into methods, the order would have to be pieced together."""
    started, world_size = time.monotonic(), int(distributed.launcher_environment().get("WORLD_SIZE", "1"))
    micro = validate(cfg, world_size)  # before the process group, the model or any data is touched
    dist = distributed.init_distributed(cfg.train.collective_timeout_s)
    if dist.world_size != world_size:
        raise RuntimeError(f"the launcher announced {world_size} ranks but the process group has {dist.world_size}")
    run_dir, plot_path = run_dir_of(cfg), run_dir_of(cfg) / "curves.png"
    # what the run starts from, checked in full (decided on rank 0) before anything is written: a fresh
    # start over another run's checkpoints, a missing or unreadable checkpoint, a changed setting
    checkpoints = CheckpointManager(cfg.checkpoint, run_dir, dist.rank, dist.world_size)
    source = checkpoints.plan_start(cfg.train.resume, overwrite=cfg.train.overwrite, run_config=to_dict(cfg))
    # the loaders plan the epoch (a data set smaller than one global batch is refused) before anything is written
    loader, eval_loader, classes, tokenizer = build_loaders(cfg, dist, micro)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, run_dir / "config.yaml")

    # a checkpoint of another world size (ZeRO 1-3) loads through DeepSpeed's universal checkpoint
    engine, scheduler, precision, compiled = build_engine_for(cfg, dist, micro, checkpoints.loads_universal)
    loss_fn = build_loss(cfg.loss, dist.rank, dist.world_size)
    state = TrainState(loader, dist.world_size, run_config=to_dict(cfg))
    if source is not None:
        state.load_state_dict(checkpoints.load(engine, source))
        if dist.is_main:
            print(f"resumed from {source} at step {state.step} ({state.samples_seen} samples seen)", flush=True)
    keys = KeyAudit(run_dir, dist.rank, cfg.train.log_sample_keys, state.step if source is not None else None)
    # a fresh run into an existing run directory starts its curves anew (-1: drop every earlier record)
    metrics_log = MetricsLogger(run_dir, enabled=dist.is_main, resume_step=state.step if source is not None else -1)

    def run_eval() -> dict[str, float]:
        if eval_loader is None:
            return {}
        distributed.average_buffers(engine.module)  # BatchNorm statistics: the ranks' mean, as saved
        results = evaluate(engine.module, eval_loader, tokenizer=tokenizer, classes_json=classes, device=dist.device,
                           rank=dist.rank, world_size=dist.world_size)
        metrics_log.log({"kind": "eval", "step": state.step, **results})
        if dist.is_main:
            plot_run(run_dir / "metrics.jsonl", plot_path, title=cfg.train.name)
        return results

    mfu = model_flops_and_peak(cfg.model, dist.device, precision)
    stop_at = min(cfg.train.steps, state.step + cfg.train.stop_after_steps) if cfg.train.stop_after_steps \
        else cfg.train.steps
    bar = StepProgress(cfg.train.steps, state.step, enabled=dist.is_main)  # a bar on a terminal, else lines
    batches, last_eval = _batches_forever(loader), {}
    window, compile_timer, first_step = LogWindow(dist.world_size, precision), CompileTimer(compiled), state.step
    # SIGTERM / SIGUSR1 / SIGINT or the launcher gone: finish the step, save, exit 75 (requeue);
    # checkpoint.every_minutes: timed saves
    stop_signals, preempted = StopSignals(every_minutes=cfg.checkpoint.every_minutes).install(), None

    # data.mixture: what each source gives each epoch, said when the epoch begins (rank 0)
    # (rank 0 alone prints it: the other ranks do not read the manifest again, 1,024 ranks would be 1,024 GETs)
    mixture_sources = [s.urls for s in read_manifest(cfg.data.mixture, cfg.data.storage_options)] \
        if cfg.data.mixture and dist.is_main else []
    announced_epoch = None
    engine.train()
    while state.step < stop_at:
        micro_batches = [next(batches) for _ in range(cfg.train.accum_steps)]
        if mixture_sources and loader.epoch != announced_epoch and dist.is_main:
            announced_epoch = loader.epoch
            bar.write(mixture_epoch_line(loader, announced_epoch, mixture_sources, cfg.data.mixture))
        keys.append(state.step + 1, micro_batches)
        loss, loss_metrics = train_step(engine, loss_fn, micro_batches, dist.device, cfg.optim.grad_clip)
        state.advance(cfg.train.global_batch_size)
        step = state.step
        window.add(step, loss, loss_metrics, cfg.train.global_batch_size)
        if compile_timer.compiling(step - first_step):
            window.exclude_throughput()  # compiling every block: this time is reported apart, not as throughput
        if compile_timer.after_step(step - first_step):
            metrics_log.log({"kind": "compile", "step": step, "first_steps_s": compile_timer.first_steps_s})
            if dist.is_main:
                print(f"compiled: the first {compile_timer.steps} steps took {compile_timer.first_steps_s:.1f} s")
        if step % cfg.train.log_every == 0 or step == stop_at:
            record = log_record(window, state, scheduler, mfu, dist.world_size)
            metrics_log.log(record)
            bar.log(step, record["loss"], record.get("samples_per_s"))
            if dist.is_main and step % (10 * cfg.train.log_every) == 0:
                plot_run(run_dir / "metrics.jsonl", plot_path, title=cfg.train.name)
        bar.update()
        if cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and step < cfg.train.steps:
            last_eval = run_eval()
        check = stop_signals.poll()  # every rank together: one all-reduce of two ints (gloo, CPU)
        every_steps = cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0
        if (every_steps or check.save_due or check.stop) and step < stop_at:
            window.settle()  # never checkpoint a model that has diverged since the last log step
            distributed.average_buffers(engine.module)  # what the checkpoint keeps (rank 0's) is every rank's
            checkpoints.save(engine, step, state.state_dict())
            stop_signals.saved()
        if check.stop and step < stop_at:  # at stop_at the run ends as usual
            preempted = Preempted(step, check.reason)
            break
    bar.close()
    if preempted is not None:
        stop_signals.stopping()  # saved: a launcher terminating the job now must not turn our 75 into -15
        batches.close()
        loader.close()
        metrics_log.close()
        distributed.barrier()
        raise preempted
    stop_signals.uninstall()
    if state.step >= cfg.train.steps:
        last_eval = run_eval()
    distributed.average_buffers(engine.module)
    checkpoints.save(engine, state.step, state.state_dict())
    # what the data lacked, over all ranks (a collective, before rank 0 alone reports it)
    lost = {k: v for k, v in sum_stats_across_ranks(loader.stats).items() if v and k != "samples_read"}
    batches.close()
    loader.close()
    metrics_log.close()
    if dist.is_main:
        if (run_dir / "metrics.jsonl").is_file():
            plot_run(run_dir / "metrics.jsonl", plot_path, title=cfg.train.name)
        print(summary(cfg, read_metrics(run_dir / "metrics.jsonl"), steps_run=state.step - first_step,
                      seconds=time.monotonic() - started, world_size=dist.world_size, lost=lost,
                      checkpoint_dir=checkpoints.url, latest=checkpoints.latest_tag()), flush=True)
    distributed.barrier()
    return last_eval


def mixture_epoch_line(loader, epoch: int, sources: list[str], manifest: str) -> str:
    """'epoch 2 of data.mixture mix.yaml: source 0 (urls) 248 samples, ...; 10 left over' for the epoch begun."""
    counts = loader.dataset.source_counts(epoch)
    parts = ", ".join(f"source {i} ({urls}) {count:,} samples" for i, (urls, count) in enumerate(zip(sources, counts)))
    return f"epoch {epoch} of data.mixture {manifest}: {parts}; {loader.dataset.remainder_of(epoch):,} left over"


def log_record(window: LogWindow, state: TrainState, scheduler, mfu, world_size: int) -> dict[str, Any]:
    """The metrics.jsonl record of a log step: settles the window (the loop's one host read) and sums every
    rank's data counts (a collective: every rank logs at the same steps): `data/*` over the run so far (across
    resumes), `data_window/*` since the previous log step."""
    loss, metrics, samples_per_s = window.settle()
    run_counters, window_counters = state.data_counters()
    record = {
        "step": state.step, "epoch": state.epoch, "samples_seen": state.samples_seen, "loss": loss,
        "lr": scheduler.get_last_lr()[0], "logit_scale": metrics.get("logit_scale", float("nan")),
        **{f"loss/{k}": v for k, v in metrics.items() if k != "logit_scale"},
        **{f"data/{k}": v for k, v in run_counters.items()},
        **{f"data_window/{k}": v for k, v in window_counters.items()},
    }
    if samples_per_s is not None:  # None for a window that compiled
        record.update(samples_per_s=samples_per_s, samples_per_s_per_gpu=samples_per_s / world_size)
        if mfu is not None:
            flops, peak = mfu
            record["mfu"] = flops * samples_per_s / world_size / peak
    return record


def summary(cfg, records: list[dict], *, steps_run: int, seconds: float, world_size: int, lost: dict[str, int],
            checkpoint_dir: str, latest: str | None) -> str:
    """What rank 0 prints when a run ends: what was done, the result beside chance, where everything is, and
    what went missing from the data, in words. `records`: metrics.jsonl; `lost`: the non-zero data counters
    (over all ranks) other than samples_read."""
    run_dir = run_dir_of(cfg)
    train_records = [r for r in records if r.get("kind", "train") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    last = train_records[-1] if train_records else {}
    minutes, rest = divmod(round(seconds), 60)
    lines = [
        f"\n== {cfg.train.name}: step {last.get('step', 0)} of {cfg.train.steps} "
        + ("(done)" if last.get("step", 0) >= cfg.train.steps else "(stopped early: resume with train.resume=auto)"),
        f"this invocation: {steps_run} steps, {steps_run * cfg.train.global_batch_size:,} samples, on {world_size} "
        f"rank{'s' if world_size > 1 else ''} in " + (f"{minutes} min {rest} s" if minutes else f"{rest} s")
        + " (start-up, evaluations and checkpoints included)",
    ]
    if last:
        first = train_records[0]
        speeds = sorted(r["samples_per_s"] for r in train_records if finite(r.get("samples_per_s")))
        lines.append(f"samples seen: {last['samples_seen']:,} ({last['epoch']:.2f} epochs)"
                     + (f"; training speed {speeds[len(speeds) // 2]:.0f} samples/s (median of the log steps)"
                        if speeds else ""))
        lines.append(f"loss: {last['loss']:.4f} at step {last['step']} (first logged: {first['loss']:.4f} at step "
                     f"{first['step']})")
    if evals:
        lines.append(f"held-out figures at step {evals[-1]['step']} on {cfg.data.val_urls} (chance beside each):")
        lines.append(format_table(evals[-1]))
    elif not cfg.data.val_urls:
        lines.append("no held-out figures: data.val_urls is not set")
    lines += [
        f"run directory: {run_dir} (config.yaml, metrics.jsonl, TensorBoard events)",
        f"checkpoints:   {checkpoint_dir}" + (f" (latest: {latest})" if latest else ""),
        f"plot:          {run_dir / 'curves.png'}",
    ]
    if lost:
        lines.append("data counters, over all ranks, this invocation:")
        lines += [f"  {count:,} {key}: {STAT_MEANINGS.get(key, '')}" for key, count in lost.items()]
    return "\n".join(lines)


# -- the command (declared in pipeline.commands.train) -------------------------------------------------
def load_run_config(path: str | None, overrides: list[str]) -> RunConfig:
    return load_config(RunConfig, path, overrides)
