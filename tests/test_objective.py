"""One loss interface: every term has the same keyword call shape, the objective weights and sums
them in one place, a new term needs no edit to the step, and a whole step's loss and gradients
equal the loss assembled by hand from its formulas."""

import inspect
import math

import pytest
import torch

from raydino.config import load_config
from raydino.models import normalize_crops
from raydino.objectives import LOSS_TERMS, LossTerm, Objective, Temperatures, TermOutput, build_objective
from raydino.objectives.objective import TermSpec
from raydino.objectives.vmf import vmf_correction
from raydino.step import DINOStep

TINY = [
    "model.kwargs={patch_size: 4, embed_dim: 32, depth: 2, num_heads: 2, qkv_bias: false}", "model.drop_path_rate=0",
    "head.num_prototypes=48", "head.hidden_dim=32", "head.bottleneck_dim=16", "data.crops.local_number=2",
    "optim.freeze_last_layer_epochs=0", "head.norm_last_layer=false", "loss.koleo_weight=0", "optim.epochs=2",
    "mask.unmasked_share=0.25",
]


def _crops(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    views = [torch.randint(0, 256, (4, 3, 16, 16), generator=g, dtype=torch.uint8) for _ in range(2)]
    views += [torch.randint(0, 256, (4, 3, 8, 8), generator=g, dtype=torch.uint8) for _ in range(2)]
    return [c.double() for c in normalize_crops(views, "cpu")]


def _by_hand(cfg, student, teacher, masks, tau_s, tau_t, tau_tp):
    """The loss as written in docs/objective.md, term by term, for a fresh center (logit: 0,
    probability: uniform usage), with explicit loops over crop pairs and positions."""
    p = cfg.head.bottleneck_dim

    def logits(scores, norms, tau):
        return scores / tau + (vmf_correction(norms, tau, p) if cfg.loss.vmf else 0.0)

    def targets(scores, norms, tau, mode):
        l_t = logits(scores, norms, tau)
        if mode == "probability":  # softmax(l - log c) with c = 1/K
            return torch.softmax(l_t + math.log(l_t.shape[-1]), dim=-1)
        assert mode == "logit"
        return torch.softmax(l_t, dim=-1)

    q = [targets(t, teacher.norms, tau_t, cfg.loss.centering) for t in teacher.scores]
    cls, pairs = 0.0, 0
    for i, qi in enumerate(q):
        for j, s in enumerate(student.scores):
            if i != j:
                cls = cls - (qi * torch.log_softmax(logits(s, student.norms, tau_s), -1)).sum(-1).mean()
                pairs += 1
    total = (cfg.loss.lambda1 if cfg.loss.method == "ibot" else 1.0) * cls / pairs
    if cfg.loss.method == "ibot":
        patch = 0.0
        for tp, sp, m in zip(teacher.patch_scores, student.patch_scores, masks):
            qp = targets(tp, teacher.patch_norms, tau_tp, cfg.loss.patch_centering)
            log_p = torch.log_softmax(logits(sp, student.patch_norms, tau_s), -1)
            per_image = []
            for b in range(len(m)):
                positions = m[b].flatten().nonzero().flatten()
                h = -(qp[b, positions] * log_p[b, positions]).sum(-1)
                per_image.append(h.mean() if len(positions) else h.sum())
            patch = patch + torch.stack(per_image).mean()
        total = total + cfg.loss.lambda2 * patch / len(masks)
    if cfg.loss.koleo_weight:
        for f in student.features[:2]:
            x = torch.nn.functional.normalize(f, dim=-1, eps=1e-8)
            d = torch.cdist(x, x) + torch.eye(len(x)) * 10
            nn_index = d.argmin(1)
            total = total + cfg.loss.koleo_weight * -torch.log((x - x[nn_index] + 1e-8).norm(dim=-1) + 1e-8).mean()
    return total


@pytest.mark.parametrize("overrides", [
    ["loss.vmf=false", "head.norm_last_layer=true"],
    ["loss.vmf=true", "loss.koleo_weight=0.5"],
    ["loss.method=ibot", "loss.vmf=true", "loss.koleo_weight=0.3", "loss.lambda1=0.8", "loss.lambda2=0.6"],
    ["loss.method=ibot", "loss.vmf=false", "head.patch_prototypes=separate", "head.num_patch_prototypes=40"],
])
def test_a_whole_step_equals_the_loss_assembled_by_hand(overrides):
    cfg = load_config(overrides=[*TINY, *overrides])
    step = DINOStep.build(cfg, torch.device("cpu"))
    step.student_module.double(), step.teacher.double(), step.objective.double()
    crops = _crops()
    masks = step.masks(crops, 0)
    values = step.schedules.at(0, 10)
    params = [p for p in step.student_module.parameters() if p.requires_grad]
    out = step._loss(crops, masks, values)
    grads = torch.autograd.grad(out.loss, params, allow_unused=True)
    needs = step.objective.needs
    student = step.student_module(crops, masks=masks, return_features="features" in needs,
                                  return_patches="patches" in needs)
    with torch.no_grad():
        teacher = step.teacher(crops[:2], return_patches="patches" in needs)
    want = _by_hand(cfg, student, teacher, masks, cfg.loss.student_temp, values.teacher_temp, values.teacher_patch_temp)
    want_grads = torch.autograd.grad(want, params, allow_unused=True)
    # to rounding: the probability center starts at float32(1/K), the by-hand loss at exactly 1/K
    torch.testing.assert_close(out.loss, want, rtol=1e-7, atol=1e-12)
    for g, w in zip(grads, want_grads):
        assert (g is None) == (w is None)
        if g is not None:
            assert float((g - w).norm()) <= 1e-6 * float(w.norm()) + 1e-12  # relative to the tensor's norm
    assert set(out.parts) == {"cls"} | ({"patch"} if cfg.loss.method == "ibot" else set()) | (
        {"koleo"} if cfg.loss.koleo_weight else set())


def test_every_term_takes_the_same_keyword_only_call():
    cfg = load_config(overrides=[*TINY, "loss.method=ibot", "loss.koleo_weight=0.1"])
    objective = build_objective(cfg)
    assert set(objective.terms) == set(LOSS_TERMS)
    for term in objective.terms.values():
        params = inspect.signature(term.forward).parameters.values()
        assert [p.name for p in params] == ["student", "teacher", "temps", "masks"]
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params)


