import copy

import pytest
import torch

from raydino.models import DINOHead, build_student_teacher, create_backbone, ema_update, param_groups
from raydino.models.network import MultiCropNetwork

TINY = {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
HEAD = {"num_prototypes": 64, "hidden_dim": 48, "bottleneck_dim": 16}


def _pair(norm_last_layer=False):
    return build_student_teacher("vit_tiny_patch16_224", 32, TINY, dict(HEAD, norm_last_layer=norm_last_layer), 0.1)


def test_head_shapes_and_unit_bottleneck():
    head = DINOHead(32, **HEAD)
    x = torch.randn(5, 32)
    assert head(x).shape == (5, 64)
    y = head.embed(x)
    assert y.shape == (5, 16)
    torch.testing.assert_close(y.norm(dim=1), torch.ones(5))
    assert head.prototype_norms().shape == (64,)


@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_head_depth(num_layers):
    head = DINOHead(32, num_layers=num_layers, **HEAD)
    assert sum(isinstance(m, torch.nn.Linear) for m in head.mlp) == num_layers


def test_norm_last_layer_freezes_unit_norms():
    frozen = DINOHead(32, norm_last_layer=True, **HEAD)
    learned = DINOHead(32, norm_last_layer=False, **HEAD)
    assert not frozen.prototype_gain.requires_grad
    assert learned.prototype_gain.requires_grad
    torch.testing.assert_close(frozen.last_layer.weight.norm(dim=1), torch.ones(64))
    with torch.no_grad():
        learned.prototype_gain.mul_(3.0)
    torch.testing.assert_close(learned.last_layer.weight.norm(dim=1), learned.prototype_norms())


def test_multicrop_forward_through_a_real_timm_vit():
    student, teacher = _pair()
    calls = []
    student.backbone.register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    crops = [torch.randn(3, 3, 32, 32) for _ in range(2)] + [torch.randn(3, 3, 16, 16) for _ in range(4)]
    out = student(crops)
    scores, norms = out.scores, out.norms
    assert [s.shape for s in scores] == [(3, 64)] * 6
    assert norms.shape == (64,)
    assert calls == [(6, 3, 32, 32), (12, 3, 16, 16)]  # equal sizes batched together
    teacher_scores = teacher(crops[:2]).scores
    assert len(teacher_scores) == 2


def test_teacher_starts_as_copy_and_takes_no_gradient():
    student, teacher = _pair()
    for (ns, ps), (nt, pt) in zip(student.named_parameters(), teacher.named_parameters()):
        assert ns == nt and torch.equal(ps, pt)
        assert not pt.requires_grad
    assert not teacher.training


def test_ema_update_formula():
    student, teacher = _pair()
    before = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    ema_update(teacher, student, 0.9)
    for (name, t), s, b in zip(teacher.named_parameters(), student.parameters(), before.parameters()):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * s, msg=name)
    ema_update(teacher, student, 1.0)  # momentum 1 freezes the teacher
    for t, s in zip(teacher.parameters(), student.parameters()):
        assert not torch.equal(t, s)


def test_ema_rejects_mismatched_modules():
    student, teacher = _pair()
    with pytest.raises(ValueError, match="parameters differ"):
        ema_update(teacher.head, student, 0.9)


@pytest.mark.parametrize("decay_norms", [True, False])
def test_param_groups(decay_norms):
    student, _ = _pair()
    groups = param_groups(student, decay_prototype_norms=decay_norms)
    by_id = {id(p): g for g in groups for p in g["params"]}
    assert len(by_id) == sum(1 for p in student.parameters() if p.requires_grad)
    gain = student.head.prototype_gain
    assert by_id[id(gain)]["is_last_layer"] and by_id[id(gain)]["apply_weight_decay"] == decay_norms
    direction = student.head.last_layer.parametrizations.weight.original1
    assert by_id[id(direction)]["is_last_layer"] and by_id[id(direction)]["apply_weight_decay"]
    for name, p in student.named_parameters():
        if name.endswith(".bias") or p.ndim == 1:
            assert not by_id[id(p)]["apply_weight_decay"], name
            assert not by_id[id(p)]["is_last_layer"], name


