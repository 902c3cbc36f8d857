"""Soak: a real multi-rank training run with the resident memory and open files of every process of the job
(launcher, ranks, their data-loader workers) sampled from /proc as it goes: `python -m pipeline bench soak`.

    python -m pipeline bench soak --config configs/demo-clip.yaml train.steps=3000 train.global_batch_size=8
    python -m pipeline bench soak --nproc 2 --interval-s 5 --json soak.json --config configs/demo-clip.yaml ...

Training starts as the demo starts it (`pipeline.commands.demo.launch_command`: the deepspeed launcher, else torchrun),
in a process group of its own (an interrupted or terminated soak ends the whole job), with its output in
`<run dir>/soak-train.log`. Every `--interval-s` seconds each process under the launcher is read: VmRSS and
its anonymous / file / shared-memory parts from /proc/PID/status, the entries of /proc/PID/fd, the thread
count, and the step of the newest training record in metrics.jsonl (logged every train.log_every steps).
Each sample reads the process tree from one snapshot of /proc. A process is labelled by the RANK its
launcher gave it: `rank0`; a fork of it (same command line: a DataLoader worker, in the order they appear,
the training loader's, then the evaluation loader's) `rank0/worker0`; another program it started (the
compiler DeepSpeed runs to probe an op) by its name, `rank0/gcc.0`; processes without a RANK `launcher0`,
`launcher1`, ... A process is known by its pid and start time; a launcher's child is labelled once it has
exec'd (until then it holds the launcher's environment). The table shows the step and each process's RSS
(MiB) and open files at evenly spaced samples (the processes alive in them). The summary covers the
samples from `--warmup-fraction` of the steps (by when the shuffle buffers are full, the first evaluation
and save have run and every worker has started) up to the last step (the final evaluation and save left
out): per process the RSS and open files first, last and at most, and the growth from the first to the
last quarter of those samples (medians, so that the tens of MiB a step allocates and frees again, caught at
random phases, do not count).
Every sample goes into the `--json` file. Linux only (/proc). A figure, not a timed assertion:
tests/multiprocess/test_bench_soak.py runs it for a few steps.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

STATUS_FIELDS = {"VmRSS": "rss", "RssAnon": "rss_anon", "RssFile": "rss_file", "RssShmem": "rss_shmem"}


def add_arguments(parser) -> None:
    parser.add_argument("--config", default="configs/demo-clip.yaml", help="training run config")
    parser.add_argument("--nproc", type=int, default=2, help="local ranks (default: 2)")
    parser.add_argument("--interval-s", type=float, default=5.0, help="seconds between samples of /proc (default: 5)")
    parser.add_argument("--json", default="", help="write every sample and the summary here "
                        "(default: <run dir>/soak.json)")
    parser.add_argument("--rows", type=int, default=16, help="samples shown in the table, evenly spaced (default: 16)")
    parser.add_argument("--warmup-fraction", type=float, default=0.1,
                        help="the summary compares samples from this fraction of train.steps on (default: 0.1)")
    parser.add_argument("--flat-mib", type=float, default=16.0,
                        help="a process whose RSS grows by less than this many MiB after warm-up (and open files by "
                        "fewer than --flat-fds) is reported flat (default: 16)")
    parser.add_argument("--flat-fds", type=int, default=4, help="see --flat-mib (default: 4)")
    parser.add_argument("overrides", nargs="*", help="dot-list overrides of the training config, e.g. train.steps=3000")


# -- /proc ------------------------------------------------------------------------------------------
def process_table() -> dict[int, tuple[int, str, int]]:
    """pid -> (parent pid, command name, start time in clock ticks) of every process visible in /proc: one
    snapshot, so that a sample's tree and its parents agree even while processes start and end."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:  # ended while we looked
            continue
        # the command name (field 2) may hold spaces and parentheses: the fields after it follow the last ')'
        name, _, rest = stat.partition(" (")[2].rpartition(")")
        fields = rest.split()
        table[int(entry)] = (int(fields[1]), name, int(fields[19]))
    return table


def descendants(root: int, table: dict[int, tuple[int, str, int]]) -> list[int]:
    """Every process below `root` in `table`, parents before their children."""
    children: dict[int, list[int]] = {}
    for pid, (parent, _, _) in table.items():
        children.setdefault(parent, []).append(pid)
    found, queue = [], [root]
    while queue:
        for child in sorted(children.get(queue.pop(0), [])):
            found.append(child)
            queue.append(child)
    return found


def launcher_rank_of(pid: int) -> int | None:
    """The RANK in a process's environment, None when it has none (or cannot be read)."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    for item in environ.split(b"\0"):
        if item.startswith(b"RANK=") and item[5:].isdigit():
            return int(item[5:])
    return None


def read_process(pid: int) -> dict[str, int] | None:
    """RSS and its parts (KiB), open files and threads of a process; None when it has ended."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    sample = {"fds": fds}
    for line in status.splitlines():
        name, _, value = line.partition(":")
        if name in STATUS_FIELDS:
            sample[STATUS_FIELDS[name]] = int(value.split()[0])
        elif name == "Threads":
            sample["threads"] = int(value)
    return sample if "rss" in sample else None


