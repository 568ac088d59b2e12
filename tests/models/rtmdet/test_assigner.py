"""DynamicSoftLabelAssigner on hand-built toy cases (costs in the comments, re-derived in plain Python)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from bmp_lightning.models.components.rtmdet.assigner import (
    DynamicSoftLabelAssigner,
    box_iou,
    mask_center_of_mass,
    soft_cls_cost,
)

LN2 = math.log(2.0)


def _iou(a: list[float], b: list[float]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def _cost(point: tuple[float, float], stride: float, pred: list[float], gt: list[float], center) -> float:
    """The B7 cost for a zero logit and one class: BCE(0, q) = ln 2, so the cls term is ln2 * (q - 0.5)^2."""
    q = _iou(pred, gt)
    dist = math.dist(point, center) / stride
    return LN2 * (q - 0.5) ** 2 - 3 * math.log(q + 1e-7) + 10 ** (dist - 3)


def _priors(points: list[tuple[float, float]], stride: float = 8.0) -> torch.Tensor:
    return torch.tensor([[x, y, stride, stride] for x, y in points])


def test_two_gts_dynamic_k_and_soft_labels() -> None:
    gts = [[0.0, 0.0, 32.0, 32.0], [40.0, 0.0, 72.0, 32.0]]
    points = [(16, 16), (8, 16), (24, 24), (56, 16), (48, 8), (100, 100), (36, 16)]
    preds = [
        [0, 0, 32, 32],  # p0: IoU 1 with GT0
        [4, 0, 32, 32],  # p1: IoU 28/32 = 0.875 with GT0
        [8, 8, 32, 32],  # p2: IoU 576/1024 = 0.5625 with GT0
        [40, 0, 72, 32],  # p3: IoU 1 with GT1
        [44, 0, 72, 32],  # p4: IoU 0.875 with GT1
        [0, 0, 32, 32],  # p5: perfect box, but its point is outside every GT -> never a candidate
        [0, 0, 32, 32],  # p6: between the two GTs, outside both -> never a candidate
    ]
    # dynamic k: GT0 int(1 + 0.875 + 0.5625) = 2, GT1 int(1 + 0.875) = 1
    centers = [(16.0, 16.0), (56.0, 16.0)]
    c0 = [_cost(points[i], 8, preds[i], gts[0], centers[0]) for i in range(3)]
    # p0 0.1743 < p1 0.5081 < p2 1.7547: GT0 takes p0, p1
    assert c0[0] < c0[1] < c0[2]
    c1 = [_cost(points[i], 8, preds[i], gts[1], centers[1]) for i in (3, 4)]
    assert c1[0] < c1[1]  # GT1 takes p3
    res = DynamicSoftLabelAssigner().assign(
        _priors(points),
        torch.zeros(len(points), 1),
        torch.tensor(preds, dtype=torch.float32),
        torch.tensor(gts),
        torch.tensor([0, 0]),
    )
    assert res.gt_inds.tolist() == [0, 0, -1, 1, -1, -1, -1]
    torch.testing.assert_close(res.ious, torch.tensor([1.0, 0.875, 0, 1.0, 0, 0, 0]))
    assert res.pos_mask.tolist() == [True, True, False, True, False, False, False]


# Overlapping people: GT0 [0,0,40,40], GT1 [8,0,48,40]; three priors inside both.
_GTS = [[0.0, 0.0, 40.0, 40.0], [8.0, 0.0, 48.0, 40.0]]
_POINTS = [(20.0, 20.0), (28.0, 20.0), (23.0, 20.0)]
# IoUs with (GT0, GT1): q0 (1, 2/3), q1 (2/3, 1), q2 (36/44, 36/44); dynamic k = int(2.485) = 2 for both
_PREDS = [[0.0, 0.0, 40.0, 40.0], [8.0, 0.0, 48.0, 40.0], [4.0, 0.0, 44.0, 40.0]]


def _run(masks: torch.Tensor | None):
    return DynamicSoftLabelAssigner().assign(
        _priors(_POINTS), torch.zeros(3, 1), torch.tensor(_PREDS), torch.tensor(_GTS), torch.tensor([0, 0]), masks
    )


def test_contested_prior_goes_to_cheapest_gt_box_centres() -> None:
    centers = [(20.0, 20.0), (28.0, 20.0)]  # box centres
    c = [[_cost(p, 8, pr, g, ce) for g, ce in zip(_GTS, centers)] for p, pr in zip(_POINTS, _PREDS)]
    # GT0 picks q0 (0.1743), q2 (0.6746); GT1 picks q1 (0.1743), q2 (0.6764): q2 is claimed twice
    # and stays with GT0 because its centre (3 px away vs 5 px) is closer
    assert sorted(range(3), key=lambda i: c[i][0])[:2] == [0, 2]
    assert sorted(range(3), key=lambda i: c[i][1])[:2] == [1, 2]
    assert c[2][0] < c[2][1]
    res = _run(None)
    assert res.gt_inds.tolist() == [0, 1, 0]
    torch.testing.assert_close(res.ious, torch.tensor([1.0, 1.0, 36 / 44]))


def test_mask_centre_of_mass_drives_the_centre_cost() -> None:
    masks = torch.zeros(2, 48, 48, dtype=torch.uint8)
    masks[0, :40, :40] = 1  # centre of mass (19.5, 19.5)
    masks[1, :40, 16:32] = 1  # only a narrow strip: centre of mass (23.5, 19.5), right under q2 (23, 20)
    com = mask_center_of_mass(masks)
    torch.testing.assert_close(com, torch.tensor([[19.5, 19.5], [23.5, 19.5]]))
    centers = [(19.5, 19.5), (23.5, 19.5)]
    c = [[_cost(p, 8, pr, g, ce) for g, ce in zip(_GTS, centers)] for p, pr in zip(_POINTS, _PREDS)]
    assert sorted(range(3), key=lambda i: c[i][0])[:2] == [0, 2]
    assert sorted(range(3), key=lambda i: c[i][1])[:2] == [1, 2]
    assert c[2][1] < c[2][0]  # now GT1 is cheaper for q2
    res = _run(masks)
    assert res.gt_inds.tolist() == [0, 1, 1]
    torch.testing.assert_close(res.ious, torch.tensor([1.0, 1.0, 36 / 44]))


def test_no_gt_and_no_candidate() -> None:
    a = DynamicSoftLabelAssigner()
    res = a.assign(_priors(_POINTS), torch.zeros(3, 2), torch.tensor(_PREDS), torch.zeros(0, 4), torch.zeros(0))
    assert res.gt_inds.tolist() == [-1, -1, -1] and res.ious.tolist() == [0, 0, 0]
    far = torch.tensor([[500.0, 500.0, 600.0, 600.0]])
    res = a.assign(_priors(_POINTS), torch.zeros(3, 2), torch.tensor(_PREDS), far, torch.tensor([1]))
    assert res.gt_inds.tolist() == [-1, -1, -1]


def test_soft_cls_cost_matches_the_dense_formula() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 5, generator=g) * 2
    labels = torch.tensor([3, 0, 3])
    ious = torch.rand(7, 3, generator=g)
    onehot = F.one_hot(labels, 5).float()[None].expand(7, 3, 5)
    soft = onehot * ious[..., None]
    x = logits[:, None].expand(7, 3, 5)
    dense = (F.binary_cross_entropy_with_logits(x, soft, reduction="none") * (soft - x.sigmoid()).abs() ** 2).sum(-1)
    torch.testing.assert_close(soft_cls_cost(logits, labels, ious), dense)


def test_box_iou_values() -> None:
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0], [5.0, 5.0, 6.0, 6.0]])
    torch.testing.assert_close(box_iou(a, b), torch.tensor([[1 / 7, 1.0, 0.0]]))
