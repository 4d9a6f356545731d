"""The choices a user names in config: data sources and centering modes, each listed once.

Light on purpose (no torch, no Ray): ``raydino.config`` validates against these names in
every process that imports it, Ray Data's helper processes included. The modules that
implement a choice key their implementations by these names and check, at import, that
they cover every one (``require_all``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class SourceInfo:
    """A data source: embedded (in-memory arrays with their own evaluation split) or files."""

    description: str
    embedded: bool = False
    layout: str | None = None
    """For file sources: the directory layout expected under ``data.path``."""
    labelled: bool = False

    @property
    def needs_path(self) -> bool:
        return self.layout is not None


DATA_SOURCES: dict[str, SourceInfo] = {
    "digits": SourceInfo("scikit-learn's 1,797 8x8 digits (shipped with scikit-learn)", embedded=True, labelled=True),
    "fashion_mnist": SourceInfo(
        "Fashion-MNIST from Debian's dataset-fashion-mnist package", embedded=True, labelled=True
    ),
    "imagefolder": SourceInfo("an ImageFolder", layout="<path>/<class_name>/<image files>", labelled=True),
    "images": SourceInfo("any directory of images, unlabelled", layout="a directory holding image files (recursively)"),
    "shards": SourceInfo("a shard set written by `raydino shard` (labelled when written from an ImageFolder)",
                         layout="<path>/manifest.json beside its Parquet shards"),
}

CENTERING_MODES: dict[str, str] = {
    "logit": "DINO: subtract an EMA of the batch-mean teacher logit",
    "probability": "DINO-vMF: divide the teacher softmax by the running prototype usage",
    "sinkhorn": "DINOv2: Sinkhorn-Knopp equipartition over the global batch",
    "none": "plain softmax of the teacher logits",
}


def choice_type(names: Iterable[str]) -> Any:
    """``Literal[...]`` of the names, for a pydantic field (its error lists the choices)."""
    return Literal[tuple(names)]  # type: ignore[valid-type]


def require_all(registry: dict[str, Any], implemented: Iterable[str], what: str) -> None:
    """Fail at import when an implementation table and its registry disagree."""
    missing, extra = set(registry) - set(implemented), set(implemented) - set(registry)
    if missing or extra:
        raise ImportError(f"{what}: not implemented {sorted(missing)}, not registered {sorted(extra)}")
