"""RTMDet's DynamicSoftLabelAssigner (SimOTA-style dynamic-k matching with soft IoU labels).

Spec: MMDetection ``dynamic_soft_label_assigner.py``; docs/recipes.md#mask-out-fine-tune.
    1. Candidates are priors whose point lies strictly inside *some* GT box.
    2. Cost(candidate, gt) = soft_cls_cost + 3 * -log(IoU + 1e-7) + 10 ** (dist / stride - 3), where the IoU is
       between the decoded *predicted* box and the GT, and dist is measured to the GT's mask centre of mass
       (box centre when no masks are given). There is no per-GT "inside" term.
    3. dynamic_k = max(1, int(sum of the 13 largest IoUs of the GT)); each GT takes its k cheapest candidates;
       a candidate claimed by several GTs keeps its cheapest one.
    4. The soft label (target quality) of a positive is its IoU with the matched GT.

References:
    RTMDet: An Empirical Study of Designing Real-Time Object Detectors, Lyu et al., 2022 (arXiv 2212.07784).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

_EPS = 1e-7


class AssignResult(NamedTuple):
    """Per-prior assignment.

    Attributes:
        gt_inds: ``(N,)`` long, index of the matched GT, ``-1`` for negatives.
        ious: ``(N,)`` float, IoU of the prediction with its matched GT (the QFL target), 0 for negatives.
    """

    gt_inds: torch.Tensor
    ious: torch.Tensor

    @property
    def pos_mask(self) -> torch.Tensor:
        return self.gt_inds >= 0


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Pairwise IoU of xyxy boxes ``(N, 4)`` x ``(M, 4)`` -> ``(N, M)``; the union is clamped to ``eps``."""
    area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])
    area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])
    lt = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    overlap = wh[..., 0] * wh[..., 1]
    union = (area1[:, None] + area2[None, :] - overlap).clamp(min=eps)
    return overlap / union


def mask_center_of_mass(masks: torch.Tensor, eps: float = _EPS) -> torch.Tensor:
    """Centre of mass ``(M, 2)`` as (x, y) in pixel-index coordinates of ``(M, H, W)`` masks; (0, 0) if empty."""
    m = masks.float()
    h, w = m.shape[-2:]
    ys = torch.arange(h, device=m.device, dtype=m.dtype)
    xs = torch.arange(w, device=m.device, dtype=m.dtype)
    total = m.sum(dim=(1, 2)).clamp(min=eps)
    cy = (m.sum(dim=2) * ys).sum(1) / total
    cx = (m.sum(dim=1) * xs).sum(1) / total
    return torch.stack([cx, cy], dim=1)


def soft_cls_cost(logits: torch.Tensor, gt_labels: torch.Tensor, ious: torch.Tensor) -> torch.Tensor:
    """Soft classification cost ``(N, M)``: QFL of every candidate against every GT's one-hot * IoU label.

    Equal to summing ``BCE(logit, onehot*IoU) * |onehot*IoU - sigmoid(logit)|^2`` over classes, computed as
    (all-classes negative term) - (negative term at the GT class) + (soft-positive term at the GT class),
    which avoids the ``(N, M, C)`` tensor.

    Args:
        logits: ``(N, C)`` classification logits of the candidates.
        gt_labels: ``(M,)`` GT classes.
        ious: ``(N, M)`` predicted-box / GT IoUs.
    """
    prob = logits.sigmoid()
    neg = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none") * prob.pow(2)
    lab = gt_labels.long()
    logit_g = logits[:, lab]  # (N, M)
    prob_g = prob[:, lab]
    pos_g = F.binary_cross_entropy_with_logits(logit_g, ious, reduction="none") * (ious - prob_g).abs().pow(2)
    return neg.sum(1, keepdim=True) - neg[:, lab] + pos_g


