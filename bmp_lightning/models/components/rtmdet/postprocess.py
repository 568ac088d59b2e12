"""RTMDet-Ins inference post-processing (MMDetection ``predict_by_feat`` + ``_bbox_mask_post_process``).

Per image: per-level score threshold and top-k over (prior, class) pairs (multi-label), distance decode
clamped to the padded input, rescale to the original image, drop empty boxes, class-aware NMS, keep the
top ``max_per_img``, then masks from the dynamic convs: x8 bilinear to the padded input, bilinear resize by
the inverse scale factor, crop to the original size, ``sigmoid > mask_thr``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torchvision.ops import batched_nms

from bmp_lightning.models.components.rtmdet.dynamic_mask import dynamic_mask_logits
from bmp_lightning.models.components.rtmdet.priors import distance2bbox, mlvl_grid_priors


def filter_scores_and_topk(
    scores: torch.Tensor, score_thr: float, topk: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep (prior, class) pairs with score > ``score_thr``, then the ``topk`` best.

    Args:
        scores: ``(N, C)`` probabilities.

    Returns:
        ``scores (K,)`` descending, ``labels (K,)``, ``keep_idxs (K,)`` prior indices (a prior may repeat).
    """
    valid = scores > score_thr
    kept = scores[valid]
    idxs = torch.nonzero(valid)
    kept, order = kept.sort(descending=True)
    k = min(topk, kept.numel()) if topk > 0 else kept.numel()
    keep_idxs, labels = idxs[order[:k]].unbind(dim=1)
    return kept[:k], labels, keep_idxs


def masks_to_original(
    mask_logits: torch.Tensor,
    mask_stride: int,
    ori_shape: tuple[int, int] | None = None,
    scale_factor: tuple[float, float] | None = None,
    mask_thr: float = 0.5,
) -> torch.Tensor:
    """Stride-``mask_stride`` logits -> bool masks in original image pixels.

    Args:
        mask_logits: ``(N, h, w)`` logits at mask-feature resolution.
        mask_stride: upsampling factor back to the (padded) network input.
        ori_shape: original ``(H, W)``; ``None`` keeps the padded input size.
        scale_factor: ``(w_scale, h_scale)`` of the test resize (original -> input); needed with ``ori_shape``.
        mask_thr: probability threshold.

    Returns:
        ``(N, H, W)`` bool.
    """
    x = F.interpolate(mask_logits[None], scale_factor=mask_stride, mode="bilinear", align_corners=False)
    if ori_shape is not None:
        if scale_factor is None:
            raise ValueError("scale_factor is required to rescale masks to ori_shape")
        inv_w, inv_h = 1.0 / scale_factor[0], 1.0 / scale_factor[1]
        # Upstream uses the inverse *w* factor for the height and the inverse *h* factor for the width;
        # with keep-ratio resizing the two are nearly equal, and we match it bit for bit.
        size = [math.ceil(x.shape[-2] * inv_w), math.ceil(x.shape[-1] * inv_h)]
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        x = x[..., : ori_shape[0], : ori_shape[1]]
        # The swapped factors can round one row/column short of the image (e.g. 425x640 at input 320 -> 425x639):
        # repeat the last one, so masks are always exactly (H, W).
        short_h, short_w = ori_shape[0] - x.shape[-2], ori_shape[1] - x.shape[-1]
        if short_h > 0 or short_w > 0:
            x = F.pad(x, (0, max(short_w, 0), 0, max(short_h, 0)), mode="replicate")
    return x[0].sigmoid() > mask_thr


