"""A local search page over a run's index: type a description, watch the top motions move.

    rehamot-search serve RUN_DIR [--host 127.0.0.1] [--port 8000]

The page (rehamot/retrieval/web/: one HTML file, one script, one style sheet, no CDN, so it works
offline) draws each hit as an animated stick figure on a canvas from the joint positions the
index stores. It talks to a small JSON API:

    GET /api/search?q=TEXT&k=K   the same JSON and ranking as `query TEXT --json`
    GET /api/motion/ID           {"motion_id", "fps", "layout", "joints": T x J x [x, y, z] metres, "captions"}
    GET /api/similar/ID?k=K      the K nearest other motions and the top captions, as `query --motion ID --json`
    GET /api/info                the index's size, split, layout, fps and skeleton (bones to draw)

Bad input is a JSON {"error": ...} with a 4xx status. The server is the standard library's
ThreadingHTTPServer: a page and its dozen motion requests are served concurrently, and the
model (loaded once, before the URL is printed) is the only shared state, guarded by the
index's own lock. It is meant for one person's machine, not for the internet: it binds
127.0.0.1 unless told otherwise.
"""
from __future__ import annotations

import json
import signal
import sys
import time
import traceback
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from rehamot.retrieval.index import (
    MAX_QUERY_CHARS,
    SearchError,
    SearchIndex,
    _checked_text,
    motion_json,
    motion_query_json,
    text_query_json,
)

WEB_DIR = Path(__file__).with_name("web")
DEFAULT_K = 10
MAX_K = 100
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


def _checked_k(params: dict[str, list[str]]) -> int:
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
    return {"num_motions": index.num_motions, "split": index.meta.get("split"), "corpus": index.meta.get("corpus"),
            "layout": layout, "fps": index.meta.get("fps"), "skeleton": skeleton,
            "default_k": DEFAULT_K, "max_k": MAX_K, "max_query_chars": MAX_QUERY_CHARS}


def handle_api(index: SearchIndex, path: str, query: str) -> dict[str, Any]:
    """The JSON answer to GET `path`?`query` under /api/, or an ApiError."""
    segments = path.split("/")[2:]  # "/api/motion/ID" -> ["motion", "ID"]
    params = parse_qs(query, keep_blank_values=True)
    if segments == ["search"]:
        k = _checked_k(params)
        try:
            text = _checked_text(_param(params, "q", "") or "")  # empty, or over MAX_QUERY_CHARS
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
        k = _checked_k(params)
        return motion_query_json({"motion_id": motion_id}, index.query_motion_id(motion_id, k))
    raise ApiError(HTTPStatus.NOT_FOUND, f"no such endpoint: {path[:80]}")


def make_handler(index: SearchIndex, verbose: bool = False) -> type[BaseHTTPRequestHandler]:
    """A request handler class bound to one index (and the page's files, read once)."""
    static = {route: ((WEB_DIR / name).read_bytes(), content_type) for route, (name, content_type) in STATIC_FILES.items()}

    class SearchPageHandler(BaseHTTPRequestHandler):
        server_version = "rehamot-search"

        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            try:
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


def make_server(index: SearchIndex, host: str = "127.0.0.1", port: int = 8000, verbose: bool = False) -> ThreadingHTTPServer:
    """A bound server for the index (port 0: a free one); `serve_forever` starts it."""
    server = ThreadingHTTPServer((host, port), make_handler(index, verbose))
    server.daemon_threads = True  # a slow client never holds up the shutdown
    return server


def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, verbose: bool = False,
          announce: Callable[[str], None] = print) -> None:
    """Load the index and its model, print the page's URL, serve until Ctrl-C (or SIGTERM)."""
    index = SearchIndex.load(run_dir)
    started = time.perf_counter()
    index.warm_up()
    index.encode_text("a person walks")  # the first real query pays no one-off costs
    try:
        server = make_server(index, host, port, verbose)
    except OSError as err:
        raise SearchError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    bound_host, bound_port = server.server_address[:2]
    split = index.meta.get("split", "")
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
