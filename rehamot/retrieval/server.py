"""A local search page over a run's index: type a description, watch the top motions move.

    rehamot-search serve RUN_DIR [--host 127.0.0.1] [--port 8000] [--index NAME]

The page (rehamot/retrieval/web/: one HTML file, one script, one style sheet, no CDN, so it works
offline) draws each hit as an animated stick figure on a canvas from the joint positions the
index stores. It talks to a small JSON API:

    GET /api/search?q=TEXT&k=K   the same JSON and ranking as `query TEXT --json`
    GET /api/motion/ID           {"motion_id", "fps", "layout", "joints": T x J x [x, y, z] metres, "captions"}
    GET /api/similar/ID?k=K      the K nearest other motions and the top captions, as `query --motion ID --json`
    GET /api/info                the index's size (motions, captions), name, split, layout, fps and
                                 skeleton (bones to draw)

Bad input is a JSON {"error": ...} with a 4xx status. The server is the standard library's
HTTPServer with a fixed pool of WORKERS handler threads: a page and its dozen motion requests
are served concurrently, and the model (loaded once, before the URL is printed) is the only
shared state, guarded by the index's own lock. Under load it degrades by waiting, not by
growing: a large listen backlog holds the connections not yet accepted, an accepted
connection waits for its request in one selector loop (a file descriptor, not a thread) and
is closed if none comes within IDLE_TIMEOUT_S, and at most MAX_CONNECTIONS are held at once.

It is meant for one person's machine, not for the internet: it binds 127.0.0.1 unless told
otherwise, has no authentication (a non-loopback --host prints a warning), and answers only
requests addressed to it by its own address, localhost or 127.0.0.1 (the Host header), so a
web page whose name was rebound to 127.0.0.1 (DNS rebinding) cannot read it.
"""
from __future__ import annotations

import ipaddress
import json
import queue
import selectors
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from rehamot.retrieval.index import (
    MAX_QUERY_CHARS,
    SearchError,
    SearchIndex,
    checked_text,
    motion_json,
    motion_query_json,
    text_query_json,
)

WEB_DIR = Path(__file__).with_name("web")
DEFAULT_K = 10
MAX_K = 100
WORKERS = 8  # handler threads: queries share the model's lock; files and JSON overlap
IDLE_TIMEOUT_S = 5.0  # to send a request after connecting, and for each read or write after that
MAX_CONNECTIONS = 512  # accepted and not yet closed; the rest wait in the listen backlog
LOCAL_NAMES = ("localhost", "127.0.0.1")
# The only files served: a fixed table, so no request path ever reaches the file system.
STATIC_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/style.css": ("style.css", "text/css; charset=utf-8"),
}


class ApiError(Exception):
    """A request the API refuses: the status and a one-line reason for the JSON body."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


def _param(params: dict[str, list[str]], name: str, default: str | None = None) -> str | None:
    values = params.get(name)
    return values[-1] if values else default


def _k_param(params: dict[str, list[str]]) -> int:
    raw = _param(params, "k")
    if raw is None:
        return DEFAULT_K
    try:
        k = int(raw)
    except ValueError:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"k must be an integer in [1, {MAX_K}], got {raw[:20]!r}") from None
    if not 1 <= k <= MAX_K:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"k must be an integer in [1, {MAX_K}], got {k}")
    return k


def _checked_motion_id(index: SearchIndex, segment: str) -> str:
    """The motion id in one (still percent-encoded) path segment: 404 for an id the index does
    not hold, 400 for one that could only be an attempt to address something else."""
    motion_id = unquote(segment)
    if motion_id in index.position:
        return motion_id
    if not motion_id or any(c in motion_id for c in "/\\") or ".." in motion_id or not motion_id.isprintable():
        raise ApiError(HTTPStatus.BAD_REQUEST, f"invalid motion id {motion_id[:40]!r}")
    raise ApiError(HTTPStatus.NOT_FOUND, f"unknown motion id {motion_id[:40]!r}")


def api_info(index: SearchIndex) -> dict[str, Any]:
    """What the page needs once: the index's size and how to draw its skeleton."""
    from rehamot.motion.kinematics import get_layout

    layout = index.meta.get("layout")
    skeleton = None
    if layout:
        spec = get_layout(layout)
        skeleton = {"chains": [list(chain) for chain in spec.kinematic_chain],
                    "left": list(spec.left_chains), "right": list(spec.right_chains)}
    return {"num_motions": index.num_motions, "num_captions": len(index.caption_ids),
            "name": index.meta.get("name"), "split": index.meta.get("split"), "corpus": index.meta.get("corpus"),
            "layout": layout, "fps": index.meta.get("fps"), "skeleton": skeleton,
            "default_k": DEFAULT_K, "max_k": MAX_K, "max_query_chars": MAX_QUERY_CHARS}


