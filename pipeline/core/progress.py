"""Progress bars that also read well in a log file.

tqdm redraws its bar with carriage returns: on a terminal that is one line updating in place, but in a file
(a SLURM job's output, `nohup`, CI) every redraw piles onto one line that grows for as long as the work lasts.
`progress_bar` is tqdm on a terminal; elsewhere the same bar is written as a whole line at most every
`LOG_INTERVAL_S` seconds (and once at the end), e.g. for a shard build:

    building pets:  40%|████      | 400000/1000000 [05:02<07:33, 1322.05sample/s]

The training loop's progress (pipeline.observe.progress) prints its own line per log step instead.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

from tqdm import tqdm

LOG_INTERVAL_S = 30.0  # between two lines of a bar in a log file


class _Lines:
    """A stream that receives tqdm's redraws and writes each as a line of its own (carriage returns dropped;
    a redraw that only clears the line, as a bar with leave=False does on close, writes nothing)."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip()
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(iterable: Any = None, *, file: TextIO | None = None, **kwargs: Any) -> tqdm:
    """tqdm(iterable, **kwargs) on `file` (default stderr): as is on a terminal, as lines in a log file."""
    stream = file or sys.stderr
    if stream.isatty():
        return tqdm(iterable, file=stream, **kwargs)
    kwargs["mininterval"] = max(kwargs.get("mininterval", 0.1), LOG_INTERVAL_S)
    return tqdm(iterable, file=_Lines(stream), ncols=100, **kwargs)
