"""MMPose ViTPose converter (oracle equality), safe checkpoint loading, load reports and the MAE/timm init."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from bmp_lightning.interop.mmpose import (
    convert_mmpose_vitpose,
    is_mmpose_checkpoint,
    is_original_vitpose_checkpoint,
    load_mmpose_vitpose,
    mmpose_num_keypoints,
    to_mmpose,
)
from bmp_lightning.interop.timm_init import load_mae_init, mae_to_backbone_state, resample_pos_embed
from bmp_lightning.models.components.pose_net import vitpose_b, vitpose_tiny
from bmp_lightning.models.components.vit import ViTPoseBackbone
from bmp_lightning.structures.checkpoint import UnknownObject, load_state_dict_report, safe_load
from bmp_lightning.structures.errors import UnsafeCheckpointError

TINY_GRID = 4 * 3  # vitpose_tiny at 64x48


def _tiny(num_keypoints: int = 21, seed: int = 0):
    torch.manual_seed(seed)
    return vitpose_tiny(num_keypoints=num_keypoints, img_size=(64, 48)).eval()


def _mm_init(oracle_dir: Path):
    spec = importlib.util.spec_from_file_location("bmp_oracle_mm_init", oracle_dir / "mm_init.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------- oracle


def test_oracle_vitpose_b_matches_mmpose(oracle_dir):
    """The converted reference MMPose weights reproduce MMPose's backbone features and heatmaps (~1.5 s on CPU)."""
    sd = _mm_init(oracle_dir).reference_state_dict(oracle_dir / "vitpose_b_keys.txt")
    assert is_mmpose_checkpoint(sd) and mmpose_num_keypoints(sd) == 17
    ref = torch.load(oracle_dir / "vitpose_b_rand.pt", map_location="cpu", weights_only=True)
    net = vitpose_b(num_keypoints=17)
    report = load_state_dict_report(net, convert_mmpose_vitpose({"state_dict": sd, "meta": {}}), strict=True)
    assert report.ok
    net.eval()
    with torch.no_grad():
        feat = net.forward_features(ref["input"])
        heat = net.head(feat)
    torch.testing.assert_close(feat, ref["backbone_feat"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(heat, ref["heatmaps"], atol=1e-4, rtol=1e-4)
    # and back: our weights in MMPose names are the reference weights (pos_embed 192, no cls token)
    back = to_mmpose(net.state_dict())
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


# ---------------------------------------------------------------------------------------------- converter


def _mmpose_sd(net, pos_rows: str = "192", cls_token: bool = False) -> dict[str, torch.Tensor]:
    sd = to_mmpose(net.state_dict())
    if pos_rows == "193":
        pos = sd["backbone.pos_embed"]
        sd["backbone.pos_embed"] = torch.cat([torch.full_like(pos[:, :1], 7.0), pos], dim=1)
    if cls_token:
        sd["backbone.cls_token"] = torch.randn(1, 1, sd["backbone.pos_embed"].shape[-1])
    return sd


def test_both_pos_embed_lengths_convert_to_the_same_weights():
    net = _tiny(21)
    ours = net.state_dict()
    a = convert_mmpose_vitpose(_mmpose_sd(net, "192"), num_patches=TINY_GRID)
    b = convert_mmpose_vitpose({"state_dict": _mmpose_sd(net, "193", cls_token=True)}, num_patches=TINY_GRID)
    assert set(a) == set(b) == set(ours)
    for k in ours:
        assert torch.equal(a[k], ours[k]) and torch.equal(b[k], ours[k]), k
    assert b["backbone.pos_embed"].shape == (1, TINY_GRID, 64)  # the row of 7s (cls slot) is gone, not folded in
    with pytest.raises(ValueError, match="pos_embed has"):
        convert_mmpose_vitpose(_mmpose_sd(net), num_patches=TINY_GRID + 5)


def test_detects_17_and_21_keypoints_and_checkpoint_kinds():
    sd21 = _mmpose_sd(_tiny(21))
    sd17 = _mmpose_sd(_tiny(17))
    assert mmpose_num_keypoints({"state_dict": sd21, "meta": {"x": 1}}) == 21
    assert mmpose_num_keypoints(sd17) == 17
    assert is_mmpose_checkpoint(sd21) and not is_original_vitpose_checkpoint(sd21)
    assert not is_mmpose_checkpoint(_tiny().state_dict())
    assert not is_mmpose_checkpoint({"meta": {}})


def test_ddp_prefix_and_data_preprocessor_are_handled():
    net = _tiny()
    sd = {f"module.{k}": v for k, v in _mmpose_sd(net).items()}
    sd["module.data_preprocessor.mean"] = torch.zeros(3, 1, 1)
    out = convert_mmpose_vitpose(sd, num_patches=TINY_GRID)
    assert set(out) == set(net.state_dict())


def test_original_vitpose_checkpoint_folds_the_cls_position_row():
    net = _tiny()
    ours = net.state_dict()
    orig = {}
    for k, v in ours.items():
        k = k.replace("backbone.norm.", "backbone.last_norm.").replace("head.", "keypoint_head.")
        orig[k] = v
    cls_row = torch.randn(1, 1, 64)
    # the original forward adds pos[:, 1:] + pos[:, :1]; store rows so that this sum is our pos_embed
    orig["backbone.pos_embed"] = torch.cat([cls_row, ours["backbone.pos_embed"] - cls_row], dim=1)
    assert is_original_vitpose_checkpoint(orig)
    out = convert_mmpose_vitpose(orig, num_patches=TINY_GRID)
    assert set(out) == set(ours)
    torch.testing.assert_close(out["backbone.pos_embed"], ours["backbone.pos_embed"])
    assert torch.equal(out["head.final_layer.weight"], ours["head.final_layer.weight"])


def test_round_trip_through_mmpose_names_gives_identical_outputs():
    src, dst = _tiny(seed=1), _tiny(seed=2)
    x = torch.randn(2, 3, 64, 48)
    report = load_state_dict_report(dst, convert_mmpose_vitpose(to_mmpose(src.state_dict()), TINY_GRID))
    assert report.ok
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x), atol=0, rtol=0)


