"""`bench gpu --find-max-batch`: the largest local batch that fits, without and with grad checkpointing, and the
largest GradCache contrastive batch on one rank, each found by doubling then bisecting (`largest_fitting`) on
ours (pipeline.bench.gpu_ours) within one time budget.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable
from typing import Any

from pipeline.bench.gpu_ours import BenchRun, synthetic_micro_batches


def largest_fitting(fits: Callable[[int], bool], start: int, limit: int,
                    should_stop: Callable[[], bool] | None = None) -> int:
    """The largest n in [start, limit] with fits(n), assuming fits is monotone (true up to some n, false after):
    double from `start` until a size fails or `limit` is reached, then bisect between the last success and
    the first failure. Returns 0 when not even `start` fits.

    `should_stop` is asked before every probe but the first; when it answers True the search ends there and
    returns the largest size that fitted so far (a lower bound of the answer)."""
    if start < 1 or limit < start:
        raise ValueError(f"need 1 <= start <= limit, got start={start}, limit={limit}")
    stop = should_stop or (lambda: False)
    if not fits(start):
        return 0
    good = start
    bad = None
    while bad is None and good < limit:
        if stop():
            return good
        candidate = min(good * 2, limit)
        if fits(candidate):
            good = candidate
        else:
            bad = candidate
    if bad is None:
        return good
    while bad - good > 1:
        if stop():
            return good
        middle = (good + bad) // 2
        if fits(middle):
            good = middle
        else:
            bad = middle
    return good


class Budget:
    """A time budget: calling it says whether the budget is spent, and `spent` remembers that it was."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic):
        self.seconds, self._clock = seconds, clock
        self._deadline = clock() + seconds
        self.spent = False

    def __call__(self) -> bool:
        self.spent = self.spent or self._clock() >= self._deadline
        return self.spent


def _is_out_of_memory(error: BaseException) -> bool:
    import torch
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def _release_after_failure(run: BenchRun) -> None:
    import torch
    run.engine.zero_grad()
    gc.collect()
    if run.device.type == "cuda":
        torch.cuda.empty_cache()


def step_fits(run: BenchRun, batch_size: int, accum_steps: int = 1) -> bool:
    """Whether one full step (forward, backward, optimizer) at this micro-batch and accumulation runs."""
    from pipeline.observe.flops import synchronize
    run.engine.set_train_micro_batch_size(batch_size)
    run.engine.set_train_batch_size(batch_size * accum_steps * run.world_size)
    micro_steps = run.engine.micro_steps
    try:
        # one micro-batch repeated: the same memory and work as distinct ones, without holding accum copies
        micro_batches = synthetic_micro_batches(run, batch_size, 1) * accum_steps
        run.step(micro_batches)
        synchronize(run.device)
        return True
    except RuntimeError as error:
        if not _is_out_of_memory(error):
            raise
        # a step cut short leaves DeepSpeed's micro-step count mid-accumulation: realign the next boundary
        run.engine.micro_steps = micro_steps
        _release_after_failure(run)
        return False


def find_max_batches(run: BenchRun, limit: int, contrastive_limit: int, budget_s: float = math.inf,
                     progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Largest local batch without and with grad checkpointing, then the largest GradCache contrastive
    batch on one rank (micro-batch: the largest power of two that fit with checkpointing).

    The three searches share `budget_s` seconds. When it is spent, the search under way returns the largest
    batch that fitted so far (a lower bound), the searches not yet started are None, and `stopped_on_budget`
    says so."""
    from pipeline.model.contrastive import ContrastiveModel
    from pipeline.parallel.checkpointing import activation_checkpointing_on, apply_activation_checkpointing

    model: ContrastiveModel = run.engine.module
    configured = (run.engine.train_micro_batch_size_per_gpu(), run.engine.gradient_accumulation_steps())
    checkpointing_was = activation_checkpointing_on(model)
    budget = Budget(budget_s)
    started = time.monotonic()
    results: dict[str, Any] = {"limit": limit, "contrastive_limit": contrastive_limit, "budget_s": budget_s,
                               "max_local_batch": None, "max_local_batch_checkpointing": None,
                               "gradcache_micro_batch": None, "gradcache_accum_steps": None,
                               "max_contrastive_batch_gradcache": None}
    for checkpointing in (False, True):
        if budget():
            break
        apply_activation_checkpointing(model, checkpointing)

        def fits(batch, checkpointing=checkpointing):
            ok = step_fits(run, batch)
            progress(f"  local batch {batch:>7} grad checkpointing {'on ' if checkpointing else 'off'}: "
                     f"{'fits' if ok else 'out of memory'}")
            return ok

        key = "max_local_batch_checkpointing" if checkpointing else "max_local_batch"
        results[key] = largest_fitting(fits, 1, limit, should_stop=budget)
    fitted = results["max_local_batch_checkpointing"]
    if fitted is not None and not budget():
        micro = 2 ** int(math.log2(fitted)) if fitted else 0
        results["gradcache_micro_batch"] = micro
        if micro:
            def fits_accum(accum):
                ok = step_fits(run, micro, accum)
                progress(f"  GradCache {micro} x {accum} = {micro * accum} contrastive batch: "
                         f"{'fits' if ok else 'out of memory'}")
                return ok

            accum = largest_fitting(fits_accum, 1, max(1, contrastive_limit // (micro * run.world_size)),
                                    should_stop=budget)
            results["gradcache_accum_steps"] = accum
            results["max_contrastive_batch_gradcache"] = micro * accum * run.world_size
    results["stopped_on_budget"] = budget.spent
    results["elapsed_s"] = time.monotonic() - started
    apply_activation_checkpointing(model, checkpointing_was)
    run.engine.set_train_micro_batch_size(configured[0])
    run.engine.set_train_batch_size(configured[0] * configured[1] * run.world_size)
    return results
