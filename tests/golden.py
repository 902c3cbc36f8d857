"""The golden curve: a fixed tiny-clip run on the embedded shapes set, stored per step, compared on demand.

    python -m tests.golden             # run the reference, print its difference to the stored file; exit 1 on any
    python -m tests.golden --update    # (or GOLDEN_UPDATE=1) rewrite tests/assets/golden/tiny-clip-shapes.json
    make golden                        # the first; `make golden GOLDEN_UPDATE=1` the second

The reference (CONFIG, REFERENCE_RANKS): tiny-clip, fp32, ZeRO-0, 2 gloo ranks of one intra-op thread each, one
DataLoader worker per rank, global batch 16 over 4 canonical streams, 40 steps over 408 training samples (25
steps an epoch: the run crosses into the second epoch at step 26), zero-shot evaluation on the shapes val split
at the end. The stored file holds every step's metrics.jsonl record (loss, learning rate, logit scale, the
data counters `data/*` and `data_window/*`) with the gradient norm added (before clipping; see `_Recorder`),
the sha256 of the final fp32 weights and the final zero-shot top-1 (and the other evaluation figures).

The runs go through `pipeline.train.loop.train` on real gloo ranks (tests.distributed_helpers.run_ranks), several
a launch (`run_jobs`: one train() after another). tests/multiprocess/test_golden.py runs the same machinery on
other layouts (world size, workers, accumulation, ZeRO stage, kill and resume, elastic resume, device decoding,
compile) and checks each against the file. tests/assets/golden/README.md: what the file is, when to regenerate.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "assets" / "golden" / "tiny-clip-shapes.json"

# the data: the embedded shapes set (pipeline.shards.synthetic), as `shards build --source shapes` writes it
TRAIN_SAMPLES, VAL_SAMPLES, SAMPLES_PER_SHARD, DATA_SEED = 408, 96, 64, 0
REFERENCE_RANKS = 2
THREADS = 1
"""Intra-op threads per rank: the sums inside a kernel then do not depend on the machine's core count."""

