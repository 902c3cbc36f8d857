"""metrics.jsonl round trip, resume truncation, TensorBoard scalars, and the run PNG."""

from __future__ import annotations

import json
import math
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from pipeline.observe.metrics import MetricsLogger, drop_superseded, read_metrics, truncate_after
from pipeline.observe.plots import _eval_panel, draw_figure, plot_run, smooth


def _train_record(step: int) -> dict:
    return {"step": step, "epoch": step // 10, "samples_seen": 64 * step, "loss": 4.0 / (1 + 0.1 * step),
            "lr": 1e-3, "logit_scale": 14.3, "samples_per_s": 512.0}


def _eval_record(step: int) -> dict:
    return {"kind": "eval", "step": step, "media_to_text_R@1": step / 200, "text_to_media_R@1": step / 250,
            "media_to_text_R@5": step / 120, "text_to_media_R@5": step / 150, "chance_R@1": 0.01, "chance_R@5": 0.05,
            "zero_shot_top1": min(1.0, step / 100), "zero_shot_top5": min(1.0, step / 60),
            "chance_zero_shot_top1": 1 / 12, "chance_zero_shot_top5": 5 / 12}


def test_round_trip_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLogger(tmp_path) as logger:
        for step in range(1, 6):
            record = _train_record(step)
            record["loss"] = torch.tensor(record["loss"])  # tensors from the trainer are stored as numbers
            logger.log(record)
        logger.log(_eval_record(5))
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 5]
    assert [r["kind"] for r in records] == ["train"] * 5 + ["eval"]
    assert records[2]["loss"] == pytest.approx(4.0 / 1.3)
    assert records[0]["samples_seen"] == 64 and isinstance(records[0]["time"], float)
    assert records[-1]["zero_shot_top1"] == pytest.approx(0.05)
    # every line is a complete JSON object on disk
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 6 and all(isinstance(json.loads(line), dict) for line in lines)

    events = EventAccumulator(str(tmp_path))
    events.Reload()
    losses = events.Scalars("train/loss")
    assert [e.step for e in losses] == [1, 2, 3, 4, 5]
    assert losses[-1].value == pytest.approx(4.0 / 1.5, rel=1e-6)
    assert [e.value for e in events.Scalars("eval/media_to_text_R@1")] == [pytest.approx(0.025)]


def test_disabled_logger_writes_nothing(tmp_path):
    logger = MetricsLogger(tmp_path / "run", enabled=False)
    logger.log(_train_record(1))
    logger.close()
    assert not (tmp_path / "run").exists()


def test_record_without_step_is_refused(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as logger, pytest.raises(ValueError, match="step"):
        logger.log({"loss": 1.0})


def test_truncate_after_and_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        for step in range(1, 11):
            logger.log(_train_record(step))
            if step % 5 == 0:
                logger.log(_eval_record(step))
    # the crashed run's last checkpoint was at step 6: steps 7..10 (and the eval at 10) go
    assert truncate_after(path, 6) == 5
    assert [(r["kind"], r["step"]) for r in read_metrics(path)] == \
        [("train", s) for s in range(1, 6)] + [("eval", 5), ("train", 6)]
    assert truncate_after(path, 6) == 0

    # resuming through the logger truncates too, then appends
    with MetricsLogger(tmp_path, resume_step=4, tensorboard=False) as logger:
        logger.log(_train_record(5))
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4, 5]
    assert not list(tmp_path.glob(".metrics-*")), "truncation left its temp file behind"

    # a fresh run into the same directory (the trainer passes -1) starts the curves anew
    with MetricsLogger(tmp_path, resume_step=-1, tensorboard=False) as logger:
        logger.log(_train_record(1))
    assert [r["step"] for r in read_metrics(path)] == [1]


