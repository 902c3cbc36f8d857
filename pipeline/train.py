"""Training: one DeepSpeed engine over both towers, GradCache accumulation, exact resume; and `demo`.

    python -m pipeline train --config configs/demo-clip.yaml                        # one process (CPU or GPU)
    deepspeed --num_gpus 2 --no_local_rank --module pipeline train --config configs/demo-clip.yaml  # 2 local ranks
    torchrun --nproc_per_node 2 -m pipeline train --config configs/vit-b-32.yaml train.zero_stage=2
    python -m pipeline demo --config configs/demo-clip.yaml                          # shards + 2 ranks + results

The loop, top to bottom: validate the config (before any work), join the process group, build the
model, optimizer, schedule and engine, the loaders and the loss, restore the latest checkpoint when
resuming, then per step: take `accum_steps` micro-batches, compute the gradient of the contrastive
loss over all of them (GradCache), step, log, evaluate, checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from pipeline import distributed
from pipeline.config import ConfigError, OptimConfig, dump_config, load_config, to_dict
from pipeline.parallelize import CompileTimer, compile_blocks, should_compile

log = logging.getLogger(__name__)

# outputs of the model that are one value for the whole batch rather than one row per sample
SHARED_OUTPUTS = ("logit_scale", "logit_bias")
# parameters exempt from weight decay, besides every 0/1-dim tensor (biases, norm gains)
NO_DECAY_NAMES = ("bias", "norm", "ln_", "logit_scale", "logit_bias", "sigma")


# -- optimizer and schedule ------------------------------------------------------------------------
def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on weight matrices only: decaying biases, norms or the temperature hurts CLIP."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if parameter.ndim < 2 or any(part in name for part in NO_DECAY_NAMES):
            no_decay.append(parameter)
        else:
            decay.append(parameter)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al. 2019): Adam's update rescaled per tensor by ||w|| / ||update|| (trust ratio),
    which keeps very large batches stable. Plain torch, so it runs on every accelerator and under ZeRO."""

    def __init__(self, params, lr: float, betas: tuple[float, float], eps: float, weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for parameter in group["params"]:
                if parameter.grad is None:
                    continue
                grad = parameter.grad.float()
                state = self.state[parameter]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(grad)
                    state["exp_avg_sq"] = torch.zeros_like(grad)
                state["step"] += 1
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                mean = exp_avg / (1 - beta1 ** state["step"])
                variance = exp_avg_sq / (1 - beta2 ** state["step"])
                update = mean / (variance.sqrt() + group["eps"])
                if group["weight_decay"]:
                    update.add_(parameter.float(), alpha=group["weight_decay"])
                weight_norm, update_norm = parameter.float().norm(), update.norm()
                trust = torch.where((weight_norm > 0) & (update_norm > 0), weight_norm / update_norm, 1.0)
                parameter.add_((update * trust).to(parameter.dtype), alpha=-group["lr"])
        return loss


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW or LAMB over `parameter_groups`. AdamW uses torch's fused kernel when `optim.fused` is on
    (CUDA and CPU): one kernel for all tensors, and no per-tensor host read of the step count, which
    the unfused single-tensor path makes (`.item()` per parameter per step)."""
    groups = parameter_groups(model, cfg.weight_decay)
    betas = (cfg.beta1, cfg.beta2)
    if cfg.name == "lamb":
        return Lamb(groups, lr=cfg.lr, betas=betas, eps=cfg.eps)
    # fused=True is checked against the parameters' device at the first step, after DeepSpeed has
    # moved the module there; the parameter objects stay the same, so it may be set now
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.eps, fused=cfg.fused)


def lr_factor(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Linear warmup to 1, then cosine down to `min_lr_ratio` at `total_steps`."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine


# -- one optimizer step ----------------------------------------------------------------------------
def _rng_snapshot() -> tuple:
    return torch.get_rng_state(), (torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None)


def _rng_restore(snapshot: tuple) -> None:
    torch.set_rng_state(snapshot[0])
    if snapshot[1] is not None:
        torch.cuda.set_rng_state_all(snapshot[1])


def _to_device(batch, device: torch.device, media_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    from pipeline.models import media_to_device

    # uint8 images stay uint8 (the model normalises them on the device); log-mel takes the model dtype
    return media_to_device(batch.media, device, media_dtype), batch.tokens.to(device, non_blocking=True)


def _with_valid(outputs: dict[str, Any], micro_batches: list, device: torch.device) -> dict[str, Any]:
    """The model outputs plus `valid` (bool, one entry per row of the micro-batches, in order): slots the
    loader filled without a real sample take no part in the loss. Always passed when the loader marks
    slots, even when all are real: the loss gathers the mask, a collective every rank must join."""
    if any(batch.valid is None for batch in micro_batches):
        return outputs
    # each part from the loader's pinned memory, then joined on the device: no pageable copy that blocks the host
    valid = torch.cat([batch.valid.to(device, non_blocking=True) for batch in micro_batches])
    return {**outputs, "valid": valid}


def backward_step(engine, loss_fn, micro_batches: list, device: torch.device, media_dtype: torch.dtype):
    """Gradients of the contrastive loss over all `micro_batches` of every rank, left in the engine
    (reduced across ranks: the last backward is DeepSpeed's accumulation boundary). The caller then
    calls `engine.step()` once more to apply them. Returns (loss tensor, loss metrics).

    One micro-batch: a plain forward/backward. Several (GradCache): forward each without grad and
    keep only its outputs, compute the loss over all of them, take its gradient with respect to those
    outputs, then forward each micro-batch again with grad (same dropout: the RNG is replayed) and
    back-propagate the cached output gradients through it. The gradient is exactly that of one
    batch `len(micro_batches)` times larger, and so is the contrastive batch.
    """
    if len(micro_batches) == 1:
        outputs = engine(*_to_device(micro_batches[0], device, media_dtype))
        loss, metrics = loss_fn(_with_valid(outputs, micro_batches, device))
        engine.backward(loss)
        return loss.detach(), metrics

    # 1. outputs of every micro-batch, without activations
    cached, rng_before = [], []
    with torch.no_grad():
        for batch in micro_batches:
            rng_before.append(_rng_snapshot())
            outputs = engine(*_to_device(batch, device, media_dtype))
            # fp32 leaves: the loss is computed in fp32, and fp16 output gradients could underflow
            cached.append({k: v.detach().float().requires_grad_() for k, v in outputs.items()
                           if isinstance(v, torch.Tensor) and v.is_floating_point()})
    rng_after = _rng_snapshot()

    # 2. the loss over the whole accumulated batch, and its gradient w.r.t. the cached outputs
    combined = {
        key: cached[0][key] if key in SHARED_OUTPUTS else torch.cat([part[key] for part in cached])
        for key in cached[0]
    }
    loss, metrics = loss_fn(_with_valid(combined, micro_batches, device))
    loss.backward()
    output_grads = [{k: v.grad for k, v in part.items() if v.grad is not None} for part in cached]

    # 3. replay each micro-batch with grad and push the output gradients through it
    for index, batch in enumerate(micro_batches):
        _rng_restore(rng_before[index])
        outputs = engine(*_to_device(batch, device, media_dtype))
        surrogate = sum((outputs[key].float() * grad).sum() for key, grad in output_grads[index].items())
        # the cached gradient already is the gradient of the whole batch's loss: no 1/accum scaling
        engine.backward(surrogate, scale_wrt_gas=False)
        if index < len(micro_batches) - 1:
            engine.step()  # advances DeepSpeed's micro-step; no optimizer step before the boundary
    _rng_restore(rng_after)
    return loss.detach(), metrics


def train_step(engine, loss_fn, micro_batches: list, device: torch.device, media_dtype: torch.dtype,
               grad_clip: float) -> tuple[torch.Tensor, dict[str, Any]]:
    """One optimizer step: gradients of the loss over `micro_batches` (GradCache when several), clipping,
    the update. Returns the loss and the loss metrics as device tensors: nothing here reads a value back
    to the host, so the host can run ahead of the GPU; the trainer reads them every `log_every` steps.
    (DeepSpeed's ZeRO 1-3 optimizers read 1-3 scalars a step for their own checks, whatever the model size.)"""
    loss, metrics = backward_step(engine, loss_fn, micro_batches, device, media_dtype)
    distributed.clip_gradients(engine, grad_clip)
    engine.step()
    return loss, metrics


# -- throughput -------------------------------------------------------------------------------------
PEAK_MATMUL_SIZE = 8192  # large enough to reach a GPU's dense peak, about a second to measure


def mfu_figures(cfg, device: torch.device, precision: str) -> tuple[float, float] | None:
    """(model FLOPs per sample, measured matmul peak FLOP/s of this device in the run's dtype) for the
    MFU estimate, or None where there is none: on CPU, or for towers whose FLOPs are not counted.
    Model FLOPs are the bench's count from the config (forward x 3), not what recomputation adds."""
    from pipeline.flops import MATMUL_DTYPE, flops_per_sample, measure_matmul_peak

    if device.type != "cuda":
        return None
    try:
        flops = flops_per_sample(cfg.model)["model"]
    except (ConfigError, KeyError) as error:
        log.warning("no MFU estimate: %s", error)
        return None
    return float(flops), measure_matmul_peak(device, MATMUL_DTYPE[precision], PEAK_MATMUL_SIZE)


class LogWindow:
    """The steps since the last log line, kept on the device: each step appends its loss and metrics as
    tensors (no host read); `settle()` reduces them over ranks and reads them back in one transfer.

    A non-finite loss stops the run with FloatingPointError naming the step. Under `amp` the loss
    scaler gets its chance first: a non-finite loss makes it skip the step and lower the scale, so the
    run stops only after AMP_NONFINITE_PATIENCE non-finite steps in a row."""

    AMP_NONFINITE_PATIENCE = 8

    def __init__(self, world_size: int, precision: str):
        self.world_size, self.precision = world_size, precision
        self.steps: list[int] = []
        self.values: list[torch.Tensor] = []
        self.metric_names: list[str] = []
        self.samples, self.started, self.timed = 0, time.perf_counter(), True
        self.nonfinite_run = 0  # consecutive non-finite losses, carried across windows

    def add(self, step: int, loss: torch.Tensor, metrics: dict[str, Any], samples: int) -> None:
        scalars = {k: v for k, v in (metrics or {}).items()
                   if isinstance(v, torch.Tensor) and v.numel() == 1 and v.is_floating_point()}
        self.metric_names = sorted(scalars)
        row = [loss.detach().float().reshape(1)] + [scalars[k].detach().float().reshape(1) for k in self.metric_names]
        self.steps.append(step)
        self.values.append(torch.cat(row))
        self.samples += samples

    def exclude_throughput(self) -> None:
        """The current window's wall time is not throughput (it compiled): settle() reports None for it."""
        self.timed = False

    def settle(self) -> tuple[float, dict[str, float], float | None]:
        """(global loss of the last step, its metrics averaged over ranks, samples/s over the window or None);
        restarts the window. The only host read of the training loop."""
        if not self.steps:
            return float("nan"), {}, None
        table = torch.stack(self.values)
        if torch.distributed.is_initialized() and self.world_size > 1:
            # the mean over ranks of each rank's local rows is the loss of the global batch
            torch.distributed.all_reduce(table)
            table = table / self.world_size
        rows = table.tolist()
        elapsed = time.perf_counter() - self.started
        samples_per_s = self.samples / max(elapsed, 1e-9) if self.timed else None
        steps = self.steps
        self.steps, self.values, self.samples, self.started, self.timed = [], [], 0, time.perf_counter(), True
        for step, row in zip(steps, rows):
            if math.isfinite(row[0]):
                self.nonfinite_run = 0
                continue
            self.nonfinite_run += 1
            if self.precision != "amp" or self.nonfinite_run >= self.AMP_NONFINITE_PATIENCE:
                after = f" ({self.nonfinite_run} non-finite steps in a row: the loss scaler could not recover)" \
                    if self.precision == "amp" else ""
                raise FloatingPointError(f"loss is {row[0]} at step {step}{after}: lower optim.lr or check the data")
        return rows[-1][0], dict(zip(self.metric_names, rows[-1][1:])), samples_per_s


# -- the run --------------------------------------------------------------------------------------
def validate(cfg, world_size: int) -> int:
    """Everything that can be checked before any work; returns the per-rank micro-batch."""
    from pipeline.data import DataConfig, read_shard_sizes

    micro = cfg.train.micro_batch_size(world_size)
    # the trainer derives the loader's batch from train.global_batch_size: a different one set by hand
    # would be silently ignored, so it is refused
    if cfg.data.batch_size not in (micro, DataConfig.batch_size):
        raise ConfigError(
            f"data.batch_size ({cfg.data.batch_size}) is derived in training: train.global_batch_size "
            f"({cfg.train.global_batch_size}) / (world size {world_size} x train.accum_steps "
            f"{cfg.train.accum_steps}) = {micro}; set train.global_batch_size instead"
        )
    for key in ("train_urls", "val_urls"):
        urls = getattr(cfg.data, key)
        if not urls:
            if key == "train_urls":
                raise ConfigError("data.train_urls is empty: set it to the training shards")
            continue
        try:
            sizes = read_shard_sizes(urls, cfg.data.storage_options)
        except Exception as error:  # whatever the storage says, name the setting that points there
            raise ConfigError(f"data.{key} '{urls}' cannot be read: {error}") from None
        if not sizes:
            raise ConfigError(f"data.{key} '{urls}' holds no shards")
    if cfg.train.resume not in ("none", "auto") and not cfg.train.resume.strip():
        raise ConfigError("train.resume must be 'none', 'auto' or a checkpoint path")
    distributed.check_precision(cfg.train.precision)
    from pipeline.checkpoint import check_reachable

    check_reachable(cfg.checkpoint.dir or str(run_dir_of(cfg) / "checkpoints"), cfg.checkpoint.storage_options)
    return micro


def run_dir_of(cfg) -> Path:
    return Path(cfg.train.output_dir) / cfg.train.name


def _batches_forever(loader) -> Iterator:
    while True:  # the loader moves itself to the next epoch when one ends
        yield from loader


def _append_keys(path: Path, step: int, keys: list[str]) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"step": step, "keys": keys}) + "\n")


