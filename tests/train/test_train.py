"""The trainer end to end: 2 CPU ranks under the real deepspeed launcher, tiny shards built here.

One launch checks several things, to keep the file within a few minutes:
- `zero0`: 6 steps at ZeRO-0, the reference: loss falls, sample keys per step recorded;
- `resumed`: the same run with a checkpoint every step, rank 1 SIGKILLed after step 4 (the launcher reports the
  loss), restarted with train.resume=auto: the same loss at every step (fp32, exact) and the same sample keys
  as the reference, the data counters summed over both invocations, the killed run's later checkpoints pruned;
- `zero3` (+ gradient checkpointing, + held-out evaluation): the first steps' losses agree with ZeRO-0
  (ZeRO 1, 2 and 3 over 40 steps against the stored curve: tests/multiprocess/test_golden.py, row e);
- exports of the ZeRO-0 and ZeRO-3 runs load in open_clip and give our model's embeddings.
In-process (tests/distributed_helpers.run_ranks): GradCache gradients, amp_bf16 / amp finite losses;
a former precision name is refused before any work (tests/parallel/test_precision.py has the rest of the modes).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from pipeline.observe.metrics import read_metrics
from pipeline.shards.build import build_shards
from pipeline.shards.config import BuildConfig
from tests.distributed_helpers import free_port, run_ranks

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
DEEPSPEED = Path(sys.executable).with_name("deepspeed")
STEPS = 6


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("shapes")
    build_shards(BuildConfig(source="shapes", split="train", output=str(root / "train"), count=256,
                             samples_per_shard=64), progress=False)
    build_shards(BuildConfig(source="shapes", split="val", output=str(root / "val"), count=48,
                             samples_per_shard=24), progress=False)
    return {"train": root / "train", "val": root / "val"}


def _overrides(shards, out: Path, name: str, *extra: str) -> list[str]:
    # the tiny ViT, whatever model the demo config trains: grad checkpointing and the open_clip export
    # below need a transformer tower
    return [
        "model.name=tiny-clip", f"data.train_urls={shards['train']}", "data.val_urls=", "data.workers=1", "data.shuffle_buffer=64", "data.caption_source=txt",
        f"train.output_dir={out}", f"train.name={name}", f"train.steps={STEPS}", "train.global_batch_size=16",
        "train.log_every=1", "train.log_sample_keys=true", "train.collective_timeout_s=60",
        "optim.lr=2e-3", "optim.warmup_steps=1", "checkpoint.every_steps=3", "eval.batch_size=12", *extra,
    ]


def _launch(overrides: list[str], kill_rank_after_step: int | None = None, timeout: float = 300) -> int:
    """Run `deepspeed --num_gpus 2 ... pipeline train`; optionally SIGKILL rank 1 once a step is logged."""
    marker = uuid.uuid4().hex
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PIPELINE_TEST_MARKER": marker, "PYTHONPATH": str(REPO)}
    command = [str(DEEPSPEED), "--num_gpus", "2", "--master_port", str(free_port()), "--no_local_rank",
               "--module", "pipeline", "train", "--config", str(REPO / "configs/demo-clip.yaml"), *overrides]
    process = subprocess.Popen(command, cwd=REPO, env=env, start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + timeout
    try:
        if kill_rank_after_step is not None:
            metrics = _run_dir(overrides) / "metrics.jsonl"
            while not _logged_step(metrics, kill_rank_after_step):
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"run ended or timed out before step {kill_rank_after_step}:\n{process.stdout.read()}")
                time.sleep(0.2)
            os.kill(_rank_pid(marker, rank=1), signal.SIGKILL)
        output, _ = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
    except BaseException:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise
    if kill_rank_after_step is None and process.returncode != 0:
        pytest.fail(f"training failed with exit code {process.returncode}:\n{output[-6000:]}")
    return process.returncode


def _run_dir(overrides: list[str]) -> Path:
    values = dict(item.split("=", 1) for item in overrides)
    return Path(values["train.output_dir"]) / values["train.name"]


def _logged_step(metrics: Path, step: int) -> bool:
    if not metrics.is_file():
        return False
    return any(r.get("step", 0) >= step for r in read_metrics(metrics) if r["kind"] == "train")


def _rank_pid(marker: str, rank: int) -> int:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"PIPELINE_TEST_MARKER={marker}".encode() in environ and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    raise RuntimeError(f"no process of rank {rank} found")


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"}


def _final_train_record(run_dir: Path) -> dict:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"][-1]


def _keys(run_dir: Path, rank: int) -> list[tuple[int, list[str]]]:
    lines = (run_dir / f"keys_rank{rank}.jsonl").read_text().splitlines()
    return [(record["step"], record["keys"]) for record in map(json.loads, lines)]


@pytest.fixture(scope="module")
def runs(shards, tmp_path_factory) -> dict[str, Path]:
    """Launches on demand, each once per module."""
    out = tmp_path_factory.mktemp("runs")
    done: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name in done:
            return done[name]
        if name == "zero0":
            _launch(_overrides(shards, out, name))
        elif name == "resumed":
            # checkpoint every step, and lose rank 1 to SIGKILL after step 4; then resume
            code = _launch(_overrides(shards, out, name, "checkpoint.every_steps=1"), kill_rank_after_step=4)
            assert code != 0, "the launcher must report the killed rank"
            _launch(_overrides(shards, out, name, "train.resume=auto"))
        elif name == "zero3":
            _launch(_overrides(shards, out, name, "train.zero_stage=3", "model.grad_checkpointing=true",
                               "train.steps=3", f"data.val_urls={shards['val']}"))
        done[name] = out / name
        return done[name]

    return get


def test_zero0_loss_falls(runs):
    losses = _losses(runs("zero0"))
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert sum(losses[s] for s in (5, 6)) / 2 < sum(losses[s] for s in (1, 2)) / 2 - 0.05, losses
    assert (runs("zero0") / "checkpoints" / "latest").read_text() == "step_00000006"
    assert (runs("zero0") / "curves.png").stat().st_size > 0


def test_kill_and_resume_reproduce_every_step(runs):
    reference, resumed = runs("zero0"), runs("resumed")
    assert _losses(resumed) == _losses(reference)  # exact: fp32 on CPU is deterministic
    for rank in (0, 1):
        assert _keys(resumed, rank) == _keys(reference, rank)
    # data/* count over the run, across both invocations (the loader's own counters restart in each)
    counters = [{k: v for k, v in _final_train_record(run).items() if k.startswith("data/")} for run in (reference, resumed)]
    assert counters[0] == counters[1] and counters[0]["data/samples_read"] > 0, counters
    windows = [r for r in read_metrics(resumed / "metrics.jsonl") if r["kind"] == "train"]
    assert sum(r["data_window/samples_read"] for r in windows) <= counters[1]["data/samples_read"]
    # keep_last=3 (default): the checkpoints from the killed run's later steps were pruned
    tags = sorted(p.name for p in (resumed / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert tags[-1] == "step_00000006" and len(tags) <= 3


def test_a_resume_may_change_the_accumulation_and_the_world_size(runs, shards, tmp_path):
    # the 2-rank run's step-3 checkpoint continued in one process with 2 micro-batches a step (GradCache):
    # the same global batches (the canonical streams' positions), the same losses
    import shutil

    from tests.distributed_helpers import run_command

    reference = runs("zero0")
    shutil.copytree(reference, tmp_path / "run")
    checkpoints = tmp_path / "run" / "checkpoints"
    shutil.rmtree(checkpoints / "step_00000006")
    (checkpoints / "latest").write_text("step_00000003")
    environment = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    result = run_command(["train", "--config", str(REPO / "configs/demo-clip.yaml"),
                          *_overrides(shards, tmp_path, "run"), "train.resume=auto",
                          "train.accum_steps=2"], env={**environment, "DS_ACCELERATOR": "cpu"}, cwd=REPO)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "resumed from" in result.stdout
    losses, expected = _losses(tmp_path / "run"), _losses(reference)
    assert sorted(losses) == list(range(1, STEPS + 1))
    for step in range(4, STEPS + 1):  # gradients summed over 1 rank x 2 micro-batches, not 2 ranks: ~1e-7
        assert losses[step] == pytest.approx(expected[step], rel=1e-5), step
    # every rank's keys of steps 4-6 were read, by the one rank
    assert sorted(k for step, keys in _keys(tmp_path / "run", 0) if step > 3 for k in keys) == \
        sorted(k for rank in (0, 1) for step, keys in _keys(reference, rank) if step > 3 for k in keys)


def test_zero3_with_gradient_checkpointing_agrees_with_zero0(runs):
    reference, losses = _losses(runs("zero0")), _losses(runs("zero3"))
    for step in (1, 2, 3):
        assert losses[step] == pytest.approx(reference[step], rel=1e-4, abs=1e-4), step


def test_zero3_evaluates_on_held_out_shards(runs):
    evals = [r for r in read_metrics(runs("zero3") / "metrics.jsonl") if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [3]  # the final evaluation
    for key in ("zero_shot_top1", "media_to_text_R@1", "text_to_media_R@5"):
        assert 0.0 <= evals[0][key] <= 1.0, key
    assert evals[0]["samples"] == 48


def test_export_prints_an_eval_command_that_runs_as_printed(runs, tmp_path, capsys):
    import shlex

    from pipeline.cli import main

    run_dir = runs("zero3")  # evaluated on its data.val_urls
    assert main(["export", str(run_dir), str(tmp_path / "open_clip.pt")]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[-1] == f"evaluate it: python -m pipeline eval {tmp_path / 'open_clip.pt'} --config {run_dir / 'config.yaml'}"
    argv = shlex.split(printed[-1].removeprefix("evaluate it: python -m pipeline "))
    assert main([*argv, "--max-batches", "1", "--workers", "0"]) == 0
    assert "zero-shot top-1" in capsys.readouterr().out


@pytest.mark.parametrize("stage", ["zero0", "zero3"])
def test_export_loads_in_open_clip_with_our_embeddings(runs, stage, tmp_path):
    import open_clip

    from pipeline.checkpoint.consolidate import consolidated_state_dict
    from pipeline.commands.runs import export
    from pipeline.model.build import build_model
    from pipeline.model.config import register_open_clip_configs
    from pipeline.train.config import RunConfig, load_config

    run_dir = runs(stage)
    out = export(run_dir, tmp_path / "open_clip.pt")
    register_open_clip_configs()
    theirs, _, theirs_preprocess = open_clip.create_model_and_transforms("tiny-clip", pretrained=str(out))
    cfg = load_config(RunConfig, run_dir / "config.yaml")
    ours = build_model(cfg.model)
    tag = (run_dir / "checkpoints" / "latest").read_text()
    ours.load_state_dict(consolidated_state_dict(str(run_dir / "checkpoints"), tag))
    ours.eval()
    theirs.eval()
    # the trainer's path: uint8 pixels from the loader, through _to_device, normalised by our model;
    # open_clip's path: its own preprocessing's float normalisation of the same pixels
    from pipeline.data.config import Batch
    from pipeline.train.step import _to_device

    pixels = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    tokens = open_clip.get_tokenizer("tiny-clip")(["a red circle", "a shape", "two blue squares", "x"])
    normalize = theirs_preprocess.transforms[-1]
    with torch.no_grad():
        media, tokens = _to_device(Batch(pixels, tokens, ["k"] * 4, torch.full((4,), -1)), torch.device("cpu"))
        assert media.dtype == torch.uint8, "the trainer must hand uint8 images to the model unconverted"
        ours_out = ours(media, tokens)
        theirs_images = normalize(pixels.float() / 255)
        assert torch.allclose(theirs.encode_image(theirs_images, normalize=True), ours_out["media_features"],
                              atol=1e-5)
        assert torch.allclose(theirs.encode_text(tokens, normalize=True), ours_out["text_features"], atol=1e-5)
    # the weights are the trained ones, not a fresh init
    fresh = build_model(cfg.model)
    assert not torch.allclose(fresh.state_dict()["clip.visual.conv1.weight"],
                              ours.state_dict()["clip.visual.conv1.weight"])


# -- in-process, on gloo --------------------------------------------------------------------------
def _gradcache_gradients(rank: int, world_size: int, accum_steps: int, zero_stage: int) -> dict:
    from deepspeed.utils import safe_get_full_grad

    from pipeline.data.config import Batch
    from pipeline.loss import LossConfig, build_loss
    from pipeline.model.build import build_model
    from pipeline.model.config import ModelConfig
    from pipeline.parallel import distributed, parallelize
    from pipeline.train.step import backward_step

    distributed.init_distributed(120)
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="tiny-clip"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    local_batch = 8
    ds_config = parallelize.deepspeed_config(
        micro_batch_size=local_batch // accum_steps, accum_steps=accum_steps, world_size=world_size,
        zero_stage=zero_stage, precision="fp32", grad_clip=0.0, log_every=1,
    )
    engine = parallelize.build_engine(model, optimizer, None, ds_config)
    generator = torch.Generator().manual_seed(100 + rank)
    media = torch.randn(local_batch, 3, 64, 64, generator=generator)
    tokens = torch.randint(1, 49000, (local_batch, 32), generator=generator)
    micro = local_batch // accum_steps
    batches = [Batch(media[i * micro:(i + 1) * micro], tokens[i * micro:(i + 1) * micro],
                     [str(k) for k in range(micro)], torch.full((micro,), -1)) for i in range(accum_steps)]
    loss, _ = backward_step(engine, build_loss(LossConfig(), rank, world_size), batches, torch.device("cpu"))
    names = ("clip.visual.conv1.weight", "clip.text_projection", "clip.logit_scale", "clip.ln_final.weight")
    grads = {name: safe_get_full_grad(p).clone() for name, p in engine.module.named_parameters() if name in names}
    engine.step()
    return {"loss": float(loss), "grads": grads}


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_gradcache_accum2_equals_one_batch_twice_as_large(zero_stage):
    whole = run_ranks(_gradcache_gradients, 2, 1, zero_stage, timeout=240)
    cached = run_ranks(_gradcache_gradients, 2, 2, zero_stage, timeout=240)
    for rank in (0, 1):
        assert cached[rank]["loss"] == pytest.approx(whole[rank]["loss"], rel=1e-5)
        for name, grad in whole[rank]["grads"].items():
            assert grad.abs().sum() > 0, name
            assert torch.allclose(cached[rank]["grads"][name], grad, rtol=1e-4, atol=1e-6), name


def _train_in_process(rank: int, world_size: int, overrides: list[str]) -> list[float]:
    from pipeline.train.loop import load_run_config, train

    cfg = load_run_config(str(REPO / "configs/demo-clip.yaml"), overrides)
    train(cfg)
    run_dir = Path(cfg.train.output_dir) / cfg.train.name
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"]


@pytest.mark.parametrize("precision", ["amp_bf16", "amp"])
def test_mixed_precision_losses_are_finite(shards, tmp_path, precision):
    overrides = _overrides(shards, tmp_path, precision, f"train.precision={precision}", "train.steps=3",
                           "checkpoint.every_steps=0", "data.workers=0", "train.zero_stage=2")
    losses = run_ranks(_train_in_process, 2, overrides, timeout=300)[0]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses))), losses


def test_former_precision_name_fails_before_any_work(shards, tmp_path):
    from pipeline.core.errors import ConfigError
    from pipeline.train.loop import load_run_config

    with pytest.raises(ConfigError, match="did you mean train.precision=amp"):
        load_run_config(str(REPO / "configs/demo-clip.yaml"), _overrides(shards, tmp_path, "fp16", "train.precision=fp16"))
    assert not (tmp_path / "fp16").exists()


def test_summary_says_what_was_done_the_result_where_it_is_and_what_the_data_lacked():
    from pipeline.train.loop import load_run_config, summary

    cfg = load_run_config(str(REPO / "configs/demo-clip.yaml"), ["train.name=demo", "train.steps=300"])
    records = [
        {"kind": "train", "step": 10, "epoch": 0.13, "samples_seen": 1280, "loss": 4.256, "samples_per_s": 280.0},
        {"kind": "eval", "step": 150, "media_to_text_R@1": 0.05, "chance_R@1": 0.001, "samples": 1000.0},
        {"kind": "train", "step": 300, "epoch": 3.84, "samples_seen": 38400, "loss": 1.9112, "samples_per_s": 300.0},
        {"kind": "eval", "step": 300, "media_to_text_R@1": 0.0872, "text_to_media_R@1": 0.057, "chance_R@1": 0.001,
         "zero_shot_top1": 1.0, "chance_zero_shot_top1": 1 / 12, "samples": 1000.0, "zero_shot_samples": 1000.0},
    ]
    text = summary(cfg, records, steps_run=300, seconds=133.4, world_size=2, lost={"samples_remainder": 64},
                   checkpoint_dir="runs/demo/checkpoints", latest="global_step300")
    lines = text.splitlines()
    assert "== demo: step 300 of 300 (done)" in lines
    assert ("this invocation: 300 steps, 38,400 samples, on 2 ranks in 2 min 13 s (start-up, evaluations and "
            "checkpoints included)") in lines
    assert "samples seen: 38,400 (3.84 epochs); training speed 300 samples/s (median of the log steps)" in lines
    assert "loss: 1.9112 at step 300 (first logged: 4.2560 at step 10)" in lines
    # the last eval, not the one at 150, and the held-out set it was on
    assert "held-out figures at step 300 on shards/shapes/val (chance beside each):" in lines
    assert any(line.split() == ["media->text", "R@1", "8.72%", "0.10%"] for line in lines)
    assert any(line.split() == ["zero-shot", "top-1", "100.00%", "8.33%"] for line in lines)
    assert "checkpoints:   runs/demo/checkpoints (latest: global_step300)" in lines
    assert f"plot:          {Path('runs/demo/curves.png')}" in lines
    assert any(line.startswith("  64 samples_remainder: samples not read: the end of an epoch") for line in lines)

    stopped = summary(cfg, records[:2], steps_run=10, seconds=9, world_size=1, lost={}, checkpoint_dir="c",
                      latest=None)
    assert "== demo: step 10 of 300 (stopped early: resume with train.resume=auto)" in stopped.splitlines()
    assert "in 9 s" in stopped and "data counters" not in stopped and "(latest" not in stopped


def _average_buffers_on_rank(rank: int, world_size: int) -> list[torch.Tensor]:
    from pipeline.parallel.distributed import average_buffers

    norm = torch.nn.BatchNorm1d(3)
    norm.running_mean.fill_(0.1 * (rank + 1))  # 0.1 and 0.2: their mean, 0.15, is not exact in float32
    norm.running_var.fill_(rank + 1.0)
    norm.num_batches_tracked.fill_(7 + rank)
    average_buffers(norm)
    once = [norm.running_mean.clone(), norm.running_var.clone(), norm.num_batches_tracked.clone()]
    average_buffers(norm)  # an eval, then the save of the same step: the second call changes nothing
    return once + [norm.running_mean.clone(), norm.running_var.clone()]


def test_buffers_are_averaged_over_the_ranks_bit_for_bit_once():
    ranks = run_ranks(_average_buffers_on_rank, 2, timeout=120)
    expected_mean = ((torch.tensor(0.1).double() + torch.tensor(0.2).double()) / 2).float()
    for mean, var, _, mean_again, var_again in ranks:
        assert torch.equal(mean, expected_mean.expand(3)) and torch.equal(var, torch.full((3,), 1.5))
        assert torch.equal(mean_again, mean) and torch.equal(var_again, var)
    assert [int(r[2][()]) for r in ranks] == [7, 8]  # counters are not averaged
    assert torch.equal(ranks[0][0], ranks[1][0])


def _train_demo_clip(rank: int, world_size: int, overrides: list[str]) -> None:
    from pipeline.train.loop import load_run_config, train

    train(load_run_config(str(REPO / "configs/demo-clip.yaml"), overrides))


def test_eval_of_the_final_checkpoint_gives_the_figures_training_logged(shards, tmp_path, capsys):
    # demo-clip's ResNet has BatchNorm: each rank's running statistics come from its own micro-batches, and
    # DeepSpeed keeps only rank 0's in the checkpoint; both paths must score the same model
    from pipeline.cli import main

    overrides = _overrides(shards, tmp_path, "bn", "model.name=demo-clip", f"data.val_urls={shards['val']}",
                           "train.steps=4", "checkpoint.every_steps=0", "eval.every_steps=2",
                           "train.log_sample_keys=false", "data.workers=0")
    run_ranks(_train_demo_clip, 2, overrides, timeout=300)
    run_dir = _run_dir(overrides)
    logged = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "eval"]
    assert [r["step"] for r in logged] == [2, 4]
    assert main(["eval", str(run_dir), "--json", str(tmp_path / "eval.json")]) == 0
    figures = json.loads((tmp_path / "eval.json").read_text())["metrics"]
    in_training = {key: value for key, value in logged[-1].items() if key not in ("kind", "step", "time")}
    assert figures == in_training  # every figure, to the last digit
    assert figures["samples"] == 48 and "zero_shot_top1" in figures
