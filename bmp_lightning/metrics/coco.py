"""COCO-style keypoint AP (COCO, OCHuman, CrowdPose) with MMPose's rescoring and optional OKS-NMS.

Protocol (MMPose ``coco_metric.py``; docs/recipes.md#evaluation):

1. predictions are de-duplicated by ``instance_id`` (DDP padding repeats samples);
2. 21-slot predictions are reduced to the dataset's keypoints: the first 17 for COCO / OCHuman, the 14 CrowdPose
   joints through :func:`bmp_lightning.structures.keypoints.from_merged`;
3. instance score (``score_mode='bbox_keypoint'``) = ``bbox_score`` x mean of the keypoint scores ``> 0.2``
   (0 when none passes); ``score_mode='bbox'`` uses ``bbox_score`` alone;
4. optional greedy OKS-NMS per image (all keypoints count, area = mean of the two areas, threshold 0.9);
5. instances whose keypoint scores are all ``<= 0`` are dropped (xtcocotools ignores them; ``bbox_keypoint`` only);
6. pycocotools ``COCOeval(iouType='keypoints')`` with the dataset's sigmas (CrowdPose: 14 sigmas, and the
   ground-truth area taken as ``w*h*0.53`` of the box as xtcocotools does with ``use_area=False``).

BMP's own evaluation uses no OKS-NMS (``nms_mode='none'`` in its configs); MMPose's default is OKS-NMS 0.9.
CrowdPose's AP(easy/medium/hard) are added when its images carry ``crowdIndex`` (subsets split at 0.2 / 0.8).

Command line: :mod:`bmp_lightning.tools.coco_eval`.

Result entries carry ``keypoints`` (flat ``x, y, score`` for 21, 17 or 14 joints); an entry with ``bbox_score`` is
rescored as above, one without keeps its ``score``. ``area`` (or the COCO ``bbox`` ``[x, y, w, h]``) is the OKS-NMS
area. The metrics go to ``out`` (default: ``<results>.metrics.json``), written atomically. An entry with a NaN / inf
keypoint or score is an error naming the file and the entry (``nonfinite=miss``: dropped, its person counted as not
found, the number dropped written as ``nonfinite_dropped``).
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import numpy as np

from bmp_lightning.metrics.cocotools import load_coco_gt, run_cocoeval
from bmp_lightning.metrics.gather import deduplicate, gather_predictions
from bmp_lightning.metrics.oks import default_sigmas, oks_nms
from bmp_lightning.structures.files import atomic_write_json
from bmp_lightning.structures.keypoints import NUM_KEYPOINTS, SOURCE_NUM_KEYPOINTS, from_merged
from bmp_lightning.structures.records import BadSampleError

log = logging.getLogger(__name__)

DATASETS = ("coco", "ochuman", "crowdpose")
KEYPOINT_METRICS = ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")
CROWD_SPLITS = (("AP_easy", 0.0, 0.2), ("AP_medium", 0.2, 0.8), ("AP_hard", 0.8, float("inf")))


def _np(x: Any, dtype=np.float64) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, possibly on an accelerator
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def rescore(bbox_score: float, keypoint_scores: np.ndarray, thr: float = 0.2) -> float:
    """MMPose ``bbox_keypoint`` score: ``bbox_score`` x mean of the keypoint scores above ``thr`` (0 if none)."""
    ks = np.asarray(keypoint_scores, dtype=np.float64)
    valid = ks > thr
    if not valid.any():
        return 0.0
    return float(bbox_score) * float(ks[valid].mean())


class CocoKeypointEvaluator:
    """Accumulate top-down pose predictions and score them with COCO keypoint AP.

    Args:
        ann_file: COCO-format ground truth (COCO person_keypoints, OCHuman, CrowdPose json).
        dataset: ``coco``, ``ochuman`` or ``crowdpose`` (keypoint subset and sigmas).
        score_mode: ``bbox_keypoint`` (rescoring) or ``bbox``.
        keypoint_score_thr: keypoint scores above it enter the rescoring mean.
        nms: ``None`` / ``'none'`` or ``'oks'`` (greedy OKS-NMS per image).
        nms_thr: OKS-NMS threshold.
        use_area: use the ground truth ``area`` in OKS; ``False`` uses ``box w*h*0.53`` (CrowdPose protocol);
            ``None`` picks ``False`` for CrowdPose and ``True`` otherwise.
        sigmas: override the dataset's OKS sigmas ``(K,)``.
        verbose: print pycocotools' final summary table.
        nonfinite: a prediction with a NaN / inf keypoint or score is an ``error`` (:class:`BadSampleError` naming
            it; pycocotools would score NaN keypoints as matches) or, opt-in, a ``miss``: dropped, counted in
            :attr:`nonfinite_dropped` (its person counts as not found).

    Predictions (:meth:`process`) are dicts with ``image_id``, ``instance_id`` (de-duplication key; ``None`` keeps
    the entry), ``keypoints`` ``(21|K, 2|3)``, ``keypoint_scores`` ``(21|K,)`` (or the third keypoint column),
    ``bbox_score`` (default 1, as for ground-truth boxes) or a final ``score``, and for OKS-NMS an area from ``area``,
    ``bbox_scale`` (product, MMPose) or ``bbox`` (xyxy), else the keypoints' extent.
    """

    def __init__(
        self,
        ann_file: str | os.PathLike,
        dataset: Literal["coco", "ochuman", "crowdpose"] = "coco",
        score_mode: Literal["bbox_keypoint", "bbox"] = "bbox_keypoint",
        keypoint_score_thr: float = 0.2,
        nms: Literal["oks", "none"] | None = None,
        nms_thr: float = 0.9,
        use_area: bool | None = None,
        sigmas: Sequence[float] | None = None,
        verbose: bool = True,
        nonfinite: Literal["error", "miss"] = "error",
    ) -> None:
        if dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
        if score_mode not in ("bbox_keypoint", "bbox"):
            raise ValueError(f"score_mode must be 'bbox_keypoint' or 'bbox', got {score_mode!r}")
        nms = None if nms in (None, "none", "None", False) else nms
        if nms not in (None, "oks"):
            raise ValueError(f"nms must be None, 'none' or 'oks', got {nms!r}")
        self.ann_file = os.fspath(ann_file)
        self.dataset = dataset
        self.score_mode = score_mode
        self.keypoint_score_thr = float(keypoint_score_thr)
        self.nms = nms
        self.nms_thr = float(nms_thr)
        self.use_area = (dataset != "crowdpose") if use_area is None else bool(use_area)
        self.num_keypoints = SOURCE_NUM_KEYPOINTS[dataset]
        self.sigmas = default_sigmas(self.num_keypoints, dataset) if sigmas is None else np.asarray(sigmas, float)
        if self.sigmas.shape != (self.num_keypoints,):
            raise ValueError(f"{dataset} needs {self.num_keypoints} sigmas, got {self.sigmas.shape}")
        self.verbose = verbose
        self.nonfinite = check_nonfinite_mode(nonfinite)
        self.nonfinite_dropped: list[str] = []  # the predictions dropped for non-finite values (nonfinite="miss")
        self.category_id = 1  # set from the ground truth's person category when it is loaded
        self._coco = None
        self._preds: list[dict] = []

    # ------------------------------------------------------------------ accumulation
    @property
    def coco_gt(self):
        """The ground truth as a pycocotools ``COCO`` object (loaded lazily, once)."""
        if self._coco is None:
            self._coco = load_coco_gt(self.ann_file, "keypoints", crowd_area=not self.use_area)
            cats = self._coco.dataset["categories"]
            person = [c["id"] for c in cats if c.get("name") == "person"]
            self.category_id = int(person[0] if person else cats[0]["id"])
        return self._coco

    def reset(self) -> None:
        self._preds = []
        self.nonfinite_dropped = []

    def __len__(self) -> int:
        return len(self._preds)

    def process(self, predictions: Iterable[dict]) -> None:
        """Add a batch of per-instance predictions (converted to compact numpy records right away)."""
        for p in predictions:
            p = self._normalise(p)
            if p is not None:
                self._preds.append(p)

    def gather(self) -> None:
        """Collect every rank's predictions into this one (collective under DDP; a no-op otherwise)."""
        self._preds = gather_predictions(self._preds)

    def _normalise(self, p: dict) -> dict | None:
        where = p.get("where") or (
            f"{self.ann_file}: prediction image_id={p.get('image_id')}, instance_id={p.get('instance_id')}"
        )
        try:
            kpts = _np(p["keypoints"])
            image_id = int(p["image_id"])
        except KeyError as err:
            raise BadSampleError(f"{where}: missing key {err}") from err
        if kpts.ndim != 2 or kpts.shape[1] not in (2, 3):
            raise BadSampleError(f"{where}: keypoints must be (K, 2) or (K, 3), got {kpts.shape}")
        if p.get("keypoint_scores") is not None:
            ks = _np(p["keypoint_scores"]).reshape(-1)
        elif kpts.shape[1] == 3:
            ks = kpts[:, 2]
        else:
            raise BadSampleError(f"{where}: no keypoint_scores and no score column in keypoints")
        if ks.shape[0] != kpts.shape[0]:
            raise BadSampleError(f"{where}: {kpts.shape[0]} keypoints but {ks.shape[0]} keypoint scores")
        full = np.concatenate([kpts[:, :2], ks[:, None]], axis=1)  # (K, 3) x, y, score
        scores = [_np(p[k]).reshape(-1)[0] for k in ("bbox_score", "score") if p.get(k) is not None]
        if not (np.isfinite(full).all() and np.isfinite(np.asarray(scores, np.float64)).all()):
            if self.nonfinite == "error":
                raise BadSampleError(
                    f"{where}: non-finite keypoints or scores (NaN / inf would be scored as matches); "
                    "nonfinite='miss' drops such predictions instead"
                )
            self.nonfinite_dropped.append(where)
            return None
        k = full.shape[0]
        if k == NUM_KEYPOINTS:
            full = full[:17] if self.dataset in ("coco", "ochuman") else from_merged(full, self.dataset)
        elif k != self.num_keypoints:
            raise BadSampleError(
                f"{where}: {k} keypoints; {self.dataset} takes {NUM_KEYPOINTS} (merged) or {self.num_keypoints}"
            )
        if "bbox_score" in p or "score" not in p:
            bbox_score = float(p.get("bbox_score", 1.0))
            if self.score_mode == "bbox_keypoint":
                score = rescore(bbox_score, full[:, 2], self.keypoint_score_thr)
            else:
                score = bbox_score
        else:  # an already final score
            bbox_score, score = None, float(p["score"])
        return {
            "image_id": image_id,
            "instance_id": _instance_id(p.get("instance_id")),
            "keypoints": full.astype(np.float32),
            "bbox_score": bbox_score,
            "score": score,
            "area": _area(p, full),
        }

    # ------------------------------------------------------------------ scoring
    def results(self) -> list[dict]:
        """COCO keypoint results after de-duplication, rescoring and NMS (what :meth:`evaluate` scores)."""
        coco = self.coco_gt
        preds = deduplicate(self._preds, key="instance_id")
        known = set(coco.getImgIds())
        unknown = sorted({p["image_id"] for p in preds} - known)
        if unknown:
            raise BadSampleError(f"{self.ann_file}: predictions for image ids not in the ground truth: {unknown[:10]}")
        by_image: dict[int, list[dict]] = defaultdict(list)
        for p in preds:
            by_image[p["image_id"]].append(p)
        out: list[dict] = []
        for image_id in sorted(by_image):
            inst = by_image[image_id]
            if self.nms == "oks" and len(inst) > 1:
                keep = oks_nms(
                    np.stack([i["keypoints"] for i in inst]),
                    np.array([i["score"] for i in inst]),
                    np.array([i["area"] for i in inst]),
                    thr=self.nms_thr,
                    sigmas=self.sigmas,
                )
                inst = [inst[j] for j in keep]
            for i in inst:
                rescored = i["bbox_score"] is not None and self.score_mode == "bbox_keypoint"
                if rescored and not (i["keypoints"][:, 2] > 0).any():
                    continue  # xtcocotools skips detections whose keypoint scores are all zero
                entry = {
                    "image_id": image_id,
                    "category_id": self.category_id,
                    "keypoints": [round(float(v), 4) for v in i["keypoints"].reshape(-1)],
                    "score": float(i["score"]),
                }
                if i["bbox_score"] is not None:
                    entry["bbox_score"] = float(i["bbox_score"])
                if i["instance_id"] is not None:
                    entry["instance_id"] = i["instance_id"]
                out.append(entry)
        return out

    def evaluate(self, outfile_prefix: str | os.PathLike | None = None) -> dict[str, float]:
        """Score the accumulated predictions; write ``<outfile_prefix>.keypoints.json`` when asked.

        Returns ``AP, AP50, AP75, APm, APl, AR, AR50, AR75, ARm, ARl`` (plus ``AP_easy/medium/hard`` for CrowdPose
        with ``crowdIndex``); all 0 when there is no prediction.
        """
        results = self.results()
        if self.nonfinite_dropped:
            log.warning("%s: %d predictions with non-finite values dropped (counted as misses), e.g. %s",
                        self.ann_file, len(self.nonfinite_dropped), self.nonfinite_dropped[0])  # fmt: skip
        if outfile_prefix is not None:
            path = atomic_write_json(f"{os.fspath(outfile_prefix)}.keypoints.json", results, indent=None)
            log.info("keypoint results written to %s", path)
        if not results:
            log.warning("%s: no keypoint predictions to evaluate; AP is 0", self.ann_file)
            return {name: 0.0 for name in KEYPOINT_METRICS}
        ev = run_cocoeval(
            self.coco_gt, results, "keypoints", cat_ids=[self.category_id], sigmas=self.sigmas, verbose=self.verbose
        )
        metrics = {name: float(v) for name, v in zip(KEYPOINT_METRICS, ev.stats)}
        if self.dataset == "crowdpose":
            metrics.update(self._crowd_splits(results))
        return metrics

    def _crowd_splits(self, results: list[dict]) -> dict[str, float]:
        images = self.coco_gt.dataset["images"]
        if not images or any("crowdIndex" not in im for im in images):
            return {}
        out = {}
        for name, lo, hi in CROWD_SPLITS:
            ids = [im["id"] for im in images if lo <= im["crowdIndex"] < hi]
            if not ids:
                continue
            ev = run_cocoeval(
                self.coco_gt, results, "keypoints", [self.category_id], self.sigmas, img_ids=ids, verbose=False
            )
            out[name] = float(ev.stats[0])
        return out


