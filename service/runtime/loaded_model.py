"""One loaded model version: two onnxruntime sessions, input checks, statistics.

``LoadedModel.load`` reads an ONNX file once and builds

- the *plain* session: the model as exported; a request without statistics runs it and pays
  nothing for them (SPEC: extra nodes slow every run, even when their outputs are not fetched,
  and ``RunOptions.only_execute_path_to_fetches`` does not help; we measured the same);
- the *statistics* session: the model plus the reduction nodes of ``service.runtime.instrument``.

Typed errors carry no HTTP status (the HTTP layer maps them): ``ModelInputError`` for a bad
request tensor or option, ``ModelLoadError`` for a file that cannot be served.
"""

from __future__ import annotations

import hashlib
import logging
import math
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper
from pydantic import ValidationError

from service.metadata import ModelMetadata, Preprocessing, ReferenceProfile
from service.model_config import (
    ModelConfig,
    observed_layers,
    resolve_preprocessing,
)
from service.runtime.activations import ActivationNode, find_activation_nodes, infer_tensor_shapes
from service.runtime.instrument import STATS_OUTPUT, StatsLayout, instrument_model
from service.runtime.providers import (
    CPU,
    ProviderChoice,
    providers_in_use,
    resolve_providers,
    session_options,
    with_options,
)
from service.runtime.summaries import (
    LayerSummary,
    per_sample_active,
    request_rows,
    summarize_requests,
)

log = logging.getLogger(__name__)

StatsMode = Literal["none", "summary", "channels"]
STATS_MODES: tuple[str, ...] = ("none", "summary", "channels")

# ONNX tensor element types -> numpy dtypes, for the input check.
_ORT_DTYPES: dict[str, np.dtype] = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(double)": np.dtype(np.float64),
    "tensor(uint8)": np.dtype(np.uint8),
    "tensor(int8)": np.dtype(np.int8),
}
# ... and for the other types a model's extra outputs may have.
_ORT_OUTPUT_DTYPES: dict[str, np.dtype] = {
    "tensor(int32)": np.dtype(np.int32),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(int16)": np.dtype(np.int16),
    "tensor(uint16)": np.dtype(np.uint16),
    "tensor(uint32)": np.dtype(np.uint32),
    "tensor(uint64)": np.dtype(np.uint64),
    "tensor(bool)": np.dtype(np.bool_),
}
# Models doing fewer multiply-accumulates per sample run with one intra-op thread: a second
# thread cannot speed up runs this short, and a run waits for it when the scheduler hands
# its core to another thread. The default model (1.5 M) at one client: p50 0.40 -> 0.33 ms,
# p99 3.7 -> 0.6 ms, 2,000 -> 3,000 req/s. ResNet-20 (41 M) keeps its threads.
SMALL_MODEL_MACS = 4_000_000
# Initializers smaller than this are not worth sharing between the two sessions.
_SHARE_MIN_BYTES = 1024
# Guess for dynamic non-batch input dims at warm-up when nothing says better.
_WARMUP_DIM = 32
# Samples a NonFiniteOutputError names one by one; more are counted.
_NAMED_SAMPLES = 10

# On a GPU provider every new input shape makes onnxruntime plan each convolution again
# (onnxruntime-gpu 1.31, cuDNN 9, H100, ResNet-20: 130-390 ms per run with the batch sizes
# dynamic batching forms, 0.5-0.9 ms per run at one size; 105 -> 7,191 req/s at 64 clients,
# bench/results/gpu-h100.json and gpu-h100-fixed.json). So there, runs are padded with zero
# rows to one batch size, ``LoadedModel.load``'s ``gpu_batch`` (the batcher's largest), and
# warmed up at it.


class ModelInputError(ValueError):
    """The request's tensor or options do not fit the model; the message names the problem."""


class NonFiniteOutputError(ModelInputError):
    """The model's output for some of a request's samples is NaN or infinite: the input is
    finite but overflows inside the model. ``samples``: their indices within the request."""

    def __init__(self, model: str, samples: Sequence[int]) -> None:
        self.samples = list(samples)
        super().__init__(
            f"model {model!r}: the output for {_samples_text(self.samples)} is not finite (NaN "
            "or infinity): the input is finite but overflows inside the model; send inputs "
            "scaled as the model expects (its preprocessing)"
        )


