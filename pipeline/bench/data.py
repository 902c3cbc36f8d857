"""Data loading throughput against the number of workers: this loader vs open_clip's webdataset pipeline.

    python -m pipeline bench data                      # (make bench-data) workers 1, 2, 4, ... up to the cores
    python -m pipeline bench data --workers-list 1,2 --source-size 256 --skip-open-clip --repeats 1
    python -m pipeline bench data --decode-device cuda # adds the decode=gpu column (auto: when CUDA is there)

The benchmark data set (photo-like JPEGs, `SHARD_SAMPLES` per shard, sizes.json) is built once per source
size with every core and cached under `--bench-dir`: the JPEGs and captions are written into a folder (each
image seeded by its index: the same bytes whatever the number of processes), then packed by the shard builder
(`shards build --source folder`, pipeline.shards.build) as a user's data set is. Every row reads it through the same 224-px open_clip
train transform and ViT-B-32 tokenizer, at one number of DataLoader workers:
  ours          pipeline.data.dataset.build_loader, the transform training uses (models.image_pixel_transform: open_clip's
                geometric steps, uint8 out, normalised later on the device), data.jpeg_draft on: a JPEG at least
                twice the output size is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT-domain downscale);
  no draft      the same with data.jpeg_draft=False: full-size decode, then the same transform (issue 13 item 2).
                At 256-px sources draft() cannot apply (224 * 2 > 256): that is why 512-px sources are a row set;
  decode=gpu    ours with data.decode=gpu: workers only read the tars, the loading process decodes each batch with
                nvJPEG on `--decode-device` (cuda when present; `cpu` runs the same code path on the CPU, to test it);
  open_clip     `open_clip_train.data.get_wds_dataset`, run in `.venv-openclip/`, a venv created here that sees the
                main venv's packages through a .pth file but has its own webdataset==0.2.86 (the version open_clip's
                code supports; ours needs 1.0.2) and pandas;
  ceiling       decode + open_clip's full transform of the same JPEGs in a tight loop on one core (per source
                size), times the workers: what the workers could reach if loading cost nothing but decoding.
Throughput is samples/s from the first batch to the end (worker start-up excluded), the best of `--repeats`
interleaved runs each. After each row a JSON line is printed and the `--json` file rewritten, so a run cut short
keeps its rows.

Then the epoch boundary (issue 13 item 5): the loader runs two epochs over a small part of the set with a simulated
training step (`--step-ms`: a sleep per batch, by default 1.5x the loader's own time per batch, so the loader keeps
up and the median wait is the steady state); the wait for each batch is recorded, and the first wait of epoch 2
(workers already started) is compared with the median step. Epoch 1's first wait includes worker start-up.

Our own harness rather than a generic benchmark tool: the rows must run the exact training transform and loader
configuration, and open_clip's pipeline in its own interpreter, on the same cached shards.
"""

from __future__ import annotations

import gc
import inspect
import io
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from pipeline.bench.table import cell, format_cells, write_results
from pipeline.core.errors import ConfigError
from pipeline.data.shardformat import iter_samples

SHARD_SAMPLES = 500
BUILD_SEED = 0
OPEN_CLIP_VENV_PACKAGES = ["webdataset==0.2.86", "pandas"]
DEFAULT_JSON = ".bench/bench-data.json"
# batches each worker stream gets in a throughput run (the default data set size follows from it) and per epoch
# in the epoch-boundary run: enough that start-up and the last partial round do not dominate
BATCHES_PER_WORKER = 8
EPOCH_BATCHES_PER_WORKER = 6