def check_nonfinite_mode(mode: str) -> str:
    if mode not in ("error", "miss"):
        raise ValueError(f"nonfinite must be 'error' or 'miss', got {mode!r}")
    return mode


def _instance_id(value: Any) -> Any:
    if value is None:
        return None
    if hasattr(value, "item"):
        value = value.item()
    return int(value) if isinstance(value, (int, np.integer, float)) and float(value).is_integer() else value


def _area(p: dict, kpts: np.ndarray) -> float:
    """OKS-NMS area: ``area``, else the product of ``bbox_scale`` (MMPose), else xyxy ``bbox``, else keypoint extent."""
    if p.get("area") is not None:
        return float(_np(p["area"]).reshape(-1)[0])
    if p.get("bbox_scale") is not None:
        return float(np.prod(_np(p["bbox_scale"]).reshape(-1)[:2]))
    if p.get("bbox") is not None:
        b = _np(p["bbox"]).reshape(-1)
        return float(max(b[2] - b[0], 0.0) * max(b[3] - b[1], 0.0))
    xy = kpts[:, :2]
    return float(np.ptp(xy[:, 0]) * np.ptp(xy[:, 1]))


# ---------------------------------------------------------------------- CLI
def results_to_predictions(results: list[dict], source: str = "results") -> list[dict]:
    """COCO keypoint results (flat ``x, y, score`` keypoints) -> predictions for ``CocoKeypointEvaluator.process``."""
    preds = []
    for n, r in enumerate(results):
        if not isinstance(r, dict) or "keypoints" not in r or "image_id" not in r:
            raise BadSampleError(f"{source}: entry {n} is not a keypoint result (needs 'image_id' and 'keypoints')")
        kpts = np.asarray(r["keypoints"], dtype=np.float64)
        if kpts.size % 3:
            raise BadSampleError(f"{source}: entry {n} keypoints length {kpts.size} is not a multiple of 3")
        p: dict[str, Any] = {
            "image_id": r["image_id"],
            "keypoints": kpts.reshape(-1, 3),
            "where": f"{source}: entry {n} (image_id={r['image_id']})",
        }
        if "bbox_score" in r:
            p["bbox_score"] = r["bbox_score"]
        else:
            p["score"] = r.get("score", 1.0)
        if r.get("area") is not None:
            p["area"] = r["area"]
        elif r.get("bbox") is not None and len(r["bbox"]) == 4:
            x, y, w, h = r["bbox"]
            p["bbox"] = [x, y, x + w, y + h]
        p["instance_id"] = r.get("instance_id")
        preds.append(p)
    return preds


def format_table(metrics: dict[str, float], title: str = "") -> str:
    """A two-column text table of the metrics."""
    width = max((len(k) for k in metrics), default=6)
    lines = [title] if title else []
    lines += [f"{'metric':<{width}}  value", f"{'-' * width}  ------"]
    lines += [f"{k:<{width}}  {v:6.4f}" for k, v in metrics.items()]
    return "\n".join(lines)
