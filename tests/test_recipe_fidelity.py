"""The presets run the paper's method, and the details match DINO's and iBOT's own code:
centering that follows the method, iBOT's block masks, batch norm on patch tokens, per-parameter
gradient clipping, DINO's blur, and defaults that are what they say they are."""

import copy
import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from torch import nn
from torchvision.transforms import v2

from raydino.config import METHODS, PRESETS, Config, CropsConfig, load_config, with_overrides
from raydino.data.augment import MultiCrop, blur_sigma
from raydino.models import DINOHead, normalize_crops
from raydino.models.grad_clip import clip_gradients
from raydino.models.masking import block_mask
from raydino.objectives.centering import make_centering
from raydino.objectives.teacher import scaled_logits
from raydino.objectives.vmf import vmf_correction
from raydino.step import DINOStep
from tests.reference import NumpyAsPythonRandom, dino_clip_gradients, ibot_block_mask

# --- 1. centering follows the method --------------------------------------------------------


def _method(name: str) -> list[str]:
    return [f"{k}={str(v).lower()}" for k, v in METHODS[name].items()]


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("method", sorted(METHODS))
def test_centering_follows_the_method_in_every_preset(preset, method):
    cfg = load_config(preset=preset, overrides=_method(method))
    want = "probability" if METHODS[method]["loss.vmf"] else "logit"
    assert (cfg.loss.centering, cfg.loss.patch_centering) == (want, want)
    assert cfg.flat()["loss.centering"] == want and f"centering: {want}" in cfg.to_yaml()  # logged resolved
    assert cfg.warnings() == []


def test_an_explicit_centering_wins_and_logit_with_vmf_warns():
    cfg = load_config(overrides=["loss.centering=logit"])  # cpu_demo is DINO-vMF
    assert cfg.loss.vmf and cfg.loss.centering == "logit" and cfg.loss.patch_centering == "logit"
    (line,) = cfg.warnings()
    assert "loss.centering=logit with loss.vmf=true" in line and "cancels" in line
    ibot = load_config(overrides=[*_method("ibot-vmf"), "loss.patch_centering=logit"])
    assert (ibot.loss.centering, ibot.loss.patch_centering) == ("probability", "logit")
    assert [w.split("=")[0] for w in ibot.warnings()] == ["loss.patch_centering"]
    dino = load_config(overrides=[*_method("dino"), "loss.centering=sinkhorn"])
    assert dino.loss.centering == "sinkhorn" and dino.warnings() == []


def test_auto_centering_is_resolved_again_when_a_sweep_arm_sets_vmf():
    auto = load_config()
    assert with_overrides(auto, {"loss.vmf": False}).loss.centering == "logit"
    assert with_overrides(auto, {"loss.vmf": False, "loss.centering": "none"}).loss.centering == "none"
    explicit = load_config(overrides=["loss.centering=probability"])
    assert with_overrides(explicit, {"loss.vmf": False}).loss.centering == "probability"  # the user's choice stays
    # a checkpoint's config.yaml holds the resolved mode and loads as that mode
    import yaml

    again = Config.model_validate(yaml.safe_load(auto.to_yaml()))
    assert again.loss.centering == "probability" and again.flat() == auto.flat()


def _converged_targets(mode: str, scores: torch.Tensor, correction: torch.Tensor | None, tau: float) -> torch.Tensor:
    """Teacher targets for a fixed batch once the running center has converged on it."""
    centering = make_centering(mode, scores.shape[1], momentum=0.9)
    logits = scaled_logits(scores, tau, correction)
    for _ in range(400):
        centering.update(logits, tau)
    return centering.targets(logits, tau)


