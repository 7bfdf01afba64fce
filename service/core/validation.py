"""Validation of a model file from a client, in a child process with a time and a memory limit.

Loading a file (onnx's checker and shape inference, onnxruntime's graph optimizations) and
running it can take any time and memory its author likes: an ONNX Loop of 2^62 iterations
never ends, and a chain of 20,000 Relu nodes (460 KB) ran for minutes at 895 MB. In a thread
of the server such a file held the management lock (every other change waited) and kept
SIGTERM from stopping the server, since nothing can stop a thread inside onnxruntime. A
process can be stopped, so the management API validates a file (upload, load) like this:

1. ``multiprocessing``'s ``spawn`` starts a fresh interpreter (never ``fork``: the server runs
   onnxruntime and inference threads, which a forked child would inherit in whatever state).
   As with uvicorn's own workers, a script that starts the server must keep that under
   ``if __name__ == "__main__":`` (spawn imports the parent's main script in the child);
   ``python -m service`` and the ``uvicorn`` command do.
2. Before it imports numpy or onnxruntime, the child limits itself: its address space to
   ``validation_memory_bytes`` (``RLIMIT_AS``: an allocation past it fails), no core dumps,
   its CPU time (``RLIMIT_CPU``, a backstop should the server die and leave it), one thread
   for BLAS and OpenMP pools (their per-core threads would use up the address space on a big
   host), and ``oom_score_adj`` 1000 (if the pod runs out of memory anyway, the kernel kills
   the child, not a server).
3. It tells the server it is ready; the server gives it what is left of
   ``validation_timeout_s``, counted from the start, to load the file (CPU provider, one
   intra-op thread, so it leaves the other cores to serving), warm it up, check it
   (``check_servable``) and answer on a pipe.
4. The server waits on the event loop (the child's exit, never a blocked thread). Past the
   time limit, when the request is cancelled, or when the server stops (``stop``: SIGTERM),
   the child is killed (SIGKILL) and reaped.

Every refusal is a ``ValidationRefused`` whose reason names the problem, or the limit hit and
its setting; a stop answers 503. The child's start costs about a second (a Python that imports
onnxruntime), counted in ``validation_timeout_s``, so that a refusal comes within the limit of
the request; a child that is not ready within ``START_TIMEOUT_S`` is killed too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import re
import resource
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path

import anyio.to_thread

from service.core.errors import ServiceUnavailableError

logger = logging.getLogger(__name__)

# Longest wait for a child to be ready (its Python started, numpy and onnxruntime imported):
# ~1 s on an idle 2-core machine; generous for a loaded one, and bounded for a broken one.
START_TIMEOUT_S = 60.0
REAP_TIMEOUT_S = 2.0  # a SIGKILLed child is gone in milliseconds; don't hang the loop on one
PROCESS_NAME = "relu-validate"  # the child's name in ps and top (at most 15 characters)
MAX_DETAIL = 1000  # characters of a child's message kept: the answer names the problem
# A failed allocation, as Python, numpy, onnxruntime's allocator and C++ report it.
_ALLOCATION_FAILED = re.compile(
    r"Failed to allocate memory|bad_alloc|bad allocation|Unable to allocate|"
    r"Cannot allocate memory|out of memory|failed to map segment",
    re.IGNORECASE,
)
# Thread pools that size themselves to the host's cores at import (numpy's OpenBLAS spawns one
# thread, and reserves its buffers, per core): one each in the child, set before the import.
_ONE_THREAD = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")

# What the child sends: ("ready", ""), then one of ("ok", ""), ("invalid", reason),
# ("memory", detail) or ("error", traceback).
READY, OK, INVALID, MEMORY, ERROR = "ready", "ok", "invalid", "memory", "error"


@dataclass(frozen=True)
class ValidationLimits:
    """The limits of one validation (``ServiceSettings.validation_timeout_s`` and
    ``validation_memory_bytes``)."""

    timeout_s: float
    memory_bytes: int

    def describe_memory(self) -> str:
        """The memory limit as the answers say it: ``768 MiB (validation_memory_bytes)``."""
        return f"{self.memory_bytes / 2**20:g} MiB (validation_memory_bytes)"


class ValidationRefused(Exception):  # noqa: N818 - a refusal, not an error of ours
    """The child found the file cannot serve, or it hit a limit: ``reason`` says which."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ChildValidator:
    """Validates files in child processes (module docstring); ``stop`` kills the ones in
    progress and refuses new ones."""

    def __init__(self, limits: ValidationLimits) -> None:
        self.limits = limits
        self._context = multiprocessing.get_context("spawn")
        self._children: set[BaseProcess] = set()
        self._stopping = False

    def stop(self) -> None:
        """Kill every validation in progress; refuse new ones with 503. Safe from a signal
        handler or another thread (it only sets a flag and sends signals)."""
        self._stopping = True
        for process in list(self._children):
            _kill(process)

    async def validate(self, path: Path, name: str, version: str) -> None:
        """Load, warm up and check ``path`` as ``name``/``version`` in a child process;
        ``ValidationRefused`` naming the problem or the limit hit; 503 when stopping."""
        self._refuse_when_stopping(name, version)
        receiver, sender = self._context.Pipe(duplex=False)
        process = self._context.Process(
            target=_validate_in_child,
            args=(sender, str(path), name, version, self.limits),
            name=f"validate {name}/{version}",
            daemon=True,  # never outlives the server (multiprocessing kills it at exit)
        )
        self._children.add(process)
        try:
            # Start in a thread: spawning writes the child's preparation data to a pipe, and
            # the first start also launches multiprocessing's resource tracker.
            started = time.monotonic()
            await anyio.to_thread.run_sync(process.start)
            sender.close()  # the child holds the only writer: its exit is EOF here
            if self._stopping:  # a stop that came while it started did not see its pid
                _kill(process)
            outcome = await self._answer(process, receiver, name, version, started)
            self._refuse_when_stopping(name, version)  # killed by stop: no verdict on the file
            logger.info(
                "validated %s version %s in a child process: %s after %.2f s",
                name,
                version,
                outcome[0] if outcome else f"exit status {process.exitcode}",
                time.monotonic() - started,
            )
            self._judge(outcome, process.exitcode, name, version)
        finally:
            self._children.discard(process)
            _reap(process)
            receiver.close()
            sender.close()

    async def _answer(
        self, process: BaseProcess, receiver: Connection, name: str, version: str, started: float
    ) -> tuple[str, str] | None:
        """Wait for the started child to be ready, then for its exit within the time limit
        counted from ``started``; its answer (None if it died without one).
        ``ValidationRefused`` past a limit."""
        ready = await _wait_readable([receiver.fileno(), process.sentinel], START_TIMEOUT_S)
        if not ready:
            raise ValidationRefused(
                f"the validating process did not start within {START_TIMEOUT_S:g} s"
            )
        first = _receive(receiver) if receiver.poll() else None
        if first != (READY, ""):  # it failed before it was ready (its imports), or died
            if not await _wait_readable([process.sentinel], REAP_TIMEOUT_S):
                _kill(process)  # answered, but does not exit
            process.join(REAP_TIMEOUT_S)  # it has exited (or was killed): at once
            return first
        left = self.limits.timeout_s - (time.monotonic() - started)
        if not await _wait_readable([process.sentinel], max(0.0, left)):
            logger.warning(
                "validating %s version %s: over %g s (validation_timeout_s), killed",
                name,
                version,
                self.limits.timeout_s,
            )
            raise ValidationRefused(
                f"validation took longer than {self.limits.timeout_s:g} s (validation_timeout_s)"
            )
        process.join(REAP_TIMEOUT_S)  # it has exited: at once
        return _receive(receiver) if receiver.poll() else None

    def _refuse_when_stopping(self, name: str, version: str) -> None:
        if self._stopping:
            raise ServiceUnavailableError(
                f"the server is stopping: the validation of {name!r} version {version} "
                "did not finish; nothing changed, send it again (to another instance)",
                code="shutting_down",
            )

    def _judge(
        self, outcome: tuple[str, str] | None, exitcode: int | None, name: str, version: str
    ) -> None:
        """Return when the child said OK; else raise ``ValidationRefused`` saying why."""
        if outcome is not None:
            kind, detail = outcome
            if kind == OK:
                return
            if kind == INVALID:
                raise ValidationRefused(detail)
            if kind == MEMORY:
                raise ValidationRefused(
                    f"validation needed more memory than the limit of "
                    f"{self.limits.describe_memory()} ({detail})"
                )
            # A graph that trips the loader in a way nobody foresaw: the child's traceback.
            logger.error("validating %s version %s in a child process:\n%s", name, version, detail)
            last = detail.strip().splitlines()[-1] if detail.strip() else "unknown error"
            raise ValidationRefused(f"the model could not be loaded ({last})")
        if exitcode is not None and exitcode < 0:  # a signal; never ours: see validate
            raise ValidationRefused(self._death(-exitcode))
        raise ValidationRefused(
            f"the validating process exited with status {exitcode} without an answer"
        )

    def _death(self, number: int) -> str:
        """Why a child that died of signal ``number`` gave no answer."""
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        memory = self.limits.describe_memory()
        if number == signal.SIGXCPU:
            return (
                f"validation used more CPU time than allowed for "
                f"{self.limits.timeout_s:g} s (validation_timeout_s)"
            )
        if number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            return f"the validating process was stopped by {name}"
        if number == signal.SIGKILL:  # not by us: the kernel's OOM killer, most likely
            return (
                f"the validating process was killed (SIGKILL), most likely by the kernel for "
                f"want of memory: less is free than the limit of {memory}"
            )
        return (
            f"the validating process crashed ({name}): onnxruntime failed on this file, or "
            f"memory ran out within the limit of {memory}"
        )