def handle_api(index: SearchIndex, path: str, query: str) -> dict[str, Any]:
    """The JSON answer to GET `path`?`query` under /api/, or an ApiError."""
    segments = path.split("/")[2:]  # "/api/motion/ID" -> ["motion", "ID"]
    params = parse_qs(query, keep_blank_values=True)
    if segments == ["search"]:
        k = _k_param(params)
        try:
            text = checked_text(_param(params, "q", "") or "")  # empty, or over MAX_QUERY_CHARS
        except SearchError as err:
            raise ApiError(HTTPStatus.BAD_REQUEST, str(err)) from None
        return text_query_json(text, index.query_text(text, k))
    if segments == ["info"]:
        return api_info(index)
    if len(segments) == 2 and segments[0] in ("motion", "similar"):
        motion_id = _checked_motion_id(index, segments[1])
        if segments[0] == "motion":
            try:
                return motion_json(index, motion_id)
            except SearchError as err:  # an index without joints
                raise ApiError(HTTPStatus.NOT_FOUND, str(err)) from None
        k = _k_param(params)
        return motion_query_json({"motion_id": motion_id}, index.query_motion_id(motion_id, k))
    raise ApiError(HTTPStatus.NOT_FOUND, f"no such endpoint: {path[:80]}")


def host_allowed(host: str | None, names: set[str], port: int) -> bool:
    """Whether a request's Host header addresses this server: one of `names`, with the port
    (a browser leaves out only port 80)."""
    if not host:
        return False
    allowed = {f"{name}:{port}" for name in names} | (names if port == 80 else set())
    return host.strip().lower() in allowed


def make_handler(index: SearchIndex, verbose: bool = False) -> type[BaseHTTPRequestHandler]:
    """A request handler class bound to one index (and the page's files, read once)."""
    static = {route: ((WEB_DIR / name).read_bytes(), content_type) for route, (name, content_type) in STATIC_FILES.items()}

    class SearchPageHandler(BaseHTTPRequestHandler):
        server_version = "rehamot-search"
        timeout = IDLE_TIMEOUT_S  # a client that stalls mid-request frees its thread

        def _check_host(self) -> None:
            bound_host, port = self.server.server_address[:2]
            # the address the client reached: the machine's own address when bound to 0.0.0.0
            names = {str(bound_host), self.connection.getsockname()[0], *LOCAL_NAMES}
            if not host_allowed(self.headers.get("Host"), names, port):
                raise ApiError(HTTPStatus.FORBIDDEN, f"unknown Host {str(self.headers.get('Host'))[:80]!r}: "
                                                     f"open the page as http://127.0.0.1:{port}/")

        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            try:
                self._check_host()
                if parts.path in static:
                    body, content_type = static[parts.path]
                    self._send(HTTPStatus.OK, body, content_type)
                elif parts.path.startswith("/api/"):
                    self._send_json(HTTPStatus.OK, handle_api(index, parts.path, parts.query))
                else:
                    raise ApiError(HTTPStatus.NOT_FOUND, f"not found: {parts.path[:80]}")
            except ApiError as err:
                self._send_json(err.status, {"error": str(err), "status": int(err.status)})
            except (BrokenPipeError, ConnectionResetError):
                pass  # the browser went away (a newer search replaced this one)
            except Exception as err:  # a bug: say so to the client and the console, keep serving
                traceback.print_exc(file=sys.stderr)
                self._send_json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"internal error: {err}", "status": 500})

        def _send_json(self, status: HTTPStatus, payload: dict[str, Any]) -> None:
            body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
            self._send(status, body, "application/json; charset=utf-8")

        def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            if verbose:
                super().log_message(format, *args)

    return SearchPageHandler


