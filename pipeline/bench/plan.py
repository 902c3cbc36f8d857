"""Epoch plans at LAION scale, by simulation: `python -m pipeline bench plan`.

    python -m pipeline bench plan                  # 2k, 20k and 200k shards of ~10k samples, 1024 ranks x 8 workers
    python -m pipeline bench plan --huge           # and 500k shards (5 billion samples)
    python -m pipeline bench plan --shards 2000 --ranks 8 --workers 2 --canonical 64 --elastic-ranks 4

No tar is read: the data set is a list of synthetic shard sizes (`--samples-per-shard`, each varying by up to
`--spread` of it, seeded), and the loader's own code plans it. For one (rank, worker) of `--ranks` x
`--workers` over `--canonical` canonical streams (pipeline.data.plan) it measures:
  (a) epoch plan    the epoch's shard pieces in their (seed, epoch) order: what every worker computes
                    (StreamingDataset._pieces)
  (b) stream plans  the worker's C / (W K) canonical streams ready to read: segments and shuffle order
                    (StreamingDataset.plan), and the reading cursor of each (what a worker does before its
                    first read)
  (c) resume        a mid-epoch checkpoint's loader state loaded on the same layout (load_state_dict), then
                    the worker's cursors at that position: the position is samples per stream, so no replay
  (d) elastic       the same state loaded on `--elastic-ranks` x `--elastic-workers` (each worker then serves
                    more streams); its first stream's plan is checked against (b)'s
and the loader state a checkpoint holds per rank (StreamingLoader.state_dict(), pickled and torch.save'd).
Each figure: wall seconds (the best of `--repeat` runs), the tracemalloc peak (Python and numpy allocations; a
separate, traced pass) and the rise of the resident high-water mark above the resident size before the step
(VmHWM reset through /proc/self/clear_refs; large blocks are mmapped, MALLOC_MMAP_THRESHOLD_, so a freed
array leaves the resident set). Every size runs in a fresh process. The targets: at most 2 s and 64 MiB per
worker and step at 200k shards, a loader state of at most 1 MB per rank, cost at most linear in the shards
(the `x prev` ratio against the shards' ratio). Figures, not timed assertions.
"""

from __future__ import annotations

import gc
import hashlib
import io
import json
import os
import pickle
import re
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

from pipeline.bench.table import format_cells, write_results

DEFAULT_JSON = "runs/bench-plan.json"
REPO_ROOT = Path(__file__).resolve().parents[2]
MMAP_THRESHOLD_BYTES = 64 * 1024
MIB = 2 ** 20
TARGET_SECONDS = 2.0
TARGET_BYTES = 64 * MIB
TARGET_STATE_BYTES = 1_000_000
TARGET_AT_SHARDS = 200_000
HUGE_SHARDS = 500_000
STEPS = ("epoch plan", "stream plans", "resume", "elastic")


def add_arguments(parser) -> None:
    parser.add_argument("--shards", type=int, nargs="+", default=[2_000, 20_000, 200_000],
                        help="data set sizes in shards, ascending")
    parser.add_argument("--huge", action="store_true", help=f"also {HUGE_SHARDS:,} shards (5 billion samples)")
    parser.add_argument("--samples-per-shard", type=int, default=10_000, help="mean samples per shard")
    parser.add_argument("--spread", type=float, default=0.05,
                        help="each shard's size varies uniformly by up to this fraction of the mean")
    parser.add_argument("--ranks", type=int, default=1024, help="world size")
    parser.add_argument("--workers", type=int, default=8, help="data.workers per rank")
    parser.add_argument("--canonical", type=int, default=8192, help="data.canonical_streams")
    parser.add_argument("--global-batch", type=int, default=32768, help="train.global_batch_size")
    parser.add_argument("--elastic-ranks", type=int, default=512, help="world size of the elastic resume (d)")
    parser.add_argument("--elastic-workers", type=int, default=None, help="data.workers of (d) (default --workers)")
    parser.add_argument("--shuffle-buffer", type=int, default=1000, help="data.shuffle_buffer")
    parser.add_argument("--seed", type=int, default=0, help="run seed (plans) and shard sizes' seed")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of each step (the best is shown)")
    parser.add_argument("--json", default=DEFAULT_JSON, help="results file, rewritten after each size")


