"""Run configs: every configs/*.yaml loads; bad configurations fail before any work, naming the setting."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from pipeline.core.errors import ConfigError
from pipeline.shards.build import build_shards
from pipeline.shards.config import BuildConfig
from pipeline.train.config import RunConfig, dump_config, load_config
from pipeline.train.loop import validate

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    build_shards(BuildConfig(source="shapes", split="train", output=str(root / "train"), count=64,
                             samples_per_shard=32), progress=False)
    return root / "train"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_run_config_loads_and_round_trips(path, tmp_path):
    cfg = load_config(RunConfig, path)
    dump_config(cfg, tmp_path / "config.yaml")
    assert load_config(RunConfig, tmp_path / "config.yaml") == cfg


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"optim\.lrr.*did you mean 'optim\.lr'"):
        load_config(RunConfig, CONFIGS[0], ["optim.lrr=1e-3"])


def test_global_batch_not_divisible_by_world_size(shapes, tmp_path):
    cfg = load_config(RunConfig, None, [f"data.train_urls={shapes}", "train.global_batch_size=30",
                                        f"train.output_dir={tmp_path}", "data.workers=1"])
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=r"train\.global_batch_size \(30\).*world size \(4\)"):
        validate(cfg, world_size=4)
    assert validate(cfg, world_size=2) == 15
    # 2 workers cannot split a micro-batch of 15 into equal parts: refused, naming layouts that fit
    odd = load_config(RunConfig, None, [f"data.train_urls={shapes}", "train.global_batch_size=30",
                                        f"train.output_dir={tmp_path}", "data.workers=2"])
    with pytest.raises(ConfigError, match=r"data.workers 2 cannot split the micro-batch of 15 samples per rank "
                                          r"into equal parts .*set data.workers to a divisor of 15 \(1, 3, 5, 15\)"):
        validate(odd, world_size=2)
    assert time.perf_counter() - started < 30


def test_hand_set_loader_batch_is_refused_in_training(shapes, tmp_path):
    # training derives data.batch_size from train.global_batch_size; a different value would be ignored
    cfg = load_config(RunConfig, None, [f"data.train_urls={shapes}", "train.global_batch_size=32",
                                        "data.batch_size=10", f"train.output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"data\.batch_size \(10\) is derived.*= 16; set train\.global_batch_size"):
        validate(cfg, world_size=2)
    matching = load_config(RunConfig, None, [f"data.train_urls={shapes}", "train.global_batch_size=32",
                                             "data.batch_size=16", f"train.output_dir={tmp_path}"])
    assert validate(matching, world_size=2) == 16


def test_global_batch_not_divisible_by_accum_steps():
    with pytest.raises(ConfigError, match=r"train\.global_batch_size \(10\).*train\.accum_steps \(3\)"):
        load_config(RunConfig, None, ["train.global_batch_size=10", "train.accum_steps=3"])


def test_missing_data_path_is_named(tmp_path):
    cfg = load_config(RunConfig, None, [f"data.train_urls={tmp_path / 'nowhere'}", f"train.output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"data\.train_urls .*nowhere"):
        validate(cfg, world_size=1)


def test_missing_val_path_is_named(shapes, tmp_path):
    cfg = load_config(RunConfig, None, [f"data.train_urls={shapes}", f"data.val_urls={tmp_path / 'no-val'}",
                                        f"train.output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"data\.val_urls .*no-val"):
        validate(cfg, world_size=1)


def test_unreachable_checkpoint_dir_is_named(shapes, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    cfg = load_config(RunConfig, None, [f"data.train_urls={shapes}", f"checkpoint.dir={blocker}/ckpt",
                                        f"train.output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"checkpoint\.dir .*a-file/ckpt.* not reachable"):
        validate(cfg, world_size=1)


@pytest.mark.parametrize("override, key", [
    ("train.precision=fp8", "train.precision"),
    ("train.zero_stage=4", "train.zero_stage"),
    ("optim.name=sgd", "optim.name"),
    ("checkpoint.keep_last=0", "checkpoint.keep_last"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(RunConfig, None, [override])


def test_a_renamed_key_is_refused_with_its_new_name():
    with pytest.raises(ConfigError, match="'train.grad_checkpointing' was renamed: did you mean 'model.grad_checkpointing'"):
        load_config(RunConfig, None, ["train.grad_checkpointing=true"])


def test_every_unknown_key_of_a_file_is_named_at_once_with_its_line(tmp_path):
    path = tmp_path / "typos.yaml"
    path.write_text("model:\n  name: demo-clip\ntrain:\n  stepz: 10\n  name: x\nevaluation:\n  every_steps: 5\n"
                    "optim:\n  lrr: 1e-3\n")
    with pytest.raises(ConfigError) as raised:
        load_config(RunConfig, path, ["data.wokers=2"])
    message = str(raised.value)
    assert message.startswith("4 unknown config keys: ")
    for expected in (f"{path}:4: unknown config key 'train.stepz' (did you mean 'train.steps'?)",
                     f"{path}:6: unknown config key 'evaluation' (did you mean 'eval'?)",
                     f"{path}:9: unknown config key 'optim.lrr' (did you mean 'optim.lr'?)",
                     "command line: unknown config key 'data.wokers' (did you mean 'data.workers'?)"):
        assert expected in message


def test_a_renamed_key_in_a_file_names_its_line_and_new_name(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("train:\n  steps: 5\n  grad_checkpointing: true\n")
    with pytest.raises(ConfigError, match=rf"^{path}:3: config key 'train.grad_checkpointing' was renamed: "
                                          r"did you mean 'model\.grad_checkpointing'\?$"):
        load_config(RunConfig, path)


def test_a_key_with_no_close_match_lists_the_valid_ones(tmp_path):
    path = tmp_path / "odd.yaml"
    path.write_text("train:\n  zzz: 1\n")
    with pytest.raises(ConfigError, match=rf"^{path}:2: unknown config key 'train.zzz'; valid keys in 'train': "
                                          r"accum_steps, .*zero_stage$"):
        load_config(RunConfig, path)


def test_dry_run_prints_the_plan_and_writes_nothing(shapes, tmp_path, capsys):
    from pipeline.cli import main
    from pipeline.commands.train import _millions
    from pipeline.model.build import build_model
    from pipeline.model.config import ModelConfig

    out = tmp_path / "runs"
    argv = ["train", "--config", str(Path(__file__).resolve().parents[2] / "configs/demo-clip.yaml"), "--dry-run", "--world-size", "2", f"data.train_urls={shapes}",
            "data.val_urls=", f"train.output_dir={out}", "train.global_batch_size=16", "train.accum_steps=2"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "world size 2: micro-batch 4 per rank x 2 accumulation steps x 2 ranks = global batch 16 (the " \
           "contrastive batch)" in lines
    assert any(line.startswith("source 0: 2 shards, 64 samples") for line in lines)
    # 64 samples over 2 streams of whole micro-batches of 4: 8 per rank, 2 micro-batches a step
    assert "epoch: 4 steps of 16 samples (64 samples; 0 left over, a different stretch each epoch)" in lines
    assert ("data: 2 canonical streams of 8 samples per global batch; each of the 2 (rank, worker) pairs serves 1; "
            "each holds 1 shuffle buffer of 500 samples (500 samples' raw bytes)") in lines
    parameters = sum(p.numel() for p in build_model(ModelConfig(name="demo-clip", modality="image")).parameters())
    assert f"model demo-clip (image): {_millions(parameters)} parameters, {_millions(parameters)} trainable" in lines
    memory = next(line for line in lines if line.startswith("memory per rank (ZeRO-0, adamw): "))
    assert f"= {16 * parameters / 2**20:,.1f} MiB" in memory  # fp32 weights + gradients + two AdamW states
    assert not out.exists()  # no run directory, no checkpoint probe

    # ZeRO-3 over 2 ranks halves all three; a layout the batch does not divide fails as `train` would
    assert main([*argv, "train.zero_stage=3"]) == 0
    assert f"= {8 * parameters / 2**20:,.1f} MiB" in capsys.readouterr().out
    assert main([*argv[:5], "3", *argv[6:]]) == 2
    assert "train.global_batch_size (16) is not divisible by world size (3)" in capsys.readouterr().err


def test_a_dry_run_whose_data_cannot_be_read_still_plans_the_model(tmp_path, capsys):
    # a config whose shards this machine cannot reach (a cluster path, no credentials): the model and memory
    # are planned, then the data's error ends the dry run with status 2
    from pipeline.cli import main

    missing = tmp_path / "on-the-cluster"
    argv = ["train", "--config", str(Path(__file__).resolve().parents[2] / "configs/demo-clip.yaml"), "--dry-run",
            "--world-size", "4", f"data.train_urls={missing}", f"train.output_dir={tmp_path / 'runs'}"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "data: no epoch plan (the error is the last line)" in captured.out
    assert any(line.startswith("memory per rank (ZeRO-0, adamw): ") for line in captured.out.splitlines())
    assert not any(line.startswith(("epoch:", "source 0")) for line in captured.out.splitlines())
    assert captured.err.strip().splitlines()[-1] == f"error: data.train_urls '{missing}' cannot be read: no .tar shards found at '{missing}'"
    assert not (tmp_path / "runs").exists()


def test_an_embedded_set_not_built_yet_names_make_shards(tmp_path, monkeypatch):
    from pipeline.train.loop import check_data

    monkeypatch.chdir(tmp_path)  # a fresh clone: configs/demo-clap.yaml reads shards/tones/train, not built yet
    cfg = load_config(RunConfig, next(path for path in CONFIGS if path.name == "demo-clap.yaml"))
    with pytest.raises(ConfigError, match=r"^data.train_urls 'shards/tones/train' cannot be read: no .tar shards "
                                          rf"found at 'shards/tones/train' \(a path relative to the current directory, {tmp_path}: `make shards` "
                                          r"writes the embedded data sets"):
        check_data(cfg)
