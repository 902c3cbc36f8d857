"""Benchmarks: `python -m pipeline bench BENCHMARK [options]` (`bench BENCHMARK --help` for each).

    python -m pipeline bench data                     # the loader vs open_clip's webdataset pipeline
    python -m pipeline bench gpu --batch-size 256     # a training step vs open_clip's trainer (needs a GPU)
    python -m pipeline bench soak --config configs/demo-clip.yaml train.steps=3000

Each prints its figures and the ratio against a peer run side by side (never a timed assertion);
`soak` prints the memory and open files of every process of a long training run, `plan` the cost of
the epoch plan at LAION scale, `precision` the demo's zero-shot top-1 in each precision mode beside
fp32's.
"""
# The docstring is `bench --help`. Each benchmark lives in its own module (shards.py, data.py, gpu.py, loss.py,
# soak.py, plan.py, precision.py) exposing `add_arguments(parser)` and `run(args)`; what they share, the results
# file and the table cells, is here.

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

BENCHMARKS = {
    "shards": ("pipeline.bench.shards", "shard building vs a plain webdataset ShardWriter loop"),
    "data": ("pipeline.bench.data", "streaming loader vs open_clip's webdataset pipeline and the decode ceiling"),
    "gpu": ("pipeline.bench.gpu", "ViT-B/32 amp_bf16 training step throughput and MFU vs open_clip's trainer and a hand-written step"),
    "loss-memory": ("pipeline.bench.loss", "peak memory of the contrastive loss vs the batch N: linear when chunked"),
    "soak": ("pipeline.bench.soak", "a long multi-rank training run: RSS and open files of every process over the steps"),
    "plan": ("pipeline.bench.plan", "epoch plans, resumes and loader state at LAION-5B scale, from synthetic shard sizes"),
    "precision": ("pipeline.bench.precision", "the demo trained in fp32, amp_bf16 and amp: each zero-shot top-1 beside fp32's"),
}


def register_cli(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="run a benchmark (shards, data, gpu, loss-memory, soak, plan, precision)", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    benches = parser.add_subparsers(dest="bench", metavar="BENCHMARK", parser_class=_BenchmarkParser)
    for name, (module_name, summary) in BENCHMARKS.items():
        if importlib.util.find_spec(module_name) is None:  # a benchmark module this checkout lacks
            continue
        benches.add_parser(name, help=summary).module_name = module_name


class _BenchmarkParser(argparse.ArgumentParser):
    """A benchmark's parser that imports its module (torch, open_clip) and takes its arguments only when that
    benchmark is parsed: `bench --help` lists the benchmarks from BENCHMARKS alone, in milliseconds."""

    module_name: str | None = None

    def parse_known_args(self, args=None, namespace=None):
        if self.module_name is not None:
            module, self.module_name = importlib.import_module(self.module_name), None
            self.description = module.__doc__
            module.add_arguments(self)
            self.set_defaults(func=module.run)
        return super().parse_known_args(args, namespace)


def write_results(path: Path, result: dict) -> None:
    """Rewrite a benchmark's whole results file; atomic, so a kill while writing leaves the previous version."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(result, indent=2))
    os.replace(partial, path)


def cell(value: Any, fmt: str, width: int = 0) -> str:
    """One table cell right-aligned in `width`: `value` in `fmt`, a text as it is, '-' where there is none."""
    text = "-" if value is None else value if isinstance(value, str) else fmt.format(value)
    return f"{text:>{width}}" if width else text


def format_cells(cells: Iterable[tuple[Any, str, int]]) -> str:
    """One line of a benchmark's table: each (value, format, width) as `cell` writes it, side by side."""
    return "".join(cell(value, fmt, width) for value, fmt, width in cells)
