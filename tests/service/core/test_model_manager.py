"""The repository as the truth: state files, restarts, two instances on one repository
converging by polling, concurrent changes from two instances, staging clean-up."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.core import model_manager as management
from service.core.model_manager import STAGING_DIR, StagingFolder, clean_staging
from service.core.repository import (
    LATEST,
    ModelRepository,
    ModelState,
    read_model_state,
    repository_lock,
    write_model_state,
)
from tests.service.api.test_management import (
    ADMIN,
    AUTH,
    KEY,
    RAW,
    model_bytes,
    serving_version,
)
from tests.service.http_helpers import error_of, make_settings

POLL_S = 0.2
WAIT_S = 10.0  # bound on waiting for a poll (50 polls): generous for a loaded CI machine


@pytest.fixture
def root(model_repo: Path, tmp_path: Path) -> Path:
    """A writable copy of the fixture repository: tiny/1, tiny/2, foreign/1."""
    copy = tmp_path / "models"
    shutil.copytree(model_repo, copy)
    return copy


def start(stack: ExitStack, root: Path, **overrides: Any) -> TestClient:
    """A service instance on ``root`` (management on, short poll), started in ``stack``."""
    values: dict[str, Any] = {"management_api_key": KEY, "repository_poll_s": POLL_S, **overrides}
    settings = make_settings(root, **values)
    return stack.enter_context(TestClient(create_app(settings)))


def wait_for(check: Callable[[], bool], what: str) -> None:
    """Wait until ``check()`` holds, at most ``WAIT_S``."""
    deadline = time.monotonic() + WAIT_S
    while not check():
        assert time.monotonic() < deadline, f"not within {WAIT_S} s: {what}"
        time.sleep(0.05)


def states(client: TestClient, model: str = "tiny") -> dict[str, str]:
    """Version -> state in ``/v1/models``."""
    entry = next(m for m in client.get("/v1/models").json()["models"] if m["name"] == model)
    return {s["version"]: s["state"] for s in entry["states"]}


# ---------------------------------------------------------------------- the state file


def test_state_file_round_trips(tmp_path: Path) -> None:
    for state in (
        ModelState(),
        ModelState(default="3", unloaded=frozenset({"1", "10", "2"})),
        ModelState(default=LATEST),
    ):
        write_model_state(tmp_path, state)
        assert read_model_state(tmp_path) == state
    assert json.loads((tmp_path / "state.json").read_text()) == {
        "default": "latest",
        "unloaded": [],
    }
    write_model_state(tmp_path, ModelState(default="3", unloaded=frozenset({"10", "2"})))
    assert json.loads((tmp_path / "state.json").read_text()) == {
        "default": "3",
        "unloaded": ["2", "10"],
    }
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temporary file left
    assert read_model_state(tmp_path / "none") == ModelState()


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"[1, 2]", b'{"unloaded": "2"}', b'{"default": "0"}', b"\xff\xfe"],
    ids=["syntax", "not_object", "unloaded_type", "bad_version", "not_utf8"],
)
def test_a_corrupt_state_file_is_logged_and_read_as_empty(
    root: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    (root / "tiny" / "state.json").write_bytes(content)
    assert read_model_state(root / "tiny") == ModelState()
    assert "state.json, read as empty" in caplog.text
    repository = ModelRepository(root, threads=1)
    repository.load_all()  # never stops the service
    assert repository.available() == {"foreign": ["1"], "tiny": ["1", "2"]}


# ---------------------------------------------------------------------- restarts


def test_a_restart_keeps_the_run_time_default_and_unloaded_versions(root: Path) -> None:
    with ExitStack() as stack:
        client = start(stack, root)
        assert client.put(f"{ADMIN}/models/tiny/versions/3", content=model_bytes(), headers=RAW)
        pinned = client.put(f"{ADMIN}/models/tiny/default", json={"version": 1}, headers=AUTH)
        assert pinned.status_code == 200, pinned.text
        unloaded = client.post(f"{ADMIN}/models/tiny/versions/2/unload", headers=AUTH)
        assert unloaded.status_code == 200, unloaded.text
    assert read_model_state(root / "tiny") == ModelState(default="1", unloaded=frozenset({"2"}))
    with ExitStack() as stack:  # the run-time default wins over the setting
        client = start(stack, root, default_versions={"tiny": 3})
        assert serving_version(client) == "1"
        assert states(client) == {"1": "READY", "2": "UNLOADED", "3": "READY"}
        tiny = client.get("/v1/models").json()["models"][1]
        assert (tiny["versions"], tiny["latest"], tiny["default"]) == (["1", "3"], "1", "1")
        assert tiny["pinned"] == "1"
        index = client.post("/v2/repository/index", headers=AUTH).json()
        assert {"name": "tiny", "version": "2", "state": "UNLOADED", "reason": ""} in index
        unpinned = client.put(f"{ADMIN}/models/tiny/default", json={"version": None}, headers=AUTH)
        assert unpinned.json()["default"] == "3"
    with ExitStack() as stack:  # unpinned at run time: the highest, whatever the setting
        client = start(stack, root, default_versions={"tiny": 1})
        assert serving_version(client) == "3"
        loaded = client.post(f"{ADMIN}/models/tiny/versions/2/load", headers=AUTH)
        assert loaded.status_code == 200, loaded.text
    assert read_model_state(root / "tiny") == ModelState(default=LATEST)
    with ExitStack() as stack:
        client = start(stack, root)
        assert states(client) == {"1": "READY", "2": "READY", "3": "READY"}


# ---------------------------------------------------------------------- two instances


def test_two_instances_on_one_repository_converge(root: Path) -> None:
    with ExitStack() as stack:
        one, two = start(stack, root), start(stack, root)
        data = model_bytes(seed=21)
        added = one.put(f"{ADMIN}/models/tiny/versions/3", content=data, headers=RAW)
        assert added.status_code == 201, added.text
        assert serving_version(one) == "3"  # the instance that took it: at once
        wait_for(lambda: serving_version(two) == "3", "the other instance serves the upload")
        assert two.get("/v1/models/tiny/versions/3").json()["sha256"] == added.json()["sha256"]

        pinned = two.put(f"{ADMIN}/models/tiny/default", json={"version": 1}, headers=AUTH)
        assert pinned.status_code == 200, pinned.text
        wait_for(lambda: serving_version(one) == "1", "the pin reaches the first instance")

        assert two.post(f"{ADMIN}/models/tiny/versions/2/unload", headers=AUTH).status_code == 200
        wait_for(lambda: states(one).get("2") == "UNLOADED", "the unload reaches the first")
        assert one.get("/v1/models/tiny/versions/2").status_code == 404

        refused = one.delete(f"{ADMIN}/models/tiny/versions/1", headers=AUTH)
        assert refused.status_code == 409  # the default pinned through the other instance
        assert error_of(refused)["code"] == "version_is_default"
        assert one.delete(f"{ADMIN}/models/tiny/versions/3", headers=AUTH).status_code == 200
        wait_for(lambda: "3" not in states(two), "the delete reaches the other instance")
        assert serving_version(two) == "1"


def test_the_instance_that_made_a_change_finds_nothing_to_redo(root: Path) -> None:
    with ExitStack() as stack:
        client = start(stack, root, repository_poll_s=3600.0)  # no poll of its own
        manager = client.app.state.manager
        client.portal.call(manager.poll)  # the first look syncs, whatever it finds
        added = client.put(f"{ADMIN}/models/tiny/versions/3", content=model_bytes(), headers=RAW)
        assert added.status_code == 201, added.text
        model = client.app.state.plane.get_model("tiny", "3")
        assert client.portal.call(manager.poll) == {"loaded": [], "unloaded": [], "failed": []}
        assert client.app.state.plane.get_model("tiny", "3") is model  # not loaded again
        assert client.portal.call(manager.poll) is None  # nothing changed on disk since


def test_versions_changed_by_hand_are_followed(root: Path) -> None:
    with ExitStack() as stack:
        client = start(stack, root)
        shutil.copytree(root / "tiny" / "2", root / "tiny" / "7")
        wait_for(lambda: serving_version(client) == "7", "a version folder dropped in loads")
        (root / "foreign" / "2").mkdir()
        (root / "foreign" / "2" / "model.onnx").write_bytes(b"\x00not onnx")
        wait_for(
            lambda: states(client, "foreign").get("2") == "UNAVAILABLE", "a broken file is reported"
        )
        assert states(client, "foreign") == {"1": "READY", "2": "UNAVAILABLE"}
        index = client.post("/v2/repository/index", headers=AUTH).json()
        broken = next(e for e in index if (e["name"], e["version"]) == ("foreign", "2"))
        assert broken["state"] == "UNAVAILABLE"
        assert "not a valid ONNX" in broken["reason"]
        entry = client.get("/v1/models").json()["models"][0]
        assert "not a valid ONNX" in entry["states"][1]["reason"]
        shutil.rmtree(root / "tiny" / "7")
        wait_for(lambda: serving_version(client) == "2", "a version folder removed unloads")
        assert "7" not in states(client)


def test_concurrent_changes_from_two_instances_are_not_lost(root: Path) -> None:
    repositories = [ModelRepository(root, threads=1), ModelRepository(root, threads=1)]
    versions = [str(v) for v in range(1, 101)]
    errors: list[BaseException] = []

    def unload(repository: ModelRepository, mine: list[str]) -> None:
        try:
            for version in mine:
                with repository_lock(root):
                    repository.update_model_state(
                        "tiny", lambda s, v=version: ModelState(s.default, s.unloaded | {v})
                    )
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)

    threads = [
        threading.Thread(target=unload, args=(repositories[i], versions[i::2])) for i in (0, 1)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert read_model_state(root / "tiny").unloaded == frozenset(versions)


def test_concurrent_uploads_through_two_instances_are_all_kept(root: Path) -> None:
    with ExitStack() as stack:
        clients = [start(stack, root), start(stack, root)]
        answers: list[int] = []

        def upload(client: TestClient, version: int) -> None:
            response = client.put(
                f"{ADMIN}/models/tiny/versions/{version}",
                content=model_bytes(seed=version),
                headers=RAW,
                params={"default": "false"},
            )
            answers.append(response.status_code)

        threads = [threading.Thread(target=upload, args=(clients[v % 2], v)) for v in range(3, 9)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert answers == [201] * 6
        wanted = {str(v): "READY" for v in range(1, 9)}
        for client in clients:
            wait_for(lambda c=client: states(c) == wanted, "both serve every upload")
            assert serving_version(client) == "2"  # every upload kept the default


def test_an_upload_that_keeps_the_default_keeps_the_one_on_disk(root: Path) -> None:
    # The second instance has not seen the first pin version 1 (it polls once an hour): its
    # upload "without switching" must keep the default the repository says, not its own view.
    with ExitStack() as stack:
        first = start(stack, root)
        second = start(stack, root, repository_poll_s=3600)
        response = first.put(f"{ADMIN}/models/tiny/default", json={"version": 1}, headers=AUTH)
        assert response.status_code == 200, response.text
        response = second.put(
            f"{ADMIN}/models/tiny/versions/3",
            content=model_bytes(seed=3),
            headers=RAW,
            params={"default": "false"},
        )
        assert response.status_code == 201, response.text
        assert read_model_state(root / "tiny").default == "1"
        assert serving_version(second) == "1"
        wait_for(lambda: serving_version(first) == "1" and "3" in states(first), "first follows")


def test_a_read_only_repository_keeps_serving_and_following(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No lock file or staging folder can be created (root would write anyway, so creating
    files under the repository fails as on a read-only volume)."""
    real_open = os.open

    def read_only(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & os.O_CREAT and str(path).startswith(str(root)):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    with ExitStack() as stack:
        client = start(stack, root)
        assert serving_version(client) == "2"
        refused = client.post(f"{ADMIN}/models/tiny/versions/2/unload", headers=AUTH)
        assert refused.status_code == 507
        assert "Read-only file system" in error_of(refused)["message"]
        upload = client.put(f"{ADMIN}/models/tiny/versions/3", content=model_bytes(), headers=RAW)
        assert upload.status_code == 507
        assert serving_version(client) == "2"
        shutil.copytree(root / "tiny" / "2", root / "tiny" / "4")  # as another replica would
        wait_for(lambda: serving_version(client) == "4", "the poller follows the disk")


# ---------------------------------------------------------------------- staging clean-up


@pytest.fixture
def held_elsewhere(root: Path) -> Iterator[Path]:
    """A staging folder held by another process (its lock file locked there), as by a
    worker or replica mid-upload."""
    staging = root / STAGING_DIR
    staging.mkdir()
    folder = staging / "upload-busy"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"half an upl")
    script = (
        "import fcntl, os, sys\n"
        "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "print('locked', flush=True)\n"
        "sys.stdin.read()\n"
    )
    lock = str(folder) + management.LOCK_SUFFIX
    holder = subprocess.Popen(
        [sys.executable, "-c", script, lock],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "locked\n"
        yield folder
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=10)


