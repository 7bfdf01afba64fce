"""Validation of uploaded model files in a child process with a time and a memory limit, on
a real server: files built to run forever, to take superlinear time, or to allocate gigabytes
are refused naming the limit, while predictions and management calls go on; SIGTERM during a
validation stops the server at once."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import onnx
import pytest
from onnx import TensorProto, helper

from service.core.validation import PROCESS_NAME
from tests.server_helpers import uvicorn_server
from tests.service.api.test_management import ADMIN, AUTH, KEY, RAW, model_bytes, tensor_body
from tests.service.http_helpers import error_of

pytestmark = pytest.mark.slow  # real servers, and children that run into their limits

# validation_timeout_s of the test server (the child's start counts in it): small, so that
# refusals come fast, and enough for a small model on a loaded machine.
TIMEOUT_S = 5
MEMORY_MIB = 512  # validation_memory_bytes: Python and onnxruntime take ~250 MiB of it
# A refusal comes after the time limit, plus the time to kill the child; before the limits
# it never came.
SLACK_S = 12
OPSET = [helper.make_opsetid("", 17)]


def _graph_io() -> tuple[onnx.ValueInfoProto, onnx.ValueInfoProto]:
    """x (N, 4) -> y (N, 4): a foreign classifier of 4 classes, no metadata."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    return x, y


def endless_loop_model() -> onnx.ModelProto:
    """A Loop of 2^62 iterations that carries x through unchanged: its warm-up never ends."""
    x, y = _graph_io()
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Identity", ["v_in"], ["v_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_in", TensorProto.FLOAT, ["N", 4]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", TensorProto.FLOAT, ["N", 4]),
        ],
    )
    trips = helper.make_tensor("trips", TensorProto.INT64, [], [2**62])
    always = helper.make_tensor("always", TensorProto.BOOL, [], [True])
    nodes = [
        helper.make_node("Constant", [], ["trips"], value=trips),
        helper.make_node("Constant", [], ["cond"], value=always),
        helper.make_node("Loop", ["trips", "cond", "x"], ["y"], body=body),
    ]
    return helper.make_model(helper.make_graph(nodes, "loop", [x], [y]), opset_imports=OPSET)


def relu_chain_model(length: int = 8000) -> onnx.ModelProto:
    """``length`` Relu nodes in a row (~170 KB for 8000): loading takes superlinear time
    (1000 nodes ~1.7 s, 2000 ~6.4 s on 2 cores), far past the test's limit."""
    x, y = _graph_io()
    names = ["x", *(f"r{i}" for i in range(length - 1)), "y"]
    nodes = [helper.make_node("Relu", [names[i]], [names[i + 1]]) for i in range(length)]
    return helper.make_model(helper.make_graph(nodes, "chain", [x], [y]), opset_imports=OPSET)


def huge_tensor_model(elements: int = 2**28) -> onnx.ModelProto:
    """Adds the max of a zero tensor of (N, ``elements``) floats to x: 1 GiB per sample, made
    at run time (its shape depends on the input, so no optimizer folds it away)."""
    x, y = _graph_io()
    width = helper.make_tensor("width", TensorProto.INT64, [1], [elements])
    zero = helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0])
    nodes = [
        helper.make_node("Shape", ["x"], ["batch"], start=0, end=1),
        helper.make_node("Constant", [], ["width"], value=width),
        helper.make_node("Concat", ["batch", "width"], ["shape"], axis=0),
        helper.make_node("ConstantOfShape", ["shape"], ["big"], value=zero),
        helper.make_node("ReduceMax", ["big"], ["max"], axes=[1], keepdims=1),
        helper.make_node("Add", ["x", "max"], ["y"]),
    ]
    return helper.make_model(helper.make_graph(nodes, "huge", [x], [y]), opset_imports=OPSET)


def validation_children(pid: int) -> list[int]:
    """Live descendants of ``pid`` (the server, or uvicorn's supervisor of its workers)
    named as the validating processes name themselves."""
    processes = {}  # pid -> (parent pid, alive, name)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            name = (entry / "comm").read_text().strip()
        except OSError:  # gone meanwhile
            continue
        state, parent = stat.rsplit(")", 1)[1].split()[:2]
        processes[int(entry.name)] = (int(parent), state != "Z", name)

    def descends(child: int) -> bool:
        while child in processes and child != pid:
            child = processes[child][0]
        return child == pid

    return [
        child
        for child, (_, alive, name) in processes.items()
        if alive and name == PROCESS_NAME and descends(child)
    ]