# every setting the curve depends on, explicit (not the defaults of the day); the data URLs and the run
# directory are added per run (`overrides`)
CONFIG: dict[str, Any] = {
    "model.name": "tiny-clip", "model.modality": "image", "model.patch_dropout": 0.0,
    "loss.kind": "clip",
    "data.modality": "image", "data.workers": 1, "data.canonical_streams": 4, "data.shuffle_buffer": 32,
    "data.caption_source": "txt", "data.decode": "cpu", "data.resampled": False,
    "optim.name": "adamw", "optim.lr": 2e-3, "optim.weight_decay": 0.1, "optim.warmup_steps": 5,
    "optim.min_lr_ratio": 0.1, "optim.grad_clip": 1.0,
    "train.steps": 40, "train.global_batch_size": 16, "train.accum_steps": 1, "train.precision": "fp32",
    "train.zero_stage": 0, "train.seed": 0, "train.compile": "off", "train.log_every": 1,
    "train.collective_timeout_s": 120,
    "checkpoint.every_steps": 0, "checkpoint.keep_last": 2,
    "eval.every_steps": 0, "eval.batch_size": 48,
}
CPU_ONLY = {"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""}
# metrics.jsonl fields that are wall-clock measurements, not results
TIMING_FIELDS = ("samples_per_s", "samples_per_s_per_gpu", "mfu", "time")


# -- data ---------------------------------------------------------------------------------------------
def build_data(root: Path) -> tuple[Path, Path]:
    """(train, val) shard directories of the shapes set under `root` (built once; the same bytes every time)."""
    from pipeline.shards.build import build_shards
    from pipeline.shards.config import BuildConfig

    train, val = root / "shapes" / "train", root / "shapes" / "val"
    for split, directory, count in (("train", train, TRAIN_SAMPLES), ("val", val, VAL_SAMPLES)):
        if not (directory / "sizes.json").is_file():
            build_shards(BuildConfig(source="shapes", split=split, output=str(directory), count=count,
                                     samples_per_shard=SAMPLES_PER_SHARD, seed=DATA_SEED, workers=1), progress=False)
    return train, val


# -- one run ------------------------------------------------------------------------------------------
@dataclass
class Job:
    """One call of `pipeline.train.loop.train` on every rank of a launch.

    `changes`: settings over CONFIG; `signal_at` (rank, step, signal): that rank sends itself the signal once
    that step is done (SIGTERM: the run saves and stops; SIGKILL: the process dies)."""

    name: str
    changes: dict[str, Any] = field(default_factory=dict)
    signal_at: tuple[int, int, int] | None = None


def overrides(data: tuple[Path, Path], out: Path, name: str, changes: dict[str, Any] | None = None) -> list[str]:
    settings = {**CONFIG, "data.train_urls": str(data[0]), "data.val_urls": str(data[1]),
                "train.output_dir": str(out), "train.name": name, **(changes or {})}
    return [f"{key}={_text(value)}" for key, value in settings.items()]


def _text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


class _Recorder:
    """Hooks around the trainer, in the rank's process: one intra-op thread per rank, every step's gradient
    norm (the global norm before clipping: clip_gradients' at ZeRO-0, DeepSpeed's at ZeRO 1-3) appended by
    rank 0 to `grad_norm.jsonl` in the run directory, and the job's signal sent once its step is done."""

    installed = False
    job: Job | None = None
    path: Path | None = None
    rank = 0
    norm = None

    @classmethod
    def install(cls) -> None:
        if cls.installed:
            return
        import torch

        from pipeline.parallel import distributed
        from pipeline.train import loop, step

        init_distributed, train_step, clip_gradients = distributed.init_distributed, loop.train_step, \
            step.clip_gradients

        def init_with_threads(*args, **kwargs):
            info = init_distributed(*args, **kwargs)
            torch.set_num_threads(THREADS)  # after the trainer's own choice (cores / local ranks)
            return info

        def clip_recorded(engine, max_norm):
            cls.norm = clip_gradients(engine, max_norm)
            return cls.norm

        def train_step_recorded(engine, *args, **kwargs):
            cls.norm = None
            result = train_step(engine, *args, **kwargs)
            norm = cls.norm if cls.norm is not None else engine.get_global_grad_norm()
            at = int(engine.global_steps)  # optimizer steps, restored by a resume: the trainer's step
            if cls.rank == 0:
                with open(cls.path, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps({"step": at, "grad_norm": float("nan") if norm is None else float(norm)})
                                 + "\n")
            if cls.job.signal_at and cls.job.signal_at[0] == cls.rank and cls.job.signal_at[1] == at:
                os.kill(os.getpid(), cls.job.signal_at[2])
            return result

        distributed.init_distributed = init_with_threads
        loop.plot_run = lambda *args, **kwargs: None  # curves.png: a second per plot, nothing compared
        step.clip_gradients = clip_recorded
        loop.train_step = train_step_recorded
        cls.installed = True


def run_jobs(rank: int, world_size: int, data: tuple[str, str], out: str, jobs: list[Job]) -> list[str]:
    """Every job in turn on this rank (tests.distributed_helpers.run_ranks calls it on each rank); returns how
    each ended ('done' or 'preempted')."""
    import torch

    from pipeline.train.config import RunConfig, load_config
    from pipeline.train.loop import train
    from pipeline.train.preemption import Preempted

    _Recorder.install()
    _Recorder.rank = rank
    # DeepSpeed's ZeRO-3 engine replaces torch.nn.functional.linear for the rest of the process ("This will persist
    # unless manually reset"); its version rounds differently (measured: every later run differed from the first
    # loss on, 9e-7 relative by step 40), so a job after a ZeRO-3 job would not be the run it names. The trainer
    # runs one job a process; we put F.linear back after each job.
    linear = torch.nn.functional.linear
    ended = []
    for job in jobs:
        cfg = load_config(RunConfig, None, overrides((Path(data[0]), Path(data[1])), Path(out), job.name, job.changes))
        _Recorder.job, _Recorder.path = job, Path(out) / job.name / "grad_norm.jsonl"
        try:
            train(cfg)
            ended.append("done")
        except Preempted:
            ended.append("preempted")
        finally:
            torch.nn.functional.linear = linear
    return ended


def launch(world_size: int, data: tuple[Path, Path], out: Path, jobs: list[Job], timeout: float = 900.0,
           killed: bool = False) -> list[str] | None:
    """Run `jobs` on `world_size` fresh gloo ranks. `killed`: the last job SIGKILLs a rank, which ends the
    launch (the other ranks are ended by the launcher); returns None then."""
    from tests.distributed_helpers import run_ranks

    args = ((str(data[0]), str(data[1])), str(out), jobs)
    # the golden run is a CPU run (gloo, fp32) on any machine; the ranks inherit this environment
    saved = {key: os.environ.get(key) for key in CPU_ONLY}
    os.environ.update(CPU_ONLY)
    try:
        if not killed:
            return run_ranks(run_jobs, world_size, *args, timeout=timeout)[0]
        try:
            run_ranks(run_jobs, world_size, *args, timeout=timeout)
        except Exception as error:  # noqa: BLE001 - the rank's death is the point: check it is the one asked for
            if "SIGKILL" not in str(error) and "signal 9" not in str(error):
                raise
            return None
        raise AssertionError(f"the SIGKILL in {jobs[-1].name} did not end the launch")
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# -- what a run gives -------------------------------------------------------------------------------------
def weights_sha256(run_dir: Path) -> str:
    """sha256 over the final checkpoint's consolidated fp32 state dict: for each tensor in sorted name order,
    its name (UTF-8) then its bytes (fp32, C order)."""
    try:
        from pipeline.checkpoint.consolidate import consolidated_state_dict
    except ImportError:  # the module before the checkpoint package was split
        from pipeline.checkpoint.manager import consolidated_state_dict

    checkpoints = run_dir / "checkpoints"
    state = consolidated_state_dict(str(checkpoints), (checkpoints / "latest").read_text().strip())
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().float().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def collect(run_dir: Path, weights: bool = True) -> dict[str, Any]:
    """The golden record of a finished run: `steps` (one dict per step: metrics.jsonl's record with grad_norm,
    timing fields left out), `weights_sha256`, `zero_shot_top1`, and `compile` (its records, if any)."""
    from pipeline.observe.metrics import read_metrics

    records = read_metrics(run_dir / "metrics.jsonl")
    norms: dict[int, float] = {}
    for line in (run_dir / "grad_norm.jsonl").read_text().splitlines():
        entry = json.loads(line)
        norms[entry["step"]] = entry["grad_norm"]  # a step done again after a resume: its last value
    steps = []
    for record in records:
        if record.get("kind") != "train":
            continue
        row = {k: v for k, v in record.items() if k not in TIMING_FIELDS and k != "kind"}
        row["grad_norm"] = norms.get(record["step"], float("nan"))
        steps.append(dict(sorted(row.items(), key=lambda item: (item[0] != "step", item[0]))))
    evals = [r for r in records if r.get("kind") == "eval"]
    return {
        "steps": steps,
        "weights_sha256": weights_sha256(run_dir) if weights else None,
        "zero_shot_top1": evals[-1].get("zero_shot_top1") if evals else None,
        "eval": {k: v for k, v in evals[-1].items() if k not in ("kind", "time")} if evals else None,
    }


# -- comparing ------------------------------------------------------------------------------------------
def relative(a: float, b: float) -> float:
    """|a - b| / |b| (0 for equal values, NaN included; inf for a NaN against a number)."""
    if a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)):
        return 0.0
    if any(isinstance(v, float) and math.isnan(v) for v in (a, b)):
        return math.inf
    return abs(a - b) / abs(b) if b else math.inf