async def _wait_readable(fds: list[int], timeout: float) -> bool:
    """Whether one of ``fds`` turned readable (data, EOF, a process's exit) within
    ``timeout`` seconds; waits on the event loop."""
    loop = asyncio.get_running_loop()
    event = asyncio.Event()
    for fd in fds:
        loop.add_reader(fd, event.set)
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except TimeoutError:
        return False
    finally:
        for fd in fds:
            loop.remove_reader(fd)
    return True


def _receive(receiver: Connection) -> tuple[str, str] | None:
    """One message of the child, or None when it died in the middle of sending it."""
    try:
        kind, detail = receiver.recv()
    except (EOFError, OSError, ValueError, TypeError):
        return None
    return str(kind), str(detail)


def _kill(process: BaseProcess) -> None:
    """SIGKILL ``process`` if it was started and has not been reaped."""
    if process.pid is None:
        return
    with contextlib.suppress(OSError, ValueError, AttributeError):  # reaped and closed
        process.kill()


def _reap(process: BaseProcess) -> None:
    """Kill ``process`` unless it has exited, wait for it, release what it holds."""
    if process.pid is None:
        return
    if process.exitcode is None:
        _kill(process)
        process.join(REAP_TIMEOUT_S)
    if process.exitcode is None:
        logger.error("validation process %d did not exit after SIGKILL", process.pid)
        return
    process.close()


