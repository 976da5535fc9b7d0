"""Opening shard locations: local paths, file://, http(s) with retries that resume at the byte
reached, start-up checks of a URL prefix. The HTTP server here is a real one on 127.0.0.1 that
serves a shard set and can cut a response short or answer 503 a given number of times."""
from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from data_fixtures import write_shard_set

from rehamot.data import locations, schema
from rehamot.data.reading import load_index, load_indexes, read_manifest, read_segment


class Served:
    """A folder over HTTP with Range and HEAD; `cut_after` bytes then a dropped connection for
    the next `cuts` GETs, `unavailable` 503 answers first."""

    def __init__(self, root: Path) -> None:
        self.root, self.cuts, self.cut_after, self.unavailable = root, 0, 0, 0
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range)
        served = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                self.answer(body=False)

            def do_GET(self) -> None:
                self.answer(body=True)

            def answer(self, body: bool) -> None:
                served.requests.append((self.command, self.path, self.headers.get("Range")))
                path = served.root / self.path.lstrip("/")
                if served.unavailable:
                    served.unavailable -= 1
                    self.send_error(503)
                    return
                if not path.is_file():
                    self.send_error(404)
                    return
                data, start = path.read_bytes(), 0
                if self.headers.get("Range"):
                    start = int(self.headers["Range"].removeprefix("bytes=").rstrip("-"))
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                if not body:
                    return
                if served.cuts and self.command == "GET":
                    served.cuts -= 1
                    self.wfile.write(data[start:start + served.cut_after])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.wfile.write(data[start:])

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def served(tmp_path, monkeypatch):
    monkeypatch.setattr(locations, "BACKOFF_S", 0.001)  # retries without the waits
    shards = write_shard_set(tmp_path / "shards", {"train": [5, 4], "test": [3]})
    server = Served(tmp_path)
    yield server, shards
    server.close()


def test_a_body_cut_short_resumes_at_the_byte_reached(served):
    server, shards = served
    tar = shards.shard_paths("train")[0]
    server.cuts, server.cut_after = 2, 1000
    url = f"{server.url}/shards/{tar.name}"
    assert locations.read_bytes(url) == tar.read_bytes()
    assert [r[2] for r in server.requests] == [None, "bytes=1000-", "bytes=2000-"]


def test_samples_read_through_dropped_connections_are_the_local_ones(served):
    server, shards = served
    tar = shards.shard_paths("train")[0]
    server.cuts, server.cut_after = 3, 700  # inside the first samples' members
    index = load_index(str(shards.root), shards.manifest["splits"]["train"]["shards"][0])
    remote = list(read_segment(f"{server.url}/shards/{tar.name}", index))
    local = list(read_segment(str(tar), index))
    assert [{k: v for k, v in r.items() if k != "__url__"} for r in remote] == \
        [{k: v for k, v in r.items() if k != "__url__"} for r in local]
    assert len(server.requests) == 4
    # a segment starts with a Range request at its first sample's first member (the index's)
    server.requests.clear()
    assert [r["__key__"] for r in read_segment(f"{server.url}/shards/{tar.name}", index, 2, 4)] == \
        index.keys[2:4]
    assert server.requests == [("GET", f"/shards/{tar.name}", f"bytes={int(index.offsets[2].min())}-")]


def test_retries_are_bounded(served):
    server, shards = served
    server.unavailable = locations.RETRIES + 1
    with pytest.raises(OSError, match=f"still failing after {locations.RETRIES} retries"):
        locations.read_bytes(f"{server.url}/shards/{shards.shard_paths('train')[0].name}")
    server.unavailable = locations.RETRIES  # one fewer: the last retry gets the file
    assert locations.read_bytes(f"{server.url}/shards/manifest.json") == \
        (shards.root / "manifest.json").read_bytes()


def test_a_missing_file_is_not_retried(served):
    server, _ = served
    with pytest.raises(FileNotFoundError):
        locations.read_bytes(f"{server.url}/shards/nothing.tar")
    assert not locations.exists(f"{server.url}/shards/nothing.tar")
    assert locations.exists(f"{server.url}/shards/manifest.json")
    assert [r[0] for r in server.requests] == ["GET", "HEAD", "HEAD"]


def test_manifest_and_indexes_from_a_url_prefix(served):
    server, shards = served
    prefix = f"{server.url}/shards/"
    manifest = read_manifest(prefix)
    assert manifest == read_manifest(str(shards.root))
    records = manifest["splits"]["train"]["shards"]
    assert [len(i) for i in load_indexes(prefix, records)] == [5, 4]
    schema.check_shard_files(prefix, manifest)  # everything is there


def test_start_up_names_the_first_missing_file_at_a_url(served):
    server, shards = served
    (shards.root / "train-000001.index.json").unlink()
    manifest = read_manifest(f"{server.url}/shards")
    with pytest.raises(schema.ShardSetError, match=r"train-000001\.index\.json is named in manifest\.json but missing"):
        schema.check_shard_files(f"{server.url}/shards", manifest)
    with pytest.raises(FileNotFoundError, match="no manifest.json at"):
        read_manifest(f"{server.url}/elsewhere")


def test_file_urls_and_local_paths(tmp_path):
    shards = write_shard_set(tmp_path / "shards", {"train": [2]})
    tar = shards.shard_paths("train")[0]
    assert read_manifest(tar.parent.as_uri()) == shards.manifest
    with locations.open_location(tar.as_uri(), start=512) as stream:
        assert stream.read() == tar.read_bytes()[512:]
    # a local folder's member is a path, never a command
    assert locations.join(".", "pipe:x") == "./pipe:x" and locations.scheme("./pipe:x") == ""
    assert locations.join("http://h/p/", "a.tar") == "http://h/p/a.tar"