@dataclass
class Difference:
    """A run against the stored curve: per step, the largest relative difference over its float fields and
    the fields that differ at all."""

    per_step: dict[int, tuple[float, list[str]]]
    missing_steps: list[int]
    weights_equal: bool | None
    top1: tuple[float | None, float | None]

    @property
    def identical(self) -> bool:
        """No field of any step differs, the weights hash and the zero-shot top-1 are the same (either is not
        compared when the run has none)."""
        return not self.missing_steps and self.weights_equal is not False \
            and (self.top1[0] is None or self.top1[0] == self.top1[1]) \
            and all(not fields for _, fields in self.per_step.values())

    def report(self, label: str = "run") -> str:
        """What differs: one line per differing step (its largest relative difference over the numeric fields,
        the fields that differ), a summary, the weights hash and the zero-shot top-1."""
        lines = [f"{label} vs {GOLDEN.relative_to(REPO)}:"]
        differing = [step for step, (_, fields) in sorted(self.per_step.items()) if fields]
        if self.missing_steps:
            lines.append(f"  steps on one side only: {self.missing_steps}")
        for step in differing:
            worst, fields = self.per_step[step]
            lines.append(f"  step {step:3d}: largest relative difference {worst:.3e}; differ: {', '.join(fields)}")
        if differing:
            worst = max(differing, key=lambda step: self.per_step[step][0])
            fields = sorted({f for step in differing for f in self.per_step[step][1]})
            lines.append(f"  {len(differing)} of {len(self.per_step)} steps differ, the first at step {differing[0]}; "
                         f"largest relative difference {self.per_step[worst][0]:.3e} at step {worst}; fields: "
                         f"{', '.join(fields)}")
        else:
            lines.append(f"  every field of all {len(self.per_step)} steps identical")
        if self.weights_equal is not None:
            lines.append(f"  final weights sha256: {'identical' if self.weights_equal else 'DIFFERENT'}")
        if self.top1[0] is not None:
            lines.append(f"  zero-shot top-1: {self.top1[0]}" + (" (identical)" if self.top1[0] == self.top1[1]
                                                                 else f" (stored: {self.top1[1]})"))
        return "\n".join(lines)