def test_logit_centering_cancels_the_teacher_vmf_correction_and_probability_centering_does_not():
    torch.manual_seed(0)
    k, p, tau = 64, 16, 0.04
    scores = torch.randn(256, k) * 0.3
    norms = torch.linspace(0.4, 1.6, k)[torch.randperm(k)]  # learned, unequal prototype norms
    correction = vmf_correction(norms, tau, p)
    assert correction.max() - correction.min() > 1.0  # the correction itself is far from constant
    logit_vmf = _converged_targets("logit", scores, correction, tau)
    logit_plain = _converged_targets("logit", scores, None, tau)
    torch.testing.assert_close(logit_vmf, logit_plain, atol=1e-5, rtol=1e-4)  # the normalisers cancelled
    prob_vmf = _converged_targets("probability", scores, correction, tau)
    prob_plain = _converged_targets("probability", scores, None, tau)
    assert (prob_vmf - prob_plain).abs().max() > 0.05  # they still shape the targets


# --- 2. iBOT's block masks -------------------------------------------------------------------

LOG_ASPECT = (math.log(0.3), math.log(1 / 0.3))


def _pieces(mask: np.ndarray) -> int:
    return ndimage.label(mask)[1]


@pytest.mark.parametrize("grid", [(14, 14), (7, 7), (12, 8)])
def test_block_masks_equal_ibot_fed_the_same_random_numbers(grid):
    ratios = np.random.default_rng(99).uniform(0.1, 0.5, size=300)
    ours, theirs = [], []
    for i, ratio in enumerate(ratios):
        ours.append(block_mask(grid, ratio, np.random.default_rng([7, i]), (0.3, 1 / 0.3)))
        theirs.append(ibot_block_mask(*grid, ratio * grid[0] * grid[1], LOG_ASPECT,
                                      NumpyAsPythonRandom(np.random.default_rng([7, i]))))
    assert sum(np.array_equal(a, b) for a, b in zip(ours, theirs)) == len(ratios)
    if grid == (14, 14):  # the statistic the old draw got wrong (1.91 pieces per image against iBOT's 1.31)
        pieces = np.mean([_pieces(m) for m in ours])
        assert pieces == np.mean([_pieces(m) for m in theirs]) and pieces < 1.6


# --- 3. batch norm in the head on patch tokens ------------------------------------------------


def _bn_head() -> DINOHead:
    torch.manual_seed(0)
    return DINOHead(24, num_prototypes=32, hidden_dim=16, bottleneck_dim=8, use_bn=True, norm_last_layer=False)


def test_bn_head_scores_patch_tokens_as_one_batch_of_tokens():
    head = _bn_head()
    reference = copy.deepcopy(head)
    tokens = torch.randn(3, 9, 24)
    got = head.patch_scores(tokens)  # (B, N, K): batch norm over all B * N tokens
    want = reference(tokens.reshape(-1, 24)).reshape(3, 9, 32)  # the [CLS] path on every token as a row
    torch.testing.assert_close(got, want)
    for a, b in zip(head.buffers(), reference.buffers()):  # running statistics moved the same way
        torch.testing.assert_close(a, b)
    head.eval(), reference.eval()
    torch.testing.assert_close(head.patch_scores(tokens), reference(tokens.reshape(-1, 24)).reshape(3, 9, 32))


def test_bn_head_cls_path_is_plain_sequential_batch_norm():
    head = _bn_head()
    plain = nn.Sequential(*copy.deepcopy(list(head.mlp)))  # torch's own Sequential on (B, C)
    assert any(isinstance(m, nn.BatchNorm1d) for m in plain)
    x = torch.randn(6, 24)
    torch.testing.assert_close(head.mlp(x), plain(x))


def test_ibot_step_with_a_batch_norm_head_runs():
    cfg = load_config(overrides=[
        *_method("ibot-vmf"), "head.use_bn=true", "head.norm_last_layer=false",
        "model.kwargs={patch_size: 4, embed_dim: 32, depth: 1, num_heads: 2}", "head.num_prototypes=64",
        "head.hidden_dim=32", "head.bottleneck_dim=16", "data.crops.local_number=2", "mask.unmasked_share=0.0",
    ])
    step_fn = DINOStep.build(cfg, torch.device("cpu"))
    crops = normalize_crops([torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8) for _ in range(2)]
                            + [torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8) for _ in range(2)], "cpu")
    metrics = step_fn(crops, 0, 10)
    assert math.isfinite(metrics["patch_loss"]) and metrics["patch_loss"] > 0