def test_converting_our_own_weights_is_a_no_op(caplog):
    net = _tiny()
    ours = net.state_dict()
    with caplog.at_level(logging.WARNING):
        again = convert_mmpose_vitpose(ours, num_patches=TINY_GRID)
    assert set(again) == set(ours) and all(again[k] is ours[k] for k in ours)
    assert "match no rule" not in caplog.text


def test_stray_missing_and_mismatched_keys_are_reported(caplog):
    net = _tiny(21)
    sd = _mmpose_sd(net)
    sd["backbone.some_stray.weight"] = torch.zeros(3)
    del sd["head.final_layer.bias"]
    converted = convert_mmpose_vitpose(sd, num_patches=TINY_GRID)
    assert "backbone.some_stray.weight" in converted  # kept so the loader can report it
    with pytest.raises(RuntimeError, match="some_stray") as err:
        load_state_dict_report(net, converted, strict=True)
    assert "head.final_layer.bias" in str(err.value)
    with caplog.at_level(logging.WARNING):
        report = load_state_dict_report(net, converted, strict=False)
    assert report.unexpected_keys == ["backbone.some_stray.weight"]
    assert report.missing_keys == ["head.final_layer.bias"]
    assert report.mismatched_keys == [] and not report.ok
    assert "some_stray" in caplog.text and "head.final_layer.bias" in caplog.text


def test_17_keypoint_head_into_21_keypoint_model_non_strict():
    src, dst = _tiny(17, seed=1), _tiny(21, seed=2)
    report = load_state_dict_report(dst, src.state_dict(), strict=False)
    assert [m.split(":")[0] for m in report.mismatched_keys] == ["head.final_layer.weight", "head.final_layer.bias"]
    assert torch.equal(dst.backbone.pos_embed, src.backbone.pos_embed)  # everything else loaded
    assert dst.head.final_layer.weight.shape[0] == 21


