"""Straightforward re-derivations of objective.md, in float64 numpy/scipy, for the tests."""

import numpy as np
import scipy.special


def log_c(kappa: np.ndarray, p: int) -> np.ndarray:
    nu = p / 2 - 1
    return nu * np.log(kappa) - p / 2 * np.log(2 * np.pi) - (np.log(scipy.special.ive(nu, kappa)) + kappa)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def logits(z: np.ndarray, tau: float, norms: np.ndarray | None, p: int) -> np.ndarray:
    out = z / tau
    if norms is not None:
        out = out + log_c(norms / tau, p)
    return out


def sinkhorn(logits_: np.ndarray, iterations: int) -> np.ndarray:
    q = np.exp(logits_ - logits_.max()).T  # K x B
    k, b = q.shape
    q = q / q.sum()
    for _ in range(iterations):
        q = q / q.sum(axis=1, keepdims=True) / k
        q = q / q.sum(axis=0, keepdims=True) / b
    return (q * b).T


class ReferenceDINO:
    """DINO / DINO-vMF loss with its centering state, written as loops over crop pairs."""

    def __init__(self, mode: str, num_prototypes: int, momentum: float = 0.9, iterations: int = 3):
        self.mode = mode
        self.m = momentum
        self.iterations = iterations
        self.center = np.zeros(num_prototypes) if mode == "logit" else np.full(num_prototypes, 1.0 / num_prototypes)

    def targets(self, l_t: np.ndarray, tau_t: float) -> np.ndarray:
        if self.mode == "logit":
            return softmax((l_t * tau_t - self.center) / tau_t)
        if self.mode == "probability":
            return softmax(l_t - np.log(self.center))
        if self.mode == "sinkhorn":
            return sinkhorn(l_t, self.iterations)
        return softmax(l_t)

    def update(self, l_t: np.ndarray, tau_t: float) -> None:
        if self.mode == "logit":
            self.center = self.m * self.center + (1 - self.m) * (l_t * tau_t).mean(axis=0)
        elif self.mode == "probability":
            self.center = self.m * self.center + (1 - self.m) * softmax(l_t).mean(axis=0)

    def __call__(self, s_scores, t_scores, tau_s, tau_t, s_norms=None, t_norms=None, p=32):
        n_global = len(t_scores)
        l_t = logits(np.concatenate(t_scores), tau_t, t_norms, p)
        targets = np.split(self.targets(l_t, tau_t), n_global)
        total, pairs = 0.0, 0
        for i in range(n_global):
            for j, s in enumerate(s_scores):
                if i == j:
                    continue
                log_p = np.log(softmax(logits(s, tau_s, s_norms, p)))
                total += np.mean(np.sum(-targets[i] * log_p, axis=1))
                pairs += 1
        self.update(l_t, tau_t)
        return total / pairs
