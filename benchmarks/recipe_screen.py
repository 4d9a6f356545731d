"""Screen a demo recipe for collapse, fast: one process, the shared ``DINOStep``, batched multi-crop.

Prints one JSON line: kNN top-1 of the teacher (k = 20), of the same network at random
initialisation and of the raw pixels; prototypes in use (the argmax of the vMF logits for a
DINO-vMF run); the mean teacher target entropy per tenth of the run as a share of log K; over the
last tenth the mean teacher entropy and the entropy of the batch-mean target (equal to the former:
the targets say nothing about the sample); the student's kappa q05/q50/q95. Crops are made a
batch at a time in the training process (``MultiCrop.crop_batch``, the crop actors' code, seeded
per image as in the Ray pipeline), so a screen costs the steps and little else. README's and
docs/results.md's screening tables are these lines. A run that passes here is worth a
``sweeps/demo_recipe.py`` arm.

    python benchmarks/recipe_screen.py NAME loss.teacher_temp=0.02 optim.epochs=60
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import numpy as np
import torch

from raydino.commands.local_run import _load
from raydino.config import load_config
from raydino.data.augment import MultiCrop
from raydino.data.pipeline import row_seed
from raydino.eval.data import EvalData
from raydino.eval.evaluate import evaluate_network
from raydino.eval.knn import raw_pixel_knn_top1
from raydino.models import normalize_crops
from raydino.step import DINOStep, build_models


def screen(
    name: str, overrides: list[str], threads: int = 1, preset: str | None = None, keep: dict | None = None
) -> dict[str, object]:
    """One screen's figures; ``keep`` (a dict) receives the trained ``step`` and the ``test`` images."""
    torch.set_num_threads(threads)
    cfg = load_config(overrides=overrides, preset=preset)
    torch.manual_seed(cfg.seed)
    train, test = _load(cfg, "train"), _load(cfg, "test")
    data = EvalData(train.images, train.labels, test.images, test.labels, len(train.classes))
    _, random_teacher = build_models(cfg)
    random_knn = evaluate_network(random_teacher, data, ks=(20,))["knn_top1"]
    step_fn = DINOStep.build(cfg, torch.device("cpu"))
    batch = cfg.data.batch_size_per_worker * cfg.scaling.num_workers
    steps_per_epoch = len(train) // batch
    total, log_k = cfg.optim.epochs * steps_per_epoch, math.log(cfg.head.num_prototypes)
    multicrop = MultiCrop(cfg.data.crops)
    images = [torch.from_numpy(np.ascontiguousarray(im)) for im in train.images]
    rng = np.random.default_rng(cfg.seed)
    started, step = time.perf_counter(), 0
    entropies, mean_targets, losses = [], [], []
    for epoch in range(cfg.optim.epochs):
        order = rng.permutation(len(train))
        for b in range(steps_per_epoch):
            idx = order[b * batch : (b + 1) * batch]
            views = multicrop.crop_batch([images[i] for i in idx], [row_seed(cfg.seed, epoch, int(i)) for i in idx])
            metrics = step_fn(normalize_crops(views, "cpu"), step, total)
            step += 1
            entropies.append(metrics["teacher_entropy"])
            mean_targets.append(metrics["mean_target_entropy"])
            losses.append(metrics["loss"])
            if step % max(1, total // 10) == 0:  # progress on stderr: a screen runs for minutes
                print(f"{name}: step {step}/{total} teacher entropy {metrics['teacher_entropy'] / log_k:.3f} log K, "
                      f"batch-mean {metrics['mean_target_entropy'] / log_k:.3f} log K", file=sys.stderr, flush=True)
    seconds = time.perf_counter() - started
    if keep is not None:
        keep.update(step=step_fn, test=test, cfg=cfg)
    final = evaluate_network(step_fn.teacher, data, ks=(20,), vmf_temperature=cfg.usage_temperature)
    kappa = step_fn.student_module.head.prototype_norms().detach() / cfg.loss.student_temp
    tenth = max(1, total // 10)
    per_tenth = [round(float(np.mean(entropies[i : i + tenth])) / log_k, 3) for i in range(0, total, tenth)]
    return {
        "name": name, "steps": total, "knn": round(final["knn_top1"], 1), "knn_random_init": round(random_knn, 1),
        "knn_raw_pixels": round(raw_pixel_knn_top1(data), 1),
        "in_use": final["prototypes_in_use"],
        "entropy_over_log_k": per_tenth,
        "final_entropy_over_log_k": round(float(np.mean(entropies[-tenth:])) / log_k, 3),
        "final_mean_target_over_log_k": round(float(np.mean(mean_targets[-tenth:])) / log_k, 3),
        "loss": round(float(np.mean(losses[-tenth:])), 3), "log_k": round(log_k, 3),
        "kappa_student_q05_q50_q95": [
            round(float(q), 2) for q in torch.quantile(kappa, torch.tensor([0.05, 0.5, 0.95]))],
        "train_seconds": round(seconds), "ms_per_step": round(1000 * seconds / max(1, total), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name")
    parser.add_argument("overrides", nargs="*", help="dotted overrides of the preset")
    parser.add_argument("--preset", default=None, help="start from this preset (default: the demo's)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (two screens share 2 cores)")
    args = parser.parse_args()
    print(json.dumps(screen(args.name, args.overrides, args.threads, args.preset)), flush=True)


if __name__ == "__main__":
    main()
