"""The data benchmark harness runs end to end on a tiny set (without the open_clip venv), so it never rots."""

from __future__ import annotations

import re

from pipeline.cli import main


def test_bench_data_harness_runs_on_a_tiny_set(tmp_path, capsys):
    argv = ["bench", "data", "--samples", "96", "--batch-size", "8", "--image-size", "32", "--source-size", "64",
            "--bench-dir", str(tmp_path), "--skip-open-clip", "--repeats", "1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    ours = float(re.search(r"\(a\) ours\s*:\s*([\d.]+) samples/s", out).group(1))
    ceiling = float(re.search(r"\(c\) decode ceiling.*= +([\d.]+) samples/s", out).group(1))
    assert ours > 0 and ceiling > 0
    assert "(12 batches" in out  # 96 samples / 8 per batch
    assert re.search(r"ours / ceiling\s*: [\d.]+", out)
    # the shards are cached: a second run reuses them
    shards = sorted(p.name for p in (tmp_path / "data-96-64px").iterdir())
    assert shards == ["bench-000000.tar", "sizes.json"]
    assert main(argv) == 0
