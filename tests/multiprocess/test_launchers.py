"""A stop signal to whatever process the user started reaches every rank: the real launchers, signalled.

- `pipeline.commands.supervise` (what launch/*.sh put in front of the launcher) passes SIGTERM / SIGUSR1 / SIGINT to the
  ranks, waits, and exits 75 when they did, also where the launcher in between (torchrun) reports a rank's 75
  as its own failure; a third signal kills the job without waiting.
- A rank whose launcher is gone (deepspeed's runner dies of SIGTERM without passing it on; a supervisor killed
  outright) finishes its step, saves and stops by itself.
- Real training through launch/deepspeed_single_node.sh, through the bare `deepspeed` runner, and through
  launch/deepspeed_multi_node.sh over pdsh and ssh on loopback (two "nodes" on this machine; skipped where pdsh
  or sshd is missing, which .ci/run installs): stopped by a signal to the process the user started, every rank
  exits 75 at the same step, nothing of the job is left running, and the resumed run's losses equal an
  uninterrupted run's (fp32 on the CPU: exactly).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from pipeline.core.errors import PREEMPTED_EXIT_CODE
from pipeline.train.preemption import launcher_name

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = str(Path(sys.executable).parent)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "PYTHONPATH": str(REPO),
            "DS_ACCELERATOR": "cpu", "PYTHON": sys.executable, **extra}


def _job_processes(marker: str) -> list[psutil.Process]:
    """Every process whose command line names `marker` (a run's unique output directory or script)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if process.pid != os.getpid() and any(marker in arg for arg in process.info["cmdline"] or ()):
            found.append(process)
    return found


def _wait_gone(marker: str, timeout: float = 60.0) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while (left := _job_processes(marker)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def test_launchers_are_known_by_their_command_lines():
    python = sys.executable
    assert launcher_name([python, "-u", "-m", "deepspeed.launcher.launch", "--world_info=e30="]) == \
        "deepspeed.launcher.launch"
    assert launcher_name([python, f"{VENV_BIN}/deepspeed", "--num_gpus", "2"]) == "deepspeed"
    assert launcher_name([f"{VENV_BIN}/torchrun", "--standalone"]) == "torchrun"
    assert launcher_name([python, "-m", "pipeline.commands.supervise", "--", "deepspeed"]) == "pipeline.commands.supervise"
    assert launcher_name([python, "-u", "-m", "pipeline", "train", "--config", "deepspeed.yaml"]) is None
    assert launcher_name(["/bin/bash", "launch/deepspeed_single_node.sh"]) is None


# -- the supervisor and the launcher watch, with small rank programs -------------------------------------------
RANK_LOOP = textwrap.dedent("""
    import os, sys, time
    import torch.distributed as dist
    from pipeline.core.errors import write_exit_status
    from pipeline.train.preemption import StopSignals

    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo")
    stop = StopSignals(watch_interval_s=0.2).install()
    print(f"rank {os.environ.get('RANK', '-')} pid {os.getpid()} started", flush=True)
    step = 0
    while True:
        time.sleep(0.1)  # the step's work
        step += 1
        check = stop.poll()
        if check.stop:
            print(f"rank {os.environ.get('RANK', '-')} stopped after step {step} ({check.reason})", flush=True)
            stop.stopping()
            write_exit_status(75)  # what `python -m pipeline` does for the supervisor
            sys.exit(75)
""")


def _started(log: Path, count: int, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while log.read_text().count(" started") < count:
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)
    time.sleep(0.5)  # a few steps


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_supervisor_passes_the_signal_to_torchrun_ranks_and_exits_75(tmp_path, signum):
    script = tmp_path / "rank_loop.py"
    script.write_text(RANK_LOOP)
    log = tmp_path / "log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "pipeline.commands.supervise", "--", f"{VENV_BIN}/torchrun", "--standalone",
             "--nproc_per_node", "2", str(script)], cwd=REPO, env=_env(), stdout=out, stderr=subprocess.STDOUT)
    try:
        _started(log, 2, process)
        process.send_signal(signum)
        assert process.wait(timeout=120) == PREEMPTED_EXIT_CODE, log.read_text()
    finally:
        process.kill()
    text = log.read_text()
    # both ranks, at the same step (they agree at the poll); their lines may share a line of the log
    stopped = dict(re.findall(r"rank (\d) stopped after step (\d+)", text))
    assert sorted(stopped) == ["0", "1"] and stopped["0"] == stopped["1"], text
    assert f"{signum.name}: passed to the ranks" in text
    # torchrun itself reports the ranks' 75 as a failure; the supervisor reads each rank's own status
    assert text.count(" exited 75") == 2 and "the launcher exited 1;" in text, text
    assert not _wait_gone(str(script), timeout=10)


