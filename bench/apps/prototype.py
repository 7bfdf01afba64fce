"""Issue 4's throwaway prototype, as a reference for the ``x raw`` figure: greedy batching (no
batch timeout: whatever queued while the inference thread was busy forms the next batch, up
to 64 samples), inference in one worker thread (onnxruntime with 2 intra-op threads, spinning,
releases the GIL), raw float32 bodies, a small JSON answer (top label and its probability).
No validation, no metrics, no statistics: the least a batching server can do per request.

Two front ends over the same batching:

    python bench/apps/prototype.py MODEL --port 8000            # bare asyncio (uvloop), own HTTP
    BENCH_MODEL=MODEL uvicorn bench.apps.prototype:app          # a plain ASGI app on uvicorn

The first parses HTTP/1.1 itself (Content-Length bodies, keep-alive: enough for wrk); the second
is what the same design costs inside uvicorn, without FastAPI.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime as ort

MAX_BATCH = 64


class GreedyBatcher:
    """One inference thread; each run takes what queued while the previous one ran."""

    def __init__(self, model_path: str) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "1")
        self.session = ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])
        model_input = self.session.get_inputs()[0]
        self.input_name = model_input.name
        self.sample_shape = [d if isinstance(d, int) else 1 for d in model_input.shape[1:]]
        self.thread = ThreadPoolExecutor(1)
        self.queue: list[tuple[np.ndarray, asyncio.Future[bytes]]] = []
        self.running = False

    def submit(self, body: bytes) -> asyncio.Future[bytes]:
        """Queue one sample (a raw float32 body); the future resolves with the JSON answer."""
        x = np.frombuffer(body, np.float32).reshape(1, *self.sample_shape)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.queue.append((x, future))
        if not self.running:
            self.running = True
            loop.create_task(self._drain(loop))
        return future

    def _run(self, xs: list[np.ndarray]) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.concatenate(xs)})[0]

    async def _drain(self, loop: asyncio.AbstractEventLoop) -> None:
        while self.queue:
            batch, self.queue = self.queue[:MAX_BATCH], self.queue[MAX_BATCH:]
            logits = await loop.run_in_executor(self.thread, self._run, [x for x, _ in batch])
            z = np.exp(logits - logits.max(axis=1, keepdims=True))
            probabilities = z / z.sum(axis=1, keepdims=True)
            for row, (_, future) in zip(probabilities, batch, strict=True):
                best = int(row.argmax())
                answer = {"label": best, "probability": float(row[best])}
                future.set_result(json.dumps(answer).encode())
        self.running = False


class HttpProtocol(asyncio.Protocol):
    """HTTP/1.1 with Content-Length bodies and keep-alive; answers in arrival order."""

    def __init__(self, batcher: GreedyBatcher) -> None:
        self.batcher = batcher
        self.buffer = b""
        self.pending: list[asyncio.Future[bytes]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head = self.buffer[:end].lower()
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name == b"content-length":
                    length = int(value)
            if len(self.buffer) < end + 4 + length:
                return
            body = self.buffer[end + 4 : end + 4 + length]
            self.buffer = self.buffer[end + 4 + length :]
            if head.startswith(b"get"):
                future = asyncio.get_running_loop().create_future()
                future.set_result(b"ok")
            else:
                future = self.batcher.submit(body)
            self.pending.append(future)
            future.add_done_callback(self._flush)

    def _flush(self, _: asyncio.Future[bytes]) -> None:
        while self.pending and self.pending[0].done():
            answer = self.pending.pop(0).result()
            head = (
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
            )
            self.transport.write(head % len(answer) + answer)


class AsgiApp:
    """The same batching as a plain ASGI app: POST any path with the body, GET for health."""

    def __init__(self) -> None:
        self.batcher: GreedyBatcher | None = None

    async def __call__(self, scope: dict, receive, send) -> None:
        if scope["type"] != "http":
            return
        if self.batcher is None:
            self.batcher = GreedyBatcher(os.environ["BENCH_MODEL"])
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        answer = b"ok" if scope["method"] == "GET" else await self.batcher.submit(body)
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(answer))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": answer})


app = AsgiApp()


async def serve(model_path: str, host: str, port: int) -> None:
    batcher = GreedyBatcher(model_path)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: HttpProtocol(batcher), host, port, backlog=2048)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    try:
        import uvloop  # what uvicorn runs on when it is installed
    except ImportError:
        asyncio.run(serve(args.model, args.host, args.port))
    else:
        uvloop.run(serve(args.model, args.host, args.port))


if __name__ == "__main__":
    main()
