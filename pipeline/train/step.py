"""One training step on a DeepSpeed engine: the contrastive loss over the global batch (GradCache when
a step has several micro-batches), clipping, the update; and the window of steps between log lines.

    loss, metrics = train_step(engine, loss_fn, micro_batches, device, grad_clip=1.0)
    window.add(step, loss, metrics, samples)            # device tensors, no host read
    loss, metrics, samples_per_s = window.settle()      # every log_every steps: one host read

The model, loss and data below (docs/ARCHITECTURE.md's layers) know nothing of engines; the loop
(pipeline.train.loop) calls these once per step.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections.abc import Callable
from typing import Any

import torch

from pipeline.checkpoint.state import rng_state, set_rng_state
from pipeline.data.loader import materialize
from pipeline.model.contrastive import media_to_device
from pipeline.model.patch_dropout import patch_dropout_rows
from pipeline.parallel.parallelize import clip_gradients

# outputs of the model that are one value for the whole batch rather than one row per sample
SHARED_OUTPUTS = ("logit_scale", "logit_bias")
def _to_device(batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # uint8 images stay uint8 (the model normalises them on the device); float media (log-mel) is fp32, as
    # the weights are in every mode (autocast lowers the matmuls)
    return media_to_device(batch.media, device, torch.float32), batch.tokens.to(device, non_blocking=True)


def _with_valid(outputs: dict[str, Any], micro_batches: list, device: torch.device) -> dict[str, Any]:
    """The model outputs plus `valid` (bool, one entry per row of the micro-batches, in order): slots the
    loader filled without a real sample take no part in the loss. Always passed when the loader marks
    slots, even when all are real: the loss gathers the mask, a collective every rank must join."""
    if any(batch.valid is None for batch in micro_batches):
        return outputs
    # each part from the loader's pinned memory, then joined on the device: no pageable copy that blocks the host
    valid = torch.cat([batch.valid.to(device, non_blocking=True) for batch in micro_batches])
    return {**outputs, "valid": valid}


def _cache_outputs(cache: dict[str, torch.Tensor], outputs: dict[str, Any], first: int, rows: int,
                   total_rows: int) -> None:
    """Copy one micro-batch's floating outputs into `cache` at rows first:first+rows of fp32 buffers of
    `total_rows` rows, allocated at the first micro-batch (fp32: the loss is computed in fp32, and fp16
    output gradients could underflow). A shared output (logit scale, bias) is kept from the first."""
    for key, value in outputs.items():
        if not (isinstance(value, torch.Tensor) and value.is_floating_point()):
            continue
        if key in SHARED_OUTPUTS:
            cache.setdefault(key, value.detach().float())
            continue
        if value.shape[0] != rows:
            raise ValueError(f"model output {key!r} has {value.shape[0]} rows for a micro-batch of {rows} samples")
        if key not in cache:
            cache[key] = torch.empty((total_rows, *value.shape[1:]), dtype=torch.float32, device=value.device)
        cache[key][first:first + rows] = value


def backward_step(engine, loss_fn, micro_batches: list, device: torch.device):
    """Gradients of the contrastive loss over all `micro_batches` of every rank, left in the engine
    (reduced across ranks: the last backward is DeepSpeed's accumulation boundary). The caller then
    calls `engine.step()` once more to apply them. Returns (loss tensor, loss metrics).

    One micro-batch: a plain forward/backward. Several (GradCache): forward each without grad and
    keep only its outputs, compute the loss over all of them, take its gradient with respect to those
    outputs, then forward each micro-batch again with grad (same dropout: the RNG is replayed) and
    back-propagate the cached output gradients through it. The gradient is exactly that of one
    batch `len(micro_batches)` times larger, and so is the contrastive batch.
    """
    # patch dropout masks by (step seed, row in the step's batch): the same for any cut into micro-batches
    rows = patch_dropout_rows(engine.module)
    firsts = list(itertools.accumulate((len(batch.tokens) for batch in micro_batches[:-1]), initial=0))
    if len(micro_batches) == 1:
        rows.place(0)
        batch = materialize(micro_batches[0])  # images the loader left encoded: decoded on the device now
        outputs = engine(*_to_device(batch, device))
        loss, metrics = loss_fn(_with_valid(outputs, [batch], device))
        engine.backward(loss)
        return loss.detach(), metrics

    # 1. outputs of every micro-batch, without activations, written into one buffer per output for the
    # whole batch (joining per-micro-batch copies afterwards would hold the batch's features twice)
    # images the loader left encoded (data.decode=gpu) are decoded on the device in each pass, so the step
    # holds its micro-batches as JPEG bytes, not pixels; decoding is deterministic, so both passes agree
    combined, rng_before, decoded = {}, [], []
    total_rows = firsts[-1] + len(micro_batches[-1].tokens)
    with torch.no_grad():
        for batch, first in zip(micro_batches, firsts):
            rng_before.append(rng_state())
            rows.place(first)
            batch = materialize(batch)
            outputs = engine(*_to_device(batch, device))
            _cache_outputs(combined, outputs, first, len(batch.tokens), total_rows)
            decoded.append(batch._replace(media=None))  # its `valid` rows, which decoding may have changed
    rng_after = rng_state()

    # 2. the loss over the whole accumulated batch, and its gradient w.r.t. the cached outputs
    for value in combined.values():
        value.requires_grad_()
    loss, metrics = loss_fn(_with_valid(combined, decoded, device))
    loss.backward()
    loss = loss.detach()  # drops the loss's graph, the last holder of the cached outputs but `combined`
    grads = {key: value.grad for key, value in combined.items() if value.grad is not None}
    del combined  # only the gradients are needed from here on: the replay runs without the features
    # each micro-batch's rows of the gradients (views); a shared output's gradient goes to the first alone,
    # whose replayed forward stands for the whole batch's use of it
    output_grads = [
        {key: grad if key in SHARED_OUTPUTS else grad[first:first + len(batch.tokens)]
         for key, grad in grads.items() if index == 0 or key not in SHARED_OUTPUTS}
        for index, (batch, first) in enumerate(zip(micro_batches, firsts))
    ]

    # 3. replay each micro-batch with grad and push the output gradients through it
    for index, batch in enumerate(micro_batches):
        set_rng_state(rng_before[index])
        rows.place(firsts[index])
        outputs = engine(*_to_device(materialize(batch), device))
        surrogate = sum((outputs[key].float() * grad).sum() for key, grad in output_grads[index].items())
        # the cached gradient already is the gradient of the whole batch's loss: no 1/accum scaling
        engine.backward(surrogate, scale_wrt_gas=False)
        if index < len(micro_batches) - 1:
            engine.step()  # advances DeepSpeed's micro-step; no optimizer step before the boundary
    set_rng_state(rng_after)
    return loss, metrics


def train_step(engine, loss_fn, micro_batches: list, device: torch.device, grad_clip: float,
               phase: Callable[[str], contextlib.AbstractContextManager] | None = None,
               ) -> tuple[torch.Tensor, dict[str, Any]]:
    """One optimizer step: gradients of the loss over `micro_batches` (GradCache when several), clipping,
    the update. Returns the loss and the loss metrics as device tensors: nothing here reads a value back
    to the host, so the host can run ahead of the GPU; the trainer reads them every `log_every` steps.
    (DeepSpeed's ZeRO 1-3 optimizers read 1-3 scalars a step for their own checks, whatever the model size.)
    `phase(name)`: a context manager around the clipping, the one part of the step that is not an engine or
    loss call (`bench gpu` times each phase: the rest through the engine and loss it passes in)."""
    loss, metrics = backward_step(engine, loss_fn, micro_batches, device)
    with phase("grad_clip") if phase else contextlib.nullcontext():
        clip_gradients(engine, grad_clip)
    engine.step()
    return loss, metrics


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
