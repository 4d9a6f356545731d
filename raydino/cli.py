"""The ``raydino`` command line."""

from __future__ import annotations

import argparse
import logging
import sys

from raydino.config import METHODS, PRESETS, ConfigError, load_config, parse_method


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
            "Settings: --preset, then --config FILE, then key=value overrides such as loss.vmf=true."
        ),
    )
    pre.add_argument("--config", help="YAML file with config sections (model, head, loss, data, optim ...)")
    pre.add_argument("--preset", choices=sorted(PRESETS), help="base settings (default: cpu_demo)")
    pre.add_argument("--data", help="an ImageFolder directory (class/xxx.jpg) to pretrain on; sets data.source")
    pre.add_argument("--method", type=parse_method, choices=list(METHODS),
                     help="sets loss.method and loss.vmf (default: the preset's); ibot_vmf = ibot-vmf")
    pre.add_argument("--local", action="store_true", help="single process, no Ray (quick smoke run)")
    pre.add_argument("--max-steps", type=int, help="with --local: stop after this many steps")
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
    ex.add_argument("out", help="output file, e.g. backbone.safetensors")
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
    cmp.add_argument("--format", choices=["markdown", "csv"], default="markdown")
    cmp.add_argument("--plots", default="compare_plots", help="directory for the PNG plots ('' to skip)")
    cmp.add_argument("--tracking-uri", help="default: MLFLOW_TRACKING_URI or ./mlflow.db")
    return parser


def _compare(args: argparse.Namespace) -> int:
    from raydino.compare import DEFAULT_METRICS, compare_runs, to_csv, to_markdown, write_plots
    from raydino.tracking import check_tracking, resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri)
    check_tracking(uri)
    comparison = compare_runs(uri, args.experiment, args.group_by, args.metric or DEFAULT_METRICS, args.parent)
    print((to_markdown(comparison) if args.format == "markdown" else to_csv(comparison)).rstrip("\n"))
    if args.plots:
        for path in write_plots(comparison, args.plots):
            print(f"wrote {path}", file=sys.stderr)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from raydino.pretrain import evaluate_checkpoint

    metrics = evaluate_checkpoint(args.checkpoint, args.data)
    width = max(map(len, metrics))
    for key, value in metrics.items():
        print(f"{key:<{width}}  {value:.4g}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from raydino.export import export_backbone, load_checkpoint_config, timm_kwargs

    out = export_backbone(args.checkpoint, args.out)
    cfg = load_checkpoint_config(args.checkpoint)
    print(f"wrote {out}")
    print(
        f"load with: timm.create_model({cfg.model.name!r}, pretrained=True, "
        f"pretrained_cfg_overlay=dict(file={str(out)!r}), **{timm_kwargs(cfg)!r})"
    )
    return 0


def _pretrain(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.data:
        overrides = ["data.source=imagefolder", f"data.path={args.data}", *overrides]
    if args.method:
        overrides = [f"{key}={value}" for key, value in METHODS[args.method].items()] + overrides
    if args.storage:
        overrides = [f"checkpoint.storage_path={args.storage}", *overrides]
    if args.max_failures is not None:
        overrides = [f"checkpoint.max_failures={args.max_failures}", *overrides]
    cfg = load_config(args.config, overrides, args.preset)
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
    from raydino.local_run import pretrain_local

    result = pretrain_local(cfg, max_steps=args.max_steps)
    print(
        f"done in {result.seconds:.0f} s, {result.steps} steps, final loss {result.final_loss:.4f}\n"
        f"kNN top-1 (k=20) of the pretrained teacher: {result.knn_top1:.1f}%   "
        f"random initialisation: {result.knn_top1_random_init:.1f}%"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # no table-creation chatter on every start
    try:
        if args.command == "pretrain":
            return _pretrain(args)
        if args.command == "evaluate":
            return _evaluate(args)
        if args.command == "export":
            return _export(args)
        if args.command == "compare":
            return _compare(args)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"raydino: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from raydino.tracking import TrackingError
        from raydino.train.driver import PretrainError

        if isinstance(exc, (TrackingError, PretrainError)):
            print(f"raydino: error: {exc}", file=sys.stderr)
            return 1
        raise
    return 1


if __name__ == "__main__":
    sys.exit(main())
