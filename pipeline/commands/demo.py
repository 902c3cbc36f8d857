"""The demo: build the embedded shards if missing, train on 2 local ranks, print held-out results.

    python -m pipeline demo --config configs/demo-clip.yaml      # (make demo) image-text, shapes
    python -m pipeline demo --config configs/demo-clap.yaml      # (make demo-clap) audio-text, tones

Training runs through the deepspeed launcher (GPUs if present, else DeepSpeed's CPU accelerator with
gloo), as a user would start it; this process only prepares, launches and reports: the trainer's own
closing summary (figures beside chance, where the run is) ends the output. torch and the
trainer are imported when the command runs, not when the CLI registers it (`--help` stays quick).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from pipeline.data.shardformat import SIZES_FILE


def ensure_embedded_shards(cfg) -> None:
    """Build the embedded data set a demo config points at (shards/<set>/<split>) if it is missing."""
    for urls, split in ((cfg.data.train_urls, "train"), (cfg.data.val_urls, "val")):
        directory = Path(urls)
        if not urls or (directory / SIZES_FILE).is_file():
            continue
        from pipeline.shards.build import build_shards
        from pipeline.shards.config import BuildConfig

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


def where_it_runs(gpus: int, nproc: int, launcher: str) -> str:
    """One line saying where the ranks run. Without a GPU, the deepspeed launcher still counts ranks as
    --num_gpus and sets CUDA_VISIBLE_DEVICES=0,1 (printed in its log), which nothing reads on the CPU."""
    if gpus:
        return f"{nproc} rank{'s' if nproc > 1 else ''} on {nproc} of {gpus} GPU{'s' if gpus > 1 else ''}"
    line = f"no GPU: {nproc} ranks on the CPU (DeepSpeed's CPU accelerator, gloo)"
    if Path(launcher).name == "deepspeed":
        line += (f"; the deepspeed launcher's --num_gpus {nproc} counts these processes, and the "
                 f"CUDA_VISIBLE_DEVICES it sets is not used")
    return line


def _demo_command(args: argparse.Namespace) -> int:
    import torch

    from pipeline.train.loop import load_run_config

    cfg = load_run_config(args.config, args.overrides)
    ensure_embedded_shards(cfg)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    nproc = args.nproc or (max(1, min(2, gpus)) if gpus else 2)
    overrides = list(args.overrides)
    if cfg.train.resume == "none" and not any(item.startswith("train.overwrite=") for item in overrides):
        # the demo is run again and again: a fresh demo run replaces the previous one's checkpoints
        overrides.append("train.overwrite=true")
    command = launch_command(args.config, overrides, nproc)
    print(f"training {cfg.train.steps} steps: {where_it_runs(gpus, nproc, command[0])}", flush=True)
    print("running:", " ".join(command), flush=True)
    started = time.time()
    result = subprocess.run(command)
    if result.returncode != 0:
        print(f"training failed (exit code {result.returncode})", file=sys.stderr)
        return result.returncode
    print(f"demo: the launch took {time.time() - started:.0f} s (start-up, training, evaluations, checkpoints)")
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
