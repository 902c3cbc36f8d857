"""TrainState: everything a checkpoint holds besides DeepSpeed's engine (weights, optimizer, LR schedule).

    state = TrainState(loader, world_size, run_config=to_dict(cfg))
    checkpoints.save(engine, state.step, state.state_dict())        # every rank its own
    state.load_state_dict(checkpoints.load(engine, source))         # on resume, before the first batch

The step and samples seen, the data position (the loader's epoch and batches consumed: the epoch plan
re-derives the rest), the data counters of the run so far over all ranks (so that metrics.jsonl's `data/*`
go on counting across a resume: the loader's own counters start at 0 in every invocation), every RNG the run draws from (python, numpy, torch, CUDA), and what wrote the
checkpoint (world size, the resolved config), which a resume is checked against before anything is
written (pipeline.checkpoint.plan.check_resume_compatible).

Elastic resume (W ranks saved, W' resume): rank r loads rank (r mod W)'s state. The step, samples seen and
data position are the same on every rank, so nothing is lost; the loader lays the rest of the epoch over the
W' ranks. The random state is per rank, so RNG continuity is exact only at equal world size: ranks r < W
continue their own generators, ranks r >= W start generators seeded from (train.seed, step, r)
(pipeline.checkpoint.manager.CheckpointManager.load).
"""

from __future__ import annotations

from typing import Any

from pipeline.checkpoint.state import rng_state, set_rng_state
from pipeline.data.loader import STAT_KEYS, sum_stats_across_ranks


class TrainState:
    """The trainer's own state, with state_dict() / load_state_dict() like every other stateful part."""

    def __init__(self, loader, world_size: int, run_config: dict[str, Any]):
        self.loader, self.world_size, self.run_config = loader, world_size, run_config
        self.step, self.samples_seen = 0, 0
        # the run's data counters (over all ranks) when this invocation began, and when it last logged
        self.data_before: dict[str, int] = dict.fromkeys(STAT_KEYS, 0)
        self._data_logged: dict[str, int] = dict.fromkeys(STAT_KEYS, 0)

    def advance(self, samples: int) -> None:
        """One optimizer step over `samples` samples (the global batch) is done."""
        self.step += 1
        self.samples_seen += samples

    @property
    def epoch(self) -> float:
        """Epochs done, fractional: the loader's epoch plus the share of its batches consumed."""
        return self.loader.epoch + self.loader.batches_consumed / max(len(self.loader), 1)

    def data_counters(self) -> tuple[dict[str, int], dict[str, int]]:
        """(the run's data counters so far, those since the last call) over all ranks: a collective, every rank
        calls it at the same point (a log step)."""
        this_invocation = sum_stats_across_ranks(self.loader.stats)
        window = {k: v - self._data_logged.get(k, 0) for k, v in this_invocation.items()}
        self._data_logged = this_invocation
        return {k: self.data_before.get(k, 0) + v for k, v in this_invocation.items()}, window

    def state_dict(self) -> dict[str, Any]:
        """Every rank at the same point (a save): the data counters are summed over the ranks."""
        run_counters = {k: self.data_before.get(k, 0) + v for k, v in sum_stats_across_ranks(self.loader.stats).items()}
        return {
            "step": self.step, "samples_seen": self.samples_seen, "loader": self.loader.state_dict(),
            "data_counters": run_counters, "rng": rng_state(), "world_size": self.world_size,
            "config": self.run_config,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.samples_seen = state["step"], state["samples_seen"]
        # the same on every rank (summed at the save); a checkpoint from before they were kept: from 0
        self.data_before = {k: int(state.get("data_counters", {}).get(k, 0)) for k in STAT_KEYS}
        self.loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
