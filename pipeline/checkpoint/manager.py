"""Checkpoints of one run, as the trainer uses them: `CheckpointManager` composes the parts of this package,
one job each, and holds the one thing they share, what this run may delete.

    store.py        where checkpoints live (local directory or fsspec URL): atomic save, `latest`, prune
    plan.py         what a run starts from, checked before anything is written (`plan_start`)
    elastic.py      loading at another world size through DeepSpeed's universal checkpoint
    state.py        the random state a checkpoint carries, and the non-finite guard before a save
    layout.py       the names in a checkpoint directory, and whether a tag's files are all there and open
    consolidate.py  the weights of a checkpoint as one fp32 state dict (export, eval)

Layout of a checkpoint directory (local, or `s3://bucket/prefix`):

    step_00000100/            one checkpoint: DeepSpeed's files + trainer_state_rank{r}.pt per rank
    step_00000200/
    latest                    the tag of the newest complete checkpoint, written last

DeepSpeed saves and loads the engine's state (`save_checkpoint`, `load_checkpoint`); what we add is
atomicity and keep-last-K (store.py), remote storage (store.py), the start plan and resume checks (plan.py),
and elastic resume (elastic.py).

Ownership: a run deletes or rewrites only what belongs to it. `plan_start` refuses a fresh start
(train.resume=none) into a directory that holds checkpoints unless train.overwrite=true; keep-last-K
rotates the complete checkpoints of the run being continued (or those this run wrote); an unfinished
save is removed only by the manager that started it. Anything else found there is left alone.

`pipeline.commands.runs.load_model_from_run(run_dir)` turns a run's latest checkpoint (any ZeRO stage, local
or remote) into a ContrastiveModel on CPU, for evaluation and export.
"""

from __future__ import annotations

import dataclasses

# not used here: tests/checkpoint/test_checkpoint.py reaches `os` (to patch os.replace) and the names in
# __all__ through this module
import os  # noqa: F401
from pathlib import Path
from typing import Any

import torch

from pipeline.checkpoint.elastic import ElasticLoader, check_stage
from pipeline.checkpoint.layout import (
    MISSING,
    TMP_PREFIX,
    lookup,
    saved_zero_stage,
    tag_for_step,
    trainer_state_name,
    world_size_of,
)
from pipeline.checkpoint.plan import StartPlanner
from pipeline.checkpoint.state import all_finite, rng_state, seed_everything, set_rng_state
from pipeline.checkpoint.store import CheckpointStore, open_store
from pipeline.core import randomness
from pipeline.core.errors import ConfigError
from pipeline.parallel import distributed

__all__ = ["CheckpointConfig", "CheckpointManager", "TMP_PREFIX", "all_finite", "rng_state", "seed_everything",
           "set_rng_state"]