# ---------------------------------------------------------------------------------------------- safe loading

_EXPLODED: list[str] = []


def _explode() -> str:
    _EXPLODED.append("code from the checkpoint ran")
    return "boom"


class _Payload:
    """Pickles as a call to _explode: full unpickling would run it."""

    def __reduce__(self):
        return (_explode, ())


class _CustomMeta:
    def __init__(self):
        self.value = 3


def test_safe_load_refuses_arbitrary_objects(tmp_path):
    net = _tiny()
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": _mmpose_sd(net), "meta": {"hook": _Payload()}}, path)
    with pytest.raises(UnsafeCheckpointError, match="evil.pth") as err:
        safe_load(path)
    assert "_explode" in str(err.value)
    with pytest.raises(UnsafeCheckpointError):
        load_mmpose_vitpose(net, path)
    # placeholders keep the tensors and replace the callable by an inert stand-in
    ckpt = safe_load(path, placeholders=True)
    assert isinstance(ckpt["meta"]["hook"], UnknownObject)
    assert ckpt["meta"]["hook"].qualname.endswith("_explode")
    assert torch.equal(ckpt["state_dict"]["backbone.pos_embed"], net.backbone.pos_embed)
    assert _EXPLODED == []


def test_safe_load_custom_class_and_numpy_meta(tmp_path):
    net = _tiny()
    path = tmp_path / "mm.pth"
    meta = {"dataset_meta": {"sigmas": np.array([0.026, 0.025], np.float32), "num": np.int64(2)}, "epoch": 210}
    torch.save({"state_dict": _mmpose_sd(net), "meta": meta}, path)
    ckpt = safe_load(path)  # MMEngine meta holds numpy arrays: allowed, they are plain data
    np.testing.assert_array_equal(ckpt["meta"]["dataset_meta"]["sigmas"], meta["dataset_meta"]["sigmas"])
    dst = _tiny(seed=5)
    assert load_mmpose_vitpose(dst, path).ok
    assert torch.equal(dst.backbone.blocks[0].attn.qkv.weight, net.backbone.blocks[0].attn.qkv.weight)

    custom = tmp_path / "custom.pth"
    torch.save({"state_dict": {}, "message_hub": _CustomMeta()}, custom)
    with pytest.raises(UnsafeCheckpointError, match="_CustomMeta"):
        safe_load(custom)
    obj = safe_load(custom, placeholders=True)["message_hub"]
    assert isinstance(obj, UnknownObject) and not isinstance(obj, _CustomMeta)
    assert obj.state == {"value": 3}
    with pytest.raises(FileNotFoundError):
        safe_load(tmp_path / "nope.pth")

    legacy = tmp_path / "legacy.pth"  # pre-1.6 (non-zip) serialisation: still refused, still a clear message
    torch.save({"meta": _CustomMeta()}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafeCheckpointError, match="legacy.pth.*_CustomMeta"):
        safe_load(legacy)


# ---------------------------------------------------------------------------------------------- MAE / timm init


def _cubic_matrix(n_out: int, n_in: int, a: float = -0.75) -> torch.Tensor:
    """1-D bicubic resampling matrix (Keys kernel, a=-0.75, align_corners=False, edge-clamped taps), by hand."""

    def kernel(d: float) -> float:
        d = abs(d)
        if d <= 1:
            return (a + 2) * d**3 - (a + 3) * d**2 + 1
        if d < 2:
            return a * d**3 - 5 * a * d**2 + 8 * a * d - 4 * a
        return 0.0

    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        src = (i + 0.5) * n_in / n_out - 0.5
        base = int(np.floor(src))
        for tap in range(base - 1, base + 3):
            m[i, min(max(tap, 0), n_in - 1)] += kernel(src - tap)
    return m


