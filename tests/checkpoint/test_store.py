"""The checkpoint stores on their own (pipeline.checkpoint.store), without DeepSpeed: a failed local save leaves
no partial tag and `latest` as it was; keep-last-K keeps the newest complete checkpoints the run owns, removes
its own unfinished saves and leaves the rest alone; a remote save uploads each rank's trainer state last, so
an interrupted upload is never complete; a remote tag downloads whole.

Remote stores run against fsspec's memory file system and the moto S3 server the other checkpoint tests use
(tests/conftest.py), one process, world size 1 (no process group: the barriers are no-ops).
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import pytest
import torch

from pipeline.checkpoint import store as store_module
from pipeline.checkpoint.layout import LATEST, TMP_PREFIX, tag_for_step, trainer_state_name
from pipeline.checkpoint.store import LocalStore, RemoteStore, open_store
from pipeline.core.storage import url_to_fs
from tests.s3_server import uploads_cut_after_first_file

MODEL_STATES = "mp_rank_00_model_states.pt"


def _write(root: Path, name: str) -> None:
    """What a ZeRO-0 save of one rank writes: DeepSpeed's model states, then the trainer state."""
    (root / name).mkdir(parents=True, exist_ok=True)
    torch.save({"module": {}}, root / name / MODEL_STATES)
    torch.save({"world_size": 1}, root / name / trainer_state_name(0))


def _failing_write(root: Path, name: str) -> None:
    (root / name).mkdir(parents=True, exist_ok=True)
    torch.save({"module": {}}, root / name / MODEL_STATES)
    raise OSError(28, "No space left on device (injected)")


def _save(store, step: int, commit: bool = True) -> str:
    tag = tag_for_step(step)
    store.write_tag(tag, _write, rank=0)
    if commit:
        store.write_latest(tag)
    return tag


def _remote(kind: str, request) -> tuple[str, dict]:
    """(URL of an empty remote checkpoint directory, storage options) on `kind`: 'memory' or 's3' (moto)."""
    if kind == "memory":
        return f"memory://ckpt-{uuid.uuid4().hex}/run", {}
    import s3fs

    server = request.getfixturevalue("s3_server")
    bucket = f"store-{uuid.uuid4().hex[:12]}"
    server.make_bucket(bucket)
    s3fs.S3FileSystem.clear_instance_cache()
    return f"s3://{bucket}/run", server.storage_options


@pytest.fixture(params=["memory", "s3"])
def remote_url(request) -> tuple[str, dict]:
    return _remote(request.param, request)


@pytest.fixture(params=["local", "memory", "s3"])
def any_store(request, tmp_path):
    if request.param == "local":
        return LocalStore(str(tmp_path / "ckpt"))
    url, storage_options = _remote(request.param, request)
    return RemoteStore(url, storage_options, staging=tmp_path / "staging" / "rank0")


# -- local --------------------------------------------------------------------------------------------
def test_open_store_picks_the_backend_from_the_url(tmp_path):
    assert type(open_store(str(tmp_path))) is LocalStore
    assert type(open_store("memory://bucket/run")) is RemoteStore and open_store("memory://b/r").remote
    local = open_store(str(tmp_path / "ckpt"))
    assert local.is_at(str(tmp_path / "ckpt" / ".." / "ckpt")) and not local.is_at(str(tmp_path))
    assert open_store("s3://b/run/").is_at("s3://b/run") and not open_store("s3://b/run").is_at("s3://b/other")


def test_local_failed_write_leaves_no_partial_tag_and_latest_as_it_was(tmp_path):
    store = LocalStore(str(tmp_path / "ckpt"))
    store.probe(".probe")  # creates the directory
    assert _save(store, 1) == "step_00000001"

    with pytest.raises(OSError, match="No space left"):
        store.write_tag(tag_for_step(2), _failing_write, rank=0)
    assert store.tags() == ["step_00000001"] and store.latest() == "step_00000001"
    assert store.leftovers() == [f"{TMP_PREFIX}step_00000002"], "the failed save is under its temp name only"
    assert store.problem("step_00000001") is None

    _save(store, 2)  # the next attempt at that step replaces the leftover
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [LATEST, "step_00000001", "step_00000002"]


def test_local_failed_rename_leaves_no_partial_tag(tmp_path, monkeypatch):
    store = LocalStore(str(tmp_path / "ckpt"))
    _save(store, 1)
    real_replace = store_module.os.replace

    def full_disk_replace(source, destination):
        if Path(source).name.startswith(TMP_PREFIX + "step_"):
            raise OSError(28, "No space left on device (injected)")
        return real_replace(source, destination)

    monkeypatch.setattr(store_module.os, "replace", full_disk_replace)
    with pytest.raises(OSError, match="No space left"):
        store.write_tag(tag_for_step(2), _write, rank=0)
    monkeypatch.undo()
    assert store.tags() == ["step_00000001"] and store.latest() == "step_00000001"
    assert (tmp_path / "ckpt" / LATEST).read_text() == "step_00000001"


