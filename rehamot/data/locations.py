"""Where shard files live, and how they are opened: one function for every reader.

A location is a local path, `file://`, `http(s)://`, `s3://bucket/prefix` (boto3: the standard
AWS environment, `AWS_ENDPOINT_URL` for S3-compatible stores), any other scheme fsspec knows
(`gs://`, `hf://`, where its package is installed), or a `pipe:` command the user typed
(webdataset's gopen runs it).

A remote read that fails half-way (a connection reset, a server restarting) is retried with
backoff a bounded number of times, resuming with a Range request at the byte it stopped at:
the reader sees the same bytes as from an uninterrupted read, so batches stay identical.
"""
from __future__ import annotations

import io
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO
from urllib.parse import unquote, urlparse

RETRIES = 6  # attempts after the first failure of one read, before the shard counts as bad
BACKOFF_S = 0.25  # first wait; doubled each attempt (0.25 .. 8 s, ~16 s in all)
TIMEOUT_S = 30.0  # a request that sends nothing for this long has failed
_HTTP_TRANSIENT = frozenset({408, 425, 429, 500, 502, 503, 504})
_READ = 1 << 16
log = logging.getLogger("rehamot.data")


def scheme(location: str) -> str:
    """The location's scheme, lower-cased; "" for a local path."""
    return urlparse(location.strip()).scheme.lower() if "://" in location or \
        location.strip().startswith("pipe:") else ""


def is_url(location: str) -> bool:
    """A URL prefix (or a `pipe:` command), not a local folder: members are joined with `/`."""
    return "://" in location


def join(location: str, name: str) -> str:
    """`name` inside `location`. A local folder's member stays a path, never a URL: `.` and
    `pipe:x` give `./pipe:x`, not `pipe:x`."""
    if is_url(location):
        return location.rstrip("/") + "/" + name
    return os.path.join(location, name)


class Transient(OSError):
    """A failure worth retrying (connection refused or reset, a 5xx, a read cut short)."""


def open_location(location: str, start: int = 0, retries: int = RETRIES) -> BinaryIO:
    """The bytes of `location` from byte `start`, as a read-only stream.

    FileNotFoundError when it does not exist; remote streams retry transient failures (see
    the module's docstring) `retries` times and then raise OSError."""
    kind = scheme(location)
    if kind == "":
        return _local(location, start)
    if kind == "file":
        return _local(file_path(location), start)
    if kind in ("http", "https"):
        return _Resuming(location, lambda at: _http_open(location, at), start, retries)
    if kind == "s3":
        return _Resuming(location, lambda at: _s3_open(location, at), start, retries)
    if kind == "pipe":
        if start:
            raise ValueError(f"{location}: a pipe: command is read from its start only")
        return _gopen(location)
    return _other_open(location, start)


def ranged(location: str) -> bool:
    """Whether a read of `location` can start past its first byte (a seek, a Range request);
    a `pipe:` command and the schemes only webdataset's gopen reads start at byte 0."""
    kind = scheme(location)
    return kind in ("", "file", "http", "https", "s3") or (kind != "pipe" and _fsspec(location) is not None)


def read_bytes(location: str, retries: int = RETRIES) -> bytes:
    with open_location(location, retries=retries) as stream:
        return stream.read()


def exists(location: str) -> bool:
    """Whether `location` names a readable file: a stat, a HEAD request, an S3 head_object.
    A `pipe:` command cannot be asked without running it: taken to exist."""
    kind = scheme(location)
    if kind == "":
        return os.path.isfile(location)
    if kind == "file":
        return os.path.isfile(file_path(location))
    if kind in ("http", "https"):
        return _retried(location, lambda: _http_head(location), RETRIES)
    if kind == "s3":
        return _retried(location, lambda: _s3_head(location), RETRIES)
    filesystem = _fsspec(location)
    if filesystem is None:  # a pipe: command, or a scheme only webdataset's gopen reads
        return True
    fs, path = filesystem
    return bool(fs.isfile(path))