# --- 4. gradient clipping ---------------------------------------------------------------------


def _with_grads(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(20, 30), nn.GELU(), nn.Linear(30, 10), nn.LayerNorm(10))
    for i, param in enumerate(model.parameters()):
        param.grad = torch.randn_like(param) * (0.01, 0.5, 3.0, 40.0)[i % 4]  # some above the clip, some below
    model[2].bias.grad = None  # a parameter without a gradient is left out, as in DINO
    return model


def test_per_param_clipping_equals_dino_clip_gradients():
    ours, theirs = _with_grads(0), _with_grads(0)
    result = clip_gradients(ours.parameters(), 3.0, "per_param")
    norms = dino_clip_gradients(theirs, 3.0)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert (a.grad is None and b.grad is None) or torch.equal(a.grad, b.grad)
    assert result.grad_norm == pytest.approx(math.sqrt(sum(n * n for n in norms)), rel=1e-6)  # before clipping
    assert result.clipped == sum(3.0 / (n + 1e-6) < 1 for n in norms) and 0 < result.clipped < len(norms)
    assert max(float(p.grad.norm()) for p in ours.parameters() if p.grad is not None) <= 3.0 + 1e-4


def test_global_clipping_equals_torch_and_a_zero_clip_only_measures():
    ours, theirs = _with_grads(1), _with_grads(1)
    result = clip_gradients(ours.parameters(), 3.0, "global")
    want = nn.utils.clip_grad_norm_(theirs.parameters(), 3.0)
    assert result.grad_norm == pytest.approx(float(want), rel=1e-6) and result.clipped == 1
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a.grad, b.grad)  # None on both sides for the parameter without one
    untouched = _with_grads(2)
    before = [p.grad.clone() for p in untouched.parameters() if p.grad is not None]
    assert clip_gradients(untouched.parameters(), 0.0, "per_param").grad_norm > 3.0
    assert all(torch.equal(a, p.grad) for a, p in zip(before, [p for p in untouched.parameters() if p.grad is not None]))


def test_presets_that_cite_dino_or_ibot_clip_per_parameter():
    for preset in ("imagenet_vit_small", "imagenet_vit_base", "imagenet_ibot_vit_small", "imagenet_ibot_vit_base"):
        cfg = load_config(preset=preset)
        assert (cfg.optim.clip_mode, cfg.optim.clip_grad) == ("per_param", 3.0)


@pytest.mark.parametrize("mode", ["per_param", "global"])
def test_a_step_logs_the_norm_before_clipping(mode):
    cfg = load_config(overrides=[
        "model.kwargs={patch_size: 4, embed_dim: 32, depth: 1, num_heads: 2}", "head.num_prototypes=64",
        "head.hidden_dim=32", "head.bottleneck_dim=16", "data.crops.local_number=2", f"optim.clip_mode={mode}",
        "optim.clip_grad=0.001",
    ])
    step_fn = DINOStep.build(cfg, torch.device("cpu"))
    crops = normalize_crops([torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8) for _ in range(2)]
                            + [torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8) for _ in range(2)], "cpu")
    metrics = step_fn(crops, 0, 10)
    after = math.sqrt(sum(float(p.grad.norm()) ** 2 for p in step_fn.student_module.parameters() if p.grad is not None))
    assert metrics["grad_norm"] > 0.01 > after  # logged before clipping; clipped hard at 0.001
    assert metrics["grads_clipped"] >= 1


# --- 5. Gaussian blur sigma -------------------------------------------------------------------


def _blurs(view: v2.Compose) -> list[v2.GaussianBlur]:
    return [t.transforms[0] for t in view.transforms
            if isinstance(t, v2.RandomApply) and isinstance(t.transforms[0], v2.GaussianBlur)]