def is_gone(pid: int) -> bool:
    """``pid`` has exited (no process, or a zombie waiting for its parent)."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@pytest.fixture(scope="module")
def server(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """``(url, pid)`` of a server on a copy of the fixture repository with small limits."""
    root = tmp_path_factory.mktemp("validation") / "models"
    shutil.copytree(model_repo, root)
    env = {
        "RELU_SERVE_MANAGEMENT_API_KEY": KEY,
        "RELU_SERVE_VALIDATION_TIMEOUT_S": str(TIMEOUT_S),
        "RELU_SERVE_VALIDATION_MEMORY_BYTES": str(MEMORY_MIB * 2**20),
    }
    with uvicorn_server(root, env=env) as (url, process):
        yield url, process.pid


def upload(url: str, name: str, data: bytes, into: dict[str, tuple[httpx.Response, float]]):
    """PUT ``data`` as ``name`` version 1; its answer and seconds taken go to ``into``."""
    started = time.monotonic()
    response = httpx.put(
        f"{url}{ADMIN}/models/{name}/versions/1", content=data, headers=RAW, timeout=120
    )
    into[name] = (response, time.monotonic() - started)


@pytest.mark.parametrize(
    ("build", "limit_s", "expected"),
    [
        pytest.param(
            endless_loop_model,
            TIMEOUT_S,
            f"validation took longer than {TIMEOUT_S} s (validation_timeout_s)",
            id="Loop of 2^62",
        ),
        pytest.param(
            relu_chain_model,
            TIMEOUT_S,
            f"validation took longer than {TIMEOUT_S} s (validation_timeout_s)",
            id="8000 Relu",
        ),
        pytest.param(
            huge_tensor_model,
            0,
            f"more memory than the limit of {MEMORY_MIB} MiB (validation_memory_bytes)",
            id="1 GiB tensor",
        ),
    ],
)
def test_a_file_over_a_limit_is_refused_while_the_service_goes_on(
    server: tuple[str, int],
    build: Callable[[], onnx.ModelProto],
    limit_s: float,
    expected: str,
    request: pytest.FixtureRequest,
) -> None:
    url, pid = server
    bad, good = f"bad-{request.node.callspec.id}", f"good-{request.node.callspec.id}"
    bad, good = (name.replace(" ", "-").replace("^", "") for name in (bad, good))
    answers: dict[str, tuple[httpx.Response, float]] = {}
    refused = threading.Thread(target=upload, args=(url, bad, build().SerializeToString(), answers))
    refused.start()
    time.sleep(0.3)
    # A second upload meanwhile waits for the management lock, then goes through.
    waiting = threading.Thread(target=upload, args=(url, good, model_bytes(), answers))
    waiting.start()
    statuses = []
    while refused.is_alive():  # during the validation, the service answers
        statuses.append(httpx.post(f"{url}/v1/models/tiny/predict", json=tensor_body()).status_code)
        statuses.append(httpx.get(f"{url}{ADMIN}/repository", headers=AUTH).status_code)
        time.sleep(0.1)
    refused.join()
    waiting.join(timeout=60)

    response, seconds = answers[bad]
    assert response.status_code == 422, response.text
    error = error_of(response)
    assert error["code"] == "invalid_model"
    assert expected in error["message"], error["message"]
    assert f"model file for {bad!r} version 1 rejected" in error["message"]
    assert limit_s <= seconds < limit_s + SLACK_S
    assert len(statuses) >= 2  # a prediction and a management read, at least
    assert set(statuses) == {200}
    assert answers[good][0].status_code == 201, answers[good][0].text
    assert httpx.get(f"{url}/v1/models/{bad}").status_code == 404
    assert httpx.post(f"{url}/v1/models/{good}/predict", json=tensor_body()).status_code == 200
    assert validation_children(pid) == []  # killed and reaped


def wait_for_child(pid: int) -> list[int]:
    """The validating processes under ``pid``, once there is one, and it had time to be in
    the endless warm-up run."""
    deadline = time.monotonic() + 30
    while not (children := validation_children(pid)):
        assert time.monotonic() < deadline, "no validating process started"
        time.sleep(0.05)
    time.sleep(1.5)
    return children


@pytest.mark.parametrize(
    ("number", "expected"),
    [
        pytest.param(
            signal.SIGKILL,
            "killed (SIGKILL), most likely by the kernel for want of memory: less is free "
            f"than the limit of {MEMORY_MIB} MiB (validation_memory_bytes)",
            id="SIGKILL, as the OOM killer",
        ),
        pytest.param(
            signal.SIGSEGV,
            "crashed (SIGSEGV): onnxruntime failed on this file, or memory ran out within "
            f"the limit of {MEMORY_MIB} MiB (validation_memory_bytes)",
            id="SIGSEGV, as a crash",
        ),
    ],
)
def test_a_validating_process_that_dies_is_a_422_saying_why(
    server: tuple[str, int], number: int, expected: str
) -> None:
    url, pid = server
    answers: dict[str, tuple[httpx.Response, float]] = {}
    data = endless_loop_model().SerializeToString()
    name = f"dies-{number}"
    uploading = threading.Thread(target=upload, args=(url, name, data, answers))
    uploading.start()
    (child,) = wait_for_child(pid)
    killed = time.monotonic()
    os.kill(child, number)
    uploading.join(timeout=30)
    answered_s = time.monotonic() - killed
    response, _ = answers[name]
    assert response.status_code == 422, response.text
    assert error_of(response)["code"] == "invalid_model"
    assert expected in error_of(response)["message"], error_of(response)["message"]
    assert answered_s < 5
    assert validation_children(pid) == []


@pytest.mark.parametrize("workers", [1, 2], ids=["1 worker", "2 workers"])
def test_sigterm_during_a_validation_stops_the_server_at_once(
    model_repo: Path, tmp_path: Path, workers: int
) -> None:
    root = tmp_path / "models"
    shutil.copytree(model_repo, root)
    env = {
        "RELU_SERVE_MANAGEMENT_API_KEY": KEY,
        "RELU_SERVE_VALIDATION_TIMEOUT_S": "60",
        "RELU_SERVE_WORKERS": str(workers),
    }
    answers: dict[str, tuple[httpx.Response, float]] = {}
    with uvicorn_server(root, env=env) as (url, process):
        data = endless_loop_model().SerializeToString()
        uploading = threading.Thread(target=upload, args=(url, "endless", data, answers))
        uploading.start()
        children = wait_for_child(process.pid)
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=15)  # before the limits: never
        stopped_s = time.monotonic() - signalled
        uploading.join(timeout=10)
    assert stopped_s < 5
    assert process.returncode == 0
    response, _ = answers["endless"]
    assert response.status_code == 503, response.text
    assert error_of(response)["code"] == "shutting_down"
    assert "the server is stopping" in error_of(response)["message"]
    assert all(is_gone(child) for child in children)
    assert not (root / "endless").exists()
