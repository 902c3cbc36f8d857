"""The peers `bench gpu` (pipeline.bench.gpu) runs side by side with ours, on the same model, batch, precision
and synthetic batches: open_clip's trainer (`open_clip_train.main --dataset-type synthetic`) as a subprocess in
the peer venv that `bench data` builds, its samples/s read from the batch times it logs; and the hand-written
open_clip step a user writes (`open_clip.create_model` + fused AdamW + autocast + ClipLoss), eager and
compiled, timed by the same loop as ours (pipeline.bench.gpu_measure.time_steps).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
import statistics
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.bench.gpu_measure import peak_memory_gb, synthetic_batches, time_steps

if TYPE_CHECKING:  # torch is imported where a benchmark runs, not for `bench gpu --help`
    import torch

OPEN_CLIP_LOG_LINE = re.compile(r"Batch \(t\): (?P<batch_time>[0-9.]+), [0-9.e+]+/s, [0-9.e+]+/s/gpu")


def peer_plan(args, model_cfg, device: torch.device,
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
    from pipeline.model.config import MODEL_CONFIG_DIR

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

    from pipeline.model.config import register_open_clip_configs
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