class DynamicSoftLabelAssigner:
    """Assign GTs to priors of one image (RTMDet).

    Args:
        topk: number of largest IoUs summed to get each GT's dynamic k.
        iou_weight: weight of the ``-log(IoU)`` cost.
        soft_center_radius: the centre cost is ``10 ** (dist/stride - soft_center_radius)``.
    """

    def __init__(self, topk: int = 13, iou_weight: float = 3.0, soft_center_radius: float = 3.0) -> None:
        self.topk = topk
        self.iou_weight = iou_weight
        self.soft_center_radius = soft_center_radius

    @torch.no_grad()
    def assign(
        self,
        priors: torch.Tensor,
        pred_logits: torch.Tensor,
        pred_boxes: torch.Tensor,
        gt_boxes: torch.Tensor,
        gt_labels: torch.Tensor,
        gt_masks: torch.Tensor | None = None,
    ) -> AssignResult:
        """Match priors to GTs.

        Args:
            priors: ``(N, 4)`` priors ``(x, y, stride_w, stride_h)`` in input pixels.
            pred_logits: ``(N, C)`` classification logits (detached).
            pred_boxes: ``(N, 4)`` decoded predicted xyxy boxes (detached).
            gt_boxes: ``(M, 4)`` xyxy GT boxes.
            gt_labels: ``(M,)`` GT classes.
            gt_masks: optional ``(M, H, W)`` GT masks; their centres of mass drive the centre cost.

        Returns:
            :class:`AssignResult`.
        """
        num_priors, num_gt = priors.shape[0], gt_boxes.shape[0]
        gt_inds = torch.full((num_priors,), -1, dtype=torch.long, device=priors.device)
        ious_out = torch.zeros(num_priors, dtype=torch.float32, device=priors.device)
        if num_gt == 0 or num_priors == 0:
            return AssignResult(gt_inds, ious_out)

        gt_boxes = gt_boxes.float()
        points = priors[:, :2].float()
        deltas = torch.cat([points[:, None] - gt_boxes[None, :, :2], gt_boxes[None, :, 2:] - points[:, None]], dim=-1)
        valid = (deltas.min(dim=-1).values > 0).any(dim=1)  # (N,) inside some GT
        if not bool(valid.any()):
            return AssignResult(gt_inds, ious_out)

        v_priors = priors[valid].float()
        v_boxes = pred_boxes[valid].float()
        v_logits = pred_logits[valid].float()

        if gt_masks is not None:
            gt_center = mask_center_of_mass(gt_masks)
        else:
            gt_center = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2
        dist = (v_priors[:, None, :2] - gt_center[None]).pow(2).sum(-1).sqrt() / v_priors[:, 2:3]
        center_cost = torch.pow(10.0, dist - self.soft_center_radius)

        ious = box_iou(v_boxes, gt_boxes)  # (V, M)
        iou_cost = -torch.log(ious + _EPS) * self.iou_weight
        cost = soft_cls_cost(v_logits, gt_labels, ious) + iou_cost + center_cost

        matched_gt, matched_iou, fg = self._dynamic_k_matching(cost, ious)
        v_idx = valid.nonzero().squeeze(1)[fg]
        gt_inds[v_idx] = matched_gt
        ious_out[v_idx] = matched_iou
        return AssignResult(gt_inds, ious_out)

    def _dynamic_k_matching(
        self, cost: torch.Tensor, ious: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Dynamic-k matching on ``(V, M)`` cost / IoU; returns matched GT, its IoU and the ``(V,)`` fg mask."""
        num_valid, num_gt = cost.shape
        matching = torch.zeros_like(cost, dtype=torch.bool)
        k_cand = min(self.topk, num_valid)
        topk_ious, _ = torch.topk(ious, k_cand, dim=0)
        dynamic_ks = torch.clamp(topk_ious.sum(0).int(), min=1).tolist()
        for g in range(num_gt):
            _, idx = torch.topk(cost[:, g], k=dynamic_ks[g], largest=False)
            matching[idx, g] = True
        multi = matching.sum(1) > 1
        if bool(multi.any()):
            # a prior claimed by several GTs keeps the cheapest one (over *all* GTs, as upstream)
            argmin = cost[multi].argmin(dim=1)
            rows = torch.zeros(int(multi.sum()), num_gt, dtype=torch.bool, device=cost.device)
            rows[torch.arange(rows.shape[0], device=cost.device), argmin] = True
            matching[multi] = rows
        fg = matching.any(dim=1)
        matched_gt = matching[fg].float().argmax(dim=1)
        matched_iou = (matching.float() * ious).sum(1)[fg]
        return matched_gt, matched_iou, fg
