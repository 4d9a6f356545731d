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
from raydino.config.registry import DATA_SOURCES
from raydino.data.augment import MultiCrop
from raydino.data.embedded import ArrayDataset, load_embedded
from raydino.eval.data import EvalData
from raydino.eval.evaluate import evaluate_network
from raydino.models import MultiCropNetwork, normalize_crops
from raydino.step import DINOStep


class _CropDataset(Dataset):
    def __init__(self, data: ArrayDataset, multicrop: MultiCrop) -> None:
        self.data = data
        self.multicrop = multicrop

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> list[torch.Tensor]:
        return self.multicrop(torch.from_numpy(self.data.images[i]))


def _load(cfg: Config, split: str) -> ArrayDataset:
    if not DATA_SOURCES[cfg.data.source].embedded:
        embedded = ", ".join(name for name, info in DATA_SOURCES.items() if info.embedded)
        raise ValueError(f"the single-process run takes an embedded data.source ({embedded}), not {cfg.data.source!r}")
    return load_embedded(cfg.data.source, split, cfg.data.crops.global_size, cfg.seed)


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
    start = time.perf_counter()
    train, test = _load(cfg, "train"), _load(cfg, "test")
    batch = cfg.data.batch_size_per_worker * cfg.scaling.num_workers
    if len(train) < batch:  # drop_last: not one step
        raise ValueError(
            f"a batch of {batch} images (data.batch_size_per_worker x scaling.num_workers) exceeds the {len(train)} "
            f"training images of {cfg.data.source}: no step to run; lower data.batch_size_per_worker"
        )
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps={max_steps}: need at least 1 step; pass --max-steps 1 or more")
    step_fn = DINOStep.build(cfg, torch.device("cpu"))
    student, teacher = step_fn.student_module, step_fn.teacher
    random_init_knn = knn_accuracy(teacher, train, test)
    loader = DataLoader(
        _CropDataset(train, MultiCrop(cfg.data.crops)),
        batch_size=batch,
        shuffle=True,
        drop_last=True,
        num_workers=1,  # augment in a separate process (single-threaded), overlapping the step
        persistent_workers=True,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    total_steps = cfg.optim.epochs * len(loader)
    if max_steps is not None:
        total_steps = min(total_steps, max_steps)
    nan = float("nan")
    step, metrics = 0, {"loss": nan}
    for epoch in range(cfg.optim.epochs):
        student.train()
        for crops in loader:
            if step >= total_steps:
                break
            metrics = step_fn(normalize_crops(crops, "cpu"), step, total_steps)
            step += 1
        log(
            f"epoch {epoch + 1}/{cfg.optim.epochs}  step {step}/{total_steps}  loss {metrics['loss']:.4f}  "
            f"teacher entropy {metrics.get('teacher_entropy', nan):.3f}  "
            f"mean-target entropy {metrics.get('mean_target_entropy', nan):.3f}"
        )
        if step >= total_steps:
            break
    return LocalResult(step, metrics["loss"], knn_accuracy(teacher, train, test), random_init_knn,
                       time.perf_counter() - start)
