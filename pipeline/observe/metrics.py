"""Training and evaluation metrics: `run_dir/metrics.jsonl` plus TensorBoard scalars.

    logger = MetricsLogger(run_dir, enabled=(rank == 0), resume_step=state.step)  # resume_step: None on a fresh run
    logger.log({"step": 10, "epoch": 0, "samples_seen": 640, "loss": 3.2, "lr": 1e-3, ...})
    logger.log({"kind": "eval", "step": 10, "zero_shot_top1": 0.41, "media_to_text_R@1": 0.12, ...})
    logger.close()
    records = read_metrics(run_dir / "metrics.jsonl")

Record format (one JSON object per line, flushed and fsync'd on every `log`, so a crash loses
at most the line being written):
- every record has an integer `step` and a `kind`: `"train"` (the default when a record omits it),
  `"eval"`, or `"compile"` (once, `first_steps_s`: the wall time of the first steps, which compile
  under train.compile); the kind keeps the kinds of record apart without prefixing every key;
- train records: `step`, `epoch`, `samples_seen`, `loss`, `lr`, `logit_scale`, `samples_per_s`, ...;
- eval records: the flat dict `pipeline.eval.evaluate.evaluate` returns (`media_to_text_R@1`,
  `chance_R@1`, `zero_shot_top1`, ...), plus `step`;
- a `time` field (Unix seconds) is added when the record has none.
TensorBoard gets every numeric value as the scalar `{kind}/{key}` at `step`.

Resume: a crashed run may have logged steps after its last checkpoint. On resume the trainer
passes `resume_step`: records with a larger step are dropped from metrics.jsonl
(`truncate_after`) and TensorBoard purges its events after that step. Readers that meet a file
written without that (steps going backwards within a kind) keep only the latest run's records
with `drop_superseded`, which `read_metrics` applies by default.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import tempfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
KINDS = ("train", "eval", "compile")


def _plain(value: Any) -> Any:
    """0-dim tensors and numpy scalars -> Python numbers, so that records serialise as JSON."""
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        return value.item()
    return value


class MetricsLogger:
    """Appends records to `run_dir/metrics.jsonl` and TensorBoard; a no-op when not `enabled`
    (every rank can call it; only rank 0 writes)."""

    def __init__(self, run_dir: str | os.PathLike, enabled: bool = True, resume_step: int | None = None,
                 tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.path = self.run_dir / METRICS_FILE
        self._file = None
        self._writer = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            dropped = truncate_after(self.path, resume_step)
            if dropped:
                log.info("metrics: dropped %d records after resumed step %d from %s", dropped, resume_step, self.path)
        self._file = open(self.path, "a", encoding="utf-8")
        if self._file.tell() > 0 and not _ends_with_newline(self.path):
            # a crash mid-write left a partial line: end it, or our first record would be glued to it
            self._file.write("\n")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides events a crashed run wrote after the checkpoint we resume from
            purge_step = resume_step + 1 if resume_step is not None else None
            self._writer = SummaryWriter(log_dir=str(self.run_dir), purge_step=purge_step)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self._file is None:
            raise RuntimeError(f"MetricsLogger for {self.path} is closed")
        if "step" not in record:
            raise ValueError(f"metrics record has no 'step': {sorted(record)}")
        record = {key: _plain(value) for key, value in record.items()}
        record.setdefault("kind", "train")
        if record["kind"] not in KINDS:
            raise ValueError(f"metrics record kind must be one of {KINDS}, got {record['kind']!r}")
        record.setdefault("time", time.time())
        step = int(record["step"])
        self._file.write(json.dumps(record) + "\n")
        # flush + fsync: the line is on disk even if the process is killed right after
        self._file.flush()
        os.fsync(self._file.fileno())
        if self._writer is not None:
            for key, value in record.items():
                if key in ("step", "kind", "time") or isinstance(value, bool):
                    continue
                if isinstance(value, numbers.Real):
                    self._writer.add_scalar(f"{record['kind']}/{key}", float(value), global_step=step)
            self._writer.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as handle:
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) == b"\n"


def _read_lines(path: Path) -> list[dict[str, Any]]:
    records, bad = [], 0
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if not isinstance(record, dict) or not isinstance(record.get("step"), numbers.Real):
                # a run killed mid-write leaves a partial last line; skip it rather than lose the file
                bad += 1
                log.warning("metrics: skipping unreadable line %d of %s", number, path)
                continue
            record.setdefault("kind", "train")
            records.append(record)
    if bad:
        log.warning("metrics: skipped %d unreadable lines in %s", bad, path)
    return records


def drop_superseded(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep only the latest run's records: when the step goes back (or repeats) within a kind, a
    resumed run restarted there, so earlier records of that kind at or after that step are stale."""
    kept: list[dict[str, Any]] = []
    last_step: dict[str, float] = {}
    for record in records:
        kind, step = record.get("kind", "train"), record["step"]
        if kind in last_step and step <= last_step[kind]:
            kept = [r for r in kept if r.get("kind", "train") != kind or r["step"] < step]
        last_step[kind] = step
        kept.append(record)
    return kept


def read_metrics(path: str | os.PathLike, latest_only: bool = True) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl (a run directory works too), in file order. Unreadable lines are
    skipped and logged; with `latest_only`, records superseded by a resume are dropped."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"metrics file '{path}' does not exist")
    records = _read_lines(path)
    return drop_superseded(records) if latest_only else records


def truncate_after(path: str | os.PathLike, step: int) -> int:
    """Drop records with step > `step` from a JSON-lines file of records with a `step` (metrics.jsonl, the
    sample-key audit), atomically: temp file + rename.
    Returns how many records were dropped; a missing file drops nothing."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        return 0
    records = _read_lines(path)
    kept = [r for r in records if r["step"] <= step]
    dropped = len(records) - len(kept)
    if dropped == 0 and _ends_with_newline(path):
        return 0  # (a last line cut short by a kill has no newline: rewritten without it)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".metrics-", suffix=".jsonl")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            for record in kept:
                handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dropped


def finite(value: Any) -> bool:
    """A real, finite number (what a plot can draw)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
