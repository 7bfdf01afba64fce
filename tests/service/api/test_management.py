"""The model management API: auth, upload validation, atomic writes, load/unload/default."""

from __future__ import annotations

import hashlib
import hmac
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx
import pytest
from fastapi.testclient import TestClient
from onnx import helper
from pydantic import SecretStr

from service.api.auth import check_bearer
from service.app import create_app
from service.core import model_manager as management
from service.metadata import ModelMetadata
from tests.service.conftest import make_onnx_cnn, reference_inputs
from tests.service.http_helpers import error_of, make_settings

KEY = "test-management-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
RAW = {**AUTH, "Content-Type": "application/octet-stream"}
ADMIN = "/v1/admin"


def tensor_body(n: int = 1) -> dict[str, Any]:
    x = reference_inputs(n)
    return {"tensor": {"shape": list(x.shape), "data": x.ravel().tolist()}}


def model_bytes(seed: int = 5, **kwargs: Any) -> bytes:
    return make_onnx_cnn(name="tiny", seed=seed, **kwargs).SerializeToString()


def with_metadata(model: onnx.ModelProto, **changes: Any) -> bytes:
    """``model`` with its relu_serve metadata changed (e.g. wrong labels)."""
    props = {p.key: p.value for p in model.metadata_props}
    metadata = ModelMetadata.from_props(props)
    assert metadata is not None
    changed = metadata.model_copy(update=changes)
    del model.metadata_props[:]
    helper.set_model_props(model, {"relu_serve.model": changed.to_json()})
    return model.SerializeToString()


