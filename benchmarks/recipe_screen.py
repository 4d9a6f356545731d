"""Screen a demo recipe for collapse, fast: one process, the shared ``DINOStep``, per-epoch target entropy.

Prints one JSON line: kNN top-1 of the teacher (k = 20) and the random network's, prototypes in use
(the argmax of the vMF logits for a DINO-vMF run), the mean teacher target entropy of every epoch as a
share of log K, the entropy of the batch-mean target over the last epoch (equal to the former: the
targets say nothing about the sample), and the student's kappa q05/q50/q95. README's "What was tried"
table is these lines. A run that passes here is worth a ``sweeps/demo_recipe.py`` arm.

    python benchmarks/recipe_screen.py NAME loss.koleo_weight=0 optim.epochs=10 optim.momentum_teacher=0.95
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
from torch.utils.data import DataLoader

from raydino.config import load_config
from raydino.data.augment import MultiCrop
from raydino.eval.data import EvalData
from raydino.eval.evaluate import evaluate_network
from raydino.local_run import _CropDataset, _load
from raydino.models import normalize_crops
from raydino.step import DINOStep, build_models


def screen(name: str, overrides: list[str], threads: int = 1) -> dict[str, object]:
    torch.set_num_threads(threads)
    cfg = load_config(overrides=overrides)
    torch.manual_seed(cfg.seed)
    train, test = _load(cfg, "train"), _load(cfg, "test")
    data = EvalData(train.images, train.labels, test.images, test.labels, len(train.classes))
    vmf_temperature = cfg.usage_temperature
    _, random_teacher = build_models(cfg)
    random_knn = evaluate_network(random_teacher, data, ks=(20,))["knn_top1"]
    torch.manual_seed(cfg.seed)
    step_fn = DINOStep.build(cfg, torch.device("cpu"))
    batch = cfg.data.batch_size_per_worker * cfg.scaling.num_workers
    loader = DataLoader(_CropDataset(train, MultiCrop(cfg.data.crops)), batch_size=batch, shuffle=True,
                        drop_last=True, num_workers=1, persistent_workers=True,
                        generator=torch.Generator().manual_seed(cfg.seed))
    total, log_k = cfg.optim.epochs * len(loader), math.log(cfg.head.num_prototypes)
    started, step, per_epoch, mean_target, losses = time.perf_counter(), 0, [], math.nan, []
    for _ in range(cfg.optim.epochs):
        entropies, mean_targets, losses = [], [], []
        for crops in loader:
            metrics = step_fn(normalize_crops(crops, "cpu"), step, total)
            step += 1
            entropies.append(metrics["teacher_entropy"])
            mean_targets.append(metrics["mean_target_entropy"])
            losses.append(metrics["loss"])
        per_epoch.append(round(sum(entropies) / len(entropies) / log_k, 3))
        mean_target = sum(mean_targets) / len(mean_targets)
    final = evaluate_network(step_fn.teacher, data, ks=(20,), vmf_temperature=vmf_temperature)
    kappa = step_fn.student_module.head.prototype_norms().detach() / cfg.loss.student_temp
    return {
        "name": name, "knn": round(final["knn_top1"], 1), "knn_random_init": round(random_knn, 1),
        "in_use": final["prototypes_in_use"], "entropy_over_log_k": per_epoch,
        "mean_target_over_log_k": round(mean_target / log_k, 3), "loss": round(sum(losses) / len(losses), 3),
        "log_k": round(log_k, 3), "kappa_student_q05_q50_q95": [
            round(float(q), 2) for q in torch.quantile(kappa, torch.tensor([0.05, 0.5, 0.95]))],
        "seconds": round(time.perf_counter() - started),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name")
    parser.add_argument("overrides", nargs="*", help="dotted overrides of the cpu_demo preset")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (two screens share 2 cores)")
    args = parser.parse_args()
    print(json.dumps(screen(args.name, args.overrides, args.threads)), flush=True)


if __name__ == "__main__":
    main()
