"""onnxruntime execution providers, session options and the CPUs this process may use.

A fall-back from the requested provider is loud (SPEC): ``resolve_providers`` logs a WARNING
and says so in the returned ``ProviderChoice``; ``strict`` turns it into an error. After a
session exists, ``providers_in_use`` reads what onnxruntime actually took.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
# Short names accepted in settings -> onnxruntime provider names.
PROVIDER_ALIASES: dict[str, str] = {
    "cpu": CPU,
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "migraphx": "MIGraphXExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "dml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "dnnl": "DnnlExecutionProvider",
    "qnn": "QNNExecutionProvider",
    "webgpu": "WebGpuExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
}


# Options the service gives a provider it creates a session with. CUDA: no TF32. onnxruntime's
# CUDA provider multiplies in TF32 by default, which moved ResNet-20's probabilities by up to
# 2.9e-3 from the CPU provider's on an H100 (one top-1 label of 64 changed); with it off they
# agree to 7e-6 (bench/results/gpu-h100.json).
PROVIDER_OPTIONS: dict[str, dict[str, str]] = {"CUDAExecutionProvider": {"use_tf32": "0"}}


def with_options(providers: Sequence[str]) -> list[str | tuple[str, dict[str, str]]]:
    """``providers`` as ``InferenceSession`` takes them, each with its ``PROVIDER_OPTIONS``."""
    return [(p, PROVIDER_OPTIONS[p]) if p in PROVIDER_OPTIONS else p for p in providers]


class ProviderUnavailableError(RuntimeError):
    """A requested execution provider is not available and fall-back is not allowed."""


@dataclass(frozen=True)
class ProviderChoice:
    """What was asked for, what will be used, and why they differ."""

    requested: tuple[str, ...]
    used: tuple[str, ...]
    fell_back: bool
    reason: str | None = None

    def to_dict(self) -> dict:
        """Plain form for metadata endpoints."""
        return {
            "requested": list(self.requested),
            "used": list(self.used),
            "fell_back": self.fell_back,
            "reason": self.reason,
        }


def _known_provider_names() -> set[str]:
    try:
        return set(ort.get_all_providers())
    except AttributeError:  # very old onnxruntime builds
        return set(PROVIDER_ALIASES.values())


def provider_name(name: str) -> str:
    """The onnxruntime name of a provider given by short name (cuda) or full name."""
    key = name.strip()
    if key.lower() in PROVIDER_ALIASES:
        return PROVIDER_ALIASES[key.lower()]
    if key in _known_provider_names() or key in PROVIDER_ALIASES.values():
        return key
    choices = ", ".join(sorted(PROVIDER_ALIASES))
    raise ValueError(
        f"unknown execution provider {name!r}; use one of {choices} or a full onnxruntime "
        f"name such as {CPU}"
    )


def resolve_providers(
    requested: str | Sequence[str],
    available: Sequence[str] | None = None,
    strict: bool = False,
) -> ProviderChoice:
    """Map requested providers (short or full names, in preference order) onto the available
    ones. A missing one is an error with ``strict``, else a logged WARNING and a fall-back to
    what is available; CPU always comes last as the final fall-back."""
    if isinstance(requested, str):
        requested = [part for part in requested.split(",") if part.strip()]
    wanted = [provider_name(p) for p in requested] or [CPU]
    available = list(ort.get_available_providers() if available is None else available)
    missing = [p for p in wanted if p not in available]
    if missing and strict:
        raise ProviderUnavailableError(
            f"execution provider(s) {', '.join(missing)} not available in this onnxruntime "
            f"build; available: {', '.join(available)}"
        )
    used = [p for p in wanted if p in available]
    if CPU not in used and CPU in available:
        used.append(CPU)
    reason = None
    if missing:
        reason = (
            f"requested {', '.join(missing)} not available (available: {', '.join(available)}); "
            f"using {', '.join(used)}"
        )
        log.warning("execution provider fall-back: %s", reason)
    return ProviderChoice(tuple(wanted), tuple(used), bool(missing), reason)


def providers_in_use(session: ort.InferenceSession, choice: ProviderChoice) -> ProviderChoice:
    """``choice`` updated with the providers the created session really uses.

    onnxruntime may drop a provider that is compiled in but fails to initialise (a CUDA build
    on a machine without a driver); that is a fall-back too, and it is logged.
    """
    actual = tuple(session.get_providers())
    if actual == choice.used:
        return choice
    dropped = [p for p in choice.used if p not in actual]
    if not dropped:
        return ProviderChoice(choice.requested, actual, choice.fell_back, choice.reason)
    reason = f"onnxruntime did not initialise {', '.join(dropped)}; using {', '.join(actual)}"
    if choice.reason:
        reason = f"{choice.reason}; {reason}"
    fell_back = any(p in choice.requested for p in dropped) or choice.fell_back
    if fell_back:
        log.warning("execution provider fall-back: %s", reason)
    return ProviderChoice(choice.requested, actual, fell_back, reason)


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _cgroup_v2_limit(root: Path) -> float | None:
    """CPUs allowed by cgroup v2 ``cpu.max`` ("quota period" or "max period")."""
    text = _read(root / "cpu.max")
    if not text:
        return None
    parts = text.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        quota, period = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _cgroup_v1_limit(root: Path) -> float | None:
    """CPUs allowed by cgroup v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (-1: none)."""
    for folder in (root / "cpu", root / "cpu,cpuacct", root / "cpuacct,cpu"):
        quota_text = _read(folder / "cpu.cfs_quota_us")
        period_text = _read(folder / "cpu.cfs_period_us")
        if quota_text is None or period_text is None:
            continue
        try:
            quota, period = int(quota_text), int(period_text)
        except ValueError:
            continue
        if quota > 0 and period > 0:
            return quota / period
        return None
    return None


def _self_cgroup_dirs(cgroup_root: Path, proc_self: Path) -> list[Path]:
    """This process's cgroup v2 folder (from /proc/self/cgroup) and its ancestors up to the
    root: a limit on any of them applies."""
    text = _read(proc_self / "cgroup")
    for line in (text or "").splitlines():
        # The v2 line is "0::/path"; inside a container it is usually "0::/".
        hierarchy, _, path = line.partition("::")
        if hierarchy == "0" and path:
            folder = cgroup_root / path.strip().lstrip("/")
            dirs = [folder, *folder.parents]
            return [d for d in dirs if d == cgroup_root or cgroup_root in d.parents]
    return [cgroup_root]


def available_cpus(
    cgroup_root: str | Path = "/sys/fs/cgroup", proc_self: str | Path = "/proc/self"
) -> int:
    """CPUs this process may really use: the least of the affinity mask, the cgroup v2 quota
    and the cgroup v1 CFS quota, rounded up, at least 1 (a container limited to 1.5 CPUs
    gets 2 threads; os.cpu_count() would report the host's cores)."""
    root = Path(cgroup_root)
    try:
        limits: list[float] = [len(os.sched_getaffinity(0))]
    except (AttributeError, OSError):  # not Linux
        limits = [os.cpu_count() or 1]
    for folder in _self_cgroup_dirs(root, Path(proc_self)):
        v2 = _cgroup_v2_limit(folder)
        if v2 is not None:
            limits.append(v2)
    v1 = _cgroup_v1_limit(root)
    if v1 is not None:
        limits.append(v1)
    return max(1, math.ceil(min(limits) - 1e-9))


def session_options(
    intra_op_threads: int | None = None, *, optimization: str = "all"
) -> ort.SessionOptions:
    """Session options for serving: ``intra_op_threads`` (default: ``available_cpus()``),
    spinning only during a run, full graph optimization."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads or available_cpus()
    # One op at a time: parallelism comes from intra-op threads and concurrent requests.
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Intra-op threads spin while a run is in progress (the worker is ready for the next
    # parallel section at once) and stop spinning when it returns, so an idle session leaves
    # the event loop its core. Not spinning at all meant a thread wake-up for every
    # parallelised node: ResNet-20 at batch 32 ran 1.04x slower, its statistics session
    # 1.2x slower (the ~115 small statistic nodes), ~10% fewer requests/s at 64 clients.
    options.add_session_config_entry("session.intra_op.allow_spinning", "1")
    options.add_session_config_entry("session.force_spinning_stop", "1")
    levels = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }
    if optimization not in levels:
        raise ValueError(
            f"unknown optimization level {optimization!r}; choose one of {', '.join(levels)}"
        )
    options.graph_optimization_level = levels[optimization]
    # Quiet: onnxruntime warns about every unused initializer it removes (level 2 = warning).
    options.log_severity_level = 3
    return options
