"""The lean GPU step, proven on CPU: precision modes, host reads per step, compiled blocks.

- host syncs: one training step (plain and ZeRO 1-3) reads at most 4 scalars back from the device,
  the same number for a model of 2 and of 8 transformer layers (counted by wrapping Tensor.item,
  tolist, __bool__, __float__ and __int__ for the duration of the step);
- precision modes: amp_bf16 and amp train the tiny model at ZeRO 0-3 (GradCache and gradient
  checkpointing included) with losses close to fp32's; a run in amp_bf16 stopped and resumed gives
  bit-identical losses; former names are refused with the new one;
- compile: per-block torch.compile gives the eager losses.
"""

from __future__ import annotations

import collections
import json
import tempfile
from pathlib import Path

import pytest
import torch

from pipeline.core.errors import ConfigError
from pipeline.observe.metrics import read_metrics
from pipeline.shards.build import build_shards
from pipeline.shards.config import BuildConfig
from pipeline.train.config import RunConfig, load_config
from tests.distributed_helpers import run_ranks

REPO = Path(__file__).resolve().parents[2]
SYNC_CALLS = ("item", "tolist", "__bool__", "__float__", "__int__")


def _register_tiny_clip(layers: int) -> str:
    """tiny-clip with `layers` blocks in each tower, registered with open_clip under its own name."""
    import open_clip

    from pipeline.model.config import MODEL_CONFIG_DIR, register_open_clip_configs

    spec = json.loads((MODEL_CONFIG_DIR / "tiny-clip.json").read_text())
    spec["vision_cfg"]["layers"] = spec["text_cfg"]["layers"] = layers
    name = f"tiny-clip-{layers}l"
    directory = Path(tempfile.mkdtemp())
    (directory / f"{name}.json").write_text(json.dumps(spec))
    register_open_clip_configs()
    open_clip.add_model_config(directory)
    return name


def _engine(rank, world_size, *, layers=2, zero_stage=0, precision="fp32", accum_steps=1, micro=4,
            grad_checkpointing=False, compile_blocks=False):
    from pipeline.loss import LossConfig, build_loss
    from pipeline.model.build import build_model
    from pipeline.model.config import ModelConfig
    from pipeline.optim import OptimConfig, build_optimizer
    from pipeline.parallel import parallelize
    from pipeline.parallel.checkpointing import apply_activation_checkpointing
    from pipeline.parallel.parallelize import compile_blocks as compile_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(name=_register_tiny_clip(layers), grad_checkpointing=grad_checkpointing))
    apply_activation_checkpointing(model, grad_checkpointing)  # as build_engine_for does
    if compile_blocks:
        assert compile_model(model) == 2 * layers
    ds_config = parallelize.deepspeed_config(
        micro_batch_size=micro, accum_steps=accum_steps, world_size=world_size, zero_stage=zero_stage,
        precision=precision, grad_clip=1.0, log_every=1,
    )
    engine = parallelize.build_engine(model, build_optimizer(model, OptimConfig(lr=1e-3, warmup_steps=0)), None,
                                      ds_config)
    return engine, build_loss(LossConfig(), rank, world_size)


def _micro_batches(rank: int, step: int, accum_steps: int, micro: int) -> list:
    from pipeline.data.config import Batch

    # one local batch, cut into `accum_steps` micro-batches: the same samples whatever the accumulation
    generator = torch.Generator().manual_seed(1000 * step + rank)
    pixels = torch.randint(0, 256, (accum_steps * micro, 3, 64, 64), dtype=torch.uint8, generator=generator)
    tokens = torch.randint(1, 49000, (accum_steps * micro, 32), generator=generator)
    # as the loader marks slots: every one real here, but the loss still gathers the mask
    return [Batch(pixels[i * micro:(i + 1) * micro], tokens[i * micro:(i + 1) * micro],
                  [f"{step}-{i}-{k}" for k in range(micro)], torch.full((micro,), -1),
                  torch.ones(micro, dtype=torch.bool)) for i in range(accum_steps)]


def _step(engine, loss_fn, batches):
    from pipeline.train.step import train_step

    return train_step(engine, loss_fn, batches, torch.device("cpu"), grad_clip=1.0)


