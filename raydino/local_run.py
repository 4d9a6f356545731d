"""Single-process pretraining on an embedded dataset: the smoke run behind ``make demo``.

Plain PyTorch data loading and the shared ``DINOStep``; the distributed Ray pipeline
builds on the same pieces.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from raydino.config import Config
from raydino.data.augment import MultiCrop
from raydino.data.embedded import ArrayDataset, load_digits, load_fashion_mnist
from raydino.engine import DINOStep, build_loss, build_models, build_optimizer, normalize_crops
from raydino.eval.evaluate import EvalData, evaluate_network
from raydino.models import MultiCropNetwork


class _CropDataset(Dataset):
    def __init__(self, data: ArrayDataset, multicrop: MultiCrop) -> None:
        self.data = data
        self.multicrop = multicrop

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> list[torch.Tensor]:
        return self.multicrop(torch.from_numpy(self.data.images[i]))


def load_embedded(cfg: Config, split: str) -> ArrayDataset:
    if cfg.data.source == "digits":
        return load_digits(split, size=cfg.data.crops.global_size, seed=cfg.seed)
    if cfg.data.source == "fashion_mnist":
        return load_fashion_mnist(split)
    raise ValueError(f"the single-process run takes data.source=digits or fashion_mnist, not {cfg.data.source!r}")


def knn_accuracy(network: MultiCropNetwork, train: ArrayDataset, test: ArrayDataset) -> float:
    data = EvalData(train.images, train.labels, test.images, test.labels, len(train.classes))
    return evaluate_network(network, data, ks=(20,))["knn_top1"]


def _print(line: str) -> None:
    print(line, flush=True)


@dataclass
class LocalResult:
    steps: int
    final_loss: float
    knn_top1: float
    knn_top1_random_init: float
    seconds: float


def pretrain_local(cfg: Config, max_steps: int | None = None, log: Callable[[str], None] = _print) -> LocalResult:
    """Pretrain on one process, then compare teacher kNN top-1 with the random initialisation."""
    torch.manual_seed(cfg.seed)
    start = time.perf_counter()
    train, test = load_embedded(cfg, "train"), load_embedded(cfg, "test")
    student, teacher = build_models(cfg)
    random_init_knn = knn_accuracy(teacher, train, test)
    loss_fn = build_loss(cfg)
    optimizer = build_optimizer(cfg, student)
    step_fn = DINOStep(cfg, student, student, teacher, loss_fn, optimizer, torch.device("cpu"))
    loader = DataLoader(
        _CropDataset(train, MultiCrop(cfg.data.crops)),
        batch_size=cfg.data.batch_size_per_worker * cfg.scaling.num_workers,
        shuffle=True,
        drop_last=True,
        num_workers=1,  # augment in a separate process (single-threaded), overlapping the step
        persistent_workers=True,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    total_steps = cfg.optim.epochs * len(loader)
    if max_steps is not None:
        total_steps = min(total_steps, max_steps)
    step, metrics = 0, {"loss": float("nan")}
    for epoch in range(cfg.optim.epochs):
        student.train()
        for crops in loader:
            if step >= total_steps:
                break
            metrics = step_fn(normalize_crops(crops, "cpu"), step, total_steps)
            step += 1
        log(
            f"epoch {epoch + 1}/{cfg.optim.epochs}  step {step}/{total_steps}  loss {metrics['loss']:.4f}  "
            f"teacher entropy {metrics['teacher_entropy']:.3f}  mean-target entropy {metrics['mean_target_entropy']:.3f}"
        )
        if step >= total_steps:
            break
    return LocalResult(step, metrics["loss"], knn_accuracy(teacher, train, test), random_init_knn,
                       time.perf_counter() - start)
