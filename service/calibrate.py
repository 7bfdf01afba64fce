"""``python -m service calibrate NAME --images DIR``: measure a model's reference profile.

The live monitor's drift compares live channel activity with a reference profile. Models
exported by our training code embed one; for any other model this command measures it: it
loads the model version from the repository as the service does, decodes and preprocesses the
images of DIR as the service does for that model (its own preprocessing: a model without one is
refused, since its clients' tensors cannot be known), runs them through the statistics session
and writes ``<root>/<name>/<version>/reference.json`` atomically. The repository then takes
that profile over the embedded one; a running service sees the new file at its next look at
the repository (``RELU_SERVE_REPOSITORY_POLL_S``) and loads the version again, or at once on
``POST /v1/admin/repository/reload``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from service.core.errors import ServiceError
from service.core.images import decode_image, preprocess_images, sniff_format
from service.core.reference import (
    REFERENCE_FILENAME,
    ProfileAccumulator,
    ReferenceFile,
    now_iso,
    write_reference,
)
from service.core.repository import ModelRepository, canonical_version
from service.metadata import Preprocessing, ReferenceProfile
from service.runtime.loaded_model import LoadedModel, ModelInputError, ModelLoadError
from service.settings import load_settings

BATCH = 32  # images decoded and run at a time


class CalibrationError(Exception):
    """Why a calibration cannot run; the command prints it and exits with status 1."""


def get_args_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m service calibrate``."""
    parser = argparse.ArgumentParser(
        prog="python -m service calibrate",
        description=__doc__.split("\n\n")[1].replace("``", "`") if __doc__ else None,
    )
    parser.add_argument("name", help="the model's name in the repository")
    parser.add_argument(
        "--version",
        help="the version to calibrate (default: the one that serves by default: the pinned "
        "one, else the highest)",
    )
    parser.add_argument(
        "--images",
        type=Path,
        required=True,
        help="folder of typical input images (PNG, JPEG, WEBP, BMP, GIF; other files skipped)",
    )
    parser.add_argument(
        "--model-root",
        type=Path,
        help="the model repository (default: RELU_SERVE_MODEL_ROOT, else models/)",
    )
    parser.add_argument(
        "--limit", type=int, help="use at most this many images (default: all of them)"
    )
    return parser


def main(argv: list[str]) -> int:
    """Run the command; returns the exit status."""
    args = get_args_parser().parse_args(argv)
    try:
        path, data, skipped = calibrate(
            args.name, args.images, version=args.version, root=args.model_root, limit=args.limit
        )
    except CalibrationError as exc:
        sys.stderr.write(f"calibrate: {exc}\n")
        return 1
    for line in skipped:
        sys.stderr.write(f"skipped {line}\n")
    sys.stdout.write(describe(data, path) + "\n")
    return 0


def calibrate(
    name: str,
    images: Path,
    *,
    version: str | None = None,
    root: Path | None = None,
    limit: int | None = None,
) -> tuple[Path, ReferenceFile, list[str]]:
    """Measure and write the reference profile of ``name`` (``version``, or its default) on
    the images in ``images``; returns where it was written, what, and the files skipped."""
    settings = load_settings()
    repo = ModelRepository(
        root or settings.model_root,
        providers=settings.providers,
        default_versions=settings.default_versions,
    )
    version = _pick_version(repo, name, version)
    path = repo.version_path(name, version)
    try:
        model = LoadedModel.load(path, name, version, providers=settings.providers)
    except ModelLoadError as exc:
        raise CalibrationError(str(exc)) from exc
    prep = model.preprocessing
    if prep is None:
        raise CalibrationError(
            f"model {name!r} version {version} has no preprocessing (no relu_serve metadata), "
            "so how its clients turn images into tensors is unknown and a profile measured on "
            "images would not describe its traffic; give the model its preprocessing first"
        )
    if not model.layers:
        raise CalibrationError(f"model {name!r} has no activation layers to profile")
    if not model.has_statistics:
        raise CalibrationError(f"model {name!r} has no statistics session: {model.stats_error}")
    if limit is not None and limit < 1:
        raise CalibrationError(f"--limit must be at least 1, got {limit}")
    accumulator = ProfileAccumulator(model.layers)
    skipped: list[str] = []
    batch: list[Image.Image] = []
    for image in _images(images, limit, settings.max_image_pixels, skipped):
        batch.append(image)
        if len(batch) == BATCH:
            _run(model, accumulator, batch, prep)
            batch = []
    if batch:
        _run(model, accumulator, batch, prep)
    if not accumulator.samples:
        raise CalibrationError(f"no image to measure in {images}")
    data = ReferenceFile(
        model=name,
        version=version,
        sha256=model.sha256,
        images=str(images.resolve()),
        created=now_iso(),
        reference=accumulator.profile(),
    )
    target = path.parent / REFERENCE_FILENAME
    try:
        write_reference(target, data)
    except OSError as exc:
        raise CalibrationError(f"cannot write {target}: {exc}") from exc
    return target, data, skipped


