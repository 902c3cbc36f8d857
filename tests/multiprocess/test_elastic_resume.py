"""Elastic resume, model and optimizer side: a checkpoint written by W ranks resumes on W' ranks.

Engine level (real gloo processes, tests/distributed_helpers.run_ranks; the engines are built as train() builds
them, through pipeline.parallel.parallelize, saved and loaded through CheckpointManager): one launch at W trains a tiny
CLIP 2 steps at ZeRO 0, 1, 2 and 3, saves, and trains 2 more steps (the uninterrupted reference); one launch
at W' plans the resume (train.resume=auto), builds each engine with `loads_universal`, loads, and checks:
- the weights equal the saved ones exactly (consolidated state dicts of the checkpoint and of a re-save);
- Adam's exp_avg / exp_avg_sq of parameters equal the saved ones exactly;
- the losses of the next 2 steps (the same global batches) equal the reference's within rel 1e-4
  (measured: about 1e-7 on the first step; not exact, because the gradient all-reduce over another number
  of ranks sums in another order);
- ZeRO 1-3 were converted once to `<tag>-universal/` and a second resume reuses it; ZeRO-0 needs no
  conversion (its files are whole).
End to end (`pipeline.train.loop.train`, 2 -> 1 and 1 -> 2 ranks at ZeRO-2, train.resume=auto mid-epoch, 2
canonical streams): the keys consumed over the epoch are each read once, the conversion sits beside the
checkpoint, and every loss after the resume equals the uninterrupted run's within rel 1e-5 (the same global
batches; only the order of the gradient sums differs).
On S3: the conversion goes to the staging directory, the remote checkpoint directory is never written into.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tests.distributed_helpers import run_ranks

REPO = Path(__file__).resolve().parents[2]
GLOBAL_BATCH = 8
STAGES = (0, 1, 2, 3)
SAVED_STEP = 2
TAG = f"step_{SAVED_STEP:08d}"
# parameters whose optimizer moments are compared: a matrix, a bias-like vector, the logit scale
WATCHED = ("clip.visual.conv1.weight", "clip.ln_final.weight", "clip.logit_scale")


def _engine(world_size: int, zero_stage: int, load_universal: bool = False):
    from pipeline.model.build import build_model
    from pipeline.model.config import ModelConfig
    from pipeline.parallel import parallelize

    torch.manual_seed(0)
    model = build_model(ModelConfig(name="tiny-clip"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ds_config = parallelize.deepspeed_config(
        micro_batch_size=GLOBAL_BATCH // world_size, accum_steps=1, world_size=world_size, zero_stage=zero_stage,
        precision="fp32", grad_clip=1.0, log_every=1, load_universal=load_universal,
    )
    return parallelize.build_engine(model, optimizer, None, ds_config)


def _train(engine, rank: int, world_size: int, first_step: int, steps: int) -> list[float]:
    """Global loss of each step; step s sees the same global batch of GLOBAL_BATCH at any world size."""
    from pipeline.data.config import Batch
    from pipeline.loss import LossConfig, build_loss
    from pipeline.train.step import backward_step

    loss_fn = build_loss(LossConfig(), rank, world_size)
    local = GLOBAL_BATCH // world_size
    losses = []
    for step in range(first_step, first_step + steps):
        generator = torch.Generator().manual_seed(step)
        media = torch.randn(GLOBAL_BATCH, 3, 64, 64, generator=generator)
        tokens = torch.randint(1, 49000, (GLOBAL_BATCH, 32), generator=generator)
        mine = slice(rank * local, (rank + 1) * local)
        batch = Batch(media[mine], tokens[mine], [f"{step}-{i}" for i in range(local)], torch.full((local,), -1))
        loss, _ = backward_step(engine, loss_fn, [batch], torch.device("cpu"))
        engine.step()
        # each rank's loss is over its rows of the global logits: the global loss is their mean
        total = loss.detach().reshape(1).clone()
        torch.distributed.all_reduce(total)
        losses.append(float(total) / world_size)
    return losses


def _moments(engine) -> dict[str, torch.Tensor]:
    """Whole exp_avg / exp_avg_sq of the WATCHED parameters (a collective at ZeRO-3)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    moments = {}
    for name, parameter in engine.module.named_parameters():
        if name not in WATCHED:
            continue
        for key in ("exp_avg", "exp_avg_sq"):
            if engine.zero_optimization_stage() == 0:
                full = engine.optimizer.state[parameter][key]
            else:
                full = safe_get_full_optimizer_state(parameter, key)
            # ZeRO-3 leaves each parameter empty outside its forward: its whole shape is ds_shape
            moments[f"{name}/{key}"] = full.detach().clone().reshape(getattr(parameter, "ds_shape", parameter.shape))
    return moments


