"""The README's commands run as printed, in the order shown.

Every command of the README's ```bash blocks is listed in PLAN: run here (shortened only where the README's
own text says how), or not run, with the reason (a placeholder for the user's own data or bucket, or longer
than a minute on the CPU: `make demo` and `make test` are what CI runs). A command added to the README without
an entry here fails the test, so the list cannot fall behind.

They run in a scratch directory laid out like a fresh clone after `make demo` (the configs, the venv, the
embedded shapes shards built by the shard builder and the demo's run directory), so that the README's
order is what is checked: a training example that collides with the demo's run directory would fail here.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RUN = "run"

# a piece of each README command -> RUN (with what the README says to add), or why it is not run here
PLAN: dict[str, tuple[str, str]] = {
    "make demo": ("skip", "2-5 minutes; CI runs it through `make test`'s demo tests and the session checks"),
    "make test": ("skip", "the test suite itself"),
    "--source folder --input /data/pets": ("skip", "a placeholder for the user's own folder"),
    "--source manifest --input pairs.parquet": ("skip", "a placeholder for the user's own manifest and bucket"),
    "shards verify s3://my-bucket": ("skip", "a placeholder bucket (tests/shards/test_shards_s3.py verifies on S3)"),
    "shards ls shards/shapes/val --limit 3": (RUN, ""),
    "shards ls shards/shapes/val --json": (RUN, ""),
    "shards index s3://my-bucket": ("skip", "a placeholder bucket (tests/data/test_startup_requests.py indexes on S3)"),
    "train --config configs/demo-clip.yaml train.name=my-clip": (RUN, "train.steps=20"),
    "--dry-run --world-size 8": (RUN, ""),
}


def readme_commands() -> list[str]:
    """Each command of the README's bash blocks: continuation lines joined, comments and blank lines dropped."""
    text = (REPO / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def plan_of(command: str) -> tuple[str, str]:
    matches = [piece for piece in PLAN if piece in command]
    assert len(matches) == 1, f"README command without exactly one entry in tests/multiprocess/test_readme.py PLAN: {command!r}"
    return PLAN[matches[0]]


def test_every_readme_command_has_a_plan():
    commands = readme_commands()
    assert len(commands) >= len(PLAN)
    used = {piece for command in commands for piece in PLAN if piece in command}
    assert used == set(PLAN), f"PLAN entries no README command matches: {set(PLAN) - used}"
    for command in commands:
        plan_of(command)


@pytest.fixture(scope="module")
def after_demo(tmp_path_factory) -> Path:
    """A scratch directory as a fresh clone is after `make demo`: configs, .venv, the shapes shards, a demo run."""
    from pipeline.shards.build import build_shards
    from pipeline.shards.config import BuildConfig

    root = tmp_path_factory.mktemp("clone")
    shutil.copytree(REPO / "configs", root / "configs")
    (root / ".venv").symlink_to(Path(sys.prefix))
    # the demo's val split as `make demo` builds it; a fifth of its train split (2,000 samples: the README's
    # training example reads 20 x 128 of them)
    for split, count in (("train", 2000), ("val", None)):
        build_shards(BuildConfig(source="shapes", split=split, output=str(root / "shards" / "shapes" / split),
                                 count=count), progress=False)
    # the demo's run directory holds checkpoints: the README's own training example must not collide with it
    (root / "runs" / "demo-clip" / "checkpoints" / "step_00000300").mkdir(parents=True)
    (root / "runs" / "demo-clip" / "checkpoints" / "latest").write_text("step_00000300")
    return root


@pytest.mark.slow
def test_readme_commands_run_as_printed_in_order(after_demo):
    env = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu"}
    ran = 0
    for command in readme_commands():
        how, extra = plan_of(command)
        if how != RUN:
            continue
        if "| jq" in command and not shutil.which("jq"):
            continue
        if extra:  # what the README's text says to add for a first look
            command = command.replace(" | ", f" {extra} | ", 1) if " | " in command else f"{command} {extra}"
        result = subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=after_demo, env=env,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        assert "error:" not in result.stderr, f"{command}\n{result.stderr[-3000:]}"
        ran += 1
    assert ran >= 3
    assert (after_demo / "runs" / "my-clip" / "curves.png").is_file()  # the training example made its run
