"""`bench plan` runs end to end at its small size (2k shards of ~10k samples, a small layout), so it never rots:
the table has every step's row and the loader state's, the results file holds the figures, the state is
within its 1 MB target, and the elastic resume planned the same canonical streams (the command checks it)."""

from __future__ import annotations

import json

from pipeline.bench.plan import STEPS, TARGET_STATE_BYTES
from pipeline.cli import main


def test_bench_plan_prints_every_row_and_a_small_state(tmp_path, capsys):
    results = tmp_path / "bench-plan.json"
    # 64 ranks x 8 workers over 512 canonical streams: one stream of ~39k samples per worker, two after the
    # elastic resume on 32 ranks
    argv = ["bench", "plan", "--shards", "2000", "--ranks", "64", "--workers", "8", "--canonical", "512",
            "--global-batch", "4096", "--elastic-ranks", "32", "--repeat", "1", "--json", str(results)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.lstrip().startswith("2,000 ")]
    assert [" ".join(row[2:-8]) for row in rows[:len(STEPS)]] == list(STEPS)
    assert len(rows) == len(STEPS) + 1 and rows[-1][2] == "state/rank"
    for row in rows[:len(STEPS)]:
        assert float(row[-8]) >= 0 and float(row[-5]) > 0  # seconds, traced MiB
    pickled = int(rows[-1][3].replace(",", ""))
    assert 0 < pickled <= TARGET_STATE_BYTES
    assert f"loader state within {TARGET_STATE_BYTES:,} B at every size" in out

    saved = json.loads(results.read_text())
    (row,) = saved["rows"]
    assert row["shards"] == 2000 and 2000 * 9500 <= row["samples"] <= 2000 * 10500
    assert set(row["steps"]) == set(STEPS)
    assert row["streams_per_worker"] == 1 and row["elastic_streams_per_worker"] == 2
    assert row["state"]["pickle_bytes"] == pickled
    assert 0 < row["state"]["torch_save_bytes"] <= TARGET_STATE_BYTES
    state = row["state"]["state"]
    assert state["canonical_streams"] == 512 and state["stream_position"] > 0
    # halfway through the epoch on both layouts: a step takes global batch / canonical samples of each stream
    # on either (half the ranks, twice the micro-batch)
    assert row["elastic_position_steps"] == row["loader_steps"] // 2 == state["stream_position"] // 8
