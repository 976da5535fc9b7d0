"""The search page (`search.py serve`) under load, on loopback: a burst of parallel requests is
answered within seconds by a bounded set of threads, idle connections hold no thread and are
closed, and only requests addressed to the page itself are answered (DNS rebinding)."""
from __future__ import annotations

import http.client
import json
import os
import re
import select
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import pytest
import test_search_page
from conftest import REPO

from rehamot.retrieval.server import IDLE_TIMEOUT_S

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]
# test_search_page's fixtures: its tiny trained run with an index, and `serve` on a free port
run_dir, server = test_search_page.run_dir, test_search_page.server

QUERIES = ["a person jumps twice", "someone walks forward and turns left", "a man waves", "a woman kicks",
           "a person sits down", "someone runs in a circle", "a dancer spins around", "a person hops"]


def address(server) -> tuple[str, int]:
    parts = urllib.parse.urlsplit(server["url"])
    return parts.hostname, parts.port


def threads(pid: int) -> int:
    """The process's thread count now (Linux /proc)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^Threads:\s+(\d+)", status, re.M).group(1))


def request(host: str, port: int, path: str, headers: dict[str, str] | None = None,
            timeout: float = 30) -> tuple[int, dict]:
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_200_parallel_requests_are_all_answered_within_seconds_by_bounded_threads(server):
    host, port = address(server)
    pid = server["proc"].pid
    assert request(host, port, "/api/search?q=warm")[0] == 200
    before, peak, done = threads(pid), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], threads(pid))
            done.wait(0.01)

    release = threading.Barrier(201)
    results: list[tuple[str, float]] = [("not run", 0.0)] * 200

    def one(i: int) -> None:
        release.wait()
        started = time.perf_counter()
        try:
            status, body = request(host, port, f"/api/search?q={urllib.parse.quote(QUERIES[i % 8])}&k=5", timeout=20)
            results[i] = ("ok" if status == 200 and len(body["hits"]) == 5 else f"status {status}",
                          time.perf_counter() - started)
        except OSError as err:  # a time-out or a reset
            results[i] = (type(err).__name__, time.perf_counter() - started)

    sampler = threading.Thread(target=sample)
    sampler.start()
    clients = [threading.Thread(target=one, args=(i,)) for i in range(200)]
    for client in clients:
        client.start()
    release.wait()
    started = time.perf_counter()
    for client in clients:
        client.join(timeout=60)
    wall = time.perf_counter() - started
    done.set()
    sampler.join()
    failed = [outcome for outcome, _ in results if outcome != "ok"]
    assert not failed, (len(failed), sorted(set(failed)))
    assert max(seconds for _, seconds in results) < 15 and wall < 20, wall
    assert peak[0] <= before + 2, (before, peak[0])  # the worker pool exists already: no thread per request


def test_idle_connections_hold_no_thread_and_are_closed_after_the_idle_timeout(server):
    host, port = address(server)
    pid = server["proc"].pid
    before = threads(pid)
    idle = [socket.create_connection((host, port), timeout=10) for _ in range(300)]
    opened = time.monotonic()
    try:
        time.sleep(0.5)
        assert threads(pid) <= before + 2, (before, threads(pid))
        status, body = request(host, port, "/api/search?q=a+person+jumps&k=3", timeout=10)
        assert status == 200 and len(body["hits"]) == 3  # a real request is not stuck behind them
        for sock in idle:
            sock.settimeout(max(0.1, opened + IDLE_TIMEOUT_S + 10 - time.monotonic()))
            assert sock.recv(1) == b""  # closed by the server (a time-out here raises)
        assert time.monotonic() - opened >= IDLE_TIMEOUT_S - 0.5
    finally:
        for sock in idle:
            sock.close()
    assert threads(pid) <= before + 2


@pytest.mark.parametrize("host_header, status", [
    ("127.0.0.1:{port}", 200),
    ("localhost:{port}", 200),
    ("LOCALHOST:{port}", 200),
    ("evil.example:{port}", 403),  # a name rebound to 127.0.0.1
    ("evil.example", 403),
    ("127.0.0.1:1", 403),
    ("127.0.0.1", 403),
])
def test_only_requests_addressed_to_the_page_are_answered(server, host_header, status):
    host, port = address(server)
    got, body = request(host, port, "/api/info", headers={"Host": host_header.format(port=port)})
    assert got == status, body
    if status == 403:
        assert "unknown Host" in body["error"]


def test_a_request_without_a_host_header_is_refused(server):
    host, port = address(server)
    connection = http.client.HTTPConnection(host, port, timeout=30)
    connection.putrequest("GET", "/", skip_host=True)
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 403, response.read()
    connection.close()


def test_a_non_loopback_host_warns_that_the_page_has_no_authentication(run_dir, tmp_path):
    log = tmp_path / "stderr.txt"
    with log.open("w") as stderr:
        proc = subprocess.Popen([sys.executable, "rehamot/search.py", "serve", str(run_dir), "--host", "0.0.0.0",
                                 "--port", "0"], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                stdout=subprocess.PIPE, stderr=stderr, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 180)
        line = proc.stdout.readline() if ready else ""
        port = int(re.search(r"http://0\.0\.0\.0:(\d+)/", line).group(1))
        # reached through loopback, the address the client used is the page's own
        assert request("127.0.0.1", port, "/api/info")[0] == 200
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    lines = log.read_text().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("search: warning: the page has no authentication"), lines