def test_partial_last_line_and_superseded_records(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        for step in range(1, 5):
            logger.log(_train_record(step))
    with open(path, "a") as handle:  # a kill mid-write leaves half a line
        handle.write('{"step": 5, "loss": 1.')
    # a resume from step 2 that did not truncate: the file holds 1..4 of the old run, then 3..4 anew
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        for step in (3, 4):
            record = _train_record(step)
            record["loss"] = 100.0 + step
            logger.log(record)
    raw = read_metrics(path, latest_only=False)
    assert [r["step"] for r in raw] == [1, 2, 3, 4, 3, 4]
    assert "unreadable line 5" in caplog.text
    latest = read_metrics(path)
    assert [r["step"] for r in latest] == [1, 2, 3, 4]
    assert [r["loss"] for r in latest[2:]] == [103.0, 104.0]
    # eval records are superseded only by eval records
    mixed = [{"step": 5, "kind": "eval"}, {"step": 6}, {"step": 4}, {"step": 5}]
    assert drop_superseded(mixed) == [{"step": 5, "kind": "eval"}, {"step": 4}, {"step": 5}]


def test_smoothing_is_centred_and_keeps_the_ends():
    assert smooth([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])
    assert smooth([0.0, 3.0, 0.0, 3.0], window=3) == pytest.approx([1.5, 1.0, 2.0, 1.5])
    # a falling line stays on the line (no lag), apart from the shrunken windows at the ends
    line = [10.0 - step for step in range(30)]
    assert smooth(line)[1:-1] == pytest.approx(line[1:-1])


def test_plot_run_writes_a_readable_png(tmp_path):
    run = tmp_path / "demo-clip"
    with MetricsLogger(run, tensorboard=False) as logger:
        for step in range(1, 301):
            record = _train_record(step)
            record["loss"] += 0.2 * math.sin(step)  # noisy, so raw and smoothed differ
            logger.log(record)
            if step % 50 == 0:
                logger.log(_eval_record(step))
    out = plot_run(run / "metrics.jsonl", run / "curves.png")
    assert out == run / "curves.png"
    with Image.open(out) as image:
        image.verify()
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (1500, 520)
        # not a blank canvas: curves and text put many distinct colours on it
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 50
    assert [p.name for p in run.iterdir() if p.name.startswith(".")] == []

    # before any evaluation (and before any step) it still draws, saying so
    fresh = tmp_path / "fresh"
    with MetricsLogger(fresh, tensorboard=False) as logger:
        logger.log(_train_record(1))
    with Image.open(plot_run(fresh, fresh / "curves.png")) as image:
        assert image.size == (1500, 520)


def test_a_drawing_leaves_nothing_to_the_cycle_collector(tmp_path):
    # what a drawing left in reference cycles waited for a full collection, rare in the trainer: rank 0's
    # RSS grew step after step (bench soak); now plot_run frees it before returning. Measured in a process of
    # its own, as in rank 0: in the test process, other tests' threads may collect while the drawing runs
    run = tmp_path / "run"
    with MetricsLogger(run, tensorboard=False) as logger:
        for step in range(1, 201):
            logger.log(_train_record(step))
            if step % 50 == 0:
                logger.log(_eval_record(step))
    script = (
        "import gc, json, sys\n"
        "from pipeline.observe.plots import plot_run\n"
        "metrics, png = sys.argv[1], sys.argv[2]\n"
        "plot_run(metrics, png)  # matplotlib's one-time caches\n"
        "gc.collect()\n"
        "plot_run(metrics, png)\n"
        "print(json.dumps({'unreachable': gc.collect(), 'enabled': gc.isenabled()}))\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(run / "metrics.jsonl"), str(run / "curves.png")],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["unreachable"] < 100, found  # thousands (a whole figure) without the fix
    assert found["enabled"]


def test_the_png_has_the_mode_of_the_run_directory_files(tmp_path):
    run = tmp_path / "run"
    with MetricsLogger(run, tensorboard=False) as logger:
        logger.log(_train_record(1))
    previous = os.umask(0o022)
    try:
        out = plot_run(run / "metrics.jsonl", run / "curves.png")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(out.stat().st_mode) == 0o644  # not mkstemp's 0600
    assert stat.S_IMODE(out.stat().st_mode) == stat.S_IMODE((run / "metrics.jsonl").stat().st_mode)


def test_retrieval_chance_is_drawn_above_the_axis_on_a_log_scale():
    from matplotlib.figure import Figure

    records = [{"kind": "eval", "step": step, "media_to_text_R@1": 0.05 + step / 1000, "chance_R@1": 0.001,
                "chance_R@5": 0.005} for step in (50, 100, 150)]
    retrieval, zero_shot = Figure().subplots(1, 2)
    _eval_panel(retrieval, records, [("media_to_text_R@1", "R@1")], [("chance_R@1", "chance R@1"),
                                                                     ("chance_R@5", "chance R@5")],
                "retrieval", log_scale=True)
    assert retrieval.get_yscale() == "log"
    bottom, top = retrieval.get_ylim()
    assert bottom < 0.1 < 0.5 < 5 < top and 0.1 / bottom >= 2  # chance 0.1% sits a factor 2 above the axis
    assert "chance R@1 0.1%" in [text.get_text() for text in retrieval.get_legend().get_texts()]
    _eval_panel(zero_shot, records, [("media_to_text_R@1", "top-1")], [], "zero-shot")
    assert zero_shot.get_yscale() == "linear" and zero_shot.get_ylim() == (0, 102)


def test_a_short_run_shows_each_loss_as_a_point_on_whole_steps_from_zero():
    from matplotlib.figure import Figure

    from pipeline.observe.plots import _loss_panel

    short, long = Figure().subplots(1, 2)
    _loss_panel(short, [_train_record(5)])  # one logged loss: a line alone would draw nothing
    (raw,) = short.get_lines()  # no "smoothed" line: a mean of one point is the loss itself
    assert raw.get_marker() == "o" and list(raw.get_xdata()) == [5]
    _loss_panel(long, [_train_record(step) for step in range(1, 301)])
    raw, smoothed = long.get_lines()
    assert raw.get_marker() == "None" and "smoothed" in smoothed.get_label()

    # the figure's shared step axis starts at 0, with ticks on whole steps
    loss_axes, zero_shot_axes, _ = draw_figure([_train_record(5), _eval_record(5)], "short").axes
    assert loss_axes.get_xlim()[0] == 0 and zero_shot_axes.get_xlim()[0] == 0
    ticks = [tick for tick in loss_axes.get_xticks() if 0 <= tick <= loss_axes.get_xlim()[1]]
    assert len(ticks) >= 3 and all(tick == int(tick) for tick in ticks), ticks
