"""Elastic resume: loading a checkpoint written by W ranks onto W' ranks, through DeepSpeed's universal
checkpoint, and the ZeRO-stage check every load makes.

At ZeRO-0 DeepSpeed's files are whole (mp_rank_00_model_states.pt holds the model and the optimizer) and load
at any world size as they are. At ZeRO 1-3 each rank's file holds its partition for W ranks: the checkpoint
is converted once with DeepSpeed's universal checkpoint converter (deepspeed.checkpoint.ds_to_universal, per
parameter: weights and optimizer moments, whole), the result kept as `<tag>-universal/` (beside the tag in our
own local checkpoint directory, removed with it; else in the staging directory) and reused on the next
resume; the engine is built with DeepSpeed's `checkpoint.load_universal`
(`CheckpointManager.loads_universal` says so before the engine is built).

We call DeepSpeed's converter rather than re-partitioning ourselves: its layout follows DeepSpeed's own
partitioning from version to version. What we add is around it: converting once per checkpoint (by one
rank, the others waiting and told if it failed), where the conversion lives and when it is stale or gone
with its checkpoint, and a ConfigError instead of DeepSpeed's own message when the stage differs.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.checkpoint.layout import (
    LOGGER,
    TMP_PREFIX,
    UNIVERSAL_SOURCE,
    UNIVERSAL_SUFFIX,
    one_line,
    recorded_zero_stage,
)
from pipeline.checkpoint.store import CheckpointStore
from pipeline.core.errors import ConfigError

log = logging.getLogger(LOGGER)


def check_stage(engine, saved_stage: int | None, where: str) -> None:
    """ConfigError when the checkpoint at `where` was written at another ZeRO stage than `engine` runs."""
    # a stage mismatch fails inside DeepSpeed with an unrelated message ("'NoneType' object has no
    # attribute 'copy'", a bare AssertionError, a missing file): say what it is
    stage = engine.zero_optimization_stage()
    if saved_stage is not None and saved_stage != stage:
        raise ConfigError(
            f"cannot resume from '{where}': it was written at ZeRO stage {saved_stage}, this run uses "
            f"train.zero_stage={stage}: resume with train.zero_stage={saved_stage} (changing the stage needs "
            "DeepSpeed's universal checkpoint conversion, ds_to_universal.py)"
        )


def universal_complete(target: Path, where: str) -> bool:
    """Whether `target` is a finished universal conversion of the checkpoint at `where`."""
    source = target / UNIVERSAL_SOURCE
    return (target / "latest_universal").is_file() and source.is_file() and source.read_text() == where


class ElasticLoader:
    """Loads checkpoints written at another world size onto rank `rank` of `world_size`, for the run whose own
    checkpoint directory is `store`; `staging`: this rank's staging directory (its parent is shared by the
    node's ranks)."""

    def __init__(self, store: CheckpointStore, staging: Path, rank: int, world_size: int):
        self.store = store
        self.staging = staging
        self.rank = rank
        self.world_size = world_size

    def load(self, engine, source: CheckpointStore, tag: str, saved_world: int) -> dict[str, Any]:
        """ZeRO 1-3 at another world size: through DeepSpeed's universal checkpoint. Returns trainer state
        rank{rank mod saved_world}."""
        where = source.join(tag)
        trainer_state = source.read_trainer_state(tag, self.rank % saved_world)
        saved_stage = source.saved_zero_stage(tag)
        if saved_stage is None:
            saved_stage = recorded_zero_stage(trainer_state)
        check_stage(engine, saved_stage, where)
        if not engine.load_universal_checkpoint():
            raise ConfigError(
                f"cannot resume from '{where}' on {self.world_size} ranks: it was written by {saved_world} ranks at "
                f"ZeRO stage {engine.zero_optimization_stage()}, and the engine was not built to load DeepSpeed's "
                "universal checkpoint (deepspeed_config(load_universal=CheckpointManager.loads_universal))"
            )
        universal_root = self._universal_checkpoint(source, tag, saved_world)
        load_path, _ = engine.load_checkpoint(
            str(universal_root), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if load_path is None:
            raise ConfigError(f"DeepSpeed found no universal checkpoint to load in '{universal_root}'")
        log.info("checkpoint: resumed %s (written by %d ranks) on %d ranks through %s", where, saved_world,
                 self.world_size, universal_root)
        return trainer_state

    def _home(self, source: CheckpointStore) -> tuple[Path, bool]:
        """(where `<tag>-universal/` of a checkpoint in `source` is kept, whether every rank sees that place).
        Beside the tag in our own local checkpoint directory, which every rank shares (they all save into it);
        else (a remote checkpoint, or another run's directory, which we never write into) in the staging
        directory, which may be local to each node."""
        if source.local_root is not None and self.store.is_at(source.url):
            return source.local_root, True
        return self.staging.parent, False

    def _universal_checkpoint(self, source: CheckpointStore, tag: str, saved_world: int) -> Path:
        """The directory holding the universal form of `source`'s `tag` (`<tag>/` and `latest_universal`),
        converted once: by rank 0 where every rank sees it, else by the first rank of each node; the rest wait.
        A complete conversion of the same checkpoint found there is reused."""
        where = source.join(tag)
        home, shared = self._home(source)
        target = home / f"{tag}{UNIVERSAL_SUFFIX}"
        converts = self.rank == 0 if shared else int(os.environ.get("LOCAL_RANK", self.rank)) == 0
        failure = None
        if converts and not universal_complete(target, where):
            try:
                self._convert(source, tag, target, saved_world)
            except Exception as error:  # reported on every rank below: the others must not wait forever
                failure = f"{type(error).__name__}: {one_line(error, 600)}"
        failures = [failure]
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            failures = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(failures, failure)
        failed = [(rank, text) for rank, text in enumerate(failures) if text is not None]
        if failed:
            rank, text = failed[0]
            raise ConfigError(
                f"cannot resume from '{where}' (written by {saved_world} ranks) on {self.world_size} ranks: converting "
                f"it to DeepSpeed's universal checkpoint failed on rank {rank}: {text}; resume with {saved_world} ranks"
            )
        if not universal_complete(target, where):
            raise ConfigError(f"the universal checkpoint '{target}' of '{where}' is not visible on rank {self.rank}: "
                              "set checkpoint.staging_dir to a directory every rank of a node shares")
        return target

    def _convert(self, source: CheckpointStore, tag: str, target: Path, saved_world: int) -> None:
        """Run DeepSpeed's converter (a child process: its output stays out of ours, and its worker pool out of
        a process holding a process group) into a temp directory, then rename it to `target`."""
        started = time.perf_counter()
        where = source.join(tag)
        download = self.staging / "download"
        source_dir = Path(source.local_copy(tag, download)) / tag
        downloaded = download if source.remote else None
        target.parent.mkdir(parents=True, exist_ok=True)
        scratch = target.parent / f"{TMP_PREFIX}{target.name}-{os.getpid()}"
        shutil.rmtree(scratch, ignore_errors=True)
        workers = max(1, min(4, (os.cpu_count() or 1) // 2))
        command = [
            sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(source_dir),
            "--output_folder", str(scratch / tag), "--num_extract_workers", str(workers),
            "--num_merge_workers", str(max(1, workers // 2)),
            # our checkpoints carry no Megatron-style partitioning metadata: the converter's defaults fit them
            "--inject_missing_state",
        ]
        try:
            result = subprocess.run(command, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                lines = [line for line in (result.stderr or result.stdout).splitlines() if line.strip()]
                raise RuntimeError(f"ds_to_universal exited with {result.returncode}: {' | '.join(lines[-3:])}")
            (scratch / UNIVERSAL_SOURCE).write_text(where)
            shutil.rmtree(target, ignore_errors=True)  # a conversion of another checkpoint under this tag
            try:
                os.replace(scratch, target)
            except OSError:
                if not universal_complete(target, where):  # else: another node's identical conversion won
                    raise
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
            if downloaded is not None:
                shutil.rmtree(downloaded, ignore_errors=True)
        log.warning("checkpoint: converted %s (written by %d ranks) to DeepSpeed's universal checkpoint %s for %d "
                    "ranks in %.1f s; later resumes reuse it", where, saved_world, target, self.world_size,
                    time.perf_counter() - started)

    def remove_universal(self, tag: str) -> None:
        """Remove the universal conversion of our checkpoint `tag` (it is being removed or rewritten): the one
        beside it, or the one in the staging directory if it was converted from this checkpoint (the staging
        directory may hold one of another run's checkpoint of the same tag)."""
        if self.store.local_root is not None:
            shutil.rmtree(self.store.local_root / f"{tag}{UNIVERSAL_SUFFIX}", ignore_errors=True)
        staged = self.staging.parent / f"{tag}{UNIVERSAL_SUFFIX}"
        if universal_complete(staged, self.store.join(tag)):
            shutil.rmtree(staged, ignore_errors=True)
