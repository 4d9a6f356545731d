"""Command-line pieces shared by the sweep scripts (kept beside them, not in the package)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as `python sweeps/x.py` from a checkout
    sys.path.insert(0, str(REPO))

from raydino.config import PRESETS, Config, ConfigError, load_config
from raydino.config.registry import DATA_SOURCES

if TYPE_CHECKING:
    from raydino.sweep import SweepResult

# cpu_demo trials one at a time: a trial's train worker and crop actor already fill a 2-core machine
# (measured 2026-12-04: 0.08 s per step alone, 0.24-0.32 s per step each with two trials at once, so
# two at once finish later than one after the other); other presets take what the cluster fits
LOCAL_CONCURRENCY = {"cpu_demo": 1}


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def add_common_arguments(parser: argparse.ArgumentParser, default_seeds: int) -> None:
    parser.add_argument("--preset", default="cpu_demo", choices=sorted(PRESETS),
                        help="base settings (default cpu_demo: a tiny ViT on one CPU machine)")
    parser.add_argument("--config", help="YAML file of config sections applied over the preset")
    parser.add_argument("--data", help="an ImageFolder directory (class/xxx.jpg) to pretrain on")
    parser.add_argument("--source", choices=[name for name, info in DATA_SOURCES.items() if info.embedded],
                        help="an embedded dataset instead (fashion_mnist needs the Debian package)")
    parser.add_argument("--seeds", type=_positive, default=default_seeds,
                        help=f"seeds per arm (default {default_seeds})")
    parser.add_argument("--epochs", type=_positive, help="epochs per trial (default: the budget of the preset)")
    parser.add_argument("--name", help="sweep name: the MLflow parent run and the storage folder")
    parser.add_argument("--out", help="directory for the table and plots (default: sweep_reports/<name>)")
    parser.add_argument("--storage", help="where Tune and Train keep trial checkpoints (default ./raydino_runs)")
    parser.add_argument("--tracking-uri", help="MLflow store (default: MLFLOW_TRACKING_URI or ./mlflow.db)")
    parser.add_argument("--experiment", help="MLflow experiment (default: the sweep script's name)")
    parser.add_argument("--max-concurrent", type=_positive, help="trials at once (default: as many as the Ray "
                        "cluster fits; with the cpu_demo preset 2, one core each)")
    parser.add_argument("--retries", type=_non_negative, default=1, help="times a failed trial is retried (default 1)")
    parser.add_argument("--dry-run", action="store_true", help="print the arms and trials, run nothing")
    parser.add_argument("--resume", nargs="?", const="", metavar="NAME",
                        help="continue a sweep whose driver died or was interrupted (Tune's restore): NAME, or "
                        "the newest unfinished sweep of this script's experiment in the storage; give the "
                        "arguments it was started with")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every trial")


def base_config(args: argparse.Namespace, budget: dict[str, list[str]], experiment: str) -> Config:
    """The preset, the script's small-machine budget for that preset, then the user's file and
    overrides (which win)."""
    overrides = list(budget.get(args.preset, []))
    if args.source:
        overrides.append(f"data.source={args.source}")
    if args.data:
        overrides += ["data.source=imagefolder", f"data.path={args.data}"]
    if args.epochs:
        overrides.append(f"optim.epochs={args.epochs}")
    overrides.append(f"tracking.experiment={args.experiment or experiment}")
    if args.tracking_uri:
        overrides.append(f"tracking.uri={args.tracking_uri}")
    return load_config(args.config, [*overrides, *args.overrides], preset=args.preset)


def sweep_name(args: argparse.Namespace, base: Config, prefix: str) -> str:
    """The sweep to run: ``--resume NAME`` or ``--name``; ``--resume`` alone picks the newest sweep of this
    script's MLflow experiment that can be resumed from the storage; a new sweep is named by the time."""
    if args.resume is None:
        return args.name or f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"
    if "=" in args.resume:  # argparse gave the first override to --resume's optional NAME
        raise ConfigError(f"--resume took the override {args.resume!r} for a sweep name; put --resume [NAME] "
                          "after the overrides")
    if args.resume and args.name and args.resume != args.name:
        raise ConfigError(f"--resume {args.resume} and --name {args.name} name different sweeps; give one")
    if args.resume or args.name:
        return args.resume or args.name
    from raydino.stores.run_storage import resolve_storage
    from raydino.sweep import resumable_sweeps
    from raydino.tracking import resolve_tracking_uri

    storage = resolve_storage(args.storage or base.checkpoint.storage_path)
    found = resumable_sweeps(resolve_tracking_uri(base.tracking.uri), base.tracking.experiment, storage)
    if not found:
        raise ConfigError(f"--resume: no sweep of experiment {base.tracking.experiment!r} to resume in {storage}")
    return found[0]