def add_arguments(parser) -> None:
    parser.add_argument("--samples", type=int, default=0,
                        help="samples in the benchmark data set (default: 4000, or more so that each worker of the "
                        f"largest worker count reads {BATCHES_PER_WORKER} batches)")
    parser.add_argument("--workers-list", default="",
                        help="comma-separated DataLoader worker counts, one row each (default: 1, 2, 4, ... up to "
                        "the number of cores, which is included)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224, help="transform output size")
    parser.add_argument("--source-size", default="256,512",
                        help="comma-separated sides of the JPEGs in the shards: one data set and row set each "
                        "(draft decoding applies from twice the output size)")
    parser.add_argument("--build-workers", type=int, default=0,
                        help="processes that build the data set (default: every core)")
    parser.add_argument("--decode-device", default="auto", choices=("auto", "cuda", "cpu", "off"),
                        help="device of the decode=gpu column (auto: cuda when present, else no column; cpu runs "
                        "the same code path on the CPU)")
    parser.add_argument("--step-ms", type=float, default=None,
                        help="simulated training step per batch in the epoch-boundary run (default: 1.5x the "
                        "loader's own time per batch at that worker count, so that the loader keeps up)")
    parser.add_argument("--bench-dir", default=".bench", help="where shards and results are cached")
    parser.add_argument("--json", default=DEFAULT_JSON, help="results file, rewritten after each row")
    parser.add_argument("--open-clip-venv", default=".venv-openclip")
    parser.add_argument("--skip-open-clip", action="store_true", help="do not build or run the open_clip peer")
    parser.add_argument("--repeats", type=int, default=2,
                        help="alternate the runs this many times and keep each one's best (shared machines are noisy)")


# ------------------------------------------------------------------------------------------ the data set


def _jpeg(rng: np.random.Generator, size: int) -> bytes:
    """A photo-like JPEG: smooth colour gradients plus a little noise (pure noise decodes unrealistically)."""
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size] / size
    base = rng.random((3, 3))
    channels = [base[c, 0] * x + base[c, 1] * y + base[c, 2] * np.sin(6 * x * y + c) for c in range(3)]
    pixels = np.stack(channels, axis=-1)
    pixels = (pixels - pixels.min()) / (np.ptp(pixels) + 1e-6) * 230 + rng.normal(0, 8, (size, size, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _write_jpegs(folder: str, start: int, count: int, size: int) -> int:
    """JPEGs (and .txt captions) number `start` to `start + count - 1`; each image's random stream depends only
    on its number, so the bytes do not depend on which process writes it."""
    for index in range(start, start + count):
        Path(folder, f"{index:08d}.jpg").write_bytes(_jpeg(np.random.default_rng([BUILD_SEED, index]), size))
        Path(folder, f"{index:08d}.txt").write_text(f"a picture number {index}")
    return count


def build_shards(directory: Path, samples: int, size: int, processes: int | None = None) -> list[str]:
    """Shards of `SHARD_SAMPLES` samples with sizes.json, built by `processes` processes (default: every core):
    the JPEGs into a temporary folder, then the shard builder (pipeline.shards.build.build_shards, source folder) with
    as many workers. Kept and reused when already complete (the builder writes sizes.json last)."""
    from tqdm import tqdm

    from pipeline.shards.build import build_shards as build_data_set
    from pipeline.shards.config import BuildConfig

    sizes_path = directory / "sizes.json"
    if sizes_path.exists():
        return sorted(str(directory / name) for name in json.loads(sizes_path.read_text()))
    directory.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".jpegs-{size}px-", dir=directory.parent) as folder:
        jobs = [(folder, start, min(SHARD_SAMPLES, samples - start), size) for start in range(0, samples, SHARD_SAMPLES)]
        processes = max(1, min(processes or os.cpu_count() or 1, len(jobs)))
        progress = tqdm(total=samples, desc=f"making {samples} {size}-px JPEGs ({processes} process"
                        f"{'es' if processes > 1 else ''})", unit="image", mininterval=2)
        if processes == 1:
            for job in jobs:
                progress.update(_write_jpegs(*job))
        else:
            # spawn, not fork: the caller may hold torch's thread pools, which a forked child inherits broken
            with ProcessPoolExecutor(processes, mp_context=get_context("spawn")) as pool:
                for done in as_completed([pool.submit(_write_jpegs, *job) for job in jobs]):
                    progress.update(done.result())
        progress.close()
        summary = build_data_set(BuildConfig(source="folder", input=folder, output=str(directory), prefix="bench",
                                             samples_per_shard=SHARD_SAMPLES, workers=processes))
    return [str(directory / name) for name in summary.shard_sizes]


def _brace_url(paths: list[str]) -> str:
    directory = os.path.dirname(paths[0])
    return f"{directory}/bench-{{{0:06d}..{len(paths) - 1:06d}}}.tar"


# ------------------------------------------------------------------------------------------ the runs


def _build_ours(url: str, args, workers: int, *, jpeg_draft: bool = True, decode: str = "cpu",
                device: str | None = None):
    import open_clip
    from open_clip.transform import PreprocessCfg

    from pipeline.data.config import DataConfig
    from pipeline.data.loader import build_loader
    from pipeline.model.image import image_pixel_transform

    cfg = DataConfig(train_urls=url, batch_size=args.batch_size, workers=workers, shuffle_buffer=1000,
                     jpeg_draft=jpeg_draft, decode=decode)
    # decode=gpu hands the batch over on `device`; the CPU path keeps build_loader's own default
    placement = {"device": device} if decode == "gpu" else {}
    # what training uses (models.media_transform): open_clip's crop and resize, uint8 out; the float
    # normalisation happens on the device in the model, so it is not part of the loader's work
    return build_loader(cfg, url, rank=0, world_size=1, seed=0,
                        media_transform=image_pixel_transform(PreprocessCfg(size=args.image_size), is_train=True),
                        tokenizer=open_clip.get_tokenizer("ViT-B-32"), image_size=args.image_size, **placement)


def run_ours(url: str, args, workers: int, *, jpeg_draft: bool = True, decode: str = "cpu",
             device: str | None = None) -> dict:
    loader = _build_ours(url, args, workers, jpeg_draft=jpeg_draft, decode=decode, device=device)
    try:
        return _time_batches(loader, lambda batch: batch.media.shape[0], device if decode == "gpu" else None)
    finally:
        del loader  # its persistent workers end with it
        gc.collect()


def process_tree_cpu_seconds() -> float | None:
    """CPU seconds used so far by this process and its live child processes (the DataLoader workers),
    from /proc; None where there is no /proc. Unlike samples/s it hardly depends on what else runs."""
    import os
    import time

    if not os.path.isdir("/proc"):
        return None
    ticks, parent, total = os.sysconf("SC_CLK_TCK"), os.getpid(), time.process_time()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rpartition(")")[2].split()  # after the command name, which may hold spaces
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[1]) == parent:  # fields: state, ppid, ..., utime (12), stime (13)
            total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def _time_batches(loader, batch_samples, device: str | None = None) -> dict:
    """Samples/s and CPU ms per sample (this process + its workers) from the first batch to the end; with a
    CUDA `device` (decode=gpu) the device's queued decoding is waited for at both ends."""
    from pipeline.observe.flops import synchronize

    start, first, samples, batches, cpu_first = time.perf_counter(), None, 0, 0, None
    for batch in loader:
        batches += 1
        if first is None:
            synchronize(device)
            first, cpu_first = time.perf_counter(), process_tree_cpu_seconds()
            continue
        samples += batch_samples(batch)
    synchronize(device)
    end, cpu_end = time.perf_counter(), process_tree_cpu_seconds()
    cpu_ms = None if cpu_first is None else (cpu_end - cpu_first) * 1000 / max(samples, 1)
    return {"samples_per_s": samples / max(end - first, 1e-9), "batches": batches,
            "startup_s": first - start, "seconds": end - start, "cpu_ms_per_sample": cpu_ms}


