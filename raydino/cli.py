"""The ``raydino`` command line."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading

from raydino.config import METHODS, PRESETS, ConfigError, load_config, parse_method


def _positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raydino",
        description="Self-supervised ViT pretraining with DINO, DINO-vMF, iBOT and iBOT-vMF.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    pre = sub.add_parser(
        "pretrain",
        help="pretrain a ViT (default: the cpu_demo preset on scikit-learn's digits)",
        description=(
            "Pretrain a ViT with DINO, DINO-vMF, iBOT or iBOT-vMF. With no arguments, runs the cpu_demo preset on the "
            "embedded digits dataset and reports kNN top-1 against a random initialisation. "
            "Settings: --preset, then --config FILE, then key=value overrides such as loss.vmf=true. "
            "Every key, its default and allowed values: docs/usage.md section 'Settings' and the field descriptions in "
            "raydino/config/schema.py; `raydino presets` lists the presets, --print-config shows the resolved config."
        ),
    )
    pre.add_argument("--config", help="YAML file with config sections (model, head, loss, data, optim ...)")
    pre.add_argument("--preset", choices=sorted(PRESETS), help="base settings (default: cpu_demo)")
    pre.add_argument("--data", help="an ImageFolder directory (class/xxx.jpg) or a shard set (`raydino shard`) to "
                     "pretrain on; sets data.source")
    pre.add_argument("--method", type=parse_method, choices=list(METHODS),
                     help="sets loss.method and loss.vmf (default: the preset's); ibot_vmf = ibot-vmf")
    pre.add_argument("--local", action="store_true",
                     help="single process, no Ray, on an embedded dataset (quick smoke run); writes no MLflow run "
                     "and no checkpoint, only prints loss and kNN")
    pre.add_argument("--max-steps", type=_positive_int, help="with --local: stop after this many steps (at least 1)")
    pre.add_argument("--print-config", action="store_true",
                     help="print the resolved config as YAML (loadable with --config) and exit; starts nothing")
    pre.add_argument("--storage", help="checkpoint.storage_path: a directory or s3:// URI (default ./raydino_runs)")
    pre.add_argument("--max-failures", type=int, help="checkpoint.max_failures: worker failures to recover from (default 1)")
    pre.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.epochs=5")
    ev = sub.add_parser(
        "evaluate",
        help="kNN / linear probe / prototype usage of a checkpoint's teacher",
        description="Evaluate the teacher of a checkpoint directory (a checkpoint_* folder of a run) on its "
        "config's evaluation data, or on an ImageFolder given with --data (split 80/20 into kNN bank and test).",
    )
    ev.add_argument("checkpoint", help="a checkpoint_* directory written by raydino pretrain")
    ev.add_argument("--data", help="an ImageFolder directory to evaluate on instead")
    ex = sub.add_parser(
        "export",
        help="write the teacher backbone as a timm-loadable .safetensors file",
        description="Export the teacher backbone of a checkpoint; load it with timm.create_model(name, "
        "pretrained=True, pretrained_cfg_overlay=dict(file=OUT), **kwargs) using the printed name and kwargs.",
    )
    ex.add_argument("checkpoint", help="a checkpoint_* directory written by raydino pretrain")
    ex.add_argument("out", help="output file, e.g. backbone.safetensors; an existing directory gets "
                    "DIR/teacher_backbone.safetensors")
    att = sub.add_parser(
        "attention",
        help="DINO's attention maps: the teacher's last-block [CLS] attention per head, as PNGs",
        description="For each image, write OUT/<name>/: the preprocessed image, the last block's [CLS] attention "
        "over the patches per head and their mean (upsampled to the image), and per head the patches that hold "
        "--threshold of the attention mass (DINO's visualize_attention.py), plus overview.png with all of them.",
    )
    att.add_argument("model", help="a checkpoint_* directory or a .safetensors file written by raydino export")
    att.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any format PIL reads)")
    att.add_argument("--out", required=True, help="output directory")
    att.add_argument("--threshold", type=float, default=0.6, help="attention mass the masks keep (default 0.6)")
    att.add_argument("--size", type=int, help="image size (default: the run's data.crops.global_size)")
    att.add_argument("--device", default=None, help="where the backbone runs (default: cuda if available, else cpu)")
    cmp = sub.add_parser(
        "compare",
        help="group MLflow runs by params and tabulate their metrics (markdown or CSV) with plots",
        description="Read runs with MLflow's search API, group them by params (e.g. --group-by loss.vmf "
        "head.norm_last_layer), print mean, std and count of each metric per group, and write bar plots.",
    )
    cmp.add_argument("--experiment", default="raydino", help="MLflow experiment name (default: raydino)")
    cmp.add_argument("--parent", help="only the child runs of this parent run id (a sweep)")
    cmp.add_argument("--group-by", nargs="*", default=[], metavar="KEY", help="config keys to group by")
    cmp.add_argument("--metric", nargs="*", default=None, metavar="NAME", help="metrics (default: final kNN, probe ...)")
    cmp.add_argument("--status", nargs="+", default=["FINISHED"], type=str.upper, metavar="STATUS",
                     choices=["FINISHED", "RUNNING", "FAILED", "KILLED", "SCHEDULED", "ALL"],
                     help="compare only runs with these MLflow statuses (default: FINISHED; 'all' for every run)")
    rep = sub.add_parser(
        "replay-metrics", help="send metrics a run could not log (its tracking server was away) to its MLflow run",
        description="Send an unsent_metrics_*.jsonl file, written by a run whose MLflow server did not answer "
        "before the run ended, to the run and store it names. Points already there are not duplicated.",
    )
    rep.add_argument("file", help="the unsent_metrics_*.jsonl file (a local path or a URI such as s3://...)")
    rep.add_argument("--tracking-uri", help="default: the store named in the file")
    sh = sub.add_parser(
        "shard", help="pack an ImageFolder or image directory into Parquet shards with a manifest (data at scale)",
        description="Pack SRC (an ImageFolder or a directory of images; a local path or a URI such as s3://...) into "
        "Parquet shards at DST, each image's encoded bytes untouched, with its label, class and relative path, and a "
        "manifest written last. Runs on Ray (RAY_ADDRESS, a cluster on this machine, else a private Ray). Undecodable "
        "files are skipped and counted as training skips them. Run it again after an interruption: finished shards "
        "are kept. Then train with --data DST.",
    )
    sh.add_argument("src", help="the image folder to pack")
    sh.add_argument("dst", help="where the shard set goes (a directory or URI)")
    sh.add_argument("--shard-mb", type=float, default=256.0, help="target shard size in MB (default 256)")
    sub.add_parser("presets", help="list the presets (--preset NAME) with one line each",
                   description="List the presets; `raydino pretrain --preset NAME --print-config` shows one in full.")
    cmp.add_argument("--format", choices=["markdown", "csv"], default="markdown")
    cmp.add_argument("--plots", default="compare_plots", help="directory for the PNG plots ('' to skip)")
    cmp.add_argument("--tracking-uri", help="default: MLFLOW_TRACKING_URI or ./mlflow.db")
    return parser


def _replay_metrics(args: argparse.Namespace) -> int:
    from raydino.stores.locations import locate, read_file
    from raydino.tracking import replay_unsent

    location = locate(args.file)
    uri, run_id, sent = replay_unsent(read_file(location.path, location.filesystem).decode(), args.tracking_uri)
    print(f"raydino: sent {sent} metric points and tags to run {run_id} in {uri}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from raydino.commands.compare import compare_runs, to_csv, to_markdown, write_plots
    from raydino.tracking import check_tracking, resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri)
    check_tracking(uri)
    statuses = None if "ALL" in args.status else args.status
    comparison = compare_runs(uri, args.experiment, args.group_by, args.metric or None, args.parent, statuses)
    print((to_markdown(comparison) if args.format == "markdown" else to_csv(comparison)).rstrip("\n"))
    if comparison.left_out:
        counts = ", ".join(f"{n} {status}" for status, n in comparison.left_out.items())
        print(f"raydino: left out {counts} run(s); --status all (or a list) compares them", file=sys.stderr)
    if args.plots:
        for path in write_plots(comparison, args.plots):
            print(f"wrote {path}", file=sys.stderr)
    return 0


def _presets() -> int:
    from raydino.config.presets import DEFAULT_PRESET, DESCRIPTIONS

    width = max(map(len, PRESETS))
    for name in PRESETS:
        print(f"{name:<{width}}  {DESCRIPTIONS.get(name, '')}{'  [default]' if name == DEFAULT_PRESET else ''}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from raydino.pretrain import evaluate_checkpoint

    metrics = evaluate_checkpoint(args.checkpoint, args.data)
    width = max(map(len, metrics))
    for key, value in metrics.items():
        print(f"{key:<{width}}  {value:.4g}")
    return 0


def _attention(args: argparse.Namespace) -> int:
    import torch

    from raydino.commands.attention_maps import write_attention

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    for folder in write_attention(args.model, args.images, args.out, args.threshold, args.size, device=device):
        print(f"wrote {folder}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from raydino.train.export import export_backbone, load_checkpoint_config, timm_kwargs

    out = export_backbone(args.checkpoint, args.out)
    cfg = load_checkpoint_config(args.checkpoint)
    print(f"wrote {out}")
    print(
        f"load with: timm.create_model({cfg.model.name!r}, pretrained=True, "
        f"pretrained_cfg_overlay=dict(file={str(out)!r}), **{timm_kwargs(cfg)!r})"
    )
    return 0


def _pretrain(args: argparse.Namespace) -> int:
    if args.max_steps is not None and not args.local:
        raise ConfigError("--max-steps needs --local; for a Ray run set optim.epochs (e.g. optim.epochs=1)")
    overrides = list(args.overrides)
    if args.data:
        from raydino.stores.shard_manifest import is_shard_set

        source = "shards" if is_shard_set(args.data) else "imagefolder"
        overrides = [f"data.source={source}", f"data.path={args.data}", *overrides]
    if args.method:
        overrides = [f"{key}={value}" for key, value in METHODS[args.method].items()] + overrides
    if args.storage:
        overrides = [f"checkpoint.storage_path={args.storage}", *overrides]
    if args.max_failures is not None:
        overrides = [f"checkpoint.max_failures={args.max_failures}", *overrides]
    cfg = load_config(args.config, overrides, args.preset)
    if args.print_config:
        for line in cfg.warnings():
            print(f"raydino: warning: {line}", file=sys.stderr, flush=True)
        print(cfg.to_yaml().rstrip("\n"))
        return 0
    centering = f"centering={cfg.loss.centering}"
    if cfg.loss.method == "ibot":
        centering += f", patch_centering={cfg.loss.patch_centering}"
    print(f"raydino: {cfg.method_name}, {cfg.model.name} on {cfg.data.source}, {centering}", flush=True)
    for line in cfg.warnings():
        print(f"raydino: warning: {line}", file=sys.stderr, flush=True)
    if not args.local:
        from raydino.pretrain import pretrain, summary_lines

        summary = pretrain(cfg)
        print("\n".join(summary_lines(summary)))
        return 0
    from raydino.commands.local_run import pretrain_local

    result = pretrain_local(cfg, max_steps=args.max_steps)
    print(
        f"done in {result.seconds:.0f} s, {result.steps} steps, final loss {result.final_loss:.4f}\n"
        f"kNN top-1 (k=20) of the pretrained teacher: {result.knn_top1:.1f}%   "
        f"random initialisation: {result.knn_top1_random_init:.1f}%"
    )
    return 0


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, Kubernetes, SLURM) taken as Ctrl-C: the same clean stop, exit status 143."""

    sigterm = True