def _samples_text(samples: Sequence[int]) -> str:
    """``sample 3``, ``samples 0, 2``, or the first ``_NAMED_SAMPLES`` and a count."""
    shown = ", ".join(map(str, samples[:_NAMED_SAMPLES]))
    if len(samples) > _NAMED_SAMPLES:
        shown += f" and {len(samples) - _NAMED_SAMPLES} more"
    return f"sample {shown}" if len(samples) == 1 else f"samples {shown}"


class ModelLoadError(RuntimeError):
    """A model file cannot be served; the message names the file and the reason."""

    def __init__(self, path: Path | str, reason: str):
        super().__init__(f"cannot load model {path}: {reason}")
        self.path = Path(path)
        self.reason = reason


@dataclass
class RunResult:
    """The answer of one run: per-sample logits and probabilities, optional statistics, and
    the model's other per-sample outputs (``LoadedModel.extra_outputs``) by name."""

    logits: np.ndarray  # (N, K) float32: the model's raw output
    probabilities: np.ndarray  # (N, K) float32
    layer_stats: list[LayerSummary] | None = None
    per_sample_active: Mapping[str, np.ndarray] | None = None  # layer -> (N, C) active rates
    outputs: Mapping[str, np.ndarray] = field(default_factory=dict)  # name -> (N, ...)


def softmax(x: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (N, K) scores, computed stably in float64, returned as float32."""
    z = x.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z.astype(np.float32)


# Up to this many probabilities in all, ``top_k`` sorts in Python (stable, like the numpy
# path: ties keep label order), which beats numpy's per-call overhead.
_SMALL_TOP_K = 256


def top_k(probabilities: np.ndarray, k: int, labels: Sequence[str]) -> list[list[dict]]:
    """The ``k`` most probable labels of each row of (N, K) (or (K,)) probabilities, best
    first: ``[[{"label", "index", "probability"}, ...], ...]``; ties keep label order."""
    if k < 1:
        raise ModelInputError(f"top_k must be at least 1, got {k}")
    probs = np.atleast_2d(probabilities)
    if probs.shape[1] != len(labels):
        raise ValueError(f"{probs.shape[1]} probabilities per sample but {len(labels)} labels")
    k = min(k, probs.shape[1])
    rows = probs.tolist()
    if probs.size <= _SMALL_TOP_K:  # a few samples of a few classes: Python is quicker
        order = [sorted(range(len(row)), key=row.__getitem__, reverse=True)[:k] for row in rows]
    else:
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k].tolist()  # (N, k)
    return [
        [{"label": labels[i], "index": i, "probability": row[i]} for i in idx]
        for row, idx in zip(rows, order, strict=True)
    ]


def multiply_accumulates(
    model: onnx.ModelProto, shapes: dict[str, list[int | str | None]]
) -> int | None:
    """Multiply-accumulates per sample of the model's Conv, Gemm and MatMul nodes (from the
    weight shapes and the output shapes at batch 1); None if a shape is unknown."""
    weights = {init.name: list(init.dims) for init in model.graph.initializer}
    total = 0
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or node.domain not in ("", "ai.onnx"):
            continue
        weight = weights.get(node.input[1]) if len(node.input) > 1 else None
        out = shapes.get(node.output[0])
        if not weight or not out or not all(isinstance(d, int) for d in out[1:]):
            return None
        per_output = math.prod(weight[1:]) if node.op_type == "Conv" else weight[0]
        if node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute):
            per_output = weight[1]
        total += math.prod(out[1:]) * per_output  # type: ignore[arg-type]
    return total


def _is_small(macs: int | None) -> bool:
    return macs is not None and macs < SMALL_MODEL_MACS


def _real_inputs(graph: onnx.GraphProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that are not initializers (IR < 4 lists weights as inputs too)."""
    inits = {i.name for i in graph.initializer}
    return [i for i in graph.input if i.name not in inits]


def _dims(info: onnx.ValueInfoProto) -> list[int | None]:
    """Static dims as ints, dynamic ones (dim_param or unset) as None."""
    return [
        d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
        for d in info.type.tensor_type.shape.dim
    ]