def test_third_signal_kills_the_job_without_waiting(tmp_path):
    script = tmp_path / "stubborn.py"
    script.write_text("import os, signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                      "print('rank', os.environ['RANK'], 'started', flush=True)\ntime.sleep(600)\n")
    log = tmp_path / "log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "pipeline.commands.supervise", "--grace-s", "300", "--", f"{VENV_BIN}/torchrun",
             "--standalone", "--nproc_per_node", "2", str(script)], cwd=REPO, env=_env(), stdout=out,
            stderr=subprocess.STDOUT)
    try:
        _started(log, 2, process)
        for _ in range(3):
            process.send_signal(signal.SIGTERM)
            time.sleep(0.5)
        status = process.wait(timeout=60)
    finally:
        process.kill()
    assert status != 0 and "killing the job without a save" in log.read_text(), log.read_text()
    assert not _wait_gone(str(script), timeout=10)


def test_rank_stops_and_saves_when_its_launcher_is_killed_outright(tmp_path):
    script = tmp_path / "rank_loop.py"
    script.write_text(RANK_LOOP)
    log = tmp_path / "log"
    with log.open("w") as out:
        supervisor = subprocess.Popen([sys.executable, "-m", "pipeline.commands.supervise", "--", sys.executable, str(script)],
                                      cwd=REPO, env=_env(RANK="0"), stdout=out, stderr=subprocess.STDOUT)
    try:
        _started(log, 1, supervisor)
        supervisor.kill()  # SIGKILL: nothing can be passed on; the orphaned rank must notice by itself
        supervisor.wait()
        assert not _wait_gone(str(script), timeout=30), log.read_text()
    finally:
        supervisor.kill()
    assert f"(its launcher pipeline.commands.supervise (pid {supervisor.pid}) is gone)" in log.read_text(), log.read_text()


# -- real training through the deepspeed launcher ---------------------------------------------------------------
STEPS = 16  # the signal goes after step 3: the runs stop well before their end, and resume to it


def _train_args(shards: Path, out: Path, *extra: str) -> list[str]:
    return [
        "model.name=tiny-clip", f"data.train_urls={shards}", "data.val_urls=", "data.workers=1",
        "data.shuffle_buffer=16", f"train.output_dir={out}", "train.name=run", "train.global_batch_size=8",
        f"train.steps={STEPS}", "train.log_every=1", "train.precision=fp32", "optim.warmup_steps=1",
        "checkpoint.every_steps=0", "eval.every_steps=0", *extra,
    ]


def _losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r.get("kind") == "train"}


def _run(command: list[str], log: Path, env: dict[str, str], signal_after_step: int | None = None,
         signum: signal.Signals = signal.SIGTERM, out: Path | None = None) -> int:
    """Start `command`; when `signal_after_step`, send `signum` to it once that step is logged; its status."""
    with log.open("a") as stream:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=stream, stderr=subprocess.STDOUT)
    try:
        if signal_after_step is not None:
            metrics, deadline = out / "run" / "metrics.jsonl", time.monotonic() + 300
            while not metrics.is_file() or f'"step": {signal_after_step},' not in metrics.read_text():
                assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.05)
            process.send_signal(signum)
        return process.wait(timeout=300)
    finally:
        process.kill()


def _stopped_step(log: Path) -> int:
    lines = [line for line in log.read_text().splitlines() if "stopped at step" in line]
    assert lines, log.read_text()[-3000:]
    return int(lines[-1].split("stopped at step")[1].split()[0])


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory) -> dict[int, float]:
    """The uninterrupted run: 2 ranks through the single-node launch script."""
    out = tmp_path_factory.mktemp("reference")
    log = out / "log"
    command = ["bash", "launch/deepspeed_single_node.sh", "2", "configs/demo-clip.yaml", *_train_args(shards, out)]
    assert _run(command, log, _env(MASTER_PORT=str(_free_port()))) == 0, log.read_text()[-3000:]
    return _losses(out)


@pytest.mark.slow
def test_sigterm_to_the_single_node_script_stops_every_rank_and_resumes_exactly(shards, reference, tmp_path):
    out, log = tmp_path / "out", tmp_path / "log"
    command = ["bash", "launch/deepspeed_single_node.sh", "2", "configs/demo-clip.yaml", *_train_args(shards, out)]
    env = _env(MASTER_PORT=str(_free_port()))
    status = _run(command, log, env, signal_after_step=3, out=out)
    text = log.read_text()
    assert status == PREEMPTED_EXIT_CODE, text[-3000:]
    step = _stopped_step(log)
    assert 3 <= step < STEPS and (out / "run" / "checkpoints" / "latest").read_text() == f"step_{step:08d}"
    # the launcher and each rank: 75 (deepspeed's launch.py, then its runner, pass the first rank's 75 on)
    summary = next(line for line in text.splitlines() if line.startswith("supervise: the launcher exited"))
    assert summary.startswith("supervise: the launcher exited 75;") and summary.count("exited 75") == 3, summary
    assert "Traceback" not in text
    assert not _wait_gone(str(out), timeout=5)  # nothing of the job outlives the supervisor

    assert _run(command + ["train.resume=auto"], log, env) == 0, log.read_text()[-3000:]
    assert _losses(out) == reference