def _cmdline(pid: int) -> bytes | None:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None


class ProcessLabels:
    """Stable names for the processes of a job: launcherN, rankR, rankR/workerK, rankR/NAME.K (see the module
    docstring). A process is known by its pid and start time, so a reused pid is a new process."""

    def __init__(self):
        self.labels: dict[tuple[int, int], str] = {}
        self.ranks: dict[int, int | None] = {}  # pid -> RANK, of the processes labelled so far
        self.cmdlines: dict[int, bytes | None] = {}  # pid -> command line, of the processes labelled so far
        self._counts: dict[str, int] = {}

    def _next(self, prefix: str) -> str:
        count = self._counts.get(prefix, 0)
        self._counts[prefix] = count + 1
        return f"{prefix}{count}"

    def label(self, pid: int, table: dict[int, tuple[int, str, int]]) -> str | None:
        """The label of `pid`, a process of `table` whose parent (if under the job) was labelled before it;
        None for a launcher's child between fork and exec (it holds the launcher's environment for now)."""
        parent, name, started = table[pid]
        if (pid, started) in self.labels:
            return self.labels[(pid, started)]
        rank, cmdline = launcher_rank_of(pid), _cmdline(pid)
        forked = parent in self.cmdlines and cmdline == self.cmdlines[parent]  # same program, not exec'd
        if rank is None:
            if forked:
                return None  # a launcher's child that has not exec'd yet: labelled once it has
            label = self._next("launcher")
        elif self.ranks.get(parent) != rank:
            label = f"rank{rank}"
        elif forked:  # a DataLoader worker
            label = self._next(f"rank{rank}/worker")
        else:  # another program the rank started, e.g. the compiler DeepSpeed runs to probe an op
            label = self._next(f"rank{rank}/{name}.")
        self.ranks[pid], self.cmdlines[pid] = rank, cmdline
        self.labels[(pid, started)] = label
        return label


class StepReader:
    """The step of the newest training record of metrics.jsonl, read incrementally (the file only grows
    during a run; a line still being written is left for the next read)."""

    def __init__(self, path: Path):
        self.path, self.offset, self.step = path, 0, 0

    def read(self) -> int:
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self.offset)
                data = handle.read()
        except OSError:
            return self.step
        complete = data[: data.rfind(b"\n") + 1]
        self.offset += len(complete)
        for line in complete.splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("kind", "train") == "train" and isinstance(record.get("step"), int):
                self.step = record["step"]
        return self.step


# -- the soak ---------------------------------------------------------------------------------------
def soak(command: list[str], metrics_path: Path, log_path: Path, interval_s: float) -> tuple[int, list[dict]]:
    """Run `command`, sampling its processes every `interval_s` s until it ends: (exit status, samples).
    A sample: {"time_s", "step", "processes": {label: {"pid", "rss", "rss_anon", ..., "fds", "threads"}}}."""
    labels, steps, samples = ProcessLabels(), StepReader(metrics_path), []
    started = time.monotonic()
    # a SIGTERM to the soak (a timeout, a scheduler) unwinds through the `finally` below, as Ctrl-C does
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    with open(log_path, "w", encoding="utf-8") as log:
        # its own process group: an interrupted soak ends every process of the job, not the launcher alone
        job = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while True:
                ended = job.poll() is not None
                table = process_table()
                processes = {}
                for pid in descendants(job.pid, table):
                    reading = read_process(pid)
                    label = labels.label(pid, table) if reading is not None else None
                    if label is not None:
                        processes[label] = {"pid": pid, **reading}
                if processes:
                    samples.append({"time_s": round(time.monotonic() - started, 1), "step": steps.read(),
                                    "processes": processes})
                if ended:
                    break
                try:
                    job.wait(timeout=interval_s)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            if job.poll() is None:  # interrupted: do not leave the job running
                os.killpg(job.pid, signal.SIGTERM)
                try:
                    job.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(job.pid, signal.SIGKILL)
                    job.wait()
            signal.signal(signal.SIGTERM, previous)
    return job.returncode, samples


