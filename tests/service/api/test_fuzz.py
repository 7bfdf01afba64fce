"""Fuzzing: schemathesis generates requests for every operation of our OpenAPI document and
sends them to a real server (management API on, with its key).

No answer may be a 5xx, and every answer must conform to the schema: a declared status
code, content type and body.
"""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

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
