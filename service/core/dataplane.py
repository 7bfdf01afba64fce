"""The data plane: the one place where requests meet models, independent of HTTP.

Routes decode a request, call this, and encode the answer. It owns the model repository, one
dynamic batcher per model version (``service.core.batching``: concurrent requests merged into one
run in the model's own inference thread, off the event loop, since onnxruntime releases the
GIL), the time limit, feeding the live activation monitors, and the inference metrics.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import sys
import weakref
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio.to_thread
import numpy as np
from prometheus_client import Histogram
from prometheus_client.core import Metric

from service.core.batching import (
    BatcherClosedError,
    BatchReport,
    ModelBatcher,
    OverloadedError,
    QueueFullError,
)
from service.core.budget import MemoryBudget
from service.core.errors import (
    BadRequestError,
    PayloadTooLargeError,
    ServiceUnavailableError,
    UnprocessableError,
)
from service.core.images import (
    decode_cost,
    default_preprocessing,
    load_image,
    open_image,
    preprocess_images,
)
from service.core.metrics import ServiceMetrics
from service.core.monitor import collect_metrics, monitor_factory
from service.core.repository import ModelRepository
from service.model_config import ModelConfig
from service.runtime.loaded_model import (
    STATS_MODES,
    LoadedModel,
    ModelInputError,
    NonFiniteOutputError,
    RunResult,
)
from service.runtime.summaries import LayerActivity
from service.settings import ServiceSettings

logger = logging.getLogger(__name__)
# Images up to this many bytes in all are decoded on the event loop: a small PNG decodes in
# ~20-50 us, less than the ~60 us a thread hop costs (SPEC); larger ones go to a thread.
INLINE_DECODE_BYTES = 64 * 1024


class DataPlane:
    """Models, inference and monitoring behind the HTTP routes."""

    def __init__(self, settings: ServiceSettings, metrics: ServiceMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.repository: ModelRepository | None = None
        self.ready = False
        self._random = random.Random()
        # One batcher per loaded model version, dropped with it (an unloaded version's
        # batcher and its thread go when the last request holding the model is done).
        self._batchers: weakref.WeakKeyDictionary[LoadedModel, ModelBatcher] = (
            weakref.WeakKeyDictionary()
        )
        self._accepting = False
        # Decoded pixels held at once by every request of this process (core/budget.py).
        self._decode_budget = MemoryBudget(
            settings.decode_budget_bytes, "decode_budget_bytes", settings.request_deadline_s
        )
        # Label children looked up once (prometheus_client's ``labels`` takes a lock and
        # builds a key): per run in ``_record_batch``, per model for the monitor.
        self._run_children: dict[tuple[str, str, str], tuple[Histogram, Histogram, Histogram]] = {}
        metrics.add_collector(self._collect_monitor_metrics)

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Load and warm up every model (in a thread), publish provider metrics; then ready."""
        settings = self.settings
        self._accepting = True
        # The inference thread needs the GIL back after each run (to hand results over)
        # while the event loop, busy with HTTP, holds it; Python makes a waiting thread wait
        # up to the switch interval (5 ms by default), a third of a ResNet-20 batch.
        sys.setswitchinterval(settings.gil_switch_interval_ms / 1000.0)
        repository = _Repository(
            settings.model_root,
            providers=settings.providers,
            model_providers=settings.model_providers,
            batch_sizes=lambda name, config: settings.batching_for(name, config)[0],
            threads=settings.intra_op_threads,
            strict=settings.strict_providers,
            monitor_factory=monitor_factory(settings),
            default_versions=settings.default_versions,
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
        """Not ready any more; let queued runs and runs in flight finish, then free the
        inference threads."""
        self.ready = False
        self.metrics.ready.set(0)
        self._accepting = False
        batchers = list(self._batchers.values())
        self._batchers.clear()
        timeout = self.settings.request_timeout_s
        await asyncio.gather(*(b.close(timeout) for b in batchers))
        self.metrics.queue_length.set(0)

    def _loaded_models(self) -> list[LoadedModel]:
        if self.repository is None:
            return []
        models = []
        for name, versions in self.repository.available().items():
            for version in versions:
                models.append(self.repository.get(name, version))
        return models

    def _publish_model(self, model: LoadedModel) -> None:
        """Provider in use and fall-back flag of one model version, as gauges."""
        choice = model.providers
        labels = {"model": model.name, "version": model.version}
        self.metrics.model_info.labels(
            provider=choice.used[0], requested=",".join(choice.requested), **labels
        ).set(1)
        self.metrics.model_fallback.labels(**labels).set(1 if choice.fell_back else 0)

    def models_changed(self, removed: Iterable[LoadedModel] = ()) -> None:
        """Provider metrics after the loaded versions changed (a management operation, or a
        change on disk that the poller followed): drop the
        gauges of ``removed`` versions that are gone, publish those loaded now."""
        loaded = self._loaded_models()
        keep = {(m.name, m.version) for m in loaded}
        for model in removed:
            if (model.name, model.version) not in keep:
                choice = model.providers
                self.metrics.remove_model(
                    model.name, model.version, choice.used[0], ",".join(choice.requested)
                )
        for model in loaded:
            self._publish_model(model)
        self.metrics.models_loaded.set(len(loaded))

    # ----------------------------------------------------------------- models

    def model_names(self) -> Collection[str]:
        """Names of the models the repository holds (for metric labels; cheap)."""
        if self.repository is None:
            return ()
        return self.repository.names()

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

    async def predict(
        self,
        name: str,
        version: str | None,
        inputs: np.ndarray | Sequence[tuple[str, bytes]],
        stats: str = "none",
    ) -> tuple[LoadedModel, RunResult]:
        """One prediction from decoded request to result: the model ``name`` at ``version``
        (default: latest) run on a tensor (N, ...) or on named image files, which are
        decoded and preprocessed as the model's metadata says."""
        model = self.get_model(name, version)
        if isinstance(inputs, np.ndarray):
            return model, await self.infer(model, inputs, stats)
        if not inputs:
            raise BadRequestError(
                "empty batch: the request has no images (batch size 0)", code="invalid_input"
            )
        self.check_batch(len(inputs))  # before decoding any of them
        x = await self._images_to_tensor(model, inputs)
        return model, await self._infer(model, x, stats)

    async def _images_to_tensor(
        self, model: LoadedModel, images: Sequence[tuple[str, bytes]]
    ) -> np.ndarray:
        """Decode and preprocess images (N, C, H, W) float32; a worker thread does it unless
        they are small. A model without preprocessing (metadata or config.json) refuses
        images (422 ``preprocessing_unknown``) unless ``default_image_preprocessing``.

        Memory is bounded before a pixel is decoded: the headers give every image's size,
        the request's pixels must stay within ``max_request_pixels``, and the images are
        decoded one at a time under the process's ``decode_budget_bytes``."""
        prep = model.preprocessing or default_preprocessing(
            model.name, model.input_shape, allowed=self.settings.default_image_preprocessing
        )
        max_pixels = self.settings.max_image_pixels
        opened = [(n, open_image(data, max_pixels=max_pixels, name=n)) for n, data in images]
        pixels = sum(image.width * image.height for _, image in opened)
        if pixels > self.settings.max_request_pixels:
            raise PayloadTooLargeError(
                f"the request's {len(opened)} images hold {pixels} pixels, over the limit of "
                f"{self.settings.max_request_pixels} (max_request_pixels)",
                code="image_too_large",
            )

        def work() -> np.ndarray:
            return preprocess_images((load_image(image, name=n) for n, image in opened), prep)

        cost = max(decode_cost(image) for _, image in opened)
        async with self._decode_budget.hold(cost, f"decoding {opened[0][0]!r}"):
            if sum(len(data) for _, data in images) <= INLINE_DECODE_BYTES:
                return work()
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
        """Run ``model`` on ``x`` (N, ...) with statistics ``stats``, batched with concurrent
        requests to the same model version, off the event loop.

        The input is checked here, per request, so a bad one fails alone and never the batch
        it would have joined; so is the output, after the run: a request with a sample whose
        output is not finite (a finite input that overflows inside the model) is answered 422
        ``non_finite_output`` and its samples are not monitored, and the others in its run go
        on. Feeds the model's live monitor when statistics were computed; with a sampling
        fraction set, some requests that did not ask are run with statistics for it.
        """
        if x.ndim >= 1:
            self.check_batch(int(x.shape[0]))
        return await self._infer(model, x, stats)

    async def _infer(self, model: LoadedModel, x: np.ndarray, stats: str) -> RunResult:
        """``infer`` once the batch size is checked."""
        if stats not in STATS_MODES:
            raise ModelInputError(
                f"unknown statistics option {stats!r}; choose one of {', '.join(STATS_MODES)}"
            )
        if stats != "none" and not model.has_statistics:
            raise ModelInputError(f"model {model.name!r}: {model.stats_error}")
        x = model.validate_input(x)
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
        result = await self._run(model, x, run_stats)  # its run fed the monitor
        if sampled:  # the client did not ask: give it the plain answer
            result = RunResult(
                logits=result.logits,
                probabilities=result.probabilities,
                layer_stats=None,
                per_sample_active=None,
                outputs=result.outputs,
            )
        return result

    def _batcher(self, model: LoadedModel) -> ModelBatcher:
        """The model version's batcher, created on its first request."""
        batcher = self._batchers.get(model)
        if batcher is None:
            max_size, max_delay_s = self.settings.batching_for(model.name, model.config)
            if model.input_shape[0] is not None:  # a fixed batch axis: requests cannot merge
                max_size = 1
            batcher = ModelBatcher(
                f"{model.name}/{model.version}",
                max_size=max_size,
                max_delay_s=max_delay_s,
                max_queue=self.settings.max_queue_length,
                deadline_s=self.settings.request_deadline_s,
                workers=self.settings.inference_workers,
                on_batch=self._record_batch,
                inline=model.small and self.settings.inline_small_models,
            )
            self._batchers[model] = batcher
        return batcher

    async def _run(self, model: LoadedModel, x: np.ndarray, stats: str) -> RunResult:
        """The one call site of a model run: the model's batcher, a time limit."""
        if not self._accepting:
            raise ServiceUnavailableError("the service is shutting down")
        try:
            future = self._batcher(model).submit(model, x, stats)
        except OverloadedError as exc:
            # Retry once the queue could have drained below the deadline.
            retry = max(1, math.ceil(exc.expected_s - exc.deadline_s))
            raise ServiceUnavailableError(
                f"model {model.name!r} is overloaded: {exc} (request_deadline_s); retry in "
                f"{retry} s",
                code="overloaded",
                headers={"Retry-After": str(retry)},
            ) from None
        except QueueFullError as exc:
            raise ServiceUnavailableError(
                f"{exc.queued} requests are already queued for model {model.name!r}, the limit "
                f"is {exc.limit} (max_queue_length); retry shortly",
                code="queue_full",
                headers={"Retry-After": "1"},
            ) from None
        except BatcherClosedError:
            raise ServiceUnavailableError("the service is shutting down") from None
        # A timer instead of asyncio.wait_for: no extra task or waiter per request. A request
        # that times out while queued is skipped; one in a run is abandoned (threads cannot be
        # stopped) and its run keeps the worker until it ends.
        timer = future.get_loop().call_later(self.settings.request_timeout_s, _expire, future)
        try:
            return await future
        except TimeoutError:
            raise ServiceUnavailableError(
                f"inference on model {model.name!r} took longer than "
                f"{self.settings.request_timeout_s} s (request_timeout_s)",
                code="timeout",
            ) from None
        except BatcherClosedError:
            raise ServiceUnavailableError("the service is shutting down") from None
        except NonFiniteOutputError as exc:  # this request's samples only; not monitored
            raise UnprocessableError(str(exc), code="non_finite_output") from None
        finally:
            timer.cancel()

    def _record_batch(self, report: BatchReport) -> None:
        """Metrics of one finished run: run time, samples per run, each request's wait; and
        the queue length, which is exact after each run (it lags by the run in progress)."""
        name, version = report.model.name, report.model.version
        key = (name, version, report.stats)
        children = self._run_children.get(key)
        if children is None:
            metrics = self.metrics
            children = self._run_children[key] = (
                metrics.queue_seconds.labels(model=name),
                metrics.inference_seconds.labels(model=name, version=version, stats=report.stats),
                metrics.batch_size.labels(model=name),
            )
        queue_seconds, inference_seconds, batch_size = children
        for seconds in report.queue_seconds:
            queue_seconds.observe(seconds)
        inference_seconds.observe(report.run_seconds)
        batch_size.observe(report.samples)
        self.metrics.queue_length.set(self.pending)
        if report.activity and self.repository is not None:
            self._record_activity(report.model, report.activity)

    def _record_activity(self, model: LoadedModel, parts: list[Mapping[str, np.ndarray]]) -> None:
        """Feed one run's active rates to the monitor, one update for the run's requests,
        before any of them is answered (so a client that reads the monitor next sees its
        samples). Only the monitored (default) version records: its layers and reference
        profile belong to that version."""
        assert self.repository is not None
        packed = [part for part in parts if isinstance(part, LayerActivity)]
        if len(packed) == len(parts) > 1:  # slices of one run's block, in order
            parts = [LayerActivity(np.concatenate([p.array for p in packed]), packed[0].columns)]
        for part in parts:
            self.repository.record(model, part)

    @property
    def pending(self) -> int:
        """Requests waiting for or in a model run, over all models."""
        return sum(b.pending for b in list(self._batchers.values()))

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

    def _collect_monitor_metrics(self) -> list[Metric]:
        """The monitors' families (``service.core.monitor``), at scrape time: merged over
        every worker's counts."""
        repository = self.repository
        monitors = [repository.monitor(n) for n in self.model_names()] if repository else []
        return collect_metrics(monitors)


class _Repository(ModelRepository):
    """The core's repository plus per-model settings: execution providers
    (``model_providers``) and the batch size runs on a GPU are padded to (the model's
    largest batch, ``ServiceSettings.batching_for``).

    Adapter: ``ModelRepository`` takes one provider list and one batch size for all models;
    this picks the model's own for each model it loads.
    """

    def __init__(
        self,
        root: Path,
        *,
        model_providers: dict[str, list[str]],
        batch_sizes: Callable[[str, ModelConfig | None], int],
        **kwargs: Any,
    ) -> None:
        super().__init__(root, **kwargs)
        self._model_providers = model_providers
        self._batch_sizes = batch_sizes

    def providers_for(self, name: str, config: ModelConfig | None = None) -> str | Sequence[str]:
        """The model's own providers when ``model_providers`` names it, else its config.json's,
        else the service's."""
        return self._model_providers.get(name) or super().providers_for(name, config)

    def gpu_batch_for(self, name: str, config: ModelConfig | None = None) -> int:
        """The model's largest batch."""
        return self._batch_sizes(name, config)


def _expire(future: asyncio.Future[RunResult]) -> None:
    """The time limit ran out: fail the request (its run, if any, goes on without it)."""
    if not future.done():
        future.set_exception(TimeoutError())
