"""The GPU throughput harness, run on CPU so it never rots: MFU / HFU of every row, the batch search,
the peers, the command itself (the FLOP count itself: tests/observe/test_flops.py).

The figures it prints on CPU are not GPU figures; what is checked here is that the harness measures
consistently (the breakdown adds up to the step, MFU and HFU follow pipeline.observe.flops' definitions, the
searches end where they must, finished rows survive a later row's failure or a kill).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from pipeline.bench.gpu_search import Budget, largest_fitting
from pipeline.core import randomness
from tests.distributed_helpers import run_command, run_ranks

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("largest", [1, 2, 3, 7, 8, 100, 1000, 65536])
@pytest.mark.parametrize("limit", [8, 1000, 131072])
def test_largest_fitting_finds_the_boundary_in_logarithmic_probes(largest, limit):
    probes = []

    def fits(n):
        probes.append(n)
        return n <= largest

    assert largest_fitting(fits, 1, limit) == min(largest, limit)
    assert max(probes) <= limit
    assert len(probes) <= 2 * (limit.bit_length() + 1)


def test_largest_fitting_when_nothing_fits_and_bad_bounds():
    assert largest_fitting(lambda n: False, 4, 64) == 0
    assert largest_fitting(lambda n: n <= 40, 4, 64) == 40  # doubling from 4 then bisecting
    with pytest.raises(ValueError, match="start"):
        largest_fitting(lambda n: True, 0, 8)


@pytest.mark.parametrize("allowed_probes", [1, 2, 5, 9])
def test_largest_fitting_stops_when_told_and_returns_the_best_so_far(allowed_probes):
    probes = []

    def fits(n):
        probes.append(n)
        return n <= 100

    found = largest_fitting(fits, 1, 1000, should_stop=lambda: len(probes) >= allowed_probes)
    assert len(probes) == allowed_probes  # the first probe always runs; none after the stop
    assert found == max(n for n in probes if n <= 100)  # the largest that fitted: a lower bound
    assert largest_fitting(fits, 1, 1000, should_stop=lambda: False) == 100


def test_budget_is_spent_at_its_deadline_and_stays_spent():
    now = [0.0]
    budget = Budget(10.0, clock=lambda: now[0])
    assert not budget() and not budget.spent
    now[0] = 9.9
    assert not budget()
    now[0] = 10.0
    assert budget() and budget.spent
    now[0] = 0.0  # a clock that went back does not unspend it
    assert budget()


def _bench_and_trainer_steps(rank: int, world_size: int, argv: list[str], overrides: list[str]) -> dict:
    """The bench's run for `argv`, and the trainer's engine for the same settings written as a run config, each
    built and stepped once on the same synthetic batch."""
    import argparse

    from pipeline.bench import gpu as bench_gpu
    from pipeline.bench import gpu_ours
    from pipeline.loss import build_loss
    from pipeline.parallel import distributed
    from pipeline.train.config import RunConfig, load_config
    from pipeline.train.loop import build_engine_for
    from pipeline.train.step import train_step

    parser = argparse.ArgumentParser()
    bench_gpu.add_arguments(parser)
    bench = gpu_ours.build_run(parser.parse_args(argv))
    seed_after_build = torch.initial_seed()
    micro_batches = gpu_ours.synthetic_micro_batches(bench, 4, 2)
    initial = {name: value.clone() for name, value in bench.engine.module.state_dict().items()}
    bench_loss = float(bench.step(micro_batches))
    cfg = load_config(RunConfig, None, overrides)
    dist = distributed.init_distributed()
    engine, scheduler, _, _ = build_engine_for(cfg, dist, cfg.train.micro_batch_size(dist.world_size))
    same_init = all(torch.equal(initial[name], value) for name, value in engine.module.state_dict().items())
    loss, _ = train_step(engine, build_loss(cfg.loss, rank, world_size), micro_batches, dist.device, cfg.optim.grad_clip)
    return {"bench_scheduler": type(bench.engine.lr_scheduler).__name__, "seed_after_build": seed_after_build,
            "same_init": same_init, "bench_loss": bench_loss, "trainer_loss": float(loss),
            "bench_lr": bench.engine.get_lr(), "trainer_lr": engine.get_lr(), "kind": bench.optimizer_kind}


@pytest.mark.slow
def test_bench_runs_the_trainers_build_path_and_step():
    # GradCache (2 micro-batches of 4): the bench's flags and the same run as a trainer config give the same
    # engine (weights, LR schedule, per-rank seed) and the same first step
    argv = ["--model", "tiny-clip", "--precision", "fp32", "--batch-size", "4", "--accum-steps", "2", "--seed", "3",
            "--fused-adamw", "off"]
    overrides = ["model.name=tiny-clip", "train.precision=fp32", "train.global_batch_size=8", "train.accum_steps=2",
                 "train.seed=3", "train.compile=off", "train.steps=1000000", "optim.warmup_steps=1",
                 "optim.fused=false"]
    (result,) = run_ranks(_bench_and_trainer_steps, 1, argv, overrides)
    assert result["bench_scheduler"] == "LambdaLR"  # the trainer's warmup + cosine schedule, stepped by the engine
    # each rank its own dropout stream, as in training
    assert result["seed_after_build"] == randomness.seed_int(3, "rank_stream", 0)
    assert result["same_init"] and result["kind"] == "AdamW"
    assert result["bench_loss"] == result["trainer_loss"] and result["bench_lr"] == result["trainer_lr"]


def _bench(tmp_path: Path, *flags: str, returncode: int = 0) -> tuple[dict, str]:
    """Run the command on tiny-clip; returns the results file and the output."""
    out = tmp_path / "bench.json"
    command = ["bench", "gpu", "--model", "tiny-clip", "--batch-size", "4", "--steps", "3", "--warmup", "1",
               "--breakdown-steps", "2", "--peak-matmul-size", "512", "--json", str(out), *flags]
    # `python -m pipeline bench gpu ...`, forked from the helpers' preloaded server (its imports done)
    result = run_command(command, cwd=REPO, timeout=600,
                         env={**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)})
    assert result.returncode == returncode, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(out.read_text()), result.stdout


def _fake_open_clip_venv(tmp_path: Path, script: str) -> Path:
    """A peer venv marked ready whose `python` runs `script` (sh) instead of open_clip's trainer."""
    venv = tmp_path / "fake-openclip"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text("#!/bin/sh\n" + script + "\n")
    python.chmod(0o755)
    (venv / ".bench-ready").touch()
    return venv


