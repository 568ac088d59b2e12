"""Annotation readers: COCO-format keypoint json, MMPose's MPII list json, person-detection results.

Every reader returns :class:`~bmp_lightning.structures.records.PersonRecord` objects in the merged 21-keypoint schema
(:func:`bmp_lightning.structures.keypoints.to_merged`). The instance filters are the upstream ones (MMPose
``BaseCocoStyleDataset._is_valid_instance``, BMP fork): an annotation is dropped, silently, when it is a crowd,
has ``num_keypoints == 0`` (counted from the keypoints when the field is absent, as in AIC), has an empty box after
clipping to the image, or has all keypoint coordinates <= 0.

Broken input is different from filtered input: a missing or malformed file, an ``images`` entry without an integer
``id``, a ``file_name`` or positive integer ``width`` / ``height``, a repeated image or annotation id, a keypoint list
of the wrong length, a box with negative/zero/non-finite size, or an annotation pointing at an image the file does
not list raises :class:`BadSampleError` naming the file, the entry and the field. With ``skip_bad_samples=True``
such entries are skipped instead, counted in a :class:`ReadReport` and logged once per file.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bmp_lightning.structures.keypoints import NUM_KEYPOINTS, SOURCE_NUM_KEYPOINTS, to_merged
from bmp_lightning.structures.records import BadSampleError, PersonRecord

log = logging.getLogger(__name__)

# MPII boxes are stored as a scale relative to 200 px (MPII's own convention, kept by MMPose).
MPII_PIXEL_STD = 200.0
# How many skip reasons the warning quotes.
_MAX_REASONS_LOGGED = 5


@dataclass
class ReadReport:
    """What a reader kept, filtered (upstream rules) and skipped (bad entries, ``skip_bad_samples=True``)."""

    file: str = ""
    kept: int = 0
    filtered: dict[str, int] = field(default_factory=dict)
    skipped: int = 0
    reasons: list[str] = field(default_factory=list)

    def filter(self, why: str) -> None:
        self.filtered[why] = self.filtered.get(why, 0) + 1

    def skip(self, err: BadSampleError) -> None:
        self.skipped += 1
        self.reasons.append(str(err))

    def log_skips(self) -> None:
        if self.skipped:
            shown = "; ".join(self.reasons[:_MAX_REASONS_LOGGED])
            log.warning("skipped %d bad entries in %s (first reasons: %s)", self.skipped, self.file, shown)


def load_json(path: str | os.PathLike) -> Any:
    """Read a json file; a missing or malformed file raises :class:`BadSampleError` naming it."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise BadSampleError(f"annotation file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BadSampleError(f"malformed json in {path}: {err}") from err


def _keypoint_format(source: str, keypoint_format: str | None) -> str:
    fmt = keypoint_format or source
    if fmt not in SOURCE_NUM_KEYPOINTS and fmt != "merged":
        known = sorted([*SOURCE_NUM_KEYPOINTS, "merged"])
        raise ValueError(f"unknown keypoint format {fmt!r} for source {source!r}; pass keypoint_format= one of {known}")
    return fmt


def _scatter(kpts: np.ndarray, fmt: str) -> np.ndarray:
    """``(K_src, 3)`` -> ``(21, 3)``; ``merged`` input is already in the schema."""
    return kpts.astype(np.float32) if fmt == "merged" else to_merged(kpts.astype(np.float32), fmt)


