"""Screenshots of MLflow's UI on a raydino store, taken by a headless browser: what a user sees.

    python benchmarks/mlflow_ui_screenshot.py --store sqlite:///$PWD/mlflow.db --experiment kappa_ablation --out ui_shots

Starts ``mlflow server`` on the store (127.0.0.1, a free port), then ``chromium --headless
--screenshot`` (Debian: ``apt-get install chromium``), each page with a fresh browser profile, as a
first visit: the experiment's plain address (where MLflow 3.17 lands on its own), the same with
``?workflowType=machine_learning`` (the address raydino prints: the runs table), one sweep trial's
run page (or any run's) and the experiment's Models page. A page that does not settle within
``--page-timeout`` is reported and skipped. PNGs go to
``--out``; the server is stopped at the end. Needs no MLflow import: the pages are found through the
server's REST API, as the UI finds them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

WORKFLOW = "workflowType=machine_learning"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(store: str, port: int, log_path: Path, timeout_s: float = 300.0) -> subprocess.Popen:
    """``mlflow server`` on ``store``, in its own process group; returns once /health answers."""
    mlflow = Path(sys.executable).with_name("mlflow")
    log = log_path.open("w")
    proc = subprocess.Popen(
        [str(mlflow), "server", "--backend-store-uri", store, "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode}; see {log_path}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return proc
        except OSError:
            time.sleep(1)
    stop_server(proc)
    raise RuntimeError(f"mlflow server did not answer within {timeout_s:.0f} s; see {log_path}")


def stop_server(proc: subprocess.Popen) -> None:
    """Stop the server's process group (uvicorn's workers with it); it is ours, started above."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def rest(base: str, endpoint: str, body: dict | None = None, query: dict | None = None) -> dict:
    url = f"{base}/api/2.0/mlflow/{endpoint}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def screenshot(browser: str, url: str, out: Path, size: str, wait_ms: int, timeout_s: float) -> None:
    """One page, fresh profile (no remembered UI state), after ``wait_ms`` of the page's virtual time."""
    with tempfile.TemporaryDirectory(prefix="raydino-chromium-") as profile:
        subprocess.run(
            [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={profile}",
             f"--window-size={size}", f"--virtual-time-budget={wait_ms}", f"--screenshot={out}", url],
            check=True, capture_output=True, timeout=timeout_s,
        )
    print(f"{out}  <-  {url}")


def pages(base: str, experiment: str) -> dict[str, str]:
    """name -> UI address: the experiment as is and on its runs table, one (trial) run, the models."""
    exp = rest(base, "experiments/get-by-name", query={"experiment_name": experiment})["experiment"]
    eid = exp["experiment_id"]
    runs = rest(base, "runs/search", {"experiment_ids": [eid], "max_results": 200}).get("runs", [])
    out = {"1_experiment_as_is": f"{base}/#/experiments/{eid}", "2_runs_table": f"{base}/#/experiments/{eid}?{WORKFLOW}"}
    child = next((r for r in runs if any(t["key"] == "mlflow.parentRunId" for t in r["data"].get("tags", []))), None)
    run = child or (runs[0] if runs else None)
    if run is not None:
        out["3_run_page"] = f"{base}/#/experiments/{eid}/runs/{run['info']['run_id']}?{WORKFLOW}"
    out["4_models"] = f"{base}/#/experiments/{eid}/models?{WORKFLOW}"
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", default=f"sqlite:///{Path.cwd() / 'mlflow.db'}", help="backend store URI")
    parser.add_argument("--experiment", default="raydino", help="experiment name")
    parser.add_argument("--out", type=Path, default=Path("ui_shots"), help="directory for the PNGs")
    parser.add_argument("--window-size", default="1900,1000", help="browser window, W,H in px")
    parser.add_argument("--wait-ms", type=int, default=10000, help="page time before each screenshot")
    parser.add_argument("--page-timeout", type=float, default=120.0, help="seconds per page before giving up")
    parser.add_argument("--browser", default=shutil.which("chromium") or "chromium")
    args = parser.parse_args(argv)
    if not shutil.which(args.browser):
        parser.error(f"no browser {args.browser!r}; on Debian: apt-get install chromium")
    args.out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = start_server(args.store, port, args.out / "mlflow_server.log")
    try:
        for name, url in pages(f"http://127.0.0.1:{port}", args.experiment).items():
            try:
                screenshot(args.browser, url, args.out / f"{name}.png", args.window_size, args.wait_ms, args.page_timeout)
            except subprocess.TimeoutExpired:  # a page whose requests never settle stalls the virtual clock
                print(f"{name}: no screenshot within {args.page_timeout:.0f} s  ({url})")
    finally:
        stop_server(server)
    return 0


if __name__ == "__main__":
    sys.exit(main())
