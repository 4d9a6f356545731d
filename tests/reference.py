"""Straightforward re-derivations of docs/objective.md, in float64 numpy/scipy, for the tests."""

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


class NumpyAsPythonRandom:
    """Python's ``random`` module calls that iBOT's mask generator makes, answered from a numpy
    generator with CPython's formulas, so a transcription and raydino can be fed the same numbers."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng

    def uniform(self, a: float, b: float) -> float:
        return a + (b - a) * self.rng.random()  # CPython: a + (b - a) * random()

    def randint(self, a: int, b: int) -> int:
        return int(self.rng.integers(a, b + 1))  # inclusive upper bound


def ibot_block_mask(H: int, W: int, high: float, log_aspect_ratio: tuple, random) -> np.ndarray:
    """iBOT's ``ImageFolderMask.__getitem__`` block branch (github.com/bytedance/ibot, loader.py),
    transcribed line for line; ``high`` is ``pred_ratio * H * W``."""
    import math

    mask = np.zeros((H, W), dtype=bool)
    mask_count = 0
    while mask_count < high:
        max_mask_patches = high - mask_count

        delta = 0
        for attempt in range(10):
            low = (min(H, W) // 3) ** 2
            target_area = random.uniform(low, max_mask_patches)
            aspect_ratio = math.exp(random.uniform(*log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))  # noqa: RUF046 - verbatim
            w = int(round(math.sqrt(target_area / aspect_ratio)))  # noqa: RUF046 - verbatim
            if w < W and h < H:
                top = random.randint(0, H - h)
                left = random.randint(0, W - w)

                num_masked = mask[top: top + h, left: left + w].sum()
                if 0 < h * w - num_masked <= max_mask_patches:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if mask[i, j] == 0:
                                mask[i, j] = 1
                                delta += 1

            if delta > 0:
                break

        if delta == 0:
            break
        else:
            mask_count += delta
    return mask


def dino_clip_gradients(model, clip: float) -> list:
    """DINO's ``utils.clip_gradients`` (github.com/facebookresearch/dino, utils.py), verbatim."""
    norms = []
    for name, p in model.named_parameters():
        if p.grad is not None:
            param_norm = p.grad.data.norm(2)
            norms.append(param_norm.item())
            clip_coef = clip / (param_norm + 1e-6)
            if clip_coef < 1:
                p.grad.data.mul_(clip_coef)
    return norms
