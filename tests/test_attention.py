"""DINO's attention maps: the recomputed weights against timm's own block, the masks, the CLI, the run's grid."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from raydino.cli import main
from raydino.config import load_config
from raydino.data.augment import MultiCrop
from raydino.data.embedded import load_embedded
from raydino.eval.attention import cls_attention_maps, last_block_attention, mass_masks, plot_attention_grid
from raydino.eval.data import EvalData
from raydino.models import create_backbone, normalize_crops
from raydino.pretrain import final_evaluation
from raydino.step import DINOStep
from raydino.train.checkpoint import TrainState, rng_state, write_checkpoint
from raydino.train.export import export_backbone, load_teacher

HEADS = 3  # the cpu_demo ViT


def _vit(**extra) -> torch.nn.Module:
    """A tiny random timm ViT with register tokens and q/k norms: every part the recomputation must follow."""
    torch.manual_seed(0)
    kwargs = {"patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": HEADS, "reg_tokens": 2, "qk_norm": True}
    backbone = create_backbone("vit_tiny_patch16_224", 32, **{**kwargs, **extra}).eval()
    with torch.no_grad():  # timm's init (std 0.02) attends almost uniformly; sharpen it so that maps differ
        for block in backbone.blocks:
            block.attn.qkv.weight.mul_(20)
    return backbone


@pytest.mark.parametrize("extra", [{}, {"reg_tokens": 0, "qk_norm": False}])
def test_recomputed_weights_reproduce_the_blocks_own_attention_output(extra):
    """softmax(q k^T * scale) applied to the block's values and projected as timm does equals the
    output timm's (fused) attention produced in the same forward pass."""
    backbone = _vit(**extra)
    attn = backbone.blocks[-1].attn
    seen = {}
    handle = attn.register_forward_hook(lambda _m, _a, out: seen.__setitem__("out", out))
    images = torch.randn(2, 3, 32, 40)  # not square: the patch grid follows the image (dynamic_img_size)
    try:
        weights, x = last_block_attention(backbone, images)
    finally:
        handle.remove()
    tokens = backbone.num_prefix_tokens + (32 // 8) * (40 // 8)
    assert weights.shape == (2, HEADS, tokens, tokens)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, HEADS, tokens))
    b, n, _ = x.shape
    v = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim)[:, :, 2].transpose(1, 2)
    out = attn.proj(attn.norm((weights @ v).transpose(1, 2).reshape(b, n, -1)))
    torch.testing.assert_close(out, seen["out"], atol=1e-5, rtol=1e-4)
    # and the identity can fail: uniform weights give another output
    uniform = torch.full_like(weights, 1 / tokens)
    assert not torch.allclose(attn.proj(attn.norm((uniform @ v).transpose(1, 2).reshape(b, n, -1))), seen["out"], atol=1e-3)


def test_cls_maps_drop_prefix_tokens_and_sum_to_one_per_head():
    backbone = _vit(reg_tokens=4)
    images = torch.randn(3, 3, 32, 32)
    maps = cls_attention_maps(backbone, images)
    assert maps.shape == (3, HEADS, 4, 4) and backbone.num_prefix_tokens == 5
    torch.testing.assert_close(maps.sum((-2, -1)), torch.ones(3, HEADS))
    weights, _ = last_block_attention(backbone, images)
    row = weights[:, :, 0, 5:]  # [CLS]'s row over the patches, in row-major patch order
    torch.testing.assert_close(maps.flatten(-2), row / row.sum(-1, keepdim=True))
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        cls_attention_maps(backbone, torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match="no \\[CLS\\] token"):
        cls_attention_maps(_vit(class_token=False, global_pool="avg", reg_tokens=0), images)


