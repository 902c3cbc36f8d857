"""User errors end in one line, `error: ...` on stderr, exit status 2, no traceback, for every command.

Each case runs the command line `python -m pipeline ...` in its own process (its entry point, in a process forked
from the helpers' preloaded server: tests/distributed_helpers.run_command): a bad or unknown setting, a missing
run, a corrupt checkpoint, a missing resume checkpoint, a fresh start over another run's checkpoints, a
ZeRO-stage change on resume, a diverging loss. Under a launcher only rank 0 prints.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.train.config import RunConfig, dump_config, load_config
from tests.distributed_helpers import run_command

pytestmark = pytest.mark.slow  # every case runs `python -m pipeline`, several of them train
REPO = Path(__file__).resolve().parents[2]


def _pipeline(*args: str, env: dict | None = None, timeout: float = 300,
              interpreter: bool = False) -> subprocess.CompletedProcess:
    """`python -m pipeline *args`: forked from the preloaded server, or with `interpreter` a fresh `python`."""
    environment = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO), **(env or {})}
    for variable in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        if variable not in (env or {}):
            environment.pop(variable, None)
    if interpreter:
        return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO, env=environment,
                              capture_output=True, text=True, timeout=timeout)
    return run_command(list(args), env=environment, cwd=REPO, timeout=timeout)


def _assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """stderr is exactly one non-empty line, `error: ...` holding every fragment; status 2; no traceback."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


# -- no training needed --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corrupt_runs(tmp_path_factory) -> Path:
    """Run directories whose only checkpoint holds garbage: in the trainer state, or in DeepSpeed's file."""
    root = tmp_path_factory.mktemp("corrupt")
    cfg = load_config(RunConfig, None, ["model.name=tiny-clip"])
    for name in ("garbage-state", "garbage-model"):
        tag = root / name / "checkpoints" / "step_00000004"
        tag.mkdir(parents=True)
        dump_config(cfg, root / name / "config.yaml")
        (tag.parent / "latest").write_text(tag.name)
        if name == "garbage-state":
            (tag / "trainer_state_rank0.pt").write_bytes(b"\x00garbage" * 64)
        else:
            torch.save({"step": 4, "world_size": 1}, tag / "trainer_state_rank0.pt")
        (tag / "mp_rank_00_model_states.pt").write_bytes(b"\x00garbage" * 64)
    return root


def test_unknown_config_key():
    # a fresh interpreter here, as a user starts it; the other cases fork from the preloaded server
    _assert_one_line_error(_pipeline("train", "--config", "configs/demo-clip.yaml", "train.stepz=10", interpreter=True),
                           "unknown config key 'train.stepz'", "did you mean 'train.steps'")


def test_bad_config_value():
    _assert_one_line_error(_pipeline("train", "--config", "configs/demo-clip.yaml", "train.steps=ten"),
                           "config key 'train.steps' expects an integer, got 'ten'")


def test_export_of_a_missing_run(tmp_path):
    _assert_one_line_error(_pipeline("export", str(tmp_path / "no-such-run"), str(tmp_path / "out.pt")),
                           f"run directory '{tmp_path / 'no-such-run'}' does not exist")
    assert not (tmp_path / "out.pt").exists()


@pytest.mark.parametrize(("run", "bad_file"), [("garbage-state", "trainer_state_rank0.pt"),
                                               ("garbage-model", "mp_rank_00_model_states.pt")])
def test_export_of_a_corrupt_run(corrupt_runs, tmp_path, run, bad_file):
    result = _pipeline("export", str(corrupt_runs / run), str(tmp_path / "out.pt"))
    _assert_one_line_error(result, f"checkpoint '{corrupt_runs / run}/checkpoints/step_00000004' cannot be read",
                           f"{bad_file} is unreadable")
    assert not (tmp_path / "out.pt").exists()


def test_export_of_a_missing_tag(corrupt_runs, tmp_path):
    _assert_one_line_error(_pipeline("export", str(corrupt_runs / "garbage-model"), str(tmp_path / "out.pt"),
                                     "--tag", "step_00000099"),
                           "step_00000099' cannot be read: it does not exist", "other checkpoints: step_00000004")


def test_eval_of_a_missing_run(tmp_path):
    _assert_one_line_error(_pipeline("eval", str(tmp_path / "no-such-run"), "--data", str(tmp_path)),
                           f"'{tmp_path / 'no-such-run'}' is neither a run directory nor a weights file")


def test_eval_of_a_corrupt_run(corrupt_runs, tmp_path):
    _assert_one_line_error(_pipeline("eval", str(corrupt_runs / "garbage-state"), "--data", str(tmp_path)),
                           "trainer_state_rank0.pt is unreadable")


def test_only_rank_0_prints_every_rank_exits_2(tmp_path):
    args = ("export", str(tmp_path / "no-such-run"), str(tmp_path / "out.pt"))
    for env in ({"RANK": "1", "WORLD_SIZE": "2"}, {"SLURM_PROCID": "3", "SLURM_NTASKS": "4"}):
        result = _pipeline(*args, env=env)
        assert result.returncode == 2 and result.stderr.strip() == "", result.stderr
    _assert_one_line_error(_pipeline(*args, env={"RANK": "0", "WORLD_SIZE": "2"}), "does not exist")


