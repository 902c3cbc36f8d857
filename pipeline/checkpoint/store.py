"""Where checkpoints live: one interface, `CheckpointStore`, over a local directory (`LocalStore`) and any
fsspec URL such as `s3://bucket/run` (`RemoteStore`); `open_store` picks the one a URL needs. The store
decides how each operation is done there: write a tag atomically, write `latest`, list tags, tell a
complete tag, remove, prune keep-last, check a tag's files, read a trainer state, copy a tag out.

Atomicity: locally every rank writes into `.tmp-step_...`, rank 0 renames it once all ranks have finished,
and only then rewrites `latest` (temp file + rename). Remotely, ranks stage locally and upload into the
tag's prefix, each rank's trainer state last; `latest` is uploaded after every rank's upload completed. A
crash at any point leaves `latest` naming the previous complete checkpoint: `latest` is the commit point.

DeepSpeed's `save_checkpoint` writes the engine's files into a local directory and nothing more: it does
not make a save atomic, rotate old ones, or write anywhere but a local path. That is what this adds.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pipeline.checkpoint.layout import (
    LATEST,
    LOGGER,
    TAG_PATTERN,
    TMP_PREFIX,
    TRAINER_STATE_PATTERN,
    local_problem,
    missing_files,
    open_file,
    recorded_zero_stage,
    saved_zero_stage,
    trainer_state_name,
    world_size_of,
)
from pipeline.core.errors import ConfigError
from pipeline.core.storage import is_remote, url_to_fs
from pipeline.parallel import distributed

log = logging.getLogger(LOGGER)

# writes one checkpoint's files (DeepSpeed's and this rank's trainer state) into directory `root / name`
WriteTag = Callable[[Path, str], None]


class CheckpointStore(ABC):
    """One checkpoint directory. `staging` (remote stores that save only): this rank's local directory where a
    tag is written before upload. `on_remove(tag)` runs before a tag is removed (its universal conversion goes
    with it)."""

    remote = False

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None, staging: Path | None = None,
                 on_remove: Callable[[str], None] | None = None):
        self.url = url
        self.storage_options = storage_options or {}
        self.staging = staging
        self.on_remove = on_remove

    def join(self, *parts: str) -> str:
        return "/".join([self.url.rstrip("/"), *parts])

    @property
    def local_root(self) -> Path | None:
        """The directory itself when it is local (DeepSpeed reads it as it is), else None."""
        return None

    # -- reading ----------------------------------------------------------------------------------
    @abstractmethod
    def read_latest(self) -> str | None:
        """The text of `latest`, stripped, or None when there is no `latest`."""

    def latest(self) -> str | None:
        """The newest complete checkpoint's tag, or None when there is none."""
        try:
            return self.read_latest() or None
        except FileNotFoundError:
            return None

    @abstractmethod
    def names(self) -> list[str]:
        """Every entry of the directory (none when it does not exist)."""

    def tags(self) -> list[str]:
        """Every `step_*` tag present, complete or not, oldest first."""
        return sorted(name for name in self.names() if TAG_PATTERN.match(name))

    def leftovers(self) -> list[str]:
        """What unfinished local saves left (`.tmp-*`); a remote save has no temp name."""
        return []

    @abstractmethod
    def is_complete(self, tag: str, world_size: int) -> bool:
        """Every rank's files are in `tag` (a run of `world_size` ranks, or the world size it was written at)."""

    @abstractmethod
    def problem(self, tag: str) -> str | None:
        """None when `tag` can be resumed from, else what is wrong, naming the file."""

    @abstractmethod
    def read_trainer_state(self, tag: str, rank: int = 0) -> dict[str, Any]:
        """Rank `rank`'s trainer state of `tag`, without touching the rest."""

    def saved_zero_stage(self, tag: str) -> int | None:
        """The ZeRO stage DeepSpeed recorded in `tag`'s files, where they can be opened here (locally)."""
        return None

    def download(self, tag: str, local_root: str | Path) -> str:
        """Copy checkpoint `tag` to `local_root/tag`; returns `local_root`, the directory DeepSpeed loads from."""
        fs, base = url_to_fs(self.join(tag), self.storage_options)
        if not fs.exists(base):
            raise ConfigError(f"checkpoint '{self.join(tag)}' does not exist")
        destination = Path(local_root) / tag
        files = [path for path in fs.find(base) if not path.endswith("/")]
        for remote_path in files:
            local_path = destination / remote_path[len(base.rstrip("/")) + 1:]
            local_path.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(remote_path, str(local_path))
        if not files:
            raise ConfigError(f"checkpoint '{self.join(tag)}' is empty")
        return str(local_root)

    @abstractmethod
    def local_copy(self, tag: str, scratch: Path) -> str:
        """A local directory holding `tag` whose files all open, for DeepSpeed to load from: this one when it is
        local, else a fresh download into `scratch` (checked: ConfigError naming the file)."""

    @abstractmethod
    def is_at(self, url: str) -> bool:
        """Whether `url` names this directory."""

    # -- writing ----------------------------------------------------------------------------------
    @abstractmethod
    def probe(self, name: str) -> None:
        """Create the directory and write, then delete, a file `name` in it (raises what the storage raises)."""

    @abstractmethod
    def write_tag(self, tag: str, write: WriteTag, rank: int) -> None:
        """Every rank: `write` this rank's files of `tag` so that `tag` appears complete or not at all (the
        ranks meet in barriers). `latest` is not touched."""

    @abstractmethod
    def write_latest(self, tag: str) -> None:
        """Commit `tag`: name it in `latest`."""

    def remove(self, name: str) -> None:
        """Delete entry `name` (a tag, `latest`, a leftover), if there."""
        if TAG_PATTERN.match(name) and self.on_remove is not None:
            self.on_remove(name)
        self._delete(name)

    @abstractmethod
    def _delete(self, name: str) -> None: ...

    def prune(self, keep_last: int, world_size: int, owns: Callable[[str], bool], started: set[str],
              left_alone: set[str]) -> None:
        """Keep the newest `keep_last` complete checkpoints the run `owns`; remove the unfinished saves it
        `started`. Anything else is left alone, with a warning (once: `left_alone` records it)."""
        latest = self.latest()
        committed = [tag for tag in self.tags() if latest is not None and tag <= latest]
        complete = [tag for tag in committed if owns(tag) and self.is_complete(tag, world_size)]
        for tag in complete[:-keep_last]:
            self.remove(tag)
            log.info("checkpoint: removed old %s (keep_last=%d)", tag, keep_last)
        kept = set(complete)
        for tag in self.tags():
            if tag in kept:
                continue
            if tag in started and tag != latest:
                self.remove(tag)
                log.warning("checkpoint: removed %s, left unfinished by an interrupted save of this run", tag)
            elif tag not in left_alone:
                left_alone.add(tag)
                log.warning("checkpoint: leaving %s alone: not a complete checkpoint this run wrote or continues "
                            "from (it is never loaded; delete it by hand if it is not needed)", self.join(tag))