@dataclasses.dataclass
class CheckpointConfig:
    dir: str = ""
    """Where checkpoints go: a local path or an fsspec URL (s3://bucket/run); empty = `{run_dir}/checkpoints`."""
    every_steps: int = 0
    """Save every this many steps (0: only at the end)."""
    keep_last: int = 3
    """Keep this many most recent checkpoints; older ones are deleted."""
    every_minutes: float = 0.0
    """Also save when this many minutes have passed since the last save (0: off); with SIGTERM/SIGUSR1
    handling, a preempted job loses at most this much work."""
    staging_dir: str = ""
    """Local directory where remote checkpoints are written before upload; empty = `{run_dir}/checkpoint-staging`."""
    storage_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Passed to fsspec for a remote `dir`, e.g. {'client_kwargs': {'endpoint_url': 'http://127.0.0.1:9000'}}."""

    def __post_init__(self):
        if self.every_steps < 0:
            raise ConfigError(f"checkpoint.every_steps must be >= 0, got {self.every_steps}")
        if self.keep_last < 1:
            raise ConfigError(f"checkpoint.keep_last must be >= 1, got {self.keep_last}")
        if self.every_minutes < 0:
            raise ConfigError(f"checkpoint.every_minutes must be >= 0, got {self.every_minutes}")


class CheckpointManager:
    """Saves and restores checkpoints of one run; every rank calls `plan_start`, `resolve`, `save` and `load`
    together."""

    def __init__(self, cfg: CheckpointConfig, run_dir: str | Path, rank: int, world_size: int):
        self.cfg = cfg
        self.url = cfg.dir or str(Path(run_dir) / "checkpoints")
        self.rank = rank
        self.world_size = world_size
        staging = Path(cfg.staging_dir or Path(run_dir) / "checkpoint-staging")
        # per rank, so that ranks sharing a node never write into each other's staging files
        self.staging = staging / f"rank{rank}"
        self.store: CheckpointStore = open_store(self.url, cfg.storage_options, self.staging,
                                                 on_remove=self._remove_universal)
        self.remote = self.store.remote
        self.planner = StartPlanner(self.store, rank, world_size, dir_named=bool(cfg.dir))
        self.elastic = ElasticLoader(self.store, self.staging, rank, world_size)
        # what this run may delete: the tags it started writing and, once it continues the run whose
        # checkpoints are there (train.resume=auto, or a checkpoint of this directory), every complete one
        self._started: set[str] = set()
        self._continues = False
        self._left_alone: set[str] = set()
        # what plan_start found: the checkpoint's world size and ZeRO stage (None: not resuming, or not recorded)
        self.saved_world_size: int | None = None
        self.saved_zero_stage: int | None = None

    def _join(self, *parts: str) -> str:
        return self.store.join(*parts)

    def _remove_universal(self, tag: str) -> None:
        self.elastic.remove_universal(tag)

    def latest_tag(self) -> str | None:
        """The newest complete checkpoint's tag, or None when there is none."""
        return self.store.latest()

    def tags(self) -> list[str]:
        """Every `step_*` tag present, complete or not, oldest first."""
        return self.store.tags()

    # -- deciding what a run starts from (plan.py) --------------------------------------------------
    def problem(self, tag_or_path: str) -> str | None:
        """None when the checkpoint can be resumed from, else what is wrong, naming the file (StartPlanner)."""
        return self.planner.problem(tag_or_path)

    def read_trainer_state(self, tag_or_path: str, rank: int = 0) -> dict[str, Any]:
        """Rank `rank`'s trainer state of a checkpoint, without touching the rest (remote: that file only)."""
        return self.planner.read_trainer_state(tag_or_path, rank)

    def check_fresh_start(self, overwrite: bool) -> None:
        """For a fresh start (train.resume=none): ConfigError when the checkpoint directory already holds
        checkpoints, naming the directory and the ways out; with `overwrite`, rank 0 deletes them instead.
        Local to this process (no collective): `plan_start` calls it on rank 0 for every rank."""
        self.planner.check_fresh_start(overwrite)

    def resolve(self, resume: str) -> str | None:
        """train.resume -> the checkpoint tag (ours) or tag path (elsewhere) to load, or None for a fresh start.
        'auto' skips checkpoints that cannot be resumed from, newest first; a named one that cannot is a
        ConfigError. Decided on rank 0; every rank gets the same answer."""
        source = self.planner.agreed(self.planner.resolve_here, resume)
        self._note_continuation(resume, source)
        return source

    def _note_continuation(self, resume: str, source: str | None) -> None:
        # resume=auto, or a checkpoint of our own directory: what is there is this run's own, which
        # keep-last-K rotates and a save of the same step replaces
        self._continues = resume == "auto" or (
            source is not None and self.planner.is_ours(self.planner.locate(source)[0].url))

    def plan_start(self, resume: str, overwrite: bool = False, run_config: dict[str, Any] | None = None) -> str | None:
        """What this run starts from, checked in full before the run writes anything (config.yaml included)
        or builds an engine: the checkpoint to `load` (tag or path), or None for a fresh start.

        - train.resume=none (or a checkpoint outside our directory): our checkpoint directory must hold no
          checkpoints, or `overwrite` deletes them; else ConfigError (`check_fresh_start`).
        - 'auto' / a named checkpoint: as `resolve`. 'auto' with nothing ever committed here starts afresh.
        - resuming: ConfigError naming every setting of `run_config` (RunConfig as a dict) that differs from the
          checkpoint's (`check_resume_compatible`). Another world size is fine: see `loads_universal`.
        Decided on rank 0 (ConfigErrors included); every rank gets the same answer."""
        source, self.saved_world_size, self.saved_zero_stage = self.planner.agreed(
            self.planner.plan_here, resume, overwrite, run_config)
        self._note_continuation(resume, source)
        return source

    def _plan_here(self, resume: str, overwrite: bool,
                   run_config: dict[str, Any] | None) -> tuple[str | None, int | None, int | None]:
        """(source, its world size, its ZeRO stage) on this process alone: no collective."""
        return self.planner.plan_here(resume, overwrite, run_config)

    @property
    def loads_universal(self) -> bool:
        """Whether the engine that loads the planned checkpoint must be built with DeepSpeed's
        `checkpoint.load_universal` (parallelize.deepspeed_config(load_universal=...)): the checkpoint was written
        at another world size under ZeRO 1-3, so `load` converts it (ZeRO-0 files load at any world size)."""
        return (self.saved_world_size is not None and self.saved_world_size != self.world_size
                and self.saved_zero_stage != 0)

    # -- save (store.py) ------------------------------------------------------------------------------
    def save(self, engine, step: int, trainer_state: dict[str, Any]) -> str:
        """Write a checkpoint of `engine` + this rank's `trainer_state`; returns its tag. Refuses
        (FloatingPointError) a model with non-finite weights: such a checkpoint could only be resumed into
        the same divergence, and keep-last-K would rotate good ones out for it."""
        if not all_finite(engine.module):
            raise FloatingPointError(
                f"not saving the checkpoint of step {step}: the model has non-finite weights (training diverged); "
                "lower optim.lr or check the data, and resume from the last checkpoint"
            )
        tag = tag_for_step(step)
        verdict = None
        if self.rank == 0:
            # A run resumed at its last step saves again at that step: that checkpoint is complete and
            # `latest` names it, so rewriting it in place would only open a window where a crash loses it.
            if self.latest_tag() == tag:
                verdict = "saved"
            elif not self._continues and any(other not in self._started for other in self.tags()):
                verdict = "foreign"
        verdict = distributed.broadcast_object(verdict)
        if verdict == "saved":
            return tag
        if verdict == "foreign":
            # the caller skipped plan_start: refuse now rather than mix this run's checkpoints with another's
            raise self.planner.fresh_start_refused()
        self._started.add(tag)

        def write(root: Path, name: str) -> None:
            engine.save_checkpoint(str(root), tag=name, save_latest=False)
            torch.save(trainer_state, root / name / trainer_state_name(self.rank))

        self.store.write_tag(tag, write, self.rank)
        distributed.barrier()
        if self.rank == 0:
            self.store.write_latest(tag)
            self._prune()
        distributed.barrier()
        return tag

    def _prune(self) -> None:
        """Keep the newest `keep_last` complete checkpoints of this run; remove this run's unfinished saves.
        Checkpoints this run may not delete (see the module docstring) are left alone, with a warning."""
        self.store.prune(self.cfg.keep_last, self.world_size, lambda tag: self._continues or tag in self._started,
                         self._started, self._left_alone)

    # -- load ---------------------------------------------------------------------------------------
    def download(self, tag: str, local_root: str | Path) -> str:
        """Copy checkpoint `tag` of our (remote) directory to `local_root/tag`; returns `local_root`, the
        directory DeepSpeed loads from."""
        return self.store.download(tag, local_root)

    def load(self, engine, tag_or_path: str) -> dict[str, Any]:
        """Restore engine + this rank's trainer state from what `resolve` / `plan_start` returned.

        At the checkpoint's world size W every rank restores exactly what it saved. At another world size W'
        (elastic resume) rank r reads trainer_state_rank{r mod W}.pt: its step, samples seen and data position
        are those of every rank (the position counts the samples each canonical stream has emitted, and W'
        ranks serve the same streams). Random state is per rank, so its continuity is exact only at equal
        world size: ranks r < W continue their own generators, ranks r >= W (which have none) draw from
        generators seeded from (train.seed, step, r), so that no two ranks share a dropout stream. At ZeRO 1-3
        the engine must have been built with `load_universal` (`loads_universal` after `plan_start`): the
        checkpoint is converted once (elastic.py)."""
        source, tag = self.planner.locate(tag_or_path)
        saved_world = world_size_of(self.read_trainer_state(tag_or_path))
        stage = engine.zero_optimization_stage()
        if saved_world != self.world_size and stage > 0:
            trainer_state = self.elastic.load(engine, source, tag, saved_world)
        else:
            trainer_state = self._load_as_saved(engine, source, tag, self.rank % saved_world)
        if self.rank >= saved_world:
            seed = lookup(trainer_state, "config.train.seed")
            seed_everything(randomness.seed_int(0 if seed is MISSING else int(seed), "new_rank",
                                                int(trainer_state.get("step", 0)), self.rank))
            trainer_state = {**trainer_state, "rng": rng_state()}
        if self.planner.is_ours(source.url):
            self._continues = True
        return trainer_state

    def _load_as_saved(self, engine, source: CheckpointStore, tag: str, state_rank: int) -> dict[str, Any]:
        """DeepSpeed's files as they are (same world size, or ZeRO-0 at any) + trainer_state_rank{state_rank}."""
        where = source.join(tag)
        root = source.local_copy(tag, self.staging / "download")
        state_path = Path(root) / tag / trainer_state_name(state_rank)
        if not state_path.is_file():
            raise ConfigError(f"cannot resume from checkpoint '{where}': it has no {state_path.name}")
        trainer_state = torch.load(state_path, map_location="cpu", weights_only=False)
        check_stage(engine, saved_zero_stage(Path(root) / tag), where)
        load_path, _ = engine.load_checkpoint(
            root, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if load_path is None:
            raise ConfigError(f"DeepSpeed found no checkpoint to load in '{where}'")
        return trainer_state
