"""Teacher-target centering: the four modes of docs/objective.md section 4.

Every mode maps the teacher's *scaled* logits l (already divided by the teacher
temperature, vMF correction included) to target probabilities, and keeps what it
learns across steps in a buffer so that it is checkpointed with the model.
All statistics are all-reduced over workers when a process group is initialised.

The logit center is kept in temperature-1 units (an EMA of l * tau), exactly as
DINO keeps it, so DINO's teacher-temperature warm-up behaves as in the reference.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from raydino.config.registry import CENTERING_MODES, require_all
from raydino.objectives.distributed import all_reduce_max, all_reduce_sum, global_batch_mean


class Centering(nn.Module):
    """Maps scaled teacher logits (N, K) to target probabilities (N, K)."""

    def __init__(self, num_prototypes: int) -> None:
        super().__init__()
        self.num_prototypes = num_prototypes

    def targets(self, logits: Tensor, temperature: float) -> Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def update(self, logits: Tensor, temperature: float) -> None:
        """Absorb one batch of (uncentred) teacher logits, after the loss used them."""

    def center_norm(self) -> Tensor | None:
        """Norm of the running center, for diagnostics; None where the mode has none."""
        return None


class NoCentering(Centering):
    """Plain softmax of the teacher logits."""

    def targets(self, logits: Tensor, temperature: float) -> Tensor:
        return torch.softmax(logits, dim=-1)


class LogitCentering(Centering):
    """DINO: subtract an EMA of the batch-mean teacher logit, c <- m c + (1 - m) mean(l tau)."""

    def __init__(self, num_prototypes: int, momentum: float = 0.9) -> None:
        super().__init__(num_prototypes)
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, num_prototypes))

    def targets(self, logits: Tensor, temperature: float) -> Tensor:
        return torch.softmax(logits - self.center / temperature, dim=-1)

    @torch.no_grad()
    def update(self, logits: Tensor, temperature: float) -> None:
        batch_center = global_batch_mean(logits.to(self.center.dtype) * temperature)
        self.center.mul_(self.momentum).add_(batch_center.unsqueeze(0), alpha=1.0 - self.momentum)

    def center_norm(self) -> Tensor:
        return self.center.norm()


class ProbabilityCentering(Centering):
    """DINO-vMF: divide the teacher softmax by the running prototype usage and renormalise.

    c <- m c + (1 - m) mean_batch(softmax(l)), init 1/K;  P_t = softmax(l - log c).
    Unlike logit centering it does not cancel the per-prototype vMF normaliser.
    """

    def __init__(self, num_prototypes: int, momentum: float = 0.9) -> None:
        super().__init__(num_prototypes)
        self.momentum = momentum
        self.register_buffer("center", torch.full((1, num_prototypes), 1.0 / num_prototypes))

    def targets(self, logits: Tensor, temperature: float) -> Tensor:
        return torch.softmax(logits - torch.log(self.center), dim=-1)

    @torch.no_grad()
    def update(self, logits: Tensor, temperature: float) -> None:
        usage = global_batch_mean(torch.softmax(logits.to(self.center.dtype), dim=-1))
        self.center.mul_(self.momentum).add_(usage.unsqueeze(0), alpha=1.0 - self.momentum)
        # Guard log(0) for a prototype that no sample has used for a very long time.
        self.center.clamp_(min=torch.finfo(self.center.dtype).tiny)

    def center_norm(self) -> Tensor:
        return self.center.norm()


class SinkhornCentering(Centering):
    """DINOv2's Sinkhorn-Knopp: equipartition targets over the global batch; stateless."""

    def __init__(self, num_prototypes: int, iterations: int = 3) -> None:
        super().__init__(num_prototypes)
        self.iterations = iterations

    @torch.no_grad()
    def targets(self, logits: Tensor, temperature: float) -> Tensor:
        # float64 so that prototypes far below the maximum underflow neither to 0 nor to 0/0
        logits = logits.double()
        global_max = all_reduce_max(logits.max())
        q = torch.exp(logits - global_max).t()  # (K, B); the shift cancels in the normalisation
        batch = all_reduce_sum(logits.new_tensor(float(q.shape[1])))
        k = q.shape[0]
        q /= all_reduce_sum(q.sum())
        for _ in range(self.iterations):
            q /= all_reduce_sum(q.sum(dim=1, keepdim=True)).clamp_min(torch.finfo(q.dtype).tiny)
            q /= k
            q /= q.sum(dim=0, keepdim=True)
            q /= batch
        q *= batch
        return q.t().float()


# mode -> builder(num_prototypes, momentum, sinkhorn_iterations)
_MODES: dict[str, Callable[[int, float, int], Centering]] = {
    "logit": lambda k, momentum, _: LogitCentering(k, momentum),
    "probability": lambda k, momentum, _: ProbabilityCentering(k, momentum),
    "sinkhorn": lambda k, _, iterations: SinkhornCentering(k, iterations),
    "none": lambda k, _m, _i: NoCentering(k),
}
require_all(CENTERING_MODES, _MODES, "centering modes")


def make_centering(
    mode: str, num_prototypes: int, momentum: float = 0.9, sinkhorn_iterations: int = 3
) -> Centering:
    """Build the centering module for ``mode`` (a key of ``raydino.config.registry.CENTERING_MODES``)."""
    if mode not in _MODES:
        raise ValueError(f"unknown centering mode {mode!r}; choose one of {', '.join(CENTERING_MODES)}")
    return _MODES[mode](num_prototypes, momentum, sinkhorn_iterations)


def entropy(p: Tensor, dim: int = -1) -> Tensor:
    """Shannon entropy in nats, 0 log 0 = 0."""
    return -(torch.xlogy(p, p)).sum(dim=dim)

