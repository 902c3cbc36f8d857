"""Peak memory and time of the contrastive loss (forward + backward) as the contrastive batch N grows:
`python -m pipeline bench loss-memory`.

    python -m pipeline bench loss-memory                     # clip and siglip, N = 8k, 16k, 32k, dim 512, chunk 1024
    python -m pipeline bench loss-memory --sizes 1024 2048 4096 --dim 128 --chunk-size 0   # the N x N path, for contrast

With `loss.chunk_size` the loss never holds an N x N block: its peak is a few N x dim feature-sized tensors
(the gradients of both towers' features) plus a few chunk x N logit blocks, linear in N. The benchmark
prints, per size, the peak beside the size of one N x N fp32 block (what the unchunked loss holds several
of), the ratio to the previous size (2.0 when linear, 4.0 when quadratic), the bytes per sample, and the
peak projected to N = 1,048,576 from the slope between the two largest sizes. One process, world size 1,
the trainer's input: fp32 features, the logit scale (and bias), and the `valid` mask the loader always sets.

How the peak is measured. On CUDA: `torch.cuda.max_memory_allocated` minus what was allocated before.
On CPU torch keeps no allocator statistics, and the profiler's tensor records miss the temporaries inside
single operators (logsumexp's, the matmuls'), so each configuration runs in a fresh process whose C
allocator maps every block of 64 KiB or more with its own mmap (MALLOC_MMAP_THRESHOLD_, which also stops
glibc from moving that threshold): a freed tensor leaves the resident set at once, and the kernel's
resident high-water mark (VmHWM, reset through /proc/self/clear_refs just before the loss runs) minus the
resident size at that moment is the most the loss had live. A warm-up call first pays the one-time
allocations (thread pools, kernel workspaces). A figure, not a timed assertion; tests/train/test_big_batch.py
checks the growth ratios.
"""

from __future__ import annotations

import gc
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported in the measuring process, not for `bench loss-memory --help`
    import torch

MMAP_THRESHOLD_BYTES = 64 * 1024
MILLION_BATCH = 1_048_576
REPO_ROOT = Path(__file__).resolve().parents[2]


def add_arguments(parser) -> None:
    parser.add_argument("--sizes", type=int, nargs="+", default=[8192, 16384, 32768],
                        help="contrastive batch sizes N to measure, ascending")
    parser.add_argument("--dim", type=int, default=512, help="feature dimension (ViT-B-32: 512)")
    parser.add_argument("--chunk-size", type=int, default=1024, help="loss.chunk_size (0: the unchunked N x N path)")
    parser.add_argument("--kinds", nargs="+", default=["clip", "siglip"], choices=["clip", "siglip"],
                        help="loss.kind values to measure")
    parser.add_argument("--device", default=None,
                        help="cpu (peak resident memory of a fresh process) or cuda (max_memory_allocated); "
                        "default: cuda where there is a GPU, else cpu")


def run(args) -> int:
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    for kind in args.kinds:
        rows = measure(kind, args.sizes, args.dim, args.chunk_size, args.device)
        print_table(kind, rows, args.dim, args.chunk_size, args.device)
    return 0