def postprocess_single(
    cls_scores: Sequence[torch.Tensor],
    bbox_preds: Sequence[torch.Tensor],
    kernel_preds: Sequence[torch.Tensor],
    mask_feat: torch.Tensor,
    img_shape: tuple[int, int],
    ori_shape: tuple[int, int] | None = None,
    scale_factor: tuple[float, float] | None = None,
    strides: Sequence[int] = (8, 16, 32),
    mask_stride: int = 8,
    score_thr: float = 0.05,
    nms_pre: int = 1000,
    nms_iou: float = 0.6,
    max_per_img: int = 100,
    mask_thr: float = 0.5,
    mask_chunk: int = 32,
) -> dict[str, torch.Tensor]:
    """Decode one image.

    Args:
        cls_scores: per level ``(C, H, W)`` logits.
        bbox_preds: per level ``(4, H, W)`` distances in input pixels.
        kernel_preds: per level ``(K, H, W)`` dynamic kernels.
        mask_feat: ``(P, h, w)`` prototypes.
        img_shape: ``(H, W)`` of the padded network input (boxes are clamped to it).
        ori_shape: original ``(H, W)``; with ``scale_factor`` boxes and masks go back to it, else they stay
            in input pixels.
        scale_factor: ``(w_scale, h_scale)`` original -> input.
        strides, mask_stride: level strides and the prototype stride.
        score_thr, nms_pre, nms_iou, max_per_img, mask_thr: test config.
        mask_chunk: instances per mask-resizing chunk (bounds memory; does not change results).

    Returns:
        ``bboxes (N, 4)`` xyxy, ``scores (N,)``, ``labels (N,)`` int64, ``masks (N, H, W)`` bool, sorted by score.
    """
    sizes = [tuple(c.shape[-2:]) for c in cls_scores]
    priors_all = mlvl_grid_priors(sizes, strides, device=cls_scores[0].device, dtype=cls_scores[0].dtype)
    scores_l, labels_l, boxes_l, priors_l, kernels_l = [], [], [], [], []
    for cls, reg, ker, priors in zip(cls_scores, bbox_preds, kernel_preds, priors_all):
        scores = cls.permute(1, 2, 0).reshape(-1, cls.shape[0]).sigmoid()
        s, lab, idx = filter_scores_and_topk(scores, score_thr, nms_pre)
        scores_l.append(s)
        labels_l.append(lab)
        boxes_l.append(reg.permute(1, 2, 0).reshape(-1, 4)[idx])
        priors_l.append(priors[idx])
        kernels_l.append(ker.permute(1, 2, 0).reshape(-1, ker.shape[0])[idx])
    scores, labels = torch.cat(scores_l), torch.cat(labels_l)
    priors, kernels = torch.cat(priors_l), torch.cat(kernels_l)
    bboxes = distance2bbox(priors[:, :2], torch.cat(boxes_l), max_shape=img_shape)

    rescale = ori_shape is not None
    if rescale:
        if scale_factor is None:
            raise ValueError("scale_factor is required together with ori_shape")
        inv_w, inv_h = 1.0 / scale_factor[0], 1.0 / scale_factor[1]
        bboxes = bboxes * bboxes.new_tensor([inv_w, inv_h, inv_w, inv_h])
    # min_bbox_size 0: boxes must have strictly positive width and height.
    valid = (bboxes[:, 2] - bboxes[:, 0] > 0) & (bboxes[:, 3] - bboxes[:, 1] > 0)
    bboxes, scores, labels, priors, kernels = bboxes[valid], scores[valid], labels[valid], priors[valid], kernels[valid]

    out_h, out_w = ori_shape if rescale else img_shape
    if bboxes.numel() == 0:
        return {
            "bboxes": bboxes.reshape(0, 4),
            "scores": scores,
            "labels": labels,
            "masks": torch.zeros((0, out_h, out_w), dtype=torch.bool, device=bboxes.device),
        }
    keep = batched_nms(bboxes, scores, labels, nms_iou)[:max_per_img]
    bboxes, scores, labels, priors, kernels = bboxes[keep], scores[keep], labels[keep], priors[keep], kernels[keep]

    logits = dynamic_mask_logits(mask_feat, kernels, priors, mask_stride=mask_stride)
    masks = [
        masks_to_original(chunk, mask_stride, ori_shape if rescale else None, scale_factor, mask_thr)
        for chunk in logits.split(mask_chunk)
    ]
    return {"bboxes": bboxes, "scores": scores, "labels": labels, "masks": torch.cat(masks)}


def postprocess(
    outputs: dict,
    img_shape: tuple[int, int],
    ori_shapes: Sequence[tuple[int, int]] | None = None,
    scale_factors: Sequence[tuple[float, float]] | None = None,
    **cfg,
) -> list[dict[str, torch.Tensor]]:
    """Batched wrapper: ``RTMDetIns.forward`` outputs -> one result dict per image (see ``postprocess_single``)."""
    batch = outputs["mask_feat"].shape[0]
    results = []
    for i in range(batch):
        results.append(
            postprocess_single(
                [c[i] for c in outputs["cls_scores"]],
                [b[i] for b in outputs["bbox_preds"]],
                [k[i] for k in outputs["kernel_preds"]],
                outputs["mask_feat"][i],
                img_shape,
                None if ori_shapes is None else tuple(ori_shapes[i]),
                None if scale_factors is None else tuple(scale_factors[i]),
                **cfg,
            )
        )
    return results