def summarise(samples: list[dict], warmup_step: int, end_step: int, flat_mib: float, flat_fds: int) -> dict[str, dict]:
    """Per process, over the samples of steps warmup_step .. end_step - 1 (after warm-up, before the final
    evaluation and save): RSS (MiB) and open files first, last and at most, and the growth of each between the
    medians of the first and last quarter of those samples."""
    window = [s for s in samples if warmup_step <= s["step"] < end_step] or samples
    summary = {}
    for label in dict.fromkeys(label for s in samples for label in s["processes"]):
        series = [(s["step"], s["processes"][label]) for s in window if label in s["processes"]]
        if not series:
            continue
        rss = [p["rss"] / 1024 for _, p in series]
        fds = [p["fds"] for _, p in series]
        quarter = max(1, len(series) // 4)
        rss_growth = statistics.median(rss[-quarter:]) - statistics.median(rss[:quarter])
        fds_growth = statistics.median(fds[-quarter:]) - statistics.median(fds[:quarter])
        summary[label] = {
            "samples": len(series), "from_step": series[0][0], "to_step": series[-1][0],
            "rss_mib_first": round(rss[0], 1), "rss_mib_last": round(rss[-1], 1), "rss_mib_max": round(max(rss), 1),
            "rss_growth_mib": round(rss_growth, 1), "fds_first": fds[0], "fds_last": fds[-1], "fds_max": max(fds),
            "fds_growth": fds_growth, "flat": rss_growth < flat_mib and fds_growth < flat_fds,
        }
    return summary


def format_table(samples: list[dict], rows: int) -> str:
    """Step, then RSS MiB / open files of each process, at `rows` evenly spaced samples (the last included)."""
    if not samples:
        return "(no samples)"
    picked = sorted({round(i * (len(samples) - 1) / max(1, rows - 1)) for i in range(min(rows, len(samples)))})
    labels = list(dict.fromkeys(label for index in picked for label in samples[index]["processes"]))
    width = max(14, *(len(label) for label in labels))
    lines = [f"{'time s':>7} {'step':>6}  " + " ".join(f"{label:>{width}}" for label in labels),
             f"{'':>7} {'':>6}  " + " ".join(f"{'RSS MiB / fds':>{width}}" for _ in labels)]
    for index in picked:
        sample = samples[index]
        cells = []
        for label in labels:
            process = sample["processes"].get(label)
            cells.append(f"{process['rss'] / 1024:.0f} / {process['fds']}" if process else "-")
        lines.append(f"{sample['time_s']:>7.0f} {sample['step']:>6}  " + " ".join(f"{c:>{width}}" for c in cells))
    return "\n".join(lines)


def format_summary(summary: dict[str, dict]) -> str:
    lines = [f"{'process':<16} {'steps':>11} {'RSS MiB first':>13} {'last':>7} {'max':>7} {'growth':>7} "
             f"{'fds first':>9} {'last':>5} {'max':>5} {'growth':>6}  verdict"]
    for label, s in summary.items():
        lines.append(f"{label:<16} {s['from_step']:>5}-{s['to_step']:<5} {s['rss_mib_first']:>13.0f} "
                     f"{s['rss_mib_last']:>7.0f} {s['rss_mib_max']:>7.0f} {s['rss_growth_mib']:>+7.1f} "
                     f"{s['fds_first']:>9} {s['fds_last']:>5} {s['fds_max']:>5} {s['fds_growth']:>+6g}  "
                     f"{'flat' if s['flat'] else 'GROWS'}")
    return "\n".join(lines)


def run(args) -> int:
    overrides = list(args.overrides)
    if not any(item.startswith("train.overwrite=") for item in overrides):
        overrides.append("train.overwrite=true")  # a soak is run again and again, like the demo
    from pipeline.commands.demo import launch_command
    from pipeline.train.loop import (  # torch, deepspeed: when the soak runs, not for --help
        load_run_config,
        run_dir_of,
    )

    cfg = load_run_config(args.config, overrides)
    run_dir = run_dir_of(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)  # the step is read from this run's records alone
    command = launch_command(args.config, overrides, args.nproc)
    log_path = run_dir / "soak-train.log"
    print("running:", " ".join(command), f"(output: {log_path})", flush=True)
    returncode, samples = soak(command, run_dir / "metrics.jsonl", log_path, args.interval_s)
    warmup_step = int(args.warmup_fraction * cfg.train.steps)
    summary = summarise(samples, warmup_step, cfg.train.steps, args.flat_mib, args.flat_fds)
    print(f"\n{len(samples)} samples every {args.interval_s:g} s over {samples[-1]['time_s'] if samples else 0:.0f} s; "
          f"training exited {returncode}\n")
    print(format_table(samples, args.rows))
    print(f"\nsteps {warmup_step}-{cfg.train.steps - 1} (after warm-up, before the final evaluation and save); growth: "
          f"the median of the last quarter of those samples minus the first quarter's; flat: RSS growth < "
          f"{args.flat_mib:g} MiB and open files growth < {args.flat_fds}\n")
    print(format_summary(summary))
    json_path = Path(args.json) if args.json else run_dir / "soak.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps({
        "command": command, "config": args.config, "overrides": overrides, "interval_s": args.interval_s,
        "returncode": returncode, "warmup_step": warmup_step, "summary": summary, "samples": samples,
    }, indent=1) + "\n")
    print(f"\nsamples: {json_path}", flush=True)
    if returncode != 0:
        print(f"training failed (exit code {returncode}): see {log_path}", file=sys.stderr)
    return returncode