OPEN_CLIP_SCRIPT = r"""
import argparse, json, sys, time
from typing import Optional
import open_clip, webdataset
from open_clip_train.data import get_wds_dataset
spec = json.loads(sys.argv[1])
args = argparse.Namespace(train_data=spec["url"], val_data=None, dataset_resampled=False, train_num_samples=None,
                          train_data_upsampling_factors=None, seed=0, batch_size=spec["batch_size"], world_size=1,
                          rank=0, workers=spec["workers"])
data = get_wds_dataset(args, open_clip.image_transform(spec["image_size"], is_train=True), is_train=True,
                       epoch=0, tokenizer=open_clip.get_tokenizer("ViT-B-32"))
start, first, samples, batches = time.perf_counter(), None, 0, 0
for images, texts in data.dataloader:
    batches += 1
    if first is None:
        first, cpu_first = time.perf_counter(), process_tree_cpu_seconds()
        continue
    samples += images.shape[0]
end, cpu_end = time.perf_counter(), process_tree_cpu_seconds()
cpu_ms = None if cpu_first is None else (cpu_end - cpu_first) * 1000 / max(samples, 1)
print(json.dumps({"samples_per_s": samples / max(end - first, 1e-9), "batches": batches,
                  "startup_s": first - start, "seconds": end - start, "webdataset": webdataset.__version__,
                  "cpu_ms_per_sample": cpu_ms}))
"""


def ensure_open_clip_venv(venv: Path) -> Path:
    """A venv with webdataset 0.2.86 of its own that reuses every other package of the running one."""
    python = venv / "bin" / "python"
    stamp = venv / ".bench-ready"
    if stamp.exists():
        return python
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    import sysconfig

    # the venv's own site-packages comes first on sys.path, the .pth entries after it: its
    # webdataset 0.2.86 wins over the main venv's 1.0.2, everything else is shared
    Path(site, "main-venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", *OPEN_CLIP_VENV_PACKAGES], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "pandas"], check=True)  # with its own deps
    stamp.touch()
    return python


