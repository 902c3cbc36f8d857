"""Command line: `python -m pipeline <command> ...`; `--help` on each command explains it.

    python -m pipeline shards build --source shapes --split train --output shards/shapes/train
    python -m pipeline shards verify shards/shapes/train
    python -m pipeline train --config configs/demo-clip.yaml optim.lr=1e-3
    python -m pipeline eval RUN_DIR
    python -m pipeline export RUN_DIR OUT.pt
    python -m pipeline bench shards|data|gpu
    python -m pipeline demo --config configs/demo-clip.yaml

Each command lives in its own module, which registers its sub-parser through
`register_cli(subparsers)`; modules are imported only as far as building the parser needs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command name -> module that registers it
COMMANDS = {
    "shards": "pipeline.shards",
    "train": "pipeline.train",
    "demo": "pipeline.train",
    "eval": "pipeline.evaluate",
    "export": "pipeline.checkpoint",
    "bench": "pipeline.bench",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline",
        description="Contrastive (CLIP/CLAP) pretraining pipeline: build shards, train with DeepSpeed, "
        "evaluate, export to open_clip, benchmark.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    registered = set()
    for module_name in dict.fromkeys(COMMANDS.values()):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name != module_name:
                raise
            continue  # command not built yet
        module.register_cli(subparsers)
        registered.add(module_name)
    return parser


def main(argv: list[str] | None = None) -> int:
    from pipeline.config import ConfigError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ConfigError as error:
        # a bad setting is the user's to fix: say which, without a traceback
        print(f"{parser.prog} {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
