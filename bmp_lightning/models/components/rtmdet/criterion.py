"""RTMDet-Ins training criterion: assignment + QFL / GIoU / Dice with the upstream averaging.

Spec: MMDetection ``rtmdet_ins_head.py::loss_by_feat``; docs/recipes.md#mask-out-fine-tune.
    - loss_cls  = QFL(beta 2) summed over all priors and classes / cls_avg_factor,
    - loss_bbox = 2 * sum_pos IoU_pos * (1 - GIoU(pred, gt)) / cls_avg_factor,
    - loss_mask = 2 * sum_pos Dice(sigmoid(up2(mask logits)), gt[2::4, 2::4]) / num_pos,
    where cls_avg_factor = sum of the positives' IoUs (averaged over ranks, clamped >= 1) and num_pos is the
    number of positives (averaged over ranks, clamped >= 1).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from bmp_lightning.models.components.rtmdet.assigner import DynamicSoftLabelAssigner
from bmp_lightning.models.components.rtmdet.dynamic_mask import dynamic_mask_logits
from bmp_lightning.models.components.rtmdet.losses import dice_loss, giou_loss, quality_focal_loss
from bmp_lightning.models.components.rtmdet.priors import distance2bbox, mlvl_grid_priors

MaskFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Average a tensor over the ranks of the default process group (identity when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    value = value.clone()
    dist.all_reduce(value.div_(dist.get_world_size()), op=dist.ReduceOp.SUM)
    return value


class RTMDetInsCriterion:
    """Losses of RTMDet-Ins for a batch.

    Args:
        num_classes: number of classes of the classification branch (1 for person-only, 80 for COCO).
        strides: prior strides of the levels.
        mask_stride: stride of the prototype map (``mask_feat``).
        mask_loss_stride: stride at which the mask loss is computed (targets sampled at ``[s//2::s]``).
        cls_weight, bbox_weight, mask_weight: loss weights (1, 2, 2 upstream).
        qfl_beta: QFL focusing exponent.
        giou_eps: GIoU area clamp.
        dice_eps: Dice smoothing.
        assigner: the label assigner; default ``DynamicSoftLabelAssigner(13, 3.0, 3.0)``.
        mask_fn: ``(mask_feat (8,h,w), kernels (n,169), priors (n,4), mask_stride) -> (n,h,w)`` mask logits;
            default the network's ``dynamic_mask_logits``.
    """

    def __init__(
        self,
        num_classes: int,
        strides: Sequence[int] = (8, 16, 32),
        mask_stride: int = 8,
        mask_loss_stride: int = 4,
        cls_weight: float = 1.0,
        bbox_weight: float = 2.0,
        mask_weight: float = 2.0,
        qfl_beta: float = 2.0,
        giou_eps: float = 1e-6,
        dice_eps: float = 5e-6,
        assigner: DynamicSoftLabelAssigner | None = None,
        mask_fn: MaskFn | None = None,
    ) -> None:
        self.num_classes = num_classes
        self.strides = tuple(strides)
        self.mask_stride = mask_stride
        self.mask_loss_stride = mask_loss_stride
        self.cls_weight = cls_weight
        self.bbox_weight = bbox_weight
        self.mask_weight = mask_weight
        self.qfl_beta = qfl_beta
        self.giou_eps = giou_eps
        self.dice_eps = dice_eps
        self.assigner = assigner if assigner is not None else DynamicSoftLabelAssigner()
        self.mask_fn = mask_fn if mask_fn is not None else dynamic_mask_logits

    def __call__(self, outputs: dict, targets: list[dict]) -> dict[str, torch.Tensor]:
        """Compute the three losses.

        Args:
            outputs: the head's raw outputs: ``cls_scores`` list of ``(B, C, H, W)`` logits, ``bbox_preds`` list of
                ``(B, 4, H, W)`` l,t,r,b distances in input pixels, ``kernel_preds`` list of ``(B, K, H, W)``,
                ``mask_feat`` ``(B, 8, H0/8, W0/8)``.
            targets: per image ``boxes`` ``(M, 4)`` xyxy input pixels, ``labels`` ``(M,)``, ``masks`` ``(M, H0, W0)``
                uint8 at the padded input size.

        Returns:
            ``loss_cls``, ``loss_bbox``, ``loss_mask`` (scalars).
        """
        cls_scores, bbox_preds = outputs["cls_scores"], outputs["bbox_preds"]
        kernel_preds, mask_feat = outputs["kernel_preds"], outputs["mask_feat"]
        if len(cls_scores) != len(self.strides):
            raise ValueError(f"expected {len(self.strides)} levels, got {len(cls_scores)}")
        bsz, num_classes = cls_scores[0].shape[:2]
        if num_classes != self.num_classes:
            raise ValueError(f"cls_scores have {num_classes} classes, the criterion expects {self.num_classes}")
        if len(targets) != bsz:
            raise ValueError(f"{len(targets)} target dicts for a batch of {bsz}")
        device = cls_scores[0].device

        priors = torch.cat(mlvl_grid_priors([tuple(c.shape[-2:]) for c in cls_scores], self.strides, device), 0)
        flat_cls = torch.cat([c.permute(0, 2, 3, 1).reshape(bsz, -1, num_classes) for c in cls_scores], 1).float()
        flat_reg = torch.cat([b.permute(0, 2, 3, 1).reshape(bsz, -1, 4) for b in bbox_preds], 1).float()
        flat_ker = torch.cat([k.permute(0, 2, 3, 1).reshape(bsz, -1, k.shape[1]) for k in kernel_preds], 1)
        flat_boxes = distance2bbox(priors[None], flat_reg)  # (B, N, 4)

        num_priors = priors.shape[0]
        labels = torch.full((bsz, num_priors), num_classes, dtype=torch.long, device=device)
        quality = torch.zeros((bsz, num_priors), dtype=torch.float32, device=device)
        pos_pred_boxes, pos_gt_boxes, pos_weights = [], [], []
        mask_logits, mask_targets = [], []
        img_h, img_w = mask_feat.shape[-2] * self.mask_stride, mask_feat.shape[-1] * self.mask_stride

        for b, tgt in enumerate(targets):
            gt_boxes = tgt["boxes"].to(device=device, dtype=torch.float32).reshape(-1, 4)
            gt_labels = tgt["labels"].to(device=device, dtype=torch.long).reshape(-1)
            gt_masks = tgt.get("masks")
            if gt_masks is not None:
                gt_masks = gt_masks.to(device)
                if gt_masks.shape[0] != gt_boxes.shape[0] or tuple(gt_masks.shape[-2:]) != (img_h, img_w):
                    raise ValueError(
                        f"image {b}: masks {tuple(gt_masks.shape)} do not match {gt_boxes.shape[0]} boxes at the "
                        f"padded input size ({img_h}, {img_w})"
                    )
            if gt_labels.numel() and (int(gt_labels.min()) < 0 or int(gt_labels.max()) >= num_classes):
                raise ValueError(f"image {b}: labels outside [0, {num_classes})")
            res = self.assigner.assign(
                priors, flat_cls[b].detach(), flat_boxes[b].detach(), gt_boxes, gt_labels, gt_masks
            )
            pos = res.gt_inds >= 0
            pos_idx = pos.nonzero().squeeze(1)
            matched = res.gt_inds[pos_idx]
            labels[b, pos_idx] = gt_labels[matched]
            quality[b, pos_idx] = res.ious[pos_idx]
            pos_pred_boxes.append(flat_boxes[b, pos_idx])
            pos_gt_boxes.append(gt_boxes[matched])
            pos_weights.append(res.ious[pos_idx])
            if pos_idx.numel() > 0:
                if gt_masks is None:
                    raise ValueError(f"image {b}: targets have no 'masks'")
                mask_logits.append(self.mask_fn(mask_feat[b], flat_ker[b, pos_idx], priors[pos_idx], self.mask_stride))
                mask_targets.append(gt_masks[matched])

        # classification: QFL over every prior (all label weights are 1), normalised by the sum of positive IoUs
        loss_cls = quality_focal_loss(
            flat_cls.reshape(-1, num_classes), labels.reshape(-1), quality.reshape(-1), self.qfl_beta
        ).sum()
        avg_factor = reduce_mean(quality.sum().detach()).clamp(min=1.0).item()
        loss_cls = self.cls_weight * loss_cls / avg_factor

        # boxes: GIoU of positives, each weighted by its IoU (the same avg factor)
        pred_b, gt_b, w_b = torch.cat(pos_pred_boxes), torch.cat(pos_gt_boxes), torch.cat(pos_weights)
        if pred_b.numel() > 0:
            loss_bbox = (giou_loss(pred_b, gt_b, self.giou_eps) * w_b).sum()
        else:
            loss_bbox = flat_reg.sum() * 0
        loss_bbox = self.bbox_weight * loss_bbox / avg_factor

        # masks: Dice at stride 4, normalised by the number of positives
        num_pos = sum(m.shape[0] for m in mask_logits)
        num_pos_avg = reduce_mean(torch.tensor(float(num_pos), device=device)).clamp(min=1.0).item()
        if num_pos == 0:
            loss_mask = mask_feat.sum() * 0 + flat_ker.sum() * 0
        else:
            logits = torch.cat(mask_logits).float()
            scale = self.mask_stride // self.mask_loss_stride
            logits = F.interpolate(logits[None], scale_factor=scale, mode="bilinear", align_corners=False)[0]
            s = self.mask_loss_stride
            gts = torch.cat(mask_targets)[:, s // 2 :: s, s // 2 :: s]
            loss_mask = self.mask_weight * dice_loss(logits.sigmoid(), gts, self.dice_eps).sum() / num_pos_avg

        return {"loss_cls": loss_cls, "loss_bbox": loss_bbox, "loss_mask": loss_mask}
