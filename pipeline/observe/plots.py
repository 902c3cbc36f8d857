"""The run's PNG: training loss and evaluation curves from metrics.jsonl.

    plot_run("runs/demo-clip/metrics.jsonl", "runs/demo-clip/curves.png")

Three panels: training loss over steps (raw and a centred moving average), zero-shot top-1/top-5
accuracy, and retrieval R@1/R@5 in both directions; each eval panel draws its chance level as a
dashed line. The retrieval panel has a log scale: its chance level (k/N, 0.1% for R@1 on 1,000
held-out pairs) would sit on the axis of a 0-100 scale. The trainer refreshes the PNG as it goes,
so drawing is quick (a long raw loss curve is thinned to at most MAX_POINTS points) and the file is
replaced atomically (temp file + rename): a viewer never sees a half-written image. The file gets
the mode any file the run writes gets (0644 under the usual umask), not the temp file's 0600.
"""

from __future__ import annotations

import gc
import os
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on training nodes
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator  # noqa: E402

from pipeline.observe.metrics import finite, read_metrics  # noqa: E402

MAX_POINTS = 4000
SMOOTHING_FRACTION = 0.1  # the smoothing window spans this fraction of the logged points


def smooth(values: list[float], window: int | None = None) -> list[float]:
    """Centred moving average over `window` points (default: about a tenth of the series, odd).
    Centred, so the curve does not lag behind the raw loss as an exponential average does on short
    runs; near the ends the window shrinks to the points that exist."""
    if window is None:
        window = max(1, int(len(values) * SMOOTHING_FRACTION)) | 1
    half = window // 2
    smoothed = []
    for index in range(len(values)):
        part = values[max(0, index - half):index + half + 1]
        smoothed.append(sum(part) / len(part))
    return smoothed


def _series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    points = [(r["step"], r[key]) for r in records if finite(r.get(key))]
    return [p[0] for p in points], [p[1] for p in points]


def _thin(steps: list[float], values: list[float]) -> tuple[list[float], list[float]]:
    stride = max(1, len(steps) // MAX_POINTS)
    return steps[::stride], values[::stride]


def _percent(value: float) -> str:
    return f"{value:.3g}%"


def _eval_panel(axes, records: list[dict], curves: list[tuple[str, str]], chance: list[tuple[str, str]],
                title: str, log_scale: bool = False) -> None:
    drawn, lowest = False, 100.0
    for key, label in curves:
        steps, values = _series(records, key)
        if steps:
            axes.plot(steps, [100 * v for v in values], marker="o", markersize=3, label=label)
            drawn = True
            lowest = min([lowest, *(100 * v for v in values if v > 0)])
    for (key, label), style in zip(chance, ("--", ":")):
        steps, values = _series(records, key)
        if steps:
            axes.axhline(100 * values[-1], linestyle=style, color="black", linewidth=1,
                         label=f"{label} {_percent(100 * values[-1])}")
            lowest = min(lowest, 100 * values[-1])
    axes.set_title(title + (" (log scale)" if log_scale else ""))
    axes.set_xlabel("step")
    axes.set_ylabel("%")
    axes.grid(alpha=0.3)
    if drawn and log_scale:
        # down to half the lowest figure or chance level, so the chance line sits clear of the axis
        axes.set_yscale("log")
        axes.set_ylim(lowest / 2, 150)
        axes.yaxis.set_major_formatter(FuncFormatter(lambda value, _: _percent(value)))
    elif drawn:
        axes.set_ylim(0, 102)  # headroom so points at 100% stay visible
    if drawn:
        # below the panel: inside it, the box would hide part of a curve or of a chance line
        axes.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3, frameon=False)
    else:
        axes.text(0.5, 0.5, "no evaluation yet", ha="center", va="center", transform=axes.transAxes, color="grey")


