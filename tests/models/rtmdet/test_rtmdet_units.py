"""Hand-computed checks of the RTMDet-Ins pieces: priors, decode, dynamic mask convs, post-processing, aliasing."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bmp_lightning.models.components.rtmdet.dynamic_mask import dynamic_mask_logits, num_dynamic_params
from bmp_lightning.models.components.rtmdet.postprocess import (
    filter_scores_and_topk,
    masks_to_original,
    postprocess_single,
)
from bmp_lightning.models.components.rtmdet.priors import distance2bbox, grid_priors, mlvl_grid_priors
from bmp_lightning.models.components.rtmdet.rtmdet_ins import infer_rtmdet_ins_config, rtmdet_ins_tiny

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


# ----------------------------------------------------------------------------------------------- priors / decode


def test_grid_priors_row_major_offset_zero():
    p = grid_priors((2, 3), 16)
    expected = [[0, 0], [16, 0], [32, 0], [0, 16], [16, 16], [32, 16]]
    assert p[:, :2].tolist() == expected
    assert (p[:, 2:] == 16).all()
    sizes = [tuple(t.shape) for t in mlvl_grid_priors([(4, 4), (2, 2), (1, 1)], (8, 16, 32))]
    assert sizes == [(16, 4), (4, 4), (1, 4)]


def test_distance_decode_toy_prior():
    point = torch.tensor([[16.0, 8.0]])
    dist = torch.tensor([[2.0, 3.0, 4.0, 5.0]])  # l, t, r, b
    assert distance2bbox(point, dist).tolist() == [[14.0, 5.0, 20.0, 13.0]]
    # Clamped to the padded input (h=10, w=18).
    assert distance2bbox(point, dist, max_shape=(10, 18)).tolist() == [[14.0, 5.0, 18.0, 10.0]]
    assert distance2bbox(point, torch.tensor([[20.0, 9.0, 0.0, 0.0]]), (10, 18)).tolist() == [[0.0, 0.0, 16.0, 8.0]]


def test_filter_scores_and_topk_multilabel():
    scores = torch.tensor([[0.9, 0.01], [0.04, 0.6], [0.7, 0.8]])
    s, labels, idx = filter_scores_and_topk(scores, 0.05, 3)
    assert s.tolist() == pytest.approx([0.9, 0.8, 0.7])
    assert labels.tolist() == [0, 1, 0]
    assert idx.tolist() == [0, 2, 2]  # prior 2 yields two (prior, class) pairs
    assert filter_scores_and_topk(scores, 0.05, 10)[0].numel() == 4
    assert filter_scores_and_topk(scores, 0.95, 10)[0].numel() == 0


# ----------------------------------------------------------------------------------------------- dynamic mask


def _l1_kernel(c: float) -> torch.Tensor:
    """Kernel whose mask logit is ``c - |rel_x| - |rel_y|``: hidden units relu(+-rel_x), relu(+-rel_y)."""
    w0 = torch.zeros(8, 10)
    w0[0, 0], w0[1, 0], w0[2, 1], w0[3, 1] = 1, -1, 1, -1
    w1 = torch.zeros(8, 8)
    w1[:4, :4] = torch.eye(4)
    w2 = torch.zeros(1, 8)
    w2[0, :4] = -1
    b0, b1, b2 = torch.zeros(8), torch.zeros(8), torch.tensor([c])
    return torch.cat([w0.flatten(), w1.flatten(), w2.flatten(), b0, b1, b2])


def test_dynamic_mask_relative_coords_analytic():
    assert num_dynamic_params() == 169
    h, w = 5, 6
    feat = torch.randn(8, h, w)  # ignored by this kernel
    prior = torch.tensor([[24.0, 8.0, 16.0, 16.0]])  # x, y, stride
    out = dynamic_mask_logits(feat, _l1_kernel(2.0)[None], prior)
    assert out.shape == (1, h, w)
    ys, xs = torch.meshgrid(torch.arange(h) * 8.0, torch.arange(w) * 8.0, indexing="ij")
    expected = 2.0 - ((24.0 - xs).abs() + (8.0 - ys).abs()) / (8 * 16)
    torch.testing.assert_close(out[0], expected)
    # The sign is prior minus pixel: a kernel reading +rel_x only is positive left of the prior.
    k = torch.zeros(169)
    k[0] = 1.0  # w0[0, 0] -> hidden 0 = relu(rel_x)
    k[80] = 1.0  # w1[0, 0]
    k[144] = 1.0  # w2[0, 0]
    out = dynamic_mask_logits(feat, k[None], prior)[0]
    torch.testing.assert_close(out[0], ((24.0 - torch.arange(w) * 8.0) / 128).clamp(min=0))


def test_dynamic_mask_bias_only_and_prototype_passthrough():
    feat = torch.rand(8, 4, 4)  # non-negative so ReLU keeps it
    k = torch.zeros(2, 169)
    k[0, -1] = -3.0  # instance 0: constant logit -3 (b2)
    # instance 1: hidden 0 = prototype 5 (input channel 2 + 5), copied through layer 1, read by layer 2.
    k[1, 0 * 10 + 7] = 1.0
    k[1, 80 + 0] = 1.0
    k[1, 144 + 0] = 2.0
    k[1, -1] = 0.5
    out = dynamic_mask_logits(feat, k, torch.tensor([[0.0, 0.0, 8.0, 8.0], [8.0, 8.0, 8.0, 8.0]]))
    torch.testing.assert_close(out[0], torch.full((4, 4), -3.0))
    torch.testing.assert_close(out[1], 2.0 * feat[5] + 0.5)


def _grouped_conv_reference(feat: torch.Tensor, kernels: torch.Tensor, priors: torch.Tensor) -> torch.Tensor:
    """Spec B5 literally: cat(rel, prototypes) per instance, three grouped 1x1 convs with out-major weights."""
    n, (_, h, w) = kernels.shape[0], feat.shape
    gy, gx = torch.meshgrid(torch.arange(h) * 8.0, torch.arange(w) * 8.0, indexing="ij")
    rel = torch.stack([(priors[:, 0, None, None] - gx), (priors[:, 1, None, None] - gy)], dim=1) / (
        priors[:, 2, None, None, None] * 8
    )
    x = torch.cat([rel, feat.expand(n, -1, -1, -1)], dim=1).reshape(1, -1, h, w)
    w0, w1, w2, b0, b1, b2 = torch.split(kernels, [80, 64, 8, 8, 8, 1], dim=1)
    x = F.relu(F.conv2d(x, w0.reshape(n * 8, 10, 1, 1), b0.reshape(-1), groups=n))
    x = F.relu(F.conv2d(x, w1.reshape(n * 8, 8, 1, 1), b1.reshape(-1), groups=n))
    return F.conv2d(x, w2.reshape(n, 8, 1, 1), b2.reshape(-1), groups=n).reshape(n, h, w)


def test_dynamic_mask_matches_grouped_conv_and_batches():
    g = torch.Generator().manual_seed(0)
    feat = torch.randn(2, 8, 6, 7, generator=g)
    kernels = torch.randn(2, 3, 169, generator=g)
    priors = torch.tensor([[[8.0, 16.0, 8, 8], [32.0, 0.0, 16, 16], [0.0, 32.0, 32, 32]]]).repeat(2, 1, 1)
    batched = dynamic_mask_logits(feat, kernels, priors)
    assert batched.shape == (2, 3, 6, 7)
    for b in range(2):
        single = dynamic_mask_logits(feat[b], kernels[b], priors[b])
        torch.testing.assert_close(single, _grouped_conv_reference(feat[b], kernels[b], priors[b]))
        torch.testing.assert_close(batched[b], single)
    assert dynamic_mask_logits(feat[0], kernels[0, :0], priors[0, :0]).shape == (0, 6, 7)


# ----------------------------------------------------------------------------------------------- post-processing


def test_masks_to_original_upsample_rescale_crop():
    logits = torch.full((1, 8, 8), -1.0)
    logits[:, :, :4] = 1.0
    # x8 bilinear: the zero crossing lies half-way between source columns 3 and 4 -> output column 31.5.
    m = masks_to_original(logits, 8)
    assert m.shape == (1, 64, 64) and m[0, :, :32].all() and not m[0, :, 32:].any()
    # Original 100x90 resized by 0.5 into the 64x64 input: x2 to 128x128 (crossing at 63.5), then crop.
    m = masks_to_original(logits, 8, ori_shape=(100, 90), scale_factor=(0.5, 0.5))
    assert m.shape == (1, 100, 90) and m[0, :, :64].all() and not m[0, :, 64:].any()
    # Upstream quirk kept: height uses 1 / w_scale, width 1 / h_scale (size [ceil(64*2), ceil(64*4)]).
    # Here that rescale gives 128x256, short of the image: the last row / column is repeated up to (H, W).
    m = masks_to_original(logits, 8, ori_shape=(1000, 1000), scale_factor=(0.5, 0.25))
    assert m.shape == (1, 1000, 1000) and m[0, :, :128].all() and not m[0, :, 128:].any()
    # The real case: 425x640 resized by (320/640, 213/425) into 320: width ceil(320 * 425/213) = 639 -> padded to 640.
    logits = torch.full((1, 40, 40), -1.0)
    logits[:, :, 20:] = 1.0  # right half on, so the padded last column is on too
    m = masks_to_original(logits, 8, ori_shape=(425, 640), scale_factor=(320 / 640, 213 / 425))
    assert m.shape == (1, 425, 640) and m[0, :, 639].all() and not m[0, :, :300].any()


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def _toy_level(num_classes: int = 2, size: int = 8):
    """One stride-8 level over a 64x64 input; every prior below the score threshold by default."""
    cls = torch.full((num_classes, size, size), -10.0)
    reg = torch.full((4, size, size), 4.0)
    ker = torch.zeros(169, size, size)
    return cls, reg, ker


def test_postprocess_filter_nms_rescale_masks():
    cls, reg, ker = _toy_level()
    # (row, col) cells; prior = (8*col, 8*row).
    cls[0, 2, 2] = _logit(0.9)  # A: box (16-6, 16-6, 16+6, 16+6)
    reg[:, 2, 2] = 6.0
    cls[0, 2, 3] = _logit(0.8)  # B: same class, box (24-12, 16-6, 24+0, 16+6) -> IoU with A = 120/168 > 0.6
    reg[:, 2, 3] = torch.tensor([12.0, 6.0, 0.0, 6.0])
    cls[1, 2, 3] = _logit(0.85)  # C: same box as B, other class -> survives class-aware NMS
    cls[0, 6, 6] = _logit(0.7)  # D: far away
    cls[0, 5, 0] = _logit(0.95)  # E: zero width (prior x=0, l clamped, r=0) -> dropped
    reg[:, 5, 0] = torch.tensor([3.0, 3.0, 0.0, 3.0])
    cls[1, 0, 7] = _logit(0.04)  # below score_thr
    ker[-1, 2, 2] = 5.0  # A: all-foreground mask (b2 = +5)
    ker[-1, 6, 6] = -5.0  # D: empty mask
    ker[-1, 2, 3] = 5.0
    mask_feat = torch.zeros(8, 8, 8)

    res = postprocess_single([cls], [reg], [ker], mask_feat, img_shape=(64, 64), strides=(8,))
    assert res["scores"].tolist() == pytest.approx([0.9, 0.85, 0.7])
    assert res["labels"].tolist() == [0, 1, 0]
    assert res["bboxes"].tolist() == [[10.0, 10.0, 22.0, 22.0], [12.0, 10.0, 24.0, 22.0], [44.0, 44.0, 52.0, 52.0]]
    assert res["masks"].shape == (3, 64, 64)
    assert res["masks"][0].all() and res["masks"][1].all() and not res["masks"][2].any()

    # Original 200x120 image resized by 0.5 (w) / 0.32 (h) into the input: boxes scale by 1/factor, masks crop.
    res2 = postprocess_single(
        [cls], [reg], [ker], mask_feat, (64, 64), ori_shape=(200, 120), scale_factor=(0.5, 0.32), strides=(8,)
    )
    torch.testing.assert_close(res2["bboxes"], res["bboxes"] * torch.tensor([2.0, 1 / 0.32, 2.0, 1 / 0.32]))
    # height ceil(64 * 2) = 128 (upstream quirk) padded to 200 with the last row, width cropped to 120
    assert res2["masks"].shape == (3, 200, 120)
    assert res2["masks"][0].all() and not res2["masks"][2].any()

    # max_per_img keeps the best ones; a high threshold leaves nothing but well-formed empty outputs.
    assert postprocess_single([cls], [reg], [ker], mask_feat, (64, 64), strides=(8,), max_per_img=2)[
        "labels"
    ].tolist() == [0, 1]
    empty = postprocess_single([cls], [reg], [ker], mask_feat, (64, 64), (50, 40), (1.0, 1.0), (8,), score_thr=0.99)
    assert empty["bboxes"].shape == (0, 4) and empty["masks"].shape == (0, 50, 40)


# ----------------------------------------------------------------------------------------------- network


def test_tiny_model_outputs_and_aliasing():
    torch.manual_seed(0)
    model = rtmdet_ins_tiny(1).eval()
    head = model.head
    # Tower convs shared across levels, BNs per level, regression tower == classification tower.
    assert head.cls_convs[1][0].conv is head.cls_convs[0][0].conv
    assert head.cls_convs[2][1].conv is head.cls_convs[0][1].conv
    assert head.cls_convs[1][0].bn is not head.cls_convs[0][0].bn
    assert head.reg_convs is head.cls_convs
    assert head.kernel_convs[1][0].conv is not head.kernel_convs[0][0].conv
    assert not any(k.startswith("head.reg_convs") for k in model.state_dict())
    # Upstream head init: cls bias for prior 0.01, reg bias 1.
    assert torch.allclose(head.rtm_cls[0].bias, torch.tensor(_logit(0.01)))
    assert torch.allclose(head.rtm_reg[2].bias, torch.tensor(1.0))

    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        out = model(x)
    assert [tuple(t.shape) for t in out["cls_scores"]] == [(2, 1, 12, 16), (2, 1, 6, 8), (2, 1, 3, 4)]
    assert [tuple(t.shape) for t in out["kernel_preds"]] == [(2, 169, 12, 16), (2, 169, 6, 8), (2, 169, 3, 4)]
    assert out["mask_feat"].shape == (2, 8, 12, 16)
    for t, n in zip(out["bbox_preds"], (12, 6, 3)):
        assert t.shape == (2, 4, n, 4 * n // 3) and (t >= 0).all()
    # bbox_preds = ReLU(rtm_reg(tower)) * stride, where the tower is the shared cls tower.
    with torch.no_grad():
        feats = model.neck(model.backbone(x))
        t = feats[1]
        for layer in head.cls_convs[1]:
            t = layer(t)
        torch.testing.assert_close(out["bbox_preds"][1], F.relu(head.rtm_reg[1](t)) * 16)
    cfg = infer_rtmdet_ins_config(model.state_dict())
    assert cfg == {
        "num_classes": 1,
        "widen_factor": 0.375,
        "neck_channels": 96,
        "num_csp_blocks": 1,
        "stage_blocks": [1, 1, 1, 1],
        "channel_attention": True,
    }


def test_tiny_model_trains_through_shared_tower():
    model = rtmdet_ins_tiny(1).train()
    out = model(torch.randn(2, 3, 64, 64))
    # Only level 2's regression output: the gradient must reach the level-0 conv (shared) and level 2's own BN.
    out["bbox_preds"][2].sum().backward()
    head = model.head
    assert head.cls_convs[0][0].conv.weight.grad.abs().sum() > 0
    assert head.cls_convs[2][0].bn.weight.grad.abs().sum() > 0
    assert head.cls_convs[0][0].bn.weight.grad is None
    assert head.kernel_convs[2][0].conv.weight.grad is None
