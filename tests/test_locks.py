"""The hashed lock files under requirements/ (written by scripts/lock with uv) against
pyproject.toml: every dependency that pyproject names is locked, at a version its range
allows, with hashes; the serving locks hold no torch and dev's torch is the CPU build; the
locks agree with one another; and every install path installs from them.

The checks never resolve anything (no network): scripts/lock does that. What they catch is a
pyproject edit without a new lock (a new dependency, a range that excludes the pin).
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO_ROOT = Path(__file__).resolve().parents[1]
LOCK_DIR = REPO_ROOT / "requirements"
PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
# The environments each lock is for: serve and gpu are universal (Python >= 3.11; the CPU
# image's base has 3.12, the local Debian stand-in and this machine 3.11, the CUDA base 3.12);
# dev is this machine's, Python 3.11 on Linux.
LINUX_311 = {
    "python_version": "3.11",
    "python_full_version": "3.11.0",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
}
LINUX_312 = {**LINUX_311, "python_version": "3.12", "python_full_version": "3.12.0"}
ENVIRONMENTS = {"serve": [LINUX_311, LINUX_312], "gpu": [LINUX_312, LINUX_311], "dev": [LINUX_311]}


@dataclass(frozen=True)
class Pin:
    name: str  # canonical
    version: Version
    marker: Marker | None
    hashes: tuple[str, ...]


def read_lock(path: Path) -> dict[str, list[Pin]]:
    """The pins of a pip requirements file as uv writes it (``name==version ; marker \\``
    then ``--hash=sha256:...`` lines), by canonical name: a universal lock may pin one name
    twice under exclusive markers."""
    text = re.sub(r"\\\n", " ", path.read_text())
    pins: dict[str, list[Pin]] = {}
    for raw in text.splitlines():
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        assert not line.startswith("-"), f"{path.name}: option line {line!r}"
        hashes = tuple(re.findall(r"--hash=(sha256:[0-9a-f]{64})", line))
        requirement = Requirement(re.sub(r"\s--hash=\S+", "", line).strip())
        (spec,) = requirement.specifier
        assert spec.operator == "==", f"{path.name}: {line!r} is not pinned with =="
        name = canonicalize_name(requirement.name)
        pins.setdefault(name, []).append(
            Pin(name, Version(spec.version), requirement.marker, hashes)
        )
    return pins


def applies(marker: Marker | None, environment: dict[str, str], extras=("",)) -> bool:
    return marker is None or any(
        marker.evaluate({**environment, "extra": extra}) for extra in extras
    )


def gpu_requirement(text: str) -> str:
    """A [project] dependency as requirements/gpu.txt has it: onnxruntime -> onnxruntime-gpu."""
    return re.sub(r"^onnxruntime(?=[^-\w.]|$)", "onnxruntime-gpu", text)


def declared(lock: str) -> list[Requirement]:
    """What pyproject.toml asks of a lock."""
    serving = PYPROJECT["dependencies"]
    if lock == "serve":
        return [Requirement(text) for text in serving]
    if lock == "gpu":
        return [Requirement(gpu_requirement(text)) for text in serving]
    extras = PYPROJECT["optional-dependencies"]
    return [Requirement(text) for text in [*serving, *extras["train"], *extras["dev"]]]


def problems(requirements: list[Requirement], pins: dict[str, list[Pin]],
             environments: list[dict[str, str]]) -> list[str]:  # fmt: skip
    """Every way ``pins`` fail to cover ``requirements`` in ``environments``: a requirement
    missing, or pinned at a version outside its range, or a pin without hashes."""
    found = []
    for requirement in requirements:
        name = canonicalize_name(requirement.name)
        for environment in environments:
            if not applies(requirement.marker, environment):
                continue
            chosen = [pin for pin in pins.get(name, []) if applies(pin.marker, environment)]
            if len(chosen) != 1:
                found.append(
                    f"{requirement}: {len(chosen)} pins for {environment['python_version']}"
                )
                continue
            (pin,) = chosen
            if not requirement.specifier.contains(pin.version, prereleases=True):
                found.append(f"{requirement}: locked at {pin.version}")
    for pin_list in pins.values():
        found += [f"{pin.name}=={pin.version}: no hashes" for pin in pin_list if not pin.hashes]
    return found


LOCKS = {name: read_lock(LOCK_DIR / f"{name}.txt") for name in ("serve", "gpu", "dev")}


@pytest.mark.parametrize("lock", LOCKS)
def test_lock_covers_every_dependency_pyproject_names(lock: str) -> None:
    assert problems(declared(lock), LOCKS[lock], ENVIRONMENTS[lock]) == []


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ("fastapi>=0.115,<0.116", "fastapi<0.116,>=0.115: locked at"),
        ("left-pad>=1", "left-pad>=1: 0 pins"),
    ],
    ids=["range-excludes-pin", "undeclared-in-lock"],
)
def test_coverage_check_catches_a_pyproject_edit_without_a_new_lock(change, expected) -> None:
    """The check above is not vacuous: a narrowed range or a new dependency fails it."""
    requirements = [*declared("serve"), Requirement(change)]
    found = problems(requirements, LOCKS["serve"], ENVIRONMENTS["serve"])
    assert any(problem.startswith(expected) for problem in found), found
    unhashed = {"numpy": [Pin("numpy", Version("2.0"), None, ())]}
    assert problems([Requirement("numpy>=1")], unhashed, [LINUX_311]) == ["numpy==2.0: no hashes"]


def test_every_pin_is_hashed_and_every_lock_names_its_command() -> None:
    for name, pins in LOCKS.items():
        assert pins, name
        assert all(pin.hashes for pin_list in pins.values() for pin in pin_list), name
        header = (LOCK_DIR / f"{name}.txt").read_text().split("\n\n", 1)[0]
        assert "scripts/lock" in header
        assert re.search(
            rf"uv pip compile .*--generate-hashes.* -o requirements/{name}\.txt", header
        )


def test_serving_locks_have_no_torch_and_dev_has_the_cpu_build() -> None:
    for name in ("serve", "gpu"):
        assert not {"torch", "torchvision", "triton"} & set(LOCKS[name]), name
    assert "onnxruntime" in LOCKS["serve"]
    assert "onnxruntime-gpu" not in LOCKS["serve"]
    assert "onnxruntime-gpu" in LOCKS["gpu"]
    assert "onnxruntime" not in LOCKS["gpu"]  # both install the module onnxruntime
    (torch,) = LOCKS["dev"]["torch"]
    assert torch.version.local == "cpu", torch.version  # the wheel on disk, not PyPI's CUDA one
    assert not [name for name in LOCKS["dev"] if name.startswith("nvidia-") or name == "triton"]


def test_locks_agree_on_shared_packages() -> None:
    """gpu.txt and dev.txt are compiled against serve.txt: the tests run what the images ship."""
    serve = {name: [pin.version for pin in pins] for name, pins in LOCKS["serve"].items()}
    for other in ("gpu", "dev"):
        for name, pins in LOCKS[other].items():
            if name in serve:
                assert [pin.version for pin in pins] == serve[name], (other, name)


@pytest.mark.parametrize(
    ("script", "lock"),
    [("scripts/serve", "requirements/serve.txt"), ("scripts/test", "requirements/dev.txt")],
)
def test_scripts_install_from_the_lock(script: str, lock: str) -> None:
    text = re.sub(r"\\\n\s*", " ", (REPO_ROOT / script).read_text())
    installs = [
        line.split("pip install", 1)[1].split()
        for line in text.splitlines()
        if "pip install" in line and not line.lstrip().startswith("#")
    ]
    expanded = [[lock if arg == '"$lock"' else arg for arg in args] for args in installs]
    assert len(expanded) == 2, installs
    locked, project = expanded
    assert {"--require-hashes", "--no-deps"} <= set(locked)
    assert locked[locked.index("-r") + 1] == lock
    assert "--no-deps" in project
    assert project[-2:] == ["-e", "."]  # the project itself, no extras: nothing unlocked