class LocalStore(CheckpointStore):
    """A directory on a file system every rank sees; a save is renamed into place."""

    @property
    def local_root(self) -> Path:
        return Path(self.url)

    def read_latest(self) -> str | None:
        latest = Path(self.url) / LATEST
        return latest.read_text().strip() if latest.is_file() else None

    def names(self) -> list[str]:
        return os.listdir(self.url) if Path(self.url).is_dir() else []

    def leftovers(self) -> list[str]:
        return [leftover.name for leftover in Path(self.url).glob(TMP_PREFIX + "*")]

    def is_complete(self, tag: str, world_size: int) -> bool:
        return True  # its directory exists only once renamed from the temp one

    def problem(self, tag: str) -> str | None:
        return local_problem(Path(self.url) / tag)

    def read_trainer_state(self, tag: str, rank: int = 0) -> dict[str, Any]:
        return torch.load(Path(self.url) / tag / trainer_state_name(rank), map_location="cpu", weights_only=False)

    def saved_zero_stage(self, tag: str) -> int | None:
        return saved_zero_stage(Path(self.url) / tag)

    def local_copy(self, tag: str, scratch: Path) -> str:
        return self.url

    def is_at(self, url: str) -> bool:
        if is_remote(url):
            return url.rstrip("/") == self.url.rstrip("/")
        return Path(url).resolve() == Path(self.url).resolve()

    def probe(self, name: str) -> None:
        Path(self.url).mkdir(parents=True, exist_ok=True)
        (Path(self.url) / name).write_bytes(b"ok")
        (Path(self.url) / name).unlink()

    def write_tag(self, tag: str, write: WriteTag, rank: int) -> None:
        root, tmp_tag = Path(self.url), TMP_PREFIX + tag
        if rank == 0:
            shutil.rmtree(root / tmp_tag, ignore_errors=True)  # an earlier attempt at this same step
        distributed.barrier()
        write(root, tmp_tag)
        distributed.barrier()  # every rank's files are in the temp dir
        if rank == 0:
            self.remove(tag)  # with any universal conversion of what was there before
            os.replace(root / tmp_tag, root / tag)

    def write_latest(self, tag: str) -> None:
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

    def _delete(self, name: str) -> None:
        if (Path(self.url) / name).is_dir():
            shutil.rmtree(Path(self.url) / name, ignore_errors=True)
        else:
            (Path(self.url) / name).unlink(missing_ok=True)


