"""Command line: `python -m pipeline <command> ...`; `--help` on each command explains it.

    python -m pipeline shards build --source shapes --split train --output shards/shapes/train
    python -m pipeline shards verify shards/shapes/train
    python -m pipeline train --config configs/demo-clip.yaml optim.lr=1e-3
    python -m pipeline eval RUN_DIR
    python -m pipeline export RUN_DIR OUT.pt
    python -m pipeline bench shards|data|gpu
    python -m pipeline demo --config configs/demo-clip.yaml

Each command lives in its own module, which registers its sub-parser through
`register_cli(subparsers)`; modules are imported only as far as building the parser needs. A command that
runs loads torch and the modules it names in its `imports` default with the cyclic garbage collector off, then
freezes what they built out of it (`load_imports`).

Exit status: 0 done; 2 the user's to fix, with one line `error: ...` on stderr and no traceback (a bad
or unknown setting, a missing or unreadable run, checkpoint or file: ConfigError; a command that produced
or found nothing to check; a diverged run: FloatingPointError, "loss is nan at step N"); 1 with the same
one line for a shard that cannot be read (`shards ls`, `shards index`), as for a problem `shards verify`
finds; 75 stopped by SIGTERM/SIGUSR1 after saving a checkpoint
(pipeline.train.preemption: requeue and resume with train.resume=auto); anything else is a bug or an
environment failure and keeps its traceback (1). Under a launcher only rank 0 prints the line; every
rank exits with the same status.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import sys

# command name -> (module that registers it, its line in `python -m pipeline --help`)
COMMANDS = {
    "shards": ("pipeline.shards.cli", "build, verify, list or index WebDataset tar shards"),
    "train": ("pipeline.commands.train", "train with DeepSpeed (any launcher, or one process)"),
    "demo": ("pipeline.commands.demo", "build the embedded shards, train on 2 local ranks, print held-out results"),
    "eval": ("pipeline.commands.runs", "retrieval R@1/5/10 and zero-shot accuracy of a trained run on held-out shards"),
    "export": ("pipeline.commands.runs", "write a run's weights as an open_clip state dict"),
    "bench": ("pipeline.bench.table", "run a benchmark (`bench --help` lists them)"),
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser for `argv`: only the module of the command it names is imported, so `--help` (of the CLI,
    or of a command whose module defers its heavy imports) never loads torch, open_clip or deepspeed.
    Without a command, each is listed by its line in COMMANDS."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline",
        description="Contrastive (CLIP/CLAP) pretraining pipeline: build shards, train with DeepSpeed, "
        "evaluate, export to open_clip, benchmark.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    named = next((arg for arg in (sys.argv[1:] if argv is None else argv) if not arg.startswith("-")), None)
    if named in COMMANDS:
        importlib.import_module(COMMANDS[named][0]).register_cli(subparsers)
    else:
        for name, (_, line) in COMMANDS.items():
            subparsers.add_parser(name, help=line)
    return parser


USER_ERROR_EXIT_CODE = 2


def load_imports(modules: tuple[str, ...] = ()) -> None:
    """Import `modules` (the train command's: 760,000 objects, torch and open_clip among them) without the
    cyclic garbage collector, then move everything alive into its permanent generation (`gc.freeze`).

    With the collector on, an import this size sets off about 1,200 collections, 7 of them full ones that walk
    the growing heap: 0.7 s of the 4.5 s that `python -m pipeline train` takes to import on 2 cores, paid by
    every rank of every launch. Frozen, the modules' objects are never walked again: later full collections
    scan only what the command itself allocates, and forked processes (DataLoader workers) do not touch, and so
    copy, the parent's pages when they collect. The cost: a reference cycle left by an import is never freed.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        for name in modules:
            importlib.import_module(name)
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


def launcher_rank() -> int:
    """This process's rank as its launcher announced it (torchrun / deepspeed: RANK; srun: SLURM_PROCID);
    0 for a plain process."""
    for variable in ("RANK", "SLURM_PROCID"):
        value = os.environ.get(variable, "")
        if value.isdigit():
            return int(value)
    return 0


def report(message: str) -> None:
    """One line on stderr, from rank 0 only: every rank meets the same error, the user needs it once."""
    if launcher_rank() == 0:
        if "tqdm" in sys.modules:
            # a progress bar left open by the error would run into the message: end its line first
            for bar in list(getattr(sys.modules["tqdm"].tqdm, "_instances", ())):
                bar.close()
        print(" ".join(message.split()), file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    from pipeline.core.errors import ConfigError

    parser = build_parser(argv)
    args = parser.parse_args(argv)
    # torch, and the modules the command names, only once a command runs: not for --help
    load_imports(("pipeline.train.preemption", *getattr(args, "imports", ())))
    from pipeline.train.preemption import Preempted

    if not getattr(args, "func", None):
        parser.print_help()
        return USER_ERROR_EXIT_CODE
    try:
        return int(args.func(args) or 0)
    except (ConfigError, FloatingPointError) as error:
        # a bad setting, a missing or unreadable input, or a diverged run: the message names what to fix,
        # a traceback (from every rank) would only bury it
        report(f"error: {error}")
        # a few errors carry their own status: an unreadable shard exits 1, as a problem `shards verify` finds
        return getattr(error, "exit_status", USER_ERROR_EXIT_CODE)
    except Preempted as stop:
        report(str(stop))
        return stop.exit_code


if __name__ == "__main__":
    sys.exit(main())
