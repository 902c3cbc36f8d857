"""Checkpoints: DeepSpeed's engine state plus ours, atomic, keep-last-K, local or any fsspec URL;
what a run starts from (fresh, or which checkpoint, checked before anything is written); and the
weights of a checkpoint consolidated from any ZeRO stage (`consolidated_state_dict`), which the `export`
and `eval` commands read (pipeline.commands.runs).

Layout of a checkpoint directory (local, or `s3://bucket/prefix`):

    step_00000100/            one checkpoint: DeepSpeed's files + trainer_state_rank{r}.pt per rank
    step_00000200/
    latest                    the tag of the newest complete checkpoint, written last

Atomicity: locally every rank writes into `.tmp-step_...`, rank 0 renames it once all ranks have
finished, and only then rewrites `latest` (temp file + rename). Remotely, ranks stage locally and
upload into the tag's prefix, each rank's trainer state last; `latest` is uploaded after every
rank's upload completed. A crash at any point leaves `latest` naming the previous complete
checkpoint. `latest` is the commit point: a tag newer than it is never loaded.

Ownership: a run deletes or rewrites only what belongs to it. `plan_start` refuses a fresh start
(train.resume=none) into a directory that holds checkpoints unless train.overwrite=true; keep-last-K
rotates the complete checkpoints of the run being continued (or those this run wrote); an unfinished
save is removed only by the manager that started it. Anything else found there is left alone.

Resume: `plan_start` decides on rank 0, for every rank, what to start from: train.resume=auto takes
the newest complete checkpoint whose files all open, skipping (with a warning naming the file) any
that do not; an explicitly named checkpoint that is missing or unreadable is a ConfigError. It also
compares the checkpoint's saved run config with this run's (RESUME_KEYS) and names every difference, all
before config.yaml is written or an engine is built.

Elastic resume: a checkpoint written by W ranks resumes on W' ranks. At ZeRO-0 DeepSpeed's files are whole
(mp_rank_00_model_states.pt holds the model and the optimizer) and load at any world size as they are. At
ZeRO 1-3 each rank's file holds its partition for W ranks: `load` converts the checkpoint once with DeepSpeed's
universal checkpoint converter (deepspeed.checkpoint.ds_to_universal, per parameter: weights and optimizer
moments, whole), keeps the result as `<tag>-universal/` (beside the tag in our own local checkpoint directory,
removed with it; else in the staging directory) and reuses it on the next resume; the engine is built with
DeepSpeed's `checkpoint.load_universal` (`plan_start` says so before the engine is built: `loads_universal`).
We call DeepSpeed's converter rather than re-partitioning ourselves: its layout follows DeepSpeed's own
partitioning from version to version. Every rank r reads trainer_state_rank{r mod W}.pt (the data position is
the same in each); see `load` for the random state.

`load_model_from_run(run_dir)` turns a run's latest checkpoint (any ZeRO stage, local or remote)
into a ContrastiveModel on CPU, for evaluation and export.

Size: ~920 lines, one module for everything that reads or writes a checkpoint directory (save, prune,
load, the start plan, the resume and readability checks, universal conversion, consolidation): the atomicity and "never
delete what this run did not write" rules span all of them and are easiest to audit in one place.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.core import randomness
from pipeline.core.errors import ConfigError
from pipeline.core.storage import is_remote
from pipeline.core.storage import url_to_fs as _fs
from pipeline.parallel import distributed

log = logging.getLogger(__name__)


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

LATEST = "latest"
TAG_PATTERN = re.compile(r"^step_(\d{8})$")
TMP_PREFIX = ".tmp-"
TRAINER_STATE_PATTERN = re.compile(r"^trainer_state_rank(\d+)\.pt$")
# `<tag>-universal/`: DeepSpeed's universal form of checkpoint `<tag>` (for a resume at another world size), as
# a DeepSpeed checkpoint directory of its own: `<tag>/` and `latest_universal`, plus `source` naming what it
# was converted from; it exists only once complete (converted under a temp name, then renamed)
UNIVERSAL_SUFFIX = "-universal"
UNIVERSAL_SOURCE = "source"

# Run settings a resume must keep, as dotted RunConfig keys: they shape the parameters (model), how
# DeepSpeed partitions and stores the optimizer (ZeRO stage, precision), or the data plan whose
# position the checkpoint holds (epoch order from seed, sources, shuffle; batches per step). The world size
# and data.workers may change: the checkpoint is converted (universal checkpoint) and the loader lays the
# rest of the epoch over the new streams (pipeline.data.dataset, elastic resume). Everything else (learning rate,
# steps, logging, evaluation, storage settings) may change on resume.
RESUME_KEYS = (
    "model.name", "model.modality", "model.probabilistic", "model.logit_bias", "model.audio",
    "train.zero_stage", "train.precision", "train.global_batch_size", "train.accum_steps", "train.seed",
    "data.train_urls", "data.mixture", "data.weights", "data.modality", "data.shuffle_buffer", "data.resampled",
    "data.epoch_samples",
)


def tag_for_step(step: int) -> str:
    return f"step_{step:08d}"


def _trainer_state_name(rank: int) -> str:
    return f"trainer_state_rank{rank}.pt"



def _one_line(error: BaseException, limit: int = 200) -> str:
    """`error` as a short single line, for messages that must stay one line."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


