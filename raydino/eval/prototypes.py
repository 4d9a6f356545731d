"""Prototype diagnostics (docs/objective.md sections 6-7): how many prototypes are actually
used, and the spread of the vMF precisions kappa_k = ||w_k|| / tau. Utilisation must be
measured because partial prototype collapse is known to happen at large K."""

from __future__ import annotations

import torch
from torch import Tensor

KAPPA_QUANTILES: tuple[float, ...] = (0.05, 0.25, 0.50, 0.75, 0.95)


@torch.no_grad()
def prototype_utilisation(scores: Tensor) -> dict[str, float | int | Tensor]:
    """Argmax-prototype usage over an evaluation set.

    ``scores`` is (N, K): head scores or logits (any monotone per-row transform gives the
    same argmax). Returns ``distinct`` (prototypes that are some sample's argmax),
    ``entropy`` (nats, of the argmax histogram; log K is uniform use, 0 is total collapse),
    ``perplexity`` (exp(entropy), the effective number of prototypes in use),
    ``num_prototypes`` (K) and ``usage`` (float64 tensor (K,), the histogram summing to 1).
    """
    if scores.ndim != 2 or scores.shape[0] == 0 or scores.shape[1] == 0:
        raise ValueError(f"scores must be a non-empty (N, K) tensor, got shape {tuple(scores.shape)}")
    k = scores.shape[1]
    counts = torch.bincount(scores.argmax(dim=1).cpu(), minlength=k).to(torch.float64)
    usage = counts / counts.sum()
    used = usage[usage > 0]
    entropy = float(-(used * used.log()).sum())
    return {
        "distinct": int((counts > 0).sum()),
        "entropy": entropy,
        "perplexity": float(torch.tensor(entropy, dtype=torch.float64).exp()),
        "num_prototypes": k,
        "usage": usage,
    }


@torch.no_grad()
def kappa_statistics(prototype_norms: Tensor, temperature: float) -> dict[str, float]:
    """Summary of kappa = norm / tau (e.g. from ``DINOHead.prototype_norms()``), flat floats
    ready for metric logging: ``q05, q25, q50, q75, q95`` (linear interpolation, as
    ``numpy.quantile``), ``mean``, ``min``, ``max``."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    kappa = prototype_norms.detach().reshape(-1).cpu().to(torch.float64) / temperature
    if kappa.numel() == 0:
        raise ValueError("prototype_norms is empty")
    qs = torch.quantile(kappa, torch.tensor(KAPPA_QUANTILES, dtype=torch.float64))
    out = {f"q{round(q * 100):02d}": float(v) for q, v in zip(KAPPA_QUANTILES, qs)}
    out.update(mean=float(kappa.mean()), min=float(kappa.min()), max=float(kappa.max()))
    return out
