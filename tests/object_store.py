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