def compare(run: dict[str, Any], stored: dict[str, Any], ignore: tuple[str, ...] = ()) -> Difference:
    """`run` (what `collect` gives) against `stored` (the file), field by field; `ignore`: fields not compared."""
    ours = {row["step"]: row for row in run["steps"]}
    theirs = {row["step"]: row for row in stored["steps"]}
    per_step = {}
    for step in sorted(set(ours) & set(theirs)):
        a, b = ours[step], theirs[step]
        worst, fields = 0.0, []
        for key in sorted(set(a) | set(b)):
            if key in ignore:
                continue
            if key not in a or key not in b:
                fields.append(key)
                continue
            if a[key] == b[key]:
                continue
            fields.append(key)
            if isinstance(a[key], (int, float)) and isinstance(b[key], (int, float)):
                worst = max(worst, relative(float(a[key]), float(b[key])))
        per_step[step] = (worst, fields)
    weights = None if run.get("weights_sha256") is None else run["weights_sha256"] == stored["weights_sha256"]
    return Difference(per_step, sorted(set(ours) ^ set(theirs)), weights,
                      (run.get("zero_shot_top1"), stored.get("zero_shot_top1")))


def loss_difference(run: dict[str, Any], stored: dict[str, Any], key: str = "loss") -> tuple[float, int | None]:
    """(largest relative difference of `key` over the common steps, first step where it differs or None)."""
    theirs = {row["step"]: row[key] for row in stored["steps"]}
    worst, first = 0.0, None
    for row in run["steps"]:
        if row["step"] not in theirs:
            continue
        difference = relative(row[key], theirs[row["step"]])
        if difference and first is None:
            first = row["step"]
        worst = max(worst, difference)
    return worst, first


