"""Checkpoints: s3:// destination and resume, keep-last-K, atomic save, resume=auto, bad checkpoint.dir;
a run never deletes what it did not write; resume=auto skips unreadable checkpoints; incompatible resumes
and ZeRO-stage changes are ConfigErrors before any work; no non-finite checkpoint; exact RNG state.

Most tests drive CheckpointManager with a real DeepSpeed engine over the tiny CLIP in this process
(world size 1, gloo), so each save and load is DeepSpeed's own; S3 is a real moto server on loopback.
Agreement across ranks (rank 0 decides what to resume, all_finite) runs on 2 spawned gloo ranks.
One test runs `train()` end to end (one spawned rank) against S3 with resume=auto.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.checkpoint import manager as checkpoint
from pipeline.checkpoint.manager import CheckpointConfig, CheckpointManager
from pipeline.commands.runs import load_model_from_run
from pipeline.core.errors import ConfigError
from pipeline.train.config import RunConfig, dump_config, load_config, to_dict
from tests.distributed_helpers import run_ranks
from tests.s3_server import uploads_cut_after_first_file

REPO = Path(__file__).resolve().parents[2]
MICRO_BATCH = 4


@pytest.fixture(scope="module")
def process_group():
    """A world of one in this process; the launcher variables it sets are undone afterwards."""
    from pipeline.parallel import distributed

    saved = dict(os.environ)
    distributed.init_distributed(60)
    yield
    torch.distributed.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved)


def _engine(zero_stage: int = 0, seed: int = 0):
    from pipeline.model.build import build_model
    from pipeline.model.config import ModelConfig
    from pipeline.parallel import parallelize

    torch.manual_seed(seed)
    model = build_model(ModelConfig(name="tiny-clip"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ds_config = parallelize.deepspeed_config(
        micro_batch_size=MICRO_BATCH, accum_steps=1, world_size=1, zero_stage=zero_stage, precision="fp32",
        grad_clip=1.0, log_every=1,
    )
    return parallelize.build_engine(model, optimizer, None, ds_config)


def _train(engine, first_step: int, steps: int) -> list[float]:
    """`steps` optimizer steps; step s always sees the same batch, so runs can be compared step by step."""
    from pipeline.data.config import Batch
    from pipeline.loss import LossConfig, build_loss
    from pipeline.train.step import backward_step

    loss_fn = build_loss(LossConfig(), 0, 1)
    losses = []
    for step in range(first_step, first_step + steps):
        generator = torch.Generator().manual_seed(step)
        batch = Batch(torch.randn(MICRO_BATCH, 3, 64, 64, generator=generator),
                      torch.randint(1, 49000, (MICRO_BATCH, 32), generator=generator),
                      [f"{step}-{i}" for i in range(MICRO_BATCH)], torch.full((MICRO_BATCH,), -1))
        loss, _ = backward_step(engine, loss_fn, [batch], torch.device("cpu"))
        engine.step()
        losses.append(float(loss))
    return losses


def _weights(engine) -> dict[str, torch.Tensor]:
    from deepspeed.utils import safe_get_full_fp32_param

    # ZeRO 1-3 keep the fp32 master weights in the optimizer; ZeRO-0 has none and trains the module's own
    full = {name: safe_get_full_fp32_param(p) for name, p in engine.module.named_parameters()}
    return {name: (master if master is not None else p).detach().clone()
            for (name, p), master in zip(engine.module.named_parameters(), full.values())}


def _state(step: int) -> dict:
    return {"step": step, "samples_seen": step * MICRO_BATCH, "world_size": 1}


def _assert_same_weights(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name


@pytest.fixture
def bucket(s3_server, request) -> tuple[str, dict]:
    import s3fs

    name = "ckpt-" + request.node.name.lower().replace("_", "-")[:40].rstrip("-")
    s3_server.make_bucket(name)
    s3fs.S3FileSystem.clear_instance_cache()
    return f"s3://{name}", s3_server.storage_options


# -- S3 ---------------------------------------------------------------------------------------------
def test_s3_checkpoint_resumes_exactly_and_loads_as_a_model(process_group, bucket, tmp_path):
    url, storage_options = bucket
    cfg = CheckpointConfig(dir=f"{url}/run", storage_options=storage_options)
    engine = _engine(zero_stage=2)
    _train(engine, 0, 2)
    manager = CheckpointManager(cfg, tmp_path / "run", rank=0, world_size=1)
    assert manager.resolve("auto") is None  # nothing there yet: a fresh start
    assert manager.save(engine, 2, _state(2)) == "step_00000002"
    saved = _weights(engine)
    straight = _train(engine, 2, 2)

    import s3fs

    fs = s3fs.S3FileSystem(**storage_options)
    assert fs.cat_file(f"{url}/run/latest".removeprefix("s3://")) == b"step_00000002"
    assert not list((tmp_path / "run" / "checkpoint-staging" / "rank0").glob("step_*")), "staging not cleaned"

    # a second engine with another init: everything it continues with comes from S3
    resumed_engine = _engine(zero_stage=2, seed=1)
    resumed = CheckpointManager(cfg, tmp_path / "run", rank=0, world_size=1)
    tag = resumed.resolve("auto")
    assert tag == "step_00000002"
    state = resumed.load(resumed_engine, tag)
    assert state == _state(2)
    _assert_same_weights(_weights(resumed_engine), saved)
    assert _train(resumed_engine, 2, 2) == straight  # optimizer moments restored too: exact

    # the run directory's config points at S3: the consolidated (ZeRO-2) model comes back on CPU
    run_cfg = load_config(RunConfig, None, ["model.name=tiny-clip", f"checkpoint.dir={url}/run"])
    run_cfg.checkpoint.storage_options = storage_options
    dump_config(run_cfg, tmp_path / "run" / "config.yaml")
    model, loaded_cfg = load_model_from_run(tmp_path / "run")
    assert loaded_cfg.checkpoint.dir == f"{url}/run" and not model.training
    _assert_same_weights({name: p.detach() for name, p in model.named_parameters()}, saved)


def test_interrupted_s3_upload_keeps_previous_checkpoint(process_group, bucket, tmp_path):
    import fsspec

    url, storage_options = bucket
    cfg = CheckpointConfig(dir=f"{url}/run", storage_options=storage_options, keep_last=1)
    engine = _engine()
    _train(engine, 0, 1)
    manager = CheckpointManager(cfg, tmp_path / "run", rank=0, world_size=1)
    manager.save(engine, 1, _state(1))
    saved = _weights(engine)
    _train(engine, 1, 1)

    # the connection drops after the first file of a save reached S3
    fs, _ = fsspec.core.url_to_fs(cfg.dir, **storage_options)  # the instance the manager uses (fsspec caches it)
    with uploads_cut_after_first_file(fs):
        manager.save(engine, 2, _state(2))
    assert "step_00000002" in manager.tags(), "the partial upload should be there for this test to mean anything"
    assert manager.latest_tag() == "step_00000001"
    assert "trainer_state_rank0.pt is missing" in manager.problem("step_00000002")  # uploaded last: not there

    restarted = CheckpointManager(cfg, tmp_path / "run", rank=0, world_size=1)
    other = _engine(seed=1)
    assert restarted.load(other, restarted.resolve("auto"))["step"] == 1
    _assert_same_weights(_weights(other), saved)
    # the next complete save commits and rotates the older checkpoint out; the unfinished upload was
    # started by another manager (the process that died): it is never loaded, and not this one's to delete
    restarted.save(other, 3, _state(3))
    assert restarted.tags() == ["step_00000002", "step_00000003"] and restarted.latest_tag() == "step_00000003"
    assert restarted.resolve("auto") == "step_00000003"
    # an unfinished save this manager started is its own to remove, at its next save
    with uploads_cut_after_first_file(fs):
        restarted.save(other, 4, _state(4))
    restarted.save(other, 5, _state(5))
    assert restarted.tags() == ["step_00000002", "step_00000005"] and restarted.latest_tag() == "step_00000005"


# -- local ------------------------------------------------------------------------------------------
def test_keep_last_k_deletes_older_checkpoints(process_group, tmp_path):
    cfg = CheckpointConfig(dir=str(tmp_path / "ckpt"), keep_last=2)
    manager = CheckpointManager(cfg, tmp_path / "run", rank=0, world_size=1)
    engine = _engine()
    for step in (1, 2, 3, 4):
        manager.save(engine, step, _state(step))
        expected = [f"step_{s:08d}" for s in range(max(1, step - 1), step + 1)]
        assert manager.tags() == expected, step
    assert (tmp_path / "ckpt" / "latest").read_text() == "step_00000004"
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["latest", "step_00000003", "step_00000004"]
    # saving again at the latest step (a run resumed at its end) keeps the committed checkpoint as it is
    before = (tmp_path / "ckpt" / "step_00000004" / "trainer_state_rank0.pt").stat().st_mtime_ns
    manager.save(engine, 4, _state(4))
    assert (tmp_path / "ckpt" / "step_00000004" / "trainer_state_rank0.pt").stat().st_mtime_ns == before


def test_failed_rename_keeps_previous_checkpoint_and_latest(process_group, tmp_path, monkeypatch):
    cfg = CheckpointConfig(dir=str(tmp_path / "ckpt"), keep_last=3)
    manager = CheckpointManager(cfg, tmp_path / "run", rank=0, world_size=1)
    engine = _engine()
    _train(engine, 0, 1)
    manager.save(engine, 1, _state(1))
    saved = _weights(engine)
    _train(engine, 1, 1)

    real_replace = os.replace

    def full_disk_replace(source, destination, *args, **kwargs):
        if Path(source).name.startswith(checkpoint.TMP_PREFIX + "step_"):
            raise OSError(28, "No space left on device (injected)", str(destination))
        return real_replace(source, destination, *args, **kwargs)

    monkeypatch.setattr(checkpoint.os, "replace", full_disk_replace)
    with pytest.raises(OSError, match="No space left"):
        manager.save(engine, 2, _state(2))
    monkeypatch.undo()
    root = tmp_path / "ckpt"
    assert (root / "latest").read_text() == "step_00000001"
    assert (root / ".tmp-step_00000002").is_dir(), "the interrupted save's files should be left for this test"
    assert manager.tags() == ["step_00000001"]

    restarted = CheckpointManager(cfg, tmp_path / "run", rank=0, world_size=1)
    other = _engine(seed=1)
    assert restarted.load(other, restarted.resolve("auto")) == _state(1)
    _assert_same_weights(_weights(other), saved)
    model, _ = _load_as_model(tmp_path, cfg)
    _assert_same_weights({name: p.detach() for name, p in model.named_parameters()}, saved)

    restarted.save(other, 2, _state(2))  # commits, and clears what the failed save left
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000001", "step_00000002"]


def _load_as_model(tmp_path: Path, cfg: CheckpointConfig):
    run_cfg = load_config(RunConfig, None, ["model.name=tiny-clip", f"checkpoint.dir={cfg.dir}"])
    dump_config(run_cfg, tmp_path / "run" / "config.yaml")
    return load_model_from_run(tmp_path / "run")


def test_load_model_from_run_without_checkpoint_names_the_directory(tmp_path):
    run_cfg = load_config(RunConfig, None, ["model.name=tiny-clip"])
    dump_config(run_cfg, tmp_path / "config.yaml")
    with pytest.raises(ConfigError, match="checkpoints"):
        load_model_from_run(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(ConfigError, match="no config.yaml"):
        load_model_from_run(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="run directory '.*nowhere' does not exist"):
        load_model_from_run(tmp_path / "nowhere")


# -- a run deletes only what it wrote -----------------------------------------------------------------
def _tag_files(root: Path) -> dict[str, int]:
    """Every file under `root` with its modification time: what a refused start must leave untouched."""
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


def test_fresh_start_into_a_run_with_checkpoints_is_refused_and_overwrite_replaces_them(process_group, tmp_path):
    cfg = CheckpointConfig(keep_last=2)
    engine = _engine()
    first = CheckpointManager(cfg, tmp_path / "run", rank=0, world_size=1)
    assert first.plan_start("none") is None  # an empty directory: a fresh start
    for step in (8, 12):
        first.save(engine, step, _state(step))
    root = tmp_path / "run" / "checkpoints"
    before = _tag_files(root)

    again = CheckpointManager(cfg, tmp_path / "run", rank=0, world_size=1)
    with pytest.raises(ConfigError) as refused:
        again.plan_start("none")
    message = str(refused.value)
    assert "\n" not in message and str(root) in message and "step_00000012" in message
    for way_out in ("train.resume=auto", "another train.name", "train.overwrite=true"):
        assert way_out in message
    # without the up-front check (a caller that skipped plan_start), its first save still refuses to write
    # among the earlier run's checkpoints
    for step in (8, 16):
        with pytest.raises(ConfigError, match="already holds checkpoints of an earlier run"):
            again.save(engine, step, _state(step))
    assert _tag_files(root) == before

    # continuing the run is allowed; so is replacing it when asked to
    assert CheckpointManager(cfg, tmp_path / "run", rank=0, world_size=1).plan_start("auto") == "step_00000012"
    replaced = CheckpointManager(cfg, tmp_path / "run", rank=0, world_size=1)
    assert replaced.plan_start("none", overwrite=True) is None
    assert replaced.tags() == [] and replaced.latest_tag() is None
    replaced.save(engine, 4, _state(4))
    assert replaced.tags() == ["step_00000004"]

    # an explicit checkpoint.dir names that setting as the way out, not train.name
    shared = CheckpointManager(CheckpointConfig(dir=str(root)), tmp_path / "other", rank=0, world_size=1)
    with pytest.raises(ConfigError, match="another checkpoint.dir"):
        shared.plan_start("none")


def test_continuing_run_leaves_saves_it_did_not_start_alone(process_group, tmp_path, caplog):
    cfg = CheckpointConfig(dir=str(tmp_path / "ckpt"), keep_last=2)
    root = tmp_path / "ckpt"
    engine = _engine()
    first = CheckpointManager(cfg, tmp_path / "run", rank=0, world_size=1)
    first.save(engine, 1, _state(1))
    first.save(engine, 2, _state(2))
    # what an interrupted save of another process leaves: a temp directory, a tag newer than `latest`
    shutil.copytree(root / "step_00000002", root / f"{checkpoint.TMP_PREFIX}step_00000007")
    shutil.copytree(root / "step_00000002", root / "step_00000009")

    resumed = CheckpointManager(cfg, tmp_path / "run", rank=0, world_size=1)
    assert resumed.plan_start("auto") == "step_00000002"  # `latest` is the commit point, not the newest tag
    with caplog.at_level(logging.WARNING, logger="pipeline.checkpoint.manager"):
        resumed.save(engine, 3, _state(3))
    assert resumed.tags() == ["step_00000002", "step_00000003", "step_00000009"]  # step 1 rotated out
    assert (root / f"{checkpoint.TMP_PREFIX}step_00000007").is_dir()
    assert "leaving" in caplog.text and "step_00000009" in caplog.text
    assert resumed.resolve("auto") == "step_00000003"


# -- resume=auto skips what cannot be read ------------------------------------------------------------
def _corrupt(path: Path, how: str) -> None:
    if how == "garbage":
        path.write_bytes(b"this is not a checkpoint" * 10)
    elif how == "truncated":  # a copy or upload cut short: the zip's central directory is gone
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "missing":
        path.unlink()


def test_resume_auto_skips_unreadable_checkpoints_newest_first(process_group, tmp_path, caplog):
    cfg = CheckpointConfig(dir=str(tmp_path / "ckpt"), keep_last=4)
    root = tmp_path / "ckpt"
    engine = _engine(zero_stage=2)
    manager = CheckpointManager(cfg, tmp_path / "run", rank=0, world_size=1)
    weights = {}
    for step in (1, 2, 3, 4):
        _train(engine, step - 1, 1)
        manager.save(engine, step, _state(step))
        weights[step] = _weights(engine)

    _corrupt(root / "step_00000004" / "mp_rank_00_model_states.pt", "truncated")
    _corrupt(root / "step_00000003" / "trainer_state_rank0.pt", "garbage")
    _corrupt(root / "step_00000002" / "zero_pp_rank_0_mp_rank_00_optim_states.pt", "missing")
    resumed = CheckpointManager(cfg, tmp_path / "run", rank=0, world_size=1)
    with caplog.at_level(logging.WARNING, logger="pipeline.checkpoint.manager"):
        assert resumed.resolve("auto") == "step_00000001"
    warnings = [r.getMessage() for r in caplog.records if r.name == "pipeline.checkpoint.manager"]
    assert len(warnings) == 3
    assert "step_00000004" in warnings[0] and "mp_rank_00_model_states.pt is unreadable" in warnings[0]
    assert "step_00000003" in warnings[1] and "trainer_state_rank0.pt is unreadable" in warnings[1]
    assert "step_00000002" in warnings[2] and "zero_pp_rank_0_*_optim_states.pt is missing" in warnings[2]
    other = _engine(zero_stage=2, seed=1)
    assert resumed.load(other, "step_00000001") == _state(1)
    _assert_same_weights(_weights(other), weights[1])

    # a checkpoint named explicitly is taken or refused, never replaced by another
    with pytest.raises(ConfigError, match=r"train.resume=step_00000004: .*mp_rank_00_model_states.pt is unreadable"):
        resumed.resolve("step_00000004")
    missing = tmp_path / "elsewhere" / "step_00000001"
    with pytest.raises(ConfigError, match=re.escape(f"train.resume={missing}: cannot resume from checkpoint "
                                                    f"'{missing}': it does not exist")):
        resumed.resolve(str(missing))
    # a checkpoint directory (its `latest`) and a tag directory path both name a checkpoint
    assert resumed.resolve(str(root / "step_00000001")) == "step_00000001"

    _corrupt(root / "step_00000001" / "trainer_state_rank0.pt", "missing")
    with pytest.raises(ConfigError) as nothing:
        resumed.resolve("auto")
    message = str(nothing.value)
    assert "\n" not in message and "no checkpoint" in message and "train.resume=none train.overwrite=true" in message
    for step in (1, 2, 3, 4):
        assert f"step_{step:08d}" in message


# -- resume compatibility -------------------------------------------------------------------------------
def _run_config(*overrides: str) -> dict:
    return to_dict(load_config(RunConfig, None, ["model.name=tiny-clip", *overrides]))


def test_plan_start_names_every_setting_a_resume_cannot_change(process_group, tmp_path):
    cfg = CheckpointConfig(dir=str(tmp_path / "ckpt"))
    engine = _engine(zero_stage=2)
    manager = CheckpointManager(cfg, tmp_path / "run", rank=0, world_size=1)
    saved_config = _run_config("train.zero_stage=2", "data.shuffle_buffer=20", "train.seed=3")
    manager.save(engine, 5, {**_state(5), "config": saved_config})

    # what a resume may change: learning rate, length, logging, evaluation, checkpoint cadence, loader workers
    # (an elastic resume of the data position, like the world size)
    fine = _run_config("train.zero_stage=2", "data.shuffle_buffer=20", "data.workers=1", "train.seed=3", "optim.lr=1e-5",
                       "train.steps=99", "train.log_every=7", "eval.every_steps=3", "checkpoint.every_steps=2")
    assert CheckpointManager(cfg, tmp_path / "run", 0, 1).plan_start("auto", run_config=fine) == "step_00000005"

    changed = _run_config("train.zero_stage=0", "data.shuffle_buffer=5", "train.seed=3", "train.global_batch_size=64")
    with pytest.raises(ConfigError) as refused:
        CheckpointManager(cfg, tmp_path / "run", 0, 1).plan_start("auto", run_config=changed)
    message = str(refused.value)
    assert "\n" not in message and "step_00000005" in message
    assert "train.zero_stage 2 in the checkpoint, 0 now" in message
    assert "data.shuffle_buffer 20 in the checkpoint, 5 now" in message
    assert "train.global_batch_size 256 in the checkpoint, 64 now" in message
    assert "train.seed" not in message and "world size" not in message

    # another world size is no difference: the checkpoint is converted (tests/multiprocess/test_elastic_resume.py)
    assert CheckpointManager(cfg, tmp_path / "run", 0, 2)._plan_here("auto", False, saved_config) == (
        "step_00000005", 1, 2)


def test_plan_start_holds_the_saved_canonical_streams_to_this_layout(process_group, tmp_path):
    # a run planned over 4 canonical streams at global batch 16 (data.canonical_streams 0 on 2 ranks x 2 workers)
    cfg = CheckpointConfig(dir=str(tmp_path / "ckpt"))
    manager = CheckpointManager(cfg, tmp_path / "run", rank=0, world_size=2)
    saved_config = _run_config("train.global_batch_size=16", "data.workers=2")
    loader = {"epoch": 0, "canonical_streams": 4, "global_batch": 16, "stream_position": 8}
    manager.save(_engine(), 5, {**_state(5), "config": saved_config, "loader": loader})

    def plan(world_size: int, *overrides: str):
        run_config = _run_config("train.global_batch_size=16", *overrides)
        return CheckpointManager(cfg, tmp_path / "run", 0, world_size)._plan_here("auto", False, run_config)

    # any layout whose world_size x workers divides 4 (and 4 the micro-batches), whatever 0 would choose afresh
    assert plan(1, "data.workers=4")[0] == plan(4, "data.workers=1")[0] == plan(2, "data.canonical_streams=4")[0] \
        == "step_00000005"
    with pytest.raises(ConfigError, match=r"^cannot resume from 'step_00000005': data.canonical_streams is 8, the run "
                                          r"was planned over 4 .*set data.canonical_streams=4 or leave it 0$"):
        plan(2, "data.canonical_streams=8")
    with pytest.raises(ConfigError, match=r"^cannot resume from 'step_00000005' on 1 ranks x 3 data.workers: .*"
                                          r"layouts that fit: world_size 1 x data.workers 4.*: change the layout$"):
        plan(1, "data.workers=3")
    # a loader state from before canonical streams: its batches depended on the layout, so it cannot continue
    manager.save(_engine(), 6, {**_state(6), "config": saved_config, "loader": {"epoch": 0, "batches_consumed": 3}})
    with pytest.raises(ConfigError, match="step_00000006.*has no data.canonical_streams"):
        plan(2, "data.workers=2")


@pytest.mark.parametrize(("saved", "resumed"), [(2, 0), (0, 2), (2, 3), (3, 1)])
def test_zero_stage_change_is_named_not_a_deepspeed_crash(process_group, tmp_path, saved, resumed):
    # a checkpoint without the run config (the check of last resort, in load): the stage DeepSpeed recorded
    cfg = CheckpointConfig(dir=str(tmp_path / "ckpt"))
    CheckpointManager(cfg, tmp_path / "run", 0, 1).save(_engine(zero_stage=saved), 1, _state(1))
    with pytest.raises(ConfigError, match=f"written at ZeRO stage {saved}, this run uses train.zero_stage={resumed}: "
                                          f"resume with train.zero_stage={saved}"):
        CheckpointManager(cfg, tmp_path / "run", 0, 1).load(_engine(zero_stage=resumed), "step_00000001")


# -- rank 0 decides, every rank follows ------------------------------------------------------------------
def _resolve_on_ranks(rank: int, world_size: int, directory: str) -> tuple:
    from pipeline.parallel import distributed

    manager = CheckpointManager(CheckpointConfig(dir=directory), directory, rank, world_size)
    if rank == 1:
        # this rank's view disagrees (a stale cache, a flaky mount): the answer must be rank 0's anyway
        manager.problem = lambda tag: "unreadable on rank 1"
    auto = manager.resolve("auto")
    try:
        manager.resolve(f"{directory}/step_00000042")
        explicit = None
    except ConfigError as error:
        explicit = str(error)
    distributed.barrier()
    return auto, explicit


def test_ranks_resume_from_the_checkpoint_rank_0_chose(process_group, tmp_path):
    cfg = CheckpointConfig(dir=str(tmp_path / "ckpt"))
    manager = CheckpointManager(cfg, tmp_path / "run", rank=0, world_size=1)
    engine = _engine()
    for step in (1, 2):
        manager.save(engine, step, _state(step))
    _corrupt(tmp_path / "ckpt" / "step_00000002" / "mp_rank_00_model_states.pt", "garbage")
    results = run_ranks(_resolve_on_ranks, 2, str(tmp_path / "ckpt"), timeout=120)
    assert results[0] == results[1]
    assert results[0][0] == "step_00000001" and "does not exist" in results[0][1]


# -- random state ----------------------------------------------------------------------------------------
def _draws() -> tuple:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist(), torch.randint(0, 1000, (2,)).tolist()


def test_seed_everything_and_rng_state_restore_every_generator_exactly(tmp_path):
    checkpoint.seed_everything(5)
    seeded = _draws()
    checkpoint.seed_everything(5)
    assert _draws() == seeded
    checkpoint.seed_everything(6)
    assert _draws() != seeded

    _draws()
    torch.save({"rng": checkpoint.rng_state()}, tmp_path / "state.pt")  # as the trainer state carries it
    expected = [_draws() for _ in range(3)]
    checkpoint.seed_everything(123)
    checkpoint.set_rng_state(torch.load(tmp_path / "state.pt", weights_only=False)["rng"])
    assert [_draws() for _ in range(3)] == expected


# -- nothing non-finite is saved ---------------------------------------------------------------------------
@pytest.mark.parametrize("zero_stage", [0, 3])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_save_refuses_non_finite_weights(process_group, tmp_path, zero_stage, bad):
    cfg = CheckpointConfig(dir=str(tmp_path / "ckpt"))
    engine = _engine(zero_stage=zero_stage)
    manager = CheckpointManager(cfg, tmp_path / "run", rank=0, world_size=1)
    assert checkpoint.all_finite(engine.module)
    manager.save(engine, 1, _state(1))
    parameter = dict(engine.module.named_parameters())["clip.visual.transformer.resblocks.1.mlp.c_fc.weight"]
    with torch.no_grad():
        getattr(parameter, "ds_tensor", parameter).view(-1)[3] = bad  # ZeRO-3: this rank's partition
    assert not checkpoint.all_finite(engine.module)
    with pytest.raises(FloatingPointError, match="not saving the checkpoint of step 2: .*non-finite weights"):
        manager.save(engine, 2, _state(2))
    assert manager.tags() == ["step_00000001"] and manager.latest_tag() == "step_00000001"
    assert not list((tmp_path / "ckpt").glob(f"{checkpoint.TMP_PREFIX}*")), "no save was started"


def _all_finite_on_ranks(rank: int, world_size: int) -> bool:
    module = torch.nn.Linear(4, 4)
    if rank == 1:
        with torch.no_grad():
            module.bias[0] = float("nan")
    return checkpoint.all_finite(module)


def test_all_finite_is_agreed_by_every_rank():
    assert run_ranks(_all_finite_on_ranks, 2, timeout=120) == [False, False]


# -- through train() --------------------------------------------------------------------------------
def _overrides(shards: Path, out: Path, *extra: str) -> list[str]:
    return [
        "model.name=tiny-clip", f"data.train_urls={shards}", "data.val_urls=", "data.workers=0", "data.shuffle_buffer=16",
        f"train.output_dir={out}", "train.name=run", "train.global_batch_size=8", "train.log_every=1",
        "train.collective_timeout_s=60", "optim.warmup_steps=1", "eval.batch_size=8", *extra,
    ]


def _train_in_process(rank: int, world_size: int, overrides: list[str], storage_options: dict) -> list[dict]:
    from pipeline.observe.metrics import read_metrics
    from pipeline.train.loop import load_run_config, train

    cfg = load_run_config(str(REPO / "configs/demo-clip.yaml"), overrides)
    cfg.checkpoint.storage_options = storage_options  # a nested mapping: simpler set here than as a dot-list
    train(cfg)
    return [r for r in read_metrics(Path(cfg.train.output_dir) / cfg.train.name / "metrics.jsonl")
            if r["kind"] == "train"]


def test_train_resume_auto_starts_fresh_then_continues_from_s3(bucket, shards, tmp_path):
    url, storage_options = bucket
    # log every 2 steps: losses stay on the device in between, and the step-1 checkpoint settles them first
    overrides = _overrides(shards, tmp_path, "train.steps=3", "train.resume=auto", f"checkpoint.dir={url}/run",
                           "checkpoint.every_steps=1", "train.log_every=2")
    first = run_ranks(_train_in_process, 1, [*overrides, "train.stop_after_steps=2"], storage_options, timeout=240)[0]
    assert [r["step"] for r in first] == [2]  # resume=auto with no checkpoint: a fresh start
    records = run_ranks(_train_in_process, 1, overrides, storage_options, timeout=240)[0]
    assert [r["step"] for r in records] == [2, 3]  # step 2 kept, step 3 (the last) appended by the resumed run
    assert records[1]["samples_seen"] == 24 and records[:1] == first

    import s3fs

    fs = s3fs.S3FileSystem(**storage_options)
    prefix = f"{url}/run".removeprefix("s3://")
    assert fs.cat_file(f"{prefix}/latest") == b"step_00000003"
    # configs/demo-clip.yaml keeps the last 2
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(prefix)) == ["latest", "step_00000002", "step_00000003"]


# -- bad settings fail before any work --------------------------------------------------------------
@pytest.fixture
def no_work(monkeypatch):
    """Joining the process group is the first work train() does: reaching it fails the test."""
    from pipeline.parallel import distributed

    def joined(*args, **kwargs):
        raise AssertionError("train() started work before rejecting the config")

    monkeypatch.setattr(distributed, "init_distributed", joined)


def test_unreachable_checkpoint_dir_fails_before_any_work(shards, tmp_path, no_work):
    from pipeline.train.loop import load_run_config, train

    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    cfg = load_run_config(str(REPO / "configs/demo-clip.yaml"),
                          _overrides(shards, tmp_path, f"checkpoint.dir={blocker}/checkpoints"))
    with pytest.raises(ConfigError, match=f"checkpoint.dir '{blocker}/checkpoints' is not reachable"):
        train(cfg)
    assert not (tmp_path / "run").exists(), "nothing may be written before the config is validated"


def test_unreachable_s3_endpoint_fails_before_any_work(shards, tmp_path, no_work):
    from pipeline.train.loop import load_run_config, train
    from tests.s3_server import free_port

    cfg = load_run_config(str(REPO / "configs/demo-clip.yaml"),
                          _overrides(shards, tmp_path, "checkpoint.dir=s3://nowhere/run"))
    # nothing listens on this port; one quick attempt instead of botocore's retries
    cfg.checkpoint.storage_options = {
        "key": "x", "secret": "x", "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{free_port()}"},
        "config_kwargs": {"connect_timeout": 1, "retries": {"max_attempts": 1}},
    }
    with pytest.raises(ConfigError, match=r"checkpoint.dir 's3://nowhere/run' is not reachable.*Could not connect"):
        train(cfg)
    assert not (tmp_path / "run").exists()