def test_resample_pos_embed_drops_cls_and_is_bicubic():
    torch.manual_seed(0)
    c = 3
    grid = torch.randn(14, 14, c, dtype=torch.float64)
    pos = torch.cat([torch.full((1, 1, c), 1e6, dtype=torch.float64), grid.reshape(1, 196, c)], dim=1)
    out = resample_pos_embed(pos.float(), (16, 12))
    assert out.shape == (1, 192, c)
    assert out.abs().max() < 100  # the cls row (1e6) never leaks in
    # separable bicubic: rows 14 -> 16, columns 14 -> 12 (no antialiasing), tokens row-major over (16, 12)
    expected = torch.einsum("ir,rsc,js->ijc", _cubic_matrix(16, 14), grid, _cubic_matrix(12, 14))
    torch.testing.assert_close(out.reshape(16, 12, c).double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(resample_pos_embed(pos, (14, 14)), pos[:, 1:])
    with pytest.raises(ValueError, match="square grid"):
        resample_pos_embed(pos[:, :-1], (16, 12))


def _fake_timm_state(embed_dim: int = 64, depth: int = 2) -> dict[str, torch.Tensor]:
    """What timm.create_model('vit_base_patch16_224.mae') holds, at a tiny width (built locally: no network)."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(3)
    vit = VisionTransformer(img_size=224, patch_size=16, embed_dim=embed_dim, depth=depth, num_heads=2, num_classes=0)
    return vit.state_dict()


def test_mae_state_loads_into_the_backbone():
    timm_sd = _fake_timm_state()
    assert timm_sd["pos_embed"].shape == (1, 197, 64)
    bb = ViTPoseBackbone(embed_dim=64, depth=2, num_heads=2)
    state = mae_to_backbone_state(timm_sd, bb.grid_size)
    assert "cls_token" not in state
    assert load_state_dict_report(bb, state, strict=True).ok
    assert torch.equal(bb.patch_embed.proj.weight, timm_sd["patch_embed.proj.weight"])  # copied as is
    assert torch.equal(bb.blocks[1].mlp.fc2.weight, timm_sd["blocks.1.mlp.fc2.weight"])
    expected = resample_pos_embed(timm_sd["pos_embed"], (16, 12))
    assert torch.equal(bb.pos_embed, expected)


def test_load_mae_init_offline_stops_unless_random_init_is_allowed(monkeypatch, caplog):
    import timm

    from bmp_lightning.interop.timm_init import MAEUnavailableError

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'\nsecond line")

    monkeypatch.setattr(timm, "create_model", offline)
    bb = ViTPoseBackbone(embed_dim=64, depth=2, num_heads=2)
    before = bb.pos_embed.detach().clone()
    with pytest.raises(MAEUnavailableError) as info:  # no silent paper run from random weights
        load_mae_init(bb)
    msg = str(info.value)
    assert "timm/vit_base_patch16_224.mae" in msg and "model.allow_random_init=true" in msg
    assert "hf download timm/vit_base_patch16_224.mae model.safetensors" in msg
    with caplog.at_level(logging.WARNING):  # the explicit opt-in: one warning, random init kept
        assert load_mae_init(bb, allow_random_init=True) is False
    assert torch.equal(bb.pos_embed, before)
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 and "\n" not in msgs[0]
    assert msgs[0].startswith("MAE init weights unavailable: training from RANDOM init")


def test_load_mae_init_with_a_local_timm_model(monkeypatch):
    import timm
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(4)
    fake = VisionTransformer(img_size=224, patch_size=16, embed_dim=64, depth=2, num_heads=2, num_classes=0)
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: fake)
    bb = ViTPoseBackbone(embed_dim=64, depth=2, num_heads=2)
    assert load_mae_init(bb) is True
    assert torch.equal(bb.blocks[0].attn.qkv.weight, fake.blocks[0].attn.qkv.weight)
    assert torch.equal(bb.pos_embed, resample_pos_embed(fake.pos_embed.detach(), (16, 12)))
