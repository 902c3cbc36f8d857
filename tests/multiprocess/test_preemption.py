"""Preemption: SIGTERM / SIGUSR1 let the step in progress finish, every rank agrees to stop, the run exits 75
after a checkpoint and resumes exactly; time-based saves; the SLURM script asks for the signal and requeues.

The handler runs in real processes: a small loop in a subprocess that is sent the signal, two gloo ranks
of which only one is signalled, and (needs the trainer to poll the handler) `python -m pipeline train`
stopped by SIGTERM and resumed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipeline.train.preemption import PREEMPTED_EXIT_CODE, StopSignals
from tests.distributed_helpers import run_ranks

REPO = Path(__file__).resolve().parents[2]

LOOP = textwrap.dedent("""
    import sys, time
    from pipeline.train.preemption import StopSignals

    stop = StopSignals().install()
    step = 0
    while True:
        print(f"begin {step}", flush=True)
        time.sleep(0.3)  # the step's work: the signal lands in the middle of it
        print(f"end {step}", flush=True)
        step += 1
        check = stop.poll()
        if check.stop:
            print(f"saved and stopped after step {step} ({check.reason})", flush=True)
            sys.exit(0)
""")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_lets_the_step_finish_then_stops_cleanly(signum):
    process = subprocess.Popen([sys.executable, "-c", LOOP], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        lines = []
        while not lines or lines[-1] != "begin 2":
            line = process.stdout.readline()
            assert line, f"the loop ended early: {lines} {process.stderr.read()}"
            lines.append(line.strip())
        process.send_signal(signum)
        out, err = process.communicate(timeout=30)
    finally:
        process.kill()
    lines += [line.strip() for line in out.splitlines() if line.strip()]
    assert process.returncode == 0, err
    # step 2 finished, no step 3 began, and the loop said why it stopped
    assert lines[-3:] == ["begin 2", "end 2", f"saved and stopped after step 3 ({signum.name} received)"], lines
    assert "Traceback" not in err


def test_time_based_save_is_due_every_interval_and_restarts_after_any_save():
    clock = [0.0]
    stop = StopSignals(every_minutes=1.0, clock=lambda: clock[0])
    assert not stop.poll(now=59.0).save_due
    assert stop.poll(now=60.5).save_due  # due: the caller saves, the interval restarts from here
    assert not stop.poll(now=120.0).save_due
    assert stop.poll(now=121.0).save_due
    stop.saved(now=150.0)  # a step-count save in between also restarts the interval
    assert not stop.poll(now=200.0).save_due
    assert stop.poll(now=210.0).save_due
    assert not StopSignals(every_minutes=0.0).poll(now=1e9).save_due  # 0: off
    assert not stop.poll(now=211.0).stop


def _poll_on_ranks(rank: int, world_size: int) -> list:
    clock = [0.0]
    stop = StopSignals(every_minutes=1.0, clock=lambda: clock[0]).install()
    try:
        first = stop.poll()
        if rank == 1:
            os.kill(os.getpid(), signal.SIGUSR1)  # only this rank is told to stop
        if rank == 0:
            clock[0] = 61.0  # only this rank's clock says a save is due
        second = stop.poll()
        return [(first.stop, first.save_due), (second.stop, second.save_due, second.reason)]
    finally:
        stop.uninstall()


def test_every_rank_stops_when_one_is_signalled():
    results = run_ranks(_poll_on_ranks, 2, timeout=120)
    assert results[0][0] == results[1][0] == (False, False)
    assert results[0][1] == (True, True, "another rank was told to stop")
    assert results[1][1] == (True, True, "SIGUSR1 received")


def test_slurm_script_asks_for_the_signal_forwards_it_and_requeues():
    script = (REPO / "launch" / "slurm.sbatch").read_text()
    assert "#SBATCH --signal=B:USR1@" in script  # to the batch shell, which alone can requeue
    assert "#SBATCH --requeue" in script
    assert 'kill -USR1 "$srun_pid"' in script  # srun passes it on to every task
    assert "trap forward_usr1 USR1" in script and "srun " in script and "&\nsrun_pid=$!" in script
    assert f"PREEMPTED_EXIT_CODE={PREEMPTED_EXIT_CODE}" in script
    assert 'scontrol requeue "$SLURM_JOB_ID"' in script
    assert "train.resume=auto" in script
    result = subprocess.run(["bash", "-n", str(REPO / "launch" / "slurm.sbatch")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# -- through the trainer (needs train.py to poll StopSignals and raise Preempted) -------------------------
def _train_command(shards: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "pipeline", "train", "--config", str(REPO / "configs/demo-clip.yaml"),
        "model.name=tiny-clip", f"data.train_urls={shards}", "data.val_urls=", "data.workers=0",
        "data.shuffle_buffer=16", f"train.output_dir={out}", "train.name=run", "train.global_batch_size=8",
        "train.steps=6", "train.log_every=1", "train.precision=fp32", "optim.warmup_steps=1",
        "checkpoint.every_steps=0", "eval.every_steps=0", *extra,
    ]


def _losses(run_dir: Path) -> dict[int, float]:
    from pipeline.observe.metrics import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"}


@pytest.mark.slow
def test_sigterm_mid_run_saves_exits_75_and_resumes_exactly(shards, tmp_path):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}
    reference = tmp_path / "reference"
    subprocess.run(_train_command(shards, reference), cwd=REPO, env=env, check=True, capture_output=True, timeout=300)

    out = tmp_path / "stopped"
    process = subprocess.Popen(_train_command(shards, out), cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (out / "run" / "metrics.jsonl").is_file() or 2 not in _losses(out / "run"):
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == PREEMPTED_EXIT_CODE, err[-3000:]
    assert "Traceback" not in err
    stopped_lines = [line for line in err.splitlines() if line.startswith("stopped at step")]
    assert len(stopped_lines) == 1 and "train.resume=auto" in stopped_lines[0], err[-3000:]
    stopped_at = int(stopped_lines[0].split()[3])
    assert 2 <= stopped_at < 6
    assert (out / "run" / "checkpoints" / "latest").read_text() == f"step_{stopped_at:08d}"

    subprocess.run(_train_command(shards, out, "train.resume=auto"), cwd=REPO, env=env, check=True,
                   capture_output=True, timeout=300)
    assert _losses(out / "run") == _losses(reference / "run")  # fp32 on CPU: exact
