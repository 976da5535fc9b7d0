"""Search page under load: many parallel requests, and many idle connections, on loopback.

    python benchmarks/search_page_load.py RUN_DIR [--requests 200] [--idle 300] [--timeout 60]

Starts `rehamot/search.py serve RUN_DIR` (its index built beforehand with `search.py index`) on
a free port, then:

1. fires `--requests` GET /api/search at once (one thread and one connection each, released
   together) and reports the latency percentiles, the time-outs and the failed connections, and
   the server's peak thread count;
2. opens `--idle` connections that send nothing, reports the server's thread count while they
   are open, and how many the server has closed after `--idle-wait` seconds.
"""
from __future__ import annotations

import argparse
import http.client
import socket
import threading
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import command_line
from search_page_latency import QUERIES, start_server


def server_threads(pid: int) -> int:
    """The server process's thread count now (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise RuntimeError(f"no thread count for pid {pid}")


class PeakThreads:
    """Samples a process's thread count every 20 ms while in its `with` block."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0, threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, server_threads(self.pid))
            self._stop.wait(0.02)

    def __enter__(self) -> PeakThreads:
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def one_request(host: str, port: int, path: str, timeout: float, start: threading.Barrier) -> tuple[str, float]:
    """("ok" | "timeout" | "error: ..." | "status N", seconds), timed from the release."""
    start.wait()
    started = time.perf_counter()
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        response.read()
        outcome = "ok" if response.status == 200 else f"status {response.status}"
    except TimeoutError:
        outcome = "timeout"
    except OSError as err:
        outcome = f"error: {type(err).__name__}"
    finally:
        connection.close()
    return outcome, time.perf_counter() - started


def burst(host: str, port: int, pid: int, requests: int, timeout: float) -> dict:
    paths = [f"/api/search?q={urllib.parse.quote(QUERIES[i % len(QUERIES)])}&k=10" for i in range(requests)]
    start = threading.Barrier(requests + 1)
    with PeakThreads(pid) as threads, ThreadPoolExecutor(max_workers=requests) as pool:
        futures = [pool.submit(one_request, host, port, path, timeout, start) for path in paths]
        start.wait()
        began = time.perf_counter()
        results = [future.result() for future in futures]
        wall = time.perf_counter() - began
    ms = sorted(1e3 * seconds for outcome, seconds in results if outcome == "ok")
    outcomes: dict[str, int] = {}
    for outcome, _ in results:
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    pick = (lambda q: ms[min(len(ms) - 1, round(q * (len(ms) - 1)))]) if ms else (lambda q: float("nan"))
    return {"outcomes": outcomes, "p50": pick(0.5), "p95": pick(0.95), "max": ms[-1] if ms else float("nan"),
            "wall": wall, "peak_threads": threads.peak}


def idle(host: str, port: int, pid: int, count: int, wait: float) -> dict:
    """Open `count` silent connections; how many threads they cost, how many the server closes."""
    before = server_threads(pid)
    sockets = [socket.create_connection((host, port), timeout=10) for _ in range(count)]
    opened = time.monotonic()
    time.sleep(1.0)
    held = server_threads(pid)
    closed: dict[int, float] = {}  # socket -> seconds from opening to the server's close
    while len(closed) < count and time.monotonic() < opened + wait:
        for i, sock in enumerate(sockets):
            if i not in closed and _closed_by_peer(sock):
                closed[i] = time.monotonic() - opened
        time.sleep(0.1)
    for sock in sockets:
        sock.close()
    return {"threads_before": before, "threads_held": held, "closed": len(closed),
            "seconds": max(closed.values()) if len(closed) == count else wait}


def _closed_by_peer(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:  # reset
        return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--timeout", type=float, default=60.0, help="client time-out per request, seconds")
    parser.add_argument("--idle", type=int, default=300, help="idle connections (0: skip)")
    parser.add_argument("--idle-wait", type=float, default=30.0, help="seconds to wait for them to be closed")
    args = parser.parse_args()
    proc, url = start_server(args.run_dir)
    host, port = urllib.parse.urlsplit(url).hostname, urllib.parse.urlsplit(url).port
    try:
        print(command_line())
        urllib.request.urlopen(f"{url}/api/search?q=warm+up", timeout=60).read()
        result = burst(host, port, proc.pid, args.requests, args.timeout)
        print(f"{args.requests} parallel GET /api/search (client time-out {args.timeout:.0f} s): "
              f"p50 {result['p50']:.0f} ms, p95 {result['p95']:.0f} ms, max {result['max']:.0f} ms, "
              f"all answered in {result['wall']:.1f} s; outcomes {result['outcomes']}; "
              f"server threads at peak {result['peak_threads']}")
        if args.idle:
            held = idle(host, port, proc.pid, args.idle, args.idle_wait)
            print(f"{args.idle} idle connections: server threads {held['threads_before']} -> "
                  f"{held['threads_held']}; {held['closed']} closed by the server within {held['seconds']:.1f} s of opening")
    finally:
        proc.terminate()
        proc.wait(timeout=60)


if __name__ == "__main__":
    main()