# -- host syncs ----------------------------------------------------------------------------------
class SyncCounter:
    """Counts the Tensor methods that read a device value back to the host, while active."""

    def __init__(self):
        self.counts: collections.Counter = collections.Counter()
        self._originals = {name: getattr(torch.Tensor, name) for name in SYNC_CALLS}

    def _wrap(self, name):
        original = self._originals[name]

        def counted(tensor, *args, **kwargs):
            self.counts[name] += 1
            return original(tensor, *args, **kwargs)
        return counted

    def __enter__(self):
        for name in SYNC_CALLS:
            setattr(torch.Tensor, name, self._wrap(name))
        return self

    def __exit__(self, *exc):
        for name, original in self._originals.items():
            setattr(torch.Tensor, name, original)


def _syncs_per_step(rank, world_size, cases):
    from pipeline.parallel import distributed

    distributed.init_distributed(120)
    results = {}
    for precision, zero_stage, layers, accum_steps in cases:
        engine, loss_fn = _engine(rank, world_size, layers=layers, zero_stage=zero_stage, precision=precision,
                                  accum_steps=accum_steps)
        for step in range(2):  # optimizer state and DeepSpeed's buffers are created in the first steps
            _step(engine, loss_fn, _micro_batches(rank, step, accum_steps, 4))
        with SyncCounter() as counter:
            for step in range(2, 5):
                _step(engine, loss_fn, _micro_batches(rank, step, accum_steps, 4))
        results[(precision, zero_stage, layers, accum_steps)] = sum(counter.counts.values()) / 3
    return results


def test_a_step_reads_at_most_4_scalars_whatever_the_depth():
    cases = [(precision, zero, layers, 1) for precision in ("amp_bf16", "fp32") for zero in (0, 1, 2, 3)
             for layers in (2, 8)]
    cases += [("amp_bf16", 0, layers, 2) for layers in (2, 8)]  # GradCache
    counts = run_ranks(_syncs_per_step, 2, cases, timeout=600)[0]
    print("host reads per step:", counts)
    for (precision, zero, layers, accum), per_step in counts.items():
        assert per_step <= 4, (precision, zero, layers, accum, per_step)
        if layers == 8:
            assert per_step == counts[(precision, zero, 2, accum)], (precision, zero, accum)
    # ZeRO-0 clips with one foreach chain and steps a fused AdamW: nothing is read back at all
    assert counts[("amp_bf16", 0, 2, 1)] == 0 and counts[("amp_bf16", 0, 8, 2)] == 0