# ---------------------------------------------------------------------- the child


def _validate_in_child(
    sender: Connection, path: str, name: str, version: str, limits: ValidationLimits
) -> None:
    """The child's whole life: limit itself, import, say ready, validate, answer, exit."""
    _limit_self(limits)
    outcome: tuple[str, str]
    try:
        from service.runtime.loaded_model import LoadedModel  # after the limits: see above
        from service.runtime.servable import check_servable

        sender.send((READY, ""))
        model = LoadedModel.load(path, name, version, providers="cpu", threads=1)
        model.warm_up()
        check_servable(model)
        outcome = (OK, "")
    except BaseException as exc:  # every failure is an answer; SystemExit included
        outcome = _outcome_of(exc)
    sender.send(outcome)
    sender.close()
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    os._exit(0)  # skip the teardown of sessions and thread pools: the answer is sent


def _limit_self(limits: ValidationLimits) -> None:
    """Limits and thread counts of the child, before anything heavy is imported."""
    for variable in _ONE_THREAD:
        os.environ[variable] = "1"
    # Ctrl+C in a terminal reaches the whole process group: end at once, as the server does,
    # instead of answering with a KeyboardInterrupt's traceback.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a crash must not dump ~1 GB
    resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
    # CPU time: one busy thread for the time limit, plus the start, twice over. The server
    # kills the child long before; this ends one that outlived a server killed with SIGKILL.
    cpu_s = int(2 * (limits.timeout_s + START_TIMEOUT_S)) + 1
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 5))
    # Not Linux, or /proc not mounted: the rlimits still hold.
    with contextlib.suppress(OSError), open("/proc/self/oom_score_adj", "w") as file:
        file.write("1000")
    with contextlib.suppress(OSError), open("/proc/self/comm", "w") as file:
        file.write(PROCESS_NAME)  # what ps and top show


def _outcome_of(exc: BaseException) -> tuple[str, str]:
    """The child's answer for a failure: a refusal with its reason, a failed allocation, or
    an unexpected error with its traceback."""
    from service.runtime.loaded_model import ModelLoadError

    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and len(chain) < 10:
        chain.append(current)
        current = current.__cause__ or current.__context__
    for error in chain:
        if isinstance(error, MemoryError) or _ALLOCATION_FAILED.search(str(error)):
            return MEMORY, _short(_allocation_detail(error))
    if isinstance(exc, ModelLoadError):
        return INVALID, _short(exc.reason)
    return ERROR, _short("".join(traceback.format_exception(exc)), keep_end=True)


def _allocation_detail(error: BaseException) -> str:
    """The failed allocation in a few words: ``Failed to allocate memory for requested
    buffer of size 8589934592`` from onnxruntime's long message, else the error's type."""
    text = str(error)
    found = _ALLOCATION_FAILED.search(text)
    if found is None:
        return type(error).__name__
    return text[found.start() :].splitlines()[0].rstrip(") ")[:200]


def _short(text: str, keep_end: bool = False) -> str:
    if len(text) <= MAX_DETAIL:
        return text
    return "..." + text[-MAX_DETAIL:] if keep_end else text[:MAX_DETAIL] + "..."
