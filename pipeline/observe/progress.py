"""The training loop's progress, where the person watching it reads it.

On a terminal: a tqdm bar (steps, rate, and the last log step's loss and samples/s). Anywhere else (a SLURM
log, `nohup`, a pipe, a CI log) a bar is a stream of carriage returns that becomes one line of megabytes over
a long run, so there it is one plain line per log step instead:

    step 1,200/10,000 (12%): loss 2.5301, 95.0 samples/s; 0:03:12 elapsed, about 0:23:28 left

Elapsed time counts from the first step of this invocation; the time left is the mean time per step so far
times the steps left (the first steps, which compile, and evaluations and saves included: an estimate that
settles as the run goes on).
"""

from __future__ import annotations

import datetime
import sys
import time
from typing import TextIO

from tqdm import tqdm


def _clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


class StepProgress:
    """`update()` once per step, `log(loss, samples_per_s)` at each log step, `write(line)` for a message that
    must not be torn by the bar, `close()` at the end. `enabled` false (ranks other than 0): silent."""

    def __init__(self, total: int, initial: int, enabled: bool, stream: TextIO | None = None):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.interactive = enabled and self.stream.isatty()
        self.total, self.first = total, initial
        self.started = time.monotonic()
        self.bar = tqdm(total=total, initial=initial, disable=not self.interactive, unit="step", dynamic_ncols=True,
                        file=self.stream)

    def update(self) -> None:
        self.bar.update(1)

    def log(self, step: int, loss: float, samples_per_s: float | None) -> None:
        """The last log step's figures: on the bar, or as a line (`step` is the one just logged)."""
        speed = f"{samples_per_s:.1f}" if samples_per_s is not None else "-"
        if self.interactive:
            self.bar.set_postfix(loss=f"{loss:.4f}", samples_s=speed)
        elif self.enabled:
            elapsed = time.monotonic() - self.started
            done = step - self.first
            left = f", about {_clock(elapsed / done * (self.total - step))} left" if done > 0 and step < self.total \
                else ""
            self.write(f"step {step:,}/{self.total:,} ({100 * step / max(self.total, 1):.0f}%): loss {loss:.4f}, "
                       f"{speed} samples/s; {_clock(elapsed)} elapsed{left}")

    def write(self, line: str) -> None:
        if self.interactive:
            self.bar.write(line, file=self.stream)
        elif self.enabled:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        self.bar.close()
