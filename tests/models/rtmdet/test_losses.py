"""QFL, GIoU and Dice on small tensors against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from bmp_lightning.models.components.rtmdet.losses import dice_loss, giou_loss, quality_focal_loss

LN2, LN3 = math.log(2.0), math.log(3.0)


def test_quality_focal_loss_hand_values() -> None:
    # 3 priors, 2 classes; background label = 2
    logits = torch.tensor([[0.0, 0.0], [LN3, -LN3], [0.0, LN3]])
    labels = torch.tensor([1, 2, 0])
    scores = torch.tensor([0.5, 0.0, 1.0])
    loss = quality_focal_loss(logits, labels, scores, beta=2.0)
    # prior 0: class 0 negative BCE(0,0)*0.5^2 = ln2/4; class 1 positive q=0.5=sigmoid(0) -> scale 0
    # prior 1: sigmoid = 3/4, 1/4: BCE(ln3,0)=ln4 * 9/16 + BCE(-ln3,0)=ln(4/3) * 1/16
    # prior 2: class 0 positive q=1: BCE(0,1)=ln2 * (1-0.5)^2; class 1 negative ln4 * 9/16
    expected = torch.tensor(
        [
            LN2 / 4,
            math.log(4) * 9 / 16 + math.log(4 / 3) / 16,
            LN2 / 4 + math.log(4) * 9 / 16,
        ]
    )
    torch.testing.assert_close(loss, expected)


def test_quality_focal_loss_negative_label_minus_one_and_grad() -> None:
    logits = torch.tensor([[0.3, -0.2]], requires_grad=True)
    loss = quality_focal_loss(logits, torch.tensor([-1]), torch.tensor([0.7]))
    p = torch.sigmoid(torch.tensor([0.3, -0.2]))
    expected = (-torch.log(1 - p) * p**2).sum()
    torch.testing.assert_close(loss[0], expected)
    loss.sum().backward()
    assert logits.grad is not None and torch.all(logits.grad > 0)


def test_giou_loss_hand_values() -> None:
    pred = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0], [1.0, 2.0, 5.0, 7.0]])
    target = torch.tensor([[1.0, 1.0, 3.0, 3.0], [2.0, 0.0, 3.0, 1.0], [1.0, 2.0, 5.0, 7.0]])
    loss = giou_loss(pred, target)
    # overlap 1, union 7, hull 9 -> giou = 1/7 - 2/9; disjoint: iou 0, union 2, hull 3 -> giou = -1/3; identical -> 0
    expected = torch.tensor([1 - (1 / 7 - 2 / 9), 1 + 1 / 3, 0.0])
    torch.testing.assert_close(loss, expected)


def test_giou_loss_degenerate_boxes_are_finite() -> None:
    pred = torch.tensor([[5.0, 5.0, 5.0, 5.0]], requires_grad=True)
    target = torch.tensor([[5.0, 5.0, 5.0, 5.0]])
    loss = giou_loss(pred, target)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(pred.grad).all()
    assert loss.item() == pytest.approx(1.0)  # union and hull clamp to eps: iou 0, giou 0


def test_dice_loss_hand_values() -> None:
    probs = torch.tensor([[[0.5, 0.5], [1.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    target = torch.tensor([[[1, 0], [1, 0]], [[0, 0], [0, 0]]], dtype=torch.uint8)
    eps = 5e-6
    loss = dice_loss(probs, target, eps=eps)
    # inter = 0.5 + 1 = 1.5; sum p^2 = 1.5; sum g^2 = 2 -> 1 - 3 / (3.5 + 2 eps); empty/empty -> 1 - 0
    expected = torch.tensor([1 - 3.0 / (1.5 + eps + 2.0 + eps), 1.0])
    torch.testing.assert_close(loss, expected)
    perfect = dice_loss(torch.tensor([[[1.0, 0.0]]]), torch.tensor([[[1, 0]]]), eps=eps)
    assert perfect.item() == pytest.approx(1 - 2 / (2 + 2 * eps), abs=1e-7)
