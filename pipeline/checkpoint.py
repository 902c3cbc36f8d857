"""Checkpoints: DeepSpeed's engine state plus ours, atomic, keep-last-K, local or any fsspec URL;
and the `export` command that writes open_clip-loadable weights.

    python -m pipeline export runs/demo-clip runs/demo-clip/open_clip.pt

Layout of a checkpoint directory (local, or `s3://bucket/prefix`):

    step_00000100/            one checkpoint: DeepSpeed's files + trainer_state_rank{r}.pt per rank
    step_00000200/
    latest                    the tag of the newest complete checkpoint, written last

Atomicity: locally every rank writes into `.tmp-step_...`, rank 0 renames it once all ranks have
finished, and only then rewrites `latest` (temp file + rename). Remotely, ranks stage locally and
upload into the tag's prefix; `latest` is uploaded after every rank's upload completed. A crash at
any point leaves `latest` naming the previous complete checkpoint. `latest` is the commit point:
a tag newer than it is the remains of an interrupted save, never loaded, and removed by the next
save; keep-last-K counts only complete checkpoints.

`load_model_from_run(run_dir)` turns a run's latest checkpoint (any ZeRO stage, local or remote)
into a ContrastiveModel on CPU, for evaluation and export.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import distributed
from pipeline.config import CheckpointConfig, ConfigError

log = logging.getLogger(__name__)

LATEST = "latest"
TAG_PATTERN = re.compile(r"^step_(\d{8})$")
TMP_PREFIX = ".tmp-"


def tag_for_step(step: int) -> str:
    return f"step_{step:08d}"


def _trainer_state_name(rank: int) -> str:
    return f"trainer_state_rank{rank}.pt"


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def _fs(url: str, storage_options: dict[str, Any] | None = None):
    import fsspec

    return fsspec.core.url_to_fs(url, **(storage_options or {}))


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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


class CheckpointManager:
    """Saves and restores checkpoints of one run; every rank calls `save` and `load` together."""

    def __init__(self, cfg: CheckpointConfig, run_dir: str | Path, rank: int, world_size: int):
        self.cfg = cfg
        self.url = cfg.dir or str(Path(run_dir) / "checkpoints")
        self.remote = is_remote(self.url)
        self.rank = rank
        self.world_size = world_size
        staging = Path(cfg.staging_dir or Path(run_dir) / "checkpoint-staging")
        # per rank, so that ranks sharing a node never write into each other's staging files
        self.staging = staging / f"rank{rank}"

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

    # -- save -----------------------------------------------------------------------------------
    def save(self, engine, step: int, trainer_state: dict[str, Any]) -> str:
        """Write a checkpoint of `engine` + this rank's `trainer_state`; returns its tag."""
        tag = tag_for_step(step)
        tmp_tag = TMP_PREFIX + tag
        # A run resumed at its last step saves again at that step: that checkpoint is complete and
        # `latest` names it, so rewriting it in place would only open a window where a crash loses it.
        if distributed.broadcast_object(self.latest_tag() == tag if self.rank == 0 else None):
            return tag
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
                shutil.rmtree(root / tmp_tag, ignore_errors=True)
            distributed.barrier()
            engine.save_checkpoint(str(root), tag=tmp_tag, save_latest=False)
            torch.save(trainer_state, root / tmp_tag / _trainer_state_name(self.rank))
            distributed.barrier()  # every rank's files are in the temp dir
            if self.rank == 0:
                shutil.rmtree(root / tag, ignore_errors=True)
                os.replace(root / tmp_tag, root / tag)
        distributed.barrier()
        if self.rank == 0:
            self._write_latest(tag)
            self._prune()
        distributed.barrier()
        return tag

    def _upload(self, local_dir: Path, tag: str) -> None:
        fs, base = self._fs(self._join(tag))
        for path in sorted(local_dir.rglob("*")):
            if path.is_file():
                relative = path.relative_to(local_dir).as_posix()
                fs.put_file(str(path), f"{base.rstrip('/')}/{relative}")

    def _write_latest(self, tag: str) -> None:
        if self.remote:
            fs, path = self._fs(self._join(LATEST))
            fs.pipe_file(path, tag.encode())
            return
        root = Path(self.url)
        fd, tmp = tempfile.mkstemp(dir=root, prefix=TMP_PREFIX + LATEST)
        with os.fdopen(fd, "w") as handle:
            handle.write(tag)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, root / LATEST)

    def _remove(self, tag: str) -> None:
        if self.remote:
            fs, path = self._fs(self._join(tag))
            if fs.exists(path):
                fs.rm(path, recursive=True)
        else:
            shutil.rmtree(Path(self.url) / tag, ignore_errors=True)

    def _prune(self) -> None:
        """Keep the newest `keep_last` complete checkpoints; drop older ones and unfinished saves."""
        latest = self.latest_tag()
        tags = self.tags()
        # tags sort by step; anything after `latest` was never committed (a save cut short)
        complete = [tag for tag in tags if latest is not None and tag <= latest]
        unfinished = [tag for tag in tags if latest is None or tag > latest]
        for tag in complete[:-self.cfg.keep_last]:
            self._remove(tag)
            log.info("checkpoint: removed old %s (keep_last=%d)", tag, self.cfg.keep_last)
        for tag in unfinished:
            self._remove(tag)
            log.warning("checkpoint: removed %s, left unfinished by an interrupted save", tag)
        if not self.remote:
            for stale in Path(self.url).glob(TMP_PREFIX + "*"):
                if stale.is_dir():
                    shutil.rmtree(stale, ignore_errors=True)
                else:
                    stale.unlink(missing_ok=True)

    # -- load -----------------------------------------------------------------------------------
    def download(self, tag: str, local_root: str | Path, root: str | None = None) -> str:
        """Copy checkpoint `tag` of the remote directory `root` (default: ours) to `local_root/tag`;
        returns `local_root`, the directory DeepSpeed loads from."""
        root = (root or self.url).rstrip("/")
        fs, base = self._fs(f"{root}/{tag}")
        if not fs.exists(base):
            raise FileNotFoundError(f"checkpoint '{root}/{tag}' does not exist")
        destination = Path(local_root) / tag
        files = [path for path in fs.find(base) if not path.endswith("/")]
        for remote_path in files:
            local_path = destination / remote_path[len(base.rstrip("/")) + 1:]
            local_path.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(remote_path, str(local_path))
        if not files:
            raise FileNotFoundError(f"checkpoint '{root}/{tag}' is empty")
        return str(local_root)

    def resolve(self, resume: str) -> str | None:
        """train.resume -> the checkpoint path or tag to load, or None for a fresh start."""
        if resume == "none":
            return None
        if resume == "auto":
            return self.latest_tag()
        return resume

    def load(self, engine, tag_or_path: str) -> dict[str, Any]:
        """Restore engine + this rank's trainer state from a tag in our directory or a tag directory path."""
        if "/" in tag_or_path:
            root, tag = tag_or_path.rstrip("/").rsplit("/", 1)
        else:
            root, tag = self.url, tag_or_path
        if is_remote(root):
            local_root = self.staging / "download"
            shutil.rmtree(local_root, ignore_errors=True)
            root = self.download(tag, local_root, root=root)
        state_path = Path(root) / tag / _trainer_state_name(self.rank)
        if not state_path.is_file():
            raise FileNotFoundError(f"checkpoint '{Path(root) / tag}' has no {state_path.name}")
        trainer_state = torch.load(state_path, map_location="cpu", weights_only=False)
        saved_world = trainer_state.get("world_size")
        if saved_world != self.world_size:
            raise ConfigError(
                f"checkpoint '{tag}' was written by {saved_world} ranks but this run has {self.world_size}: "
                "resume with the same world size (changing it needs DeepSpeed's universal checkpoint conversion, "
                "ds_to_universal.py)"
            )
        load_path, _ = engine.load_checkpoint(
            root, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if load_path is None:
            raise FileNotFoundError(f"DeepSpeed could not load checkpoint '{root}/{tag}'")
        return trainer_state


# -- export ---------------------------------------------------------------------------------------
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


def load_model_from_run(run_dir: str | Path, tag: str | None = None):
    """(ContrastiveModel on CPU in eval mode, RunConfig) from a run directory's latest checkpoint, or the
    one named by `tag`; the checkpoint may be local or remote (checkpoint.dir in the run's config.yaml)
    and of any ZeRO stage: the weights are consolidated to fp32."""
    import dataclasses

    from pipeline.config import RunConfig, load_config
    from pipeline.models import build_model

    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"'{run_dir}' is not a run directory: it has no config.yaml")
    cfg = load_config(RunConfig, config_path)
    manager = CheckpointManager(cfg.checkpoint, run_dir, rank=0, world_size=1)
    tag = tag or manager.latest_tag()
    if tag is None:
        raise FileNotFoundError(f"no checkpoint under '{manager.url}' (no '{LATEST}' file): train longer")
    with tempfile.TemporaryDirectory() as scratch:
        root = manager.download(tag, scratch) if manager.remote else manager.url
        weights = consolidated_state_dict(root, tag)
    # the checkpoint holds every weight: no need to read model.pretrained (which may no longer exist)
    model = build_model(dataclasses.replace(cfg.model, pretrained=""))
    model.load_state_dict(weights)
    model.eval()
    return model, cfg


def export(run_dir: str | Path, out_path: str | Path, tag: str | None = None) -> Path:
    """Write `model.open_clip_state_dict()` of a run's latest (or given) checkpoint to `out_path`."""
    model, _ = load_model_from_run(run_dir, tag)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.open_clip_state_dict(), out_path)
    return out_path


def _export_command(args: argparse.Namespace) -> int:
    path = export(args.run_dir, args.out, tag=args.tag)
    print(f"exported {args.run_dir} -> {path}")
    return 0


def register_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "export", help="write a run's weights as an open_clip state dict",
        description="Consolidate a run's latest DeepSpeed checkpoint (any ZeRO stage) into a state dict that "
        "open_clip.create_model_and_transforms(name, pretrained=OUT) loads.",
    )
    parser.add_argument("run_dir", help="run directory (holds config.yaml and checkpoints)")
    parser.add_argument("out", help="output .pt path")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: the latest)")
    parser.set_defaults(func=_export_command)