def _positive_int(value: Any) -> int | None:
    """``value`` as an int when it is a positive integer (``640`` or ``640.0``), else ``None``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if not math.isfinite(value) or value != int(value) or value <= 0:
        return None
    return int(value)


def check_image_entry(img: Any, where: str) -> dict:
    """A COCO ``images`` entry with an integer ``id``, a non-empty ``file_name`` and positive integer ``width`` /
    ``height``; else :class:`BadSampleError` naming ``where`` and the field."""
    if not isinstance(img, dict):
        raise BadSampleError(f"{where}: not a dict")
    if "id" not in img:
        raise BadSampleError(f"{where}: no 'id'")
    if isinstance(img["id"], bool) or not isinstance(img["id"], int):
        raise BadSampleError(f"{where}: 'id' must be an integer, got {img['id']!r}")
    name = img.get("file_name")
    if not isinstance(name, str) or not name.strip():
        raise BadSampleError(f"{where} (id={img['id']}): 'file_name' must be a non-empty string, got {name!r}")
    for key in ("width", "height"):
        if key not in img:
            raise BadSampleError(f"{where} (id={img['id']}, {name}): no '{key}'")
        if _positive_int(img[key]) is None:
            raise BadSampleError(
                f"{where} (id={img['id']}, {name}): '{key}' must be a positive integer, got {img[key]!r}"
            )
    return img


def _image_index(
    data: dict, path: str, skip_bad_samples: bool = False, report: ReadReport | None = None
) -> tuple[dict[int, dict], dict[Any, str]]:
    """``{image id: entry}`` of a COCO-format json and ``{image id: why}`` of the entries skipped.

    Every entry must pass :func:`check_image_entry` and ids must be unique; with ``skip_bad_samples`` a bad entry
    is skipped (counted in ``report``), and a repeated id drops every entry of that id (which one the annotations
    mean is unknown).
    """
    images = data.get("images")
    if not isinstance(images, list):
        raise BadSampleError(f"{path}: no 'images' list (not a COCO-format json)")
    index: dict[int, dict] = {}
    first: dict[int, int] = {}
    skipped: dict[Any, str] = {}
    for i, img in enumerate(images):
        try:
            check_image_entry(img, f"{path}, images[{i}]")
            if img["id"] in first:
                raise BadSampleError(f"{path}, images[{i}]: id {img['id']} repeats images[{first[img['id']]}]")
        except BadSampleError as err:
            if not skip_bad_samples:
                raise
            if report is not None:
                report.skip(err)
            if isinstance(img, dict) and isinstance(img.get("id"), int):
                skipped[img["id"]] = f"images[{i}] skipped ({err})"
                if index.pop(img["id"], None) is not None and report is not None:  # its first entry goes too
                    report.skip(BadSampleError(f"{path}, images[{first[img['id']]}]: id {img['id']} is repeated"))
            continue
        if img["id"] not in skipped:
            first[img["id"]] = i
            index[img["id"]] = img
    return index, skipped


def _annotation_id(ann: dict, i: int, ann_file: str, seen: dict[int, int]) -> int:
    """The annotation's ``id``: an integer, unique in the file (pycocotools and de-duplication key on it)."""
    ann_id = ann.get("id")
    if ann_id is None:
        raise BadSampleError(f"{ann_file}, annotations[{i}]: no 'id'")
    if isinstance(ann_id, bool) or not isinstance(ann_id, int):
        raise BadSampleError(f"{ann_file}, annotations[{i}]: 'id' must be an integer, got {ann_id!r}")
    if ann_id in seen:
        raise BadSampleError(f"{ann_file}, annotations[{i}]: id={ann_id} repeats annotations[{seen[ann_id]}]")
    seen[ann_id] = i
    return ann_id


def _check_box_xywh(box: Any, where: str, allow_zero: bool = False) -> tuple[float, float, float, float]:
    """A raw xywh box must be 4 finite numbers with positive (``allow_zero``: non-negative) width and height."""
    try:
        x, y, w, h = (float(v) for v in box)
    except (TypeError, ValueError) as err:
        raise BadSampleError(f"{where}: bbox must be 4 numbers [x, y, w, h], got {box!r}") from err
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        raise BadSampleError(f"{where}: bbox has non-finite values {box!r}")
    if w < 0 or h < 0 or (not allow_zero and (w == 0 or h == 0)):
        raise BadSampleError(f"{where}: bbox has {'negative' if min(w, h) < 0 else 'zero'} size (w={w}, h={h})")
    return x, y, w, h


