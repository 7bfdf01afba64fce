"""Fuzzing: schemathesis generates requests for every operation of our OpenAPI document and
sends them to a real server (management API on, with its key).

No answer may be a 5xx, and every answer must conform to the schema: a declared status
code, content type and body.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
from collections import Counter
from pathlib import Path

import httpx
import orjson
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.service.core.test_swap import AUTH, running_server

pytestmark = [pytest.mark.network, pytest.mark.slow]
EXAMPLES_PER_OPERATION = 60
MIN_REQUESTS = 1000
MANAGEMENT_PREFIXES = ("/v1/admin", "/v2/repository")


CHECKS = (not_a_server_error, response_schema_conformance, content_type_conformance)


def fuzz_operation(operation, url: str, calls: Counter[str], failures: list[str]) -> None:
    """Send ``EXAMPLES_PER_OPERATION`` generated requests to one operation, checking each;
    four in five carry the management key (the others must get 401 there)."""
    label = f"{operation.method.upper()} {operation.path}"
    management = operation.path.startswith(MANAGEMENT_PREFIXES)

    @given(case=operation.as_strategy(), auth=st.integers(0, 4).map(bool), known=st.booleans())
    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def run(case, auth: bool, known: bool) -> None:
        headers = dict(AUTH) if auth else {}
        if known and not management and case.path_parameters:
            # Half the calls name a model that exists, so bodies get past the 404 and reach
            # the decoders (management calls keep random names: they would delete the model).
            case.path_parameters.update(
                {k: {"name": "tiny", "version": "1"}[k] for k in case.path_parameters}
            )
        response = case.call(base_url=url, headers=headers, timeout=30)
        calls[label] += 1
        if response.status_code >= 500:
            failures.append(f"{label}: {response.status_code} {response.text[:300]}")
        for check in (*CHECKS, status_code_conformance):
            try:
                case.validate_response(response, checks=[check], headers=headers)
            except FailureGroup as exc:  # a BaseExceptionGroup
                curl = case.as_curl_command(headers=headers)
                failures.append(f"{label}: {exc}\n{curl}")

    run()


def test_fuzz_every_operation(model_repo: Path, tmp_path: Path) -> None:
    root = tmp_path / "models"
    shutil.copytree(model_repo, root)
    calls: Counter[str] = Counter()
    failures: list[str] = []
    with running_server(root) as (url, _process):
        schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        for operation in operations:
            fuzz_operation(operation, url, calls, failures)

    total = sum(calls.values())
    print(  # noqa: T201 - the figures the README quotes
        f"\nfuzz: {total} requests over {len(calls)} operations; {len(failures)} failures"
    )
    assert len(calls) == len(operations)
    assert total >= MIN_REQUESTS
    assert failures == [], "\n\n".join(failures[:20])


# ---------------------------------------------------------------- beyond the schema

PREDICT = "/v1/models/tiny/predict"
dims = st.one_of(
    st.integers(-3, 70),
    st.integers(2**31 - 2, 2**31 + 2),
    st.integers(2**32 - 1, 2**63 - 1),  # orjson writes 64-bit integers at most
    st.sampled_from([0, 1, 8, 64]),
)
shapes = st.lists(dims, min_size=0, max_size=70)
shape_texts = st.one_of(
    shapes.map(lambda s: ",".join(map(str, s))),
    st.tuples(shapes, st.sampled_from([",", ", ", " ", ",,", "x", ";"])).map(
        lambda t: t[1].join(map(str, t[0]))
    ),
    st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=300),
    st.integers(0, 5_000_000).map(lambda n: "1,1,8," + " " * n + "8"),
    st.lists(st.integers(2**63, 2**200), max_size=5).map(lambda s: ",".join(map(str, s))),
)
header_names = st.text(
    st.characters(min_codepoint=33, max_codepoint=126, exclude_characters=":"),
    min_size=1,
    max_size=40,
)
header_values = st.one_of(
    st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=200),
    st.integers(0, 60_000).map(lambda n: "v" * n),
)


def status_of(sock_data: bytes) -> int | None:
    """The status of the first answer in raw bytes read from a socket, if any."""
    if not sock_data.startswith(b"HTTP/1.1 "):
        return None
    return int(sock_data.split()[1])


def raw_exchange(port: int, request: bytes, cut: int | None = None) -> int | None:
    """Send ``request`` (its first ``cut`` bytes, then close, when given) on a fresh
    connection; the status answered, or None when the client went away first."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(request if cut is None else request[:cut])
        if cut is not None:
            return None
        data = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                data += chunk
                if b"\r\n\r\n" in data:
                    break
        return status_of(data)