class _FeatureNorm(LossTerm):
    """A made-up term for the test: the mean squared norm of the student's global-crop features."""

    needs = frozenset({"features"})

    def forward(self, *, student, teacher, temps, masks=None):
        loss = sum(f.pow(2).sum(-1).mean() for f in student.features[: len(teacher.scores)])
        return TermOutput(loss, {"feature_norm_metric": loss.detach()})


def test_a_new_term_is_one_registry_entry_and_no_step_edit(monkeypatch):
    monkeypatch.setitem(LOSS_TERMS, "feature_norm", TermSpec(lambda cfg: _FeatureNorm(), lambda cfg: 0.25))
    cfg = load_config(overrides=TINY)
    step = DINOStep.build(cfg, torch.device("cpu"))
    metrics = step([c.float() for c in _crops(1)], 0, 10)
    assert metrics["loss"] == pytest.approx(metrics["cls_loss"] + 0.25 * metrics["feature_norm_loss"], rel=1e-6)
    assert metrics["feature_norm_metric"] == pytest.approx(metrics["feature_norm_loss"], rel=1e-6)


def test_a_zero_weight_switches_a_term_off_and_the_networks_return_only_what_terms_need():
    plain = build_objective(load_config(overrides=TINY))
    assert set(plain.terms) == {"cls"} and plain.needs == frozenset()
    ibot = build_objective(load_config(overrides=[*TINY, "loss.method=ibot", "loss.lambda2=0"]))
    assert set(ibot.terms) == {"cls"}  # no patch term: no masks drawn, no mask token built
    both = build_objective(load_config(overrides=[*TINY, "loss.method=ibot", "loss.koleo_weight=0.1"]))
    assert both.needs == {"patches", "masks", "features"} and both.weights == {"cls": 1.0, "patch": 1.0, "koleo": 0.1}


def test_checkpoints_written_before_the_terms_still_load():
    dino = build_objective(load_config(overrides=[*TINY, "loss.vmf=false"]))  # logit center
    center = torch.randn(1, 48)
    dino.load_state_dict({"centering.center": center})  # DINOLoss's key
    assert torch.equal(dino.terms["cls"].teacher.centering.center, center)
    ibot = build_objective(load_config(overrides=[*TINY, "loss.method=ibot"]))  # probability centers
    cls_c, patch_c = torch.rand(1, 48), torch.rand(1, 48)
    ibot.load_state_dict({"cls.centering.center": cls_c, "patch_centering.center": patch_c})  # IBOTLoss's keys
    assert torch.equal(ibot.terms["cls"].teacher.centering.center, cls_c)
    assert torch.equal(ibot.terms["patch"].teacher.centering.center, patch_c)
    with pytest.raises(RuntimeError, match="Missing key"):
        ibot.load_state_dict({"cls.centering.center": cls_c})


def test_the_center_moves_only_on_commit():
    objective = Objective({"cls": (build_objective(load_config(overrides=[*TINY, "loss.vmf=false"])).terms["cls"], 1.0)})
    from raydino.objectives import Views

    scores = [torch.randn(4, 48) for _ in range(3)]
    objective(student=Views(scores), teacher=Views(scores[:2]), temps=Temperatures(0.1, 0.04))
    center = objective.terms["cls"].teacher.centering.center
    assert torch.count_nonzero(center) == 0
    objective.commit_center()
    assert torch.count_nonzero(center) == 48