def _parse_coco_annotation(
    ann: dict,
    images: dict[int, dict],
    img_dir: str,
    ann_file: str,
    source: str,
    fmt: str,
    num_kpts: int,
    report: ReadReport,
    skipped_images: dict[Any, str],
) -> PersonRecord | None:
    """One COCO annotation -> a record, ``None`` when an upstream filter drops it, or :class:`BadSampleError`."""
    where = f"{ann_file}, annotation id={ann.get('id')}"
    if "bbox" not in ann or "keypoints" not in ann:  # upstream: silently not a keypoint instance
        report.filter("no bbox or keypoints")
        return None
    if ann.get("iscrowd", 0):
        report.filter("iscrowd")
        return None
    img = images.get(ann.get("image_id"))
    if img is None:
        why = skipped_images.get(ann.get("image_id"), "is not in the file's images list")
        raise BadSampleError(f"{where}: image_id={ann.get('image_id')} {why}")
    try:
        kpts = np.asarray(ann["keypoints"], dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise BadSampleError(f"{where}: keypoints are not numbers") from err
    if kpts.ndim != 1 or kpts.size != 3 * num_kpts:
        raise BadSampleError(
            f"{where}: expected {num_kpts} keypoints ({3 * num_kpts} values) for format {fmt!r}, got {kpts.size} values"
        )
    if not np.all(np.isfinite(kpts)):
        raise BadSampleError(f"{where}: keypoints have non-finite values")
    kpts = kpts.reshape(num_kpts, 3)
    # upstream counts labelled joints from the coordinates when the field is absent (AIC has none)
    num_labelled = ann["num_keypoints"] if "num_keypoints" in ann else int(np.count_nonzero(kpts[:, :2].max(axis=1)))
    if num_labelled == 0:
        report.filter("num_keypoints == 0")
        return None
    x, y, w, h = _check_box_xywh(ann["bbox"], where)
    img_w, img_h = int(img["width"]), int(img["height"])
    # clip to [0, size-1] and convert to xyxy (x2 = x + w, no -1), as MMPose does
    x1, y1 = np.clip(x, 0, img_w - 1), np.clip(y, 0, img_h - 1)
    x2, y2 = np.clip(x + w, 0, img_w - 1), np.clip(y + h, 0, img_h - 1)
    if x2 - x1 <= 0 or y2 - y1 <= 0:
        report.filter("empty box after clipping")
        return None
    if kpts[:, :2].max() <= 0:
        report.filter("all keypoint coordinates <= 0")
        return None
    return PersonRecord(
        image_path=os.path.join(img_dir, img["file_name"]),
        image_id=int(img["id"]),
        instance_id=int(ann["id"]),
        source=source,
        bbox=np.array([x1, y1, x2, y2], np.float32),
        keypoints=_scatter(kpts, fmt),
        image_size=(img_h, img_w),
        segmentation=ann.get("segmentation") or None,
        bbox_score=1.0,
        ann_file=ann_file,
    )


def read_coco_keypoints(
    ann_file: str | os.PathLike,
    img_dir: str | os.PathLike,
    source: str = "coco",
    num_keypoints: int | None = None,
    skip_bad_samples: bool = False,
    keypoint_format: str | None = None,
    report: ReadReport | None = None,
) -> list[PersonRecord]:
    """Person instances of a COCO-format keypoint json (COCO, AIC, OCHuman, CrowdPose, BMP ``*_sam_*.json``).

    Args:
        ann_file: the json (``images`` + ``annotations`` with ``keypoints`` and ``bbox`` xywh).
        img_dir: folder the images' ``file_name`` are relative to.
        source: dataset name stored in the records (``coco``, ``aic``, ``ochuman``, ``crowdpose``, ...).
        num_keypoints: expected keypoints per annotation; default: the keypoint format's count.
        skip_bad_samples: skip (count, log) broken annotations instead of raising.
        keypoint_format: mapping into the 21-slot schema (``coco``, ``aic``, ``crowdpose``, ``merged`` ...);
            default: ``source``.
        report: filled with the kept / filtered / skipped counts when given.

    Returns:
        records with ``bbox`` (4,) xyxy clipped to the image, ``keypoints`` (21, 3) with COCO visibility, the raw
        ``segmentation`` (polygons or RLE, decoded lazily) and ``image_size`` (H, W).
    """
    ann_file, img_dir = os.fspath(ann_file), os.fspath(img_dir)
    fmt = _keypoint_format(source, keypoint_format)
    num_kpts = num_keypoints or (NUM_KEYPOINTS if fmt == "merged" else SOURCE_NUM_KEYPOINTS[fmt])
    report = report if report is not None else ReadReport()
    report.file = ann_file
    data = load_json(ann_file)
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise BadSampleError(f"{ann_file}: expected a COCO-format dict with an 'annotations' list")
    images, skipped_images = _image_index(data, ann_file, skip_bad_samples, report)
    records = []
    ann_ids: dict[int, int] = {}
    for i, ann in enumerate(data["annotations"]):
        try:
            if not isinstance(ann, dict):
                raise BadSampleError(f"{ann_file}, annotations[{i}]: not a dict")
            _annotation_id(ann, i, ann_file, ann_ids)
            rec = _parse_coco_annotation(ann, images, img_dir, ann_file, source, fmt, num_kpts, report, skipped_images)
        except BadSampleError as err:
            if not skip_bad_samples:
                raise
            report.skip(err)
            continue
        if rec is not None:
            records.append(rec)
    report.kept = len(records)
    report.log_skips()
    return records


def mpii_box(center: Any, scale: float) -> np.ndarray:
    """MPII ``center``/``scale`` -> xyxy ``(4,)``: square of side scale*200, center y += 15*scale, then -1 (1-based)."""
    cx, cy = float(center[0]), float(center[1])
    side = float(scale) * MPII_PIXEL_STD
    if cx != -1:  # MPII marks unknown centers with -1; those are not shifted
        cy += 15.0 / MPII_PIXEL_STD * side
    cx, cy = cx - 1.0, cy - 1.0
    return np.array([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], np.float32)


def _parse_mpii_entry(
    i: int, ann: Any, img_dir: str, ann_file: str, source: str, num_kpts: int, report: ReadReport
) -> PersonRecord | None:
    where = f"{ann_file}, entry {i}"
    if not isinstance(ann, dict):
        raise BadSampleError(f"{where}: not a dict")
    missing = [k for k in ("image", "center", "scale", "joints", "joints_vis") if k not in ann]
    if missing:
        raise BadSampleError(f"{where}: missing field(s) {missing}")
    if not isinstance(ann["image"], str) or not ann["image"].strip():
        raise BadSampleError(f"{where}: 'image' must be a non-empty file name, got {ann['image']!r}")
    where = f"{where} (image {ann['image']})"
    try:
        center = [float(v) for v in ann["center"]]
        scale = float(ann["scale"])
        joints = np.asarray(ann["joints"], dtype=np.float32)
        vis = np.asarray(ann["joints_vis"], dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise BadSampleError(f"{where}: center/scale/joints are not numbers") from err
    if len(center) != 2 or not all(math.isfinite(v) for v in center) or not math.isfinite(scale):
        raise BadSampleError(f"{where}: center must be 2 finite numbers and scale finite")
    if scale <= 0:
        raise BadSampleError(f"{where}: non-positive scale {scale} (zero-size box)")
    if joints.shape != (num_kpts, 2) or vis.shape != (num_kpts,):
        raise BadSampleError(f"{where}: expected {num_kpts} joints and joints_vis, got {joints.shape} and {vis.shape}")
    bbox = mpii_box(center, scale)
    # upstream applies the generic filters to MPII too (no num_keypoints field, no crowd)
    if joints.max() <= 0:
        report.filter("all keypoint coordinates <= 0")
        return None
    kpts = np.concatenate([joints, np.clip(vis, 0, 1)[:, None]], axis=1)  # MPII joints are not shifted by -1
    stem = os.path.splitext(os.path.basename(str(ann["image"])))[0]
    try:
        image_id = int(stem) if stem.isdigit() else int(ann.get("image_id", i))
        instance_id = int(ann.get("id", i))
    except (TypeError, ValueError) as err:
        raise BadSampleError(f"{where}: 'image_id' / 'id' must be integers ({err})") from err
    return PersonRecord(
        image_path=os.path.join(img_dir, str(ann["image"])),
        image_id=image_id,
        instance_id=instance_id,
        source=source,
        bbox=bbox,
        keypoints=to_merged(kpts, "mpii"),
        image_size=None,
        segmentation=ann.get("segmentation") or None,
        bbox_score=1.0,
        ann_file=ann_file,
    )


def read_mpii(
    ann_file: str | os.PathLike,
    img_dir: str | os.PathLike,
    source: str = "mpii",
    skip_bad_samples: bool = False,
    report: ReadReport | None = None,
) -> list[PersonRecord]:
    """Person instances of MMPose's MPII list json (``image``, ``center``, ``scale``, ``joints``, ``joints_vis``).

    The box is MMPose's (:func:`mpii_box`), not clipped; keypoints keep the file's coordinates with visibility
    ``joints_vis`` (0/1). An optional ``segmentation`` (BMP's ``mpii_sam_*.json``) is carried lazily. Instance ids
    are the list positions (as MMPose numbers them) unless the entry has an ``id``; image ids are the numeric file
    stems. ``image_size`` is unknown (``None``) until the image is read.
    """
    ann_file, img_dir = os.fspath(ann_file), os.fspath(img_dir)
    report = report if report is not None else ReadReport()
    report.file = ann_file
    data = load_json(ann_file)
    if not isinstance(data, list):
        raise BadSampleError(f"{ann_file}: expected MMPose's MPII format (a list of person entries)")
    num_kpts = SOURCE_NUM_KEYPOINTS["mpii"]
    records = []
    ids: dict[int, int] = {}  # instance id -> entry
    for i, ann in enumerate(data):
        try:
            rec = _parse_mpii_entry(i, ann, img_dir, ann_file, source, num_kpts, report)
            if rec is not None:
                if rec.instance_id in ids:
                    raise BadSampleError(
                        f"{ann_file}, entry {i}: instance id {rec.instance_id} repeats entry {ids[rec.instance_id]}"
                    )
                ids[rec.instance_id] = i
        except BadSampleError as err:
            if not skip_bad_samples:
                raise
            report.skip(err)
            continue
        if rec is not None:
            records.append(rec)
    report.kept = len(records)
    report.log_skips()
    return records


def read_detections(
    det_file: str | os.PathLike,
    gt_ann_file_or_images: str | os.PathLike | dict | list,
    img_dir: str | os.PathLike,
    category_id: int = 1,
    score_thr: float | None = None,
    source: str = "coco",
    skip_bad_samples: bool = False,
    report: ReadReport | None = None,
) -> list[PersonRecord]:
    """Person boxes from a COCO results json (``image_id``, ``category_id``, ``bbox`` xywh, ``score``).

    Only ``category_id`` is kept; ``score_thr`` keeps ``score >= thr`` (MMPose's ``bbox_score_thr``; ``None``:
    no threshold, the test-set setting). Boxes become xyxy without clipping (zero-size ones are dropped, negative
    ones are errors); keypoints are zero (visibility 0),
    ``bbox_score`` is the detector score and instance ids are fresh (0, 1, ... in file order). A detection's
    ``segmentation`` (RTMDet-Ins json) is carried lazily.

    Args:
        gt_ann_file_or_images: the ground-truth json (for its ``images`` list: file names and sizes), its loaded
            dict, or the ``images`` list itself.
    """
    det_file, img_dir = os.fspath(det_file), os.fspath(img_dir)
    report = report if report is not None else ReadReport()
    report.file = det_file
    if isinstance(gt_ann_file_or_images, list):
        gt_name, gt = "<images list>", {"images": gt_ann_file_or_images}
    elif isinstance(gt_ann_file_or_images, dict):
        gt_name, gt = "<gt dict>", gt_ann_file_or_images
    else:
        gt_name = os.fspath(gt_ann_file_or_images)
        gt = load_json(gt_name)
        if not isinstance(gt, dict):
            raise BadSampleError(f"{gt_name}: expected a COCO-format dict with an 'images' list")
    images, skipped_images = _image_index(gt, gt_name, skip_bad_samples, report)
    dets = load_json(det_file)
    if not isinstance(dets, list):
        raise BadSampleError(f"{det_file}: expected a list of detections (COCO results format)")
    records: list[PersonRecord] = []
    next_id = 0
    for i, det in enumerate(dets):
        where = f"{det_file}, detection {i}"
        try:
            if not isinstance(det, dict) or not {"image_id", "bbox", "score"} <= det.keys():
                raise BadSampleError(f"{where}: needs 'image_id', 'bbox' and 'score'")
            if det.get("category_id", category_id) != category_id:
                report.filter("other category")
                continue
            score = float(det["score"])
            if score_thr is not None and score < score_thr:
                report.filter("score below threshold")
                continue
            img = images.get(det["image_id"])
            if img is None:
                why = skipped_images.get(det["image_id"], f"is not in {gt_name}'s images list")
                raise BadSampleError(f"{where}: image_id={det['image_id']} {why}")
            box = det["bbox"][:4] if isinstance(det["bbox"], list) else det["bbox"]
            x, y, w, h = _check_box_xywh(box, where, allow_zero=True)
            if w == 0 or h == 0:  # a degenerate detector box: nothing to crop (a negative one is an error)
                report.filter("empty box")
                continue
        except BadSampleError as err:
            if not skip_bad_samples:
                raise
            report.skip(err)
            continue
        records.append(
            PersonRecord(
                image_path=os.path.join(img_dir, img["file_name"]),
                image_id=int(img["id"]),
                instance_id=next_id,
                source=source,
                bbox=np.array([x, y, x + w, y + h], np.float32),
                keypoints=np.zeros((NUM_KEYPOINTS, 3), np.float32),
                image_size=(int(img["height"]), int(img["width"])),
                segmentation=det.get("segmentation") or None,
                bbox_score=score,
                ann_file=det_file,
            )
        )
        next_id += 1
    report.kept = len(records)
    report.log_skips()
    return records


READERS = {"coco": read_coco_keypoints, "mpii": read_mpii}


def read_source(
    reader: str,
    ann_file: str | os.PathLike,
    img_dir: str | os.PathLike,
    source: str,
    skip_bad_samples: bool = False,
    **kwargs: Any,
) -> list[PersonRecord]:
    """Dispatch by reader name (``coco`` = any COCO-format keypoint json, ``mpii`` = MMPose's MPII list)."""
    if reader not in READERS:
        raise ValueError(f"unknown reader {reader!r}; choose one of {sorted(READERS)}")
    return READERS[reader](ann_file, img_dir, source=source, skip_bad_samples=skip_bad_samples, **kwargs)