def _assert_utilisation(row: dict, result: dict) -> None:
    flops, peak = result["flops_per_sample"], result["peak_flops"]
    assert row["mfu"] == pytest.approx(flops["model"] * row["samples_per_s_per_gpu"] / peak)
    assert row["hfu"] == pytest.approx(flops["executed"] * row["samples_per_s_per_gpu"] / peak)


@pytest.mark.slow
def test_bench_on_a_tiny_model_reports_consistent_figures(tmp_path):
    result, stdout = _bench(tmp_path, "--precision", "fp32", "--skip-open-clip", "--find-max-batch",
                            "--batch-limit", "4", "--contrastive-limit", "16")
    assert "samples/s" in stdout and "hand-written, eager" in stdout
    assert result["precision"] == "fp32" and result["model"] == "tiny-clip"
    assert list(result["runs"]) == ["ours", "handwritten_eager"]  # compiled: CUDA only unless --peer-compile
    ours = result["runs"]["ours"]
    assert ours["samples_per_s_per_gpu"] > 0 and ours["step_s"] > 0
    assert ours["samples_per_s_per_gpu"] == pytest.approx(4 / ours["step_s"])
    assert 0 < ours["mfu"] <= 1
    _assert_utilisation(ours, result)
    assert ours["hfu"] == ours["mfu"]  # a plain step recomputes nothing
    assert ours["peak_memory_gb"] is None and ours["host_peak_rss_gb"] > 0  # no GPU here
    assert torch.isfinite(torch.tensor(ours["final_loss"]))

    breakdown = ours["breakdown"]
    for phase in ("forward", "loss", "backward", "grad_clip", "optimizer_step"):
        assert breakdown[phase] > 0, phase
    named = sum(v for k, v in breakdown.items() if k not in ("step", "other"))
    assert named == pytest.approx(breakdown["step"], rel=0.1), breakdown
    assert named <= breakdown["step"] * 1.001

    found = result["max_batch"]
    assert found["max_local_batch"] == 4 and found["max_local_batch_checkpointing"] == 4  # the limit: no OOM on CPU
    assert found["gradcache_micro_batch"] == 4 and found["gradcache_accum_steps"] == 4
    assert found["max_contrastive_batch_gradcache"] == 16
    assert found["stopped_on_budget"] is False and found["budget_s"] == 300

    # the hand-written open_clip step: same batch, same timing, same definitions
    peer = result["runs"]["handwritten_eager"]
    assert math.isfinite(peer["samples_per_s_per_gpu"]) and peer["samples_per_s_per_gpu"] > 0
    assert peer["samples_per_s_per_gpu"] == pytest.approx(4 / peer["step_s"])
    assert math.isfinite(peer["final_loss"]) and peer["precision"] == "fp32"
    assert 0 < peer["mfu"] <= 1
    _assert_utilisation(peer, result)
    assert peer["ours_vs_this"] == pytest.approx(ours["samples_per_s_per_gpu"] / peer["samples_per_s_per_gpu"])


