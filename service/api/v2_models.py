"""A model version as v2 clients see it: the outputs they may ask for, and Triton's config.

Outputs (``output_catalogue``): every per-sample output of the model (the classifier's first,
then e.g. an embedding beside it), ``probabilities``, and the statistics as extra named
outputs ``stats/<layer>/<statistic>``. The statistics are named as in /v1 (``channel_activity``,
``inactive_fraction``, ``dead_units``, ``mean``, ``std``, ``min``, ``max``,
``saturated_fraction``); the layer part is the layer's name made clean (``v2_layer_names``),
so that a legacy exporter's ``/relu/Relu`` gives ``stats/relu/Relu/channel_activity``, not
``stats//relu/Relu/active_rate``. The catalogue maps each name back to its layer and statistic.

Configuration (``model_configuration``): the JSON of Triton's ``ModelConfig`` (model_config.proto)
that ``GET /v2/models/{name}/config`` answers, per Triton's model configuration extension:
https://github.com/triton-inference-server/server/blob/main/docs/protocol/extension_model_configuration.md
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from service.api.v2_codec import NP_TO_V2, PLATFORM
from service.metadata import SATURATING_KINDS
from service.runtime.loaded_model import LoadedModel
from service.settings import ServiceSettings

PROBABILITIES = "probabilities"
STATS_PREFIX = "stats/"
# Per channel, the share of its elements that are active: (N, C) in v2, one row per sample.
CHANNEL_ACTIVITY = "channel_activity"
# Summary statistics per layer over the request: scalar outputs of shape [1].
SUMMARY_STATISTICS = ("inactive_fraction", "dead_units", "mean", "std", "min", "max")
SATURATED_FRACTION = "saturated_fraction"  # sigmoid and tanh (saturating kinds) only
BACKEND = "onnxruntime"
# Providers whose sessions run on a GPU: Triton's KIND_GPU instance groups.
_GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider", "ROCMExecutionProvider")


@dataclass(frozen=True)
class OutputSpec:
    """One output a client may ask for: its v2 datatype and shape (-1: variable), and for a
    statistic the layer (its name in the model and in /v1) and the statistic's name."""

    datatype: str
    shape: list[int]
    layer: str | None = None
    statistic: str | None = None


def clean_layer_name(name: str) -> str:
    """``name`` with leading and trailing '/' removed and runs of '/' made one; "layer" if
    nothing is left."""
    return "/".join(part for part in name.split("/") if part) or "layer"


def v2_layer_names(names: list[str]) -> dict[str, str]:
    """Layer name -> its clean name in v2 output names, one per layer: names already clean
    keep themselves; another whose clean form is taken gets ``_2``, ``_3``... appended."""
    taken = {name for name in names if clean_layer_name(name) == name}
    out: dict[str, str] = {name: name for name in names if name in taken}
    for name in names:
        if name in out:
            continue
        base = candidate = clean_layer_name(name)
        n = 1
        while candidate in taken:
            n += 1
            candidate = f"{base}_{n}"
        taken.add(candidate)
        out[name] = candidate
    return out


# Per model version, built once: ``model.info()`` builds a fresh dict on every call.
_CATALOGUES: weakref.WeakKeyDictionary[LoadedModel, dict[str, OutputSpec]] = (
    weakref.WeakKeyDictionary()
)


def output_catalogue(model: LoadedModel) -> dict[str, OutputSpec]:
    """Every output a client may ask for, by name, in the order metadata lists them."""
    catalogue = _CATALOGUES.get(model)
    if catalogue is None:
        catalogue = _CATALOGUES[model] = _build_catalogue(model)
    return catalogue


def v2_datatype(dtype_name: str) -> str:
    """The v2 datatype of a numpy dtype name (``float32`` -> ``FP32``)."""
    try:
        return NP_TO_V2[np.dtype(dtype_name)]
    except (TypeError, KeyError):
        raise ValueError(f"no v2 datatype for {dtype_name!r}") from None


