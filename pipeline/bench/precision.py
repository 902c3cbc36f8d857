"""Precision: the demo trained once per precision mode, each final zero-shot top-1 beside fp32's:
`python -m pipeline bench precision`.

    python -m pipeline bench precision                                    # configs/demo-clip.yaml: fp32, amp_bf16, amp
    python -m pipeline bench precision --modes fp32,amp_bf16 train.steps=200

Every mode is the same run (config, seed, data, steps) with only train.precision changed, started as the demo
starts it (`pipeline.commands.demo.launch_command`: the deepspeed launcher, else torchrun) into its own run
directory `<train.name>-<mode>`, its output in `<run dir>/bench-precision.log`. A mode is held to fp32's final
zero-shot top-1 (the last evaluation of the run) within `--points` percentage points (2 by default): a mode
further away fails the benchmark (exit 1). Where the hardware has no arithmetic for a mode it is skipped, and
the table says why: fp16 (`amp`) on a CPU without the avx512_fp16 or amx_fp16 instructions, bf16 on a GPU
without bf16. bf16 on a CPU without avx512_bf16 / amx_bf16 runs (PyTorch converts in software: slower, the
same rounding), and the table says so. Results: runs/bench-precision.json. A figure, not a timed assertion:
tests/bench/test_bench_precision.py runs it for a few steps.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from pipeline.bench.table import format_cells, write_results
from pipeline.core.errors import ConfigError

MODES = ("fp32", "amp_bf16", "amp")
CPU_ARITHMETIC = {"amp_bf16": ("avx512_bf16", "amx_bf16"), "amp": ("avx512_fp16", "amx_fp16")}


def add_arguments(parser) -> None:
    parser.add_argument("--config", default="configs/demo-clip.yaml", help="training run config (default: the demo's)")
    parser.add_argument("--modes", default=",".join(MODES),
                        help=f"train.precision values to train, comma-separated; fp32 first, the reference "
                             f"(default: {','.join(MODES)})")
    parser.add_argument("--points", type=float, default=2.0,
                        help="largest distance from fp32's final zero-shot top-1, in percentage points (default: 2)")
    parser.add_argument("--nproc", type=int, default=2, help="local ranks (default: 2)")
    parser.add_argument("--json", default="runs/bench-precision.json", help="results file")
    parser.add_argument("overrides", nargs="*", help="dot-list overrides of the training config, e.g. train.steps=200")


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def hardware_note(mode: str, gpu: bool, flags: set[str]) -> tuple[str | None, str]:
    """(why the mode is skipped or None, a note on how it runs) for this machine."""
    import torch

    if mode == "fp32":
        return None, ""
    if gpu:
        if mode == "amp_bf16" and not torch.cuda.is_bf16_supported():
            return f"{torch.cuda.get_device_name()} has no bf16 arithmetic", ""
        return None, ""
    native = [flag for flag in CPU_ARITHMETIC[mode] if flag in flags]
    if native:
        return None, f"native ({', '.join(native)})"
    capability = torch.backends.cpu.get_cpu_capability()
    if mode == "amp":
        return (f"this CPU ({capability}) has no fp16 arithmetic (neither avx512_fp16 nor amx_fp16): train it where "
                "the hardware has it"), ""
    return None, f"converted in software: this CPU ({capability}) has neither avx512_bf16 nor amx_bf16"


def train_mode(config: str, overrides: list[str], mode: str, nproc: int) -> dict:
    """One training run in `mode`; its final figures, read from its metrics.jsonl (`returncode` set where the
    run failed)."""
    from pipeline.commands.demo import ensure_embedded_shards, launch_command
    from pipeline.observe.metrics import read_metrics
    from pipeline.train.loop import load_run_config, run_dir_of

    base = load_run_config(config, overrides)
    ensure_embedded_shards(base)
    mode_overrides = [*overrides, f"train.precision={mode}", f"train.name={base.train.name}-{mode}",
                      "train.resume=none", "train.overwrite=true"]
    run_dir = run_dir_of(load_run_config(config, mode_overrides))
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / "bench-precision.log"
    command = launch_command(config, mode_overrides, nproc)
    print(f"{mode}: training {base.train.steps} steps, output in {log_path}", flush=True)
    started = time.monotonic()
    with open(log_path, "w", encoding="utf-8") as log:
        returncode = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode
    seconds = time.monotonic() - started
    if returncode != 0:
        return {"mode": mode, "run_dir": str(run_dir), "returncode": returncode, "log": str(log_path)}
    records = read_metrics(run_dir / "metrics.jsonl")
    evals = [r for r in records if r["kind"] == "eval" and "zero_shot_top1" in r]
    if not evals:
        raise ConfigError(f"the {mode} run logged no zero-shot evaluation (see {log_path}): bench precision needs "
                          "data.val_urls with a classes.json, and compares the last evaluation of each run")
    train = [r for r in records if r["kind"] == "train"]
    return {"mode": mode, "run_dir": str(run_dir), "seconds": seconds, "step": evals[-1]["step"],
            "zero_shot_top1": evals[-1]["zero_shot_top1"], "loss": train[-1]["loss"] if train else None}


def compare(rows: list[dict], points: float) -> list[str]:
    """Sets each trained row's distance from fp32 (`points_vs_fp32`) and `within`; returns the failures."""
    reference = next(r for r in rows if r["mode"] == "fp32")
    failures = []
    for row in rows:
        if "zero_shot_top1" not in row:
            continue
        row["points_vs_fp32"] = 100 * (row["zero_shot_top1"] - reference["zero_shot_top1"])
        row["within"] = abs(row["points_vs_fp32"]) <= points
        if not row["within"]:
            failures.append(f"{row['mode']}: zero-shot top-1 {100 * row['zero_shot_top1']:.2f}% is "
                            f"{row['points_vs_fp32']:+.2f} points from fp32's {100 * reference['zero_shot_top1']:.2f}% "
                            f"(allowed: {points:g})")
    return failures