def test_write_latest_replaces_it_whole(tmp_path):
    store = LocalStore(str(tmp_path / "ckpt"))
    assert store.latest() is None and store.read_latest() is None and store.tags() == []
    _save(store, 1)
    _save(store, 2)
    assert store.latest() == "step_00000002"
    assert [p.name for p in (tmp_path / "ckpt").iterdir() if p.name.startswith(TMP_PREFIX)] == []


def test_remove_runs_the_hook_for_tags_only(tmp_path):
    removed = []
    store = LocalStore(str(tmp_path / "ckpt"), on_remove=removed.append)
    _save(store, 1)
    assert removed == ["step_00000001"], "a save replaces what was there under its tag, universal form included"
    store.remove(LATEST)
    store.remove("step_00000001")
    store.remove("step_00000009")  # not there: nothing to do
    assert removed == ["step_00000001"] * 2 + ["step_00000009"] and list((tmp_path / "ckpt").iterdir()) == []


# -- both ---------------------------------------------------------------------------------------------
def test_prune_keeps_the_last_complete_checkpoints_it_owns(any_store, caplog):
    for step in (1, 2, 3, 4):
        _save(any_store, step)
    unfinished = _save(any_store, 5, commit=False)  # written, never committed: a crash before `latest`
    started = {tag_for_step(step) for step in (2, 3, 4)} | {unfinished}
    owns = started.__contains__  # step 1 belongs to an earlier run this one does not continue
    left_alone: set[str] = set()
    with caplog.at_level(logging.INFO, logger="pipeline.checkpoint.manager"):
        any_store.prune(2, 1, owns, started, left_alone)
        any_store.prune(2, 1, owns, started, left_alone)
    assert any_store.tags() == ["step_00000001", "step_00000003", "step_00000004"]
    assert any_store.latest() == "step_00000004"
    assert left_alone == {"step_00000001"}
    messages = [record.getMessage() for record in caplog.records]
    assert sum("leaving" in message and "step_00000001" in message for message in messages) == 1, messages
    assert any("removed old step_00000002" in message for message in messages)
    assert any("removed step_00000005, left unfinished" in message for message in messages)


def test_a_store_reads_back_what_it_wrote(any_store, tmp_path):
    tag = _save(any_store, 7)
    assert any_store.is_complete(tag, 1) and any_store.problem(tag) is None
    assert any_store.read_trainer_state(tag) == {"world_size": 1}
    root = any_store.download(tag, tmp_path / "copy")
    assert sorted(p.name for p in (Path(root) / tag).iterdir()) == [MODEL_STATES, trainer_state_name(0)]
    local = Path(any_store.local_copy(tag, tmp_path / "scratch"))
    assert (local / tag / MODEL_STATES).is_file()
    assert any_store.problem("step_00000008") == "it does not exist"


# -- remote -------------------------------------------------------------------------------------------
def test_remote_upload_sends_the_trainer_state_last(remote_url, tmp_path, monkeypatch):
    url, storage_options = remote_url
    store = RemoteStore(url, storage_options, staging=tmp_path / "staging" / "rank0")
    fs, _ = url_to_fs(url, storage_options)  # the instance the store uses (fsspec caches it)
    real_put_file = fs.put_file
    uploads = []

    def recording_put_file(local, remote, *args, **kwargs):
        uploads.append(remote.rsplit("/", 1)[-1])
        return real_put_file(local, remote, *args, **kwargs)

    monkeypatch.setattr(fs, "put_file", recording_put_file)
    _save(store, 1)
    assert uploads == [MODEL_STATES, trainer_state_name(0)]
    assert not list((tmp_path / "staging" / "rank0").glob("step_*")), "staging not cleaned"


def test_remote_interrupted_upload_is_never_complete(remote_url, tmp_path):
    url, storage_options = remote_url
    store = RemoteStore(url, storage_options, staging=tmp_path / "staging" / "rank0")
    _save(store, 1)
    fs, _ = url_to_fs(url, storage_options)
    with uploads_cut_after_first_file(fs):
        store.write_tag(tag_for_step(2), _write, rank=0)
    assert store.tags() == ["step_00000001", "step_00000002"] and store.latest() == "step_00000001"
    assert not store.is_complete("step_00000002", 1)
    assert store.problem("step_00000002") == f"{trainer_state_name(0)} is missing"

    # committed but incomplete (say `latest` was written by hand): not counted among the checkpoints kept
    store.write_latest("step_00000002")
    store.prune(1, 1, lambda tag: True, set(), set())
    assert store.tags() == ["step_00000001", "step_00000002"]


def test_remote_names_and_latest_of_a_missing_directory(remote_url):
    url, storage_options = remote_url
    store = RemoteStore(f"{url}/nothing-here", storage_options)
    assert store.tags() == [] and store.latest() is None and store.names() == []
