"""`python -m pipeline bench soak`: a real 2-rank training run (deepspeed launcher, CPU, gloo) with every
process of the job sampled from /proc; and the summary's verdict on series that are flat or grow."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.bench.soak import ProcessLabels, descendants, format_summary, process_table, summarise

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_soak_samples_rss_and_open_files_of_every_process(shards, tmp_path):
    out = tmp_path / "soak.json"
    # the workers live while the ranks train (a second or two on 2 cores for 24 steps): sampled every 0.2 s
    command = [sys.executable, "-m", "pipeline", "bench", "soak", "--interval-s", "0.2", "--json", str(out),
               "--config", "configs/demo-clip.yaml", f"data.train_urls={shards}", "data.val_urls=",
               "data.shuffle_buffer=16", "train.steps=24", "train.global_batch_size=8", "train.log_every=2",
               f"train.output_dir={tmp_path}", "train.name=soak", "checkpoint.every_steps=12",
               "train.collective_timeout_s=60"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(command, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = process.communicate(timeout=400)
    except BaseException:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise
    assert process.returncode == 0, output[-4000:]
    report = json.loads(out.read_text())
    assert report["returncode"] == 0 and len(report["samples"]) >= 3
    seen = {label for sample in report["samples"] for label in sample["processes"]}
    # the launcher, both ranks and each rank's data-loader worker (data.workers: 1 in the demo config)
    assert {"launcher0", "rank0", "rank1", "rank0/worker0", "rank1/worker0"} <= seen, seen
    for label in ("rank0", "rank1", "rank0/worker0", "rank1/worker0"):
        readings = [s["processes"][label] for s in report["samples"] if label in s["processes"]]
        assert readings and all(r["rss"] > 0 and r["fds"] > 0 and r["threads"] > 0 for r in readings)
    assert max(s["step"] for s in report["samples"]) == 24  # the step comes from metrics.jsonl as it grows
    assert set(report["summary"]) >= {"rank0", "rank1"}
    # the printed table and summary name every process
    assert all(label in output for label in ("rank0/worker0", "rank1/worker0", "RSS MiB / fds", "verdict"))


# a launcher (no RANK) starts a rank (RANK=1, another command line), which forks a worker and runs `sleep`
RANK_SCRIPT = """
import os, subprocess, sys, time
if os.fork() == 0:
    time.sleep(60)
    os._exit(0)
subprocess.Popen(["sleep", "60"])
print("up", flush=True)
time.sleep(60)
"""
LAUNCHER_SCRIPT = f"""
import os, subprocess, sys
rank = subprocess.Popen([sys.executable, "-c", {RANK_SCRIPT!r}], env={{**os.environ, "RANK": "1"}},
                        stdout=subprocess.PIPE, text=True)
print(rank.stdout.readline(), end="", flush=True)
rank.wait()
"""


def test_processes_are_labelled_by_rank_fork_and_program():
    job = subprocess.Popen([sys.executable, "-c", LAUNCHER_SCRIPT], stdout=subprocess.PIPE, text=True,
                           env={k: v for k, v in os.environ.items() if k != "RANK"}, start_new_session=True)
    try:
        assert job.stdout.readline() == "up\n"
        labels, table = ProcessLabels(), process_table()
        found = {labels.label(pid, table): pid for pid in descendants(job.pid, table)}
        assert set(found) == {"rank1", "rank1/worker0", "rank1/sleep.0"}, found
        assert table[found["rank1/worker0"]][0] == table[found["rank1/sleep.0"]][0] == found["rank1"]
        # the next sample keeps the labels; a pid reused by another process (another start time) is a new process
        table = process_table()
        assert {labels.label(pid, table) for pid in descendants(job.pid, table)} == set(found)
        pid = found["rank1/sleep.0"]
        table[pid] = (table[pid][0], table[pid][1], table[pid][2] + 1)
        assert labels.label(pid, table) == "rank1/sleep.1"
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()


def _sample(step: int, rss_mib: float, fds: int) -> dict:
    return {"time_s": step / 10, "step": step, "processes": {"rank0": {"pid": 1, "rss": int(rss_mib * 1024),
                                                                       "fds": fds, "threads": 4}}}


def test_summary_tells_flat_from_growing_after_warm_up():
    # a warm-up rise (steps < 100) and a final save (step 1000) are left out; then flat within noise
    flat = [_sample(s, 500 if s < 100 else 1000 + (s % 3), 40) for s in range(0, 1000, 20)] + [_sample(1000, 1500, 60)]
    (summary,) = summarise(flat, warmup_step=100, end_step=1000, flat_mib=16, flat_fds=4).values()
    assert summary["flat"] and summary["from_step"] == 100 and summary["to_step"] == 980
    assert abs(summary["rss_growth_mib"]) <= 2 and summary["fds_growth"] == 0
    growing = [_sample(s, 1000 + s / 10, 40) for s in range(100, 1000, 20)]  # 10 MiB per 100 steps
    (summary,) = summarise(growing, 100, 1000, 16, 4).values()
    assert not summary["flat"] and 60 < summary["rss_growth_mib"] < 75
    leaking = [_sample(s, 1000, 40 + s // 100) for s in range(100, 1000, 20)]  # one more open file per 100 steps
    (summary,) = summarise(leaking, 100, 1000, 16, 4).values()
    assert not summary["flat"] and summary["fds_growth"] >= 4
    assert "GROWS" in format_summary({"rank0": summary})