def print_table(rows: list[dict], points: float) -> None:
    print(f"\n{'mode':<10}{'zero-shot top-1':>16}{'vs fp32':>11}{'final loss':>12}{'time':>9}  note")
    for row in rows:
        if "zero_shot_top1" not in row:
            print(f"{row['mode']:<10}  skipped: {row['skipped']}")
            continue
        vs = "-" if row["mode"] == "fp32" else f"{row['points_vs_fp32']:+.2f} pt"
        verdict = "" if row["mode"] == "fp32" else (f"within {points:g} points" if row["within"] else
                                                     f"MORE than {points:g} points")
        note = "; ".join(filter(None, [verdict, row.get("note", "")]))
        print(f"{row['mode']:<10}" + format_cells([(100 * row["zero_shot_top1"], "{:.2f}%", 16), (vs, "{}", 11),
                            (row["loss"], "{:.4f}", 12), (row["seconds"], "{:.0f} s", 9)]) + f"  {note}")


def run(args) -> int:
    import torch

    modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown or not modes or modes[0] != "fp32":
        raise ConfigError(f"--modes {args.modes}: name train.precision values among {', '.join(MODES)}, fp32 first "
                         "(the reference)")
    gpu, flags = torch.cuda.is_available(), cpu_flags()
    path = Path(args.json)
    result = {"benchmark": "precision", "config": args.config, "overrides": args.overrides, "points": args.points,
              "device": torch.cuda.get_device_name() if gpu else f"CPU ({torch.backends.cpu.get_cpu_capability()})",
              "rows": []}
    for mode in modes:
        skipped, note = hardware_note(mode, gpu, flags)
        if skipped:
            print(f"{mode}: skipped: {skipped}", flush=True)
            result["rows"].append({"mode": mode, "skipped": skipped})
            continue
        row = train_mode(args.config, list(args.overrides), mode, args.nproc)
        result["rows"].append({**row, "note": note})
        write_results(path, result)
        if "returncode" in row:  # as the demo reports a failed launch: the run's own output says why
            print(f"bench precision: the {mode} run failed (exit code {row['returncode']}): see {row['log']}",
                  file=sys.stderr)
            return row["returncode"]
    failures = compare(result["rows"], args.points)
    result["failures"] = failures
    write_results(path, result)
    print_table(result["rows"], args.points)
    print(f"\nresults: {path}")
    for failure in failures:
        print(f"bench precision: {failure}", file=sys.stderr)
    return 1 if failures else 0