def test_every_crop_is_blurred_by_dinos_sigma_in_pixels():
    crops = CropsConfig()  # 224 px global, 96 px local
    multicrop = MultiCrop(crops)
    for view in [*multicrop.global_views, multicrop.local_view]:
        (blur,) = _blurs(view)
        assert tuple(blur.sigma) == pytest.approx((0.1, 2.0))
    torch.manual_seed(0)
    (local_blur,) = _blurs(multicrop.local_view)
    drawn = [local_blur.make_params([torch.zeros(3, 96, 96)])["sigma"][0] for _ in range(500)]
    assert 0.1 <= min(drawn) < 0.2 and 1.9 < max(drawn) <= 2.0  # the 96 px crops get the whole range


def test_blur_scaling_to_the_crop_is_an_option_the_demo_uses():
    scaled = CropsConfig(blur_sigma_per_224px=True)
    assert blur_sigma(96, scaled) == pytest.approx((0.1 * 96 / 224, 2.0 * 96 / 224))
    assert blur_sigma(96, CropsConfig()) == (0.1, 2.0)
    demo = load_config().data.crops
    assert demo.blur_sigma_per_224px and blur_sigma(16, demo)[1] == pytest.approx(2.0 * 16 / 224)


# --- 6. the defaults are main_dino.py's --------------------------------------------------------

# facebookresearch/dino main_dino.py, get_args_parser() defaults
MAIN_DINO = {
    "model.name": "vit_small_patch16_224", "head.num_prototypes": 65536, "head.norm_last_layer": True,
    "head.use_bn": False, "head.hidden_dim": 2048, "head.bottleneck_dim": 256, "head.num_layers": 3,
    "optim.momentum_teacher": 0.996, "loss.warmup_teacher_temp": 0.04, "loss.teacher_temp": 0.04,
    "loss.warmup_teacher_temp_epochs": 0, "loss.student_temp": 0.1, "loss.center_momentum": 0.9,
    "optim.weight_decay": 0.04, "optim.weight_decay_end": 0.4, "optim.clip_grad": 3.0,
    "optim.clip_mode": "per_param", "data.batch_size_per_worker": 64, "optim.epochs": 100,
    "optim.freeze_last_layer_epochs": 1, "optim.base_lr": 5e-4, "optim.warmup_epochs": 10, "optim.min_lr": 1e-6,
    "data.crops.global_scale": [0.4, 1.0], "data.crops.local_number": 8, "data.crops.local_scale": [0.05, 0.4],
    "model.drop_path_rate": 0.1, "loss.centering": "logit", "data.crops.blur_sigma": [0.1, 2.0],
}


def test_the_defaults_are_main_dinos():
    flat = Config().flat()
    assert {k: flat[k] for k in MAIN_DINO} == MAIN_DINO


def test_prototypes_keep_the_linear_layers_own_initialisation_as_dino():
    """DINO's head applies its truncated-normal init before the last layer exists, so the prototype
    directions v keep nn.Linear's uniform(-1/sqrt(p), 1/sqrt(p)) init (||v_k|| about 0.58, not 0.16 as
    std 0.02 would give): Adam's steps of about lr per entry then turn them at DINO's pace."""
    torch.manual_seed(0)
    p = 64
    head = DINOHead(in_dim=32, num_prototypes=4096, hidden_dim=32, bottleneck_dim=p, norm_last_layer=False)
    v = head.last_layer.parametrizations.weight.original1.detach()
    assert v.abs().max() <= 1 / math.sqrt(p) + 1e-7
    assert v.std().item() == pytest.approx(1 / math.sqrt(3 * p), rel=0.02)  # uniform's std, not 0.02
    assert head.mlp[0].weight.std().item() == pytest.approx(0.02, rel=0.1)  # the MLP keeps DINO's trunc_normal
    assert torch.equal(head.prototype_norms(), torch.ones(4096))  # g starts at 1 either way