def run(args) -> int:
    sizes = sorted(set(args.shards) | ({HUGE_SHARDS} if args.huge else set()))
    settings = {key: value for key, value in vars(args).items() if key not in ("func", "json", "shards", "huge", "command", "bench")}
    settings["elastic_workers"] = args.elastic_workers or args.workers
    path = Path(args.json)
    result = {"benchmark": "plan", "settings": settings, "shards": sizes, "rows": []}
    print(f"bench plan: {args.ranks} ranks x {args.workers} workers, {args.canonical} canonical streams, global "
          f"batch {args.global_batch}, shuffle buffer {args.shuffle_buffer}; elastic resume on "
          f"{args.elastic_ranks} x {settings['elastic_workers']}; shards of {args.samples_per_shard} samples "
          f"(+-{args.spread:.0%}); one fresh process per size; results: {path}", flush=True)
    for shards in sizes:
        result["rows"].append(measure(shards, settings))
        write_results(path, result)
    print_table(result["rows"])
    return 0


def measure(shards: int, settings: dict) -> dict:
    """One size's figures, measured in a fresh process (its resident set is the step's alone)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD_BYTES),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    request = json.dumps({"shards": shards, **settings})
    done = subprocess.run([sys.executable, "-m", "pipeline.bench.plan", request], env=env, capture_output=True,
                          text=True, timeout=3600)
    if done.returncode:
        raise RuntimeError(f"bench plan at {shards} shards failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- the table -------------------------------------------------------------------------------------
def _ratio(value: float, previous: float | None) -> str:
    return f"x{value / previous:.2f}" if previous else "-"


def print_table(rows: list[dict]) -> None:
    """Per size: each step's seconds and memory with its target and the ratio to the previous size, and the
    loader state's bytes."""
    header = [("shards", "", 9), ("samples", "", 15), ("step", "", 14), ("seconds", "", 9), ("x prev", "", 8),
              ("target", "", 8), ("traced MiB", "", 11), ("RSS MiB", "", 9), ("x prev", "", 8), ("target", "", 8),
              ("x shards", "", 9)]
    print("\nbench plan: per worker, each step on its own (traced MiB: tracemalloc peak; RSS MiB: rise of the "
          "resident high-water mark)")
    print(format_cells(header))
    previous: dict | None = None
    for row in rows:
        growth = f"x{row['shards'] / previous['shards']:.1f}" if previous else "-"
        at_target = row["shards"] >= TARGET_AT_SHARDS
        for step in STEPS:
            figures = row["steps"][step]
            before = previous["steps"][step] if previous else None
            print(format_cells([
                (row["shards"], "{:,}", 9), (row["samples"], "{:,}", 15), (step, "", 14),
                (figures["seconds"], "{:.3f}", 9), (_ratio(figures["seconds"], before and before["seconds"]), "", 8),
                (f"<={TARGET_SECONDS:g}" if at_target else "-", "", 8),
                (figures["traced_bytes"] / MIB, "{:.1f}", 11), (figures["rss_bytes"] / MIB, "{:.1f}", 9),
                (_ratio(figures["traced_bytes"], before and before["traced_bytes"]), "", 8),
                (f"<={TARGET_BYTES // MIB}" if at_target else "-", "", 8), (growth, "", 9)]))
        state = row["state"]
        print(format_cells([(row["shards"], "{:,}", 9), (row["samples"], "{:,}", 15), ("state/rank", "", 14),
                            (f"  {state['pickle_bytes']:,} B pickled, {state['torch_save_bytes']:,} B torch.save "
                             f"(target <= {TARGET_STATE_BYTES:,} B); {row['streams_per_worker']} -> "
                             f"{row['elastic_streams_per_worker']} streams per worker, "
                             f"{row['samples_per_stream']:,} samples per stream", "", 0)]))
        previous = row
    verdicts = []
    for row in rows:
        if row["shards"] >= TARGET_AT_SHARDS:
            worst = max(STEPS, key=lambda step: row["steps"][step]["seconds"])
            heaviest = max(STEPS, key=lambda step: row["steps"][step]["traced_bytes"])
            ok = (row["steps"][worst]["seconds"] <= TARGET_SECONDS
                  and max(row["steps"][heaviest]["traced_bytes"], row["steps"][heaviest]["rss_bytes"]) <= TARGET_BYTES)
            verdicts.append(f"{row['shards']:,} shards: slowest step {worst} {row['steps'][worst]['seconds']:.2f} s, "
                            f"largest {heaviest} {row['steps'][heaviest]['traced_bytes'] / MIB:.1f} MiB: "
                            f"{'within' if ok else 'OUTSIDE'} the targets")
    if len(rows) >= 2:
        small, large = rows[-2], rows[-1]
        seconds = [large["steps"][step]["seconds"] / small["steps"][step]["seconds"] for step in STEPS]
        traced = [large["steps"][step]["traced_bytes"] / small["steps"][step]["traced_bytes"] for step in STEPS]
        verdicts.append(f"{small['shards']:,} -> {large['shards']:,} shards (x{large['shards'] / small['shards']:.1f}): "
                        f"seconds x{min(seconds):.2f} to x{max(seconds):.2f}, traced memory x{min(traced):.2f} to "
                        f"x{max(traced):.2f}")
    states_ok = all(row["state"]["torch_save_bytes"] <= TARGET_STATE_BYTES for row in rows)
    verdicts.append(f"loader state {'within' if states_ok else 'OUTSIDE'} {TARGET_STATE_BYTES:,} B at every size")
    print("; ".join(verdicts), flush=True)


