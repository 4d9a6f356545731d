import numpy as np
import pytest
import torch

from raydino.config.registry import CENTERING_MODES
from raydino.models import DINOHead
from raydino.objectives import DINOTerm, Temperatures, Views, scaled_logits, vmf_logits
from raydino.objectives.vmf import vmf_correction
from tests.reference import ReferenceDINO

K, P, B = 12, 32, 5


def DINOLoss(k, p, vmf=False, centering="logit"):
    term = DINOTerm(k, p, vmf=vmf, centering=centering)

    def loss(student, teacher, tau_s, tau_t, s_norms=None, t_norms=None):
        out = term(student=Views(student, s_norms), teacher=Views(teacher, t_norms), temps=Temperatures(tau_s, tau_t))
        term.commit()
        return out

    loss.term = term
    return loss


def _crops(n_global=2, n_local=3, scale=3.0):
    student = [torch.randn(B, K, dtype=torch.float64) * scale for _ in range(n_global + n_local)]
    teacher = [torch.randn(B, K, dtype=torch.float64) * scale for _ in range(n_global)]
    return student, teacher


@pytest.mark.parametrize("vmf", [False, True])
@pytest.mark.parametrize("mode", list(CENTERING_MODES))
def test_loss_matches_loop_reference_over_steps(mode, vmf):
    loss_fn = DINOLoss(K, P, vmf=vmf, centering=mode)
    ref = ReferenceDINO(mode, K)
    s_norms = torch.rand(K, dtype=torch.float64) + 0.5 if vmf else None
    t_norms = torch.rand(K, dtype=torch.float64) + 0.5 if vmf else None
    for step in range(3):  # several steps so that the centers have moved
        student, teacher = _crops()
        tau_t = 0.04 + 0.01 * step
        out = loss_fn(student, teacher, 0.1, tau_t, s_norms, t_norms)
        expected = ref(
            [s.numpy() for s in student],
            [t.numpy() for t in teacher],
            0.1,
            tau_t,
            None if s_norms is None else s_norms.numpy(),
            None if t_norms is None else t_norms.numpy(),
            P,
        )
        assert out.loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-6), f"step {step}"
    if mode in ("logit", "probability"):
        center = loss_fn.term.teacher.centering.center.squeeze(0).double().numpy()
        expected_center = ref.center
        if mode == "logit":  # the vMF constant is dropped: the logit center may differ by a constant
            center, expected_center = center - center.mean(), expected_center - expected_center.mean()
        np.testing.assert_allclose(center, expected_center, rtol=1e-5, atol=1e-7)


def test_loss_rejects_too_few_student_crops():
    student, teacher = _crops(n_local=0)
    with pytest.raises(ValueError, match="every teacher crop"):
        DINOLoss(K, P)(student[:1], teacher, 0.1, 0.04)


@pytest.mark.parametrize("mode", list(CENTERING_MODES))
def test_two_global_crops_only(mode):
    student, teacher = _crops(n_local=0)
    expected = ReferenceDINO(mode, K)([s.numpy() for s in student], [t.numpy() for t in teacher], 0.1, 0.04)
    assert DINOLoss(K, P, centering=mode)(student, teacher, 0.1, 0.04).loss.item() == pytest.approx(expected, rel=1e-5)


def test_vmf_needs_norms():
    student, teacher = _crops()
    with pytest.raises(ValueError, match="prototype norms"):
        DINOLoss(K, P, vmf=True)(student, teacher, 0.1, 0.04)


@pytest.mark.parametrize("mode", ["logit", "probability", "none"])
def test_vmf_equals_dino_with_normalised_prototypes(mode):
    head = DINOHead(16, num_prototypes=64, hidden_dim=32, bottleneck_dim=P, norm_last_layer=True)
    x = torch.randn(6 * B, 16)
    scores = list(head(x).chunk(6))
    norms = head.prototype_norms()
    for tau in (0.1, 0.04):  # student and teacher temperatures
        for s in scores:
            dino = torch.softmax(scaled_logits(s, tau), dim=-1)
            vmf = torch.softmax(scaled_logits(s, tau, vmf_correction(norms, tau, P)), dim=-1)
            torch.testing.assert_close(vmf, dino, rtol=1e-6, atol=1e-7)
    losses = []
    for vmf in (False, True):
        loss_fn = DINOLoss(64, P, vmf=vmf, centering=mode)
        for _ in range(2):
            out = loss_fn(scores, scores[:2], 0.1, 0.04, norms, norms.detach())
        losses.append(out.loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_vmf_gradient_reaches_norms_but_not_directions():
    head = DINOHead(16, num_prototypes=64, hidden_dim=32, bottleneck_dim=P, norm_last_layer=False)
    with torch.no_grad():
        head.prototype_gain.mul_(torch.rand(64, 1) + 0.5)
    z = head(torch.randn(B, 16)).detach()
    vmf_logits(z, head.prototype_norms(), 0.1, P).sum().backward()
    direction = head.last_layer.parametrizations.weight.original1
    assert direction.grad is None or torch.count_nonzero(direction.grad) == 0
    assert torch.count_nonzero(head.prototype_gain.grad) == 64


def test_diagnostics():
    loss_fn = DINOLoss(K, P, centering="none")
    student, _ = _crops()
    uniform_teacher = [torch.zeros(B, K), torch.zeros(B, K)]
    out = loss_fn([s.float() for s in student], uniform_teacher, 0.1, 0.04)
    assert out.metrics["teacher_entropy"].item() == pytest.approx(np.log(K), rel=1e-5)
    assert out.metrics["mean_target_entropy"].item() == pytest.approx(np.log(K), rel=1e-5)
    collapsed = [torch.zeros(B, K), torch.zeros(B, K)]
    collapsed[0][:, 0] = collapsed[1][:, 0] = 100.0
    out = loss_fn([s.float() for s in student], collapsed, 0.1, 0.04)
    assert out.metrics["teacher_entropy"].item() < 1e-3 and out.metrics["mean_target_entropy"].item() < 1e-3
    assert "center_norm" not in out.metrics