@pytest.mark.slow
def test_default_precision_is_amp_bf16_for_ours_and_the_peer(tmp_path):
    result, _ = _bench(tmp_path, "--skip-open-clip")
    assert result["precision"] == "amp_bf16"
    assert result["peak_matmul"] == "512^3 bfloat16"  # the peak is measured in the dtype the matmuls run in
    for name in ("ours", "handwritten_eager"):
        row = result["runs"][name]
        assert row["precision"] == "amp_bf16" and math.isfinite(row["final_loss"]), name
        assert row["samples_per_s_per_gpu"] > 0, name
        _assert_utilisation(row, result)


@pytest.mark.slow
def test_finished_rows_survive_a_kill_and_the_batch_search_stops_on_its_budget(tmp_path):
    # the open_clip peer's "python" kills the bench (as a time-out would) while that row runs: the rows and
    # the batch search finished before it must already be in the results file
    venv = _fake_open_clip_venv(tmp_path, "kill -KILL $PPID")
    result, _ = _bench(tmp_path, "--precision", "fp32", "--grad-checkpointing", "--open-clip-venv", str(venv),
                       "--find-max-batch", "--find-max-batch-budget-s", "0.01", returncode=-9)
    assert list(result["runs"]) == ["ours"]
    ours = result["runs"]["ours"]
    assert ours["samples_per_s_per_gpu"] > 0
    _assert_utilisation(ours, result)
    # checkpointing recomputes one forward: executed 4 forwards, model 3
    assert result["flops_per_sample"]["executed"] == 4 * result["flops_per_sample"]["forward"]
    assert ours["hfu"] > ours["mfu"] and ours["hfu"] == pytest.approx(4 / 3 * ours["mfu"])

    found = result["max_batch"]
    # one probe (batch 1) outlasts 10 ms: the search stops after it with what it found
    assert found["stopped_on_budget"] is True and found["max_local_batch"] == 1
    assert found["max_local_batch_checkpointing"] is None and found["max_contrastive_batch_gradcache"] is None


