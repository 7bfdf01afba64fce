"""Execution provider names and fall-back, the CPUs a container really has, session options."""

from __future__ import annotations

import logging
from pathlib import Path

import onnxruntime as ort
import pytest

from service.runtime import providers as runtime
from service.runtime.providers import (
    CPU,
    ProviderChoice,
    ProviderUnavailableError,
    available_cpus,
    provider_name,
    providers_in_use,
    resolve_providers,
    session_options,
)

CUDA = "CUDAExecutionProvider"


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("cpu", CPU),
        ("CPU", CPU),
        ("cuda", CUDA),
        (" tensorrt ", "TensorrtExecutionProvider"),
        ("rocm", "ROCMExecutionProvider"),
        ("openvino", "OpenVINOExecutionProvider"),
        ("dml", "DmlExecutionProvider"),
        ("coreml", "CoreMLExecutionProvider"),
        (CUDA, CUDA),
        (CPU, CPU),
    ],
)
def test_provider_names(given: str, expected: str) -> None:
    assert provider_name(given) == expected


def test_unknown_provider_names_the_valid_choices() -> None:
    with pytest.raises(ValueError, match="unknown execution provider 'gpu'") as info:
        provider_name("gpu")
    for choice in ("cpu", "cuda", "tensorrt", "openvino"):
        assert choice in str(info.value)


def test_available_provider_is_used_without_fallback() -> None:
    choice = resolve_providers("cuda", available=[CUDA, CPU])
    assert choice == ProviderChoice((CUDA,), (CUDA, CPU), False, None)


def test_missing_provider_falls_back_loudly(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="service.runtime.providers"):
        choice = resolve_providers(["cuda"], available=[CPU])
    assert choice.fell_back is True
    assert choice.used == (CPU,)
    assert CUDA in choice.reason
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings
    assert CUDA in warnings[0].getMessage()


@pytest.mark.usefixtures("cpu_only")
def test_cuda_on_a_machine_without_it_falls_back_to_cpu(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="service.runtime.providers"):
        choice = resolve_providers("cuda")
    assert choice.fell_back
    assert choice.used[-1] == CPU
    assert any(r.levelno == logging.WARNING for r in caplog.records)


def test_strict_raises_instead_of_falling_back() -> None:
    with pytest.raises(ProviderUnavailableError, match="CUDAExecutionProvider"):
        resolve_providers("cuda", available=[CPU], strict=True)


def test_comma_separated_preference_list() -> None:
    choice = resolve_providers("tensorrt,cuda,cpu", available=[CUDA, CPU])
    assert choice.used == (CUDA, CPU)
    assert choice.fell_back is True  # TensorRT was asked for and is missing


class _FakeSession:
    def __init__(self, providers: list[str]):
        self._providers = providers

    def get_providers(self) -> list[str]:
        return self._providers


def test_provider_dropped_at_session_creation_is_a_fallback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    asked = ProviderChoice((CUDA,), (CUDA, CPU), False, None)
    with caplog.at_level(logging.WARNING, logger="service.runtime.providers"):
        actual = providers_in_use(_FakeSession([CPU]), asked)
    assert actual.used == (CPU,)
    assert actual.fell_back is True
    assert "did not initialise CUDAExecutionProvider" in actual.reason
    assert caplog.records
    same = providers_in_use(_FakeSession([CUDA, CPU]), asked)
    assert same is asked


@pytest.fixture
def eight_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend the affinity mask holds 8 CPUs, so only the cgroup files limit."""
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: set(range(8)))


def _cgroup(tmp_path: Path, files: dict[str, str], self_cgroup: str = "0::/\n") -> tuple:
    root = tmp_path / "cgroup"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    root.mkdir(exist_ok=True)
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "cgroup").write_text(self_cgroup)
    return root, proc


@pytest.mark.usefixtures("eight_cpus")
@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({}, 8),  # no cgroup files: the affinity mask
        ({"cpu.max": "150000 100000\n"}, 2),  # 1.5 CPUs -> 2 threads
        ({"cpu.max": "200000 100000"}, 2),
        ({"cpu.max": "50000 100000"}, 1),  # half a CPU -> at least 1
        ({"cpu.max": "max 100000"}, 8),  # no limit
        ({"cpu.max": "1600000 100000"}, 8),  # quota above the mask: the mask wins
        ({"cpu.max": "garbage"}, 8),
        ({"cpu.max": "abc 100000"}, 8),
        ({"cpu/cpu.cfs_quota_us": "300000", "cpu/cpu.cfs_period_us": "100000"}, 3),  # v1
        ({"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, 8),  # v1: none
        ({"cpu,cpuacct/cpu.cfs_quota_us": "250000", "cpu,cpuacct/cpu.cfs_period_us": "100000"}, 3),
        ({"cpu/cpu.cfs_quota_us": "oops", "cpu/cpu.cfs_period_us": "100000"}, 8),
    ],
)
def test_available_cpus_from_cgroup_files(tmp_path: Path, files: dict, expected: int) -> None:
    root, proc = _cgroup(tmp_path, files)
    assert available_cpus(cgroup_root=root, proc_self=proc) == expected


@pytest.mark.usefixtures("eight_cpus")
def test_nested_cgroup_v2_limit_applies(tmp_path: Path) -> None:
    root, proc = _cgroup(
        tmp_path,
        {"cpu.max": "max 100000", "kubepods/pod1/cpu.max": "120000 100000"},
        self_cgroup="0::/kubepods/pod1\n",
    )
    assert available_cpus(cgroup_root=root, proc_self=proc) == 2


def test_available_cpus_on_this_machine_is_positive() -> None:
    assert 1 <= available_cpus() <= len(runtime.os.sched_getaffinity(0))


def test_session_options_spin_only_during_runs_and_optimize_fully() -> None:
    options = session_options(2)
    assert options.intra_op_num_threads == 2
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert options.get_session_config_entry("session.force_spinning_stop") == "1"
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    with pytest.raises(ValueError, match="choose one of all, extended, basic, none"):
        session_options(1, optimization="fast")