def _run_config(zero_stage: int) -> dict:
    return {"train": {"zero_stage": zero_stage, "seed": 0}}


def _save_at(rank: int, world_size: int, root: str, stages: tuple[int, ...] = STAGES, remote: str = "",
             storage_options: dict | None = None) -> dict:
    """Per stage: 2 steps, save (into `{remote or root}/zero{stage}`), 2 more steps (the reference); the saved
    moments."""
    from pipeline.checkpoint.manager import CheckpointConfig, CheckpointManager
    from pipeline.checkpoint.state import rng_state
    from pipeline.parallel import distributed

    distributed.init_distributed(120)
    results = {}
    for stage in stages:
        engine = _engine(world_size, stage)
        _train(engine, rank, world_size, 0, SAVED_STEP)
        manager = CheckpointManager(CheckpointConfig(dir=f"{remote or root}/zero{stage}",
                                                     storage_options=storage_options or {}),
                                    f"{root}/run", rank, world_size)
        state = {"step": SAVED_STEP, "samples_seen": SAVED_STEP * GLOBAL_BATCH, "rng": rng_state(),
                 "world_size": world_size, "config": _run_config(stage), "rank": rank}
        manager.save(engine, SAVED_STEP, state)
        moments = _moments(engine)
        results[stage] = {"moments": moments, "after": _train(engine, rank, world_size, SAVED_STEP, 2)}
    return results


def _resume_at(rank: int, world_size: int, root: str, stages: tuple[int, ...], attempt: int = 0, remote: str = "",
               storage_options: dict | None = None) -> dict:
    """Per stage: plan (resume=auto), build, load, the moments, a re-save (into `resaved...`), 2 steps."""
    from pipeline.checkpoint.manager import CheckpointConfig, CheckpointManager
    from pipeline.parallel import distributed

    distributed.init_distributed(120)
    results = {}
    for stage in stages:
        manager = CheckpointManager(CheckpointConfig(dir=f"{remote or root}/zero{stage}",
                                                     storage_options=storage_options or {}),
                                    f"{root}/run", rank, world_size)
        source = manager.plan_start("auto", run_config=_run_config(stage))
        engine = _engine(world_size, stage, load_universal=manager.loads_universal)
        state = manager.load(engine, source)
        moments = _moments(engine)
        resaved = CheckpointManager(CheckpointConfig(dir=f"{root}/resaved{stage}-{attempt}"), f"{root}/run", rank,
                                    world_size)
        resaved.save(engine, SAVED_STEP, {"world_size": world_size})
        results[stage] = {"source": source, "universal": manager.loads_universal, "state_rank": state["rank"],
                          "step": state["step"], "moments": moments,
                          "after": _train(engine, rank, world_size, SAVED_STEP, 2)}
    return results


def _universal_dir(root: Path, stage: int) -> Path:
    return root / f"zero{stage}" / f"{TAG}-universal"