def _create_session(
    source: onnx.ModelProto | Path, options: ort.SessionOptions, providers: list[str]
) -> ort.InferenceSession:
    """A session from a file, or from a model written to a temporary file first.

    onnxruntime's Python ``InferenceSession`` keeps the bytes it was created from for as long
    as the session lives ("TODO: This is bad as we're holding the memory indefinitely" in
    onnxruntime_inference_collection.py): a second copy of every weight, twice per model
    version. From a path it keeps only the path, so the temporary file can go at once.
    ``disable_fallback``: onnxruntime would otherwise re-create a failing CUDA/TensorRT
    session on CPU during a run, silently; our fall-back happens at load time, loudly.
    """
    if isinstance(source, Path):
        session = ort.InferenceSession(str(source), options, providers=with_options(providers))
    else:
        with tempfile.TemporaryDirectory(prefix="relu-serve-") as folder:
            file = Path(folder) / "model.onnx"
            onnx.save(source, str(file))
            session = ort.InferenceSession(str(file), options, providers=with_options(providers))
    session.disable_fallback()
    return session


def _output_kind(graph: onnx.GraphProto, output: str) -> str:
    """'probabilities' when the output comes from a Softmax, 'log_probabilities' from a
    LogSoftmax, else 'logits'."""
    for node in graph.node:
        if output in node.output:
            if node.op_type == "Softmax":
                return "probabilities"
            if node.op_type == "LogSoftmax":
                return "log_probabilities"
    return "logits"


def _extra_outputs(
    graph: onnx.GraphProto,
    output_name: str,
    shapes: Mapping[str, list[int | str | None]],
    batch: int | None,
) -> tuple[str, ...]:
    """The graph outputs beside ``output_name`` that have the batch axis first (a dynamic
    first dimension, or the input's fixed batch size), so that a merged run can be split back
    into its requests' rows: an embedding beside the logits, say. Others are not served.

    The graph's declared shape decides; an output declared without one goes by ``shapes``,
    inferred at batch 1, so there a first dimension of 1 is taken for the batch axis."""
    extra = []
    for out in graph.output:
        if out.name == output_name:
            continue
        declared = out.type.tensor_type.HasField("shape")
        dims: Sequence[int | str | None] = _dims(out) if declared else shapes.get(out.name) or []
        first = dims[0] if dims else 0  # a scalar: not per sample
        inferred_first = batch or 1  # the shapes inferred at batch 1
        if (first is None or first == batch) if declared else (first == inferred_first):
            extra.append(out.name)
    return tuple(extra)