# -- through the trainer ---------------------------------------------------------------------------------
def _train_args(shards: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--config", "configs/demo-clip.yaml", "model.name=tiny-clip", f"data.train_urls={shards}",
        "data.val_urls=", "data.workers=0", "data.shuffle_buffer=16", f"train.output_dir={out}", "train.name=run",
        "train.global_batch_size=8", "train.steps=2", "train.log_every=1", "train.precision=fp32",
        "optim.warmup_steps=1", "checkpoint.every_steps=1", "eval.every_steps=0", *extra,
    ]


@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory) -> Path:
    """A finished 2-step run with checkpoints at steps 1 and 2 (the output dir holding runs/run)."""
    out = tmp_path_factory.mktemp("trained")
    result = _pipeline(*_train_args(shards, out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def _copy_of(trained: Path, tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    return out, {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_train_resume_from_a_missing_checkpoint(shards, tmp_path):
    # needs train.py to call CheckpointManager.plan_start before it builds the model and writes config.yaml
    missing = tmp_path / "elsewhere" / "checkpoints" / "step_00000003"
    result = _pipeline(*_train_args(shards, tmp_path, f"train.resume={missing}"))
    _assert_one_line_error(result, f"train.resume={missing}: cannot resume from checkpoint", "it does not exist")
    # validate() has made the checkpoint directory (checking it is writable); nothing else is written
    assert not (tmp_path / "run" / "config.yaml").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_data_set_smaller_than_one_global_batch_is_one_line_and_writes_nothing(shards, tmp_path):
    # a user's first own data set: 64 samples against the demo's global batch of 128
    result = _pipeline(*_train_args(shards, tmp_path, "train.global_batch_size=128"))
    _assert_one_line_error(result, "the data set has 64 samples, fewer than one global batch of 128",
                           "lower train.global_batch_size")
    assert not (tmp_path / "run" / "config.yaml").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_fresh_start_over_a_run_with_checkpoints_changes_nothing(trained, shards, tmp_path):
    out, before = _copy_of(trained, tmp_path)
    result = _pipeline(*_train_args(shards, out))  # the same command again, train.resume left at none
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert len(lines) == 1 and f"'{out / 'run' / 'checkpoints'}' already holds checkpoints" in lines[0]
    for way_out in ("train.resume=auto", "another train.name", "train.overwrite=true"):
        assert way_out in lines[0]
    checkpoints = {name: data for name, data in before.items() if name.startswith("run/checkpoints/")}
    assert {name: data for name, data in _files(out).items() if name in checkpoints} == checkpoints
    # needs train.py to call plan_start before it writes anything: then nothing at all changed
    _assert_one_line_error(result)
    assert _files(out) == before


@pytest.mark.slow
def test_resume_with_another_zero_stage_changes_nothing(trained, shards, tmp_path):
    out, before = _copy_of(trained, tmp_path)
    result = _pipeline(*_train_args(shards, out, "train.resume=auto", "train.zero_stage=2", "train.steps=3"))
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert len(lines) == 1 and "train.zero_stage" in lines[0] and "'NoneType'" not in lines[0], lines
    # needs train.py to call plan_start (with the run config) before it writes anything
    _assert_one_line_error(result, "train.zero_stage 0 in the checkpoint, 2 now")
    assert _files(out) == before


@pytest.mark.parametrize(("change", "expected"), [
    ("data.canonical_streams=2", "data.canonical_streams is 2, the run was planned over 1 canonical streams"),
    # data.workers 2 would plan 2 streams afresh; the resume keeps the saved 1, which 2 workers cannot serve
    ("data.workers=2", "on 1 ranks x 2 data.workers: data.canonical_streams 1 does not fit"),
])
def test_resume_that_cannot_continue_the_data_plan_changes_nothing(trained, shards, tmp_path, change, expected):
    out, before = _copy_of(trained, tmp_path)
    result = _pipeline(*_train_args(shards, out, "train.resume=auto", "train.steps=3", change))
    _assert_one_line_error(result, "cannot resume from 'step_00000002'", expected)
    assert _files(out) == before


@pytest.mark.slow
def test_diverging_loss_is_one_line(shards, tmp_path):
    result = _pipeline(*_train_args(shards, tmp_path, "optim.lr=1e30", "optim.warmup_steps=0", "train.steps=4",
                                    "checkpoint.every_steps=0"))
    # the progress bar may be on stderr before it; the error is one line, the last, once
    lines = [line for line in result.stderr.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert len(errors) == 1 and lines[-1] == errors[0], lines[-5:]
    assert "at step" in errors[0] and "lower optim.lr or check the data" in errors[0]
    assert not (tmp_path / "run" / "checkpoints" / "latest").exists(), "no checkpoint of a diverged model"
