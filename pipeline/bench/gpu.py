"""Training-step throughput per GPU: samples/s, step time, MFU / HFU, peak memory, ours vs two open_clip peers.

    python -m pipeline bench gpu --batch-size 256                  # (make bench-gpu) ViT-B-32, 224 px, amp_bf16
    python -m pipeline bench gpu --batch-size 1024 --json runs/bench-gpu/b1024.json
    python -m pipeline bench gpu --grad-checkpointing --compile    # ours with per-block torch.compile
    python -m pipeline bench gpu --data 'shards/laion/{00000..00099}.tar' --workers 8   # through pipeline.data.dataset
    python -m pipeline bench gpu --data 'shards/laion/{00000..00099}.tar' --workers 4 --decode gpu  # nvJPEG decode
    python -m pipeline bench gpu --find-max-batch --skip-open-clip --skip-handwritten  # largest batches, 300 s budget
    deepspeed --num_gpus 8 --no_local_rank --module pipeline bench gpu --skip-open-clip  # per-GPU figures, 8 ranks
    python -m pipeline bench gpu --model tiny-clip --precision fp32 --batch-size 8 --steps 5 --warmup 2  # CPU, tiny

One run measures, one after the other, on the same model, batch, precision and synthetic batches:
  ours                    one DeepSpeed engine built by training's own builder (`pipeline.train.loop.build_engine_for`:
                          model, optimizer, LR schedule, engine, compile, seeds, and TF32 on CUDA as train.tf32 sets
                          it by default, as open_clip's trainer does; the hand-written peer runs after it in this
                          process under the same setting) from the run config these flags stand for, stepped by
                          training's own `pipeline.train.step.train_step` (plain, or GradCache with --accum-steps);
                          device-resident synthetic batches (the step alone) or --data shards (the loader included:
                          the loader's batches go into the step as in training, --decode cpu|gpu is data.decode);
  ours, synthetic data    with --data, the same engine and batch on synthetic batches right after: the table gives
                          shards / synthetic samples/s (target >= 0.95 at batch 256) and each row's wait for its
                          next batch (mean, p90, share of the step);
  open_clip_train         open_clip's trainer (`open_clip_train.main --dataset-type synthetic`) as a subprocess in
                          the peer venv that `bench data` builds; its logged batch times give its samples/s;
  hand-written (eager, compiled)  `open_clip.create_model` + fused AdamW + autocast + ClipLoss, the few lines a
                          user writes, eager and under torch.compile (compiled: default on CUDA, --peer-compile on).
Each row gives samples/s per GPU, step time, MFU, HFU and peak memory, and each peer the ratio ours / peer.
Rows are written to --json (default runs/bench-gpu.json) as each finishes, so a time-out keeps the finished
rows; a peer that fails is recorded with its error, the others still run, and the exit status is 1.

How ours is timed, three measurements kept apart because measuring perturbs what is measured:
  throughput  `--steps` steps after `--warmup`, no host synchronisation inside the loop (one at each end);
              the hand-written peer is timed the same way on the same batches;
  breakdown   `--breakdown-steps` more steps with every phase timed: CUDA events on GPU (one synchronisation at
              the end of each step), perf_counter around synchronised phases elsewhere. Phases: data wait,
              forward, all-gather, loss, backward, gradient clipping, optimizer step; the rest is `other`;
  peak        a `--peak-matmul-size`^3 matmul in the run's matmul dtype, timed once in the same process: the
              denominator of MFU and HFU for every row (on CPU it is the CPU's rate: the arithmetic is exercised).
MFU and HFU are defined in pipeline.observe.flops: MFU counts model FLOPs (3 x forward) only, the trainer's definition;
HFU adds the forward that gradient checkpointing recomputes and GradCache's feature pass.

The rows are measured by pipeline.bench.gpu_ours (ours), pipeline.bench.gpu_peers (the peers) and
pipeline.bench.gpu_search (--find-max-batch), with the loop, batches and figures they share in
pipeline.bench.gpu_measure.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.bench.gpu_measure import release_memory
from pipeline.bench.gpu_ours import BenchRun, build_run, measure_ours
from pipeline.bench.gpu_peers import peer_plan
from pipeline.bench.gpu_search import find_max_batches
from pipeline.bench.table import cell, format_cells, write_results
from pipeline.core.errors import ConfigError

if TYPE_CHECKING:  # torch is imported where a benchmark runs, not for `bench gpu --help`
    import torch

DEFAULT_JSON = "runs/bench-gpu.json"
# the rows of one run, in the order they are measured
RUN_LABELS = {
    "ours": "ours (DeepSpeed)",
    "ours_synthetic": "ours, synthetic data",
    "open_clip_train": "open_clip_train",
    "handwritten_eager": "hand-written, eager",
    "handwritten_compiled": "hand-written, compiled",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="ViT-B-32", help="model name (pipeline.model.config.ModelConfig.name)")
    parser.add_argument("--precision", default="amp_bf16",
                        help="amp_bf16: fp32 master weights, bf16 autocast; amp: fp16 autocast, dynamic loss "
                        "scaling; fp32. The names are open_clip's: the same name goes to every peer")
    parser.add_argument("--batch-size", type=int, default=256, help="local micro-batch per GPU")
    parser.add_argument("--accum-steps", type=int, default=1,
                        help="GradCache micro-batches per step: the contrastive batch is batch x accum x world")
    parser.add_argument("--loss-chunk-size", type=int, default=0,
                        help="loss.chunk_size: compute the contrastive loss this many rows at a time (0: all at once); "
                             "e.g. 4096 for contrastive batches of 65,536")
    parser.add_argument("--steps", type=int, default=50, help="timed steps (throughput)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (allocator, cuDNN, compile)")
    parser.add_argument("--breakdown-steps", type=int, default=5, help="instrumented steps for the breakdown")
    parser.add_argument("--zero-stage", type=int, default=0, choices=(0, 1, 2, 3))
    parser.add_argument("--grad-checkpointing", action="store_true", help="recompute tower blocks in backward")
    parser.add_argument("--data", default="", help="shard URLs read through pipeline.data.dataset (default: synthetic)")
    parser.add_argument("--workers", type=int, default=8, help="loader workers (ours with --data, and open_clip's)")
    parser.add_argument("--decode", default="cpu", choices=("cpu", "gpu"),
                        help="with --data: data.decode, where images are decoded (gpu: the loader's workers read the "
                        "tars, the batch is decoded with nvJPEG on the step's device)")
    parser.add_argument("--fused-adamw", default="auto", choices=("auto", "on", "off"),
                        help="torch's fused AdamW kernel, through optim.fused (auto: training's default)")
    parser.add_argument("--compile", action="store_true",
                        help="ours: torch.compile per transformer block (pipeline.parallel.parallelize.compile_blocks); "
                        "open_clip_train: --torchcompile")
    parser.add_argument("--channels-last", action="store_true",
                        help="images in channels_last (only the ViT patch embedding is a convolution)")
    parser.add_argument("--peak-matmul-size", type=int, default=0,
                        help="side of the matmul that measures peak FLOP/s (default: 8192 on GPU, 1024 on CPU)")
    parser.add_argument("--find-max-batch", action="store_true",
                        help="search the largest local batch (with and without grad checkpointing) and the largest "
                        "GradCache contrastive batch that fit")
    parser.add_argument("--find-max-batch-budget-s", type=float, default=300.0,
                        help="time budget of the batch searches: when it is spent they stop and report the largest "
                        "batches found so far")
    parser.add_argument("--batch-limit", type=int, default=0,
                        help="upper end of the batch searches (default: 131072 on GPU, 16 on CPU, where running "
                        "out of memory kills the process instead of raising)")
    parser.add_argument("--contrastive-limit", type=int, default=0,
                        help="upper end of the GradCache contrastive-batch search (default: 262144 on GPU, 32 on CPU; "
                        "the aim is 65536)")
    parser.add_argument("--skip-open-clip", action="store_true", help="do not run open_clip's trainer")
    parser.add_argument("--open-clip-venv", default=".venv-openclip",
                        help="venv for open_clip's trainer (built by `bench data` if missing)")
    parser.add_argument("--skip-handwritten", action="store_true", help="do not run the hand-written open_clip step")
    parser.add_argument("--peer-compile", nargs="?", const="on", default="auto", choices=("auto", "on", "off"),
                        help="also time the hand-written step under torch.compile (auto: on CUDA only, compiling "
                        "on CPU is slow; --peer-compile alone: on)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=DEFAULT_JSON, help="results file, rewritten as each row finishes")


# -- results ---------------------------------------------------------------------------------------
# the table's columns after the run's label: (title, width)
COLUMNS = (("samples/s", 11), ("step ms", 10), ("MFU %", 8), ("HFU %", 8), ("peak GiB", 10), ("ours / this", 14),
           ("wait ms", 9), ("p90 ms", 9), ("wait %", 8))


def format_row(name: str, row: dict[str, Any]) -> str:
    label = row.get("label", RUN_LABELS[name])
    if "error" in row:
        return f"{label:34}failed: {row['error'].splitlines()[0][:120]}"
    if "skipped" in row:
        return f"{label:34}skipped: {row['skipped']}"
    percent = {key: row[key] * 100 if row.get(key) is not None else None for key in ("mfu", "hfu")}
    ratio = row.get("ours_vs_this")
    share = row["data_wait_share"] * 100 if row.get("data_wait_share") is not None else None
    values = ((row["samples_per_s_per_gpu"], "{:.1f}"), (row["step_s"] * 1e3, "{:.1f}"), (percent["mfu"], "{:.2f}"),
              (percent["hfu"], "{:.2f}"), (row.get("peak_memory_gb"), "{:.2f}"), (ratio, "{:.2f}x"),
              (row.get("data_wait_ms_mean"), "{:.2f}"), (row.get("data_wait_ms_p90"), "{:.2f}"), (share, "{:.1f}"))
    return f"{label:34}" + format_cells((value, fmt, width) for (value, fmt), (_, width) in zip(values, COLUMNS))


def format_table(result: dict[str, Any]) -> str:
    flops = result["flops_per_sample"]
    lines = [f"{result['model']} {result['precision']}, local batch {result['batch_size']} x accum "
             f"{result['accum_steps']} x {result['world_size']} ranks, {result['device']}, data: {result['data']}",
             f"FLOPs/sample: model {flops['model'] / 1e9:.3f} G (MFU), executed {flops['executed'] / 1e9:.3f} G "
             f"(HFU); measured matmul peak {result['peak_flops'] / 1e12:.3f} TFLOP/s ({result['peak_matmul']})",
             f"{'run':34}" + format_cells((title, "{}", width) for title, width in COLUMNS)]
    lines += [format_row(name, row) for name, row in result["runs"].items()]
    if result.get("data_vs_synthetic") is not None:
        lines.append(f"shards / synthetic data: {result['data_vs_synthetic']:.3f} of the samples/s at batch "
                     f"{result['batch_size']} (target >= 0.95 at batch 256); wait: the step's wait for its next batch "
                     "(host time in the loader, mean and p90 over the timed steps, and the mean's share of the step)")
    ours = result["runs"].get("ours", {})
    if "breakdown" in ours:
        breakdown = ours["breakdown"]
        lines.append(f"breakdown of ours over {result['breakdown_steps']} instrumented steps (ms; step "
                     f"{breakdown['step'] * 1e3:.2f}, slower than un-instrumented: it synchronises):")
        lines.append("  " + "  ".join(f"{name} {seconds * 1e3:.2f}" for name, seconds in breakdown.items()
                                      if name != "step"))
    if "max_batch" in result:
        found = result["max_batch"]
        stopped = (f"; stopped on the {found['budget_s']:g} s budget: the figures are lower bounds, '-' not searched"
                   if found["stopped_on_budget"] else "")
        lines.append(f"largest local batch: {cell(found['max_local_batch'], '{}')} (checkpointing: "
                     f"{cell(found['max_local_batch_checkpointing'], '{}')}); GradCache contrastive batch: "
                     f"{cell(found['max_contrastive_batch_gradcache'], '{}')} (micro "
                     f"{cell(found['gradcache_micro_batch'], '{}')}); search limits {found['limit']} / "
                     f"{found['contrastive_limit']}, {found['elapsed_s']:.0f} s{stopped}")
    return "\n".join(lines)


# -- the command -----------------------------------------------------------------------------------
def _validate(args) -> None:
    from pipeline.parallel.parallelize import check_precision_name

    if args.precision == "auto":
        raise ConfigError("--precision: name amp_bf16, amp or fp32 (the same name goes to every peer)")
    check_precision_name(args.precision)
    for flag in ("batch_size", "accum_steps", "steps", "breakdown_steps", "find_max_batch_budget_s"):
        if getattr(args, flag) <= 0:
            raise ConfigError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    for flag in ("warmup", "workers", "peak_matmul_size", "batch_limit", "contrastive_limit"):
        if getattr(args, flag) < 0:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
    if args.decode == "gpu" and not args.data:
        raise ConfigError("--decode gpu decodes the images of --data shards; give --data (synthetic batches "
                          "need no decoding)")


class Results:
    """The results of one run: its settings, then each row as it finishes, with the ratio and MFU / HFU derived
    here, once for all rows. Rank 0 prints each row and rewrites the file, so a time-out keeps the finished rows."""

    def __init__(self, path: Path, settings: dict[str, Any], precision: str, main: bool):
        self.path, self.precision, self.main = path, precision, main
        self.result: dict[str, Any] = {**settings, "runs": {}}

    def finish_row(self, name: str, row: dict[str, Any]) -> None:
        from pipeline.observe.flops import utilisation

        result, runs = self.result, self.result["runs"]
        row = {"label": RUN_LABELS[name], "precision": self.precision, **row}
        if "samples_per_s_per_gpu" in row:
            row.update(utilisation(result["flops_per_sample"], row["samples_per_s_per_gpu"], result["peak_flops"]))
            if name == "ours_synthetic":  # shards vs synthetic data through the same engine: the loader's cost
                row["ours_vs_this"] = runs["ours"]["samples_per_s_per_gpu"] / row["samples_per_s_per_gpu"]
                result["data_vs_synthetic"] = row["ours_vs_this"]
            elif name != "ours":  # the peers run on synthetic data: compared with ours on the same
                reference = runs.get("ours_synthetic", runs["ours"])
                row["ours_vs_this"] = reference["samples_per_s_per_gpu"] / row["samples_per_s_per_gpu"]
        runs[name] = row
        if self.main:
            print(format_row(name, row), flush=True)
            self.save()

    def save(self) -> None:
        write_results(self.path, self.result)


def _settings(args, bench: BenchRun) -> dict[str, Any]:
    """The run's settings and device, its FLOPs per sample and the measured matmul peak (MFU's denominator)."""
    import torch

    from pipeline.observe.flops import MATMUL_DTYPE, flops_per_sample, measure_matmul_peak

    device = bench.device
    on_gpu = device.type == "cuda"
    flops = flops_per_sample(bench.model_cfg, args.grad_checkpointing, args.accum_steps > 1)
    size = args.peak_matmul_size or (8192 if on_gpu else 1024)
    peak = measure_matmul_peak(device, MATMUL_DTYPE[args.precision], size)
    return {
        "model": args.model, "precision": args.precision, "batch_size": args.batch_size,
        "accum_steps": args.accum_steps, "contrastive_batch": args.batch_size * args.accum_steps * bench.world_size,
        "world_size": bench.world_size, "zero_stage": args.zero_stage,
        "grad_checkpointing": args.grad_checkpointing, "compile": args.compile, "channels_last": args.channels_last,
        "device": torch.cuda.get_device_name(device) if on_gpu else f"CPU ({torch.get_num_threads()} threads)",
        "data": (f"{args.data} (decode={args.decode}, {args.workers} workers)" if args.data
                 else "synthetic (device-resident)"), "steps": args.steps, "warmup": args.warmup,
        "breakdown_steps": args.breakdown_steps, "flops_per_sample": flops, "peak_flops": peak,
        "peak_matmul": f"{size}^3 {str(MATMUL_DTYPE[args.precision]).removeprefix('torch.')}",
    }


def _measure_ours(bench: BenchRun, args, results: Results) -> None:
    """Ours; with --data, then the same engine on synthetic batches at the same batch: what the loader costs."""
    if results.main:
        print(f"measuring ours: {args.warmup} warmup + {args.steps} timed + {args.breakdown_steps} instrumented "
              f"steps; rows go to {results.path} as they finish", flush=True)
    label = "ours (DeepSpeed, compiled blocks)" if args.compile else RUN_LABELS["ours"]
    if args.data:
        label = f"ours, shards (decode={args.decode}{', compiled' if args.compile else ''})"
    results.finish_row("ours", {**measure_ours(bench, args), "label": label})
    if args.data:
        if results.main:
            print("measuring ours on synthetic data (same engine and batch)...", flush=True)
        synthetic_label = f"ours, synthetic data{' (compiled)' if args.compile else ''}"
        results.finish_row("ours_synthetic", {**measure_ours(bench, args, synthetic=True), "label": synthetic_label})


def _search_batches(bench: BenchRun, args, results: Results) -> None:
    """--find-max-batch: the largest batches that fit, within --find-max-batch-budget-s."""
    on_gpu = bench.device.type == "cuda"
    limit = args.batch_limit or (131072 if on_gpu else 16)
    contrastive_limit = args.contrastive_limit or (262144 if on_gpu else 32)
    if results.main:
        print(f"searching the largest batches (local limit {limit}, contrastive limit {contrastive_limit}, "
              f"budget {args.find_max_batch_budget_s:g} s)", flush=True)
    results.result["max_batch"] = find_max_batches(bench, limit, contrastive_limit, args.find_max_batch_budget_s,
                                                   progress=print if results.main else (lambda _: None))
    if results.main:
        results.save()


def _measure_peers(plan, args, model_cfg, device: torch.device, results: Results) -> list[str]:
    """Each peer of `plan` (pipeline.bench.gpu_peers.peer_plan) measured or recorded as skipped; returns the
    names of those that failed (a failing peer's error is its row: the others still run)."""
    failed = []
    for name, measure, why in plan:
        if measure is None:
            results.finish_row(name, {"skipped": why})
            continue
        print(f"measuring {RUN_LABELS[name]} ({model_cfg.name}, batch {args.batch_size}, {args.precision})...",
              flush=True)
        try:
            row = measure()
        except Exception as error:  # one failing peer must not cost the rows of the others
            traceback.print_exc()
            failed.append(name)
            row = {"error": f"{type(error).__name__}: {error}"}
        results.finish_row(name, row)
        release_memory(device, compiled=name == "handwritten_compiled")
    return failed


def run(args) -> int:
    _validate(args)
    from pipeline.parallel import distributed

    bench = build_run(args)
    results = Results(Path(args.json), _settings(args, bench), args.precision, main=bench.rank == 0)
    _measure_ours(bench, args, results)
    if args.find_max_batch:
        _search_batches(bench, args, results)
    distributed.barrier()
    model_cfg, device = bench.model_cfg, bench.device
    plan = peer_plan(args, model_cfg, device, bench.world_size) if results.main else []
    del bench  # ours' engine, optimizer state and batches: the peers' peak memory is their own
    release_memory(device, compiled=args.compile)
    failed = _measure_peers(plan, args, model_cfg, device, results)
    if results.main:
        print(format_table(results.result), flush=True)
        print(f"results: {results.path}")
        if failed:
            print(f"failed: {', '.join(failed)} (their errors are in the table and the results file)", flush=True)
    sys.stdout.flush()
    return 1 if failed else 0
