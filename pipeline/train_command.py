"""The `train` command: `python -m pipeline train --config FILE [KEY=VALUE ...]`.

    python -m pipeline train --config configs/demo-clip.yaml                        # one process (CPU or GPU)
    deepspeed --num_gpus 2 --no_local_rank --module pipeline train --config configs/demo-clip.yaml  # 2 local ranks
    torchrun --nproc_per_node 2 -m pipeline train --config configs/vit-b-32.yaml train.zero_stage=2
    python -m pipeline train --config configs/demo-clip.yaml train.resume=auto      # continue where it stopped

Every rank runs the same command; the config (YAML file, then the dot-list overrides) is validated
before any work. The run directory is `train.output_dir/train.name`: config.yaml, metrics.jsonl,
TensorBoard events, checkpoints/, curves.png. Rank 0 ends with a summary: steps, samples, time, loss,
the last held-out figures beside chance, where the run is, and what the data lacked.

The loop is pipeline.train; this module only declares the command, so that `--help` imports neither
torch nor DeepSpeed (they load when the command runs). Layer 4 (programs).
"""

from __future__ import annotations

import argparse


def _train_command(args: argparse.Namespace) -> int:
    from pipeline.train import load_run_config, train

    train(load_run_config(args.config, args.overrides))
    return 0


def register_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="train with DeepSpeed (any launcher, or one process)", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, help="YAML run config (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="dot-list overrides, e.g. optim.lr=1e-3 train.steps=100")
    parser.set_defaults(func=_train_command)