@pytest.mark.slow
def test_sigusr1_to_the_bare_deepspeed_runner_still_stops_and_saves(shards, reference, tmp_path):
    """Without the supervisor: deepspeed's runner dies of the signal at once (its own code), and the ranks,
    seeing it gone, finish their step, save and exit; launch.py follows them."""
    out, log = tmp_path / "out", tmp_path / "log"
    port = str(_free_port())
    command = [f"{VENV_BIN}/deepspeed", "--num_gpus", "2", "--master_port", port, "--no_local_rank", "--module",
               "pipeline", "train", "--config", "configs/demo-clip.yaml", *_train_args(shards, out)]
    status = _run(command, log, _env(MASTER_PORT=port), signal_after_step=3, signum=signal.SIGUSR1, out=out)
    assert status == -signal.SIGUSR1  # the runner: killed by the signal, as before; what matters is the ranks
    assert not _wait_gone(str(out), timeout=60), log.read_text()[-3000:]
    step = _stopped_step(log)
    assert "its launcher deepspeed" in log.read_text() or "another rank was told to stop" in log.read_text()
    assert (out / "run" / "checkpoints" / "latest").read_text() == f"step_{step:08d}"
    assert "exits with return code = 75" in log.read_text()  # launch.py saw the ranks exit 75

    resume = ["bash", "launch/deepspeed_single_node.sh", "2", "configs/demo-clip.yaml",
              *_train_args(shards, out, "train.resume=auto")]
    assert _run(resume, log, _env(MASTER_PORT=str(_free_port()))) == 0, log.read_text()[-3000:]
    assert _losses(out) == reference


# -- two "nodes" on loopback: pdsh over ssh to localhost and 127.0.0.1 ------------------------------------------
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


@pytest.fixture
def loopback_ssh(tmp_path):
    """An sshd on a free loopback port that lets this user in with a key made here; its client options."""
    if not shutil.which("pdsh") or not os.access(SSHD, os.X_OK):
        pytest.skip("needs pdsh and sshd (.ci/run installs Debian's pdsh and openssh-server)")
    keys = tmp_path / "ssh"
    keys.mkdir()
    for name in ("host", "user"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / name)], check=True)
    shutil.copy(keys / "user.pub", keys / "authorized_keys")
    port = _free_port()
    (keys / "sshd_config").write_text(textwrap.dedent(f"""\
        Port {port}
        ListenAddress 127.0.0.1
        HostKey {keys / 'host'}
        AuthorizedKeysFile {keys / 'authorized_keys'}
        PasswordAuthentication no
        KbdInteractiveAuthentication no
        PermitRootLogin prohibit-password
        StrictModes no
        UsePAM no
        PidFile {keys / 'sshd.pid'}
    """))
    Path("/run/sshd").mkdir(exist_ok=True) if os.geteuid() == 0 else None  # privilege separation directory
    sshd = subprocess.Popen([SSHD, "-D", "-e", "-f", str(keys / "sshd_config")], stderr=subprocess.DEVNULL)
    client = f"-i {keys / 'user'} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR"
    deadline = time.monotonic() + 30
    while subprocess.run(["ssh", "-p", str(port), *client.split(), "127.0.0.1", "true"],
                         capture_output=True).returncode != 0:
        assert sshd.poll() is None and time.monotonic() < deadline, "sshd did not start"
        time.sleep(0.2)
    yield {"DEEPSPEED_ARGS": f"--ssh_port {port} --no_ssh_check", "PDSH_SSH_ARGS_APPEND": client}
    sshd.terminate()
    sshd.wait()


@pytest.mark.slow
def test_sigterm_to_the_multi_node_script_over_pdsh_stops_every_node_and_resumes_exactly(
        shards, reference, tmp_path, loopback_ssh):
    out, log = tmp_path / "out", tmp_path / "log"
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")  # two nodes of one rank each
    command = ["bash", "launch/deepspeed_multi_node.sh", str(hostfile), "configs/demo-clip.yaml",
               *_train_args(shards, out)]
    env = _env(MASTER_PORT=str(_free_port()), **loopback_ssh)
    status = _run(command, log, env, signal_after_step=3, out=out)
    text = log.read_text()
    assert status == PREEMPTED_EXIT_CODE, text[-3000:]  # pdsh -S, the runner and the supervisor: 75
    assert text.count("exits with return code = 75") == 2, text[-3000:]  # launch.py on each node
    step = _stopped_step(log)
    assert (out / "run" / "checkpoints" / "latest").read_text() == f"step_{step:08d}"
    assert not _wait_gone(str(out), timeout=10)

    assert _run(command + ["train.resume=auto"], log, env) == 0, log.read_text()[-3000:]
    # the same batches and the same arithmetic, except the all-reduce: deepspeed's shared-memory one within a
    # node in the reference, gloo across the two "nodes" here (measured: 1.1e-7 relative at most over 16 steps; 4.7e-7 over 40)
    resumed = _losses(out)
    assert resumed.keys() == reference.keys()
    difference = max(abs(resumed[k] - reference[k]) / abs(reference[k]) for k in reference)
    print(f"largest relative loss difference, 2 nodes over pdsh vs 1 node: {difference:.1e}")
    assert difference < 1e-5
