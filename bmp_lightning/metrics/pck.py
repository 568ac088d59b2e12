"""PCK (percentage of correct keypoints) for MPII / AIC validation.

A keypoint is correct when ``||(pred - gt) / norm|| < thr``. Two normalisations:

- ``bbox`` (the default, MMPose ``PCKAccuracy(thr=0.2, norm_item='bbox')``, what BMP's MPII and AIC val loaders report):
  ``norm = max(w, h)`` of the ground-truth box;
- ``head`` (MPII's PCKh@0.5): ``norm`` = head size = 0.6 x the head box diagonal (:func:`mpii_head_size`).

As in MMPose, only ground-truth-visible keypoints of instances with a positive norm count, each keypoint's accuracy is
the fraction of its valid instances, and the mean is over the keypoints that have at least one valid instance.
Evaluated in the 21-slot schema this equals the source-schema PCK: unannotated slots have visibility 0.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from bmp_lightning.metrics.gather import deduplicate, gather_predictions
from bmp_lightning.structures.keypoints import KEYPOINTS


def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


@dataclass
class PCKResult:
    """``per_keypoint`` ``(K,)`` accuracies (NaN: no valid instance), their ``mean``, valid ``counts`` ``(K,)``."""

    per_keypoint: np.ndarray
    mean: float
    counts: np.ndarray

    def __float__(self) -> float:
        return float(self.mean)


def pck(pred, gt, visible, norm, thr: float = 0.2) -> PCKResult:
    """PCK of ``pred (N, K, 2)`` against ``gt (N, K, 2)``.

    Args:
        pred: predicted keypoints in image pixels.
        gt: ground-truth keypoints.
        visible: ``(N, K)`` bool/0-1, which ground-truth keypoints count.
        norm: ``(N,)`` per-instance normaliser (or ``(N, 2)`` per axis); instances with a norm ``<= 0`` are skipped.
        thr: threshold on the normalised distance.
    """
    p, g = _np(pred), _np(gt)
    if p.shape != g.shape or p.ndim != 3 or p.shape[-1] != 2:
        raise ValueError(f"pred and gt must both be (N, K, 2), got {p.shape} and {g.shape}")
    n, k, _ = p.shape
    vis = _np(visible).reshape(n, k) > 0
    nrm = _np(norm).reshape(n, -1)
    if nrm.shape[1] == 1:
        nrm = np.repeat(nrm, 2, axis=1)
    valid = vis & (nrm > 0).all(1)[:, None]
    dist = np.linalg.norm((p - g) / np.where(nrm > 0, nrm, 1.0)[:, None, :], axis=-1)
    correct = (dist < thr) & valid
    counts = valid.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_kpt = np.where(counts > 0, correct.sum(0) / np.maximum(counts, 1), np.nan)
    mean = float(np.nanmean(per_kpt)) if (counts > 0).any() else 0.0
    return PCKResult(per_keypoint=per_kpt, mean=mean, counts=counts)


def bbox_norm(bboxes) -> np.ndarray:
    """``(N, 4)`` xyxy boxes -> ``(N,)`` ``max(w, h)`` (MMPose PCKAccuracy ``norm_item='bbox'``)."""
    b = _np(bboxes).reshape(-1, 4)
    return np.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1])


def mpii_head_size(headboxes) -> np.ndarray:
    """MPII head size: ``(N, 4)`` xyxy (or ``(N, 2, 2)``) head boxes -> ``(N,)`` 0.6 x diagonal."""
    h = _np(headboxes).reshape(-1, 4)
    return 0.6 * np.linalg.norm(h[:, 2:] - h[:, :2], axis=1)


def pckh(pred, gt, visible, headboxes, thr: float = 0.5) -> PCKResult:
    """MPII PCKh: PCK normalised by :func:`mpii_head_size` (default threshold 0.5)."""
    return pck(pred, gt, visible, mpii_head_size(headboxes), thr)


class PCKEvaluator:
    """Accumulate top-down predictions with their ground truth and report PCK.

    Args:
        norm: ``bbox`` (PCK, ``max(w, h)`` of the ground-truth box) or ``head`` (PCKh, head size).
        thr: threshold (0.2 for ``bbox``, 0.5 for MPII ``head``).
        keypoint_names: names for the per-keypoint entries (default: the 21-slot schema).

    :meth:`process` takes dicts with ``instance_id`` (de-duplication key), ``keypoints`` ``(K, 2|3)`` predictions,
    ``gt_keypoints`` ``(K, 2|3)`` and ``gt_visible`` ``(K,)`` (or the third gt column), plus ``bbox`` (xyxy) for
    ``bbox`` or ``head_size`` / ``headbox`` for ``head``.
    """

    def __init__(
        self, norm: Literal["bbox", "head"] = "bbox", thr: float | None = None, keypoint_names=KEYPOINTS
    ) -> None:
        if norm not in ("bbox", "head"):
            raise ValueError(f"norm must be 'bbox' or 'head', got {norm!r}")
        self.norm = norm
        self.thr = float(thr if thr is not None else (0.2 if norm == "bbox" else 0.5))
        self.keypoint_names = tuple(keypoint_names)
        self._preds: list[dict] = []

    def reset(self) -> None:
        self._preds = []

    def __len__(self) -> int:
        return len(self._preds)

    def gather(self) -> None:
        self._preds = gather_predictions(self._preds)

    def process(self, predictions: Iterable[dict]) -> None:
        for p in predictions:
            gt = _np(p["gt_keypoints"])
            vis = _np(p["gt_visible"]) if p.get("gt_visible") is not None else gt[:, 2]
            if self.norm == "bbox":
                norm = float(bbox_norm(p["bbox"])[0])
            elif p.get("head_size") is not None:
                norm = float(p["head_size"])
            else:
                norm = float(mpii_head_size(p["headbox"])[0])
            iid = p.get("instance_id")
            self._preds.append(
                {
                    "instance_id": iid.item() if hasattr(iid, "item") else iid,
                    "pred": _np(p["keypoints"])[:, :2].astype(np.float32),
                    "gt": gt[:, :2].astype(np.float32),
                    "visible": vis > 0,
                    "norm": norm,
                }
            )

    def evaluate(self) -> dict[str, float]:
        """``{'PCK' or 'PCKh': mean, '<name>_<keypoint>': per-keypoint (only keypoints with valid instances)}``."""
        name = "PCK" if self.norm == "bbox" else "PCKh"
        preds = deduplicate(self._preds, key="instance_id")
        if not preds:
            return {name: 0.0}
        res = pck(
            np.stack([p["pred"] for p in preds]),
            np.stack([p["gt"] for p in preds]),
            np.stack([p["visible"] for p in preds]),
            np.array([p["norm"] for p in preds]),
            self.thr,
        )
        out = {name: res.mean}
        names = self.keypoint_names if len(self.keypoint_names) == len(res.per_keypoint) else None
        for i, acc in enumerate(res.per_keypoint):
            if res.counts[i] > 0:
                out[f"{name}_{names[i] if names else i}"] = float(acc)
        return out
