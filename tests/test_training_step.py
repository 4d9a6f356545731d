import copy

import pytest
import torch

from raydino.config import load_config
from raydino.models import normalize_crops
from raydino.objectives import Temperatures, Views, build_objective
from raydino.step import (
    DINOStep,
    NonFiniteGuard,
    NonFiniteLossError,
    TrainingDiverged,
    build_models,
    build_optimizer,
)
from tests.tiny import TINY_NET

TINY = [
    *TINY_NET,
    "data.crops.local_number=4",
    "optim.epochs=5",
    "optim.warmup_epochs=1",
    "loss.warmup_teacher_temp_epochs=1",
]


def _setup(*overrides):
    cfg = load_config(overrides=TINY + list(overrides))
    student, teacher = build_models(cfg)
    step = DINOStep(cfg, student, student, teacher, build_objective(cfg), build_optimizer(cfg, student),
                    torch.device("cpu"))
    return cfg, student, teacher, step


def _random_crops(batch=4):
    crops = [torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8) for _ in range(2)]
    crops += [torch.randint(0, 256, (batch, 3, 16, 16), dtype=torch.uint8) for _ in range(4)]
    return normalize_crops(crops, "cpu")


def test_five_vmf_steps_with_unnormalised_prototypes():
    cfg, student, teacher, step_fn = _setup("loss.vmf=true", "head.norm_last_layer=false", "optim.freeze_last_layer_epochs=0")
    assert cfg.loss.vmf and student.head.prototype_gain.requires_grad
    gain_before = student.head.prototype_gain.detach().clone()
    for step in range(5):
        teacher_before = copy.deepcopy(teacher)
        metrics = step_fn(_random_crops(), step, 5)
        assert torch.isfinite(torch.tensor(metrics["loss"]))
        gain_grad = student.head.prototype_gain.grad
        assert gain_grad is not None and torch.count_nonzero(gain_grad) > 0
        m = metrics["teacher_momentum"]
        assert cfg.optim.momentum_teacher <= m < 1.0
        for (name, t), s, b in zip(teacher.named_parameters(), student.parameters(), teacher_before.parameters()):
            assert t.grad is None, name
            torch.testing.assert_close(t, m * b + (1 - m) * s, msg=name)
    assert not torch.equal(student.head.prototype_gain, gain_before)


def test_last_layer_is_frozen_during_the_first_epoch():
    _, student, _, step_fn = _setup("optim.freeze_last_layer_epochs=1", "head.norm_last_layer=false")
    last = [p.detach().clone() for p in student.head.last_layer.parameters()]
    mlp = student.head.mlp[0].weight.detach().clone()
    step_fn(_random_crops(), 1, 10)  # epoch 1 of 5 covers steps 0 and 1; lr > 0 at step 1
    for before, after in zip(last, student.head.last_layer.parameters()):
        assert torch.equal(before, after)
    assert not torch.equal(mlp, student.head.mlp[0].weight)
    step_fn(_random_crops(), 2, 10)
    assert any(not torch.equal(b, a) for b, a in zip(last, student.head.last_layer.parameters()))


def test_nan_loss_stops_with_the_step_named():
    _, student, _, step_fn = _setup()
    before = [p.detach().clone() for p in student.parameters()]
    crops = _random_crops()
    crops[3][0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="loss is nan at step 3"):
        step_fn(crops, 3, 5)
    for b, a in zip(before, student.parameters()):
        assert torch.equal(b, a)


def test_normalize_crops_expands_grayscale():
    out = normalize_crops([torch.full((2, 1, 8, 8), 255, dtype=torch.uint8)], "cpu")[0]
    assert out.shape == (2, 3, 8, 8) and out.dtype == torch.float32
    torch.testing.assert_close(out[0, :, 0, 0], (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225]))