class RemoteStore(CheckpointStore):
    """A prefix behind an fsspec URL; a save is staged locally and uploaded, each rank's trainer state last."""

    remote = True

    def _fs(self, *parts: str):
        return url_to_fs(self.join(*parts), self.storage_options)

    def read_latest(self) -> str | None:
        fs, path = self._fs(LATEST)
        return fs.cat_file(path).decode().strip() if fs.exists(path) else None

    def names(self) -> list[str]:
        fs, path = url_to_fs(self.url, self.storage_options)
        if not fs.exists(path):
            return []
        return [entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(path, detail=False)]

    def is_complete(self, tag: str, world_size: int) -> bool:
        # every rank's trainer state is there, each uploaded after the rest of its rank's files
        fs, base = self._fs(tag)
        names = {entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(base, detail=False)}
        if all(trainer_state_name(rank) in names for rank in range(world_size)):
            return True
        # written at another world size (before an elastic resume): that many trainer states
        if trainer_state_name(0) not in names:
            return False
        saved_world = world_size_of(self.read_trainer_state(tag))
        return all(trainer_state_name(rank) in names for rank in range(saved_world))

    def problem(self, tag: str) -> str | None:
        """Checked by listing and by the trainer state: the rest opens only once downloaded (`local_copy`)."""
        fs, base = self._fs(tag)
        if not fs.exists(base):
            return "it does not exist"
        sizes = {entry["name"].rstrip("/").rsplit("/", 1)[-1]: entry.get("size") or 0
                 for entry in fs.ls(base, detail=True) if entry.get("type") != "directory"}
        if trainer_state_name(0) not in sizes:
            return f"{trainer_state_name(0)} is missing"
        trainer_state, error = open_file(io.BytesIO(fs.cat_file(f"{base}/{trainer_state_name(0)}")))
        if error is not None:
            return f"{trainer_state_name(0)} is unreadable ({error})"
        missing = missing_files(set(sizes), world_size_of(trainer_state), recorded_zero_stage(trainer_state))
        if missing:
            return missing
        empty = sorted(name for name, size in sizes.items() if name.endswith(".pt") and not size)
        return f"{empty[0]} is empty" if empty else None

    def read_trainer_state(self, tag: str, rank: int = 0) -> dict[str, Any]:
        fs, base = self._fs(tag)
        return torch.load(io.BytesIO(fs.cat_file(f"{base}/{trainer_state_name(rank)}")), map_location="cpu",
                          weights_only=False)

    def local_copy(self, tag: str, scratch: Path) -> str:
        shutil.rmtree(scratch, ignore_errors=True)
        root = self.download(tag, scratch)
        problem = local_problem(Path(root) / tag)  # `problem` could not open the files
        if problem is not None:
            raise ConfigError(f"cannot resume from checkpoint '{self.join(tag)}': {problem}")
        return root

    def is_at(self, url: str) -> bool:
        return url.rstrip("/") == self.url.rstrip("/")

    def probe(self, name: str) -> None:
        fs, path = url_to_fs(self.url, self.storage_options)
        fs.makedirs(path, exist_ok=True)
        fs.pipe_file(f"{path.rstrip('/')}/{name}", b"ok")
        fs.rm_file(f"{path.rstrip('/')}/{name}")

    def write_tag(self, tag: str, write: WriteTag, rank: int) -> None:
        # stage the whole directory locally, then upload this rank's files into the tag prefix
        if self.staging is None:
            raise ValueError(f"a save into '{self.url}' needs a local staging directory")
        local_root = self.staging
        shutil.rmtree(local_root / tag, ignore_errors=True)
        local_root.mkdir(parents=True, exist_ok=True)
        if rank == 0:
            self.remove(tag)  # leftovers of an interrupted save of this step must not mix in
        distributed.barrier()
        write(local_root, tag)
        self._upload(local_root / tag, tag)
        distributed.barrier()
        shutil.rmtree(local_root / tag, ignore_errors=True)

    def _upload(self, local_dir: Path, tag: str) -> None:
        fs, base = self._fs(tag)
        files = [path for path in sorted(local_dir.rglob("*")) if path.is_file()]
        # the trainer state last: a rank's trainer state in the tag means all of that rank's files are there
        files.sort(key=lambda path: TRAINER_STATE_PATTERN.match(path.name) is not None)
        for path in files:
            relative = path.relative_to(local_dir).as_posix()
            fs.put_file(str(path), f"{base.rstrip('/')}/{relative}")

    def write_latest(self, tag: str) -> None:
        fs, path = self._fs(LATEST)
        fs.pipe_file(path, tag.encode())

    def _delete(self, name: str) -> None:
        fs, path = self._fs(name)
        if fs.exists(path):
            fs.rm(path, recursive=True)


def open_store(url: str, storage_options: dict[str, Any] | None = None, staging: Path | None = None,
               on_remove: Callable[[str], None] | None = None) -> CheckpointStore:
    """The store for `url`: remote for an fsspec URL other than file://, else local."""
    kind = RemoteStore if is_remote(url) else LocalStore
    return kind(url, storage_options, staging, on_remove)


def check_reachable(url: str, storage_options: dict[str, Any] | None = None) -> None:
    """Create the checkpoint directory and write a probe file; ConfigError naming the setting if not."""
    try:
        open_store(url, storage_options).probe(f".probe-{os.getpid()}")
    except Exception as error:  # any failure means we cannot checkpoint: say where and why
        raise ConfigError(f"checkpoint.dir '{url}' is not reachable or not writable: {error}") from None
