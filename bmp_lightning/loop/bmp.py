"""The BMP loop: detect -> MaskPose -> pose-NMS -> SAM 2 -> exclusive masks -> mask out -> detect again.

Reference: BBoxMaskPose v1.1 ``demo/bmp_demo.py``; docs/method.md#the-loop-step-by-step. Per image and iteration:

1. detect on the current image (original, then with the people found so far painted black): keep
   ``label == person``, ``score > thr``, greedy box NMS, at most ``max_dets``;
2. pose on the ORIGINAL image, each box with its detector mask; the loop uses the first 17 keypoints;
3. pose-NMS of the kept instances ("old") followed by the new ones;
4. SAM on the original image for the surviving new instances (keypoint prompts), masks made exclusive by score
   against the kept old instances (only the new masks change);
5. merge (old kept, or all old under ``remove_suppressed_old=False``, then new);
6. paint all refined masks black on a copy of the original: the next iteration's detector input.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from bmp_lightning.loop.config import LoopConfig, resolve_loop_config
from bmp_lightning.loop.pose_nms import pose_nms
from bmp_lightning.loop.prompts import select_negative_prompts, select_prompt_keypoints
from bmp_lightning.structures.io import as_rgb_array
from bmp_lightning.structures.keypoints import COCO_SIGMAS, NUM_COCO_KEYPOINTS
from bmp_lightning.structures.mask_ops import box_nms, exclusive_masks, paint, painted_region


@runtime_checkable
class DetectorLike(Protocol):
    """``detector(image RGB uint8 (H, W, 3))`` -> dict (or object, or a one-element list of either) with
    ``bboxes (N, 4)`` xyxy, ``scores (N,)``, optional ``labels (N,)`` and ``masks (N, H, W)`` bool."""

    def __call__(self, image: np.ndarray) -> Any: ...


@runtime_checkable
class PoseLike(Protocol):
    """``pose(image RGB uint8, bboxes (N, 4) xyxy, masks (N, H, W) bool or None)`` ->
    ``(keypoints (N, K, 2), scores (N, K))``, K = 17 or 21 (COCO order first)."""

    def pose(self, image: np.ndarray, bboxes: np.ndarray, masks: np.ndarray | None = None) -> Any: ...


@runtime_checkable
class SegmenterLike(Protocol):
    """SAM-like: ``set_image(image uint8)`` once per image, then ``predict(points, labels, boxes=None,
    max_hole_area=..., max_sprinkle_area=...)`` -> ``(masks (N, H, W) bool, scores (N,))`` (see ``Sam2Segmenter``)."""

    def set_image(self, image: np.ndarray) -> None: ...

    def predict(self, points: list, labels: list, boxes: np.ndarray | None = None, **kwargs: Any) -> Any: ...


@dataclass
class Person:
    """One person found by the loop.

    Attributes:
        bbox: ``(4,)`` detector xyxy box.
        mask: ``(H, W)`` bool refined (SAM, exclusive) mask.
        keypoints: ``(K, 2)`` xy, K as the pose model outputs (17 or 21).
        keypoint_scores: ``(K,)``.
        score: mean of the first 17 keypoint scores.
        bbox_score: detector score.
        sam_score: score the mask was ranked with for exclusivity: SAM's predicted IoU; the detector score with
            ``segmenter=none``; 0 for a person without prompt that kept its detector mask.
        iteration: 1-based BMP iteration that found the person.
        prompts: ``(P, 3)`` SAM positive prompt points (x, y, keypoint score).
        det_mask: ``(H, W)`` bool detector mask (what MaskPose saw), or ``None``.
    """

    bbox: np.ndarray
    mask: np.ndarray
    keypoints: np.ndarray
    keypoint_scores: np.ndarray
    score: float
    bbox_score: float
    sam_score: float
    iteration: int
    prompts: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    det_mask: np.ndarray | None = None

    def keypoints17(self) -> np.ndarray:
        """``(17, 3)`` (x, y, score) the loop works with."""
        k = NUM_COCO_KEYPOINTS
        return np.concatenate([self.keypoints[:k], self.keypoint_scores[:k, None]], axis=1).astype(np.float64)


@dataclass
class IterationSnapshot:
    """What one iteration saw and did.

    Attributes:
        iteration: 1-based.
        det_bboxes / det_scores: ``(D, 4)`` / ``(D,)`` detections after the person/score/NMS filter.
        new_indices: detections that survived pose-NMS and became people (indices into ``det_bboxes``).
        kept_old: indices (into the previous iteration's people) kept by pose-NMS.
        persons: the people after this iteration (what per-iteration evaluation scores).
        timings: seconds, ``detector`` / ``pose`` / ``sam`` / ``total``.
        image: ``(H, W, 3)`` the detector's input (only with ``return_iterations=True``).
        det_masks: ``(D, H, W)`` detector masks (only with ``return_iterations=True``).
        skipped: why the iteration stopped early (``no detections``, ``no new instance``), else ``""``.
        painted_dropped: detections dropped for lying on painted-out pixels (``loop.max_painted_overlap``); they are
            not in ``det_bboxes``.
    """

    iteration: int
    det_bboxes: np.ndarray
    det_scores: np.ndarray
    new_indices: np.ndarray
    kept_old: np.ndarray
    persons: list[Person]
    timings: dict[str, float]
    image: np.ndarray | None = None
    det_masks: np.ndarray | None = None
    skipped: str = ""
    painted_dropped: int = 0


@dataclass
class BMPResult:
    """People found in one image plus the per-iteration record."""

    persons: list[Person]
    iterations: list[IterationSnapshot]
    image_size: tuple[int, int]

    @property
    def timings(self) -> dict[str, float]:
        """Summed seconds over iterations: ``detector``, ``pose``, ``sam``, ``total``."""
        out = {"detector": 0.0, "pose": 0.0, "sam": 0.0, "total": 0.0}
        for it in self.iterations:
            for key in out:
                out[key] += it.timings.get(key, 0.0)
        return out

    def arrays(self, persons: list[Person] | None = None) -> dict[str, np.ndarray]:
        """Stacked arrays: ``bboxes (N, 4)``, ``masks (N, H, W)``, ``keypoints (N, K, 2)``, ``keypoint_scores (N, K)``,
        ``scores``, ``bbox_scores``, ``sam_scores``, ``iterations (N,)``."""
        persons = self.persons if persons is None else persons
        h, w = self.image_size
        k = persons[0].keypoints.shape[0] if persons else NUM_COCO_KEYPOINTS
        if not persons:
            return {
                "bboxes": np.zeros((0, 4), np.float32),
                "masks": np.zeros((0, h, w), bool),
                "keypoints": np.zeros((0, k, 2), np.float32),
                "keypoint_scores": np.zeros((0, k), np.float32),
                "scores": np.zeros(0, np.float32),
                "bbox_scores": np.zeros(0, np.float32),
                "sam_scores": np.zeros(0, np.float32),
                "iterations": np.zeros(0, np.int64),
            }
        return {
            "bboxes": np.stack([p.bbox for p in persons]).astype(np.float32),
            "masks": np.stack([p.mask for p in persons]).astype(bool),
            "keypoints": np.stack([p.keypoints for p in persons]).astype(np.float32),
            "keypoint_scores": np.stack([p.keypoint_scores for p in persons]).astype(np.float32),
            "scores": np.array([p.score for p in persons], np.float32),
            "bbox_scores": np.array([p.bbox_score for p in persons], np.float32),
            "sam_scores": np.array([p.sam_score for p in persons], np.float32),
            "iterations": np.array([p.iteration for p in persons], np.int64),
        }


def _get(result: Any, key: str) -> Any:
    if isinstance(result, Mapping):
        return result.get(key)
    return getattr(result, key, None)


def _np(x: Any) -> np.ndarray | None:
    if x is None:
        return None
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _box_masks(bboxes: np.ndarray, h: int, w: int) -> np.ndarray:
    """Filled-box masks for a detector without masks."""
    out = np.zeros((len(bboxes), h, w), dtype=bool)
    for i, (x1, y1, x2, y2) in enumerate(bboxes):
        x1, y1 = max(int(np.floor(x1)), 0), max(int(np.floor(y1)), 0)
        out[i, y1 : max(int(np.ceil(y2)), y1), x1 : max(int(np.ceil(x2)), x1)] = True
    return out


class BMP:
    """BBoxMaskPose: iterative detection, pose estimation and segmentation of crowded people.

    Args:
        detector: see ``DetectorLike`` (``bmp_lightning.detector.Detector``).
        pose: see ``PoseLike`` (``PoseEstimator`` with ``.pose(image, bboxes, masks)``).
        segmenter: see ``SegmenterLike`` (``Sam2Segmenter``); required unless ``loop.segmenter == 'none'``.
        loop: a preset name (``bmp_d3``, ``bmp_v1_exact``), a ``LoopConfig`` or a mapping of its fields.
    """

    def __init__(
        self,
        detector: DetectorLike,
        pose: PoseLike,
        segmenter: SegmenterLike | None = None,
        loop: str | LoopConfig | Mapping[str, Any] = "bmp_d3",
    ) -> None:
        self.detector = detector
        self.pose_model = pose
        self.segmenter = segmenter
        self.cfg = resolve_loop_config(loop)
        if self.cfg.segmenter == "sam2" and segmenter is None:
            raise ValueError(
                "loop.segmenter=sam2 needs a segmenter (e.g. Sam2Segmenter.from_pretrained()); "
                "pass one or set loop.segmenter=none to keep the detector masks"
            )

    @classmethod
    def from_pretrained(
        cls,
        detector: str = "rtmdet-l-bmp",
        pose: str = "maskpose-b",
        sam: str = "sam2.1-b+",
        loop: str | LoopConfig | Mapping[str, Any] = "bmp_d3",
        device: str = "cpu",
    ) -> BMP:
        """The paper's loop with the published weights by name: BMP's RTMDet-Ins-L and MaskPose-B
        (``vrg-prague/BBoxMaskPose``) and Meta's SAM 2.1 Hiera-B+ (``facebook/sam2.1-hiera-base-plus``), fetched
        with huggingface_hub and cached; any of them may be a local path instead.

        Raises:
            WeightsUnavailableError: offline and not cached (names the repository, the file and the command).
        """
        from bmp_lightning.loop.build import build_bmp

        return build_bmp(detector, pose, sam, loop=loop, device=device)

    # -- steps -------------------------------------------------------------------------------------------------
    def detect(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Step 1: ``(bboxes (D, 4), scores (D,), masks (D, H, W) bool or None)`` of people, by descending score."""
        cfg = self.cfg
        raw = self.detector(image)
        if isinstance(raw, (list, tuple)) and len(raw) == 1 and not isinstance(raw[0], (int, float)):
            raw = raw[0]
        bboxes = _np(_get(raw, "bboxes"))
        scores = _np(_get(raw, "scores"))
        if bboxes is None or scores is None:
            raise ValueError("detector output needs 'bboxes' and 'scores'")
        scores = scores.reshape(-1)
        # Compare in the detector's own float dtype, as upstream (float32 0.3 is not > 0.3 there).
        thr = np.asarray(cfg.det_score_thr, dtype=scores.dtype if scores.dtype.kind == "f" else np.float64)
        keep = scores > thr
        bboxes = bboxes.reshape(-1, 4).astype(np.float64)
        scores = scores.astype(np.float64)
        labels = _np(_get(raw, "labels"))
        masks = _np(_get(raw, "masks"))
        if labels is not None:
            keep &= labels.reshape(-1) == cfg.person_label
        idx = np.flatnonzero(keep)
        idx = idx[np.argsort(scores[idx], kind="stable")[::-1]]
        idx = idx[box_nms(bboxes[idx], scores[idx], cfg.det_nms_iou, cfg.nms_plus_one)][: cfg.max_dets]
        out_masks = masks[idx].astype(bool) if masks is not None else None
        return bboxes[idx], scores[idx], out_masks

    def _run_pose(self, image: np.ndarray, bboxes: np.ndarray, masks: np.ndarray | None):
        fn = getattr(self.pose_model, "pose", None) or self.pose_model
        kpts, kscores = fn(image, bboxes, masks)
        kpts = _np(kpts).astype(np.float64)
        kscores = _np(kscores).astype(np.float64)
        if kpts.ndim != 3 or kpts.shape[0] != len(bboxes) or kpts.shape[1] < NUM_COCO_KEYPOINTS:
            raise ValueError(f"pose output must be (N={len(bboxes)}, K>=17, 2) keypoints, got {kpts.shape}")
        return kpts[..., :2], kscores.reshape(kpts.shape[:2])

    def _refine(
        self,
        sam_image: np.ndarray,
        new: list[Person],
        old: list[Person],
        state: dict[str, bool],
    ) -> None:
        """Step 4 on the new people (in place): masks from SAM (or kept from the detector), then exclusivity."""
        cfg = self.cfg
        if cfg.segmenter == "sam2":
            if not state.get("image_set"):
                self.segmenter.set_image(sam_image)  # the original image: one embedding per image, all iterations
                state["image_set"] = True
            zeroed = [p.keypoints17() for p in new]
            for z in zeroed:
                z[z[:, 2] < cfg.confidence_thr] = 0.0
            old_zeroed = [p.keypoints17() for p in old]
            for z in old_zeroed:
                z[z[:, 2] < cfg.confidence_thr] = 0.0
            points, labels, boxes, asked = [], [], [], []
            for i, p in enumerate(new):
                pos = select_prompt_keypoints(
                    p.keypoints17(),
                    num_pos=cfg.num_pos_keypoints,
                    conf_thr=cfg.confidence_thr,
                    visibility_thr=cfg.visibility_thr,
                    index_slip=cfg.prompt_index_slip,
                    zero_point_fallback=cfg.empty_prompt_fallback == "zero_points",
                )
                p.prompts = pos
                pts, lab = pos[:, :2].astype(np.float32), np.ones(len(pos), np.int64)
                if cfg.num_neg_keypoints > 0:
                    others = old_zeroed + [z for j, z in enumerate(zeroed) if j != i]
                    center = np.array([(p.bbox[0] + p.bbox[2]) / 2, (p.bbox[1] + p.bbox[3]) / 2])
                    neg = select_negative_prompts(
                        np.stack(others) if others else None, center, cfg.num_neg_keypoints, cfg.confidence_thr
                    )
                    pts = np.concatenate([pts, neg], axis=0)
                    lab = np.concatenate([lab, np.zeros(len(neg), np.int64)])
                if len(pts) == 0 and not cfg.use_bbox:
                    # No prompt: keep the detector mask, rank it below every SAM mask.
                    p.sam_score = 0.0
                    continue
                points.append(pts)
                labels.append(lab)
                boxes.append(p.bbox)
                asked.append(i)
            if asked:
                masks, scores = self.segmenter.predict(
                    points,
                    labels,
                    boxes=np.stack(boxes) if cfg.use_bbox else None,
                    max_hole_area=cfg.sam_max_hole_area,
                    max_sprinkle_area=cfg.sam_max_sprinkle_area,
                )
                for k, i in enumerate(asked):
                    new[i].mask = np.asarray(masks[k]).astype(bool)
                    new[i].sam_score = float(scores[k])
        n_masks = len(new) + len(old)
        if cfg.exclusive_masks and n_masks > 1:
            stack = np.stack([p.mask for p in new] + [p.mask for p in old])
            ranks = np.array([p.sam_score for p in new] + [p.sam_score for p in old])
            excl = exclusive_masks(stack, ranks)
            for i, p in enumerate(new):
                p.mask = excl[i]

    # -- the loop ----------------------------------------------------------------------------------------------
    def __call__(self, image: np.ndarray | str | os.PathLike, return_iterations: bool = False) -> BMPResult:
        """Run the loop on one image (RGB uint8 array or path)."""
        cfg = self.cfg
        original = as_rgb_array(image)
        h, w = original.shape[:2]
        sam_image = np.ascontiguousarray(original[..., ::-1]) if cfg.sam_input_bgr else original
        persons: list[Person] = []
        det_image = original
        painted: np.ndarray | None = None  # (H, W) bool area painted out of det_image
        snapshots: list[IterationSnapshot] = []
        state: dict[str, bool] = {}
        empty = np.zeros(0, np.int64)

        for it in range(1, cfg.num_iters + 1):
            times = {"detector": 0.0, "pose": 0.0, "sam": 0.0}
            t_start = time.perf_counter()
            bboxes, scores, det_masks = self.detect(det_image)
            dropped = 0
            if painted is not None and det_masks is not None and cfg.max_painted_overlap < 1.0 and len(bboxes):
                area = det_masks.sum(axis=(1, 2))
                on_painted = (det_masks & painted[None]).sum(axis=(1, 2))
                keep = on_painted <= cfg.max_painted_overlap * np.maximum(area, 1)
                dropped = int((~keep).sum())
                bboxes, scores, det_masks = bboxes[keep], scores[keep], det_masks[keep]
            times["detector"] = time.perf_counter() - t_start
            snap = IterationSnapshot(
                iteration=it,
                det_bboxes=bboxes,
                det_scores=scores,
                new_indices=empty,
                kept_old=np.arange(len(persons)),
                persons=list(persons),
                timings=times,
                image=det_image if return_iterations else None,
                det_masks=det_masks if return_iterations else None,
                painted_dropped=dropped,
            )
            snapshots.append(snap)
            if len(bboxes) == 0:
                snap.skipped = "no detections"
                times["total"] = time.perf_counter() - t_start
                continue

            t0 = time.perf_counter()
            kpts, kscores = self._run_pose(original, bboxes, det_masks)  # always the ORIGINAL image
            times["pose"] = time.perf_counter() - t0

            new_k17 = np.concatenate([kpts[:, :NUM_COCO_KEYPOINTS], kscores[:, :NUM_COCO_KEYPOINTS, None]], axis=2)
            all_k17 = np.concatenate([np.stack([p.keypoints17() for p in persons]), new_k17]) if persons else new_k17
            all_boxes = np.concatenate([np.stack([p.bbox for p in persons]), bboxes]) if persons else bboxes
            keep_old, keep_new = pose_nms(
                all_k17,
                all_boxes,
                num_old=len(persons),
                thr=cfg.oks_nms_thr,
                conf_thr=cfg.confidence_thr,
                sigmas=COCO_SIGMAS,
                area_mode="xyxy_as_xywh" if cfg.oks_area_from_xyxy_as_xywh else "box",
            )
            if len(keep_new) == 0:
                snap.skipped = "no new instance"  # nothing changes, old suppressions included (as upstream)
                times["total"] = time.perf_counter() - t_start
                continue

            fallback_masks = det_masks if det_masks is not None else _box_masks(bboxes, h, w)
            new = [
                Person(
                    bbox=bboxes[d].copy(),
                    mask=fallback_masks[d].copy(),
                    keypoints=kpts[d].copy(),
                    keypoint_scores=kscores[d].copy(),
                    score=float(kscores[d, :NUM_COCO_KEYPOINTS].mean()),
                    bbox_score=float(scores[d]),
                    sam_score=float(scores[d]),
                    iteration=it,
                    det_mask=det_masks[d] if det_masks is not None else None,
                )
                for d in keep_new
            ]
            old_kept = [persons[i] for i in keep_old]

            t0 = time.perf_counter()
            self._refine(sam_image, new, old_kept, state)
            times["sam"] = time.perf_counter() - t0

            persons = (old_kept if cfg.remove_suppressed_old else persons) + new
            painted = painted_region(
                np.stack([p.mask for p in persons]), (h, w), cfg.maskout, cfg.maskout_min_area, cfg.maskout_dilate
            )
            det_image = paint(original, painted, fill=0)  # black, as upstream
            snap.new_indices = np.asarray(keep_new, np.int64)
            snap.kept_old = np.asarray(keep_old, np.int64)
            snap.persons = list(persons)
            times["total"] = time.perf_counter() - t_start

        return BMPResult(persons=persons, iterations=snapshots, image_size=(h, w))
