"""The demo: build the embedded shards if missing, train on 2 local ranks, print held-out results.

    python -m pipeline demo --config configs/demo-clip.yaml      # (make demo) image-text, shapes
    python -m pipeline demo --config configs/demo-clap.yaml      # (make demo-clap) audio-text, tones

Training runs through the deepspeed launcher (GPUs if present, else DeepSpeed's CPU accelerator with
gloo), as a user would start it; this process only prepares, launches and reports. Layer 4.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from pipeline.evaluate import format_table
from pipeline.metrics import read_metrics
from pipeline.shardformat import SIZES_FILE
from pipeline.shards import BuildConfig, build_shards
from pipeline.train import load_run_config, run_dir_of


def ensure_embedded_shards(cfg) -> None:
    """Build the embedded data set a demo config points at (shards/<set>/<split>) if it is missing."""
    for urls, split in ((cfg.data.train_urls, "train"), (cfg.data.val_urls, "val")):
        directory = Path(urls)
        if not urls or (directory / SIZES_FILE).is_file():
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
    parser = subparsers.add_parser(
        "demo", help="build the embedded shards, train on 2 local ranks, print held-out results",
        description="The tiny CLIP (or CLAP) demo: builds shards if missing, trains with 2 local ranks through "
        "the deepspeed launcher (GPUs if present, else CPU), evaluates, prints a results table and the plot path.",
    )
    parser.add_argument("--config", default="configs/demo-clip.yaml", help="demo run config")
    parser.add_argument("--nproc", type=int, default=0, help="local ranks (default: 2)")
    parser.add_argument("overrides", nargs="*", help="dot-list overrides")
    parser.set_defaults(func=_demo_command)