def _build_catalogue(model: LoadedModel) -> dict[str, OutputSpec]:
    info = model.info()
    num_classes = len(info["labels"]) if info.get("labels") else -1
    catalogue: dict[str, OutputSpec] = {}
    for spec in info["outputs"]:
        shape = [-1, *spec["shape"][1:]]
        if spec["name"] == model.output_name:
            shape = [-1, num_classes]
        try:
            catalogue[spec["name"]] = OutputSpec(v2_datatype(spec["dtype"]), shape)
        except ValueError:  # an output of a type v2 cannot carry here (strings): not served
            continue
    catalogue[PROBABILITIES] = OutputSpec("FP32", [-1, num_classes])
    layers = info["activation_layers"] if info.get("statistics", True) else []  # no session
    clean = v2_layer_names([layer["name"] for layer in layers])
    for layer in layers:
        name = layer["name"]
        prefix = f"{STATS_PREFIX}{clean[name]}/"
        catalogue[prefix + CHANNEL_ACTIVITY] = OutputSpec(
            "FP32", [-1, int(layer["channels"])], name, CHANNEL_ACTIVITY
        )
        for statistic in SUMMARY_STATISTICS:
            datatype = "INT32" if statistic == "dead_units" else "FP32"
            catalogue[prefix + statistic] = OutputSpec(datatype, [1], name, statistic)
        if layer["kind"] in SATURATING_KINDS or layer["kind"] in ("Sigmoid", "Tanh"):
            catalogue[prefix + SATURATED_FRACTION] = OutputSpec(
                "FP32", [1], name, SATURATED_FRACTION
            )
    return catalogue


def default_outputs(model: LoadedModel) -> list[str]:
    """What an infer request that names no outputs gets: every output of the model, as
    Triton sends, and the probabilities; statistics only when asked (they cost a run)."""
    return [name for name, spec in output_catalogue(model).items() if spec.statistic is None]


def _triton_type(datatype: str) -> str:
    """v2 datatype -> model_config.proto DataType (``FP32`` -> ``TYPE_FP32``)."""
    return "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"


def model_configuration(model: LoadedModel, settings: ServiceSettings) -> dict[str, Any]:
    """Triton's ``ModelConfig`` of the model version as JSON.

    ``max_batch_size`` is the most samples a request may carry (``max_batch_size`` setting)
    when the model's batch axis is dynamic, and then ``dims`` leave the batch axis out;
    0 when the model fixes it (``dims`` are then the full shape). ``dynamic_batching``
    comes from the batching settings, ``instance_group`` from the provider in use and the
    inference worker threads. The statistics outputs (not per sample, so not expressible as
    Triton outputs of a batching model) are listed in ``parameters.activation_statistics``,
    a JSON string: output name -> layer, statistic, datatype and shape."""
    info = model.info()
    batched = model.input_shape[0] is None
    catalogue = output_catalogue(model)

    def dims(shape: list[int]) -> list[int]:
        return list(shape[1:]) if batched else list(shape)

    inputs = [
        {
            "name": model.input_name,
            "data_type": "TYPE_FP32",
            "format": "FORMAT_NONE",
            "dims": dims(list(info["input"]["shape"])),
        }
    ]
    batch_size = int(model.input_shape[0] or 1)
    outputs = []
    for name, spec in catalogue.items():
        if spec.statistic is not None:
            continue
        shape = spec.shape if batched else [batch_size, *spec.shape[1:]]
        outputs.append(
            {"name": name, "data_type": _triton_type(spec.datatype), "dims": dims(shape)}
        )
    statistics = {
        name: {
            "layer": spec.layer,
            "statistic": spec.statistic,
            "datatype": spec.datatype,
            "shape": spec.shape,
        }
        for name, spec in catalogue.items()
        if spec.statistic is not None
    }
    max_size, delay_s = settings.batching_for(model.name, model.config)
    gpu = model.providers.used[0] in _GPU_PROVIDERS
    config: dict[str, Any] = {
        "name": model.name,
        "platform": PLATFORM,
        "backend": BACKEND,
        "max_batch_size": settings.max_batch_size if batched else 0,
        "input": inputs,
        "output": outputs,
        "instance_group": [
            {
                "name": model.name,
                "kind": "KIND_GPU" if gpu else "KIND_CPU",
                "count": settings.inference_workers,
            }
        ],
        "default_model_filename": model.path.name,
        "parameters": {
            "version": {"string_value": str(model.version)},
            "providers_used": {"string_value": ",".join(model.providers.used)},
            "sha256": {"string_value": model.sha256},
            "activation_statistics": {"string_value": orjson.dumps(statistics).decode()},
        },
    }
    if batched and max_size > 1:
        config["dynamic_batching"] = {
            "preferred_batch_size": [max_size],
            "max_queue_delay_microseconds": round(delay_s * 1_000_000),
        }
    return config
