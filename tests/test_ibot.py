"""iBOT and iBOT-vMF: block masks, the masked student forward, the patch loss, the step.
The end-to-end iBOT-vMF run on Ray is the shared run of tests/test_pretrain_e2e.py."""

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from raydino.config import load_config
from raydino.models import DINOHead, create_backbone, normalize_crops
from raydino.models.masking import _add_block, block_mask, sample_masks
from raydino.models.network import MultiCropNetwork, forward_tokens
from raydino.objectives import DINOTerm, IBOTPatchTerm, Objective, Temperatures, Views
from raydino.objectives.ibot import masked_patch_cross_entropy
from raydino.step import DINOStep

TINY = {"patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2}


def test_mask_statistics_stay_in_the_configured_ranges():
    rng = np.random.default_rng(0)
    masks = sample_masks(2000, (14, 14), rng, ratio=(0.1, 0.5), unmasked_share=0.3)
    fractions = masks.reshape(len(masks), -1).mean(axis=1)
    unmasked = fractions == 0
    assert abs(unmasked.mean() - 0.3) < 4 * math.sqrt(0.3 * 0.7 / 2000)  # the share left unmasked
    assert fractions.max() <= 0.5  # never more than the largest ratio
    masked = fractions[~unmasked]
    assert 0.1 <= np.median(masked) <= 0.5 and np.quantile(masked, 0.05) >= 0.05
    # ratio drawn per image: masked fractions spread over the range, not one value
    assert masked.std() > 0.05


def test_blocks_are_rectangles_with_bounded_aspect():
    rng = np.random.default_rng(1)
    aspects = []
    log_aspect = (math.log(0.3), math.log(1 / 0.3))
    for _ in range(300):
        mask = np.zeros((14, 14), dtype=bool)
        assert 0 < _add_block(mask, 40.0, rng, log_aspect) <= 40  # one block, within the budget
        labels, n = ndimage.label(mask)
        assert n == 1
        rows, cols = ndimage.find_objects(labels)[0]
        h, w = rows.stop - rows.start, cols.stop - cols.start
        assert mask[rows, cols].all(), "a block is a filled rectangle"
        aspects.append(h / w)
    # aspect log-uniform in (0.3, 1/0.3) before rounding sides to whole patches
    assert 0.25 <= min(aspects) < 0.8 and 1.25 < max(aspects) <= 4.0


def test_block_mask_reaches_its_ratio_and_never_exceeds_it():
    rng = np.random.default_rng(2)
    fractions = [block_mask((14, 14), 0.3, rng).mean() for _ in range(200)]
    assert max(fractions) <= 0.3 and np.mean(fractions) > 0.25


def test_masks_are_reproducible_under_a_seed():
    a = sample_masks(8, (7, 7), np.random.default_rng([3, 5, 0]))
    b = sample_masks(8, (7, 7), np.random.default_rng([3, 5, 0]))
    c = sample_masks(8, (7, 7), np.random.default_rng([3, 6, 0]))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_forward_tokens_equals_timm_and_masked_pixels_do_not_matter():
    backbone = create_backbone("vit_tiny_patch16_224", 16, **TINY).eval()
    images = torch.randn(3, 3, 16, 16)
    cls, patches = forward_tokens(backbone, images)
    torch.testing.assert_close(cls, backbone(images))
    assert patches.shape == (3, 16, 32)
    mask = torch.zeros(3, 4, 4, dtype=torch.bool)
    mask[:, 1:3, 0:2] = True
    token = torch.randn(1, 32)
    changed = images.clone()
    changed[:, :, 4:12, 0:8] = torch.randn(3, 3, 8, 8)  # only the masked patches' pixels
    a = forward_tokens(backbone, images, mask, token)
    b = forward_tokens(backbone, changed, mask, token)
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[1], b[1])
    assert not torch.allclose(forward_tokens(backbone, changed)[0], cls)


def _loop_patch_loss(teacher_probs, student_log_probs, masks):
    """iBOT's patch loss written out position by position."""
    views = []
    for q, log_p, m in zip(teacher_probs, student_log_probs, masks):
        per_image = []
        for b in range(q.shape[0]):
            positions = [n for n in range(q.shape[1]) if m.flatten(1)[b, n]]
            total = sum(-(q[b, n] * log_p[b, n]).sum() for n in positions) if positions else torch.tensor(0.0)
            per_image.append(total / max(len(positions), 1))
        views.append(torch.stack(per_image).mean())
    return torch.stack(views).mean()