class PageServer(HTTPServer):
    """An HTTPServer whose threads are a fixed pool: one loop accepts connections and waits for
    their requests; a connection with a request to read goes to a worker. Idle connections
    cost a file descriptor until IDLE_TIMEOUT_S, and past MAX_CONNECTIONS open ones the loop
    stops accepting, so the kernel's backlog holds the rest."""

    request_queue_size = socket.SOMAXCONN  # socketserver's 5 drops bursts (the client retries after 1 s, 3 s, ...)

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], workers: int = WORKERS,
                 idle_timeout: float = IDLE_TIMEOUT_S, max_connections: int = MAX_CONNECTIONS) -> None:
        super().__init__(address, handler)
        self.workers, self.idle_timeout, self.max_connections = workers, idle_timeout, max_connections
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._waiting: dict[socket.socket, tuple[Any, float]] = {}  # no request yet: address, deadline
        self._busy = 0  # handed to a worker and not closed yet
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._stopped = threading.Event()
        self._threads: list[threading.Thread] = []

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        self._stop.clear()
        self._stopped.clear()
        self._start_workers()
        self.socket.setblocking(False)
        with selectors.DefaultSelector() as selector:
            try:
                self._loop(selector, poll_interval)
            finally:
                self._stopped.set()

    def _loop(self, selector: selectors.BaseSelector, poll_interval: float) -> None:
        listening = False
        while not self._stop.is_set():
            room = len(self._waiting) + self._busy < self.max_connections
            if room != listening:  # full: leave new connections in the backlog
                (selector.register if room else selector.unregister)(self.socket, selectors.EVENT_READ)
                listening = room
            for key, _ in selector.select(poll_interval):
                if key.fileobj is self.socket:
                    self._accept(selector)
                else:
                    selector.unregister(key.fileobj)
                    self._dispatch(key.fileobj)  # type: ignore[arg-type]
            self._close_idle(selector)

    def _accept(self, selector: selectors.BaseSelector) -> None:
        while len(self._waiting) + self._busy < self.max_connections:
            try:
                connection, address = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # out of descriptors, a connection reset before accept: try again later
                return
            self._waiting[connection] = (address, time.monotonic() + self.idle_timeout)
            selector.register(connection, selectors.EVENT_READ)

    def _dispatch(self, connection: socket.socket) -> None:
        address, _ = self._waiting.pop(connection)
        with self._lock:
            self._busy += 1
        self._jobs.put((connection, address))

    def _close_idle(self, selector: selectors.BaseSelector) -> None:
        now = time.monotonic()
        for connection, (_, deadline) in list(self._waiting.items()):
            if deadline > now:
                break  # accepted in order, so the rest are younger
            del self._waiting[connection]
            selector.unregister(connection)
            self.shutdown_request(connection)

    def _start_workers(self) -> None:
        while len(self._threads) < self.workers:
            thread = threading.Thread(target=self._work, name=f"search-page-{len(self._threads)}", daemon=True)
            thread.start()  # daemon: a slow client never holds up the shutdown
            self._threads.append(thread)

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            connection, address = job
            try:
                self.finish_request(connection, address)
            except Exception:
                self.handle_error(connection, address)
            finally:
                self.shutdown_request(connection)
                with self._lock:
                    self._busy -= 1

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], OSError):
            return  # the client went away or stalled: nothing to report
        super().handle_error(request, client_address)

    def shutdown(self) -> None:
        """Stop `serve_forever` (from another thread) and wait until it has returned."""
        self._stop.set()
        self._stopped.wait()

    def server_close(self) -> None:
        for connection in list(self._waiting):
            self.shutdown_request(connection)
        self._waiting.clear()
        for _ in self._threads:
            self._jobs.put(None)
        self._threads.clear()
        super().server_close()


def make_server(index: SearchIndex, host: str = "127.0.0.1", port: int = 8000, verbose: bool = False) -> PageServer:
    """A bound server for the index (port 0: a free one); `serve_forever` starts it."""
    return PageServer((host, port), make_handler(index, verbose))


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        return False


def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, verbose: bool = False,
          announce: Callable[[str], None] = print, index_name: str | None = None) -> None:
    """Load the index (the run's own, or the one named `index_name`) and its model, print the
    page's URL, serve until Ctrl-C (or SIGTERM)."""
    index = SearchIndex.load(run_dir, name=index_name)
    started = time.perf_counter()
    index.warm_up()
    index.encode_text("a person walks")  # the first real query pays no one-off costs
    try:
        server = make_server(index, host, port, verbose)
    except OSError as err:
        raise SearchError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    bound_host, bound_port = server.server_address[:2]
    if not is_loopback(host):
        print(f"search: warning: the page has no authentication: anyone who can reach {bound_host}:{bound_port} "
              "can search this run's index (bind 127.0.0.1, the default, to keep it to this machine)",
              file=sys.stderr)
    split = index.meta.get("split") or ""
    announce(f"search page for {run_dir} ({index.num_motions} {split} motions, model loaded in "
             f"{time.perf_counter() - started:.1f} s): http://{bound_host}:{bound_port}/  (Ctrl-C stops it)")
    sys.stdout.flush()

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    # Ctrl-C even where the shell started us with SIGINT ignored (a background job), and a
    # `kill` as cleanly as Ctrl-C.
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    announce("search page stopped")