_SIGNALS: list[int] = []
"""Signals received by this process: after one, whatever unwinds (an import cut in half, Ray's own
KeyboardInterrupt) is the stop the user asked for, not an error."""


def _on_signal(signum: int, frame: object) -> None:
    _SIGNALS.append(signum)
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _interrupted(exc: BaseException) -> int:
    """One line instead of a traceback; 130 for Ctrl-C, 143 for SIGTERM (128 + the signal, as shells do)."""
    sigterm = signal.SIGTERM in _SIGNALS or getattr(exc, "sigterm", False)
    what = "terminated (SIGTERM)" if sigterm else "interrupted"
    # no import here: the signal may have landed inside one (torch half-imported)
    detail = str(exc) if isinstance(exc, KeyboardInterrupt) else ""
    print(f"raydino: {what}: {detail}" if detail else f"raydino: {what}", file=sys.stderr, flush=True)
    return 143 if sigterm else 130


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # no table-creation chatter on every start
    _SIGNALS.clear()
    saved = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):  # ensure_ray keeps SIGTERM's over Ray's own handler
            saved[signum] = signal.signal(signum, _on_signal)
    try:
        return _dispatch(args)
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt) or _SIGNALS:
            return _interrupted(exc)
        raise
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def run() -> None:
    """The ``raydino`` command. After a signal, exit without the interpreter's teardown, which can crash
    in a C extension whose import the signal cut short (Ray is shut down first when this process runs it)."""
    code = main()
    if not _SIGNALS:
        sys.exit(code)
    with contextlib.suppress(BaseException):  # leaving anyway
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():
            ray.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _dispatch(args: argparse.Namespace) -> int:
    try:
        if args.command == "pretrain":
            return _pretrain(args)
        if args.command == "evaluate":
            return _evaluate(args)
        if args.command == "export":
            return _export(args)
        if args.command == "attention":
            return _attention(args)
        if args.command == "compare":
            return _compare(args)
        if args.command == "presets":
            return _presets()
        if args.command == "replay-metrics":
            return _replay_metrics(args)
        if args.command == "shard":
            from raydino.commands.shard import shard

            shard(args.src, args.dst, args.shard_mb)
            return 0
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"raydino: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from raydino.pretrain import RunComplete
        from raydino.tracking import TrackingError
        from raydino.train.driver import PretrainError

        if isinstance(exc, RunComplete):
            print(f"raydino: {exc}", file=sys.stderr)
            return 0
        from raydino.data.shards import ShardWriteError

        if isinstance(exc, (TrackingError, PretrainError, ShardWriteError)):
            print(f"raydino: error: {exc}", file=sys.stderr)
            return 1
        raise
    return 1


if __name__ == "__main__":
    run()