def test_patch_loss_equals_a_loop_and_ignores_unmasked_positions():
    torch.manual_seed(0)
    q = [torch.softmax(torch.randn(4, 9, 11), -1) for _ in range(2)]
    log_p = [torch.log_softmax(torch.randn(4, 9, 11), -1) for _ in range(2)]
    masks = [torch.rand(4, 3, 3) < 0.4 for _ in range(2)]
    masks[0][1] = False  # an unmasked image counts as 0
    got = masked_patch_cross_entropy(q, log_p, masks)
    torch.testing.assert_close(got, _loop_patch_loss(q, log_p, masks))
    noisy = [lp.clone() for lp in log_p]
    for lp, m in zip(noisy, masks):
        lp[~m.flatten(1)] = torch.log_softmax(torch.randn(int((~m).sum()), 11), -1)
    torch.testing.assert_close(masked_patch_cross_entropy(q, noisy, masks), got)


@pytest.mark.parametrize("centering", ["logit", "probability", "sinkhorn", "none"])
def test_ibot_vmf_equals_ibot_with_normalised_prototypes(centering):
    torch.manual_seed(0)
    k, p = 32, 16
    def ibot_loss(vmf):
        return Objective({"cls": (DINOTerm(k, p, vmf, centering), 1.0), "patch": (IBOTPatchTerm(k, p, vmf, centering), 1.0)})

    def call(objective, s, t, sp, tp, masks, norms):
        out = objective(student=Views(s, norms, patch_scores=sp, patch_norms=norms),
                        teacher=Views(t, norms, patch_scores=tp, patch_norms=norms),
                        temps=Temperatures(0.1, 0.04, 0.05), masks=masks)
        objective.commit_center()
        return out

    ibot, ibot_vmf = ibot_loss(False), ibot_loss(True)
    norms = torch.ones(k)  # norm_last_layer=True: every kappa is the same
    for _ in range(3):  # over steps, so the centers (updated from vMF logits) must agree too
        s = [torch.randn(4, k) for _ in range(4)]
        t = [torch.randn(4, k) for _ in range(2)]
        sp = [torch.randn(4, 9, k) for _ in range(2)]
        tp = [torch.randn(4, 9, k) for _ in range(2)]
        masks = [torch.rand(4, 9) < 0.5 for _ in range(2)]
        args = (s, t, sp, tp, masks)
        a = call(ibot, *args, norms)
        b = call(ibot_vmf, *args, norms)
        torch.testing.assert_close(a.loss, b.loss, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(a.parts["patch"], b.parts["patch"], rtol=1e-6, atol=1e-6)
    # and with unequal norms the vMF term matters
    uneven = torch.linspace(0.5, 2.0, k)
    assert not torch.allclose(call(ibot, *args, uneven).loss, call(ibot_vmf, *args, uneven).loss)


def test_separate_patch_prototypes_have_their_own_norms():
    head = DINOHead(32, num_prototypes=16, hidden_dim=32, bottleneck_dim=8, norm_last_layer=False,
                    patch_prototypes="separate", num_patch_prototypes=24)
    assert head.patch_scores(torch.randn(2, 5, 32)).shape == (2, 5, 24)
    assert head.patch_prototype_norms().shape == (24,) and head.prototype_norms().shape == (16,)
    assert head.patch_last_layer.parametrizations.weight.original0.requires_grad


@pytest.mark.parametrize("vmf", [False, True])
def test_ibot_step_trains_the_mask_token_and_logs_both_losses(vmf):
    cfg = load_config(overrides=[
        "loss.method=ibot", f"loss.vmf={str(vmf).lower()}", "head.norm_last_layer=false",
        "model.kwargs={patch_size: 4, embed_dim: 32, depth: 1, num_heads: 2}", "head.num_prototypes=64",
        "head.hidden_dim=32", "head.bottleneck_dim=16", "data.crops.local_number=2", "optim.freeze_last_layer_epochs=0",
        "mask.unmasked_share=0.0", "loss.koleo_weight=0",
    ])
    step_fn = DINOStep.build(cfg, torch.device("cpu"))
    assert isinstance(step_fn.student_module, MultiCropNetwork) and step_fn.student_module.mask_token is not None
    crops = normalize_crops([torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8) for _ in range(2)]
                            + [torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8) for _ in range(2)], "cpu")
    token = step_fn.student_module.mask_token.detach().clone()
    metrics = step_fn(crops, 0, 10)
    assert {"cls_loss", "patch_loss", "teacher_patch_temp", "patch_teacher_entropy", "masked_share"} <= set(metrics)
    assert metrics["loss"] == pytest.approx(metrics["cls_loss"] + metrics["patch_loss"], rel=1e-5)
    assert 0 < metrics["masked_share"] <= 0.5
    assert not torch.equal(step_fn.student_module.mask_token, token)
    # the same step of the same seed draws the same masks
    assert all(torch.equal(a, b) for a, b in zip(step_fn.masks(crops, 3), step_fn.masks(crops, 3)))
