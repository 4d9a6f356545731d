"""A real S3 API on loopback for the tests: moto's server on 127.0.0.1 and a free port."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pyarrow.fs as pafs

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "raydino-test", "AWS_SECRET_ACCESS_KEY": "raydino-test-secret",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def moto_endpoint() -> Iterator[str]:
    """moto's ThreadedMotoServer in this process; yields its endpoint URL, stops it after."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@contextmanager
def moto_endpoint_with_auth(timeout: float = 60.0) -> Iterator[str]:
    """moto's server in its own process with authentication enforced (INITIAL_NO_AUTH_ACTION_COUNT=0):
    unknown keys are refused as a real S3 refuses them."""
    port = free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"moto server did not start on port {port} within {timeout} s") from None
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


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


class FlakyS3:
    """An HTTP proxy in front of an S3 endpoint that fails a share of requests as a throttled, flaky S3 does:
    of the requests it has not seen before (method, path, query, byte range), every ``every``-th gets a 503
    SlowDown, a 500 InternalError or a dropped connection, in turn. A request seen before (a client's retry)
    always passes: faults are deterministic, and a client that retries always gets through. ``every=0``: no
    faults, a request counter only (``requests``, by kind: benchmarks/data_scale.py)."""

    def __init__(self, target: str, every: int = 5) -> None:
        import threading
        from http.server import ThreadingHTTPServer

        self.target, self.every = target.removeprefix("http://"), every
        self.injected = dict.fromkeys(_FAULTS, 0)
        self.forwarded = 0
        self.requests: dict[str, int] = {}
        """Requests the proxy received, by kind: LIST, HEAD, GET, PUT, POST, DELETE."""
        self._seen: set[tuple[str, ...]] = set()
        self._new = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

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
def flaky_s3(target: str, every: int = 5) -> Iterator[FlakyS3]:
    """A ``FlakyS3`` in front of ``target`` for the ``with`` block."""
    proxy = FlakyS3(target, every)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()
