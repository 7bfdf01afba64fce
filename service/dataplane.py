"""The data plane: the one place where requests meet models, independent of HTTP.

Routes decode a request, call this, and encode the answer. It owns the model repository, the
worker threads that run sessions off the event loop (onnxruntime releases the GIL), the time
limit, feeding the live activation monitors, and the inference metrics. Dynamic batching
will replace ``_run`` (one call site) without the routes noticing.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anyio.to_thread
import numpy as np

from service.errors import BadRequestError, PayloadTooLargeError, ServiceUnavailableError
from service.images import decode_image, default_preprocessing, preprocess_images
from service.metadata import Preprocessing
from service.metrics import GaugeFamily, ServiceMetrics
from service.model import LoadedModel, RunResult
from service.repository import ModelRepository
from service.settings import ServiceSettings

logger = logging.getLogger(__name__)


class DataPlane:
    """Models, inference and monitoring behind the HTTP routes."""

    def __init__(self, settings: ServiceSettings, metrics: ServiceMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.repository: ModelRepository | None = None
        self.ready = False
        self._executor: ThreadPoolExecutor | None = None
        self._random = random.Random()
        self._pending = 0  # runs queued for or holding a worker
        self._pending_lock = threading.Lock()
        metrics.registry.add_collector(self._collect_monitor_metrics)

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Load and warm up every model (in a thread), publish provider metrics; then ready."""
        settings = self.settings
        self._executor = ThreadPoolExecutor(
            max_workers=settings.inference_workers, thread_name_prefix="inference"
        )
        repository = _Repository(
            settings.model_root,
            providers=settings.providers,
            model_providers=settings.model_providers,
            threads=settings.intra_op_threads,
            strict=settings.strict_providers,
            window=settings.monitor_window,
            drift_threshold=settings.drift_threshold,
        )
        await anyio.to_thread.run_sync(repository.load_all)  # loads and warms up each version
        self.repository = repository
        models = self._loaded_models()
        for model in models:
            self._publish_model(model)
        self.metrics.models_loaded.set(len(models))
        self.ready = True
        self.metrics.ready.set(1)
        logger.info("ready: %d model version(s) from %s", len(models), settings.model_root)

    async def stop(self) -> None:
        """Not ready any more; let runs in flight finish, then free the workers."""
        self.ready = False
        self.metrics.ready.set(0)
        if self._executor is not None:
            executor, self._executor = self._executor, None
            await anyio.to_thread.run_sync(lambda: executor.shutdown(wait=True))

    def _loaded_models(self) -> list[LoadedModel]:
        if self.repository is None:
            return []
        models = []
        for entry in self.repository.list_models():
            for version in entry["versions"]:
                models.append(self.repository.get(entry["name"], version))
        return models

    def _publish_model(self, model: LoadedModel) -> None:
        """Provider in use and fall-back flag of one model version, as gauges."""
        choice = model.providers
        labels = {"model": model.name, "version": model.version}
        self.metrics.model_info.set(
            1, provider=choice.used[0], requested=",".join(choice.requested), **labels
        )
        self.metrics.model_fallback.set(1 if choice.fell_back else 0, **labels)

    # ----------------------------------------------------------------- models

    def model_names(self) -> list[str]:
        """Names of the models the repository holds (for metric labels)."""
        if self.repository is None:
            return []
        return [entry["name"] for entry in self.repository.list_models()]

    def get_model(self, name: str, version: str | None = None) -> LoadedModel:
        """The model ``name`` at ``version`` (default: latest); ModelNotFoundError if none."""
        if self.repository is None:
            raise ServiceUnavailableError("models are still loading; try again shortly")
        return self.repository.get(name, version)

    def list_models(self) -> list[dict[str, Any]]:
        """Models with their versions and the default one."""
        if self.repository is None:
            return []
        return list(self.repository.list_models())

    # ----------------------------------------------------------------- inputs

    def preprocessing_for(self, model: LoadedModel) -> Preprocessing:
        """The model's preprocessing, or a plain [0, 1] scaling for image-shaped foreign
        models (400 for others: they take tensors only)."""
        if model.preprocessing is not None:
            return model.preprocessing
        info = model.info()
        return default_preprocessing(info["name"], info["input"]["shape"])

    async def images_to_tensor(
        self, model: LoadedModel, images: list[tuple[str, bytes]]
    ) -> np.ndarray:
        """Decode and preprocess images in a worker thread: (N, C, H, W) float32."""
        if not images:
            raise BadRequestError(
                "empty batch: the request has no images (batch size 0)", code="invalid_input"
            )
        self.check_batch(len(images))
        prep = self.preprocessing_for(model)
        max_pixels = self.settings.max_image_pixels

        def work() -> np.ndarray:
            decoded = [decode_image(data, max_pixels=max_pixels, name=n) for n, data in images]
            return preprocess_images(decoded, prep)

        return await anyio.to_thread.run_sync(work)

    def check_batch(self, size: int) -> None:
        """413 when a request carries more samples than ``max_batch_size``."""
        if size > self.settings.max_batch_size:
            raise PayloadTooLargeError(
                f"batch of {size} samples is over the limit of {self.settings.max_batch_size} "
                "(max_batch_size)",
                code="batch_too_large",
            )

    # ----------------------------------------------------------------- inference

    async def infer(self, model: LoadedModel, x: np.ndarray, stats: str = "none") -> RunResult:
        """Run ``model`` on ``x`` (N, ...) with statistics ``stats``, off the event loop.

        Feeds the model's live monitor when statistics were computed; with a sampling
        fraction set, some requests that did not ask are run with statistics for it.
        """
        if x.ndim >= 1:
            self.check_batch(int(x.shape[0]))
        run_stats = stats
        sampled = False
        sampling = self.settings.monitor_sampling
        if (
            stats == "none"
            and isinstance(sampling, float)
            and sampling > 0
            and model.has_statistics
        ):
            sampled = self._random.random() < sampling
            run_stats = "summary" if sampled else "none"
        result = await self._run(model, x, run_stats)
        # Only the monitored (latest) version feeds the monitor: its layers and reference
        # profile belong to that version.
        if (
            result.per_sample_active
            and self.repository is not None
            and self.repository.record(model, result.per_sample_active)
        ):
            self.metrics.monitor_samples.inc(int(x.shape[0]), model=model.name)
        if sampled:  # the client did not ask: give it the plain answer
            result = RunResult(
                logits=result.logits,
                probabilities=result.probabilities,
                layer_stats=None,
                per_sample_active=None,
            )
        return result

    async def _run(self, model: LoadedModel, x: np.ndarray, stats: str) -> RunResult:
        """The one call site of a model run: a worker thread, a time limit, metrics."""
        if self._executor is None:
            raise ServiceUnavailableError("the service is shutting down")
        if self._pending >= self.settings.max_queue_length:
            raise ServiceUnavailableError(
                f"{self._pending} model runs are already queued, the limit is "
                f"{self.settings.max_queue_length} (max_queue_length); retry shortly",
                code="queue_full",
                headers={"Retry-After": "1"},
            )
        name, version = model.name, model.version
        submitted = time.perf_counter()
        started = 0.0

        def work() -> RunResult:
            nonlocal started
            started = time.perf_counter()
            return model.run(x, stats)

        with self._pending_lock:
            self._pending += 1
        try:
            job = self._executor.submit(work)
        except RuntimeError:  # the executor shut down between the check above and here
            self._run_finished(None)
            raise ServiceUnavailableError("the service is shutting down") from None
        # Done when finished, or cancelled before it started: a run abandoned at the time
        # limit keeps its worker (threads cannot be stopped) and keeps counting.
        job.add_done_callback(self._run_finished)
        try:
            # On timeout wait_for cancels the job, which only succeeds if it has not started.
            result = await asyncio.wait_for(
                asyncio.wrap_future(job), self.settings.request_timeout_s
            )
        except TimeoutError:
            raise ServiceUnavailableError(
                f"inference on model {name!r} took longer than {self.settings.request_timeout_s}"
                " s (request_timeout_s)",
                code="timeout",
            ) from None
        done = time.perf_counter()
        self.metrics.queue_seconds.observe(max(started - submitted, 0.0), model=name)
        self.metrics.inference_seconds.observe(
            done - started, model=name, version=version, stats=stats
        )
        self.metrics.batch_size.observe(int(x.shape[0]) if x.ndim else 1, model=name)
        return result

    def _run_finished(self, _job: Future[RunResult] | None) -> None:
        with self._pending_lock:
            self._pending -= 1

    # ----------------------------------------------------------------- monitor

    def monitor_snapshot(self, name: str) -> dict[str, Any]:
        """The live activation monitor's state for model ``name``."""
        latest = self.get_model(name)  # 404 for an unknown model
        assert self.repository is not None
        snapshot = self.repository.monitor(name).snapshot()
        return {"model": name, "version": latest.version, **snapshot}

    def reset_monitor(self, name: str) -> None:
        """Empty the live window of model ``name``."""
        self.get_model(name)
        assert self.repository is not None
        self.repository.monitor(name).reset()

    def _collect_monitor_metrics(self) -> list[GaugeFamily]:
        """Per model and layer gauges from the monitors, computed at scrape time."""
        ns = "relu_serve"
        inactive = GaugeFamily(
            f"{ns}_activation_inactive_fraction",
            "Rolling share of inactive activations over the monitor window.",
            ("model", "layer"),
        )
        dead = GaugeFamily(
            f"{ns}_activation_dead_units",
            "Channels with no activity over the full monitor window (NaN until it is full).",
            ("model", "layer"),
        )
        drift = GaugeFamily(
            f"{ns}_activation_drift_score",
            "Distance of live per-channel activity from the reference profile.",
            ("model", "layer"),
        )
        drifted = GaugeFamily(
            f"{ns}_activation_drifted",
            "1 when the layer's drift exceeds drift_threshold over a full window.",
            ("model", "layer"),
        )
        queue = GaugeFamily(
            f"{ns}_inference_queue_length",
            "Model runs waiting for or holding an inference worker.",
            (),
        )
        queue.add(self._pending)
        window = GaugeFamily(
            f"{ns}_monitor_window_samples",
            "Samples currently in the model's monitor window.",
            ("model",),
        )
        if self.repository is None:
            return [queue, inactive, dead, drift, drifted, window]
        for name in self.model_names():
            snapshot = self.repository.monitor(name).snapshot()
            window.add(snapshot.get("samples", 0), name)
            for layer in snapshot.get("layers", []):
                lname = layer["name"]
                inactive.add(_num(layer.get("inactive_fraction")), name, lname)
                dead.add(_num(layer.get("dead_units")), name, lname)
                drift.add(_num(layer.get("drift")), name, lname)
                drifted.add(1.0 if layer.get("drifted") else 0.0, name, lname)
        return [queue, inactive, dead, drift, drifted, window]


class _Repository(ModelRepository):
    """The core's repository plus per-model execution providers (``model_providers``).

    Adapter: ``ModelRepository`` takes one provider list for all models; this picks the
    model's own list while that model's versions load (loading is sequential).
    """

    def __init__(self, root: Path, *, model_providers: dict[str, list[str]], **kwargs: Any) -> None:
        super().__init__(root, **kwargs)
        self._model_providers = model_providers

    def _load_version(self, name: str, version: str) -> LoadedModel:
        default = self.providers
        self.providers = self._model_providers.get(name, default)
        try:
            return super()._load_version(name, version)
        finally:
            self.providers = default


def _num(value: Any) -> float:
    return float("nan") if value is None else float(value)
