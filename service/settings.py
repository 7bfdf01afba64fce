"""Service configuration: one pydantic-settings class, every field from a ``RELU_SERVE_`` variable.

``RELU_SERVE_MAX_BATCH_SIZE=32`` sets ``max_batch_size``. Lists take JSON (``["cuda", "cpu"]``)
or a comma-separated string (``cuda,cpu``); ``model_providers`` takes JSON
(``{"digits": ["cpu"]}``). ``load_settings()`` turns a bad value into a ``SettingsError`` whose
message names the variable, so a misconfigured container stops at start-up and says why.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from pydantic_settings import SettingsError as PydanticSettingsError

if TYPE_CHECKING:
    from pydantic_core import ErrorDetails  # pydantic's own dependency; for the annotation only

    from service.model_config import ModelConfig

ENV_PREFIX = "RELU_SERVE_"
# The repository's own models/ folder: the default model ships there (Triton's layout).
DEFAULT_MODEL_ROOT = Path(__file__).resolve().parent.parent / "models"


def _default_threads() -> int:
    """CPUs this process may really use (cgroup quota and affinity), from the runtime module."""
    try:
        from service.runtime.providers import available_cpus
    except ImportError:  # pragma: no cover - only while service/runtime/providers.py does not exist
        return max(1, len(os.sched_getaffinity(0)))
    return available_cpus()


class SettingsError(ValueError):
    """A setting has a bad value; the message names the environment variable."""


class BatchingOverride(BaseModel):
    """One model's own dynamic batching limits (``model_batching``); unset fields keep the
    service-wide ``batch_max_size`` and ``batch_max_delay_ms``."""

    model_config = ConfigDict(extra="forbid")

    max_size: int | None = Field(default=None, ge=1)
    max_delay_ms: float | None = Field(default=None, ge=0.0, le=10_000.0)


class ServiceSettings(BaseSettings):
    """Everything the service reads from its environment, validated once at start-up."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        case_sensitive=False,
        extra="ignore",
        validate_default=True,
        use_attribute_docstrings=True,  # the docstring under each field is its description
    )

    model_root: Path = DEFAULT_MODEL_ROOT
    """Folder of the model repository, laid out as ``<name>/<version>/model.onnx``."""

    providers: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["cpu"])
    """onnxruntime execution providers in order of preference: short names (``cpu``, ``cuda``,
    ``tensorrt``) or onnxruntime's own (``CUDAExecutionProvider``)."""

    strict_providers: bool = False
    """Refuse to start when a requested provider is unavailable, instead of falling back to
    the CPU (the fall-back is always logged, reported in metadata and counted in metrics)."""

    model_providers: dict[str, list[str]] = Field(default_factory=dict)
    """Per-model override of ``providers`` as JSON, e.g. ``{"digits": ["cpu"]}``."""

    workers: int = Field(default_factory=_default_threads, ge=1, le=256)
    """Worker processes of ``python -m service`` (each an event loop serving every model, on
    one shared port); defaults to the CPUs the container really has (cgroup CPU quota and
    affinity, not the host's core count). Workers share what a client can see: the model
    repository on disk, the live monitor's counts and the metrics."""

    intra_op_threads: int = Field(
        default_factory=lambda data: max(1, _default_threads() // data["workers"]), ge=1
    )
    """onnxruntime intra-op threads per session; defaults to the container's CPUs divided
    among the ``workers``, so that workers do not fight over cores. Models under
    ``service.runtime.loaded_model.SMALL_MODEL_MACS`` multiply-accumulates per sample use one."""

    shared_dir: Path | None = None
    """Folder where the worker processes of one service instance keep what they share at run
    time: the live monitor's counts and the metrics (prometheus_client's multiprocess files).
    ``python -m service`` makes a fresh one at start when unset; a process started otherwise
    (``uvicorn service.main:app``, tests) keeps them in its own memory."""

    repository_poll_s: float = Field(default=2.0, gt=0.0, le=3600.0)
    """Seconds between two looks at the model repository on disk: every worker, and every
    replica on the same volume, converges on what the repository holds (versions, which are
    unloaded, the default) within this time."""

    inference_workers: int = Field(default=1, ge=1, le=64)
    """Inference threads per model version, each running one (batched) run at a time, off the
    event loop. One run already uses ``intra_op_threads`` cores: on 2 cores, 2 workers of 1
    thread each or of 2 threads each measured 2-17% slower than 1 worker of 2 threads
    (ResNet-20, 64 clients)."""

    inline_small_models: bool = True
    """Run the batches of small models (``service.runtime.loaded_model.SMALL_MODEL_MACS``)
    on the event loop instead of an inference thread: their runs are shorter than the
    hand-off (the default model at 1 client: p50 0.36 -> 0.29 ms; at 64 clients 20% less CPU per
    request). Requests that reach the loop in the same step share a run; a run on the loop
    cannot be cut short by ``request_timeout_s`` (nor can one in a thread, but its request
    can give up waiting)."""

    max_body_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    """Largest request body accepted, in bytes; larger ones get 413."""

    max_image_pixels: int = Field(default=4096 * 4096, ge=1)
    """Largest image accepted, in pixels (width x height), checked before decoding; larger
    ones get 413. Also sets ``PIL.Image.MAX_IMAGE_PIXELS`` against decompression bombs."""

    max_request_pixels: int = Field(default=128 * 1024 * 1024, ge=1)
    """Most pixels (width x height, summed) of the images in one request, read from their
    headers before any is decoded; more get 413."""

    decode_budget_bytes: int = Field(default=192 * 1024 * 1024, ge=1024 * 1024)
    """Memory that decoding images may take at once in one worker process, all requests
    together: each image's pixels times 10 bytes (12 for 16-bit) are taken before it is
    decoded and given back once it is resized. A request waits for its turn up to
    ``request_deadline_s`` (then 503 with Retry-After); one image that could never fit is
    413. With ``body_budget_bytes`` and the worker count, what fits a pod's memory."""

    body_budget_bytes: int = Field(default=32 * 1024 * 1024, ge=1024 * 1024)
    """Memory that request bodies being read may take at once in one worker process, all
    requests together (model uploads, streamed to disk, excepted): a body's Content-Length
    (``max_body_bytes`` when it is sent in chunks) is taken before it is read and given back
    when its request is answered. Waits and refusals as ``decode_budget_bytes``."""

    max_batch_size: int = Field(default=64, ge=1)
    """Most images or tensor rows in one request; more get 413."""

    max_top_k: int = Field(default=100, ge=1)
    """Upper bound of ``top_k`` in predict requests (also capped by the number of labels)."""

    http_guard: bool = True
    """``python -m service`` serves HTTP with the limits below on the request head, the time
    a client may take and the connections (``service.server.http``); off: uvicorn's own
    httptools protocol, which has none of them."""

    max_header_bytes: int = Field(default=32 * 1024, ge=1024)
    """Largest request head (request line and headers) in bytes, counted as it arrives;
    larger ones get 431 and the connection is closed."""

    max_header_count: int = Field(default=100, ge=8)
    """Most header fields in one request; more get 431."""

    header_timeout_s: float = Field(default=10.0, gt=0.0, le=3600.0)
    """Seconds a request head may take to arrive, from its first byte (or from the
    connection's opening); later, 408 and the connection is closed."""

    body_timeout_s: float = Field(default=30.0, gt=0.0, le=3600.0)
    """Longest silence, in seconds, while a request body is read (not a bound on a long
    upload that keeps sending); longer, 408 and the connection is closed."""

    keep_alive_timeout_s: float = Field(default=5.0, gt=0.0, le=3600.0)
    """Seconds an idle keep-alive connection stays open (uvicorn's ``--timeout-keep-alive``,
    which the command line overrides)."""

    max_connections: int = Field(default=1000, ge=1)
    """Most open connections per worker process; one more is answered 503 with Retry-After
    and closed at once, so idle clients cannot use up the process's file descriptors."""

    graceful_timeout_s: float = Field(default=30.0, gt=0.0, le=3600.0)
    """Seconds requests in flight get to finish once a stop begins (after
    ``shutdown_delay_s``); then they are cancelled and the process exits (uvicorn's
    ``--timeout-graceful-shutdown``, which the command line overrides)."""

    monitor_window_s: float = Field(default=300.0, gt=0.0, le=7 * 24 * 3600.0)
    """Seconds of traffic in each model's live activation window (``service.core.monitor``):
    the last ``monitor_window_s`` seconds, to a bucket's precision, over every worker."""

    monitor_bucket_s: float = Field(default=10.0, gt=0.0)
    """Seconds per bucket of the live window: the window moves on by whole buckets, and holds
    ``monitor_window_s / monitor_bucket_s`` of them (a whole number, at most 3600)."""

    monitor_min_samples: int = Field(default=512, ge=1)
    """Samples the live window must hold before dead units and drift verdicts are claimed
    (fewer give noisy rates); the window is "full" from then on."""

    drift_threshold: float = Field(default=0.1, gt=0.0)
    """Drift score above which a layer is flagged as drifted from its reference profile."""

    monitor_sampling: Literal["requested"] | float = "requested"
    """How live traffic feeds the activation monitor. ``requested`` (default): only requests
    that ask for statistics, so a request that does not ask pays nothing for them, as the
    spec promises. A number in [0, 1]: that fraction of all requests also runs the
    statistics session (~1.35x a plain run) to feed the monitor, whatever they asked."""

    request_deadline_s: float = Field(default=3.0, gt=0.0, le=3600.0)
    """Admission by time: a request whose expected wait for a model run (the samples queued
    ahead of it times the model's measured time per sample) would pass this many seconds is
    refused at once with 503 and Retry-After, instead of waiting to time out."""

    max_queue_length: int = Field(default=1024, ge=1)
    """Most requests waiting in one model's queue for the next batch (those in a run in flight
    not counted): a hard bound on queued memory behind ``request_deadline_s``, which sheds
    load first in practice; more get 503 with Retry-After."""

    batch_max_size: int = Field(default=64, ge=1)
    """Dynamic batching: most samples in one inference run. Concurrent requests to a model are
    merged into one onnxruntime run up to this many samples (a request's own batch counts); a
    request larger than this runs alone, unsplit. 1 turns merging off."""

    batch_max_delay_ms: float = Field(default=0.0, ge=0.0, le=10_000.0)
    """Dynamic batching: how long the oldest queued request may wait for others to fill its
    batch once a worker is free. 0 (default) is greedy: whatever queued while the previous run
    was busy forms the next batch at once. An idle server never waits: a lone request runs
    at once whatever this says."""

    opentelemetry: bool = False
    """FastAPI's native OpenTelemetry (traces, metrics, logs to the global providers an
    OpenTelemetry SDK or ``opentelemetry-instrument`` sets up). Off by default: the service
    exports Prometheus metrics itself, and FastAPI's check for configured providers alone cost
    ~3% of the event loop's time per request under load."""

    direct_dispatch: bool = True
    """Predict and v2 infer go straight to their endpoints past FastAPI's router and
    per-route layers (``service.server.dispatch``); off: every request takes FastAPI's own
    path. The answers are the same either way; docs/benchmarks.md has what it saves."""

    gil_switch_interval_ms: float = Field(default=0.5, gt=0.0, le=100.0)
    """Python's thread switch interval (``sys.setswitchinterval``), set at start-up. Python's
    5 ms default lets a busy event loop keep an inference thread that finished its run
    waiting for the GIL for up to 5 ms per run; 0.5 ms hands results over sooner."""

    default_image_preprocessing: bool = False
    """Images sent to a model with neither our metadata nor a ``config.json``
    (docs/models.md): off (default), refused with 422 ``preprocessing_unknown`` saying how to
    describe the model; on, an image-shaped (N, 1 or 3, H, W) input gets them stretched to
    H x W and scaled to [0, 1], no mean/std (the service's behaviour before config files)."""

    model_batching: dict[str, BatchingOverride] = Field(default_factory=dict)
    """Per-model override of the batching settings as JSON, e.g.
    ``{"resnet20": {"max_size": 32, "max_delay_ms": 2}}``."""

    request_timeout_s: float = Field(default=30.0, gt=0.0)
    """Longest time one inference may take, queueing included; later ones get 503."""

    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    """Logging level of the ``service`` loggers and uvicorn."""

    shutdown_delay_s: float = Field(default=0.0, ge=0.0, le=300.0)
    """Seconds between SIGTERM and the server's stop during which readiness already answers
    503 while requests are still served, so load balancers stop routing here first
    (``service/server/shutdown.py``); then requests in flight get uvicorn's
    ``--timeout-graceful-shutdown`` to finish. 5 in ``deploy/``; 0 stops at once."""

    management_api_key: SecretStr | None = None
    """Bearer token of the model management API (``/v1/admin/...``, ``/v2/repository/...``):
    clients send ``Authorization: Bearer <key>``, compared in constant time. Unset or empty
    (the default), the management API is off and answers 403. At least 16 characters."""

    max_upload_bytes: int = Field(default=512 * 1024 * 1024, ge=1024)
    """Largest model file one management upload may carry, in bytes; larger ones get 413.
    Separate from ``max_body_bytes``, which stays small for prediction requests."""

    validation_timeout_s: float = Field(default=60.0, gt=0.0, le=3600.0)
    """Longest time the validation of a model file from the management API (upload, load)
    may take: loading, shape inference and the warm-up runs, in a child process
    (``service.core.validation``) that is killed past it; the file is refused with 422. The
    child's start (~1 s: a Python importing onnxruntime) is counted."""

    validation_memory_bytes: int = Field(default=768 * 1024 * 1024, ge=256 * 1024 * 1024)
    """Address space (``RLIMIT_AS``) of the child process that validates a model file from the
    management API; a file whose loading or warm-up needs more is refused with 422. Python and
    onnxruntime take ~250 MiB of it; a model needs about 6 times its file size more. The
    default fits a validation beside the two workers of ``deploy/``'s 1 Gi pod."""

    default_versions: dict[str, Annotated[int, Field(ge=1)]] = Field(default_factory=dict)
    """Version that serves requests naming none, per model, as JSON (``{"digits": 1}``);
    other models serve their highest version. The management API changes it at run time."""

    @field_validator("management_api_key", mode="before")
    @classmethod
    def _check_api_key(cls, value: Any) -> Any:
        """Empty means off; a set key must be long enough to resist guessing."""
        text = value.get_secret_value() if isinstance(value, SecretStr) else value
        if text is None or (isinstance(text, str) and not text.strip()):
            return None
        if not isinstance(text, str) or len(text.strip()) < 16:
            raise ValueError("must be at least 16 characters (or empty to turn it off)")
        return text.strip()

    @field_validator("providers", mode="before")
    @classmethod
    def _split_providers(cls, value: Any) -> Any:
        """Accept a JSON list or a comma-separated string."""
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @field_validator("providers")
    @classmethod
    def _check_providers(cls, value: list[str]) -> list[str]:
        if not value or any(not name.strip() for name in value):
            raise ValueError("needs at least one provider name, e.g. cpu or cuda,cpu")
        return [name.strip() for name in value]

    @field_validator("model_providers")
    @classmethod
    def _check_model_providers(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for model, providers in value.items():
            if not providers:
                raise ValueError(f"model {model!r} needs at least one provider name")
        return value

    @field_validator("monitor_sampling", mode="before")
    @classmethod
    def _parse_sampling(cls, value: Any) -> Any:
        """``requested`` or a fraction in [0, 1]: one clear message for anything else."""
        if isinstance(value, str) and value.strip().lower() == "requested":
            return "requested"
        try:
            fraction = float(value)
        except (TypeError, ValueError):
            raise ValueError("must be 'requested' or a fraction between 0 and 1") from None
        if not 0.0 <= fraction <= 1.0:
            raise ValueError("must be 'requested' or a fraction between 0 and 1")
        return fraction

    @field_validator("monitor_bucket_s")
    @classmethod
    def _check_monitor_bucket(cls, value: float, info: ValidationInfo) -> float:
        """The window is a whole number of buckets, at most 3600 (a store grows with them)."""
        window = info.data.get("monitor_window_s")
        if window is None:  # the window itself failed validation
            return value
        buckets = round(window / value)
        if not 1 <= buckets <= 3600 or not math.isclose(buckets * value, window, rel_tol=1e-9):
            raise ValueError(
                f"monitor_window_s ({window:g}) must hold a whole number (1 to 3600) of "
                f"buckets of monitor_bucket_s seconds"
            )
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_log_level(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    def batching_for(self, model: str, config: ModelConfig | None = None) -> tuple[int, float]:
        """``(max samples per run, max queue delay in seconds)`` for ``model``: each limit
        from ``model_batching``, else the model's config.json (``config``), else the
        service-wide setting."""
        layers = [o for o in (self.model_batching.get(model), config and config.batching) if o]
        size = next((o.max_size for o in layers if o.max_size), self.batch_max_size)
        delay_ms = next(
            (o.max_delay_ms for o in layers if o.max_delay_ms is not None),
            self.batch_max_delay_ms,
        )
        return size, delay_ms / 1000.0

    def providers_for(self, model: str) -> list[str]:
        """The providers requested for ``model``: its override, or the service default."""
        return self.model_providers.get(model, self.providers)


SECRET_FIELDS = frozenset({"management_api_key"})


def _describe(error: ErrorDetails) -> str:
    """One line for one pydantic error, naming the environment variable and the bad value."""
    field = str(error["loc"][0]) if error["loc"] else "?"
    where = f"{ENV_PREFIX}{field.upper()} ({field})"
    value = error.get("input")
    secret = field in SECRET_FIELDS  # never echo a key into logs
    missing = isinstance(value, dict) and error["type"] == "missing"
    shown = "" if missing or secret else f" (got {value!r})"
    return f"invalid setting {where}: {error['msg']}{shown}"


def load_settings(**overrides: Any) -> ServiceSettings:
    """Read settings from the environment (``overrides`` win); raise ``SettingsError`` naming
    every bad variable."""
    try:
        return ServiceSettings(**overrides)
    except ValidationError as exc:
        raise SettingsError("; ".join(_describe(e) for e in exc.errors())) from None
    except PydanticSettingsError as exc:  # a variable that is not valid JSON for its type
        match = re.search(r'field "(\w+)"', str(exc))
        field = match.group(1) if match else "?"
        raise SettingsError(
            f"invalid setting {ENV_PREFIX}{field.upper()} ({field}): not valid JSON for this "
            f'setting, e.g. {ENV_PREFIX}MODEL_PROVIDERS=\'{{"digits": ["cpu"]}}\''
        ) from None
