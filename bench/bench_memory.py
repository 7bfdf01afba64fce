"""Peak memory of a worker under an image decode bomb, against the same bomb on another tree.

    python bench/bench_memory.py [--tree DIR] [--out FILE.json]

The bomb is issue 15's: one multipart request of 64 PNGs of 4096 x 4096 zeros (~1 MB sent,
1 GiB once decoded), sent once, then twice at once, to ``python -m service`` (one worker, the
default model) with ``RELU_SERVE_MAX_REQUEST_PIXELS`` raised so that it is decoded. The figure
is the growth of the process's peak resident memory (``VmHWM``) over its peak at ready, and
its resident memory afterwards. ``--tree`` runs the server from another checkout (an earlier
commit, say) for the baseline; the bomb and the client are this tree's.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.server_helpers import free_port  # noqa: E402
from tests.service.server.test_memory import BOMB  # noqa: E402

MIB = 1024 * 1024


def status_field(pid: int, name: str) -> int:
    """A ``/proc/<pid>/status`` memory field, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(name)


def measure(tree: Path) -> dict[str, float]:
    port = free_port()
    env = {
        **os.environ,
        "RELU_SERVE_WORKERS": "1",
        "RELU_SERVE_LOG_LEVEL": "warning",
        "RELU_SERVE_MAX_REQUEST_PIXELS": str(64 * 4096 * 4096),
        "RELU_SERVE_REQUEST_DEADLINE_S": "60",
        "RELU_SERVE_REQUEST_TIMEOUT_S": "300",
    }
    command = [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port)]
    server = subprocess.Popen(command, cwd=tree, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(url + "/health/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        start = status_field(server.pid, "VmHWM")

        def bomb(_: int) -> int:
            path = "/v1/models/digits/predict"
            return httpx.post(url + path, files=BOMB, timeout=300).status_code

        began = time.perf_counter()
        assert bomb(0) == 200
        one_s = time.perf_counter() - began
        one = status_field(server.pid, "VmHWM")
        began = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            assert list(pool.map(bomb, range(2))) == [200, 200]
        two_s = time.perf_counter() - began
        two = status_field(server.pid, "VmHWM")
        after = status_field(server.pid, "VmRSS")
    finally:
        server.terminate()
        server.wait()
    return {
        "peak_at_ready_mib": start / MIB,
        "one_bomb_peak_growth_mib": (one - start) / MIB,
        "one_bomb_s": one_s,
        "two_at_once_peak_growth_mib": (two - start) / MIB,
        "two_at_once_s": two_s,
        "rss_after_mib": after / MIB,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", type=Path, help="also measure a server run from this tree")
    parser.add_argument("--out", type=Path, help="write the result as JSON here")
    args = parser.parse_args()
    result = {"this tree": measure(REPO)}
    if args.tree:
        result["baseline (--tree)"] = measure(args.tree)
    text = json.dumps(result, indent=2)
    print(text)  # noqa: T201
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