def environment() -> dict[str, str]:
    """What the bits of the run also depend on: a file made elsewhere may differ in the last bits for these
    (another torch or DeepSpeed, another vector ISA of the CPU kernels)."""
    import deepspeed
    import torch

    return {"torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "python": sys.version.split()[0]}


def load_golden() -> dict[str, Any]:
    return json.loads(GOLDEN.read_text())


def write_golden(run: dict[str, Any]) -> None:
    """One step a line, so that a change shows as a diff of the steps it touches."""
    header = {
        "what": "tests/golden.py: the reference run's per-step metrics.jsonl records (grad_norm added), final "
                "weights sha256, zero-shot top-1",
        "config": CONFIG,
        "ranks": REFERENCE_RANKS, "threads_per_rank": THREADS, "environment": environment(),
        "data": {"source": "shapes", "train_samples": TRAIN_SAMPLES, "val_samples": VAL_SAMPLES,
                 "samples_per_shard": SAMPLES_PER_SHARD, "seed": DATA_SEED},
        "weights_sha256": run["weights_sha256"], "zero_shot_top1": run["zero_shot_top1"], "eval": run["eval"],
    }
    lines = ["{"]
    for key, value in header.items():
        lines.append(f"  {json.dumps(key)}: {json.dumps(value, sort_keys=True)},")
    lines.append('  "steps": [')
    rows = [f"    {json.dumps(row)}" for row in run["steps"]]
    lines.append(",\n".join(rows))
    lines.append("  ]")
    lines.append("}")
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text("\n".join(lines) + "\n")


def reference(work: Path, data: tuple[Path, Path] | None = None) -> dict[str, Any]:
    """Run the reference under `work` (shards kept there between calls, the run started anew) and collect it."""
    data = data or build_data(work)
    shutil.rmtree(work / "runs" / "reference", ignore_errors=True)
    launch(REFERENCE_RANKS, data, work / "runs", [Job("reference")])
    return collect(work / "runs" / "reference")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.golden", description=__doc__.split("\n\n")[0])
    parser.add_argument("--update", action="store_true", help="rewrite the stored file (also GOLDEN_UPDATE=1)")
    parser.add_argument("--work", default="", help="directory for the shards and the run (default: a temporary one)")
    args = parser.parse_args(argv)
    update = args.update or os.environ.get("GOLDEN_UPDATE", "") not in ("", "0")
    with tempfile.TemporaryDirectory(prefix="golden-") as scratch:
        run = reference(Path(args.work or scratch))
    stored = load_golden() if GOLDEN.is_file() else None
    if stored is None:
        print(f"{GOLDEN.relative_to(REPO)} does not exist yet")
        difference = None
    else:
        difference = compare(run, stored)
        print(difference.report("reference run"))
        made_with = stored["config"]
        changed = [f"{k} {made_with.get(k)!r} -> {CONFIG.get(k)!r}" for k in sorted(set(CONFIG) | set(made_with))
                   if CONFIG.get(k) != made_with.get(k)]
        if changed:
            print(f"  the stored file was made with another config: {'; '.join(changed)}")
        here, there = environment(), stored.get("environment", {})
        if not difference.identical and here != there:
            print(f"  made in another environment ({there}; here {here}): the last bits may differ for that alone")
    if update:
        write_golden(run)
        print(f"wrote {GOLDEN.relative_to(REPO)}")
        return 0
    if difference is None or not difference.identical:
        print("the run differs from the stored curve: if the change is meant, rerun with GOLDEN_UPDATE=1 (or "
              "--update) and say why in the commit", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    # the spawned ranks unpickle tests.golden's names, not __main__'s
    from tests.golden import main as golden_main

    sys.exit(golden_main())