# -- the measuring process -------------------------------------------------------------------------
def _status_bytes(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as handle:
        return int(re.search(rf"^{field}:\s+(\d+) kB", handle.read(), re.MULTILINE).group(1)) * 1024


def _reset_high_water_mark() -> None:
    with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
        handle.write("5")  # the resident high-water mark starts again from the current size


def shard_sizes(shards: int, mean: int, spread: float, seed: int) -> list[tuple[str, int]]:
    """(url, size) of `shards` synthetic shards named like a LAION-5B copy, sizes mean +- spread, seeded."""
    import numpy as np

    low, high = max(int(mean * (1 - spread)), 1), int(mean * (1 + spread)) + 1
    sizes = np.random.default_rng(seed).integers(low, high, size=shards)
    return [(f"s3://laion5b/laion2B-en/{index:06d}.tar", int(size)) for index, size in enumerate(sizes.tolist())]


def _loader(shards: list[tuple[str, int]], settings: dict, ranks: int, workers: int, rank: int):
    """A training StreamingLoader for `rank` of `ranks` over the shard list, built as build_loader builds it
    (no shard index is read: the sizes are given)."""
    from pipeline.data.config import DataConfig
    from pipeline.data.dataset import StreamingDataset
    from pipeline.data.loader import StreamingLoader

    cfg = DataConfig(train_urls="s3://laion5b/laion2B-en", batch_size=settings["global_batch"] // ranks,
                     workers=workers, canonical_streams=settings["canonical"], shuffle_buffer=settings["shuffle_buffer"])
    dataset = StreamingDataset(cfg, [shards], rank=rank, world_size=ranks, seed=settings["seed"], media_transform=None,
                               tokenizer=None, train=True, image_size=None, weights=[1.0],
                               global_batch=settings["global_batch"])
    fingerprint = hashlib.sha1(json.dumps([shards]).encode()).hexdigest()[:16]
    return StreamingLoader(dataset, cfg, fingerprint, device="cpu")


def _cursors(dataset, worker: int, epoch: int, step: int) -> list:
    """What a worker does before its first read of `epoch` from loader step `step` (StreamingDataset.parts_from):
    plan each of its streams and open a cursor at the position (the reader opens no shard until it is read)."""
    from collections import Counter

    from pipeline.data.dataset import StreamCursor

    counts: Counter = Counter()
    return [StreamCursor(dataset.plan(epoch, stream), dataset.cfg, counts, dataset.missing, step * dataset.per_step)
            for stream in dataset.streams_of(worker)]


def _step_figures(step, repeat: int) -> dict:
    """Seconds (the best of `repeat` untraced runs: the machine may be shared), the resident high-water mark's rise (first run) and the
    tracemalloc peak (one more, traced run) of `step()`, each run from a fresh state."""
    seconds = []
    rss = 0
    for attempt in range(repeat):
        gc.collect()
        _reset_high_water_mark()
        before = _status_bytes("VmRSS")
        started = time.perf_counter()
        kept = step()
        seconds.append(time.perf_counter() - started)
        if attempt == 0:
            rss = _status_bytes("VmHWM") - before
        del kept
    gc.collect()
    tracemalloc.start()
    kept = step()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del kept
    return {"seconds": min(seconds), "all_seconds": seconds, "traced_bytes": peak, "rss_bytes": rss}


def _measure_here(shards: int, samples_per_shard: int, spread: float, ranks: int, workers: int, canonical: int,
                  global_batch: int, elastic_ranks: int, elastic_workers: int, shuffle_buffer: int, seed: int,
                  repeat: int) -> dict:
    import torch

    from pipeline.data.plan import Layout, fit_error

    settings = {"canonical": canonical, "global_batch": global_batch, "shuffle_buffer": shuffle_buffer, "seed": seed}
    for world, kind in ((ranks, workers), (elastic_ranks, elastic_workers)):
        problem = fit_error(canonical, Layout(world, kind, global_batch // world), global_batch)
        if problem or global_batch % world:
            raise SystemExit(problem or f"--global-batch {global_batch} is not a multiple of world size {world}")
    listing = shard_sizes(shards, samples_per_shard, spread, seed)
    epoch, rank, worker = 1, 0, 0  # epoch 1: the circle starts past position 0 (the remainder moves)
    loader = _loader(listing, settings, ranks, workers, rank)
    dataset = loader.dataset
    # (a) the epoch plan
    figures = {"epoch plan": _step_figures(lambda: dataset._pieces(epoch), repeat)}

    # (b) the worker's streams from the epoch's start
    def stream_plans():
        dataset._plans.clear()
        return _cursors(dataset, worker, epoch, 0)

    figures["stream plans"] = _step_figures(stream_plans, repeat)
    reference = {stream: dataset.plan(epoch, stream) for stream in dataset.streams_of(worker)}
    # the checkpoint: halfway through the epoch
    loader.epoch, loader.batches_consumed = epoch, len(loader) // 2
    state = loader.state_dict()
    saved = io.BytesIO()
    torch.save(state, saved)
    state_figures = {"pickle_bytes": len(pickle.dumps(state)), "torch_save_bytes": len(saved.getvalue()),
                     "state": state}

    # (c) a resume on the same layout; (d) on the elastic layout
    def resume(target):
        def step():
            target.dataset._plans.clear()
            target.load_state_dict(state)
            return _cursors(target.dataset, worker, target.epoch, target.batches_consumed)
        return step

    same = _loader(listing, settings, ranks, workers, rank)
    figures["resume"] = _step_figures(resume(same), repeat)
    elastic = _loader(listing, settings, elastic_ranks, elastic_workers, rank)
    figures["elastic"] = _step_figures(resume(elastic), repeat)
    # the elastic worker's streams are canonical streams: its first is one (b) planned, and it is the same plan
    first = elastic.dataset.streams_of(worker)[0]
    if first in reference:
        mine, theirs = elastic.dataset.plan(epoch, first), reference[first]
        if mine.segments != theirs.segments or not (mine.order == theirs.order).all():
            raise AssertionError(f"canonical stream {first} is planned differently on the elastic layout")
    return {"shards": shards, "samples": dataset.total, "steps": figures, "state": state_figures,
            "streams_per_worker": len(dataset.streams_of(worker)),
            "elastic_streams_per_worker": len(elastic.dataset.streams_of(worker)),
            "samples_per_stream": dataset.epoch_plan.length, "loader_steps": len(loader),
            "elastic_position_steps": elastic.batches_consumed}


if __name__ == "__main__":
    print(json.dumps(_measure_here(**json.loads(sys.argv[1]))))
