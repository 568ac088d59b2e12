"""RTMDet-Ins losses: Quality Focal Loss (classification), GIoU (boxes), Dice (masks).

Each function returns the *summed* (or per-element) loss; the criterion divides by the avg factors of
MMDetection's ``RTMDetInsHead`` (sum of positive IoUs for cls/box, number of positives for masks).

References:
    Generalized Focal Loss, Li et al., 2020 (arXiv 2006.04388) -- QFL.
    Generalized Intersection over Union, Rezatofighi et al., 2019 (arXiv 1902.09630).
    V-Net, Milletari et al., 2016 (arXiv 1606.04797) -- the squared-denominator Dice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def quality_focal_loss(
    logits: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor, beta: float = 2.0
) -> torch.Tensor:
    """Per-prior Quality Focal Loss, summed over classes.

    Every class entry is a negative, ``BCE(logit, 0) * sigmoid(logit)**beta``, except the positive's own
    class, ``BCE(logit, q) * |q - sigmoid(logit)|**beta`` with ``q`` its target quality (IoU).

    Args:
        logits: ``(N, C)`` classification logits.
        labels: ``(N,)`` int class in ``[0, C)`` for positives, anything else (``C`` or ``-1``) for negatives.
        scores: ``(N,)`` target quality of each positive (ignored for negatives).
        beta: focusing exponent.

    Returns:
        ``(N,)`` loss per prior.
    """
    num_classes = logits.shape[1]
    prob = logits.sigmoid()
    loss = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none") * prob.pow(beta)
    pos = ((labels >= 0) & (labels < num_classes)).nonzero().squeeze(1)
    if pos.numel() > 0:
        pos_labels = labels[pos].long()
        pos_logits = logits[pos, pos_labels]
        q = scores[pos].to(logits.dtype)
        pos_loss = F.binary_cross_entropy_with_logits(pos_logits, q, reduction="none")
        pos_loss = pos_loss * (q - prob[pos, pos_labels]).abs().pow(beta)
        # out-of-place scatter keeps autograd happy
        loss = loss.index_put((pos, pos_labels), pos_loss)
    return loss.sum(dim=1)


def giou_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Element-wise ``1 - GIoU`` of aligned xyxy boxes.

    Union and enclosing area are clamped to ``eps`` (as mmdet's ``bbox_overlaps(mode='giou')``).

    Args:
        pred: ``(N, 4)`` xyxy boxes.
        target: ``(N, 4)`` xyxy boxes.
        eps: lower bound of the union and enclosing areas.

    Returns:
        ``(N,)`` loss.
    """
    area_p = (pred[:, 2] - pred[:, 0]) * (pred[:, 3] - pred[:, 1])
    area_t = (target[:, 2] - target[:, 0]) * (target[:, 3] - target[:, 1])
    lt = torch.max(pred[:, :2], target[:, :2])
    rb = torch.min(pred[:, 2:], target[:, 2:])
    wh = (rb - lt).clamp(min=0)
    overlap = wh[:, 0] * wh[:, 1]
    union = (area_p + area_t - overlap).clamp(min=eps)
    iou = overlap / union
    enc_wh = (torch.max(pred[:, 2:], target[:, 2:]) - torch.min(pred[:, :2], target[:, :2])).clamp(min=0)
    enclose = (enc_wh[:, 0] * enc_wh[:, 1]).clamp(min=eps)
    giou = iou - (enclose - union) / enclose
    return 1.0 - giou


def dice_loss(probs: torch.Tensor, target: torch.Tensor, eps: float = 5e-6) -> torch.Tensor:
    """Per-instance Dice loss with squared denominators (mmdet ``naive_dice=False``).

    ``1 - 2*sum(p*g) / ((sum(p^2) + eps) + (sum(g^2) + eps))``.

    Args:
        probs: ``(N, H, W)`` mask probabilities (already passed through a sigmoid).
        target: ``(N, H, W)`` binary targets (any dtype).
        eps: smoothing added to each denominator term.

    Returns:
        ``(N,)`` loss.
    """
    p = probs.flatten(1)
    g = target.flatten(1).to(p.dtype)
    inter = (p * g).sum(1)
    denom = ((p * p).sum(1) + eps) + ((g * g).sum(1) + eps)
    return 1.0 - 2.0 * inter / denom