def _check_resumed(root: Path, saved: dict, resumed: dict, saved_world: int, world_size: int,
                   saved_dir=None) -> None:
    """What the module docstring lists; `saved_dir(stage)`: a local copy of the saved checkpoint directory."""
    from pipeline.checkpoint.consolidate import consolidated_state_dict

    for rank, per_stage in enumerate(resumed):
        for stage, result in per_stage.items():
            assert result["source"] == TAG and result["step"] == SAVED_STEP
            assert result["universal"] == (stage > 0), stage  # ZeRO-0 files load as they are
            assert result["state_rank"] == rank % saved_world  # rank r >= W reads rank r mod W's trainer state
    for stage in resumed[0]:
        weights = consolidated_state_dict(str(saved_dir(stage) if saved_dir else root / f"zero{stage}"), TAG)
        again = consolidated_state_dict(str(root / f"resaved{stage}-0"), TAG)
        assert weights.keys() == again.keys()
        for name, tensor in weights.items():
            assert torch.equal(again[name], tensor), f"ZeRO-{stage}: {name} changed across the resume"
        saved_moments, resumed_moments = saved[0][stage]["moments"], resumed[0][stage]["moments"]
        assert saved_moments.keys() == resumed_moments.keys() and len(saved_moments) == 2 * len(WATCHED)
        for key, tensor in saved_moments.items():
            assert tensor.abs().sum() > 0, key
            assert torch.equal(resumed_moments[key], tensor), f"ZeRO-{stage}: {key} changed across the resume"
        reference, after = saved[0][stage]["after"], resumed[0][stage]["after"]
        assert after == pytest.approx(reference, rel=1e-4), f"ZeRO-{stage}"
        if saved_dir is None:
            assert _universal_dir(root, stage).is_dir() == (stage > 0)


@pytest.mark.slow
@pytest.mark.parametrize(("saved_world", "world_size"), [(2, 1), (1, 2)])
def test_engine_resumes_at_another_world_size_zero_0_to_3(tmp_path, saved_world, world_size):
    saved = run_ranks(_save_at, saved_world, str(tmp_path), timeout=300)
    resumed = run_ranks(_resume_at, world_size, str(tmp_path), STAGES, timeout=300)
    _check_resumed(tmp_path, saved, resumed, saved_world, world_size)
    if saved_world == 2:
        return
    # a second resume reuses the conversion: nothing in it is rewritten
    stamps = {path: path.stat().st_mtime_ns for path in _universal_dir(tmp_path, 2).rglob("*")}
    again = run_ranks(_resume_at, world_size, str(tmp_path), (2,), 1, timeout=300)
    assert again[0][2]["moments"].keys() == resumed[0][2]["moments"].keys()
    for key, tensor in resumed[0][2]["moments"].items():
        assert torch.equal(again[0][2]["moments"][key], tensor)
    assert {path: path.stat().st_mtime_ns for path in _universal_dir(tmp_path, 2).rglob("*")} == stamps


def test_rotating_a_checkpoint_removes_its_universal_conversion(tmp_path):
    from pipeline.checkpoint.manager import CheckpointConfig, CheckpointManager

    # a conversion as load leaves it, beside its tag
    root = tmp_path / "ckpt"
    manager = CheckpointManager(CheckpointConfig(dir=str(root), keep_last=1), tmp_path / "run", 0, 1)
    (root / "step_00000001").mkdir(parents=True)
    (root / "step_00000001-universal" / "step_00000001").mkdir(parents=True)
    (root / "step_00000002").mkdir()
    (root / "latest").write_text("step_00000002")
    manager._continues = True
    manager._prune()
    assert sorted(os.listdir(root)) == ["latest", "step_00000002"]


# -- end to end, through train() ----------------------------------------------------------------------
def _overrides(shards: Path, out: Path, name: str, *extra: str) -> list[str]:
    return [
        "model.name=tiny-clip", f"data.train_urls={shards}", "data.val_urls=", "data.workers=0",
        "data.shuffle_buffer=16", f"train.output_dir={out}", f"train.name={name}", f"train.global_batch_size={GLOBAL_BATCH}",
        "train.log_every=1", "train.collective_timeout_s=120", "optim.warmup_steps=1", "train.zero_stage=2",
        "train.steps=8", "train.log_sample_keys=true", "checkpoint.keep_last=5", "data.canonical_streams=2", *extra,
    ]


