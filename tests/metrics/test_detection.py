"""COCO bbox / segm AP: ground truth as predictions, and pycocotools as the oracle."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from bmp_lightning.metrics.cocotools import quiet
from bmp_lightning.metrics.detection import DETECTION_METRICS, CocoDetectionEvaluator, encode_masks
from bmp_lightning.structures.masks import segmentation_to_mask
from bmp_lightning.structures.records import BadSampleError


@pytest.fixture(scope="module")
def coco_json(sample_data_dir) -> Path:
    path = sample_data_dir / "coco" / "test_coco.json"
    if not path.is_file():
        pytest.skip("test_coco.json not found in the shared sample data")
    return path


def _gt_detections(ann_file: Path, rng: np.random.Generator | None = None) -> list[dict]:
    data = json.loads(ann_file.read_text())
    out = []
    for img in data["images"]:
        anns = [a for a in data["annotations"] if a["image_id"] == img["id"]]
        boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)])
        masks = np.stack([segmentation_to_mask(a["segmentation"], img["height"], img["width"]) for a in anns]) > 0
        scores = rng.uniform(0.1, 1, len(anns)) if rng is not None else np.linspace(1.0, 0.5, len(anns))
        out.append({"image_id": img["id"], "bboxes": boxes, "scores": scores, "labels": np.zeros(len(anns), int),
                    "masks": masks})  # fmt: skip
    return out


def _pycocotools(ann_file: Path, results_file: Path, iou_type: str) -> list[float]:
    with quiet():
        gt = COCO(str(ann_file))
        ev = COCOeval(gt, gt.loadRes(str(results_file)), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats.tolist()


def test_gt_as_predictions_gives_ap_1(coco_json):
    ev = CocoDetectionEvaluator(coco_json, verbose=False)
    ev.process(_gt_detections(coco_json))
    m = ev.evaluate()
    assert {f"{t}_{k}" for t in ("bbox", "segm") for k in DETECTION_METRICS} == set(m)
    assert m["bbox_AP"] == 1.0 and m["segm_AP"] == 1.0
    assert m["bbox_AR100"] == 1.0 and m["segm_AR100"] == 1.0


def test_shifted_box_matches_pycocotools(coco_json, tmp_path):
    rng = np.random.default_rng(0)
    dets = _gt_detections(coco_json, rng)
    dets[0]["bboxes"][0] += [15, 10, 15, 10]  # one person's box shifted
    dets[2]["bboxes"][1] += [4, 0, 4, 0]
    dets[3]["masks"][0] = np.roll(dets[3]["masks"][0], 12, axis=1)
    ev = CocoDetectionEvaluator(coco_json, verbose=False)
    ev.process(dets)
    m = ev.evaluate(outfile_prefix=tmp_path / "det")
    for t in ("bbox", "segm"):
        stats = _pycocotools(coco_json, tmp_path / f"det.{t}.json", t)
        assert [m[f"{t}_{k}"] for k in DETECTION_METRICS] == stats
        assert m[f"{t}_AP"] < 1.0
    assert m["bbox_AP50"] == 1.0  # the shifts keep IoU > 0.5


def test_rle_masks_multiclass_labels_and_dedup(coco_json):
    dets = _gt_detections(coco_json)
    ev = CocoDetectionEvaluator(coco_json, verbose=False)
    ev.process(dets)
    ref = ev.evaluate()
    # an 80-class detector on a person-only ground truth: label 0 -> person (1), label 2 -> car (3) is ignored
    ev80 = CocoDetectionEvaluator(coco_json, category_ids=list(range(1, 81)), verbose=False)
    extra = []
    for d in dets:
        n = len(d["scores"])
        extra.append(
            {
                "image_id": d["image_id"],
                "bboxes": np.concatenate([d["bboxes"], d["bboxes"][:1] + 40]),
                "scores": np.concatenate([d["scores"], [0.99]]),
                "labels": np.concatenate([d["labels"], [2]]),
                "masks": encode_masks(np.concatenate([d["masks"], d["masks"][:1]])),  # RLE input
            }
        )
        assert len(extra[-1]["masks"]) == n + 1
    ev80.process(extra + extra[:2])  # repeated images, as from DDP padding
    assert ev80.evaluate() == ref


def test_empty_and_bad_inputs(coco_json, tmp_path):
    ev = CocoDetectionEvaluator(coco_json, iou_types=("bbox",), verbose=False)
    assert ev.evaluate(outfile_prefix=tmp_path / "e") == {f"bbox_{k}": 0.0 for k in DETECTION_METRICS}
    assert json.loads((tmp_path / "e.bbox.json").read_text()) == []
    with pytest.raises(BadSampleError, match="labels"):
        ev.process([{"image_id": 785, "bboxes": np.zeros((1, 4)), "scores": [1.0], "labels": [3]}])
    seg = CocoDetectionEvaluator(coco_json, iou_types=("segm",), verbose=False)
    seg.process([{"image_id": 785, "bboxes": np.array([[0, 0, 5, 5]]), "scores": [1.0],
                  "masks": np.zeros((1, 10, 10), bool)}])  # fmt: skip
    with pytest.raises(BadSampleError, match="10x10"):
        seg.evaluate()
