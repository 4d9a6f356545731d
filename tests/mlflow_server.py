"""A real ``mlflow server`` on 127.0.0.1 for tests: started, stopped and started again on the same port and store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.object_store import free_port


class MlflowServer:
    """``mlflow server`` with a SQLite backend in ``root`` (or the backend ``store``), ``workers`` server
    processes (None: the server's default); ``stop`` kills it (and its workers), ``start``
    brings it back on the same port over the same store."""

    def __init__(self, root: Path, store: str | None = None, workers: int | None = 1) -> None:
        self.root, self.workers = root, workers
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.store = store or f"sqlite:///{root / 'server.db'}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 90.0) -> None:
        mlflow = Path(sys.executable).parent / "mlflow"
        log = (self.root / "server.log").open("ab")
        self.proc = subprocess.Popen(
            [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(self.port),
             *(["--workers", str(self.workers)] if self.workers else []),
             "--backend-store-uri", self.store, "--artifacts-destination", str(self.root / "artifacts")],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.root,
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.root / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer within {timeout_s} s: {(self.root / 'server.log').read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the server and its uvicorn worker
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        self.proc = None