def missing(locations: list[str]) -> list[str]:
    """Those of `locations` that do not exist, in order; remote ones asked 8 at a time."""
    if len(locations) < 2 or not any(is_url(x) for x in locations):
        return [x for x in locations if not exists(x)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        found = list(pool.map(exists, locations))
    return [x for x, there in zip(locations, found) if not there]


# -- local files ---------------------------------------------------------------------------------
def file_path(url: str) -> str:
    parsed = urlparse(url)
    local = parsed.netloc in ("", "localhost")
    return unquote(parsed.path if local else f"//{parsed.netloc}{parsed.path}")


def _local(path: str, start: int) -> BinaryIO:
    stream = open(path, "rb")  # noqa: SIM115 - the caller closes it
    if start:
        stream.seek(start)
    return stream


# -- retries -------------------------------------------------------------------------------------
def _retried(location: str, attempt: Callable[[], Any], retries: int) -> Any:
    """attempt(), again after a Transient failure, `retries` times with doubling waits."""
    for tries in range(retries + 1):
        try:
            return attempt()
        except Transient as failure:
            if tries == retries:
                spent = f"still failing after {retries} retries: " if retries else ""
                raise OSError(f"{location}: {spent}{failure}") from failure
            wait = BACKOFF_S * 2 ** tries
            log.warning(f"{location}: {failure}; retry {tries + 1} of {retries} in {wait:g} s")
            time.sleep(wait)
    raise AssertionError("unreachable")


class _Resuming(io.RawIOBase):
    """A remote file read from `start`: a failed read reopens at the byte reached (Range)."""

    def __init__(self, location: str, opener: Callable[[int], tuple[Any, int | None]], start: int,
                 retries: int) -> None:
        self.location, self.opener, self.position, self.retries = location, opener, start, retries
        self.body, self.size = _retried(location, lambda: opener(start), retries)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def readinto(self, buffer: Any) -> int:
        data = self._read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            return self.readall()
        return self._read(size)

    def readall(self) -> bytes:
        parts = []
        while chunk := self._read(_READ):
            parts.append(chunk)
        return b"".join(parts)

    def _read(self, size: int) -> bytes:
        """Up to `size` bytes, fewer only at the end (readers read exact sizes)."""
        parts, wanted = [], size
        while wanted > 0 and (self.size is None or self.position < self.size):
            data = _retried(self.location, lambda: self._attempt(wanted), self.retries)
            if not data:  # the end of a body of unknown length
                break
            self.position += len(data)
            wanted -= len(data)
            parts.append(data)
        return b"".join(parts)

    def _attempt(self, size: int) -> bytes:
        try:
            if self.body is None:
                self.body, _ = self.opener(self.position)
            left = size if self.size is None else min(size, self.size - self.position)
            data = self.body.read(left)
            if not data and self.size is not None:
                raise Transient(f"the connection ended at byte {self.position} of {self.size}")
            return data
        except (Transient, FileNotFoundError):  # the latter: deleted while read, not retried
            self._drop()
            raise
        except (OSError, ValueError) as failure:  # reset, timeout, IncompleteRead, botocore's
            self._drop()
            raise Transient(f"{type(failure).__name__}: {str(failure)[:200]}") from failure
        except Exception as failure:
            if not _is_botocore_transient(failure):
                raise
            self._drop()
            raise Transient(f"{type(failure).__name__}: {str(failure)[:200]}") from failure

    def _drop(self) -> None:
        body, self.body = self.body, None
        if body is not None:
            try:
                body.close()
            except Exception:  # noqa: BLE001 - a broken connection may fail to close too
                pass

    def close(self) -> None:
        self._drop()
        super().close()


# -- http(s) -------------------------------------------------------------------------------------
def _http_failure(location: str, failure: Exception) -> Exception:
    """FileNotFoundError for a 404/403/410, Transient for what may pass, else OSError."""
    if isinstance(failure, urllib.error.HTTPError):
        if failure.code in _HTTP_TRANSIENT:
            return Transient(f"HTTP {failure.code}")
        if failure.code in (403, 404, 410):
            return FileNotFoundError(f"{location}: HTTP {failure.code} {failure.reason}")
        return OSError(f"{location}: HTTP {failure.code} {failure.reason}")
    return Transient(f"{type(failure).__name__}: {str(failure)[:200]}")


def _http_open(location: str, start: int) -> tuple[Any, int | None]:
    request = urllib.request.Request(location, headers={"Range": f"bytes={start}-"} if start else {})
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)  # noqa: S310 - the user's URL
    except urllib.error.HTTPError as failure:
        if failure.code == 416:  # Range past the end: nothing left
            return io.BytesIO(b""), start
        raise _http_failure(location, failure) from failure
    except (OSError, ValueError) as failure:
        raise _http_failure(location, failure) from failure
    if start and response.status != 206:
        response.close()
        raise OSError(f"{location}: the server ignores Range requests; a read cannot resume")
    length = response.headers.get("Content-Length")
    return response, (start + int(length)) if length is not None else None


