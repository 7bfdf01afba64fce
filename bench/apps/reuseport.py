"""N copies of a uvicorn server on one port, each process with its own listening socket
(``SO_REUSEPORT``): the kernel spreads new connections over the sockets by a hash of their
addresses, so each process gets about 1/N of the clients. For the benchmark's multi-process
row; the service itself runs one process (its model management, live statistics and metrics
are per process).

    python bench/apps/reuseport.py --processes 2 --host 127.0.0.1 --port 8000 -- \\
        python -m service --log-level warning

Each command gets ``--fd K``, its socket. Why not ``uvicorn --workers N``: its processes share
one listening socket, and asyncio accepts every pending connection in one go when it wakes, so
with keep-alive clients one process often holds most of them (ResNet-20, 64 clients: runs
alternated between ~1,800 and ~3,300 req/s). SIGTERM or SIGINT stops every copy; when one
exits, the others are stopped too.
"""

from __future__ import annotations

import argparse
import signal
import socket
import subprocess
import sys
import time


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` with SO_REUSEPORT, listening, inheritable."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2, help="copies of the server (2)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- the server's command")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command or args.processes < 1:
        parser.error("give --processes >= 1 and a command after --")
    sockets = [listening_socket(args.host, args.port) for _ in range(args.processes)]
    procs = [
        subprocess.Popen([*command, "--fd", str(s.fileno())], pass_fds=[s.fileno()])
        for s in sockets
    ]
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while not stopping and all(p.poll() is None for p in procs):
        time.sleep(0.2)
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    return 0 if stopping else 1


if __name__ == "__main__":
    sys.exit(main())