def test_staging_leftovers_are_removed_at_start_and_folders_in_use_kept(
    root: Path, held_elsewhere: Path
) -> None:
    staging = root / STAGING_DIR
    leftover = staging / "upload-crashed"  # a killed upload of an older version: no lock
    leftover.mkdir()
    (leftover / "model.onnx").write_bytes(b"\x08\x07partial")
    locked = staging / "upload-killed"  # a killed upload: its lock file stays, unlocked
    locked.mkdir()
    (locked / "model.onnx").write_bytes(b"\x08\x07partial too")
    (staging / ("upload-killed" + management.LOCK_SUFFIX)).touch()
    (staging / ("deleted-x" + management.LOCK_SUFFIX)).touch()  # killed before its folder
    with ExitStack() as stack:
        client = start(stack, root)
        assert serving_version(client) == "2"
        assert sorted(p.name for p in staging.iterdir()) == [
            "upload-busy",
            "upload-busy" + management.LOCK_SUFFIX,
        ]
        assert (held_elsewhere / "model.onnx").read_bytes() == b"half an upl"


def test_staging_folders_are_kept_while_held(root: Path, held_elsewhere: Path) -> None:
    staged = StagingFolder(root, "upload-")  # this process's own, as during an upload
    (staged.path / "model.onnx").write_bytes(b"in progress")
    assert clean_staging(root) == []
    assert staged.path.is_dir()
    assert held_elsewhere.is_dir()
    staged.close()
    assert sorted(p.name for p in (root / STAGING_DIR).iterdir()) == [
        "upload-busy",
        "upload-busy" + management.LOCK_SUFFIX,
    ]
