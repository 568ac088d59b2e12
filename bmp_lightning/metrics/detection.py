"""COCO box / mask AP for the detector and the BMP loop (pycocotools ``bbox`` and ``segm``).

Predictions are converted to COCO results right away (boxes to ``[x, y, w, h]``, masks to compressed RLE), so the
evaluator holds no full-size masks. Segm results carry their box too (as MMDetection and detectron2 write them), so
pycocotools takes a segm detection's area from the box. Only categories present in both ``category_ids`` and the
ground truth are scored: an 80-class detector can be evaluated on a person-only json.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from bmp_lightning.metrics.cocotools import load_coco_gt, run_cocoeval
from bmp_lightning.metrics.gather import deduplicate, gather_predictions
from bmp_lightning.structures.files import atomic_write_json
from bmp_lightning.structures.records import BadSampleError

log = logging.getLogger(__name__)

DETECTION_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def _np(x: Any, dtype=None) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x) if dtype is None else np.asarray(x, dtype=dtype)


def encode_masks(masks: Any) -> list[dict]:
    """``(N, H, W)`` binary masks -> compressed RLEs with json-friendly ``counts`` strings (RLE dicts pass through)."""
    if isinstance(masks, (list, tuple)) and (len(masks) == 0 or isinstance(masks[0], dict)):
        out = []
        for rle in masks:
            rle = dict(rle)
            if isinstance(rle.get("counts"), bytes):
                rle["counts"] = rle["counts"].decode("ascii")
            out.append(rle)
        return out
    m = _np(masks)
    if m.ndim != 3:
        raise ValueError(f"masks must be (N, H, W), got {m.shape}")
    if m.shape[0] == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(m.transpose(1, 2, 0).astype(np.uint8)))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


class CocoDetectionEvaluator:
    """Accumulate per-image detections and score COCO box and/or mask AP.

    Args:
        ann_file: COCO-format ground truth (instances json, or a person keypoints json).
        iou_types: any of ``bbox``, ``segm``.
        category_ids: COCO category id of each label index (``labels == i`` -> ``category_ids[i]``).
        verbose: print pycocotools' final summary tables.
        nonfinite: a detection with a NaN / inf box coordinate or score is an ``error`` (:class:`BadSampleError`
            naming the image and the detection) or, opt-in, a ``miss``: dropped and counted in
            :attr:`nonfinite_dropped`.

    :meth:`process` takes dicts with ``image_id``, ``bboxes`` ``(N, 4)`` xyxy pixels, ``scores`` ``(N,)``,
    ``labels`` ``(N,)`` (default 0) and, for ``segm``, ``masks`` ``(N, H, W)`` bool or a list of RLE dicts.
    One dict per image; repeated images (DDP padding) are dropped by ``image_id``.
    """

    def __init__(
        self,
        ann_file: str | os.PathLike,
        iou_types: Sequence[str] = ("bbox", "segm"),
        category_ids: Sequence[int] = (1,),
        verbose: bool = True,
        nonfinite: str = "error",
    ) -> None:
        iou_types = (iou_types,) if isinstance(iou_types, str) else tuple(iou_types)
        if not iou_types or any(t not in ("bbox", "segm") for t in iou_types):
            raise ValueError(f"iou_types must be a non-empty subset of ('bbox', 'segm'), got {iou_types}")
        self.ann_file = os.fspath(ann_file)
        self.iou_types = iou_types
        self.category_ids = tuple(int(c) for c in category_ids)
        self.verbose = verbose
        if nonfinite not in ("error", "miss"):
            raise ValueError(f"nonfinite must be 'error' or 'miss', got {nonfinite!r}")
        self.nonfinite = nonfinite
        self.nonfinite_dropped: list[str] = []
        self._coco: dict[str, Any] = {}
        self._images: list[dict] = []

    def coco_gt(self, iou_type: str = "bbox"):
        """Ground truth as a pycocotools ``COCO`` object for ``iou_type`` (loaded lazily)."""
        if iou_type not in self._coco:
            self._coco[iou_type] = load_coco_gt(self.ann_file, iou_type)
        return self._coco[iou_type]

    def reset(self) -> None:
        self._images = []
        self.nonfinite_dropped = []

    def __len__(self) -> int:
        return len(self._images)

    def gather(self) -> None:
        """Collect every rank's predictions (collective under DDP; a no-op otherwise)."""
        self._images = gather_predictions(self._images)

    def process(self, predictions: Iterable[dict]) -> None:
        """Add per-image detections (converted to COCO results entries immediately)."""
        for p in predictions:
            self._images.append(self._convert(p))

    def _convert(self, p: dict) -> dict:
        where = f"{self.ann_file}: detections for image_id={p.get('image_id')}"
        try:
            image_id = int(p["image_id"])
            boxes = _np(p["bboxes"], np.float64).reshape(-1, 4)
            scores = _np(p["scores"], np.float64).reshape(-1)
        except KeyError as err:
            raise BadSampleError(f"{where}: missing key {err}") from err
        n = boxes.shape[0]
        labels = _np(p["labels"], np.int64).reshape(-1) if p.get("labels") is not None else np.zeros(n, np.int64)
        if scores.shape[0] != n or labels.shape[0] != n:
            raise BadSampleError(f"{where}: {n} boxes, {scores.shape[0]} scores, {labels.shape[0]} labels")
        if n and (labels.min() < 0 or labels.max() >= len(self.category_ids)):
            raise BadSampleError(f"{where}: labels outside 0..{len(self.category_ids) - 1} (category_ids)")
        rles = None
        if "segm" in self.iou_types:
            if p.get("masks") is None:
                raise BadSampleError(f"{where}: segm evaluation needs 'masks'")
            rles = encode_masks(p["masks"])
            if len(rles) != n:
                raise BadSampleError(f"{where}: {n} boxes but {len(rles)} masks")
        finite = np.isfinite(boxes).all(axis=1) & np.isfinite(scores)
        entries = []
        for i in range(n):
            if not finite[i]:
                what = f"{where}, detection {i}: non-finite box {boxes[i].tolist()} or score {scores[i]}"
                if self.nonfinite == "error":
                    raise BadSampleError(f"{what}; nonfinite='miss' drops such detections instead")
                self.nonfinite_dropped.append(what)
                continue
            x1, y1, x2, y2 = (float(v) for v in boxes[i])
            e = {
                "image_id": image_id,
                "category_id": self.category_ids[int(labels[i])],
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "score": float(scores[i]),
            }
            if rles is not None:
                e["segmentation"] = rles[i]
            entries.append(e)
        return {"image_id": image_id, "entries": entries}

    def results(self, iou_type: str) -> list[dict]:
        """COCO results for ``iou_type`` (de-duplicated by image, restricted to ground-truth categories)."""
        coco = self.coco_gt(iou_type)
        images = deduplicate(self._images, key="image_id")
        unknown = sorted({im["image_id"] for im in images} - set(coco.getImgIds()))
        if unknown:
            raise BadSampleError(f"{self.ann_file}: detections for image ids not in the ground truth: {unknown[:10]}")
        if iou_type == "segm":
            self._check_mask_sizes(coco, images)
        cats = set(coco.getCatIds())
        out = []
        for im in images:
            for e in im["entries"]:
                if e["category_id"] not in cats:
                    continue
                out.append(e if iou_type == "segm" else {k: v for k, v in e.items() if k != "segmentation"})
        return out

    def _check_mask_sizes(self, coco, images: list[dict]) -> None:
        for im in images:
            info = coco.imgs[im["image_id"]]
            for e in im["entries"]:
                size = e["segmentation"]["size"]
                if "height" in info and (size[0], size[1]) != (info["height"], info["width"]):
                    raise BadSampleError(
                        f"{self.ann_file}: image_id={im['image_id']} masks are {size[0]}x{size[1]}, "
                        f"the image is {info['height']}x{info['width']}"
                    )

    def evaluate(self, outfile_prefix: str | os.PathLike | None = None) -> dict[str, float]:
        """Score every iou type: ``{bbox,segm}_{AP,AP50,AP75,APs,APm,APl,AR1,AR10,AR100,ARs,ARm,ARl}``.

        Writes ``<outfile_prefix>.{bbox,segm}.json`` when asked; metrics are 0 when there is no detection.
        """
        metrics: dict[str, float] = {}
        if self.nonfinite_dropped:
            log.warning("%s: %d detections with non-finite values dropped (counted as misses), e.g. %s",
                        self.ann_file, len(self.nonfinite_dropped), self.nonfinite_dropped[0])  # fmt: skip
        for iou_type in self.iou_types:
            results = self.results(iou_type)
            if outfile_prefix is not None:
                atomic_write_json(f"{os.fspath(outfile_prefix)}.{iou_type}.json", results, indent=None)
            if not results:
                log.warning("%s: no %s detections to evaluate; AP is 0", self.ann_file, iou_type)
                metrics.update({f"{iou_type}_{m}": 0.0 for m in DETECTION_METRICS})
                continue
            coco = self.coco_gt(iou_type)
            cat_ids = sorted(set(self.category_ids) & set(coco.getCatIds()))
            if self.verbose:
                print(f"COCO {iou_type} AP")
            ev = run_cocoeval(coco, results, iou_type, cat_ids=cat_ids, verbose=self.verbose)
            metrics.update({f"{iou_type}_{m}": float(v) for m, v in zip(DETECTION_METRICS, ev.stats)})
        return metrics
