"""The start plan: what a run starts from (fresh, or which checkpoint), decided on rank 0 for every rank and
checked in full before the run writes anything (config.yaml included) or builds an engine.

- train.resume=none: the checkpoint directory must hold no checkpoints of an earlier run, unless
  train.overwrite=true deletes them (`check_fresh_start`).
- train.resume=auto: the newest complete checkpoint whose files all open, skipping (with a warning naming the
  file) any that do not; nothing ever committed here means a fresh start.
- train.resume=TAG or PATH: that checkpoint, or a ConfigError saying why it cannot be resumed from.
- resuming: the checkpoint's saved run config is compared with this run's (RESUME_KEYS), naming every
  difference (`check_resume_compatible`), and the saved data plan's canonical streams are held to this run's
  setting and layout (`check_data_plan`: the same C, and a layout that reads its global batches).

DeepSpeed's `load_checkpoint` takes a directory and a tag and fails late, with its own messages, on a
missing or partial checkpoint, a changed setting or a foreign directory; it does not choose what to resume
from. These checks are ours so that every such case is a ConfigError naming the setting before any work.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from pipeline.checkpoint.layout import (
    LATEST,
    LOGGER,
    MISSING,
    lookup,
    one_line,
    recorded_zero_stage,
    world_size_of,
)
from pipeline.checkpoint.store import CheckpointStore, open_store
from pipeline.core.errors import ConfigError
from pipeline.data.plan import Layout, fit_error
from pipeline.parallel import distributed

log = logging.getLogger(LOGGER)

# Run settings a resume must keep, as dotted RunConfig keys: they shape the parameters (model), how
# DeepSpeed partitions and stores the optimizer (ZeRO stage, precision), or the data plan whose
# position the checkpoint holds (epoch order from seed, sources, shuffle; the global batch). The world size,
# data.workers and train.accum_steps may change within the layouts that fit the saved canonical streams
# (check_data_plan): ZeRO 1-3 state goes through the universal checkpoint, and the new layout serves the same
# canonical streams from their saved positions, so the global batches are the same. Everything else (learning
# rate, steps, logging, evaluation, storage settings) may change on resume.
RESUME_KEYS = (
    "model.name", "model.modality", "model.probabilistic", "model.logit_bias", "model.audio",
    "train.zero_stage", "train.precision", "train.global_batch_size", "train.seed",
    "data.train_urls", "data.mixture", "data.weights", "data.modality", "data.shuffle_buffer", "data.resampled",
    "data.epoch_samples",
)


def check_resume_compatible(trainer_state: dict[str, Any], run_config: dict[str, Any] | None, source: str) -> None:
    """ConfigError naming every setting in which this run (`run_config`, a RunConfig as a dict) differs from
    the run that saved `trainer_state` where resuming needs them equal (RESUME_KEYS); keys the checkpoint does
    not record are not compared. The world size may differ (elastic resume, see elastic.py)."""
    differences = []
    saved_config = trainer_state.get("config")
    if saved_config and run_config:
        for key in RESUME_KEYS:
            saved, current = lookup(saved_config, key), lookup(run_config, key)
            if saved is not MISSING and current is not MISSING and saved != current:
                differences.append(f"{key} {saved!r} in the checkpoint, {current!r} now")
    if not differences:
        return
    advice = "resume with the checkpoint's settings, or start a new run (another train.name)"
    raise ConfigError(f"cannot resume from '{source}': {'; '.join(differences)}: {advice}")


def check_data_plan(trainer_state: dict[str, Any], run_config: dict[str, Any] | None, world_size: int,
                    source: str) -> None:
    """ConfigError when this run cannot continue the saved data plan: the checkpoint's loader state predates
    canonical streams, data.canonical_streams is set to another value than the saved C, or this layout (world
    size, data.workers, micro-batch) does not read C streams' global batches (pipeline.data.plan.fit_error, which
    names the layouts that do). A resume keeps C whatever data.canonical_streams 0 would choose for a fresh start."""
    loader = trainer_state.get("loader")
    if not run_config or not isinstance(loader, dict) or "epoch" not in loader:
        return  # no train loader state to continue (a model-only checkpoint): nothing to hold
    saved = loader.get("canonical_streams")
    if saved is None:
        raise ConfigError(f"cannot resume the data position from '{source}': its loader state has no "
                          "data.canonical_streams (written by an earlier version, whose batches depended on the "
                          "layout); resume it with that version, or start a new run")
    setting = lookup(run_config, "data.canonical_streams")
    if setting not in (MISSING, 0, saved):
        raise ConfigError(f"cannot resume from '{source}': data.canonical_streams is {setting}, the run was planned "
                          f"over {saved} canonical streams and a resume keeps them (they decide the batches); set "
                          f"data.canonical_streams={saved} or leave it 0")
    global_batch, accum = lookup(run_config, "train.global_batch_size"), lookup(run_config, "train.accum_steps")
    workers = lookup(run_config, "data.workers")
    if MISSING in (global_batch, accum, workers):
        return
    layout = Layout(world_size, workers, global_batch // (world_size * accum))
    problem = fit_error(int(saved), layout, global_batch, resumed=True)
    if problem:
        raise ConfigError(f"cannot resume from '{source}' on {world_size} ranks x {max(workers, 1)} data.workers: "
                          f"{problem}")


class StartPlanner:
    """Finds and checks checkpoints for one rank of a run whose own checkpoint directory is `store`. Every
    method is local to this process; `agreed` runs one on rank 0 and hands its answer to every rank."""

    def __init__(self, store: CheckpointStore, rank: int, world_size: int, dir_named: bool):
        self.store = store
        self.rank = rank
        self.world_size = world_size
        self.dir_named = dir_named  # checkpoint.dir was set (else the directory follows train.name)

    # -- where a checkpoint is ----------------------------------------------------------------------
    def locate(self, tag_or_path: str) -> tuple[CheckpointStore, str]:
        """(store of the checkpoint directory, tag) of a tag of ours, a tag directory path, or a checkpoint
        directory path (its `latest`)."""
        if "/" not in tag_or_path:
            return self.store, tag_or_path
        path = tag_or_path.rstrip("/")
        directory = self._open(path)
        latest = directory.read_latest()
        if latest is not None:
            return directory, latest
        root, tag = path.rsplit("/", 1)
        return self._open(root), tag

    def _open(self, url: str) -> CheckpointStore:
        return open_store(url, self.store.storage_options)

    def is_ours(self, url: str) -> bool:
        return self.store.is_at(url)

    def source_name(self, store: CheckpointStore, tag: str) -> str:
        """What `load` takes for (store, tag): the bare tag for our own directory, else the tag's path."""
        return tag if store.url == self.store.url else store.join(tag)

    def problem(self, tag_or_path: str) -> str | None:
        """None when the checkpoint can be resumed from: every rank's trainer state and every DeepSpeed file
        present and (locally) opening; else what is wrong, naming the file. Remote checkpoints are checked by
        listing and by their trainer state; `load` opens the rest after downloading."""
        store, tag = self.locate(tag_or_path)
        return store.problem(tag)

    def read_trainer_state(self, tag_or_path: str, rank: int = 0) -> dict[str, Any]:
        """Rank `rank`'s trainer state of a checkpoint, without touching the rest (remote: that file only)."""
        store, tag = self.locate(tag_or_path)
        return store.read_trainer_state(tag, rank)

    # -- deciding -----------------------------------------------------------------------------------
    def check_fresh_start(self, overwrite: bool) -> None:
        """For a fresh start (train.resume=none): ConfigError when the checkpoint directory already holds
        checkpoints, naming the directory and the ways out; with `overwrite`, rank 0 deletes them instead."""
        tags, latest = self.store.tags(), self.store.latest()
        if not tags and latest is None:
            return
        if overwrite:
            if self.rank == 0:
                for tag in tags:
                    self.store.remove(tag)
                self.store.remove(LATEST)
                for leftover in self.store.leftovers():
                    self.store.remove(leftover)
                log.warning("checkpoint: train.overwrite=true: deleted %d checkpoint(s) of an earlier run in %s",
                            len(tags), self.store.url)
            return
        raise self.fresh_start_refused()

    def fresh_start_refused(self) -> ConfigError:
        tags = self.store.tags()
        newest = self.store.latest() or (tags[-1] if tags else "none")
        other_place = "another checkpoint.dir" if self.dir_named else "another train.name"
        return ConfigError(
            f"checkpoint directory '{self.store.url}' already holds checkpoints of an earlier run (newest {newest}) "
            f"and a fresh start would write over them: continue that run with train.resume=auto, start a new one "
            f"with {other_place}, or replace it with train.overwrite=true"
        )

    def resolve_here(self, resume: str) -> str | None:
        """train.resume -> the checkpoint tag (ours) or tag path (elsewhere) to load, or None for a fresh start."""
        if resume == "none":
            return None
        if resume == "auto":
            return self._newest_good()
        store, tag = self.locate(resume)
        problem = self.problem(resume)
        if problem is not None:
            raise ConfigError(f"train.resume={resume}: cannot resume from checkpoint '{store.join(tag)}': {problem}")
        return self.source_name(store, tag)

    def _newest_good(self) -> str | None:
        """train.resume=auto: the newest checkpoint of ours that can be resumed from."""
        latest = self.store.latest()
        # newest first; `latest` itself even if its directory is gone (reported and skipped below).
        # Without `latest` (never committed, or lost) every tag is a candidate.
        tags = self.store.tags()
        candidates = sorted({tag for tag in tags if latest is None or tag <= latest} | ({latest} - {None}),
                            reverse=True)
        skipped = []
        for tag in candidates:
            problem = self.problem(tag)
            if problem is None:
                return tag
            log.warning("checkpoint: train.resume=auto skips %s: %s", self.store.join(tag), problem)
            skipped.append(f"{tag}: {problem}")
        if latest is None:
            return None  # nothing was ever committed here: a fresh start (what is there is left alone)
        raise ConfigError(
            f"train.resume=auto: no checkpoint in '{self.store.url}' can be resumed from ({'; '.join(skipped)}): "
            "name a good one with train.resume=PATH, or start afresh with train.resume=none train.overwrite=true"
        )

    def plan_here(self, resume: str, overwrite: bool,
                  run_config: dict[str, Any] | None) -> tuple[str | None, int | None, int | None]:
        """(source, its world size, its ZeRO stage): what `CheckpointManager.plan_start` decides."""
        source = self.resolve_here(resume)
        if resume == "none" or (source is not None and not self.is_ours(self.locate(source)[0].url)):
            self.check_fresh_start(overwrite)
        if source is None:
            return None, None, None
        trainer_state = self.read_trainer_state(source)
        check_resume_compatible(trainer_state, run_config, source)
        check_data_plan(trainer_state, run_config, self.world_size, source)
        store, tag = self.locate(source)
        saved_stage = store.saved_zero_stage(tag)
        if saved_stage is None:
            saved_stage = recorded_zero_stage(trainer_state)
        saved_world = world_size_of(trainer_state)
        if saved_world != self.world_size and saved_stage is None:
            raise ConfigError(
                f"cannot resume from '{source}' on {self.world_size} ranks: it was written by {saved_world} ranks "
                "and records no ZeRO stage, so it cannot be converted; resume with its world size"
            )
        return source, saved_world, saved_stage

    def agreed(self, decide: Callable[..., Any], *args: Any) -> Any:
        """`decide(*args)` on rank 0, its result (or its ConfigError) on every rank."""
        outcome: tuple[str, Any] | None = None
        if self.rank == 0:
            try:
                outcome = ("ok", decide(*args))
            except ConfigError as error:
                outcome = ("config", str(error))
            except Exception as error:  # the others must not wait for an answer that never comes
                outcome = ("failed", f"{type(error).__name__}: {one_line(error)}")
                distributed.broadcast_object(outcome)
                raise
        outcome = distributed.broadcast_object(outcome)
        kind, value = outcome
        if kind == "config":
            raise ConfigError(value)
        if kind == "failed":
            raise RuntimeError(f"rank 0 failed to read checkpoint directory '{self.store.url}': {value}")
        return value
