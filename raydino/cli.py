"""The ``raydino`` command line."""

from __future__ import annotations

import argparse
import sys

from raydino.config import PRESETS, ConfigError, load_config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raydino",
        description="Self-supervised ViT pretraining with DINO and DINO-vMF.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    pre = sub.add_parser(
        "pretrain",
        help="pretrain a ViT (default: the cpu_demo preset on scikit-learn's digits)",
        description=(
            "Pretrain a ViT with DINO / DINO-vMF. With no arguments, runs the cpu_demo preset on the "
            "embedded digits dataset and reports kNN top-1 against a random initialisation. "
            "Settings: --preset, then --config FILE, then key=value overrides such as loss.vmf=true."
        ),
    )
    pre.add_argument("--config", help="YAML file with config sections (model, head, loss, data, optim ...)")
    pre.add_argument("--preset", choices=sorted(PRESETS), help="base settings (default: cpu_demo)")
    pre.add_argument("--max-steps", type=int, help="stop after this many optimisation steps (smoke tests)")
    pre.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.epochs=5")
    return parser


def _pretrain(args: argparse.Namespace) -> int:
    from raydino.local_run import pretrain_local

    cfg = load_config(args.config, args.overrides, args.preset)
    print(f"raydino: {cfg.model.name} on {cfg.data.source}, vmf={cfg.loss.vmf}, centering={cfg.loss.centering}")
    result = pretrain_local(cfg, max_steps=args.max_steps)
    print(
        f"done in {result.seconds:.0f} s, {result.steps} steps, final loss {result.final_loss:.4f}\n"
        f"kNN top-1 (k=20) of the pretrained teacher: {result.knn_top1:.1f}%   "
        f"random initialisation: {result.knn_top1_random_init:.1f}%"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "pretrain":
            return _pretrain(args)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"raydino: error: {exc}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