def count_trials(space: dict[str, Any]) -> int:
    """Trials of a grid space: the product of its value lists' lengths."""
    trials = 1
    for values in space.values():
        trials *= len(values)
    return trials


def run_sweep_and_report(args: argparse.Namespace, name: str, base: Config, space: dict[str, Any],
                         arm_keys: list[str], asha: Any = None) -> int:
    """Run the sweep on Tune, print and save its per-arm report; exit status 1 if no trial finished."""
    from raydino.sweep import SweepSpec, run_sweep

    spec = SweepSpec(
        name=name,
        base=base,
        space=space,
        arm_keys=arm_keys,
        asha=asha,
        trial_retries=args.retries,
        max_concurrent_trials=args.max_concurrent or LOCAL_CONCURRENCY.get(args.preset),
        storage_path=args.storage,
    )
    result = run_sweep(spec, resume=args.resume is not None)
    report_sweep(result, arm_keys, args.out or f"sweep_reports/{name}")
    return 1 if result.count("FINISHED") == 0 else 0


def report_sweep(result: SweepResult, arm_keys: list[str], out_dir: str | os.PathLike[str],
                 log: Callable[[str], None] = print) -> str:
    """Write the per-arm table and plots to ``out_dir`` and onto the (ended) parent run, then
    print the table and what failed; returns the markdown table ("" if the report failed).

    A failing report must not hide the trials' outcomes: it is logged, tagged on the parent
    run (``raydino.report_error``), and the outcomes are printed all the same.
    """
    from raydino.sweep.report import write_report
    from raydino.tracking import RunLogger, experiment_url

    parent = RunLogger(result.tracking_uri, result.parent_run_id)
    markdown = ""
    try:
        markdown, files = write_report(result.tracking_uri, result.experiment, result.parent_run_id, arm_keys, out_dir)
        for path in files:
            parent.log_artifact(path, "sweep")
    except Exception as exc:  # noqa: BLE001 - the trials' outcome must still reach the user
        log(f"sweep: the report failed ({type(exc).__name__}: {exc}); trial outcomes follow")
        parent.set_tags({"raydino.report_error": str(exc)[:500]})
    log("")
    log(markdown or "(no table)")
    log("")
    for trial in result.trials:
        if trial.status == "FAILED":
            log(f"FAILED trial {trial.trial_id} ({trial.attempts} attempts) {trial.overrides}:\n  {trial.error}")
    log(
        f"{result.count('FINISHED')} finished, {result.count('KILLED')} stopped early, {result.count('FAILED')} failed "
        f"in {result.seconds / 60:.1f} min; report in {Path(out_dir).resolve()}; MLflow parent run "
        f"{result.parent_run_id} (experiment {result.experiment!r}) in {result.tracking_uri}"
    )
    log(f"in the MLflow UI: {experiment_url(result.tracking_uri, result.parent_run_id)} (expand the parent run; "
        "Columns > Tags > raydino.arm.<key> shows the arms as columns)")
    return markdown


def run_cli(main: Any) -> int:
    """Run a script's ``main`` and turn the errors a user can fix (config, data path, tracking
    store, checkpoint storage) into one line instead of a traceback."""
    from raydino.stores.objectstore import ObjectStoreError
    from raydino.stores.run_storage import StorageError
    from raydino.tracking import TrackingError

    try:
        return main()
    except (ConfigError, TrackingError, StorageError, ObjectStoreError, FileNotFoundError) as exc:
        print(f"{Path(sys.argv[0]).name}: error: {exc}", file=sys.stderr)
        return 2