def _train_run(rank: int, world_size: int, overrides: list[str]) -> list[dict]:
    from pipeline.observe.metrics import read_metrics
    from pipeline.train.loop import load_run_config, train

    cfg = load_run_config(str(REPO / "configs/demo-clip.yaml"), overrides)
    train(cfg)
    return [r for r in read_metrics(Path(cfg.train.output_dir) / cfg.train.name / "metrics.jsonl")
            if r["kind"] == "train"]


def _keys(run_dir: Path) -> list[str]:
    keys = []
    for path in sorted(run_dir.glob("keys_rank*.jsonl")):
        for line in path.read_text().splitlines():
            keys.extend(json.loads(line)["keys"])
    return keys


@pytest.mark.slow
@pytest.mark.parametrize(("saved_world", "world_size"), [(2, 1), (1, 2)])
def test_train_resumes_mid_epoch_at_another_world_size(shards, tmp_path, saved_world, world_size):
    # the uninterrupted run at the old world size: 8 steps, one epoch of the 64 samples
    reference = run_ranks(_train_run, saved_world,
                          _overrides(shards, tmp_path, "ref"), timeout=300)[0]
    # the interrupted run: stopped after step 3, continued on `world_size` ranks with train.resume=auto
    run_ranks(_train_run, saved_world, _overrides(shards, tmp_path, "run", "checkpoint.every_steps=3",
                                                  "train.stop_after_steps=3"), timeout=300)
    resumed = run_ranks(_train_run, world_size, _overrides(shards, tmp_path, "run", "train.resume=auto"),
                        timeout=300)[0]
    assert [r["step"] for r in resumed] == list(range(1, 9))
    assert [r["samples_seen"] for r in resumed] == [GLOBAL_BATCH * step for step in range(1, 9)]
    # before the resume: the same run as the reference, exactly
    assert [r["loss"] for r in resumed[:3]] == [r["loss"] for r in reference[:3]]
    assert (tmp_path / "run" / "checkpoints" / "step_00000003-universal" / "latest_universal").is_file()
    # the epoch's keys, over both world sizes: each of the 64 samples read exactly once
    keys = _keys(tmp_path / "run")
    assert len(keys) == len(set(keys)) == 64
    # after it: the same global batches as the reference (2 canonical streams on either layout,
    # pipeline.data.plan), so the same losses up to the order of the sums: the gradient all-reduce over
    # another number of ranks (measured: largest relative difference about 1e-7; printed with -s)
    ours, theirs = [r["loss"] for r in resumed[3:]], [r["loss"] for r in reference[3:]]
    worst = max(abs(a - b) / abs(b) for a, b in zip(ours, theirs))
    print(f"elastic {saved_world} -> {world_size}: largest relative loss difference after the resume {worst:.2e}")
    assert ours == pytest.approx(theirs, rel=1e-5), (ours, theirs)


@pytest.fixture
def bucket(s3_server) -> tuple[str, dict]:
    import s3fs

    s3_server.make_bucket("elastic")
    s3fs.S3FileSystem.clear_instance_cache()
    return "s3://elastic", s3_server.storage_options


@pytest.mark.slow
def test_s3_checkpoint_resumes_at_another_world_size_through_staging(tmp_path, bucket):
    import s3fs

    url, storage_options = bucket
    saved = run_ranks(_save_at, 2, str(tmp_path), (2,), url, storage_options, timeout=300)
    resumed = run_ranks(_resume_at, 1, str(tmp_path), (2,), 0, url, storage_options, timeout=300)
    copy = tmp_path / "copy"
    s3fs.S3FileSystem(**storage_options).get(f"{url}/zero2/{TAG}".removeprefix("s3://"), str(copy / TAG),
                                              recursive=True)
    _check_resumed(tmp_path, saved, resumed, 2, 1, saved_dir=lambda stage: copy)
    # converted once into the staging directory (a remote checkpoint directory is never written into)
    staging = tmp_path / "run" / "checkpoint-staging"
    assert (staging / f"{TAG}-universal" / "latest_universal").is_file()
    assert not (staging / "rank0" / "download").exists(), "the downloaded original is removed after conversion"