def static_batch_model() -> bytes:
    model = make_onnx_cnn(name="tiny", seed=9)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    return model.SerializeToString()


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` outside .staging -> its SHA-256 (the repository's empty
    lock file, which holds nothing, left out)."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".staging" not in p.parts and p != root / ".lock"
    }


@pytest.fixture
def root(model_repo: Path, tmp_path: Path) -> Path:
    """A writable copy of the fixture repository: tiny/1, tiny/2, foreign/1."""
    copy = tmp_path / "models"
    shutil.copytree(model_repo, copy)
    return copy


@pytest.fixture
def client(root: Path) -> Iterator[TestClient]:
    app = create_app(make_settings(root, management_api_key=KEY, max_upload_bytes=200_000))
    with TestClient(app) as test_client:
        yield test_client


def serving_version(client: TestClient, model: str = "tiny") -> str:
    response = client.post(f"/v1/models/{model}/predict", json=tensor_body())
    assert response.status_code == 200, response.text
    return response.json()["model"]["version"]


# ---------------------------------------------------------------------- auth

ROUTES = [
    ("GET", f"{ADMIN}/repository"),
    ("POST", f"{ADMIN}/repository/reload"),
    ("PUT", f"{ADMIN}/models/tiny/versions/3"),
    ("POST", f"{ADMIN}/models/tiny/versions"),
    ("POST", f"{ADMIN}/models/tiny/versions/1/load"),
    ("POST", f"{ADMIN}/models/tiny/versions/1/unload"),
    ("DELETE", f"{ADMIN}/models/tiny/versions/1"),
    ("PUT", f"{ADMIN}/models/tiny/default"),
    ("POST", "/v2/repository/index"),
    ("POST", "/v2/repository/models/tiny/load"),
    ("POST", "/v2/repository/models/tiny/unload"),
]


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_disabled_without_a_key(model_repo: Path, method: str, path: str) -> None:
    with TestClient(create_app(make_settings(model_repo))) as client:
        response = client.request(method, path, headers=AUTH, content=b"x")
    assert response.status_code == 403
    body = response.json()["error"]
    message = body if isinstance(body, str) else body["message"]
    assert "disabled" in message
    assert "RELU_SERVE_MANAGEMENT_API_KEY" in message


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_missing_or_wrong_key(client: TestClient, root: Path, method: str, path: str) -> None:
    before = snapshot(root)
    missing = client.request(method, path, content=model_bytes())
    assert missing.status_code == 401
    assert missing.headers["WWW-Authenticate"].startswith("Bearer")
    malformed = client.request(method, path, headers={"Authorization": f"Basic {KEY}"})
    assert malformed.status_code == 401
    wrong = client.request(
        method, path, headers={"Authorization": f"Bearer {KEY}x"}, content=model_bytes()
    )
    assert wrong.status_code == 403
    for response in (missing, malformed, wrong):
        body = response.json()["error"]
        assert body if isinstance(body, str) else body["message"]
    assert snapshot(root) == before
    assert client.get("/v1/models").json()["models"][1]["versions"] == ["1", "2"]


def test_keys_are_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((type(a), type(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    check_bearer(f"Bearer {KEY}", SecretStr(KEY))
    with pytest.raises(Exception, match="wrong API key"):
        check_bearer("Bearer caf\u00e9-not-ascii", SecretStr(KEY))
    assert calls == [(bytes, bytes), (bytes, bytes)]


def test_a_short_key_stops_start_up() -> None:
    from service.settings import SettingsError, load_settings

    with pytest.raises(SettingsError, match="RELU_SERVE_MANAGEMENT_API_KEY") as error:
        load_settings(management_api_key="short-secret")
    assert "short-secret" not in str(error.value)  # the message goes to logs: no key in it
    assert load_settings(management_api_key="  ").management_api_key is None


# ---------------------------------------------------------------------- upload


def test_upload_validates_then_serves(client: TestClient, root: Path) -> None:
    data = model_bytes(seed=5)
    response = client.put(f"{ADMIN}/models/tiny/versions/3", content=data, headers=RAW)
    assert response.status_code == 201, response.text
    body = response.json()
    assert body == {
        "model": "tiny",
        "version": "3",
        "state": "READY",
        "replaced": False,
        "sha256": hashlib.sha256(data).hexdigest(),
        "default": "3",
    }
    assert (root / "tiny" / "3" / "model.onnx").read_bytes() == data
    assert serving_version(client) == "3"
    assert not any((root / ".staging").iterdir())
    metrics = client.get("/metrics").text
    assert (
        'relu_serve_model_info{model="tiny",provider="CPUExecutionProvider",'
        'requested="CPUExecutionProvider",version="3"} 1.0\n'
    ) in metrics
    assert "relu_serve_models_loaded 4.0\n" in metrics


def test_multipart_upload_as_the_next_version_without_switching(
    client: TestClient, root: Path
) -> None:
    files = {"file": ("model.onnx", model_bytes(seed=6), "application/octet-stream")}
    response = client.post(
        f"{ADMIN}/models/tiny/versions", files=files, params={"default": "false"}, headers=AUTH
    )
    assert response.status_code == 201, response.text
    assert response.json()["version"] == "3"
    assert response.json()["default"] == "2"  # kept serving: pinned
    assert serving_version(client) == "2"
    index = client.get(f"{ADMIN}/repository", headers=AUTH).json()
    tiny = next(m for m in index["models"] if m["name"] == "tiny")
    assert tiny["default"] == tiny["pinned"] == "2"
    assert [v["state"] for v in tiny["versions"]] == ["READY"] * 3


def test_a_new_model_by_upload(client: TestClient, root: Path) -> None:
    response = client.put(f"{ADMIN}/models/fresh/versions/1", content=model_bytes(), headers=RAW)
    assert response.status_code == 201, response.text
    assert serving_version(client, "fresh") == "1"
    assert (root / "fresh" / "1" / "model.onnx").is_file()


def test_existing_version_needs_overwrite(client: TestClient, root: Path) -> None:
    before = snapshot(root)
    data = model_bytes(seed=11)
    conflict = client.put(f"{ADMIN}/models/tiny/versions/2", content=data, headers=RAW)
    assert conflict.status_code == 409
    assert error_of(conflict)["code"] == "version_exists"
    assert "overwrite=true" in error_of(conflict)["message"]
    assert snapshot(root) == before
    old = client.get("/v1/models/tiny/versions/2").json()["sha256"]
    replaced = client.put(
        f"{ADMIN}/models/tiny/versions/2", content=data, headers=RAW, params={"overwrite": True}
    )
    assert replaced.status_code == 200, replaced.text
    assert replaced.json()["replaced"] is True
    new = client.get("/v1/models/tiny/versions/2").json()["sha256"]
    assert new == hashlib.sha256(data).hexdigest() != old
    assert (root / "tiny" / "2" / "model.onnx").read_bytes() == data


BAD_UPLOADS = [
    ("garbage", lambda: b"\x00not an onnx file", 422, "invalid_model", ("not a valid ONNX",)),
    ("empty", lambda: b"", 400, "empty_upload", ("empty upload",)),
    (
        "labels",
        lambda: with_metadata(make_onnx_cnn(name="tiny"), labels=["a", "b", "c"]),
        422,
        "invalid_model",
        ("3 labels", "10 classes"),
    ),
    (
        "preprocessing",
        lambda: with_metadata(
            make_onnx_cnn(name="tiny"),
            preprocessing=ModelMetadata.from_props(
                {p.key: p.value for p in make_onnx_cnn(name="x", in_channels=3).metadata_props}
            ).preprocessing,
        ),
        422,
        "invalid_model",
        ("preprocessing gives channels 3", "has 1"),
    ),
    ("static_batch", static_batch_model, 422, "invalid_model", ("fixed batch size of 1",)),
    ("too_large", lambda: b"\x08" * 300_000, 413, "body_too_large", ("max_upload_bytes",)),
]


@pytest.mark.parametrize(
    ("make", "status", "code", "words"),
    [case[1:] for case in BAD_UPLOADS],
    ids=[case[0] for case in BAD_UPLOADS],
)
def test_a_bad_file_is_rejected_and_the_old_version_keeps_serving(
    client: TestClient, root: Path, make, status: int, code: str, words: tuple[str, ...]
) -> None:
    before = snapshot(root)
    response = client.put(f"{ADMIN}/models/tiny/versions/3", content=make(), headers=RAW)
    assert response.status_code == status, response.text
    error = error_of(response)
    assert error["code"] == code
    for word in words:
        assert word in error["message"], (word, error["message"])
    if status == 422:
        assert "version 2 keeps serving" in error["message"]
    assert snapshot(root) == before
    assert not (root / "tiny" / "3").exists()
    assert not (root / ".staging").exists() or not any((root / ".staging").iterdir())
    assert serving_version(client) == "2"


def test_upload_content_type_and_form_field(client: TestClient) -> None:
    json_body = client.put(f"{ADMIN}/models/tiny/versions/3", json={"a": 1}, headers=AUTH)
    assert json_body.status_code == 415
    assert "application/octet-stream" in error_of(json_body)["message"]
    no_file = client.put(
        f"{ADMIN}/models/tiny/versions/3", files={"other": ("m", b"x")}, headers=AUTH
    )
    assert no_file.status_code == 400
    assert "field 'file'" in error_of(no_file)["message"]


@pytest.mark.parametrize(
    "path", [f"{ADMIN}/models/..hidden/versions/1", f"{ADMIN}/models/tiny/versions/0"]
)
def test_names_and_versions_are_checked(client: TestClient, root: Path, path: str) -> None:
    response = client.put(path, content=model_bytes(), headers=RAW)
    assert response.status_code == 422
    assert error_of(response)["code"] == "validation_error"
    assert not (root / "..hidden").exists()


# ---------------------------------------------------------------------- atomic writes


def test_a_crash_while_installing_leaves_the_repository_as_it_was(
    client: TestClient, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = snapshot(root)

    def crash(src: Any, dst: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(management.os, "replace", crash)
    for version, params in (("3", {}), ("2", {"overwrite": True})):
        response = client.put(
            f"{ADMIN}/models/tiny/versions/{version}",
            content=model_bytes(),
            headers=RAW,
            params=params,
        )
        assert response.status_code == 507, response.text
        assert "No space left on device" in error_of(response)["message"]
    monkeypatch.undo()
    assert snapshot(root) == before
    assert list((root / ".staging").iterdir()) == []
    assert serving_version(client) == "2"


def test_a_crash_mid_write_leaves_the_repository_as_it_was(client: TestClient, root: Path) -> None:
    """The body stream breaks halfway (a client or process gone): nothing is installed."""
    before = snapshot(root)
    client.get(f"{ADMIN}/repository", headers=AUTH)  # makes the manager
    manager = client.app.state.manager
    data = model_bytes()

    async def broken_stream():
        yield data[: len(data) // 2]
        raise ConnectionResetError("client went away mid-upload")

    async def attempt() -> None:
        await manager.upload("tiny", "3", broken_stream())

    with pytest.raises(ConnectionResetError):
        client.portal.call(attempt)
    assert snapshot(root) == before
    assert list((root / ".staging").iterdir()) == []
    assert serving_version(client) == "2"


# ---------------------------------------------------------------------- load, unload, default


def test_unload_load_default_delete_reload(client: TestClient, root: Path) -> None:
    def post(path: str, **kwargs: Any) -> Any:
        return client.post(f"{ADMIN}{path}", headers=AUTH, **kwargs)

    assert post("/models/tiny/versions/2/unload").json()["state"] == "UNLOADED"
    assert serving_version(client) == "1"
    assert client.get("/v1/models/tiny/versions/2").status_code == 404
    assert (root / "tiny" / "2" / "model.onnx").is_file()
    assert post("/models/tiny/versions/2/unload").status_code == 404

    assert post("/models/tiny/versions/2/load").json()["state"] == "READY"
    assert serving_version(client) == "2"

    pinned = client.put(f"{ADMIN}/models/tiny/default", json={"version": 1}, headers=AUTH)
    assert pinned.json() == {
        "name": "tiny",
        "versions": ["1", "2"],
        "default": "1",
        "pinned": "1",
        "previous_default": "2",
    }
    assert serving_version(client) == "1"
    refused = post("/models/tiny/versions/1/unload")
    assert refused.status_code == 409
    assert error_of(refused)["code"] == "version_is_default"
    assert client.delete(f"{ADMIN}/models/tiny/versions/1", headers=AUTH).status_code == 409
    unknown = client.put(f"{ADMIN}/models/tiny/default", json={"version": 7}, headers=AUTH)
    assert unknown.status_code == 404
    assert "available versions: 1, 2" in error_of(unknown)["message"]
    unpinned = client.put(f"{ADMIN}/models/tiny/default", json={"version": None}, headers=AUTH)
    assert unpinned.json()["default"] == "2"

    deleted = client.delete(f"{ADMIN}/models/tiny/versions/2", headers=AUTH)
    assert deleted.json()["state"] == "DELETED"
    assert not (root / "tiny" / "2").exists()
    assert serving_version(client) == "1"
    assert client.delete(f"{ADMIN}/models/tiny/versions/2", headers=AUTH).status_code == 404
    missing = post("/models/tiny/versions/9/load")
    assert missing.status_code == 404
    assert "no version 9 on disk" in error_of(missing)["message"]

    # Out-of-band changes on disk: a new version, a changed file, a broken one.
    shutil.copytree(root / "tiny" / "1", root / "tiny" / "5")
    (root / "foreign" / "1" / "model.onnx").write_bytes(b"broken")
    reload = post("/repository/reload")
    assert reload.status_code == 200
    body = reload.json()
    assert body["loaded"] == ["tiny/5"]
    assert body["failed"] == ["foreign/1"]
    assert "not a valid ONNX" in next(iter(body["failures"].values()))
    assert serving_version(client) == "5"
    foreign = client.get("/v1/models/foreign")  # the loaded copy keeps serving
    assert foreign.status_code == 200
    assert foreign.json()["version"] == "1"
    index = client.get(f"{ADMIN}/repository", headers=AUTH).json()
    states = {(m["name"], v["version"]): v["state"] for m in index["models"] for v in m["versions"]}
    assert states == {("foreign", "1"): "READY", ("tiny", "1"): "READY", ("tiny", "5"): "READY"}
    fail_load = post("/models/foreign/versions/1/load")
    assert fail_load.status_code == 422
    assert "version 1 keeps serving" in error_of(fail_load)["message"]


def test_requests_holding_an_unloaded_version_finish_on_it(client: TestClient) -> None:
    plane = client.app.state.plane
    held = plane.get_model("tiny", "2")
    response = client.post(f"{ADMIN}/models/tiny/versions/2/unload", headers=AUTH)
    assert response.status_code == 200
    result = held.run(reference_inputs(3), "summary")  # nothing was closed under it
    assert result.probabilities.shape == (3, 10)
    assert result.layer_stats


def test_default_versions_setting_pins_at_start_up(root: Path) -> None:
    settings = make_settings(root, default_versions={"tiny": 1})
    with TestClient(create_app(settings)) as client:
        assert serving_version(client) == "1"
        assert client.get("/v1/models").json()["models"][1]["latest"] == "1"
    app = create_app(make_settings(root, default_versions={"tiny": 7}))
    with pytest.raises(Exception, match="default version 7 of model 'tiny'"), TestClient(app):
        pass