# -- random state ---------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators (torch.manual_seed seeds every CUDA device too),
    so that nothing a run draws from a global generator depends on the process it happens to run in."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every global generator's state: Python, numpy, torch CPU and (once CUDA is in use) every CUDA device."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Put every generator `rng_state` recorded back where it was: the next draws equal those the saving
    process would have made."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- checks ---------------------------------------------------------------------------------------
def all_finite(module: torch.nn.Module) -> bool:
    """Whether every parameter of `module` is finite, agreed by every rank.

    One max-abs reduction per dtype over all parameters (under ZeRO-3 each rank's own partition), one
    all-reduce of the result when a process group is up, and one host read: cheap enough before each save."""
    tensors = [getattr(parameter, "ds_tensor", parameter).detach() for parameter in module.parameters()]
    tensors = [tensor for tensor in tensors if tensor.numel()]
    device = tensors[0].device if tensors else torch.device("cpu")
    finite = torch.ones((), dtype=torch.int32, device=device)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for tensor in tensors:
        by_dtype.setdefault(tensor.dtype, []).append(tensor)
    for group in by_dtype.values():
        # the inf-norm is the largest |x|: it cannot overflow, and NaN or inf anywhere makes it non-finite
        peak = torch.stack(torch._foreach_norm(group, float("inf"))).amax()
        finite = finite & torch.isfinite(peak).to(torch.int32)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        if torch.distributed.get_backend() == "nccl" and finite.device.type != "cuda":
            finite = finite.cuda()
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
    return bool(finite.item())


def check_reachable(url: str, storage_options: dict[str, Any] | None = None) -> None:
    """Create the checkpoint directory and write a probe file; ConfigError naming the setting if not."""
    probe = f".probe-{os.getpid()}"
    try:
        if is_remote(url):
            fs, path = _fs(url, storage_options)
            fs.makedirs(path, exist_ok=True)
            fs.pipe_file(f"{path.rstrip('/')}/{probe}", b"ok")
            fs.rm_file(f"{path.rstrip('/')}/{probe}")
        else:
            Path(url).mkdir(parents=True, exist_ok=True)
            (Path(url) / probe).write_bytes(b"ok")
            (Path(url) / probe).unlink()
    except Exception as error:  # any failure means we cannot checkpoint: say where and why
        raise ConfigError(f"checkpoint.dir '{url}' is not reachable or not writable: {error}") from None


