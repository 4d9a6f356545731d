"""log C_p(kappa) and A_p(kappa) against a 30-digit mpmath reference (scipy's ive where the series is slow)."""

import functools
import math

import mpmath as mp
import numpy as np
import pytest
import scipy.special
import torch

from raydino.objectives.vmf import (
    DEBYE_MIN_DIM,
    _log_normalizer_debye,
    bessel_ratio,
    log_vmf_normalizer,
    vmf_correction,
    vmf_logits,
)

mp.mp.dps = 30
KAPPAS = np.logspace(-3, 5, 33)


# mpmath sums I_nu's power series, whose largest terms sit near term kappa / 2: at p = 4096 and kappa = 1e5 that
# took 6.5 s per value (13 s of the fast tier). Past SERIES_MAX_KAPPA the reference is scipy's exponentially
# scaled ive (Amos' algorithm, float64), which test_the_two_references_agree checks against mpmath where both run.
SERIES_MAX_KAPPA = 2e4


def mpmath_besseli(twice_nu: int, kappa: float) -> mp.mpf:
    return mp.besseli(mp.mpf(twice_nu) / 2, mp.mpf(kappa), maxterms=10**6)


def scipy_besseli(twice_nu: int, kappa: float) -> mp.mpf:
    scaled = scipy.special.ive(twice_nu / 2, kappa)  # I_nu(kappa) e^-kappa: no overflow at kappa = 1e5
    assert 0 < scaled < math.inf, f"ive({twice_nu / 2}, {kappa}) = {scaled}: outside float64, use mpmath here"
    return mp.mpf(scaled) * mp.exp(mp.mpf(kappa))


@functools.cache
def ref_besseli(twice_nu: int, kappa: float) -> mp.mpf:
    """I_nu(kappa) for nu = twice_nu / 2: mpmath to 30 digits, scipy past SERIES_MAX_KAPPA; each value once per session."""
    return mpmath_besseli(twice_nu, kappa) if kappa <= SERIES_MAX_KAPPA else scipy_besseli(twice_nu, kappa)


def ref_log_c(kappa: float, p: int) -> float:
    nu = mp.mpf(p) / 2 - 1
    k = mp.mpf(kappa)
    return float(nu * mp.log(k) - mp.mpf(p) / 2 * mp.log(2 * mp.pi) - mp.log(ref_besseli(p - 2, kappa)))


def ref_ratio(kappa: float, p: int) -> float:
    return float(ref_besseli(p, kappa) / ref_besseli(p - 2, kappa))


@pytest.mark.parametrize(("twice_nu", "kappa"), [(4094, 1e4), (4096, 2e4), (254, 1e3), (30, 50.0)])
def test_the_two_references_agree(twice_nu, kappa):
    """scipy's ive stands in for mpmath past SERIES_MAX_KAPPA: at large orders and arguments where both run
    they agree far within the 1e-6 the tests below allow."""
    assert abs(float(mp.log(scipy_besseli(twice_nu, kappa)) - mp.log(mpmath_besseli(twice_nu, kappa)))) < 1e-9


@pytest.mark.parametrize("p", [2, 3, 5, 8, 15, 16, 17, 32, 64, 256, 768, 4096])
def test_log_normalizer_matches_mpmath(p):
    kappas = KAPPAS if p < 1000 else KAPPAS[::4]
    expected = np.array([ref_log_c(k, p) for k in kappas])
    got = log_vmf_normalizer(torch.tensor(kappas, dtype=torch.float64), p).numpy()
    assert np.abs(got - expected).max() <= 1e-6


