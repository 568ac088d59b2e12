"""Small helpers around pycocotools shared by the keypoint and detection evaluators."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from bmp_lightning.structures.records import BadSampleError

log = logging.getLogger(__name__)


@contextlib.contextmanager
def quiet() -> Iterator[io.StringIO]:
    """Swallow pycocotools' progress prints; the captured text is available in the yielded buffer."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        yield buf


def check_unique_ids(dataset: dict, ann_file: str) -> None:
    """Every image and annotation has an ``id``, none repeated: pycocotools indexes by id and silently keeps one of
    two annotations with the same id (a ground-truth person vanishes, AP drops)."""
    for key in ("images", "annotations"):
        seen: dict[Any, int] = {}
        for i, entry in enumerate(dataset[key]):
            if not isinstance(entry, dict) or "id" not in entry:
                raise BadSampleError(f"{ann_file}: {key}[{i}] has no 'id'")
            j = seen.setdefault(entry["id"], i)
            if j != i:
                raise BadSampleError(
                    f"{ann_file}: {key}[{i}] has id={entry['id']} like {key}[{j}]; ids must be unique "
                    "(pycocotools would keep only one of them)"
                )


def load_coco_gt(ann_file: str | os.PathLike, iou_type: str, crowd_area: bool = False) -> COCO:
    """Load a COCO-format ground truth quietly and fill the fields pycocotools needs but some datasets lack.

    - ``iscrowd`` missing -> 0 (AIC, CrowdPose);
    - ``area`` missing -> box ``w*h`` for bbox/segm; for keypoints ``w*h*0.53`` (xtcocotools' ``use_area=False``);
      ``crowd_area=True`` overwrites every keypoint ``area`` that way (CrowdPose protocol);
    - keypoints: ``num_keypoints`` missing -> count of ``v > 0``; ``keypoints`` missing -> ignored (0 labelled);
    - segm: a missing / empty ``segmentation`` becomes the box polygon (with a warning).
    """
    ann_file = os.fspath(ann_file)
    if not os.path.isfile(ann_file):
        raise FileNotFoundError(f"annotation file not found: {ann_file}")
    with open(ann_file) as f:
        try:
            dataset = json.load(f)
        except json.JSONDecodeError as err:
            raise BadSampleError(f"{ann_file}: not valid json ({err})") from err
    if not isinstance(dataset, dict) or "annotations" not in dataset or "images" not in dataset:
        raise BadSampleError(f"{ann_file}: not a COCO-format ground truth (needs 'images' and 'annotations')")
    dataset.setdefault("categories", [{"id": 1, "name": "person"}])
    check_unique_ids(dataset, ann_file)
    num_boxless = 0
    for ann in dataset["annotations"]:
        if "bbox" not in ann or len(ann["bbox"]) != 4:
            raise BadSampleError(f"{ann_file}: annotation id={ann.get('id')} has no valid 'bbox'")
        ann.setdefault("iscrowd", 0)
        w, h = float(ann["bbox"][2]), float(ann["bbox"][3])
        if iou_type == "keypoints":
            if ann.get("keypoints") is None:
                ann["keypoints"] = []
                ann["num_keypoints"] = 0
            if "num_keypoints" not in ann:
                ann["num_keypoints"] = int(np.count_nonzero(np.asarray(ann["keypoints"])[2::3] > 0))
            if crowd_area or "area" not in ann:
                ann["area"] = w * h * 0.53
        else:
            ann.setdefault("area", w * h)
        if iou_type == "segm" and not ann.get("segmentation"):
            x, y = float(ann["bbox"][0]), float(ann["bbox"][1])
            ann["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
            num_boxless += 1
    if num_boxless:
        log.warning("%s: %d annotations have no segmentation; their box polygon is used", ann_file, num_boxless)
    with quiet():
        coco = COCO()
        coco.dataset = dataset
        coco.createIndex()
    return coco


def run_cocoeval(
    coco_gt: COCO,
    results: list[dict],
    iou_type: str,
    cat_ids: list[int] | None = None,
    sigmas: np.ndarray | None = None,
    img_ids: list[int] | None = None,
    verbose: bool = True,
) -> COCOeval:
    """Run COCOeval on in-memory results; prints only the final summary when ``verbose``."""
    with quiet():
        # loadRes adds keys (id, area, bbox) to the entries it is given: hand it copies
        coco_dt = coco_gt.loadRes([dict(r) for r in results])
        ev = COCOeval(coco_gt, coco_dt, iou_type)
        if sigmas is not None:
            ev.params.kpt_oks_sigmas = np.asarray(sigmas, dtype=np.float64)
        if cat_ids is not None:
            ev.params.catIds = list(cat_ids)
        if img_ids is not None:
            ev.params.imgIds = list(img_ids)
        ev.evaluate()
        ev.accumulate()
    with quiet() as buf:
        ev.summarize()
    if verbose:
        print(buf.getvalue(), end="")
    return ev
