"""Benchmark shard building: `python -m pipeline bench shards` (or `make bench-shards`).

    python -m pipeline bench shards                 # 2,000 JPEGs of 640x480, resized to 256
    python -m pipeline bench shards --count 200     # quicker

Makes (once, cached under .bench/) a folder of random-content 640x480 JPEGs with .txt captions,
then measures samples/s of `shards build --source folder --resize 256` with 1 and 2 workers, beside
the plain loop people write by hand: PIL decode, resize, JPEG encode, webdataset's ShardWriter.
Prints both figures and the ratios (ours per worker / plain, and 2-worker scaling). A figure, not
an assertion: compare runs on the same machine only.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from pipeline.shards.build import build_shards
from pipeline.shards.config import BuildConfig

WIDTH, HEIGHT = 640, 480


def add_arguments(parser) -> None:
    parser.add_argument("--count", type=int, default=2000, help="JPEGs in the benchmark folder")
    parser.add_argument("--resize", type=int, default=256, help="shorter side after resize (keep_ratio)")
    parser.add_argument("--jpeg-quality", type=int, default=95, help="quality of the re-encoded JPEGs (both loops)")
    parser.add_argument("--samples-per-shard", type=int, default=100,
                        help="samples per shard (both loops); small enough that every worker gets several shards")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to measure")
    parser.add_argument("--cache-dir", default=".bench", help="where the input JPEGs are kept between runs")


def make_jpeg_folder(cache_dir: str | Path, count: int) -> Path:
    """`count` random-content 640x480 JPEGs with captions; made once, reused while complete."""
    folder = Path(cache_dir) / f"jpeg-{WIDTH}x{HEIGHT}-{count}"
    done = folder / ".complete"
    if done.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in tqdm(range(count), desc="making benchmark JPEGs", unit="image"):
        # smooth random colour fields plus grain: photo-like JPEG sizes (tens of KB), not incompressible noise
        coarse = rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((WIDTH, HEIGHT), Image.BICUBIC)
        grain = rng.integers(-12, 13, size=(HEIGHT, WIDTH, 3))
        image = Image.fromarray(np.clip(np.asarray(image, dtype=np.int16) + grain, 0, 255).astype(np.uint8))
        image.save(folder / f"{index:06d}.jpg", quality=90)
        (folder / f"{index:06d}.txt").write_text(f"benchmark image number {index}")
    done.touch()
    return folder


def plain_loop(folder: Path, output: Path, resize: int, quality: int, samples_per_shard: int) -> int:
    """The hand-written peer: decode, resize the shorter side, encode, webdataset ShardWriter."""
    import webdataset as wds

    output.mkdir(parents=True, exist_ok=True)
    written = 0
    with wds.ShardWriter(str(output / "plain-%06d.tar"), maxcount=samples_per_shard, verbose=0) as sink:
        for path in sorted(folder.glob("*.jpg")):
            image = Image.open(path).convert("RGB")
            scale = resize / min(image.size)
            if scale < 1:
                image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=quality)
            caption = path.with_suffix(".txt").read_text()
            sink.write({"__key__": path.stem, "jpg": buffer.getvalue(), "txt": caption})
            written += 1
    return written


def run(args) -> int:
    measure(args)
    return 0


def measure(args) -> dict[str, float]:
    """Run the benchmark, print the figures, return them (samples/s and ratios)."""
    folder = make_jpeg_folder(args.cache_dir, args.count)
    figures: dict[str, float] = {}
    scratch = Path(tempfile.mkdtemp(prefix="bench-shards-"))
    try:
        started = time.perf_counter()
        written = plain_loop(folder, scratch / "plain", args.resize, args.jpeg_quality, args.samples_per_shard)
        figures["plain"] = written / (time.perf_counter() - started)
        for workers in args.workers:
            summary = build_shards(BuildConfig(
                source="folder", input=str(folder), output=str(scratch / f"ours-{workers}"), resize=args.resize,
                resize_mode="keep_ratio", jpeg_quality=args.jpeg_quality, samples_per_shard=args.samples_per_shard,
                workers=workers), progress=False)
            if summary.samples != written:
                raise RuntimeError(f"our build wrote {summary.samples} samples, the plain loop {written}")
            # seconds include starting the worker processes: what a user waits for
            figures[f"ours_{workers}"] = summary.samples / summary.seconds
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    print(f"shard building, {args.count} JPEGs {WIDTH}x{HEIGHT} -> shorter side {args.resize}, "
          f"{os.cpu_count()} CPUs")
    print(f"  plain loop (PIL + webdataset ShardWriter), 1 process: {figures['plain']:8.1f} samples/s")
    for workers in args.workers:
        ours = figures[f"ours_{workers}"]
        per_worker = ours / workers / figures["plain"]
        figures[f"ratio_per_worker_{workers}"] = per_worker
        print(f"  shards build, {workers} worker(s):                     {ours:8.1f} samples/s  "
              f"(per worker {per_worker:.2f}x plain)")
    if 1 in args.workers and len(args.workers) > 1:
        most = max(args.workers)
        figures["scaling"] = figures[f"ours_{most}"] / figures["ours_1"]
        print(f"  scaling {most} vs 1 worker: {figures['scaling']:.2f}x (linear: {most}x)")
    return figures
