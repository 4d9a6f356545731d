"""Many trials, one tracking server: N processes log at once, each as a trial's rank 0 does
(``raydino.tracking.BackgroundLogger``), into one ``mlflow server``; counts what reached the store.

The default backend is the server's SQLite file, as ``cluster.yaml``'s head runs it; ``--backend-store-uri``
measures another (``postgresql://user:pass@host/db`` as docs/scale-out.md recommends for clusters). Prints
points expected and stored, unsent records, warnings, and the server's "database is locked" lines.

    .venv/bin/python benchmarks/tracking_many_writers.py --writers 8 --steps 300
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.mlflow_server import MlflowServer


def _writer(uri: str, run_id: str, steps: int, metrics: int, step_seconds: float, out: multiprocessing.Queue) -> None:
    from raydino.tracking import BackgroundLogger

    lines: list[str] = []
    logger = BackgroundLogger(uri, run_id, lines.append)
    started = time.monotonic()
    for step in range(steps):
        time.sleep(step_seconds)  # the training step
        logger.log_metrics({f"m{i}": step + i / 100 for i in range(metrics)}, step)
    trained = time.monotonic() - started
    unsent = logger.close(120)
    out.put((run_id, len(unsent), lines, trained, time.monotonic() - started))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--metrics", type=int, default=20, help="metrics per step (rank 0 logs ~20)")
    parser.add_argument("--step-seconds", type=float, default=0.05)
    parser.add_argument("--backend-store-uri", help="default: a SQLite file in a temporary directory")
    parser.add_argument("--server-workers", type=int, help="the server's worker processes (default: mlflow's own, "
                        "as cluster.yaml's head runs it)")
    args = parser.parse_args(argv)

    from mlflow import MlflowClient

    with tempfile.TemporaryDirectory(prefix="raydino-bench-") as tmp:
        server = MlflowServer(Path(tmp), args.backend_store_uri, workers=args.server_workers)
        server.start()
        try:
            client = MlflowClient(server.uri)
            experiment = client.create_experiment("many-writers")
            runs = [client.create_run(experiment).info.run_id for _ in range(args.writers)]
            ctx = multiprocessing.get_context("spawn")
            out = ctx.Queue()
            procs = [ctx.Process(target=_writer, args=(server.uri, run, args.steps, args.metrics, args.step_seconds, out))
                     for run in runs]
            started = time.monotonic()
            for p in procs:
                p.start()
            results = [out.get(timeout=900) for _ in procs]
            for p in procs:
                p.join(timeout=60)
            wall = time.monotonic() - started
            stored = {run: sum(len(client.get_metric_history(run, f"m{i}")) for i in range(args.metrics)) for run in runs}
            locked = (Path(tmp) / "server.log").read_text(errors="replace").count("database is locked")
        finally:
            server.stop()

    expected = args.steps * args.metrics
    print(f"{args.writers} writers x {args.steps} steps x {args.metrics} metrics into one mlflow server "
          f"({args.backend_store_uri or 'SQLite'}, {args.server_workers or 'default'} server workers), a step every {args.step_seconds} s; {wall:.0f} s wall")
    print("| writer | points expected | points stored | unsent | warning lines | steps/s while logging |")
    print("|---|---|---|---|---|---|")
    for i, (run, unsent, lines, trained, _) in enumerate(sorted(results)):
        print(f"| {i} | {expected} | {stored[run]} | {unsent} | {len(lines)} | {args.steps / trained:.1f} |")
    total = sum(stored.values())
    print(f"all: {total} of {expected * args.writers} points stored; 'database is locked' in the server log: {locked}; "
          f"ideal steps/s {1 / args.step_seconds:.1f}")
    return 0 if total == expected * args.writers and locked == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