def _lookup(tree: dict[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


_MISSING = object()


def check_resume_compatible(trainer_state: dict[str, Any], run_config: dict[str, Any] | None, source: str) -> None:
    """ConfigError naming every setting in which this run (`run_config`, a RunConfig as a dict) differs from
    the run that saved `trainer_state` where resuming needs them equal (RESUME_KEYS); keys the checkpoint does
    not record are not compared. The world size may differ (elastic resume, see the module docstring)."""
    differences = []
    saved_config = trainer_state.get("config")
    if saved_config and run_config:
        for key in RESUME_KEYS:
            saved, current = _lookup(saved_config, key), _lookup(run_config, key)
            if saved is not _MISSING and current is not _MISSING and saved != current:
                differences.append(f"{key} {saved!r} in the checkpoint, {current!r} now")
    if not differences:
        return
    advice = "resume with the checkpoint's settings, or start a new run (another train.name)"
    raise ConfigError(f"cannot resume from '{source}': {'; '.join(differences)}: {advice}")


def _open(source: Path | io.BytesIO) -> tuple[Any, str | None]:
    """(what torch.load reads from `source`, None), or (None, why it cannot). A path is memory-mapped: its
    tensors are mapped, not read, so opening a large optimizer-state file costs little."""
    # torch.save writes a zip archive whose directory is at the end: without it, the file was cut short
    # (or is something else); torch's own message for that case only talks about mmap
    zipped = zipfile.is_zipfile(source)
    try:
        if isinstance(source, Path) and zipped:
            return torch.load(source, map_location="cpu", weights_only=False, mmap=True), None
        if not isinstance(source, Path):
            source.seek(0)
        return torch.load(source, map_location="cpu", weights_only=False), None  # pre-zip torch.save format
    except Exception as error:  # whatever torch or pickle raises, the file cannot be resumed from
        if not zipped:
            return None, "truncated, or not a PyTorch checkpoint: it has no zip directory"
        return None, _one_line(error)


def _world_size_of(trainer_state: Any) -> int:
    return int(trainer_state.get("world_size") or 1) if isinstance(trainer_state, dict) else 1


def _recorded_zero_stage(trainer_state: Any) -> int | None:
    """The ZeRO stage in the run config a trainer state carries, if it carries one."""
    stage = _lookup(trainer_state, "config.train.zero_stage") if isinstance(trainer_state, dict) else _MISSING
    return None if stage is _MISSING else int(stage)


def _missing_files(names: set[str], world_size: int, zero_stage: int | None) -> str | None:
    """What a checkpoint of `world_size` ranks at `zero_stage` (None: as the file names say) listing `names`
    lacks, or None when nothing is missing."""
    for rank in range(world_size):
        if _trainer_state_name(rank) not in names:
            return f"{_trainer_state_name(rank)} is missing"
    if not any(name.endswith("model_states.pt") for name in names):
        return "DeepSpeed's model states (*model_states.pt) are missing"
    if zero_stage is None:
        zero3 = any(re.search(r"zero_pp_rank_\d+_mp_rank_\d+_model_states\.pt$", name) for name in names)
        partitioned = zero3 or any(name.endswith("optim_states.pt") for name in names)
    else:
        zero3, partitioned = zero_stage == 3, zero_stage > 0
    for rank in range(world_size if partitioned else 0):
        kinds = ("optim_states", "model_states") if zero3 else ("optim_states",)
        for kind in kinds:
            pattern = re.compile(rf"zero_pp_rank_{rank}_mp_rank_\d+_{kind}\.pt$")
            if not any(pattern.search(name) for name in names):
                return f"DeepSpeed's zero_pp_rank_{rank}_*_{kind}.pt is missing"
    return None


def _saved_zero_stage(tag_dir: Path) -> int | None:
    """The ZeRO stage a local DeepSpeed checkpoint was written at (from the config DeepSpeed stores with it)."""
    model_states = sorted(tag_dir.glob("*model_states.pt"))
    if not model_states:
        return None
    try:
        state = torch.load(model_states[0], map_location="cpu", weights_only=False, mmap=True)
        return int(state["ds_config"]["zero_optimization"]["stage"])
    except Exception:  # an older or foreign layout: the engine's own load reports what is wrong
        return None


class CheckpointManager:
    """Saves and restores checkpoints of one run; every rank calls `plan_start`, `resolve`, `save` and `load`
    together."""

    def __init__(self, cfg: CheckpointConfig, run_dir: str | Path, rank: int, world_size: int):
        self.cfg = cfg
        self.url = cfg.dir or str(Path(run_dir) / "checkpoints")
        self.remote = is_remote(self.url)
        self.rank = rank
        self.world_size = world_size
        staging = Path(cfg.staging_dir or Path(run_dir) / "checkpoint-staging")
        # per rank, so that ranks sharing a node never write into each other's staging files
        self.staging = staging / f"rank{rank}"
        # what this run may delete: the tags it started writing and, once it continues the run whose
        # checkpoints are there (train.resume=auto, or a checkpoint of this directory), every complete one
        self._started: set[str] = set()
        self._continues = False
        self._left_alone: set[str] = set()
        # what plan_start found: the checkpoint's world size and ZeRO stage (None: not resuming, or not recorded)
        self.saved_world_size: int | None = None
        self.saved_zero_stage: int | None = None

    # -- where things are -------------------------------------------------------------------------
    def _fs(self, url: str):
        return _fs(url, self.cfg.storage_options)

    def _join(self, *parts: str) -> str:
        return "/".join([self.url.rstrip("/"), *parts])

    def latest_tag(self) -> str | None:
        """The newest complete checkpoint's tag, or None when there is none."""
        try:
            if self.remote:
                fs, path = self._fs(self._join(LATEST))
                if not fs.exists(path):
                    return None
                return fs.cat_file(path).decode().strip() or None
            latest = Path(self.url) / LATEST
            return latest.read_text().strip() or None if latest.is_file() else None
        except FileNotFoundError:
            return None

    def tags(self) -> list[str]:
        """Every `step_*` tag present, complete or not, oldest first."""
        if self.remote:
            fs, path = self._fs(self.url)
            if not fs.exists(path):
                return []
            names = [entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(path, detail=False)]
        else:
            names = os.listdir(self.url) if Path(self.url).is_dir() else []
        return sorted(name for name in names if TAG_PATTERN.match(name))

    def _locate(self, tag_or_path: str) -> tuple[str, str]:
        """(checkpoint directory, tag) of a tag of ours, a tag directory path, or a checkpoint directory
        path (its `latest`)."""
        if "/" not in tag_or_path:
            return self.url, tag_or_path
        path = tag_or_path.rstrip("/")
        if is_remote(path):
            fs, fs_path = self._fs(path)
            if fs.isfile(f"{fs_path}/{LATEST}"):
                return path, fs.cat_file(f"{fs_path}/{LATEST}").decode().strip()
        elif (Path(path) / LATEST).is_file():
            return path, (Path(path) / LATEST).read_text().strip()
        root, tag = path.rsplit("/", 1)
        return root, tag

    def _is_ours(self, root: str) -> bool:
        if is_remote(root) or self.remote:
            return root.rstrip("/") == self.url.rstrip("/")
        return Path(root).resolve() == Path(self.url).resolve()

    def _source_name(self, root: str, tag: str) -> str:
        """What `load` takes for (root, tag): the bare tag for our own directory, else the tag's path."""
        return tag if root == self.url else f"{root.rstrip('/')}/{tag}"

    # -- deciding what a run starts from ----------------------------------------------------------
    def problem(self, tag_or_path: str) -> str | None:
        """None when the checkpoint can be resumed from: every rank's trainer state and every DeepSpeed file
        present and (locally) opening; else what is wrong, naming the file. Remote checkpoints are checked by
        listing and by their trainer state; `load` opens the rest after downloading."""
        root, tag = self._locate(tag_or_path)
        if is_remote(root):
            return self._remote_problem(root, tag)
        return _local_problem(Path(root) / tag)

    def _remote_problem(self, root: str, tag: str) -> str | None:
        fs, base = self._fs(f"{root.rstrip('/')}/{tag}")
        if not fs.exists(base):
            return "it does not exist"
        sizes = {entry["name"].rstrip("/").rsplit("/", 1)[-1]: entry.get("size") or 0
                 for entry in fs.ls(base, detail=True) if entry.get("type") != "directory"}
        if _trainer_state_name(0) not in sizes:
            return f"{_trainer_state_name(0)} is missing"
        trainer_state, error = _open(io.BytesIO(fs.cat_file(f"{base}/{_trainer_state_name(0)}")))
        if error is not None:
            return f"{_trainer_state_name(0)} is unreadable ({error})"
        missing = _missing_files(set(sizes), _world_size_of(trainer_state), _recorded_zero_stage(trainer_state))
        if missing:
            return missing
        empty = sorted(name for name, size in sizes.items() if name.endswith(".pt") and not size)
        return f"{empty[0]} is empty" if empty else None

    def read_trainer_state(self, tag_or_path: str, rank: int = 0) -> dict[str, Any]:
        """Rank `rank`'s trainer state of a checkpoint, without touching the rest (remote: that file only)."""
        root, tag = self._locate(tag_or_path)
        name = _trainer_state_name(rank)
        if is_remote(root):
            fs, base = self._fs(f"{root.rstrip('/')}/{tag}")
            return torch.load(io.BytesIO(fs.cat_file(f"{base}/{name}")), map_location="cpu", weights_only=False)
        return torch.load(Path(root) / tag / name, map_location="cpu", weights_only=False)

    def check_fresh_start(self, overwrite: bool) -> None:
        """For a fresh start (train.resume=none): ConfigError when the checkpoint directory already holds
        checkpoints, naming the directory and the ways out; with `overwrite`, rank 0 deletes them instead.
        Local to this process (no collective): `plan_start` calls it on rank 0 for every rank."""
        tags, latest = self.tags(), self.latest_tag()
        if not tags and latest is None:
            return
        if overwrite:
            if self.rank == 0:
                for tag in tags:
                    self._remove(tag)
                self._remove(LATEST)
                if not self.remote:
                    for leftover in Path(self.url).glob(TMP_PREFIX + "*"):
                        self._remove(leftover.name)
                log.warning("checkpoint: train.overwrite=true: deleted %d checkpoint(s) of an earlier run in %s",
                            len(tags), self.url)
            return
        raise self._fresh_start_refused()

    def _fresh_start_refused(self) -> ConfigError:
        tags = self.tags()
        newest = self.latest_tag() or (tags[-1] if tags else "none")
        other_place = "another checkpoint.dir" if self.cfg.dir else "another train.name"
        return ConfigError(
            f"checkpoint directory '{self.url}' already holds checkpoints of an earlier run (newest {newest}) and "
            f"a fresh start would write over them: continue that run with train.resume=auto, start a new one with "
            f"{other_place}, or replace it with train.overwrite=true"
        )

    def _resolve_here(self, resume: str) -> str | None:
        """`resolve` on this process alone: no collective."""
        if resume == "none":
            return None
        if resume == "auto":
            latest = self.latest_tag()
            # newest first; `latest` itself even if its directory is gone (reported and skipped below).
            # Without `latest` (never committed, or lost) every tag is a candidate.
            tags = self.tags()
            candidates = sorted({tag for tag in tags if latest is None or tag <= latest} | ({latest} - {None}),
                                reverse=True)
            skipped = []
            for tag in candidates:
                problem = self.problem(tag)
                if problem is None:
                    return tag
                log.warning("checkpoint: train.resume=auto skips %s: %s", self._join(tag), problem)
                skipped.append(f"{tag}: {problem}")
            if latest is None:
                return None  # nothing was ever committed here: a fresh start (what is there is left alone)
            raise ConfigError(
                f"train.resume=auto: no checkpoint in '{self.url}' can be resumed from ({'; '.join(skipped)}): "
                "name a good one with train.resume=PATH, or start afresh with train.resume=none train.overwrite=true"
            )
        root, tag = self._locate(resume)
        problem = self.problem(resume)
        if problem is not None:
            where = f"{root.rstrip('/')}/{tag}"
            raise ConfigError(f"train.resume={resume}: cannot resume from checkpoint '{where}': {problem}")
        return self._source_name(root, tag)

    def _agreed(self, decide, *args) -> Any:
        """`decide(*args)` on rank 0, its result (or its ConfigError) on every rank."""
        outcome: tuple[str, Any] | None = None
        if self.rank == 0:
            try:
                outcome = ("ok", decide(*args))
            except ConfigError as error:
                outcome = ("config", str(error))
            except Exception as error:  # the others must not wait for an answer that never comes
                outcome = ("failed", f"{type(error).__name__}: {_one_line(error)}")
                distributed.broadcast_object(outcome)
                raise
        outcome = distributed.broadcast_object(outcome)
        kind, value = outcome
        if kind == "config":
            raise ConfigError(value)
        if kind == "failed":
            raise RuntimeError(f"rank 0 failed to read checkpoint directory '{self.url}': {value}")
        return value

    def resolve(self, resume: str) -> str | None:
        """train.resume -> the checkpoint tag (ours) or tag path (elsewhere) to load, or None for a fresh start.
        'auto' skips checkpoints that cannot be resumed from, newest first; a named one that cannot is a
        ConfigError. Decided on rank 0; every rank gets the same answer."""
        source = self._agreed(self._resolve_here, resume)
        self._note_continuation(resume, source)
        return source

    def _note_continuation(self, resume: str, source: str | None) -> None:
        # resume=auto, or a checkpoint of our own directory: what is there is this run's own, which
        # keep-last-K rotates and a save of the same step replaces
        self._continues = resume == "auto" or (source is not None and self._is_ours(self._locate(source)[0]))

    def plan_start(self, resume: str, overwrite: bool = False, run_config: dict[str, Any] | None = None) -> str | None:
        """What this run starts from, checked in full before the run writes anything (config.yaml included)
        or builds an engine: the checkpoint to `load` (tag or path), or None for a fresh start.

        - train.resume=none (or a checkpoint outside our directory): our checkpoint directory must hold no
          checkpoints, or `overwrite` deletes them; else ConfigError (`check_fresh_start`).
        - 'auto' / a named checkpoint: as `resolve`. 'auto' with nothing ever committed here starts afresh.
        - resuming: ConfigError naming every setting of `run_config` (RunConfig as a dict) that differs from the
          checkpoint's (`check_resume_compatible`). Another world size is fine: see `loads_universal`.
        Decided on rank 0 (ConfigErrors included); every rank gets the same answer."""
        source, self.saved_world_size, self.saved_zero_stage = self._agreed(self._plan_here, resume, overwrite,
                                                                            run_config)
        self._note_continuation(resume, source)
        return source

    @property
    def loads_universal(self) -> bool:
        """Whether the engine that loads the planned checkpoint must be built with DeepSpeed's
        `checkpoint.load_universal` (parallelize.deepspeed_config(load_universal=...)): the checkpoint was written
        at another world size under ZeRO 1-3, so `load` converts it (ZeRO-0 files load at any world size)."""
        return (self.saved_world_size is not None and self.saved_world_size != self.world_size
                and self.saved_zero_stage != 0)

    def _plan_here(self, resume: str, overwrite: bool,
                   run_config: dict[str, Any] | None) -> tuple[str | None, int | None, int | None]:
        """(source, its world size, its ZeRO stage) on this process alone: no collective."""
        source = self._resolve_here(resume)
        if resume == "none" or (source is not None and not self._is_ours(self._locate(source)[0])):
            self.check_fresh_start(overwrite)
        if source is None:
            return None, None, None
        trainer_state = self.read_trainer_state(source)
        check_resume_compatible(trainer_state, run_config, source)
        root, tag = self._locate(source)
        saved_stage = None if is_remote(root) else _saved_zero_stage(Path(root) / tag)
        if saved_stage is None:
            saved_stage = _recorded_zero_stage(trainer_state)
        saved_world = _world_size_of(trainer_state)
        if saved_world != self.world_size and saved_stage is None:
            raise ConfigError(
                f"cannot resume from '{source}' on {self.world_size} ranks: it was written by {saved_world} ranks "
                "and records no ZeRO stage, so it cannot be converted; resume with its world size"
            )
        return source, saved_world, saved_stage

    # -- save -----------------------------------------------------------------------------------
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
        tmp_tag = TMP_PREFIX + tag
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
            raise self._fresh_start_refused()
        self._started.add(tag)
        if self.remote:
            # stage the whole directory locally, then upload this rank's files into the tag prefix
            local_root = self.staging
            shutil.rmtree(local_root / tag, ignore_errors=True)
            local_root.mkdir(parents=True, exist_ok=True)
            if self.rank == 0:
                self._remove(tag)  # leftovers of an interrupted save of this step must not mix in
            distributed.barrier()
            engine.save_checkpoint(str(local_root), tag=tag, save_latest=False)
            torch.save(trainer_state, local_root / tag / _trainer_state_name(self.rank))
            self._upload(local_root / tag, tag)
            distributed.barrier()
            shutil.rmtree(local_root / tag, ignore_errors=True)
        else:
            root = Path(self.url)
            if self.rank == 0:
                shutil.rmtree(root / tmp_tag, ignore_errors=True)  # an earlier attempt at this same step
            distributed.barrier()
            engine.save_checkpoint(str(root), tag=tmp_tag, save_latest=False)
            torch.save(trainer_state, root / tmp_tag / _trainer_state_name(self.rank))
            distributed.barrier()  # every rank's files are in the temp dir
            if self.rank == 0:
                self._remove(tag)  # with any universal conversion of what was there before
                os.replace(root / tmp_tag, root / tag)
        distributed.barrier()
        if self.rank == 0:
            self._write_latest(tag)
            self._prune()
        distributed.barrier()
        return tag

    def _upload(self, local_dir: Path, tag: str) -> None:
        fs, base = self._fs(self._join(tag))
        files = [path for path in sorted(local_dir.rglob("*")) if path.is_file()]
        # the trainer state last: a rank's trainer state in the tag means all of that rank's files are there
        files.sort(key=lambda path: TRAINER_STATE_PATTERN.match(path.name) is not None)
        for path in files:
            relative = path.relative_to(local_dir).as_posix()
            fs.put_file(str(path), f"{base.rstrip('/')}/{relative}")

    def _write_latest(self, tag: str) -> None:
        if self.remote:
            fs, path = self._fs(self._join(LATEST))
            fs.pipe_file(path, tag.encode())
            return
        root = Path(self.url)
        fd, tmp = tempfile.mkstemp(dir=root, prefix=TMP_PREFIX + LATEST)
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(tag)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, root / LATEST)
        finally:
            Path(tmp).unlink(missing_ok=True)

    def _remove(self, name: str) -> None:
        if TAG_PATTERN.match(name):
            self._remove_universal(name)
        if self.remote:
            fs, path = self._fs(self._join(name))
            if fs.exists(path):
                fs.rm(path, recursive=True)
        elif (Path(self.url) / name).is_dir():
            shutil.rmtree(Path(self.url) / name, ignore_errors=True)
        else:
            (Path(self.url) / name).unlink(missing_ok=True)

    def _is_complete(self, tag: str) -> bool:
        """Every rank's files are in `tag`: locally its directory exists only once renamed from the temp
        one; remotely every rank's trainer state is there, each uploaded after the rest of its rank's files."""
        if not self.remote:
            return True
        fs, base = self._fs(self._join(tag))
        names = {entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(base, detail=False)}
        if all(_trainer_state_name(rank) in names for rank in range(self.world_size)):
            return True
        # written at another world size (before an elastic resume): that many trainer states
        if _trainer_state_name(0) not in names:
            return False
        saved_world = _world_size_of(self.read_trainer_state(tag))
        return all(_trainer_state_name(rank) in names for rank in range(saved_world))

    def _prune(self) -> None:
        """Keep the newest `keep_last` complete checkpoints of this run; remove this run's unfinished saves.
        Checkpoints this run may not delete (see the module docstring) are left alone, with a warning."""
        latest = self.latest_tag()
        committed = [tag for tag in self.tags() if latest is not None and tag <= latest]
        complete = [tag for tag in committed if (self._continues or tag in self._started) and self._is_complete(tag)]
        for tag in complete[:-self.cfg.keep_last]:
            self._remove(tag)
            log.info("checkpoint: removed old %s (keep_last=%d)", tag, self.cfg.keep_last)
        kept = set(complete)
        for tag in self.tags():
            if tag in kept:
                continue
            if tag in self._started and tag != latest:
                self._remove(tag)
                log.warning("checkpoint: removed %s, left unfinished by an interrupted save of this run", tag)
            elif tag not in self._left_alone:
                self._left_alone.add(tag)
                log.warning("checkpoint: leaving %s alone: not a complete checkpoint this run wrote or continues "
                            "from (it is never loaded; delete it by hand if it is not needed)", self._join(tag))

    # -- load -----------------------------------------------------------------------------------
    def download(self, tag: str, local_root: str | Path, root: str | None = None) -> str:
        """Copy checkpoint `tag` of the remote directory `root` (default: ours) to `local_root/tag`;
        returns `local_root`, the directory DeepSpeed loads from."""
        root = (root or self.url).rstrip("/")
        fs, base = self._fs(f"{root}/{tag}")
        if not fs.exists(base):
            raise ConfigError(f"checkpoint '{root}/{tag}' does not exist")
        destination = Path(local_root) / tag
        files = [path for path in fs.find(base) if not path.endswith("/")]
        for remote_path in files:
            local_path = destination / remote_path[len(base.rstrip("/")) + 1:]
            local_path.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(remote_path, str(local_path))
        if not files:
            raise ConfigError(f"checkpoint '{root}/{tag}' is empty")
        return str(local_root)

    def load(self, engine, tag_or_path: str) -> dict[str, Any]:
        """Restore engine + this rank's trainer state from what `resolve` / `plan_start` returned.

        At the checkpoint's world size W every rank restores exactly what it saved. At another world size W'
        (elastic resume) rank r reads trainer_state_rank{r mod W}.pt: its step, samples seen and data position
        are those of every rank (the loader re-lays the rest of the epoch over W' ranks). Random state is per
        rank, so its continuity is exact only at equal world size: ranks r < W continue their own generators,
        ranks r >= W (which have none) draw from generators seeded from (train.seed, step, r), so that no two
        ranks share a dropout stream. At ZeRO 1-3 the engine must have been built with `load_universal`
        (`loads_universal` after `plan_start`): the checkpoint is converted once (`_universal_checkpoint`)."""
        root, tag = self._locate(tag_or_path)
        where = f"{root.rstrip('/')}/{tag}"
        saved_world = _world_size_of(self.read_trainer_state(tag_or_path))
        stage = engine.zero_optimization_stage()
        if saved_world != self.world_size and stage > 0:
            trainer_state = self._load_elastic(engine, root, tag, where, saved_world)
        else:
            trainer_state = self._load_as_saved(engine, root, tag, where, self.rank % saved_world)
        if self.rank >= saved_world:
            seed = _lookup(trainer_state, "config.train.seed")
            seed_everything(randomness.seed_int(0 if seed is _MISSING else int(seed), "new_rank",
                                         int(trainer_state.get("step", 0)), self.rank))
            trainer_state = {**trainer_state, "rng": rng_state()}
        if self._is_ours(root):
            self._continues = True
        return trainer_state

    def _check_stage(self, engine, saved_stage: int | None, where: str) -> None:
        # a stage mismatch fails inside DeepSpeed with an unrelated message ("'NoneType' object has no
        # attribute 'copy'", a bare AssertionError, a missing file): say what it is
        stage = engine.zero_optimization_stage()
        if saved_stage is not None and saved_stage != stage:
            raise ConfigError(
                f"cannot resume from '{where}': it was written at ZeRO stage {saved_stage}, this run uses "
                f"train.zero_stage={stage}: resume with train.zero_stage={saved_stage} (changing the stage needs "
                "DeepSpeed's universal checkpoint conversion, ds_to_universal.py)"
            )

    def _load_as_saved(self, engine, root: str, tag: str, where: str, state_rank: int) -> dict[str, Any]:
        """DeepSpeed's files as they are (same world size, or ZeRO-0 at any) + trainer_state_rank{state_rank}."""
        if is_remote(root):
            local_root = self.staging / "download"
            shutil.rmtree(local_root, ignore_errors=True)
            root = self.download(tag, local_root, root=root)
            problem = _local_problem(Path(root) / tag)  # the remote check could not open the files
            if problem is not None:
                raise ConfigError(f"cannot resume from checkpoint '{where}': {problem}")
        state_path = Path(root) / tag / _trainer_state_name(state_rank)
        if not state_path.is_file():
            raise ConfigError(f"cannot resume from checkpoint '{where}': it has no {state_path.name}")
        trainer_state = torch.load(state_path, map_location="cpu", weights_only=False)
        self._check_stage(engine, _saved_zero_stage(Path(root) / tag), where)
        load_path, _ = engine.load_checkpoint(
            root, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if load_path is None:
            raise ConfigError(f"DeepSpeed found no checkpoint to load in '{where}'")
        return trainer_state

    def _load_elastic(self, engine, root: str, tag: str, where: str, saved_world: int) -> dict[str, Any]:
        """ZeRO 1-3 at another world size: through DeepSpeed's universal checkpoint."""
        state_rank = self.rank % saved_world
        trainer_state = self.read_trainer_state(self._source_name(root, tag), state_rank)
        saved_stage = None if is_remote(root) else _saved_zero_stage(Path(root) / tag)
        if saved_stage is None:
            saved_stage = _recorded_zero_stage(trainer_state)
        self._check_stage(engine, saved_stage, where)
        if not engine.load_universal_checkpoint():
            raise ConfigError(
                f"cannot resume from '{where}' on {self.world_size} ranks: it was written by {saved_world} ranks at "
                f"ZeRO stage {engine.zero_optimization_stage()}, and the engine was not built to load DeepSpeed's "
                "universal checkpoint (deepspeed_config(load_universal=CheckpointManager.loads_universal))"
            )
        universal_root = self._universal_checkpoint(root, tag, where, saved_world)
        load_path, _ = engine.load_checkpoint(
            str(universal_root), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if load_path is None:
            raise ConfigError(f"DeepSpeed found no universal checkpoint to load in '{universal_root}'")
        log.info("checkpoint: resumed %s (written by %d ranks) on %d ranks through %s", where, saved_world,
                 self.world_size, universal_root)
        return trainer_state

    # -- universal checkpoints (elastic resume) ---------------------------------------------------
    def _universal_home(self, root: str) -> tuple[Path, bool]:
        """(where `<tag>-universal/` of a checkpoint in `root` is kept, whether every rank sees that place).
        Beside the tag in our own local checkpoint directory, which every rank shares (they all save into it);
        else (a remote checkpoint, or another run's directory, which we never write into) in the staging
        directory, which may be local to each node."""
        if not is_remote(root) and self._is_ours(root):
            return Path(root), True
        return self.staging.parent, False

    def _universal_checkpoint(self, root: str, tag: str, where: str, saved_world: int) -> Path:
        """The directory holding the universal form of `where` (`<tag>/` and `latest_universal`), converted
        once: by rank 0 where every rank sees it, else by the first rank of each node; the rest wait. A
        complete conversion of the same checkpoint found there is reused."""
        home, shared = self._universal_home(root)
        target = home / f"{tag}{UNIVERSAL_SUFFIX}"
        converts = self.rank == 0 if shared else int(os.environ.get("LOCAL_RANK", self.rank)) == 0
        failure = None
        if converts and not _universal_complete(target, where):
            try:
                self._convert_to_universal(root, tag, where, target, saved_world)
            except Exception as error:  # reported on every rank below: the others must not wait forever
                failure = f"{type(error).__name__}: {_one_line(error, 600)}"
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
        if not _universal_complete(target, where):
            raise ConfigError(f"the universal checkpoint '{target}' of '{where}' is not visible on rank {self.rank}: "
                              "set checkpoint.staging_dir to a directory every rank of a node shares")
        return target

    def _convert_to_universal(self, root: str, tag: str, where: str, target: Path, saved_world: int) -> None:
        """Run DeepSpeed's converter (a child process: its output stays out of ours, and its worker pool out of
        a process holding a process group) into a temp directory, then rename it to `target`."""
        started = time.perf_counter()
        downloaded = None
        if is_remote(root):
            downloaded = self.staging / "download"
            shutil.rmtree(downloaded, ignore_errors=True)
            self.download(tag, downloaded, root=root)
            problem = _local_problem(downloaded / tag)
            if problem is not None:
                raise ConfigError(f"cannot resume from checkpoint '{where}': {problem}")
            source_dir = downloaded / tag
        else:
            source_dir = Path(root) / tag
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
                if not _universal_complete(target, where):  # else: another node's identical conversion won
                    raise
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
            if downloaded is not None:
                shutil.rmtree(downloaded, ignore_errors=True)
        log.warning("checkpoint: converted %s (written by %d ranks) to DeepSpeed's universal checkpoint %s for %d "
                    "ranks in %.1f s; later resumes reuse it", where, saved_world, target, self.world_size,
                    time.perf_counter() - started)

    def _remove_universal(self, tag: str) -> None:
        """Remove the universal conversion of our checkpoint `tag` (it is being removed or rewritten): the one
        beside it, or the one in the staging directory if it was converted from this checkpoint (the staging
        directory may hold one of another run's checkpoint of the same tag)."""
        if not self.remote:
            shutil.rmtree(Path(self.url) / f"{tag}{UNIVERSAL_SUFFIX}", ignore_errors=True)
        staged = self.staging.parent / f"{tag}{UNIVERSAL_SUFFIX}"
        if _universal_complete(staged, self._join(tag)):
            shutil.rmtree(staged, ignore_errors=True)


def _universal_complete(target: Path, where: str) -> bool:
    """Whether `target` is a finished universal conversion of the checkpoint at `where`."""
    source = target / UNIVERSAL_SOURCE
    return (target / "latest_universal").is_file() and source.is_file() and source.read_text() == where


def _local_problem(tag_dir: Path) -> str | None:
    """`CheckpointManager.problem` for a local tag directory: every expected file present and opening."""
    if not tag_dir.is_dir():
        return "it does not exist"
    names = {path.name for path in tag_dir.iterdir() if path.is_file()}
    state_path = tag_dir / _trainer_state_name(0)
    if not state_path.is_file():
        return f"{state_path.name} is missing"
    trainer_state, error = _open(state_path)
    if error is not None:
        return f"{state_path.name} is unreadable ({error})"
    # what DeepSpeed recorded with its model states, else the stage in our run config
    zero_stage = _saved_zero_stage(tag_dir)
    if zero_stage is None:
        zero_stage = _recorded_zero_stage(trainer_state)
    missing = _missing_files(names, _world_size_of(trainer_state), zero_stage)
    if missing is not None:
        return missing
    for name in sorted(names - {state_path.name}):
        if name.endswith(".pt"):
            _, error = _open(tag_dir / name)
            if error is not None:
                return f"{name} is unreadable ({error})"
    return None


# -- consolidation ----------------------------------------------------------------------------------
def consolidated_state_dict(checkpoint_dir: str, tag: str) -> dict[str, torch.Tensor]:
    """Full fp32 weights of a (local) DeepSpeed checkpoint, from any ZeRO stage."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag_dir = Path(checkpoint_dir) / tag
    if list(tag_dir.glob("*optim_states.pt")) and any("zero" in p.name for p in tag_dir.iterdir()):
        state = get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=tag)
    else:
        # ZeRO-0: the module's weights are whole in rank 0's model-states file
        model_states = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
        if not model_states:
            raise FileNotFoundError(f"no DeepSpeed model states in '{tag_dir}'")
        state = torch.load(model_states[0], map_location="cpu", weights_only=False)["module"]
    return {name: tensor.float() for name, tensor in state.items()}