def test_masks_keep_the_threshold_mass_with_the_fewest_patches():
    maps = torch.tensor([[0.5, 0.3], [0.2, 0.0]])
    assert mass_masks(maps, 0.6).tolist() == [[True, True], [False, False]]
    assert mass_masks(maps, 0.5).tolist() == [[True, False], [False, False]]  # exactly half: one patch
    assert mass_masks(maps * 7, 0.6).tolist() == [[True, True], [False, False]]  # any total
    maps = torch.rand(4, HEADS, 6, 5, generator=torch.Generator().manual_seed(1)) ** 4
    for threshold in (0.1, 0.6, 0.9):
        keep = mass_masks(maps, threshold)
        assert keep.shape == maps.shape
        for head, kept in zip(maps.flatten(0, 1), keep.flatten(0, 1)):
            p = (head / head.sum()).flatten()
            k = int(kept.sum())
            assert float(p[kept.flatten()].sum()) >= threshold - 1e-6
            top = p.sort(descending=True).values
            assert float(top[: k - 1].sum()) < threshold  # one patch fewer is not enough
            assert torch.equal(p[kept.flatten()].sort().values, top[:k].sort().values)  # and they are the largest
    with pytest.raises(ValueError, match="threshold"):
        mass_masks(maps, 0.0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A real checkpoint: the cpu_demo model after a few real DINO-vMF steps on digits multi-crops."""
    cfg = load_config(overrides=["data.batch_size_per_worker=16", "scaling.num_workers=1"])
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    train = load_embedded(cfg.data.source, "train", cfg.data.crops.global_size, cfg.seed)
    multicrop = MultiCrop(cfg.data.crops)
    step_fn = DINOStep.build(cfg, torch.device("cpu"))
    steps = 4
    for step in range(steps):
        views = [multicrop(torch.from_numpy(img)) for img in train.images[step * 16 : (step + 1) * 16]]
        crops = [torch.stack(parts) for parts in zip(*views)]
        metrics = step_fn(normalize_crops(crops, "cpu"), step, 100)
        assert np.isfinite(metrics["loss"])
    out = tmp_path_factory.mktemp("run") / f"checkpoint_{steps:06d}"
    state = TrainState(**step_fn.state_dict(), step=steps, epoch=0, batch_in_epoch=steps, steps_per_epoch=42,
                       rng=[rng_state()], latest_eval={})
    write_checkpoint(out, state, cfg.to_yaml())
    return out


@pytest.fixture
def images(tmp_path):
    """An 8x8 grayscale digit as PNG and a 40x30 RGB JPEG: both become 3 x 16 x 16 inputs."""
    digit = load_embedded("digits", "test", 8).images[0]
    gray, rgb = tmp_path / "digit.png", tmp_path / "photo.jpg"
    Image.fromarray(np.asarray(digit[0] if digit.ndim == 3 else digit, dtype=np.uint8), mode="L").save(gray)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(rgb)
    return [gray, rgb]


def _pngs(folder) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))}


def test_cli_writes_the_maps_for_a_checkpoint_and_for_its_export(checkpoint, images, tmp_path, capsys):
    out = tmp_path / "maps"
    assert main(["attention", str(checkpoint), *map(str, images), "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    expected = {"img.png", "attn-mean.png", "overview.png"}
    expected |= {f"attn-head{j}.png" for j in range(HEADS)} | {f"mask-th0.6-head{j}.png" for j in range(HEADS)}
    for stem in ("digit", "photo"):
        pngs = _pngs(out / stem)
        assert set(pngs) == expected
        for name, pixels in pngs.items():
            if name != "overview.png":
                assert pixels.shape == (16, 16, 3), name  # the run's data.crops.global_size
        assert pngs["overview.png"].shape[0] > 100
    # the PNG shows what the model saw: the digit resized to 16 px, gray in all three channels
    img = _pngs(out / "digit")["img.png"]
    assert np.array_equal(img[..., 0], img[..., 2]) and img.max() > 0
    # each mask PNG leaves exactly the kept 4x4 px patches of the maps of that very image untinted
    teacher = load_teacher(checkpoint)[0]
    x = normalize_crops([torch.from_numpy(img.transpose(2, 0, 1).copy()).unsqueeze(0)], "cpu")[0]
    kept = mass_masks(cls_attention_maps(teacher.backbone, x)[0], 0.6)
    for j in range(HEADS):
        untouched = (_pngs(out / "digit")[f"mask-th0.6-head{j}.png"] == img).all(-1)
        assert int(untouched.sum()) == 16 * int(kept[j].sum()) and 0 < int(kept[j].sum()) < 16

    export = export_backbone(checkpoint, tmp_path / "teacher.safetensors")
    out2 = tmp_path / "maps_export"
    assert main(["attention", str(export), *map(str, images), "--out", str(out2), "--threshold", "0.9"]) == 0
    for stem in ("digit", "photo"):
        from_export, from_checkpoint = _pngs(out2 / stem), _pngs(out / stem)
        assert "mask-th0.9-head0.png" in from_export
        for name in ["img.png", "attn-mean.png", *(f"attn-head{j}.png" for j in range(HEADS))]:
            assert np.array_equal(from_export[name], from_checkpoint[name]), name  # same weights, same size


def test_cli_errors_are_one_line(checkpoint, images, tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    cases = [
        ([str(checkpoint), str(text)], "is not an image"),
        ([str(checkpoint), str(tmp_path / "missing.png")], "does not exist"),
        ([str(tmp_path / "nothing"), str(images[0])], "does not exist"),
        ([str(text), str(images[0])], "not a safetensors file"),
        ([str(checkpoint), str(images[0]), "--threshold", "1.5"], "threshold"),
        ([str(checkpoint), str(images[0]), "--size", "18"], "multiple of the patch size"),
    ]
    for args, message in cases:
        capsys.readouterr()
        assert main(["attention", *args, "--out", str(tmp_path / "o")]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("raydino: error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()  # nothing written when an input is bad


def test_final_evaluation_draws_the_attention_grid(checkpoint, tmp_path):
    """The grid a pretrain run logs as plots/attention_grid.png, from the final teacher and the eval images."""
    cfg = load_teacher(checkpoint)[1].model_copy()
    train = load_embedded("digits", "train", 16)
    test = load_embedded("digits", "test", 16)
    data = EvalData(train.images[:200], train.labels[:200], test.images[:50], test.labels[:50], len(train.classes))
    final_evaluation(checkpoint, cfg, tmp_path / "plots", data)
    grid = Image.open(tmp_path / "plots" / "attention_grid.png")
    assert grid.size[0] > 300 and grid.size[1] > 200
    teacher = load_teacher(checkpoint)[0]
    odd = load_embedded("digits", "test", 18).images[:2]  # a crop size that is not whole 4 px patches
    path = plot_attention_grid(teacher.backbone, odd, tmp_path / "two.png")
    assert Image.open(path).size[1] < grid.size[1]  # one row per image
