"""progress_bar: tqdm on a terminal; in a log file whole lines, at most one per LOG_INTERVAL_S and the last."""

from __future__ import annotations

import io

from pipeline.core import progress
from pipeline.core.progress import progress_bar


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_file_gets_whole_lines_and_the_final_count():
    stream = io.StringIO()
    bar = progress_bar(total=1000, desc="building pets", unit="sample", file=stream)
    for _ in range(1000):  # well inside LOG_INTERVAL_S: only the opening and the final line
        bar.update(1)
    bar.close()
    text = stream.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) == 2 and lines[0].startswith("building pets:   0%") and "1000/1000" in lines[1], lines


def test_a_log_file_gets_a_line_per_interval(monkeypatch):
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.0)
    stream = io.StringIO()
    for _ in progress_bar(range(5), desc="verifying", unit="shard", file=stream, mininterval=0, miniters=1):
        pass
    lines = stream.getvalue().splitlines()
    counts = [line.split("|")[-1].split()[0] for line in lines]  # the last one again on close
    assert list(dict.fromkeys(counts)) == ["0/5", "1/5", "2/5", "3/5", "4/5", "5/5"], lines


def test_a_terminal_gets_tqdms_bar():
    stream = _Terminal()
    for _ in progress_bar(range(3), desc="verifying", file=stream):
        pass
    assert "\r" in stream.getvalue() and "3/3" in stream.getvalue()


def test_a_disabled_bar_writes_nothing():
    stream = io.StringIO()
    for _ in progress_bar(range(3), desc="verifying", disable=True, file=stream):
        pass
    assert stream.getvalue() == ""
