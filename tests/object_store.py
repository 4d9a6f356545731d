"""A real S3 API on loopback for the tests: moto's server on 127.0.0.1 and a free port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pyarrow.fs as pafs

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "raydino-test", "AWS_SECRET_ACCESS_KEY": "raydino-test-secret",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(module: str, args: list[str], port: int, timeout: float, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``python -m module args...`` as a server on 127.0.0.1:``port``, once it accepts connections."""
    proc = subprocess.Popen([sys.executable, "-m", module, *args], env=env, cwd=_ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                proc.wait(timeout=30)
                raise RuntimeError(f"{module} did not start on port {port} within {timeout} s") from None
            time.sleep(0.1)


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)


@contextmanager
def moto_endpoint(auth: bool = False, timeout: float = 60.0) -> Iterator[str]:
    """moto's server in its own process; yields its endpoint URL, stops it after. In its own process, not
    in a thread of the test's: there every request waited for the GIL beside the driver's threads
    (~400 ms a read instead of ~3 ms, measured 2026-12-05). ``auth``: authentication enforced
    (INITIAL_NO_AUTH_ACTION_COUNT=0), unknown keys are refused as a real S3 refuses them."""
    port = free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"} if auth else None
    proc = _serve("moto.server", ["-H", "127.0.0.1", "-p", str(port)], port, timeout, env)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        _stop(proc)


def create_bucket(name: str) -> None:
    """A new bucket at the current AWS_ENDPOINT_URL (pyarrow creates buckets only when allowed to)."""
    import boto3

    boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).create_bucket(Bucket=name)


def upload(local_dir: str, uri: str) -> None:
    """Copy a local directory tree to ``uri`` through pyarrow (as a user's `aws s3 sync` would)."""
    fs, path = pafs.FileSystem.from_uri(uri)
    pafs.copy_files(local_dir, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def keys(uri: str) -> list[str]:
    """Every object under ``uri``, relative to it."""
    fs, path = pafs.FileSystem.from_uri(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return sorted(i.path.removeprefix(path.rstrip("/") + "/") for i in infos if i.type == pafs.FileType.File)


_FAULTS = ("slowdown", "internal", "dropped")
_ERROR_XML = ('<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}</Message>'
              '<RequestId>raydino-proxy</RequestId></Error>')


STATS_PATH = "/__flaky_s3_stats__"
"""The proxy's own path: its counters as JSON (not forwarded, not counted)."""


class FlakyS3:
    """An HTTP proxy in front of an S3 endpoint that fails a share of requests as a throttled, flaky S3 does:
    of the requests it has not seen before (method, path, query, byte range), every ``every``-th gets a 503
    SlowDown, a 500 InternalError or a dropped connection, in turn. A request seen before (a client's retry)
    always passes: faults are deterministic, and a client that retries always gets through. ``every=0``: no
    faults, a request counter only (``requests``, by kind: benchmarks/data_scale.py).

    This is the handle ``flaky_s3`` yields: the proxy itself (``_FlakyProxy``) runs in its own process, as
    moto's server does, and its counters are read from it."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint

    def _stats(self) -> dict:
        import json
        import urllib.request

        with urllib.request.urlopen(self.endpoint + STATS_PATH, timeout=30) as answer:
            return json.loads(answer.read())

    @property
    def injected(self) -> dict[str, int]:
        """Faults injected, by kind."""
        return self._stats()["injected"]

    @property
    def forwarded(self) -> int:
        """Requests passed on to the S3 behind."""
        return self._stats()["forwarded"]

    @property
    def requests(self) -> dict[str, int]:
        """Requests the proxy received, by kind: LIST, HEAD, GET, PUT, POST, DELETE."""
        return self._stats()["requests"]


class _FlakyProxy:
    """The proxy's server (``python -m tests.object_store TARGET EVERY PORT``)."""

    def __init__(self, target: str, every: int, port: int) -> None:
        import threading
        from http.server import ThreadingHTTPServer

        self.target, self.every = target.removeprefix("http://"), every
        self.injected = dict.fromkeys(_FAULTS, 0)
        self.forwarded = 0
        self.requests: dict[str, int] = {}
        self._seen: set[tuple[str, ...]] = set()
        self._new = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self._server.daemon_threads = True

    def serve_forever(self) -> None:
        self._server.serve_forever()

    def _fault(self, key: tuple[str, ...]) -> str | None:
        with self._lock:
            if key in self._seen:
                self.forwarded += 1
                return None
            self._seen.add(key)
            self._new += 1
            if not self.every or self._new % self.every:
                self.forwarded += 1
                return None
            fault = _FAULTS[(self._new // self.every) % len(_FAULTS)]
            self.injected[fault] += 1
            return fault

    def _handler(self) -> type:
        import http.client
        from http.server import BaseHTTPRequestHandler

        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # headers and body leave in two writes: with Nagle's algorithm the body waited for the client's
            # delayed ACK, 40 ms a request (48 ms median read through the proxy, 3 ms direct)
            disable_nagle_algorithm = True

            def log_message(self, *args: object) -> None:  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        if size == 0:
                            self.rfile.readline()
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _answer(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
                self.send_response(status)
                for name, value in headers:
                    self.send_header(name, value)
                if not any(name.lower() == "content-length" for name, _ in headers):
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _proxy(self) -> None:
                if self.path == STATS_PATH:
                    import json

                    with proxy._lock:
                        stats = {"injected": proxy.injected, "forwarded": proxy.forwarded, "requests": proxy.requests}
                    self._answer(200, [("Content-Type", "application/json")], json.dumps(stats).encode())
                    return
                body = self._body()
                kind = "LIST" if self.command == "GET" and ("list-type=" in self.path or "prefix=" in self.path) \
                    else self.command
                with proxy._lock:
                    proxy.requests[kind] = proxy.requests.get(kind, 0) + 1
                key = (self.command, self.path, self.headers.get("Range", ""), str(len(body)))
                fault = proxy._fault(key)
                if fault == "dropped":
                    self.close_connection = True  # no answer at all: the client sees the connection close
                    return
                if fault is not None:
                    code, message, status = (("SlowDown", "Please reduce your request rate.", 503) if fault == "slowdown"
                                             else ("InternalError", "We encountered an internal error.", 500))
                    xml = _ERROR_XML.format(code=code, message=message).encode()
                    self._answer(status, [("Content-Type", "application/xml")], xml)
                    return
                upstream = http.client.HTTPConnection(proxy.target, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding", "connection")}
                headers["Content-Length"] = str(len(body))
                upstream.request(self.command, self.path, body=body, headers=headers)
                response = upstream.getresponse()
                data = response.read()
                kept = [(k, v) for k, v in response.getheaders()
                        if k.lower() not in ("transfer-encoding", "connection", "content-length")]
                length = response.getheader("Content-Length") if self.command == "HEAD" else None
                upstream.close()
                self._answer(response.status, kept + ([("Content-Length", length)] if length else []), data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _proxy

        return Handler


@contextmanager
def flaky_s3(target: str, every: int = 5, timeout: float = 60.0) -> Iterator[FlakyS3]:
    """A flaky proxy in front of ``target`` for the ``with`` block, in its own process."""
    port = free_port()
    proc = _serve("tests.object_store", [target, str(every), str(port)], port, timeout)
    try:
        yield FlakyS3(f"http://127.0.0.1:{port}")
    finally:
        _stop(proc)


if __name__ == "__main__":
    _FlakyProxy(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])).serve_forever()