def test_bf16_autocast_outputs_are_scored_in_float32():
    """The GPU path (bf16 autocast around the networks, loss and vMF correction outside it), on CPU's autocast."""
    cfg, student, teacher, _ = _setup("loss.vmf=true", "head.norm_last_layer=false")
    crops = _random_crops()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s_out = student(crops, return_features=True)  # the preset's KoLeo term reads them
        with torch.no_grad():
            t_out = teacher(crops[:2])
    student_scores, student_norms, teacher_scores, teacher_norms = s_out.scores, s_out.norms, t_out.scores, t_out.norms
    assert all(s.dtype == torch.bfloat16 for s in student_scores), "autocast must reach the head for this test to mean"
    temps = Temperatures(0.1, 0.04)
    out = build_objective(cfg)(student=s_out, teacher=t_out, temps=temps)
    assert out.loss.dtype == torch.float32
    upcast = build_objective(cfg)(
        student=Views([s.float() for s in student_scores], student_norms.float(), [f.float() for f in s_out.features]),
        teacher=Views([t.float() for t in teacher_scores], teacher_norms.float()), temps=temps,
    )
    assert out.loss.item() == pytest.approx(upcast.loss.item(), rel=1e-6)
    out.loss.backward()
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert student.head.prototype_gain.grad is not None, "the vMF correction must reach the prototype norms"


@pytest.mark.parametrize("centering", ["logit", "probability"])
def test_a_nonfinite_step_leaves_the_center_untouched(centering):
    """The center absorbs a batch only once the loss is known finite: a skipped step leaves no NaN behind."""
    _, _, _, step_fn = _setup(f"loss.centering={centering}")
    step_fn(_random_crops(), 0, 5)
    center = step_fn.objective.terms['cls'].teacher.centering.center.clone()
    crops = _random_crops()
    crops[0][0, 0, 0, 0] = float("nan")  # a teacher crop: NaN teacher logits
    with pytest.raises(NonFiniteLossError):
        step_fn(crops, 1, 5)
    assert torch.equal(step_fn.objective.terms['cls'].teacher.centering.center, center)
    assert torch.isfinite(torch.tensor(step_fn(_random_crops(), 2, 5)["loss"]))


def test_nonfinite_guard_policies():
    exc = NonFiniteLossError(4, float("nan"))
    with pytest.raises(TrainingDiverged, match="loss is nan at step 4.*Last good checkpoint: step 2"):
        NonFiniteGuard("stop", 3).nonfinite(exc, "step 2")
    guard = NonFiniteGuard("skip", 3)
    guard.nonfinite(exc, "step 2")
    guard.nonfinite(exc, "step 2")
    guard.finite()  # a good step resets the run of bad ones, not the total
    guard.nonfinite(exc, "step 2")
    guard.nonfinite(exc, "step 2")
    with pytest.raises(TrainingDiverged, match=r"3 non-finite losses in a row .*5 skipped in all"):
        guard.nonfinite(exc, "step 2")


def test_build_seeds_identical_weights():
    cfg = load_config(overrides=TINY)
    a, b = DINOStep.build(cfg, torch.device("cpu")), DINOStep.build(cfg, torch.device("cpu"))
    for (name, x), y in zip(a.student_module.state_dict().items(), b.teacher.state_dict().values()):
        assert torch.equal(x, y), name


def test_adamw_uses_the_multi_tensor_kernel_off_cuda():
    cfg = load_config(overrides=TINY_NET)
    student, _ = build_models(cfg)
    optimizer = build_optimizer(cfg, student)
    assert optimizer.defaults["foreach"] is True and not optimizer.defaults.get("fused")


@pytest.mark.slow  # about a minute of compiling on 2 cores
@pytest.mark.timeout(600)
def test_compiled_step_matches_eager():
    """optim.compile: the same two steps (loss, student weights) as eager, within float tolerance."""
    results = []
    for compiled in (False, True):
        cfg = load_config(overrides=[*TINY, f"optim.compile={str(compiled).lower()}", "optim.freeze_last_layer_epochs=0"])
        step_fn = DINOStep.build(cfg, torch.device("cpu"))
        torch.manual_seed(1)
        losses = [step_fn(_random_crops(), step, 5)["loss"] for step in range(2)]
        results.append((losses, {k: v.detach().clone() for k, v in step_fn.student_module.state_dict().items()}))
    (eager_losses, eager_weights), (compiled_losses, compiled_weights) = results
    assert compiled_weights.keys() == eager_weights.keys()  # in-place compile: checkpoints keep their names
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4)
    for name, value in eager_weights.items():
        torch.testing.assert_close(compiled_weights[name], value, rtol=1e-3, atol=1e-5, msg=name)