def octet_request(shape: str, headers: list[tuple[str, str]], body: bytes) -> bytes:
    head = [f"POST {PREDICT} HTTP/1.1", "Host: fuzz", "Connection: close"]
    head += ["Content-Type: application/octet-stream", f"Content-Length: {len(body)}"]
    head += [f"X-Tensor-Shape: {shape}"] if shape is not None else []
    head += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def json_request(path: str, payload: bytes) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: fuzz\r\nConnection: close\r\n"
    head += f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    return head.encode() + payload


def test_fuzz_headers_shapes_and_disconnects(model_repo: Path, tmp_path: Path) -> None:
    # What the schema does not describe: shapes in headers and bodies of any rank and size,
    # odd, huge and many headers, and clients that go away at any byte of a request. No
    # answer is a 5xx, no traceback is logged, and normal requests work throughout.
    root = tmp_path / "models"
    shutil.copytree(model_repo, root)
    answered: Counter[int] = Counter()
    with running_server(root) as (url, process):
        port = int(url.rsplit(":", 1)[1])
        body = bytes(8 * 8 * 4)

        @given(
            shape=st.one_of(st.none(), shape_texts),
            headers=st.lists(st.tuples(header_names, header_values), max_size=120),
        )
        @settings(max_examples=150, deadline=None, derandomize=True, database=None)
        def header_cases(shape: str | None, headers: list[tuple[str, str]]) -> None:
            status = raw_exchange(port, octet_request(shape, headers, body))
            assert status is not None, shape and shape[:100]
            assert status < 500, (shape and shape[:100], status)
            answered[status] += 1

        @given(shape=shapes, data=st.one_of(st.just([]), st.lists(st.floats(-1, 1), max_size=70)))
        @settings(max_examples=150, deadline=None, derandomize=True, database=None)
        def shape_cases(shape: list[int], data: list[float]) -> None:
            v1 = orjson.dumps({"tensor": {"shape": shape, "data": data}})
            v2 = orjson.dumps(
                {"inputs": [{"name": "input", "shape": shape, "datatype": "FP32", "data": data}]}
            )
            for path, payload in ((PREDICT, v1), ("/v2/models/tiny/infer", v2)):
                status = raw_exchange(port, json_request(path, payload))
                assert status is not None, (path, shape[:10])
                assert status < 500, (path, shape[:10], status)
                answered[status] += 1

        valid = [
            json_request(
                PREDICT, orjson.dumps({"tensor": {"shape": [1, 1, 8, 8], "data": [0.5] * 64}})
            ),
            octet_request("1,1,8,8", [], body),
        ]

        @given(which=st.sampled_from(valid), fraction=st.floats(0, 1))
        @settings(max_examples=100, deadline=None, derandomize=True, database=None)
        def disconnect_cases(which: bytes, fraction: float) -> None:
            raw_exchange(port, which, cut=int(len(which) * fraction))

        header_cases()
        shape_cases()
        disconnect_cases()
        for request in valid:  # and the service still answers as always
            assert raw_exchange(port, request) == 200
        metrics = httpx.get(f"{url}/metrics").text
    output = process.stdout.read().decode() if process.stdout else ""
    assert "Traceback" not in output, output[-3000:]
    assert 'status="5xx"' not in metrics
    assert sum(answered.values()) >= 450
    assert answered[200] > 0
    assert sum(n for s, n in answered.items() if 400 <= s < 500) > 0