def test_unknown_backbone_is_named():
    with pytest.raises(ValueError, match="not_a_model.*not a timm model"):
        create_backbone("not_a_model", 32)


def test_a_convolutional_timm_model_is_built_without_the_vit_arguments():
    """Any timm model by name: a CNN takes every crop size as it is (no img_size / dynamic_img_size)."""
    backbone = create_backbone("resnet10t", 16)
    net = MultiCropNetwork(backbone, DINOHead(backbone.num_features, **HEAD))
    out = net([torch.randn(2, 3, 16, 16)] * 2 + [torch.randn(2, 3, 8, 8)] * 2)
    assert [s.shape for s in out.scores] == [(2, 64)] * 4


def test_multicrop_network_is_a_module_pair():
    backbone = create_backbone("vit_tiny_patch16_224", 32, **TINY)
    net = MultiCropNetwork(backbone, DINOHead(backbone.num_features, **HEAD))
    assert net([torch.randn(1, 3, 32, 32)] * 3).scores[0].shape == (1, 64)


def test_vmf_logits_of_head_scores_add_the_log_normaliser_per_prototype():
    from raydino.objectives import log_vmf_normalizer, vmf_logits

    head = DINOHead(32, norm_last_layer=False, **HEAD)
    with torch.no_grad():
        head.prototype_gain.copy_(torch.linspace(0.5, 2.0, 64).unsqueeze(1))
    x = torch.randn(3, 32)
    scores = head(x)
    diff = vmf_logits(scores, head.prototype_norms(), 0.1, head.bottleneck_dim) - scores / 0.1
    expected = log_vmf_normalizer(torch.linspace(0.5, 2.0, 64) / 0.1, 16)
    torch.testing.assert_close(diff - diff[:, :1], (expected - expected[0]).expand(3, -1), rtol=1e-4, atol=1e-3)


def test_layer_decay_scales_each_blocks_lr_and_leaves_it_off_at_one():
    from raydino.config import load_config
    from raydino.config.schedules import ScheduleValues
    from raydino.step import apply_schedule, build_models, build_optimizer
    from tests.tiny import TINY_NET

    cfg = load_config(overrides=[*TINY_NET, "model.kwargs={patch_size: 8, embed_dim: 32, depth: 3, num_heads: 2}",
                                 "optim.layer_decay=0.5"])
    student, _ = build_models(cfg)
    optimizer = build_optimizer(cfg, student)
    values = ScheduleValues(lr=1e-3, last_layer_lr=1e-3, last_layer_frozen=False, weight_decay=0.04,
                            teacher_momentum=0.996, teacher_temp=0.04, teacher_patch_temp=0.04)
    apply_schedule(optimizer, values)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    names = dict(student.named_parameters())
    # 3 blocks: embeddings 0.5**4, block i 0.5**(3 - i), after the blocks (norm, head, prototypes) 1
    assert lr_of[id(names["backbone.patch_embed.proj.weight"])] == pytest.approx(1e-3 * 0.5**4)
    assert lr_of[id(names["backbone.cls_token"])] == pytest.approx(1e-3 * 0.5**4)
    for i in range(3):
        assert lr_of[id(names[f"backbone.blocks.{i}.attn.qkv.weight"])] == pytest.approx(1e-3 * 0.5 ** (3 - i))
    assert lr_of[id(names["backbone.norm.weight"])] == pytest.approx(1e-3)
    assert all(lr_of[id(p)] == pytest.approx(1e-3) for n, p in names.items() if n.startswith("head."))
    off = build_optimizer(load_config(overrides=TINY_NET), build_models(load_config(overrides=TINY_NET))[0])
    assert {g["lr_scale"] for g in off.param_groups} == {1.0} and len(off.param_groups) <= 4
