"""What ``LoadedModel.load`` leaves to the server before a file from a client may serve:
the preprocessing fits the input, the batch axis is dynamic, and runs on zeros give one finite
row per sample and label (``check_servable``). The management API's validation runs it in a
child process (``service.core.validation``)."""

from __future__ import annotations

import numpy as np

from service.runtime.loaded_model import LoadedModel, ModelLoadError

# Guess for dynamic non-batch input dims the metadata does not size (as LoadedModel.warm_up).
_GUESSED_DIM = 32
_WARMUP_BATCH = 2  # > 1: proves the batch axis is really dynamic


def warmup_shape(model: LoadedModel) -> list[int]:
    """A concrete input shape for a validation run: batch 2, sizes from the preprocessing
    metadata for dynamic image dims, a guess for others."""
    shape = model.input_shape
    prep = model.preprocessing
    dims = [_WARMUP_BATCH]
    for axis, dim in enumerate(shape[1:], start=1):
        if dim is None:
            if prep is not None and len(shape) == 4:
                dim = prep.sample_shape()[axis - 1]
            else:
                dim = _GUESSED_DIM
        dims.append(dim)
    return dims


def check_servable(model: LoadedModel) -> None:
    """What ``LoadedModel.load`` leaves to the server: the preprocessing fits the input, the
    batch axis is dynamic, and a run gives one finite row per sample and label, with and
    without statistics. Raises ``ModelLoadError`` naming the problem."""
    path, shape, prep = model.path, model.input_shape, model.preprocessing
    if shape and shape[0] is not None:
        raise ModelLoadError(
            path,
            f"input {model.input_name!r} has a fixed batch size of {shape[0]}; the service "
            "batches requests together: export with a dynamic batch axis",
        )
    if prep is not None:
        if len(shape) != 4:
            raise ModelLoadError(
                path,
                f"the metadata's preprocessing makes images ({prep.layout}) but input "
                f"{model.input_name!r} has rank {len(shape)}",
            )
        names = (
            ("height", "width", "channels")
            if prep.layout == "NHWC"
            else ("channels", "height", "width")
        )
        for axis, (what, want) in enumerate(zip(names, prep.sample_shape(), strict=True), start=1):
            if shape[axis] is not None and shape[axis] != want:
                raise ModelLoadError(
                    path,
                    f"the metadata's preprocessing gives {what} {want} but input "
                    f"{model.input_name!r} has {shape[axis]} (dim {axis})",
                )
    x = np.zeros(warmup_shape(model), dtype=model.input_dtype)
    modes = ["none", "summary"] if model.has_statistics else ["none"]
    for mode in modes:
        try:
            result = model.run(x, mode)
        except Exception as exc:
            raise ModelLoadError(
                path, f"a run on zeros of shape {list(x.shape)} failed ({exc})"
            ) from exc
        out = result.probabilities
        labels = len(model.labels) if model.labels else None
        if out.ndim != 2 or out.shape[0] != x.shape[0] or (labels and out.shape[1] != labels):
            raise ModelLoadError(
                path,
                f"output {model.output_name!r} has shape {list(out.shape)} for a batch of "
                f"{x.shape[0]}; expected [{x.shape[0]}, {labels or 'classes'}]",
            )
        if not np.isfinite(out).all():
            raise ModelLoadError(path, "a run on zeros gave non-finite outputs")