def _pick_version(repo: ModelRepository, name: str, version: str | None) -> str:
    """The version asked for, checked, or the one that serves ``name`` by default."""
    found = repo.discover_or_empty()
    if name not in found:
        listing = ", ".join(found) or "none"
        raise CalibrationError(
            f"unknown model {name!r} in {repo.root}; available models: {listing}"
        )
    if version is None:
        pin = repo.pin_of(name, repo.model_state(name))
        return pin if pin in found[name] else found[name][-1]
    try:
        version = canonical_version(version)
    except ValueError:
        version = str(version)
    if version not in found[name]:
        raise CalibrationError(
            f"model {name!r} has no version {version!r}; available versions: "
            f"{', '.join(found[name])}"
        )
    return version


def _images(
    folder: Path, limit: int | None, max_pixels: int, skipped: list[str]
) -> Iterator[Image.Image]:
    """The decoded images of ``folder`` in name order (at most ``limit``); other files and
    broken images are listed in ``skipped`` with the reason."""
    if not folder.is_dir():
        raise CalibrationError(f"--images {folder} is not a folder")
    taken = 0
    for file in sorted(p for p in folder.iterdir() if p.is_file()):
        if limit is not None and taken >= limit:
            return
        data = file.read_bytes()
        if sniff_format(data) is None:
            skipped.append(f"{file.name}: not an image")
            continue
        try:
            image = decode_image(data, max_pixels=max_pixels, name=file.name)
        except ServiceError as exc:
            skipped.append(f"{file.name}: {exc}")
            continue
        taken += 1
        yield image


def _run(
    model: LoadedModel,
    accumulator: ProfileAccumulator,
    batch: list[Image.Image],
    prep: Preprocessing,
) -> None:
    """Preprocess and run one batch of images with statistics, adding them up."""
    x = preprocess_images(batch, prep)  # (N, C, H, W) float32
    try:
        accumulator.add(model.run(x, "summary"))
    except ModelInputError as exc:
        raise CalibrationError(f"model {model.name!r}: {exc}") from exc


def describe(data: ReferenceFile, path: Path) -> str:
    """What was measured and where it was written, for the terminal."""
    profile: ReferenceProfile = data.reference
    lines = [
        f"model {data.model} version {data.version}: {profile.samples} images, "
        f"{len(profile.layers)} activation layers",
    ]
    width = max(len(name) for name in profile.layers)
    for name, layer in profile.layers.items():
        lines.append(
            f"  {name:<{width}}  {len(layer.channel_activity):>5} channels  inactive "
            f"{layer.inactive_fraction:.3f}  dead units {layer.dead_units}"
        )
    lines.append(f"wrote {path}")
    lines.append(
        "a running service loads the version again at its next look at the repository "
        "(RELU_SERVE_REPOSITORY_POLL_S), or at once on POST /v1/admin/repository/reload"
    )
    return "\n".join(lines)