def _http_head(location: str) -> bool:
    request = urllib.request.Request(location, method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S):  # noqa: S310
            return True
    except (OSError, ValueError) as failure:
        problem = _http_failure(location, failure)
        if isinstance(problem, FileNotFoundError):
            return False
        raise problem from failure


# -- s3 ------------------------------------------------------------------------------------------
_clients: dict[int, Any] = {}
_clients_lock = threading.Lock()


def _s3_client() -> Any:
    """One boto3 client per process (clients are not fork-safe: a loader worker makes its own).
    boto3 reads the AWS environment: credentials, region, AWS_ENDPOINT_URL."""
    with _clients_lock:
        client = _clients.get(os.getpid())
        if client is None:
            try:
                import boto3  # noqa: PLC0415 - only s3:// locations need it
                from botocore.config import Config  # noqa: PLC0415
            except ImportError as missing:
                raise OSError("s3:// shard locations need boto3 (pip install boto3)") from missing
            config = Config(retries={"max_attempts": 1}, read_timeout=TIMEOUT_S,
                            connect_timeout=TIMEOUT_S)
            client = _clients[os.getpid()] = boto3.session.Session().client("s3", config=config)
        return client


def _s3_key(location: str) -> tuple[str, str]:
    parsed = urlparse(location)
    return parsed.netloc, unquote(parsed.path.lstrip("/"))


def _s3_error(location: str, failure: Exception) -> Exception:
    code = str(getattr(failure, "response", {}).get("Error", {}).get("Code", ""))
    if code in ("NoSuchKey", "404", "NoSuchBucket", "403", "AccessDenied"):
        return FileNotFoundError(f"{location}: {code}")
    if code == "InvalidRange":
        return EOFError()
    status = getattr(failure, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode")
    if code or status:
        if status in _HTTP_TRANSIENT or code in ("SlowDown", "InternalError", "ServiceUnavailable"):
            return Transient(f"S3 {code or status}")
        return OSError(f"{location}: S3 {code or status}: {str(failure)[:200]}")
    if _is_botocore_transient(failure) or isinstance(failure, OSError):
        return Transient(f"{type(failure).__name__}: {str(failure)[:200]}")
    return failure


def _is_botocore_transient(failure: Exception) -> bool:
    """A botocore connection or streaming error (the network, not the request)."""
    module = type(failure).__module__ or ""
    return module.startswith(("botocore", "urllib3")) and not hasattr(failure, "response")


def _s3_open(location: str, start: int) -> tuple[Any, int]:
    bucket, key = _s3_key(location)
    extra = {"Range": f"bytes={start}-"} if start else {}
    try:
        answer = _s3_client().get_object(Bucket=bucket, Key=key, **extra)
    except Exception as failure:  # botocore's ClientError and connection errors
        problem = _s3_error(location, failure)
        if isinstance(problem, EOFError):
            return io.BytesIO(b""), start
        raise problem from failure
    return answer["Body"], start + int(answer["ContentLength"])


def _s3_head(location: str) -> bool:
    bucket, key = _s3_key(location)
    try:
        _s3_client().head_object(Bucket=bucket, Key=key)
        return True
    except Exception as failure:
        problem = _s3_error(location, failure)
        if isinstance(problem, FileNotFoundError):
            return False
        raise problem from failure


# -- anything else: fsspec where it has the scheme's package, else webdataset's gopen -----------
def _fsspec(location: str) -> tuple[Any, str] | None:
    """(filesystem, path) of `location` through fsspec; None when fsspec lacks the scheme or
    its package (gs:// without gcsfs), or for a pipe: command."""
    if scheme(location) == "pipe":
        return None
    try:
        import fsspec  # noqa: PLC0415

        return fsspec.core.url_to_fs(location)
    except (ImportError, ValueError):
        return None


def _other_open(location: str, start: int) -> BinaryIO:
    filesystem = _fsspec(location)
    if filesystem is None:  # sftp://, ais://, gs:// through gsutil, ...: read from the start
        if start:
            raise ValueError(f"{location}: this scheme is read from its start only")
        return _gopen(location)
    fs, path = filesystem
    stream = fs.open(path, "rb")
    if start:
        stream.seek(start)
    return stream


def _gopen(location: str) -> BinaryIO:
    import webdataset as wds  # noqa: PLC0415 - only pipe: and schemes fsspec lacks need it

    return wds.gopen(location, "rb")