# -- precision modes -------------------------------------------------------------------------------
def _losses_per_mode(rank, world_size, cases, steps=3):
    from pipeline.parallel import distributed

    distributed.init_distributed(120)
    results = {}
    for precision, zero_stage, accum_steps, grad_checkpointing in cases:
        engine, loss_fn = _engine(rank, world_size, zero_stage=zero_stage, precision=precision,
                                  accum_steps=accum_steps, micro=8 // accum_steps,
                                  grad_checkpointing=grad_checkpointing)
        losses = []
        for step in range(steps):
            loss, _ = _step(engine, loss_fn, _micro_batches(rank, step, accum_steps, 8 // accum_steps))
            losses.append(float(loss))
        results[(precision, zero_stage, accum_steps, grad_checkpointing)] = losses
    return results


def test_amp_modes_train_at_every_zero_stage_close_to_fp32():
    cases = [("fp32", 0, 1, False)]
    cases += [("amp_bf16", zero, 1, False) for zero in (0, 1, 2)]
    cases += [("amp_bf16", 3, 2, True), ("amp_bf16", 0, 2, True), ("amp", 0, 1, False), ("amp", 2, 2, True)]
    results = run_ranks(_losses_per_mode, 2, cases, timeout=600)
    reference = results[0][("fp32", 0, 1, False)]
    for rank_results in results:
        for case, losses in rank_results.items():
            assert all(torch.isfinite(torch.tensor(losses))), (case, losses)
            # the same init and batches: autocast changes the matmuls' rounding, not the model.
            # bf16 keeps 8 mantissa bits, so relative loss differences of ~1e-2 are expected.
            # Under amp the loss scaler skips the first steps whose scaled gradients overflow (as
            # open_clip's GradScaler does), so only its first loss, before any update, is comparable
            compared = slice(None) if case[0] != "amp" else slice(0, 1)
            assert losses[compared] == pytest.approx(rank_results[("fp32", 0, 1, False)][compared], rel=3e-2), (
                case, losses)
    assert reference != results[0][("amp_bf16", 0, 1, False)], "amp_bf16 must really run in bf16"


def test_former_precision_names_are_refused_with_the_new_one():
    for old, new in (("bf16", "amp_bf16"), ("fp16", "amp")):
        with pytest.raises(ConfigError, match=f"did you mean train.precision={new}"):
            load_config(RunConfig, None, [f"train.precision={old}"])
    with pytest.raises(ConfigError, match="did you mean 'amp_bf16'"):
        load_config(RunConfig, None, ["train.precision=amp_bf61"])
    assert load_config(RunConfig, None, []).train.precision == "auto"


# -- exact resume in amp_bf16 ---------------------------------------------------------------------
def _train(rank, world_size, overrides):
    import hashlib
    import random

    import numpy as np

    from pipeline.train.loop import load_run_config, train

    cfg = load_run_config(str(REPO / "configs/demo-clip.yaml"), overrides)
    train(cfg)
    run_dir = Path(cfg.train.output_dir) / cfg.train.name
    losses = {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"}
    # where every global generator stands after the run: a resumed run must leave them where an uninterrupted one does
    rng = hashlib.sha256(torch.get_rng_state().numpy().tobytes() + repr(random.getstate()).encode()
                         + np.random.get_state()[1].tobytes()).hexdigest()
    return losses, rng


@pytest.mark.slow
def test_amp_bf16_resume_is_bit_exact(tmp_path):
    shards = tmp_path / "shards"
    build_shards(BuildConfig(source="shapes", split="train", output=str(shards), count=128, samples_per_shard=32),
                 progress=False)

    def overrides(name, *extra):
        return ["model.name=tiny-clip", f"data.train_urls={shards}", "data.val_urls=", "data.workers=0",
                "data.shuffle_buffer=32", f"train.output_dir={tmp_path}", f"train.name={name}", "train.steps=6",
                "train.global_batch_size=16", "train.log_every=1", "train.precision=amp_bf16",
                "train.zero_stage=1", "optim.lr=2e-3", "optim.warmup_steps=1", "checkpoint.every_steps=3", *extra]

    whole = run_ranks(_train, 2, overrides("whole"), timeout=300)
    run_ranks(_train, 2, overrides("split", "train.stop_after_steps=3"), timeout=300)
    resumed = run_ranks(_train, 2, overrides("split", "train.resume=auto"), timeout=300)
    assert sorted(whole[0][0]) == list(range(1, 7))
    assert resumed[0][0] == whole[0][0]  # exact equality: the same bf16 kernels on the same data and state
    for rank in (0, 1):  # python, numpy and torch generators end where the uninterrupted run's do
        assert resumed[rank][1] == whole[rank][1], rank


# -- compile -------------------------------------------------------------------------------------
def _train_records(rank, world_size, overrides):
    from pipeline.train.loop import load_run_config, train

    cfg = load_run_config(str(REPO / "configs/demo-clip.yaml"), overrides)
    train(cfg)
    return read_metrics(Path(cfg.train.output_dir) / cfg.train.name / "metrics.jsonl")


@pytest.mark.slow
def test_compiled_blocks_give_the_eager_losses(tmp_path):
    shards = tmp_path / "shards"
    build_shards(BuildConfig(source="shapes", split="train", output=str(shards), count=64, samples_per_shard=32),
                 progress=False)

    def overrides(name, compile_setting):
        return ["model.name=tiny-clip", "model.grad_checkpointing=true", f"data.train_urls={shards}",
                "data.val_urls=", "data.workers=0", f"train.output_dir={tmp_path}", f"train.name={name}",
                "train.steps=4", "train.global_batch_size=8", "train.log_every=1", f"train.compile={compile_setting}",
                "optim.lr=2e-3", "optim.warmup_steps=1"]

    eager = run_ranks(_train_records, 1, overrides("eager", "off"), timeout=600)[0]
    compiled = run_ranks(_train_records, 1, overrides("compiled", "on"), timeout=900)[0]
    assert not [r for r in eager if r["kind"] == "compile"]
    # the first 2 steps compile: their time is one record apart, and their records carry no throughput
    [timing] = [r for r in compiled if r["kind"] == "compile"]
    assert timing["step"] == 2 and timing["first_steps_s"] > 0
    timed = {r["step"] for r in compiled if r["kind"] == "train" and "samples_per_s" in r}
    assert timed == {3, 4}, timed
    eager_losses = {r["step"]: r["loss"] for r in eager if r["kind"] == "train"}
    compiled_losses = {r["step"]: r["loss"] for r in compiled if r["kind"] == "train"}
    assert sorted(compiled_losses) == sorted(eager_losses) == [1, 2, 3, 4]
    # inductor fuses and reorders fp32 reductions: equal to float rounding, not bit for bit
    assert list(compiled_losses.values()) == pytest.approx(list(eager_losses.values()), rel=1e-4, abs=1e-5)