@pytest.mark.slow
def test_a_failing_peer_is_recorded_and_the_rows_after_it_still_run(tmp_path):
    venv = _fake_open_clip_venv(tmp_path, "echo 'no GPU for you' >&2; exit 3")
    result, stdout = _bench(tmp_path, "--precision", "fp32", "--open-clip-venv", str(venv), returncode=1)
    assert list(result["runs"]) == ["ours", "open_clip_train", "handwritten_eager"]
    failed = result["runs"]["open_clip_train"]
    assert "exit 3" in failed["error"] and "no GPU for you" in failed["error"]
    assert "samples_per_s_per_gpu" not in failed
    assert result["runs"]["handwritten_eager"]["samples_per_s_per_gpu"] > 0
    assert "failed: open_clip_train" in stdout


@pytest.mark.slow
def test_open_clip_trainer_runs_side_by_side(tmp_path):
    if not (REPO / ".venv-openclip" / ".bench-ready").exists():
        pytest.skip("the open_clip peer venv is built by `python -m pipeline bench data` (needs the package index)")
    result, _ = _bench(tmp_path, "--precision", "fp32", "--workers", "1", "--skip-handwritten")
    peer = result["runs"]["open_clip_train"]
    assert peer["samples_per_s_per_gpu"] > 0 and peer["windows"] >= 1
    assert 0 < peer["mfu"] <= 1
    _assert_utilisation(peer, result)
    assert peer["ours_vs_this"] == pytest.approx(
        result["runs"]["ours"]["samples_per_s_per_gpu"] / peer["samples_per_s_per_gpu"])


@pytest.mark.slow
@pytest.mark.parametrize("decode", ["cpu", "gpu"])
def test_data_fed_step_reports_its_wait_next_to_synthetic_data(tmp_path, shards, decode):
    # the real loader (tiny shapes shards, one worker) into the real step, then the same engine on synthetic
    # batches: both rows carry the data wait, and the ratio is the two rows' samples/s. decode=gpu runs its
    # code path on the CPU here (the step's device)
    result, stdout = _bench(tmp_path, "--precision", "fp32", "--data", str(shards), "--workers", "1",
                            "--decode", decode, "--skip-open-clip", "--skip-handwritten")
    assert list(result["runs"]) == ["ours", "ours_synthetic"]
    assert result["data"] == f"{shards} (decode={decode}, 1 workers)"
    data, synthetic = result["runs"]["ours"], result["runs"]["ours_synthetic"]
    for row in (data, synthetic):
        assert row["samples_per_s_per_gpu"] == pytest.approx(4 / row["step_s"])
        assert 0 <= row["data_wait_ms_mean"] and 0 <= row["data_wait_ms_p90"]
        # the mean of the waits cannot exceed their largest: p90 of 3 steps is the largest (nearest rank)
        assert row["data_wait_ms_mean"] <= row["data_wait_ms_p90"] + 1e-9
        assert row["data_wait_share"] == pytest.approx(row["data_wait_ms_mean"] / 1e3 / row["step_s"])
        assert 0 <= row["data_wait_share"] < 1
        assert math.isfinite(row["final_loss"])
    # synthetic batches are already on the device: next() waits for nothing the loader does
    assert synthetic["data_wait_ms_p90"] < 5
    assert "breakdown" in data and "breakdown" not in synthetic
    assert data["breakdown"]["data_wait"] >= 0
    assert synthetic["ours_vs_this"] == pytest.approx(data["samples_per_s_per_gpu"] / synthetic["samples_per_s_per_gpu"])
    assert result["data_vs_synthetic"] == synthetic["ours_vs_this"]
    assert "shards / synthetic data" in stdout and f"ours, shards (decode={decode})" in stdout


def test_decode_gpu_needs_data(capsys):
    from pipeline.cli import main

    assert main(["bench", "gpu", "--decode", "gpu"]) == 2  # refused before any process group or model
    err = capsys.readouterr().err
    assert "--decode gpu" in err and "--data" in err
