"""What every row of `bench gpu` (pipeline.bench.gpu) shares, so that ours and the peers are measured the same
way: the same synthetic batches, the same timed loop (`time_steps`: no host synchronisation between its first
and last step), the data waits, the phase clock of ours' breakdown, and the memory figures.
"""

from __future__ import annotations

import contextlib
import gc
import math
import statistics
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where a benchmark runs, not for `bench gpu --help`
    import torch


# -- synthetic batches -----------------------------------------------------------------------------
def _media_shape(model_cfg) -> tuple[int, ...]:
    from pipeline.model.build import image_size

    if model_cfg.modality == "audio":
        return (model_cfg.audio.n_mels, model_cfg.audio.num_frames)
    side = image_size(model_cfg)
    return (3, side, side)


def _context_length(model_cfg) -> int:
    from pipeline.model.build import get_tokenizer

    return get_tokenizer(model_cfg).context_length


def synthetic_batches(model_cfg, device: torch.device, batch_size: int, count: int, rank: int = 0,
                      channels_last: bool = False) -> list:
    """`count` distinct random batches, already on the device in fp32 (autocast casts): the step alone. The
    same values for every caller with the same rank, so ours and the peers see the same data."""
    import torch

    from pipeline.data.config import Batch

    generator = torch.Generator().manual_seed(1000 + rank)
    context = _context_length(model_cfg)
    batches = []
    for _ in range(count):
        media = torch.randn(batch_size, *_media_shape(model_cfg), generator=generator)
        media = media.to(device=device)
        if channels_last and media.dim() == 4:
            media = media.contiguous(memory_format=torch.channels_last)
        tokens = torch.randint(1, 49407, (batch_size, context), generator=generator).to(device)
        batches.append(Batch(media, tokens, [""] * batch_size, torch.full((batch_size,), -1, device=device)))
    return batches


# -- the timed loop and the data waits --------------------------------------------------------------
def time_steps(step: Callable[[Any], torch.Tensor], source: Iterator, steps: int,
               device: torch.device) -> dict[str, float]:
    """Mean seconds per `step(next(source))` over `steps` calls, with no host synchronisation between the
    first and the last: one synchronisation before, one after. Every row of the bench is timed by this."""
    from pipeline.observe.flops import synchronize
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        loss = step(next(source))
    synchronize(device)
    seconds = time.perf_counter() - start
    return {"step_s": seconds / steps, "final_loss": float(loss)}


class WaitTimed:
    """Wraps a batch source: `waits` holds, for each `next()`, the host seconds it took (the time the step
    waited for its batch)."""

    def __init__(self, source: Iterator):
        self.source, self.waits = source, []

    def __iter__(self):
        return self

    def __next__(self):
        asked = time.perf_counter()
        item = next(self.source)
        self.waits.append(time.perf_counter() - asked)
        return item


def wait_summary(waits: list[float], step_s: float) -> dict[str, float]:
    """Mean and 90th percentile (nearest rank) of the data waits in ms, and the mean's share of the step."""
    ordered = sorted(waits)
    p90 = ordered[max(math.ceil(0.9 * len(ordered)) - 1, 0)]
    mean = statistics.fmean(ordered)
    return {"data_wait_ms_mean": mean * 1e3, "data_wait_ms_p90": p90 * 1e3, "data_wait_share": mean / step_s}


# -- phase timing ----------------------------------------------------------------------------------
class PhaseClock:
    """Exclusive time per named phase: a phase opened inside another is subtracted from the outer one.

    On CUDA, phases are bracketed by events on the current stream, read after one synchronisation in
    `finish_step`; elsewhere by perf_counter around synchronised boundaries.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.use_events = device.type == "cuda"
        self.totals: dict[str, float] = {}
        self._stack: list[str] = []
        self._pending: list[tuple[str, str | None, Any, Any]] = []

    def _add(self, name: str, parent: str | None, seconds: float) -> None:
        self.totals[name] = self.totals.get(name, 0.0) + seconds
        if parent is not None:
            self.totals[parent] = self.totals.get(parent, 0.0) - seconds

    @contextlib.contextmanager
    def phase(self, name: str, host: bool = False):
        """`host`: a phase of host work (waiting for data) timed with perf_counter even on CUDA."""
        import torch

        from pipeline.observe.flops import synchronize
        parent = self._stack[-1] if self._stack else None
        self._stack.append(name)
        try:
            if self.use_events and not host:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                yield
                end.record()
                self._pending.append((name, parent, start, end))
            else:
                synchronize(self.device)
                began = time.perf_counter()
                yield
                synchronize(self.device)
                self._add(name, parent, time.perf_counter() - began)
        finally:
            self._stack.pop()

    def finish_step(self) -> None:
        from pipeline.observe.flops import synchronize
        synchronize(self.device)
        for name, parent, start, end in self._pending:
            self._add(name, parent, start.elapsed_time(end) / 1000.0)
        self._pending.clear()


# -- memory ----------------------------------------------------------------------------------------
def peak_memory_gb(device: torch.device) -> float | None:
    import torch
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def host_peak_rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def release_memory(device: torch.device, compiled: bool = False) -> None:
    """Free what the previous row left behind, so the next row's peak memory is its own."""
    import torch
    if compiled:
        torch._dynamo.reset()  # compiled graphs hold the previous model's tensors
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