def _read_onnx(path: Path) -> tuple[onnx.ModelProto, str]:
    """The checked model, external weights loaded, and the SHA-256 of the file."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelLoadError(path, f"cannot read the file ({exc.strerror or exc})") from exc
    try:
        model = onnx.load_from_string(data)
        if model.graph.initializer and any(
            i.data_location == onnx.TensorProto.EXTERNAL for i in model.graph.initializer
        ):
            onnx.load_external_data_for_model(model, str(path.parent))
        onnx.checker.check_model(model)
    except Exception as exc:  # protobuf DecodeError, ValidationError, missing external data
        raise ModelLoadError(path, f"not a valid ONNX model ({exc})") from exc
    return model, hashlib.sha256(data).hexdigest()


def _check_interface(
    path: Path,
    model: onnx.ModelProto,
    metadata: ModelMetadata | None,
    shapes: Mapping[str, list[int | str | None]],
    config_labels: list[str] | None = None,
) -> tuple[onnx.ValueInfoProto, str, list[str] | None]:
    """The graph's one input, the output the service reads and the labels (the
    configuration's, else the metadata's), checked against the metadata when there is some
    (foreign models: the first output, labels "0".."K-1")."""
    graph = model.graph
    inputs = _real_inputs(graph)
    if len(inputs) != 1:
        raise ModelLoadError(
            path, f"expected one input tensor, found {len(inputs)}: {[i.name for i in inputs]}"
        )
    input_info = inputs[0]
    output_names = [o.name for o in graph.output]
    output_name = metadata.output_name if metadata else output_names[0]
    if metadata and metadata.input_name != input_info.name:
        raise ModelLoadError(
            path, f"metadata input_name {metadata.input_name!r} is not the graph's input "
            f"{input_info.name!r}",
        )  # fmt: skip
    if output_name not in output_names:
        raise ModelLoadError(
            path, f"metadata output_name {output_name!r} is not a graph output {output_names}"
        )
    out_shape = shapes.get(output_name) or _dims(graph.output[output_names.index(output_name)])
    num_classes = out_shape[1] if len(out_shape) == 2 and isinstance(out_shape[1], int) else None
    labels = list(metadata.labels) if metadata else None
    source = "metadata"
    if config_labels is not None:
        labels, source = list(config_labels), "config.json labels"
    if labels is None and num_classes:
        labels = [str(i) for i in range(num_classes)]
    elif num_classes and labels is not None and len(labels) != num_classes:
        raise ModelLoadError(
            path, f"{source} has {len(labels)} labels, the model outputs {num_classes} classes"
        )
    return input_info, output_name, labels


def _open_sessions(
    path: Path,
    model: onnx.ModelProto,
    layers: list[ActivationNode],
    requested: ProviderChoice,
    *,
    threads: int | None,
    share_weights: bool,
    label: str,
) -> tuple[Sessions, ProviderChoice]:
    """The plain session (from the file as is) and the statistics session (the instrumented
    graph; none, with the reason, when onnxruntime refuses it), and the providers in use.

    ``share_weights`` hands both sessions the same weight buffers
    (``SessionOptions.add_initializer``) and turns off onnxruntime's weight prepacking, which
    otherwise copies every prepacked weight into each session anyway. Measured on a model
    with 65 MiB of dense weights: both sessions take 10 MiB instead of 141 MiB (plus the
    65 MiB shared once), but dense layers run 7-20% slower without prepacking; convolutions
    are unaffected (their NCHWc copies are per session either way).
    """
    in_use = requested  # until the plain session shows what onnxruntime really gave
    shared: dict[str, ort.OrtValue] = {}
    if share_weights:
        for init in model.graph.initializer:
            if init.data_type == onnx.TensorProto.FLOAT:
                arr = np.ascontiguousarray(numpy_helper.to_array(init))
                if arr.nbytes >= _SHARE_MIN_BYTES:
                    # ortvalue_from_numpy wraps the array's memory; the OrtValue keeps it alive.
                    shared[init.name] = ort.OrtValue.ortvalue_from_numpy(arr)

    def make_session(source: onnx.ModelProto | Path) -> ort.InferenceSession:
        # Both sessions keep onnxruntime's CPU arena, which holds the largest run's peak for
        # good: without it (or with its shrinkage after each run) the statistics session of
        # an EfficientNet-like model at batch 8 kept RSS flat but ran 1.8x slower
        # (docs/benchmarks.md, "Statistics on a deep model").
        options = session_options(threads)
        if shared:
            options.add_session_config_entry("session.disable_prepacking", "1")
            for init_name, value in shared.items():
                options.add_initializer(init_name, value)
        return _create_session(source, options, list(in_use.used))

    try:
        plain = make_session(path)  # the file as is: the plain session is the export
    except Exception as exc:  # onnxruntime's Fail / InvalidGraph / NotImplemented
        raise ModelLoadError(path, f"onnxruntime cannot create a session ({exc})") from exc
    in_use = providers_in_use(plain, requested)  # later sessions: no second fall-back
    stats, stats_error = None, None
    try:
        stats = make_session(instrument_model(model, layers))
    except Exception as exc:  # a foreign graph our nodes do not fit: serve without stats
        stats_error = f"statistics unavailable: instrumenting the graph failed ({exc})"
        log.error("%s: %s", label, stats_error)
    return Sessions(plain, stats, stats_error, make_session, shared), in_use


@dataclass(frozen=True)
class ModelSignature:
    """What a model version takes and gives: its one input, and the output the service reads."""

    input_name: str
    input_shape: list[int | None]  # None: a dynamic dimension
    input_dtype: np.dtype
    output_name: str
    output_kind: str  # "logits", "probabilities" or "log_probabilities"
    labels: list[str] | None
    extra_outputs: tuple[str, ...] = ()  # the model's other per-sample outputs


@dataclass
class Sessions:
    """A model version's onnxruntime sessions, and how to make another one with the same
    options, providers and shared weights."""

    plain: ort.InferenceSession  # the file as exported
    stats: ort.InferenceSession | None  # the instrumented graph; None when it failed
    stats_error: str | None  # why there is no statistics session
    make: Callable[[onnx.ModelProto | Path], ort.InferenceSession]
    shared_values: dict[str, ort.OrtValue]  # weights both use: must outlive the sessions


class LoadedModel:
    """One model version ready to run; build it with ``LoadedModel.load``."""

    def __init__(
        self,
        *,
        name: str,
        version: str,
        path: Path,
        sha256: str,
        metadata: ModelMetadata | None,
        signature: ModelSignature,
        config: ModelConfig | None = None,
        preprocessing: Preprocessing | None = None,
        layers: list[ActivationNode],
        sessions: Sessions,
        providers: ProviderChoice,
        macs: int | None = None,
        run_size: int | None = None,
    ):
        self.name = name
        self.version = version
        self.path = path
        self.sha256 = sha256
        self.metadata = metadata
        self.config = config  # the config.json beside the file (service.model_config)
        # The configuration's preprocessing over the metadata's (None: neither has one).
        self._preprocessing = preprocessing if config or not metadata else metadata.preprocessing
        # Read on every request: plain attributes.
        self.input_name = signature.input_name
        self.input_shape = signature.input_shape
        self.input_dtype = signature.input_dtype
        self.output_name = signature.output_name
        self.output_kind = signature.output_kind
        self.labels = signature.labels
        self.extra_outputs = signature.extra_outputs
        self._fetches = [self.output_name, *self.extra_outputs]
        self.layers = layers
        self.sessions = sessions
        self.plain_session = sessions.plain
        self.stats_session = sessions.stats
        self.stats_error = sessions.stats_error
        self.providers = providers
        self._raw_session: ort.InferenceSession | None = None
        self._lock = threading.Lock()
        self.layout = StatsLayout.of(layers)
        self._stat_fetches = self.layout.outputs
        self.macs = macs  # multiply-accumulates per sample, None if unknown
        self.run_size = run_size  # runs of fewer samples are padded to this many (a GPU's)
        # A reference profile measured beside the file (``python -m service calibrate``,
        # set by the repository): it overrides the one embedded at export.
        self.calibrated_reference: ReferenceProfile | None = None
        # The stats (mtime_ns, size, inode; None: no such file) of the files read beside the
        # model file when it was loaded (core.repository.side_files_key).
        self.side_files_key: tuple[tuple[int, int, int] | None, ...] = ()

    @property
    def small(self) -> bool:
        """Whether a run is too short to gain from more threads (``SMALL_MODEL_MACS``)."""
        return _is_small(self.macs)

    # ---- construction -------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        path: str | Path,
        name: str,
        version: str,
        providers: str | Sequence[str] = "cpu",
        threads: int | None = None,
        strict: bool = False,
        share_weights: bool = False,
        gpu_batch: int = 64,
        config: ModelConfig | None = None,
    ) -> LoadedModel:
        """Read ``path`` once, check it, and build the plain and the statistics sessions.

        On a provider other than the CPU, every run of fewer than ``gpu_batch`` samples is
        padded to ``gpu_batch`` (see the note on GPU runs at the top of this module); give the
        batcher's largest batch. ``share_weights``: see ``_open_sessions``. ``config``: the
        model's configuration file (``service.model_config``), over its metadata.
        """
        path = Path(path)
        model, sha256 = _read_onnx(path)
        try:
            metadata = ModelMetadata.from_props({p.key: p.value for p in model.metadata_props})
        except (ValidationError, ValueError) as exc:
            raise ModelLoadError(path, f"invalid relu_serve metadata ({exc})") from exc
        shapes = infer_tensor_shapes(model)
        input_info, output_name, labels = _check_interface(
            path, model, metadata, shapes, config.label_list if config else None
        )
        try:
            layers = find_activation_nodes(model, metadata.activations if metadata else None)
            preprocessing = resolve_preprocessing(
                metadata.preprocessing if metadata else None,
                config.preprocessing if config else None,
                _dims(input_info),
            )
            if config and config.observe is not None:
                layers = observed_layers(layers, config.observe)
        except ValueError as exc:  # ModelConfigError among them
            raise ModelLoadError(path, str(exc)) from exc
        macs = multiply_accumulates(model, shapes)
        sessions, choice = _open_sessions(
            path,
            model,
            layers,
            resolve_providers(providers, strict=strict),
            threads=1 if _is_small(macs) else threads,  # see SMALL_MODEL_MACS
            share_weights=share_weights,
            label=f"model {name} version {version}",
        )
        input_shape = _dims(input_info)
        dynamic_batch = not input_shape or input_shape[0] is None
        elem_type = input_info.type.tensor_type.elem_type
        signature = ModelSignature(
            input_name=input_info.name,
            input_shape=input_shape,
            input_dtype=_ORT_DTYPES.get(
                sessions.plain.get_inputs()[0].type,
                np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)),
            ),
            output_name=output_name,
            output_kind=_output_kind(model.graph, output_name),
            labels=labels,
            extra_outputs=_extra_outputs(model.graph, output_name, shapes, input_shape[0]),
        )
        return cls(
            name=name,
            version=str(version),
            path=path,
            sha256=sha256,
            metadata=metadata,
            signature=signature,
            config=config,
            preprocessing=preprocessing,
            layers=layers,
            sessions=sessions,
            providers=choice,
            macs=macs,
            run_size=gpu_batch if choice.used[0] != CPU and dynamic_batch else None,
        )

    # ---- properties ---------------------------------------------------------------------

    @property
    def preprocessing(self) -> Preprocessing | None:
        """How to turn an image into the input tensor: config.json's over the metadata's
        (None for foreign models with neither)."""
        return self._preprocessing

    @property
    def reference(self) -> ReferenceProfile | None:
        """The baseline for drift: the activation profile measured beside the file
        (``reference.json``), else the one embedded at export, else None."""
        if self.calibrated_reference is not None:
            return self.calibrated_reference
        return self.metadata.reference if self.metadata else None

    @property
    def reference_source(self) -> str | None:
        """Where the reference profile comes from: "reference.json", "metadata" or None."""
        if self.calibrated_reference is not None:
            return "reference.json"
        return "metadata" if self.reference is not None else None

    @property
    def has_statistics(self) -> bool:
        """Whether the statistics session exists."""
        return self.stats_session is not None

    # ---- running ------------------------------------------------------------------------

    def validate_input(self, x: np.ndarray) -> np.ndarray:
        """Check dtype, rank, shape and finiteness of a request tensor; returns it contiguous."""
        if not isinstance(x, np.ndarray):
            raise ModelInputError(f"input must be a numpy array, got {type(x).__name__}")
        if x.dtype != self.input_dtype:
            raise ModelInputError(
                f"input {self.input_name!r} must have dtype {self.input_dtype.name}, "
                f"got {x.dtype.name}"
            )
        if x.ndim != len(self.input_shape):
            raise ModelInputError(
                f"input {self.input_name!r} must have rank {len(self.input_shape)} "
                f"(shape {self._shape_text()}), got shape {list(x.shape)}"
            )
        if x.shape[0] < 1:
            raise ModelInputError(f"input {self.input_name!r} has batch size 0; send at least 1")
        fixed = self.input_shape[0]
        if fixed is not None and x.shape[0] != fixed:
            raise ModelInputError(
                f"input {self.input_name!r} has a fixed batch size of {fixed} in this model; "
                f"got a batch of {x.shape[0]}"
            )
        for axis, (got, want) in enumerate(zip(x.shape[1:], self.input_shape[1:], strict=True)):
            if want is not None and got != want:
                raise ModelInputError(
                    f"input {self.input_name!r} must have shape {self._shape_text()}, got "
                    f"{list(x.shape)} (dim {axis + 1} is {got}, expected {want})"
                )
        if x.dtype.kind == "f" and not np.isfinite(x).all():
            finite = np.isfinite(x).reshape(x.shape[0], -1)  # (N, values per sample)
            bad = int(finite.size - np.count_nonzero(finite))
            samples = np.flatnonzero(~finite.all(axis=1)).tolist()
            raise ModelInputError(
                f"input {self.input_name!r} has {bad} non-finite values (NaN or infinity), in "
                f"{_samples_text(samples)}; send finite numbers"
            )
        return np.ascontiguousarray(x)

    def _shape_text(self) -> str:
        """The input shape for error messages: ``[N, 1, 8, 8]``, ``?`` for dynamic dims."""
        dims = ["N", *(d if d is not None else "?" for d in self.input_shape[1:])]
        return "[" + ", ".join(str(d) for d in dims) + "]"

    def run(self, x: np.ndarray, stats: StatsMode | str = "none") -> RunResult:
        """Run one batch; ``stats``: "none" (plain session), "summary" (per-layer statistics)
        or "channels" (summary plus per-channel activity). ``NonFiniteOutputError`` when the
        output of a sample is not finite."""
        if stats not in STATS_MODES:
            raise ModelInputError(
                f"unknown statistics option {stats!r}; choose one of {', '.join(STATS_MODES)}"
            )
        x = self.validate_input(x)
        (result,) = self.run_split(x, [x.shape[0]], [stats])
        if isinstance(result, NonFiniteOutputError):
            raise result
        return result

    def run_split(
        self, x: np.ndarray, sizes: Sequence[int], stats: Sequence[str]
    ) -> list[RunResult | NonFiniteOutputError]:
        """Run one batch made of several requests' samples and give each request its own
        result: ``sizes[i]`` rows of ``x`` belong to request i, which asked for ``stats[i]``.

        The dynamic batcher calls this with inputs already checked by ``validate_input``, all
        plain (``"none"``) or all with statistics; statistics are summarised per request over
        its own samples, as if it had run alone. A request with a sample whose output is not
        finite gets a ``NonFiniteOutputError`` instead of a result; the others are unaffected.
        Its two halves: ``run_batch``, the session run, and ``split_outputs``, each request's
        part.
        """
        return self.split_outputs(self.run_batch(x, stats[0]), x, sizes, stats)

    def run_batch(self, x: np.ndarray, stats: str) -> list[np.ndarray]:
        """The session run alone: the logits, the model's other outputs
        (``extra_outputs``), then the statistics outputs when ``stats`` is not "none" (the
        statistics session) and the model has activation layers."""
        if stats != "none" and self.stats_session is None:
            raise ModelInputError(f"model {self.name!r}: {self.stats_error}")
        n = x.shape[0]
        if self.run_size and n < self.run_size:  # zero rows: every output is per sample
            x = np.concatenate([x, np.zeros((self.run_size - n, *x.shape[1:]), x.dtype)])
        feeds = {self.input_name: x}
        if stats == "none" or not self.layers:
            values = self.plain_session.run(self._fetches, feeds)
        else:
            assert self.stats_session is not None  # checked on entry: stats != "none"
            values = self.stats_session.run([*self._fetches, *self._stat_fetches], feeds)
        return values if x.shape[0] == n else [v[:n] for v in values]

    def split_outputs(
        self,
        values: Sequence[np.ndarray],
        x: np.ndarray,
        sizes: Sequence[int],
        stats: Sequence[str],
    ) -> list[RunResult | NonFiniteOutputError]:
        """Each request's result from ``run_batch``'s outputs: probabilities, and statistics
        summarised over the request's own rows; or the error of a request with a sample whose
        output is not finite."""
        parts = request_rows(sizes)
        raw = values[0]
        probs = self._probabilities(raw)
        failed = self._non_finite_requests(raw, probs, parts)
        extras = dict(zip(self.extra_outputs, values[1 : len(self._fetches)], strict=True))

        def other(part: slice) -> dict[str, np.ndarray]:
            return {name: value[part] for name, value in extras.items()}

        results: list[RunResult | NonFiniteOutputError]
        if stats[0] == "none":
            results = [RunResult(raw[p], probs[p], outputs=other(p)) for p in parts]
        elif len(values) == len(self._fetches):  # no layers to observe
            results = [RunResult(raw[p], probs[p], [], {}, other(p)) for p in parts]
        else:
            outputs = dict(zip(self._stat_fetches, values[len(self._fetches) :], strict=True))
            summaries = summarize_requests(
                self.layers,
                self.layout,
                outputs[STATS_OUTPUT],
                sizes,
                [level == "channels" for level in stats],
                # not for a failed request: its statistics are not sent
                lambda request, layers: (
                    None if request in failed else self._exact_minimum(x[parts[request]], layers)
                ),
            )
            active = per_sample_active(self.layout, outputs)
            results = [
                RunResult(raw[p], probs[p], summary, active.rows(p), other(p))
                for p, summary in zip(parts, summaries, strict=True)
            ]
        for request, error in failed.items():
            results[request] = error
        return results

    def _non_finite_requests(
        self, raw: np.ndarray, probs: np.ndarray, parts: Sequence[slice]
    ) -> dict[int, NonFiniteOutputError]:
        """Request index -> its error, for the requests with a sample whose output or
        probabilities are NaN or infinite (a finite input that overflowed inside the model).

        One check over the whole run's (N, K) outputs; per-row work only when it fails.
        Softmax (float64, max subtracted) of finite scores is finite, so for "logits" models
        the raw output alone is checked; exp of log-probabilities can still overflow float32.
        """
        if np.isfinite(raw).all() and (
            probs is raw or self.output_kind == "logits" or np.isfinite(probs).all()
        ):
            return {}
        finite = np.isfinite(raw.reshape(len(raw), -1)).all(axis=1)  # (N,)
        finite &= np.isfinite(probs.reshape(len(probs), -1)).all(axis=1)
        failed = {}
        for request, rows in enumerate(parts):
            bad = np.flatnonzero(~finite[rows])
            if bad.size:
                failed[request] = NonFiniteOutputError(self.name, bad.tolist())
        return failed

    def _probabilities(self, raw: np.ndarray) -> np.ndarray:
        if self.output_kind == "probabilities":
            return raw.astype(np.float32, copy=False)
        if self.output_kind == "log_probabilities":
            return np.exp(raw.astype(np.float64)).astype(np.float32)
        return softmax(raw)

    def _exact_minimum(self, x: np.ndarray, layers: list[ActivationNode]) -> dict[str, float]:
        """Minimum of ReLU layers that had no zero in this batch (rare: every unit of every
        sample active), from a lazily built session that outputs those raw activations.

        The file is read again rather than kept in memory for a case this rare; if it changed
        on disk since loading, the minimum stays unknown (None) and a warning is logged.
        """
        with self._lock:
            if self._raw_session is None:
                data = self.path.read_bytes() if self.path.is_file() else b""
                if hashlib.sha256(data).hexdigest() != self.sha256:
                    log.warning(
                        "model %s: %s changed on disk; minimum unknown", self.name, self.path
                    )
                    return {}
                probe = onnx.load_from_string(data)
                if any(
                    i.data_location == onnx.TensorProto.EXTERNAL for i in probe.graph.initializer
                ):
                    onnx.load_external_data_for_model(probe, str(self.path.parent))
                existing = {o.name for o in probe.graph.output}
                for layer in self.layers:
                    if layer.tensor not in existing and not layer.needs_min_output:
                        probe.graph.output.append(helper.make_empty_tensor_value_info(layer.tensor))
                self._raw_session = self.sessions.make(probe)
        values = self._raw_session.run([layer.tensor for layer in layers], {self.input_name: x})
        return {layer.name: float(v.min()) for layer, v in zip(layers, values, strict=True)}

    def warm_up(self) -> None:
        """Run both sessions once on zeros (batch 1, padded like every run on a GPU), so the
        first request pays no set-up."""
        shape = [1]
        guessed = False
        prep = self.preprocessing
        for axis, dim in enumerate(self.input_shape[1:], start=1):
            if dim is None:
                guessed = True
                if prep and len(self.input_shape) == 4:
                    dim = prep.sample_shape()[axis - 1]
                else:
                    dim = _WARMUP_DIM
            shape.append(dim)
        x = np.zeros(shape, dtype=self.input_dtype)
        try:
            result = self.run(x, "summary" if self.has_statistics else "none")
            self.run_batch(x, "none")
        except Exception as exc:
            if not guessed:
                raise ModelLoadError(self.path, f"warm-up run failed ({exc})") from exc
            log.warning(
                "model %s: warm-up with guessed input shape %s failed (%s)", self.name, shape, exc
            )
            return
        if self.labels is None:
            self.labels = [str(i) for i in range(result.logits.shape[1])]

    def output_specs(self) -> list[dict]:
        """The outputs a run returns, the classifier's first: name, numpy dtype name and
        shape (-1 for a dynamic dimension)."""
        by_name = {o.name: o for o in self.plain_session.get_outputs()}
        specs = []
        for name in self._fetches:
            out = by_name[name]
            dtype = _ORT_DTYPES.get(out.type) or _ORT_OUTPUT_DTYPES.get(out.type)
            specs.append(
                {
                    "name": name,
                    "dtype": dtype.name if dtype is not None else out.type,
                    "shape": [d if isinstance(d, int) and d > 0 else -1 for d in out.shape],
                }
            )
        return specs

    def info(self) -> dict:
        """What the metadata endpoints show about this model version."""
        return {
            "name": self.name,
            "version": self.version,
            "input": {
                "name": self.input_name,
                "shape": [d if d is not None else -1 for d in self.input_shape],
                "dtype": self.input_dtype.name,
            },
            "output": {"name": self.output_name, "kind": self.output_kind},
            "outputs": self.output_specs(),
            "labels": self.labels,
            "preprocessing": self.preprocessing.model_dump() if self.preprocessing else None,
            "activation_layers": [
                {
                    "name": layer.name,
                    "kind": layer.kind,
                    "op_type": layer.op_type,
                    "channels": layer.channels,
                    "tensor": layer.tensor,
                }
                for layer in self.layers
            ],
            "statistics": self.has_statistics,
            "statistics_error": self.stats_error,
            "providers": self.providers.to_dict(),
            "providers_requested": list(self.providers.requested),
            "providers_used": list(self.providers.used),
            "fell_back": self.providers.fell_back,
            "fallback_reason": self.providers.reason,
            "has_reference": self.reference is not None,
            "reference_source": self.reference_source,
            "has_metadata": self.metadata is not None,
            "has_config": self.config is not None,
            "architecture": self.metadata.architecture if self.metadata else None,
            "sha256": self.sha256,
        }
