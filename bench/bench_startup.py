"""Start-to-ready time and resident memory of the serving process on the default model.

    python bench/bench_startup.py [--repeats 5] [--requests 200] [--out FILE.json]

Each repeat starts ``uvicorn service.main:app`` on a free 127.0.0.1 port, polls
``/health/ready`` every 10 ms from the moment the process is spawned, then sends
``--requests`` predictions (half with ``stats=channels``) and reads the process's RSS
(``VmRSS`` and ``VmHWM``, the peak, from /proc). Medians over the repeats.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mb(pid: int) -> tuple[float, float]:
    """(current, peak) resident set size in MB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def _digit_png() -> bytes:
    image = np.zeros((28, 28), dtype=np.uint8)
    image[4:24, 12:16] = 255  # a "1"
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _multipart(png: bytes) -> tuple[bytes, str]:
    boundary = "benchboundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="d.png"\r\n'
            f"Content-Type: image/png\r\n\r\n"
        ).encode()
        + png
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


def measure_once(requests: int) -> dict:
    """One start: seconds to ready, RSS after traffic."""
    port = _free_port()
    env = {**os.environ, "RELU_SERVE_LOG_LEVEL": "warning"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "service",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        cwd=REPO,
        env=env,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}")
            try:
                with urllib.request.urlopen(f"{base}/health/ready", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.perf_counter() - t0 > 60:
                raise RuntimeError("not ready after 60 s")
            time.sleep(0.01)
        ready_s = time.perf_counter() - t0
        rss_ready, _ = _rss_mb(proc.pid)
        body, content_type = _multipart(_digit_png())
        for i in range(requests):
            stats = "channels" if i % 2 else "none"
            req = urllib.request.Request(
                f"{base}/v1/models/digits/predict?stats={stats}",
                data=body,
                headers={"Content-Type": content_type},
            )
            with urllib.request.urlopen(req, timeout=10) as r:
                assert r.status == 200
        rss, peak = _rss_mb(proc.pid)
        return {"ready_s": ready_s, "rss_ready_mb": rss_ready, "rss_mb": rss, "peak_rss_mb": peak}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="server starts")
    parser.add_argument("--requests", type=int, default=200, help="predictions before reading RSS")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    runs = [measure_once(args.requests) for _ in range(args.repeats)]
    summary = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    print(f"{'median of':12} {args.repeats} starts")
    print(f"{'ready':12} {summary['ready_s']:.2f} s   (target <= 2 s)")
    print(f"{'RSS ready':12} {summary['rss_ready_mb']:.0f} MB")
    print(
        f"{'RSS after':12} {summary['rss_mb']:.0f} MB after {args.requests} requests, "
        f"peak {summary['peak_rss_mb']:.0f} MB (target <= 250 MB)"
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"median": summary, "runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