def _truncate_keys(path: Path, step: int) -> None:
    """A killed run may have logged keys past its last checkpoint; they are read again after resume."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError):
            continue  # a line cut short by the kill
    path.write_text("".join(line + "\n" for line in kept))


def train(cfg) -> dict[str, Any]:
    """Run (or continue) training as configured; every rank calls it. Returns the last eval metrics."""
    from pipeline.checkpoint import CheckpointManager, rng_state, seed_everything, set_rng_state
    from pipeline.data import build_loader, sum_stats_across_ranks
    from pipeline.evaluate import evaluate, read_classes
    from pipeline.losses import build_loss
    from pipeline.metrics import MetricsLogger
    from pipeline.models import build_model, get_tokenizer, image_size, media_transform
    from pipeline.plots import plot_run
    from pipeline.preemption import Preempted, StopSignals

    world_size = int(distributed.launcher_environment().get("WORLD_SIZE", "1"))
    micro = validate(cfg, world_size)  # before the process group, the model or any data is touched
    dist = distributed.init_distributed(cfg.train.collective_timeout_s)
    if dist.world_size != world_size:
        raise RuntimeError(f"the launcher announced {world_size} ranks but the process group has {dist.world_size}")
    rank, device = dist.rank, dist.device
    run_dir = run_dir_of(cfg)
    # what the run starts from, checked in full (decided on rank 0) before anything is written: a fresh
    # start over another run's checkpoints, a missing or unreadable checkpoint, a changed setting
    checkpoints = CheckpointManager(cfg.checkpoint, run_dir, rank, dist.world_size)
    source = checkpoints.plan_start(cfg.train.resume, overwrite=cfg.train.overwrite, run_config=to_dict(cfg))
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, run_dir / "config.yaml")

    # model, optimizer, schedule, engine; the same init on every rank
    seed_everything(cfg.train.seed)
    model = build_model(cfg.model)
    precision = distributed.resolve_precision(cfg.train.precision)
    compiled = should_compile(cfg.train.compile, device, cfg.train.zero_stage)
    if compiled:
        compile_blocks(model)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, cfg.optim, cfg.train.steps)
    )
    ds_config = distributed.deepspeed_config(
        micro_batch_size=micro, accum_steps=cfg.train.accum_steps, world_size=dist.world_size,
        zero_stage=cfg.train.zero_stage, precision=precision, grad_clip=cfg.optim.grad_clip,
        log_every=cfg.train.log_every,
    )
    engine = distributed.build_engine(model, optimizer, scheduler, ds_config)
    media_dtype = distributed.model_dtype(precision)
    torch.manual_seed(cfg.train.seed * 1000 + rank)  # each rank its own dropout stream

    # data and loss
    data_cfg = dataclasses.replace(cfg.data, batch_size=micro)
    tokenizer = get_tokenizer(cfg.model)
    loader = build_loader(
        data_cfg, data_cfg.train_urls, rank=rank, world_size=dist.world_size, seed=cfg.train.seed,
        media_transform=media_transform(cfg.model, True), tokenizer=tokenizer, train=True,
        image_size=image_size(cfg.model),
    )
    eval_loader = classes = None
    if data_cfg.val_urls:
        eval_loader = build_loader(
            dataclasses.replace(data_cfg, batch_size=cfg.eval.batch_size), data_cfg.val_urls, rank=rank,
            world_size=dist.world_size, seed=cfg.train.seed, media_transform=media_transform(cfg.model, False),
            tokenizer=tokenizer, train=False, image_size=image_size(cfg.model),
        )
        classes = read_classes(data_cfg.val_urls, data_cfg.storage_options)
    loss_fn = build_loss(cfg.loss, rank, dist.world_size)

    # resume
    step, samples_seen = 0, 0
    if source is not None:
        state = checkpoints.load(engine, source)
        step, samples_seen = state["step"], state["samples_seen"]
        loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
        if dist.is_main:
            print(f"resumed from {source} at step {step} ({samples_seen} samples seen)", flush=True)
    keys_path = run_dir / f"keys_rank{rank}.jsonl"
    if cfg.train.log_sample_keys and source is not None:
        _truncate_keys(keys_path, step)
    elif cfg.train.log_sample_keys:
        keys_path.unlink(missing_ok=True)
    # a fresh run into an existing run directory starts its curves anew (-1: drop every earlier record)
    metrics_log = MetricsLogger(run_dir, enabled=dist.is_main, resume_step=step if source is not None else -1)
    plot_path = run_dir / "curves.png"

    def run_eval() -> dict[str, float]:
        if eval_loader is None:
            return {}
        results = evaluate(engine.module, eval_loader, tokenizer=tokenizer, classes_json=classes, device=device,
                           rank=rank, world_size=dist.world_size)
        metrics_log.log({"kind": "eval", "step": step, **results})
        if dist.is_main:
            plot_run(run_dir / "metrics.jsonl", plot_path, title=cfg.train.name)
        return results

    def save() -> None:
        checkpoints.save(engine, step, {
            "step": step, "samples_seen": samples_seen, "loader": loader.state_dict(), "rng": rng_state(),
            "world_size": dist.world_size, "config": to_dict(cfg),
        })

    mfu = mfu_figures(cfg, device, precision)
    stop_at = cfg.train.steps if not cfg.train.stop_after_steps else min(cfg.train.steps, step + cfg.train.stop_after_steps)

    from tqdm import tqdm

    bar = tqdm(total=cfg.train.steps, initial=step, disable=not dist.is_main, unit="step", dynamic_ncols=True)
    batches = _batches_forever(loader)
    last_eval: dict[str, float] = {}
    window = LogWindow(dist.world_size, precision)
    compile_timer = CompileTimer(compiled)
    first_step = step

    # SIGTERM / SIGUSR1: finish the step, save, exit 75 (requeue); checkpoint.every_minutes: timed saves
    stop_signals = StopSignals(every_minutes=cfg.checkpoint.every_minutes).install()
    preempted = None

    engine.train()
    while step < stop_at:
        micro_batches = [next(batches) for _ in range(cfg.train.accum_steps)]
        if cfg.train.log_sample_keys:
            _append_keys(keys_path, step + 1, [key for batch in micro_batches for key in batch.keys])
        loss, loss_metrics = train_step(engine, loss_fn, micro_batches, device, media_dtype, cfg.optim.grad_clip)
        step += 1
        samples_seen += cfg.train.global_batch_size
        window.add(step, loss, loss_metrics, cfg.train.global_batch_size)
        if compile_timer.compiling(step - first_step):
            window.exclude_throughput()  # compiling every block: this time is reported apart, not as throughput
        if compile_timer.after_step(step - first_step):
            metrics_log.log({"kind": "compile", "step": step, "first_steps_s": compile_timer.first_steps_s})
            if dist.is_main:
                print(f"compiled: the first {compile_timer.steps} steps took {compile_timer.first_steps_s:.1f} s",
                      flush=True)
        if step % cfg.train.log_every == 0 or step == stop_at:
            global_loss, step_metrics, samples_per_s = window.settle()
            record = {
                "step": step, "epoch": loader.epoch + loader.batches_consumed / max(len(loader), 1),
                "samples_seen": samples_seen, "loss": global_loss, "lr": scheduler.get_last_lr()[0],
                "logit_scale": step_metrics.get("logit_scale", float("nan")),
                **{f"loss/{k}": v for k, v in step_metrics.items() if k != "logit_scale"},
            }
            # every rank's skipped, filled and left-out samples, summed (a collective: all ranks log together)
            record.update({f"data/{k}": v for k, v in sum_stats_across_ranks(loader.stats).items()})
            if samples_per_s is not None:  # None for a window that compiled
                record.update(samples_per_s=samples_per_s, samples_per_s_per_gpu=samples_per_s / dist.world_size)
            if mfu is not None and samples_per_s is not None:
                flops, peak = mfu
                record["mfu"] = flops * samples_per_s / dist.world_size / peak
            metrics_log.log(record)
            bar.set_postfix(loss=f"{global_loss:.4f}", samples_s=f"{samples_per_s or 0:.1f}")
            if dist.is_main and step % (10 * cfg.train.log_every) == 0:
                plot_run(run_dir / "metrics.jsonl", plot_path, title=cfg.train.name)
        bar.update(1)
        if cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and step < cfg.train.steps:
            last_eval = run_eval()
        check = stop_signals.poll()  # every rank together: one all-reduce of two ints (gloo, CPU)
        every_steps = cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0
        if (every_steps or check.save_due or check.stop) and step < stop_at:
            window.settle()  # never checkpoint a model that has diverged since the last log step
            save()
            stop_signals.saved()
        if check.stop and step < stop_at:  # at stop_at the run ends as usual
            preempted = Preempted(step, check.reason)
            break
    bar.close()
    stop_signals.uninstall()
    if preempted is not None:
        metrics_log.close()
        distributed.barrier()
        raise preempted
    if step >= cfg.train.steps:
        last_eval = run_eval()
    save()
    # what the data lacked, over all ranks (a collective, before rank 0 alone reports it)
    lost = {k: v for k, v in sum_stats_across_ranks(loader.stats).items() if v and k != "samples_read"}
    if dist.is_main:
        if (run_dir / "metrics.jsonl").is_file():
            plot_run(run_dir / "metrics.jsonl", plot_path, title=cfg.train.name)
        if lost:
            print("data over all ranks: " + ", ".join(f"{k} {v}" for k, v in lost.items()), flush=True)
    metrics_log.close()
    distributed.barrier()
    return last_eval


# -- commands ---------------------------------------------------------------------------------------
def load_run_config(path: str | None, overrides: list[str]):
    from pipeline.config import RunConfig

    return load_config(RunConfig, path, overrides)


def _train_command(args: argparse.Namespace) -> int:
    cfg = load_run_config(args.config, args.overrides)
    train(cfg)
    return 0


def ensure_embedded_shards(cfg) -> None:
    """Build the embedded data set a demo config points at (shards/<set>/<split>) if it is missing."""
    from pipeline.shards import BuildConfig, build_shards

    for urls, split in ((cfg.data.train_urls, "train"), (cfg.data.val_urls, "val")):
        directory = Path(urls)
        if not urls or (directory / "sizes.json").is_file():
            continue
        source = "tones" if cfg.data.modality == "audio" else "shapes"
        print(f"building the embedded '{source}' {split} shards into {directory}", flush=True)
        build_shards(BuildConfig(source=source, split=split, output=str(directory)))


def launch_command(config: str, overrides: list[str], nproc: int) -> list[str]:
    """The command that starts `nproc` local ranks: the deepspeed launcher, else torchrun."""
    launcher = shutil.which("deepspeed") or str(Path(sys.executable).with_name("deepspeed"))
    args = ["train", "--config", config, *overrides]
    if Path(launcher).is_file():
        master_port = str(29500 + os.getpid() % 1000)
        return [launcher, "--num_gpus", str(nproc), "--master_port", master_port, "--no_local_rank", "--module", "pipeline",
                *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "-m", "pipeline", *args]


def _demo_command(args: argparse.Namespace) -> int:
    from pipeline.evaluate import format_table
    from pipeline.metrics import read_metrics

    cfg = load_run_config(args.config, args.overrides)
    ensure_embedded_shards(cfg)
    nproc = args.nproc or (max(1, min(2, torch.cuda.device_count())) if torch.cuda.is_available() else 2)
    overrides = list(args.overrides)
    if cfg.train.resume == "none" and not any(item.startswith("train.overwrite=") for item in overrides):
        # the demo is run again and again: a fresh demo run replaces the previous one's checkpoints
        overrides.append("train.overwrite=true")
    command = launch_command(args.config, overrides, nproc)
    print("running:", " ".join(command), flush=True)
    started = time.time()
    result = subprocess.run(command)
    if result.returncode != 0:
        print(f"training failed (exit code {result.returncode})", file=sys.stderr)
        return result.returncode
    run_dir = run_dir_of(cfg)
    evals = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "eval"]
    print(f"\ntrained {cfg.train.steps} steps on {nproc} ranks in {time.time() - started:.0f} s")
    if evals:
        print(f"held-out results at step {evals[-1]['step']}:\n{format_table(evals[-1])}")
    print(f"curves: {run_dir / 'curves.png'}\nmetrics: {run_dir / 'metrics.jsonl'}")
    return 0


def register_cli(subparsers) -> None:
    train_parser = subparsers.add_parser(
        "train", help="train with DeepSpeed (any launcher, or one process)", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train_parser.add_argument("--config", required=True, help="YAML run config (configs/*.yaml)")
    train_parser.add_argument("overrides", nargs="*", help="dot-list overrides, e.g. optim.lr=1e-3 train.steps=100")
    train_parser.set_defaults(func=_train_command)

    demo_parser = subparsers.add_parser(
        "demo", help="build the embedded shards, train on 2 local ranks, print held-out results",
        description="The tiny CLIP (or CLAP) demo: builds shards if missing, trains with 2 local ranks through "
        "the deepspeed launcher (GPUs if present, else CPU), evaluates, prints a results table and the plot path.",
    )
    demo_parser.add_argument("--config", default="configs/demo-clip.yaml", help="demo run config")
    demo_parser.add_argument("--nproc", type=int, default=0, help="local ranks (default: 2)")
    demo_parser.add_argument("overrides", nargs="*", help="dot-list overrides")
    demo_parser.set_defaults(func=_demo_command)
