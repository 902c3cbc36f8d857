"""The training progress: a bar on a terminal, one plain line per log step anywhere else (a log file)."""

from __future__ import annotations

import io
import re

from pipeline.observe.progress import StepProgress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _run(stream, enabled: bool = True, initial: int = 0) -> str:
    progress = StepProgress(total=20, initial=initial, enabled=enabled, stream=stream)
    for step in range(initial + 1, 21):
        if step % 5 == 0:
            progress.log(step, 2.0 - step / 100, 96.5 if step > 5 else None)
        progress.update()
        if step == 12:
            progress.write("epoch 1 of data.mixture mix.yaml: ...")
    progress.close()
    return stream.getvalue()


def test_a_log_file_gets_one_line_per_log_step_and_no_carriage_return():
    text = _run(io.StringIO())
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) == 5  # 4 log steps and the message, nothing else
    assert re.fullmatch(r"step 5/20 \(25%\): loss 1\.9500, - samples/s; 0:00:00 elapsed, about 0:00:00 left",
                        lines[0]), lines[0]
    assert lines[2] == "epoch 1 of data.mixture mix.yaml: ..."
    assert lines[-1].startswith("step 20/20 (100%): loss 1.8000, 96.5 samples/s; ") and "left" not in lines[-1]


def test_a_resumed_run_counts_its_steps_from_where_it_resumed():
    lines = _run(io.StringIO(), initial=10).splitlines()
    assert [line.split(":")[0] for line in lines if line.startswith("step")] == ["step 15/20 (75%)", "step 20/20 (100%)"]


def test_a_terminal_gets_the_bar_with_the_last_log_step_on_it():
    text = _run(_Terminal())
    assert "\r" in text and "20/20" in text and "loss=1.8000" in text and "samples_s=96.5" in text
    assert "epoch 1 of data.mixture mix.yaml: ..." in text
    assert not any(line.startswith("step ") for line in text.splitlines())


def test_other_ranks_print_nothing():
    assert _run(io.StringIO(), enabled=False) == "" and _run(_Terminal(), enabled=False) == ""
