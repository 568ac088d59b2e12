"""ViTPose backbone, heatmap head and presets: shapes, token layout, padding, drop path, parameter counts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bmp_lightning.models.components import pose_net
from bmp_lightning.models.components.heatmap_head import HeatmapHead
from bmp_lightning.models.components.pose_net import POSE_NET_PRESETS, build_pose_net, vitpose_b, vitpose_tiny
from bmp_lightning.models.components.vit import ViTPoseBackbone, patch_grid


def test_patch_grid_with_padding():
    # floor((256 + 4 - 16) / 16) + 1 = 16, floor((192 + 4 - 16) / 16) + 1 = 12
    assert patch_grid((256, 192), 16, 2) == (16, 12)
    assert patch_grid((64, 48), 16, 2) == (4, 3)
    assert patch_grid((224, 224), 16, 0) == (14, 14)


def test_tiny_shapes_at_full_resolution():
    net = vitpose_tiny(num_keypoints=21).eval()
    x = torch.randn(2, 3, 256, 192)
    with torch.no_grad():
        feat = net.forward_features(x)
        heat = net(x)
    assert feat.shape == (2, 64, 16, 12)
    assert heat.shape == (2, 21, 64, 48)
    assert net.num_keypoints == 21


def test_token_layout_is_row_major_and_patch_conv_is_padded():
    """With identity blocks/norm, output (r, c) must be the mean of the padded 16x16 patch at row r, column c."""
    torch.manual_seed(0)
    bb = ViTPoseBackbone(img_size=(64, 48), embed_dim=8, depth=1, num_heads=2, drop_path_rate=0.0)
    bb.blocks = nn.Sequential()
    bb.norm = nn.Identity()
    with torch.no_grad():
        bb.pos_embed.zero_()
        bb.patch_embed.proj.weight.zero_()
        bb.patch_embed.proj.bias.zero_()
        bb.patch_embed.proj.weight[0] = 1.0 / (3 * 16 * 16)  # channel 0 = patch mean over all input channels
    x = torch.rand(1, 3, 64, 48)
    out = bb(x)
    assert out.shape == (1, 8, 4, 3)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for r in range(4):
        for c in range(3):
            expected = padded[0, :, 16 * r : 16 * r + 16, 16 * c : 16 * c + 16].mean()
            assert torch.allclose(out[0, 0, r, c], expected, atol=1e-6)
    assert torch.all(out[0, 1:] == 0)


def test_position_embedding_is_added_per_token():
    bb = ViTPoseBackbone(img_size=(64, 48), embed_dim=8, depth=1, num_heads=2)
    bb.blocks = nn.Sequential()
    bb.norm = nn.Identity()
    with torch.no_grad():
        bb.patch_embed.proj.weight.zero_()
        bb.patch_embed.proj.bias.zero_()
        bb.pos_embed.copy_(torch.arange(12 * 8, dtype=torch.float32).reshape(1, 12, 8))
    out = bb(torch.zeros(1, 3, 64, 48))
    # token t = r * 3 + c holds pos_embed[t]
    assert out[0, 5, 2, 1].item() == (2 * 3 + 1) * 8 + 5


def test_backbone_hyperparameters():
    bb = ViTPoseBackbone(embed_dim=32, depth=4, num_heads=2, drop_path_rate=0.3)
    probs = [blk.drop_path1.drop_prob if hasattr(blk.drop_path1, "drop_prob") else 0.0 for blk in bb.blocks]
    assert probs == pytest.approx([0.0, 0.1, 0.2, 0.3])
    norms = [m for m in bb.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 2 * 4 + 1 and all(m.eps == 1e-6 for m in norms)
    assert bb.pos_embed.shape == (1, 192, 32)
    assert bb.patch_embed.proj.padding == (2, 2) and bb.patch_embed.proj.stride == (16, 16)
    assert all(blk.attn.qkv.bias is not None for blk in bb.blocks)
    assert isinstance(bb.blocks[0].mlp.act, nn.GELU) and bb.blocks[0].mlp.act.approximate == "none"


def test_wrong_input_size_is_a_clear_error():
    bb = ViTPoseBackbone(img_size=(64, 48), embed_dim=8, depth=1, num_heads=2)
    with pytest.raises(ValueError, match="token grid"):
        bb(torch.zeros(1, 3, 96, 48))


def test_heatmap_head_layers_and_upsampling():
    head = HeatmapHead(in_channels=16, num_keypoints=5, deconv_channels=(8, 8), deconv_kernels=(4, 4))
    names = [n for n, _ in head.named_parameters()]
    assert names == [
        "deconv_layers.0.weight",
        "deconv_layers.1.weight",
        "deconv_layers.1.bias",
        "deconv_layers.3.weight",
        "deconv_layers.4.weight",
        "deconv_layers.4.bias",
        "final_layer.weight",
        "final_layer.bias",
    ]
    assert head.deconv_layers[0].weight.shape == (16, 8, 4, 4)  # ConvTranspose layout (in, out, kH, kW)
    assert head(torch.zeros(2, 16, 16, 12)).shape == (2, 5, 64, 48)
    for k in (2, 3):
        assert HeatmapHead(16, 5, (8,), (k,))(torch.zeros(1, 16, 4, 3)).shape == (1, 5, 8, 6)


def test_vitpose_b_parameter_count():
    net = vitpose_b(num_keypoints=17)
    count = lambda m: sum(p.numel() for p in m.parameters())
    # MMPose ViTPose-B: ~89.99 M = backbone 85.79 M + head 4.20 M
    assert count(net.backbone) == 85_794_048
    assert count(net.head) == 4_199_697
    assert count(net) == 89_993_745
    assert net.head.final_layer.out_channels == 17
    assert net.backbone.blocks[-1].drop_path1.drop_prob == pytest.approx(0.3)


def test_build_pose_net_presets():
    assert set(POSE_NET_PRESETS) >= {"vitpose_b", "maskpose_b", "vitpose_s", "vitpose_tiny"}
    net = build_pose_net("vitpose_tiny", num_keypoints=7, img_size=(64, 48))
    assert net(torch.zeros(1, 3, 64, 48)).shape == (1, 7, 16, 12)
    with pytest.raises(ValueError, match="unknown pose-net preset"):
        build_pose_net("vitpose_xxl", 17)


@pytest.mark.parametrize("name", ["vitpose_s", "vitpose_b", "vitpose_l", "vitpose_h"])
def test_presets_follow_the_one_size_table(name, monkeypatch):
    """Presets, the head count of converted weights and convert's preset detection read VITPOSE_SIZES (MMPose's
    ViTPose-S/B/L/H: 384x12/12, 768x12/12, 1024x24/16, 1280x32/16; drop path 0.1/0.3/0.5/0.55)."""
    from bmp_lightning.convert import _POSE_PRESETS
    from bmp_lightning.models.components.pose_net import VITPOSE_SIZES, vitpose_num_heads

    want = {"vitpose_s": (384, 12, 12, 0.1), "vitpose_b": (768, 12, 12, 0.3), "vitpose_l": (1024, 24, 16, 0.5),
            "vitpose_h": (1280, 32, 16, 0.55)}[name]  # fmt: skip
    assert tuple(VITPOSE_SIZES[name]) == want
    built = {}  # what the preset builds (recorded, not allocated: ViT-H has 632 M parameters)
    monkeypatch.setattr(pose_net, "_vitpose", lambda *a, **kw: built.update(args=a[:5]))
    build_pose_net(name, num_keypoints=17)
    assert built["args"] == (*want[:3], 17, want[3])
    assert vitpose_num_heads(want[0]) == want[2] and vitpose_num_heads(96) == 1  # unknown width: 64-dim heads
    assert _POSE_PRESETS[want[:2]] == (name, want[2])