@pytest.mark.parametrize("p", [3, 15, 16, 64, 256, 4096])
def test_derivative_is_minus_bessel_ratio(p):
    kappas = KAPPAS if p < 1000 else KAPPAS[::4]
    k = torch.tensor(kappas, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(log_vmf_normalizer(k, p).sum(), k)
    expected = np.array([ref_ratio(x, p) for x in kappas])
    np.testing.assert_allclose(-grad.numpy(), expected, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(bessel_ratio(k.detach(), p).numpy(), expected, rtol=1e-6, atol=1e-9)


def test_closed_form_on_the_two_sphere():
    # p = 3: C_3(k) = k / (4 pi sinh k), an independent check of the exact path
    k = torch.tensor([1e-3, 0.5, 2.0, 10.0, 50.0], dtype=torch.float64)
    expected = torch.log(k) - math.log(4 * math.pi) - torch.log(torch.sinh(k))
    torch.testing.assert_close(log_vmf_normalizer(k, 3), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("p", [4, 16, 256])
def test_zero_kappa_is_uniform_density_on_sphere(p):
    # C_p(0) = 1 / area(S^(p-1)) = Gamma(p/2) / (2 pi^(p/2))
    expected = math.lgamma(p / 2) - math.log(2) - (p / 2) * math.log(math.pi)
    got = log_vmf_normalizer(torch.zeros(1, dtype=torch.float64), p).item()
    assert abs(got - expected) < 1e-6


@pytest.mark.parametrize("p", [5, 16, 256])
def test_gradcheck_float64(p):
    k = torch.tensor([1e-2, 0.7, 3.0, 40.0, 900.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: log_vmf_normalizer(x, p), (k,))


@pytest.mark.parametrize("p", [4, 16, 256, 4096])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_decreasing_and_finite_over_the_whole_range(p, dtype):
    k = torch.logspace(-3, 5, 2000, dtype=dtype).requires_grad_(True)
    values = log_vmf_normalizer(k, p)
    (grad,) = torch.autograd.grad(values.sum(), k)
    assert values.dtype == dtype
    assert torch.isfinite(values).all() and torch.isfinite(grad).all()
    assert (grad < 0).all()
    # non-increasing everywhere; strictly where the step k dk / p exceeds one ulp (kappa > sqrt(p))
    assert (values.double().diff() <= 0).all()
    assert (values.double()[k.detach() > math.sqrt(p)].diff() < 0).all()
    ratio = bessel_ratio(k.detach(), p)
    assert ((ratio > 0) & (ratio < 1)).all()


@pytest.mark.parametrize("p", [8, 16, 256])
def test_float32_within_rounding_of_float64(p):
    k64 = torch.logspace(-3, 5, 500, dtype=torch.float64)
    v64 = log_vmf_normalizer(k64, p)
    v32 = log_vmf_normalizer(k64.float(), p).double()
    # the float32 input is itself rounded: allow that propagation plus one float32 ulp of the result
    input_err = bessel_ratio(k64, p) * (k64 - k64.float().double()).abs()
    ulp = torch.finfo(torch.float32).eps * v64.abs()
    assert ((v32 - v64).abs() <= input_err + ulp + 1e-6).all()


def test_small_kappa_behaviour_matches_penalty_form():
    # docs/objective.md: log C_p(k) ~ const - k^2 / (2p) for k << p
    p = 256
    k = torch.tensor([0.0, 1.0, 4.0], dtype=torch.float64)
    v = log_vmf_normalizer(k, p)
    np.testing.assert_allclose((v[0] - v[1:]).numpy(), (k[1:] ** 2 / (2 * p)).numpy(), rtol=1e-2)


def test_rejects_bad_dimension():
    with pytest.raises(ValueError, match="p must be an integer >= 2"):
        log_vmf_normalizer(torch.ones(2), 1)
    with pytest.raises(TypeError, match="floating-point"):
        log_vmf_normalizer(torch.ones(2, dtype=torch.int64), 16)


def test_vmf_logits_with_equal_norms_is_a_constant_shift():
    scores = torch.randn(4, 10)
    norms = torch.full((10,), 1.0)
    logits = vmf_logits(scores, norms, 0.1, 256)
    shift = logits - scores / 0.1
    assert torch.allclose(shift, shift[0, 0].expand_as(shift))


def test_vmf_logits_penalise_larger_norms():
    scores = torch.zeros(1, 2)
    logits = vmf_logits(scores, torch.tensor([1.0, 2.0]), 0.1, 256)
    assert logits[0, 0] > logits[0, 1]
    p = 256
    expected = log_vmf_normalizer(torch.tensor([20.0], dtype=torch.float64), p) - log_vmf_normalizer(
        torch.tensor([10.0], dtype=torch.float64), p
    )
    assert abs((logits[0, 1] - logits[0, 0]).item() - expected.item()) < 1e-4


def test_the_debye_threshold_sits_where_the_asymptotic_series_is_accurate():
    """From DEBYE_MIN_DIM up the Debye (uniform asymptotic) series serves log C_p; there it is within
    1e-6 nat of 30-digit mpmath from kappa 0.01 to 1e4. Far below (p = 4) the series is 1e-2 off, and
    the public function, which takes the exact path there, still matches mpmath."""
    kappas = [0.01, 0.1, 1.0, 5.0, 10.0, 100.0, 1000.0, 1e4]

    def exact(k: float, p: int) -> float:
        nu, k = mp.mpf(p) / 2 - 1, mp.mpf(k)
        return float(nu * mp.log(k) - mp.mpf(p) / 2 * mp.log(2 * mp.pi) - mp.log(mp.besseli(nu, k, maxterms=10**6)))

    def error(values: torch.Tensor, p: int) -> float:
        return max(abs(v - exact(k, p)) for v, k in zip(values.tolist(), kappas))

    k = torch.tensor(kappas, dtype=torch.float64)
    assert error(_log_normalizer_debye(k, DEBYE_MIN_DIM), DEBYE_MIN_DIM) < 1e-6
    assert error(_log_normalizer_debye(k, 4), 4) > 1e-3  # why the exact path serves small p
    assert DEBYE_MIN_DIM > 4 and error(log_vmf_normalizer(k, 4), 4) < 1e-9


def test_correction_differences_keep_float64_accuracy_in_float32():
    """The shift by the maximum happens before the cast: the float32 differences between
    prototypes (about 1 nat) are as accurate as float32 allows near 1, not near |log C_p| ~ 344."""
    p, temperature = 256, 0.1
    norms = torch.linspace(0.5, 2.0, 97, dtype=torch.float32)
    got = vmf_correction(norms, temperature, p)
    assert got.dtype == torch.float32
    nu = mp.mpf(p) / 2 - 1

    def exact(norm: float):  # log C_p at 30 digits, as an mpf (no float64 rounding before the difference)
        k = mp.mpf(norm) / mp.mpf(temperature)
        return nu * mp.log(k) - mp.mpf(p) / 2 * mp.log(2 * mp.pi) - mp.log(mp.besseli(nu, k, maxterms=10**6))

    values = [exact(n) for n in norms.double().tolist()]
    top = max(values)
    expected = torch.tensor([float(v - top) for v in values], dtype=torch.float64)
    # float32 spacing near the largest |difference| here (~9 nat) is 1e-6; the old cast-then-shift was 1.5e-5 off
    assert torch.max(torch.abs(got.double() - expected)).item() < 2e-6
