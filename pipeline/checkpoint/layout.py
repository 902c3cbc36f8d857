"""What a checkpoint directory holds, by name, and whether one tag in it is whole and opens.

    step_00000100/            one checkpoint: DeepSpeed's files + trainer_state_rank{r}.pt per rank
    step_00000100-universal/  DeepSpeed's universal form of it, for a resume at another world size (elastic.py)
    .tmp-step_00000200/       a local save under way (store.py renames it once every rank has written)
    latest                    the tag of the newest complete checkpoint, written last

DeepSpeed writes and reads its own files; it has no notion of a tag being complete or readable before a
load is attempted (a missing or truncated file fails deep inside `load_checkpoint` with an unrelated
message), so the names and the checks that a tag holds every file its world size and ZeRO stage need, each
opening, are ours: the start plan (plan.py) and the stores (store.py) use them to name what is wrong.
"""

from __future__ import annotations

import io
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

# every checkpoint message keeps the logger name it had when all of this was one module (log filters select it)
LOGGER = "pipeline.checkpoint.manager"

LATEST = "latest"
TAG_PATTERN = re.compile(r"^step_(\d{8})$")
TMP_PREFIX = ".tmp-"
TRAINER_STATE_PATTERN = re.compile(r"^trainer_state_rank(\d+)\.pt$")
# `<tag>-universal/`: DeepSpeed's universal form of checkpoint `<tag>` (for a resume at another world size), as
# a DeepSpeed checkpoint directory of its own: `<tag>/` and `latest_universal`, plus `source` naming what it
# was converted from; it exists only once complete (converted under a temp name, then renamed)
UNIVERSAL_SUFFIX = "-universal"
UNIVERSAL_SOURCE = "source"


def tag_for_step(step: int) -> str:
    return f"step_{step:08d}"


def trainer_state_name(rank: int) -> str:
    return f"trainer_state_rank{rank}.pt"


def one_line(error: BaseException, limit: int = 200) -> str:
    """`error` as a short single line, for messages that must stay one line."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


MISSING = object()


def lookup(tree: dict[str, Any], dotted: str) -> Any:
    """`tree[a][b]...` for the dotted key 'a.b...', or MISSING."""
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return MISSING
        node = node[part]
    return node


def open_file(source: Path | io.BytesIO) -> tuple[Any, str | None]:
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
        return None, one_line(error)


def world_size_of(trainer_state: Any) -> int:
    return int(trainer_state.get("world_size") or 1) if isinstance(trainer_state, dict) else 1


def recorded_zero_stage(trainer_state: Any) -> int | None:
    """The ZeRO stage in the run config a trainer state carries, if it carries one."""
    stage = lookup(trainer_state, "config.train.zero_stage") if isinstance(trainer_state, dict) else MISSING
    return None if stage is MISSING else int(stage)


def missing_files(names: set[str], world_size: int, zero_stage: int | None) -> str | None:
    """What a checkpoint of `world_size` ranks at `zero_stage` (None: as the file names say) listing `names`
    lacks, or None when nothing is missing."""
    for rank in range(world_size):
        if trainer_state_name(rank) not in names:
            return f"{trainer_state_name(rank)} is missing"
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


def saved_zero_stage(tag_dir: Path) -> int | None:
    """The ZeRO stage a local DeepSpeed checkpoint was written at (from the config DeepSpeed stores with it)."""
    model_states = sorted(tag_dir.glob("*model_states.pt"))
    if not model_states:
        return None
    try:
        state = torch.load(model_states[0], map_location="cpu", weights_only=False, mmap=True)
        return int(state["ds_config"]["zero_optimization"]["stage"])
    except Exception:  # an older or foreign layout: the engine's own load reports what is wrong
        return None


def local_problem(tag_dir: Path) -> str | None:
    """Why the local tag directory `tag_dir` cannot be resumed from (naming the file), or None: every expected
    file present and opening."""
    if not tag_dir.is_dir():
        return "it does not exist"
    names = {path.name for path in tag_dir.iterdir() if path.is_file()}
    state_path = tag_dir / trainer_state_name(0)
    if not state_path.is_file():
        return f"{state_path.name} is missing"
    trainer_state, error = open_file(state_path)
    if error is not None:
        return f"{state_path.name} is unreadable ({error})"
    # what DeepSpeed recorded with its model states, else the stage in our run config
    zero_stage = saved_zero_stage(tag_dir)
    if zero_stage is None:
        zero_stage = recorded_zero_stage(trainer_state)
    missing = missing_files(names, world_size_of(trainer_state), zero_stage)
    if missing is not None:
        return missing
    for name in sorted(names - {state_path.name}):
        if name.endswith(".pt"):
            _, error = open_file(tag_dir / name)
            if error is not None:
                return f"{name} is unreadable ({error})"
    return None