def _umask() -> int:
    """The process's umask (read by setting it, then setting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def plot_run(metrics_path: str | os.PathLike, out_png: str | os.PathLike, title: str | None = None) -> Path:
    """Draw the run's curves into `out_png` (atomically replaced). The title defaults to the run
    name (the directory holding metrics.jsonl). Returns the PNG path.

    A drawing leaves nothing behind. matplotlib's figure, canvas, axes and artists refer to one another, so
    what a drawing allocated (~10 MiB) is freed only by the cycle collector, whose full collections are rare
    in a process holding millions of long-lived objects: in the trainer, rank 0's RSS grew by ~6 MiB per 100
    steps (`python -m pipeline bench soak`, demo config) while rank 1's stayed flat. Drawn with automatic
    collection paused, every object of the drawing is still in the youngest generation at the end, and
    collecting that generation alone frees them (a few ms, where a full collection there takes ~150 ms)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _draw_run(metrics_path, out_png, title)
    finally:
        gc.collect(0)
        if enabled:
            gc.enable()


def _loss_panel(axes, train: list[dict]) -> None:
    """The training loss, raw (thinned) and smoothed."""
    steps, losses = _series(train, "loss")
    if steps:
        thin_steps, thin_losses = _thin(steps, losses)
        few = len(thin_steps) < 20  # a short run: each logged loss as a point too (one point draws no line)
        axes.plot(thin_steps, thin_losses, color="tab:blue", alpha=0.6 if few else 0.3, linewidth=0.8,
                  marker="o" if few else None, markersize=3, label="loss")
        window = max(1, int(len(losses) * SMOOTHING_FRACTION)) | 1
        if window > 1:  # a mean of 1 point is the loss itself
            axes.plot(steps, smooth(losses, window), color="tab:blue", linewidth=1.8,
                      label=f"smoothed (centred mean of {window} points)")
        axes.legend(fontsize=8, loc="upper right")
        last = train[-1]
        axes.set_title(f"training loss (step {last['step']}, {losses[-1]:.3f})")
    else:
        axes.set_title("training loss")
        axes.text(0.5, 0.5, "no training steps yet", ha="center", va="center", transform=axes.transAxes,
                  color="grey")
    axes.set_xlabel("step")
    axes.set_ylabel("contrastive loss")
    axes.grid(alpha=0.3)


def draw_figure(records: list[dict], title: str) -> Figure:
    """The three panels (training loss, zero-shot, retrieval) of a run's metrics.jsonl records."""
    train = [r for r in records if r.get("kind", "train") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]

    figure = Figure(figsize=(15, 5.2), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    # one step axis for all panels, so an eval point sits under the loss it followed
    loss_axes, zero_shot_axes, retrieval_axes = figure.subplots(1, 3, sharex=True)
    loss_axes.xaxis.set_major_locator(MaxNLocator(integer=True))

    _loss_panel(loss_axes, train)
    _eval_panel(zero_shot_axes, evals, [("zero_shot_top1", "top-1"), ("zero_shot_top5", "top-5")],
                [("chance_zero_shot_top1", "chance top-1"), ("chance_zero_shot_top5", "chance top-5")],
                "zero-shot classification (held out)")
    _eval_panel(retrieval_axes, evals, [("media_to_text_R@1", "media->text R@1"), ("text_to_media_R@1", "text->media R@1"),
                                        ("media_to_text_R@5", "media->text R@5"), ("text_to_media_R@5", "text->media R@5")],
                [("chance_R@1", "chance R@1"), ("chance_R@5", "chance R@5")], "retrieval (held out)", log_scale=True)
    if train or evals:  # from the run's start (once every panel is drawn): a short run's steps are not fractions
        loss_axes.set_xlim(left=0)
    figure.suptitle(title, fontsize=13, fontweight="bold")
    return figure


def _draw_run(metrics_path: str | os.PathLike, out_png: str | os.PathLike, title: str | None) -> Path:
    metrics_path, out_png = Path(metrics_path), Path(out_png)
    run_name = title or (metrics_path if metrics_path.is_dir() else metrics_path.parent).resolve().name
    figure = draw_figure(read_metrics(metrics_path), run_name)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_png.parent, prefix=f".{out_png.stem}-", suffix=".png")
    os.close(fd)
    try:
        figure.savefig(tmp, format="png")
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would hide the plot from everyone else
        os.replace(tmp, out_png)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out_png