def run_open_clip(url: str, args, workers: int) -> dict:
    python = ensure_open_clip_venv(Path(args.open_clip_venv))
    spec = json.dumps({"url": url, "batch_size": args.batch_size, "workers": workers,
                       "image_size": args.image_size})
    # the same CPU accounting as ours, defined once here (Optional: the peer venv's Python may be older)
    helper = inspect.getsource(process_tree_cpu_seconds).replace("float | None", "Optional[float]")
    script = OPEN_CLIP_SCRIPT.replace("spec = json.loads", helper + "\nspec = json.loads", 1)
    result = subprocess.run([str(python), "-c", script, spec], capture_output=True, text=True,
                            timeout=1800, env={**os.environ, "PYTHONPATH": ""})
    if result.returncode != 0:
        raise RuntimeError(f"open_clip's pipeline failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_ceiling(paths: list[str], args, limit: int = 1000) -> dict:
    """Decode + the same train transform of the shards' JPEGs, one core, no I/O, no batching."""
    import open_clip
    import torch
    from PIL import Image

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    jpegs = []
    for path in paths:
        with open(path, "rb") as stream:
            for sample in iter_samples(stream):
                if "jpg" in sample.files:
                    jpegs.append(sample.files["jpg"])
                if len(jpegs) >= limit:
                    break
        if len(jpegs) >= limit:
            break
    transform = open_clip.image_transform(args.image_size, is_train=True)
    start, cpu_start = time.perf_counter(), time.process_time()
    for data in jpegs:
        image = Image.open(io.BytesIO(data))
        image.draft("RGB", (args.image_size, args.image_size))
        transform(image.convert("RGB"))
    per_core = len(jpegs) / (time.perf_counter() - start)
    torch.set_num_threads(threads)
    return {"per_core": per_core, "images": len(jpegs),
            "cpu_ms_per_sample": (time.process_time() - cpu_start) * 1000 / len(jpegs)}


def measure_epoch_start(url: str, args, workers: int, step_s: float, epochs: int = 2) -> dict:
    """Run `epochs` epochs with a simulated step of `step_s` after each batch; the wait for each batch is the
    time from asking the loader for it to getting it, as the training loop (`while True: yield from loader`)
    sees it. Epoch 1's first wait includes worker start-up; epoch 2's first is the epoch boundary."""
    loader = _build_ours(url, args, workers)
    waits: list[list[float]] = []
    try:
        for _ in range(epochs):
            batches, epoch_waits = iter(loader), []
            while True:
                asked = time.perf_counter()
                try:
                    next(batches)
                except StopIteration:
                    break
                epoch_waits.append(time.perf_counter() - asked)
                time.sleep(step_s)
            waits.append(epoch_waits)
    finally:
        del loader
        gc.collect()
    steady = [wait for epoch_waits in waits for wait in epoch_waits[1:]]  # every wait but an epoch's first
    median_wait = statistics.median(steady)
    median_step = median_wait + step_s
    return {"workers": workers, "batches_per_epoch": len(waits[0]), "step_ms": step_s * 1000,
            "epoch1_first_wait_s": waits[0][0], "epoch_start_wait_s": waits[1][0],
            "median_wait_s": median_wait, "median_step_s": median_step,
            "epoch_start_vs_median_step": waits[1][0] / median_step,
            "epoch_start_vs_median_wait": waits[1][0] / median_wait if median_wait > 0 else None,
            "waits_s": waits}


# ------------------------------------------------------------------------------------------ the report


def default_workers_list(cores: int) -> list[int]:
    """1, 2, 4, ... below `cores`, then `cores` itself."""
    counts = [2**i for i in range(max(cores, 1).bit_length()) if 2**i < cores]
    return [*counts, max(cores, 1)]


def _int_list(text: str, option: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"{option} takes comma-separated integers, got {text!r}") from None
    if not values or any(value <= 0 for value in values):
        raise ConfigError(f"{option} needs positive integers, got {text!r}")
    return values


def _decode_device(choice: str) -> str | None:
    if choice == "off":
        return None
    if choice in ("cpu", "cuda"):
        return choice
    import torch

    return "cuda" if torch.cuda.is_available() else None


def _rate(result: dict | None) -> float | str | None:
    """A runner's samples/s for the table: 'failed' where it failed, None where it did not run."""
    if result and "error" in result:
        return "failed"
    return result["samples_per_s"] if result else None


def _ratio(numerator: dict | None, denominator: dict | None) -> float | None:
    if not numerator or not denominator:
        return None
    return numerator["samples_per_s"] / denominator["samples_per_s"]


# the table's columns: (title, width)
COLUMNS = (("source", 6), ("workers", 8), ("ours", 10), ("no draft", 10), ("draft x", 8), ("decode=gpu", 11),
           ("open_clip", 10), ("ours/oc", 8), ("ours/ceil", 10), ("CPU ms/sample ours, oc", 24))
TABLE_HEADER = format_cells((title, "{}", width) for title, width in COLUMNS)


def format_row(row: dict) -> str:
    runs = row["runs"]
    cpu = [runs[name].get("cpu_ms_per_sample") if runs.get(name) else None for name in ("ours", "open_clip")]
    values = ((f"{row['source_px']}px", "{}"), (row["workers"], "{}"), (_rate(runs.get("ours")), "{:.1f}"),
              (_rate(runs.get("ours_no_draft")), "{:.1f}"), (row["draft_speedup"], "{:.2f}"),
              (_rate(runs.get("ours_decode_gpu")), "{:.1f}"), (_rate(runs.get("open_clip")), "{:.1f}"),
              (row["ours_vs_open_clip"], "{:.2f}x"), (row["ours_vs_ceiling"], "{:.2f}"),
              (" / ".join(cell(value, "{:.2f}") for value in cpu), "{}"))
    return format_cells((value, fmt, width) for (value, fmt), (_, width) in zip(values, COLUMNS))


def measure_row(url: str, args, workers: int, source_px: int, ceiling: dict, decode_device: str | None) -> dict:
    """Every runner of one (source size, workers) row, interleaved `--repeats` times, the best of each kept."""
    runners = {"ours": lambda: run_ours(url, args, workers),
               "ours_no_draft": lambda: run_ours(url, args, workers, jpeg_draft=False)}
    if decode_device is not None:
        runners["ours_decode_gpu"] = lambda: run_ours(url, args, workers, decode="gpu", device=decode_device)
    if not args.skip_open_clip:
        runners["open_clip"] = lambda: run_open_clip(url, args, workers)
    best: dict[str, dict] = {}
    for _ in range(max(args.repeats, 1)):  # interleaved, so that a busy spell hits all of them alike
        for name, runner in runners.items():
            if "error" in best.get(name, {}):
                continue
            try:
                result = runner()
            except Exception as error:  # one failing runner must not cost the others' figures
                traceback.print_exc()
                best[name] = {"error": f"{type(error).__name__}: {error}"}
                continue
            if name not in best or result["samples_per_s"] > best[name]["samples_per_s"]:
                best[name] = result
    measured = {name: run for name, run in best.items() if "error" not in run}
    ceiling_rate = {"samples_per_s": ceiling["per_core"] * workers}
    return {"kind": "throughput", "source_px": source_px, "workers": workers, "batch_size": args.batch_size,
            "image_px": args.image_size, "decode_device": decode_device, "runs": best,
            "ceiling_samples_per_s": ceiling_rate["samples_per_s"],
            "ours_vs_open_clip": _ratio(measured.get("ours"), measured.get("open_clip")),
            "ours_vs_ceiling": _ratio(measured.get("ours"), ceiling_rate),
            "draft_speedup": _ratio(measured.get("ours"), measured.get("ours_no_draft")),
            "decode_gpu_vs_ours": _ratio(measured.get("ours_decode_gpu"), measured.get("ours")),
            "failed": sorted(set(best) - set(measured))}


def run(args) -> int:
    cores = os.cpu_count() or 1
    workers_list = _int_list(args.workers_list, "--workers-list") if args.workers_list else default_workers_list(cores)
    source_sizes = _int_list(args.source_size, "--source-size")
    if args.batch_size <= 0 or args.repeats <= 0 or args.samples < 0:
        raise ConfigError("--batch-size and --repeats must be positive, --samples >= 0")
    # by default every worker reads BATCHES_PER_WORKER batches, and there are at least as many shards as
    # workers (open_clip's pipeline refuses fewer)
    samples = args.samples or max(4000, BATCHES_PER_WORKER * args.batch_size * max(workers_list),
                                  SHARD_SAMPLES * max(workers_list))
    decode_device = _decode_device(args.decode_device)
    results_path = Path(args.json)
    result: dict = {"samples": samples, "batch_size": args.batch_size, "image_px": args.image_size,
                    "workers_list": workers_list, "source_sizes": source_sizes, "cores": cores,
                    "decode_device": decode_device, "repeats": args.repeats, "argv": sys.argv[1:],
                    "data_sets": {}, "ceiling": {}, "rows": [], "epoch_start": None,
                    "load_average_before": os.getloadavg()[0]}
    datasets = {}
    for size in source_sizes:
        directory = Path(args.bench_dir) / f"data-{samples}-{size}px"
        began = time.perf_counter()
        built = not (directory / "sizes.json").exists()
        paths = build_shards(directory, samples, size, args.build_workers or cores)
        seconds = time.perf_counter() - began
        datasets[size] = paths
        result["data_sets"][str(size)] = {"directory": str(directory), "shards": len(paths),
                                          "build_s": seconds if built else None}
        print(f"data: {samples} samples of {size}-px JPEGs in {len(paths)} shards ({directory})"
              + (f", built in {seconds:.1f} s ({samples / seconds:.0f} samples/s)" if built else ", cached"),
              flush=True)
    print(f"transform: open_clip {args.image_size}-px train; batch {args.batch_size}; workers {workers_list}; "
          f"{cores} cores; decode=gpu column: {decode_device or 'off (no CUDA; --decode-device cpu tests it)'}; "
          f"rows go to {results_path} as they finish", flush=True)
    print("samples/s; draft x = ours / no draft; ours/oc = ours / open_clip (target >= 1.5x per worker); "
          "ours/ceil = ours / (ceiling per core x workers)", flush=True)
    print(TABLE_HEADER, flush=True)
    ours_rates: dict[int, float] = {}
    failed: list[str] = []
    for size in source_sizes:
        ceiling = run_ceiling(datasets[size], args)
        result["ceiling"][str(size)] = ceiling
        print(f"  {size}-px sources: decode ceiling {ceiling['per_core']:.1f} samples/s per core "
              f"(CPU {ceiling['cpu_ms_per_sample']:.2f} ms/sample)", flush=True)
        for workers in workers_list:
            row = measure_row(_brace_url(datasets[size]), args, workers, size, ceiling, decode_device)
            if "samples_per_s" in row["runs"]["ours"]:
                ours_rates.setdefault(workers, row["runs"]["ours"]["samples_per_s"])
            failed += [f"{name} ({size} px, {workers} workers)" for name in row["failed"]]
            result["rows"].append(row)
            write_results(results_path, result)
            print(format_row(row), flush=True)
            print(json.dumps(row), flush=True)

    # the epoch boundary: the largest worker count over a small part of the first data set
    workers = max(workers_list)
    paths = datasets[source_sizes[0]]
    needed = workers * args.batch_size * EPOCH_BATCHES_PER_WORKER
    subset = paths[:min(len(paths), math.ceil(needed / SHARD_SAMPLES))]
    if args.step_ms is not None:
        step_s = args.step_ms / 1000
    else:  # 1.5x the loader's own time per batch: it keeps up, and waits are the steady state's
        step_s = 1.5 * args.batch_size / ours_rates[workers] if workers in ours_rates else 0.5
    epoch = measure_epoch_start(_brace_url(subset), args, workers, step_s)
    epoch = {"kind": "epoch_start", "source_px": source_sizes[0], "shards": len(subset), **epoch}
    result["epoch_start"] = epoch
    result["load_average_after"] = os.getloadavg()[0]
    write_results(results_path, result)
    print(f"epoch boundary ({workers} workers, {epoch['batches_per_epoch']} batches per epoch, simulated step "
          f"{epoch['step_ms']:.0f} ms): first wait of epoch 1 {epoch['epoch1_first_wait_s'] * 1e3:.0f} ms "
          f"(worker start-up), of epoch 2 {epoch['epoch_start_wait_s'] * 1e3:.0f} ms; median wait "
          f"{epoch['median_wait_s'] * 1e3:.1f} ms, median step {epoch['median_step_s'] * 1e3:.0f} ms; epoch start / "
          f"median step = {epoch['epoch_start_vs_median_step']:.2f} (target <= 2)", flush=True)
    print(json.dumps({key: value for key, value in epoch.items() if key != "waits_s"}), flush=True)
    print(f"load average: {result['load_average_before']:.2f} before, {result['load_average_after']:.2f} after "
          f"({cores} cores; the samples/s ratios hold on idle cores); results: {results_path}", flush=True)
    if failed:
        print(f"failed: {', '.join(failed)} (their errors are in the results file)", flush=True)
    return 1 if failed else 0
