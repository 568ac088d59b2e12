"""RTMDetInsCriterion on a toy batch: finite losses, empty images, gradients, avg factors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bmp_lightning.models.components.rtmdet.assigner import DynamicSoftLabelAssigner
from bmp_lightning.models.components.rtmdet.criterion import RTMDetInsCriterion, reduce_mean
from bmp_lightning.models.components.rtmdet.losses import giou_loss
from bmp_lightning.models.components.rtmdet.priors import distance2bbox, mlvl_grid_priors

SIZE = 64
STRIDES = (8, 16, 32)


def _outputs(bsz: int, num_classes: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {"cls_scores": [], "bbox_preds": [], "kernel_preds": []}
    for s in STRIDES:
        h = SIZE // s
        out["cls_scores"].append((torch.randn(bsz, num_classes, h, h, generator=g) - 2).requires_grad_())
        # distances of a few strides: boxes of 16..48 px around each point
        out["bbox_preds"].append((torch.rand(bsz, 4, h, h, generator=g) * 3 * s + 8).requires_grad_())
        out["kernel_preds"].append((torch.randn(bsz, 169, h, h, generator=g) * 0.3).requires_grad_())
    out["mask_feat"] = torch.randn(bsz, 8, SIZE // 8, SIZE // 8, generator=g).requires_grad_()
    return out


def _target(boxes: list[list[int]], labels: list[int]) -> dict:
    masks = torch.zeros(len(boxes), SIZE, SIZE, dtype=torch.uint8)
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        masks[i, y1:y2, x1:x2] = 1
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.long),
        "masks": masks,
    }


def test_toy_batch_finite_losses_and_gradients() -> None:
    out = _outputs(2, 3)
    targets = [_target([[4, 4, 36, 44], [30, 10, 60, 60]], [0, 2]), _target([], [])]
    losses = RTMDetInsCriterion(num_classes=3)(out, targets)
    assert set(losses) == {"loss_cls", "loss_bbox", "loss_mask"}
    for v in losses.values():
        assert v.dim() == 0 and torch.isfinite(v) and v.item() > 0
    sum(losses.values()).backward()
    for key in ("cls_scores", "bbox_preds", "kernel_preds"):
        grads = [t.grad for t in out[key]]
        assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)
        assert any(gr.abs().sum() > 0 for gr in grads), key
    assert out["mask_feat"].grad is not None and out["mask_feat"].grad.abs().sum() > 0
    # box / mask gradients only reach image 0 (image 1 has no GT); cls gradients reach both (negatives)
    assert all(t.grad[1].abs().sum() == 0 for t in out["bbox_preds"])
    assert all(t.grad[1].abs().sum() > 0 for t in out["cls_scores"])


def test_box_loss_and_avg_factor_match_the_assignment() -> None:
    out = _outputs(1, 1, seed=3)
    tgt = _target([[4, 4, 36, 44], [30, 10, 60, 60]], [0, 0])
    losses = RTMDetInsCriterion(num_classes=1)(out, [tgt])
    # recompute by hand from the assignment
    priors = torch.cat(mlvl_grid_priors([(SIZE // s, SIZE // s) for s in STRIDES], STRIDES), 0)
    logits = torch.cat([c.detach().permute(0, 2, 3, 1).reshape(-1, 1) for c in out["cls_scores"]])
    dists = torch.cat([b.detach().permute(0, 2, 3, 1).reshape(-1, 4) for b in out["bbox_preds"]])
    boxes = distance2bbox(priors, dists)
    res = DynamicSoftLabelAssigner().assign(priors, logits, boxes, tgt["boxes"], tgt["labels"], tgt["masks"])
    pos = res.pos_mask
    assert pos.sum() >= 2 and set(res.gt_inds[pos].tolist()) == {0, 1}
    ious = res.ious[pos]
    avg = max(ious.sum().item(), 1.0)
    expected_bbox = 2.0 * (giou_loss(boxes[pos], tgt["boxes"][res.gt_inds[pos]]) * ious).sum() / avg
    torch.testing.assert_close(losses["loss_bbox"].detach(), expected_bbox)
    p = logits.sigmoid()[:, 0]
    neg_term = F.binary_cross_entropy_with_logits(logits[:, 0], torch.zeros_like(p), reduction="none") * p**2
    q = res.ious
    pos_term = F.binary_cross_entropy_with_logits(logits[:, 0], q, reduction="none") * (q - p).abs() ** 2
    expected_cls = torch.where(pos, pos_term, neg_term).sum() / avg
    torch.testing.assert_close(losses["loss_cls"].detach(), expected_cls)


def test_all_empty_batch() -> None:
    out = _outputs(2, 1)
    losses = RTMDetInsCriterion(num_classes=1)(out, [_target([], []), _target([], [])])
    assert losses["loss_bbox"].item() == 0 and losses["loss_mask"].item() == 0
    # no positives -> avg factor clamps to 1: loss_cls is the plain sum of the negative QFL terms
    logits = torch.cat([c.detach().flatten() for c in out["cls_scores"]])
    p = logits.sigmoid()
    expected = (-torch.log1p(-p) * p**2).sum()
    torch.testing.assert_close(losses["loss_cls"].detach(), expected)
    sum(losses.values()).backward()  # still differentiable
    assert out["mask_feat"].grad is not None


@pytest.mark.parametrize(
    "logit, expected_dice",
    [
        # p = 0.5 everywhere (16x16 = 256 cells at stride 4); GT box [8, 40) sampled at 2, 6, ..., 62 -> cells 2..9:
        # 64 ones. dice = 1 - 2 * 32 / (256 * 0.25 + eps + 64 + eps)
        (0.0, 1 - 64 / (128 + 1e-5)),
        # p = 1 everywhere: dice = 1 - 2 * 64 / (256 + eps + 64 + eps)
        (60.0, 1 - 128 / (320 + 1e-5)),
    ],
)
def test_mask_loss_hand_value_with_standin_mask_fn(logit: float, expected_dice: float) -> None:
    """A stand-in dynamic conv returning a constant logit map: the Dice of every positive is known exactly."""
    out = _outputs(1, 1, seed=1)
    tgt = _target([[8, 8, 40, 40]], [0])

    def standin(mask_feat, kernels, priors, stride):  # (8,h,w), (n,169), (n,4) -> (n,h,w)
        assert stride == 8 and mask_feat.shape == (8, 8, 8) and priors.shape == (kernels.shape[0], 4)
        return torch.full((kernels.shape[0], 8, 8), logit) + 0 * kernels.sum(1)[:, None, None]

    losses = RTMDetInsCriterion(num_classes=1, mask_fn=standin)(out, [tgt])
    # every positive has the same mask, so sum / num_pos is one dice; loss weight 2
    assert losses["loss_mask"].item() == pytest.approx(2.0 * expected_dice, rel=1e-5)


def test_bad_inputs_raise() -> None:
    out = _outputs(1, 2)
    with pytest.raises(ValueError, match="classes"):
        RTMDetInsCriterion(num_classes=3)(out, [_target([], [])])
    bad = _target([[4, 4, 36, 44]], [0])
    bad["masks"] = bad["masks"][:, :32]
    with pytest.raises(ValueError, match="padded input size"):
        RTMDetInsCriterion(num_classes=2)(out, [bad])


def test_reduce_mean_single_process_group(tmp_path) -> None:
    import torch.distributed as dist

    assert reduce_mean(torch.tensor(3.0)).item() == 3.0  # not distributed: identity
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        assert math.isclose(reduce_mean(torch.tensor(3.0)).item(), 3.0)
    finally:
        dist.destroy_process_group()
