"""The von Mises-Fisher log-normaliser log C_p(kappa) and its derivative.

log C_p(kappa) = nu log kappa - (p/2) log(2 pi) - log I_nu(kappa),  nu = p/2 - 1.

I_nu overflows or underflows float64 for ordinary kappa at p = 256, so everything
is computed in log space. For p >= ``DEBYE_MIN_DIM`` we use the uniform asymptotic
(Debye) expansion of I_nu (Abramowitz & Stegun 9.7.7) with five correction terms,
whose log-kappa terms cancel analytically, so it is finite and smooth at kappa -> 0.
Below that, the expansion is not accurate enough and scipy's exponentially scaled
Bessel function is used in float64 (the "exact path").

The backward pass is the closed form d log C_p / d kappa = -A_p(kappa), with
A_p = I_(p/2) / I_(p/2 - 1) the Bessel ratio, not autograd through the series.
See docs/objective.md, section 3.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.special
import torch
from torch import Tensor

DEBYE_MIN_DIM = 16
"""Smallest dimension p served by the asymptotic expansion; below it, scipy."""

_LOG_2PI = math.log(2.0 * math.pi)
_SMALL_KAPPA = 1e-8  # below this the exact path uses the two-term power series


def _debye_polynomials(t: Tensor) -> tuple[Tensor, ...]:
    """u_1..u_5 of the uniform asymptotic expansion (DLMF 10.41.10), in Horner form."""
    t2 = t * t
    u1 = t * (3.0 - 5.0 * t2) / 24.0
    u2 = t2 * (81.0 + t2 * (-462.0 + t2 * 385.0)) / 1152.0
    u3 = t * t2 * (30375.0 + t2 * (-369603.0 + t2 * (765765.0 - t2 * 425425.0))) / 414720.0
    u4 = (
        t2
        * t2
        * (4465125.0 + t2 * (-94121676.0 + t2 * (349922430.0 + t2 * (-446185740.0 + t2 * 185910725.0))))
        / 39813120.0
    )
    u5 = (
        t
        * t2
        * t2
        * (
            59535.0 / 262144.0
            + t2
            * (
                -67608983.0 / 9175040.0
                + t2
                * (
                    250881631.0 / 5898240.0
                    + t2 * (-108313205.0 / 1179648.0 + t2 * (5391411025.0 / 63700992.0 - t2 * 5391411025.0 / 191102976.0))
                )
            )
        )
    )
    return u1, u2, u3, u4, u5


def _log_bessel_i_minus_nu_log_kappa(kappa: Tensor, nu: float) -> Tensor:
    """log I_nu(kappa) - nu log(kappa), by the Debye expansion (nu >= 7).

    Subtracting nu log kappa analytically keeps the result finite at kappa = 0.
    """
    s = torch.sqrt(nu * nu + kappa * kappa)
    t = nu / s
    u1, u2, u3, u4, u5 = _debye_polynomials(t)
    series = 1.0 + (u1 + (u2 + (u3 + (u4 + u5 / nu) / nu) / nu) / nu) / nu
    return s - nu * torch.log(nu + s) - 0.5 * torch.log(s) - 0.5 * _LOG_2PI + torch.log(series)


def _log_normalizer_debye(kappa: Tensor, dim: int) -> Tensor:
    nu = dim / 2.0 - 1.0
    return -_log_bessel_i_minus_nu_log_kappa(kappa, nu) - (dim / 2.0) * _LOG_2PI


def _bessel_ratio_debye(kappa: Tensor, dim: int) -> Tensor:
    """A_p = exp(log I_(nu+1) - log I_nu); the (nu+1) log kappa - nu log kappa = log kappa."""
    nu = dim / 2.0 - 1.0
    diff = _log_bessel_i_minus_nu_log_kappa(kappa, nu + 1.0) - _log_bessel_i_minus_nu_log_kappa(kappa, nu)
    return torch.exp(diff + torch.log(kappa))


def _log_normalizer_exact_np(kappa: np.ndarray, dim: int) -> np.ndarray:
    nu = dim / 2.0 - 1.0
    small = kappa < _SMALL_KAPPA
    k = np.where(small, 1.0, kappa)
    with np.errstate(divide="ignore"):
        exact = nu * np.log(k) - (dim / 2.0) * _LOG_2PI - (np.log(scipy.special.ive(nu, k)) + k)
    # log I_nu(k) = nu log(k/2) - lgamma(nu + 1) + k^2 / (4 (nu + 1)) + O(k^4)
    series = nu * math.log(2.0) + scipy.special.gammaln(nu + 1.0) - (dim / 2.0) * _LOG_2PI
    series = series - kappa * kappa / (4.0 * (nu + 1.0))
    return np.where(small, series, exact)


def _bessel_ratio_exact_np(kappa: np.ndarray, dim: int) -> np.ndarray:
    nu = dim / 2.0 - 1.0
    small = kappa < _SMALL_KAPPA
    k = np.where(small, 1.0, kappa)
    exact = scipy.special.ive(nu + 1.0, k) / scipy.special.ive(nu, k)
    return np.where(small, kappa / dim, exact)


def _compute_dtype(x: Tensor) -> torch.dtype:
    """float64 wherever the device has it: the elementwise cost is negligible next to the logits."""
    return torch.float32 if x.device.type == "mps" else torch.float64


def _to_numpy64(x: Tensor) -> np.ndarray:
    return x.detach().to("cpu", torch.float64).numpy()


def _from_numpy(a: np.ndarray, like: Tensor) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).to(device=like.device, dtype=like.dtype)


def _check(kappa: Tensor, dim: int) -> None:
    if not isinstance(dim, int) or dim < 2:
        raise ValueError(f"vMF dimension p must be an integer >= 2 (the sphere S^(p-1)), got {dim!r}")
    if not torch.is_floating_point(kappa):
        raise TypeError(f"kappa must be a floating-point tensor, got {kappa.dtype}")


def bessel_ratio(kappa: Tensor, dim: int) -> Tensor:
    """A_p(kappa) = I_(p/2)(kappa) / I_(p/2-1)(kappa), in (0, 1); the mean resultant length.

    Differentiable for p >= 16 (autograd through the expansion); plain values below.
    """
    _check(kappa, dim)
    if dim >= DEBYE_MIN_DIM:
        k = kappa.to(_compute_dtype(kappa))
        return _bessel_ratio_debye(k.clamp_min(0.0), dim).to(kappa.dtype)
    return _from_numpy(_bessel_ratio_exact_np(np.maximum(_to_numpy64(kappa), 0.0), dim), kappa)


class _LogVMFNormalizer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kappa: Tensor, dim: int) -> Tensor:  # type: ignore[override]
        ctx.dim = dim
        ctx.save_for_backward(kappa)
        if dim >= DEBYE_MIN_DIM:
            k = kappa.to(_compute_dtype(kappa)).clamp_min(0.0)
            return _log_normalizer_debye(k, dim).to(kappa.dtype)
        return _from_numpy(_log_normalizer_exact_np(np.maximum(_to_numpy64(kappa), 0.0), dim), kappa)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (kappa,) = ctx.saved_tensors
        return -grad_output * bessel_ratio(kappa, ctx.dim), None


def log_vmf_normalizer(kappa: Tensor, dim: int) -> Tensor:
    """Exact log C_p(kappa) of the vMF density on S^(p-1), constants included, elementwise.

    Returned in kappa's dtype; its gradient is -A_p(kappa) (see ``bessel_ratio``).
    Accurate to 1e-6 absolute in float64 for p >= 16 and kappa up to 1e5 and beyond.
    """
    _check(kappa, dim)
    return _LogVMFNormalizer.apply(kappa, dim)


def vmf_correction(prototype_norms: Tensor, temperature: float, dim: int) -> Tensor:
    """log C_p(||w_k|| / tau) per prototype, shape (K,), in float32 at least.

    The constant part is dropped (shifted so the largest entry is 0): it cancels in
    every softmax and would cost precision in low precision (|log C_p| ~ 344 at p = 256).
    The shift happens in float64 before the cast, so the differences between prototypes,
    the part that matters (about 1 nat), keep float64's accuracy rather than float32's
    rounding of 344 (about 1.5e-5 nat). Compute it once per network and step and add it to
    every crop's logits.
    """
    out_dtype = torch.promote_types(prototype_norms.dtype, torch.float32)
    kappa = prototype_norms.to(_compute_dtype(prototype_norms)) / temperature
    correction = log_vmf_normalizer(kappa, dim)
    return (correction - correction.detach().max()).to(out_dtype)


def vmf_logits(scores: Tensor, prototype_norms: Tensor, temperature: float, dim: int) -> Tensor:
    """DINO-vMF logits l_k = w_k . y / tau + log C_p(||w_k|| / tau)  (docs/objective.md section 3).

    ``scores`` are the raw prototype scores w_k . y, shape (..., K); ``prototype_norms``
    is ||w_k||, shape (K,). Up to a constant that cancels in the softmax.
    """
    correction = vmf_correction(prototype_norms, temperature, dim)
    return scores.to(torch.promote_types(scores.dtype, correction.dtype)) / temperature + correction