def measure(kind: str, sizes: list[int], dim: int, chunk_size: int, device: str = "cpu") -> list[dict]:
    """One dict per size: n, peak_bytes (the most the loss forward + backward held beyond its inputs),
    seconds, feature_bytes (both towers' fp32 features: the loss's inputs). All sizes run in one fresh
    process, smallest first."""
    if sorted(sizes) != list(sizes) or not sizes:
        raise ValueError(f"sizes must be ascending and non-empty, got {sizes}")
    request = json.dumps({"kind": kind, "sizes": list(sizes), "dim": dim, "chunk_size": chunk_size, "device": device})
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD_BYTES),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "pipeline.bench.loss", request], env=env, capture_output=True,
                          text=True, timeout=3600)
    if done.returncode:
        raise RuntimeError(f"the loss-memory measurement of {kind} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def projected_peak(rows: list[dict], n: int = MILLION_BATCH) -> float:
    """Peak bytes at `n` by the straight line through the two largest measured sizes."""
    small, large = rows[-2], rows[-1]
    slope = (large["peak_bytes"] - small["peak_bytes"]) / (large["n"] - small["n"])
    return large["peak_bytes"] + slope * (n - large["n"])


def print_table(kind: str, rows: list[dict], dim: int, chunk_size: int, device: str) -> None:
    mib = 2 ** 20
    chunk = f"loss.chunk_size={chunk_size}" if chunk_size else "unchunked (loss.chunk_size=0)"
    print(f"\nloss-memory: {kind}, dim {dim}, {chunk}, {device}: peak of forward + backward beyond the inputs")
    print(f"{'N':>9} {'peak MiB':>10} {'x prev':>7} {'bytes/sample':>13} {'features MiB':>13} "
          f"{'N x N fp32 MiB':>15} {'seconds':>8}")
    previous = None
    for row in rows:
        ratio = f"{row['peak_bytes'] / previous:.2f}" if previous else "-"
        print(f"{row['n']:>9} {row['peak_bytes'] / mib:>10.1f} {ratio:>7} {row['peak_bytes'] / row['n']:>13.0f} "
              f"{row['feature_bytes'] / mib:>13.1f} {row['n'] ** 2 * 4 / mib:>15.1f} {row['seconds']:>8.2f}")
        previous = row["peak_bytes"]
    if not chunk_size:
        blocks = rows[-1]["peak_bytes"] / (rows[-1]["n"] ** 2 * 4)
        print(f"unchunked: the peak at N = {rows[-1]['n']} is {blocks:.1f} N x N fp32 blocks (quadratic in N; at "
              f"N = {MILLION_BATCH:,} one block alone is {MILLION_BATCH ** 2 * 4 / 2 ** 40:.0f} TiB)")
    elif len(rows) >= 2:
        gib = 2 ** 30
        print(f"projected to N = {MILLION_BATCH:,}: {projected_peak(rows) / gib:.1f} GiB beyond the "
              f"{2 * MILLION_BATCH * dim * 4 / gib:.1f} GiB of features (one N x N fp32 block: "
              f"{MILLION_BATCH ** 2 * 4 / 2 ** 40:.0f} TiB)")


# -- the measuring process -------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as handle:
        return int(re.search(rf"^{field}:\s+(\d+) kB", handle.read(), re.MULTILINE).group(1))


def _loss_inputs(kind: str, n: int, dim: int, device: str) -> dict[str, torch.Tensor]:
    import torch

    generator = torch.Generator().manual_seed(n)
    media = torch.nn.functional.normalize(torch.randn(n, dim, generator=generator), dim=1).to(device)
    text = torch.nn.functional.normalize(torch.randn(n, dim, generator=generator), dim=1).to(device)
    valid = torch.ones(n, dtype=torch.bool, device=device)
    valid[::97] = False  # a few slots without a real sample, as the loader marks them
    inputs = {"media_features": media.requires_grad_(), "text_features": text.requires_grad_(),
              "logit_scale": torch.full((1,), 10.0, device=device, requires_grad=True), "valid": valid}
    if kind == "siglip":
        inputs["logit_bias"] = torch.full((1,), -10.0, device=device, requires_grad=True)
    return inputs


def _forward_backward(loss_fn, inputs: dict[str, torch.Tensor]) -> None:
    loss, _ = loss_fn(inputs)
    loss.backward()


def _measure_here(kind: str, sizes: list[int], dim: int, chunk_size: int, device: str) -> list[dict]:
    import torch

    from pipeline.loss import LossConfig, build_loss

    cuda = device.startswith("cuda")
    loss_fn = build_loss(LossConfig(kind=kind, chunk_size=chunk_size))
    _forward_backward(loss_fn, _loss_inputs(kind, min(sizes[0], 2 * max(chunk_size, 256)), dim, device))
    rows = []
    for n in sizes:
        inputs = _loss_inputs(kind, n, dim, device)
        gc.collect()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
                handle.write("5")  # the resident high-water mark starts again from the current size
            before = _status_kib("VmRSS") * 1024
        started = time.perf_counter()
        _forward_backward(loss_fn, inputs)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        peak = torch.cuda.max_memory_allocated() if cuda else _status_kib("VmHWM") * 1024
        rows.append({"n": n, "peak_bytes": peak - before, "seconds": seconds, "feature_bytes": 2 * n * dim * 4})
        del inputs
    return rows


if __name__ == "__main__":
    request = json.loads(sys.argv[1])
    print(json.dumps(_measure_here(**request)))
