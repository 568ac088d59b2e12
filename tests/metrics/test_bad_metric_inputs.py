"""Metric inputs that pycocotools scores silently wrong: NaN keypoints / scores (scored as matches) and repeated
annotation ids in a ground truth (one of the two people vanishes). Both are errors naming the file and the entry;
``nonfinite="miss"`` (opt-in) drops a non-finite prediction and counts it, so its person is a miss."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from bmp_lightning.metrics.coco import CocoKeypointEvaluator
from bmp_lightning.metrics.cocotools import quiet
from bmp_lightning.metrics.detection import CocoDetectionEvaluator
from bmp_lightning.structures.records import BadSampleError
from bmp_lightning.tools import coco_eval as coco_cli


@pytest.fixture(scope="module")
def coco_json(sample_data_dir) -> Path:
    path = sample_data_dir / "coco" / "test_coco.json"
    if not path.is_file():
        pytest.skip("test_coco.json not found in the shared sample data")
    return path


def _half_perfect_half_nan(ann_file: Path) -> tuple[list[dict], int]:
    """COCO keypoint results: the ground truth for every other person, NaN keypoints for the others."""
    data = json.loads(ann_file.read_text())
    people = [a for a in data["annotations"] if a["num_keypoints"] > 0]
    results = []
    for n, a in enumerate(people):
        k = np.array(a["keypoints"], float).reshape(-1, 3)
        k[:, 2] = 1.0
        if n % 2:
            k[:] = np.nan
        results.append(
            {
                "image_id": a["image_id"],
                "category_id": 1,
                "keypoints": k.reshape(-1).tolist(),
                "score": 0.5 if n % 2 else 1.0,
            }
        )
    return results, len(people)


def _pycocotools_ap(ann_file: Path, results: list[dict]) -> float:
    with quiet():
        gt = COCO(str(ann_file))
        ev = COCOeval(gt, gt.loadRes(results), "keypoints")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[0])


def test_nan_keypoints_in_a_results_file(coco_json: Path, tmp_path: Path):
    results, n_people = _half_perfect_half_nan(coco_json)
    # the silent failure: pycocotools finds every person, the NaN ones included (NaN comparisons are False)
    assert _pycocotools_ap(coco_json, results) == 1.0
    res_file = tmp_path / "res.json"
    res_file.write_text(json.dumps(results))  # json writes NaN (not valid JSON, but Python reads it back)
    args = [f"gt={coco_json}", f"results={res_file}", f"out={tmp_path / 'm.json'}"]
    with pytest.raises(SystemExit, match=r"res.json: entry 1 \(image_id=\d+\): non-finite keypoints or scores"):
        coco_cli.main(args)
    # opt-in: the NaN people are misses, counted; AP is that of finding half the people perfectly
    metrics = coco_cli.main([*args, "nonfinite=miss"])
    assert metrics["nonfinite_dropped"] == n_people // 2
    assert metrics["AR"] == pytest.approx((n_people - n_people // 2) / n_people, abs=1e-6)
    assert metrics["AP"] < 0.7
    assert json.loads((tmp_path / "m.json").read_text())["nonfinite_dropped"] == n_people // 2


def test_nonfinite_in_memory_predictions(coco_json: Path):
    k = np.full((17, 2), 50.0)
    base = {"image_id": 785, "instance_id": 3, "keypoints": k, "keypoint_scores": np.ones(17), "bbox_score": 1.0}
    bad = {
        "keypoint": dict(base, keypoints=np.where(np.arange(17)[:, None] == 4, np.nan, k)),
        "keypoint score": dict(base, keypoint_scores=np.r_[np.ones(16), np.inf]),
        "bbox_score": dict(base, bbox_score=float("nan")),
        "final score": {"image_id": 785, "instance_id": 3, "keypoints": np.c_[k, np.ones(17)], "score": -math.inf},
    }
    for name, p in bad.items():
        ev = CocoKeypointEvaluator(coco_json, verbose=False)
        with pytest.raises(BadSampleError, match=r"test_coco.json: prediction image_id=785, instance_id=3: non-finite"):
            ev.process([p])
        miss = CocoKeypointEvaluator(coco_json, verbose=False, nonfinite="miss")
        miss.process([p, base])
        assert len(miss) == 1 and len(miss.nonfinite_dropped) == 1, name
    with pytest.raises(ValueError, match="nonfinite must be"):
        CocoKeypointEvaluator(coco_json, nonfinite="ignore")


def test_repeated_annotation_ids_in_the_ground_truth(coco_json: Path, tmp_path: Path):
    data = json.loads(coco_json.read_text())
    people = [a for a in data["annotations"] if a["num_keypoints"] > 0]
    preds = []
    for a in people:  # the ground truth as predictions (keypoint scores 1)
        k = np.array(a["keypoints"], float).reshape(-1, 3)
        k[:, 2] = 1.0
        preds.append({"image_id": a["image_id"], "category_id": 1, "keypoints": k.reshape(-1).tolist(), "score": 1.0})
    people[1]["id"] = people[0]["id"]  # one id twice
    gt = tmp_path / "dup_gt.json"
    gt.write_text(json.dumps(data))
    # the silent failure: pycocotools keeps one of the two, so a perfect prediction becomes a false positive
    assert _pycocotools_ap(gt, preds) < 1.0
    ev = CocoKeypointEvaluator(gt, verbose=False)
    ev.process(coco_cli.results_to_predictions(preds))
    with pytest.raises(
        BadSampleError, match=rf"dup_gt.json: annotations\[\d+\] has id={people[0]['id']} like annotations\[\d+\]"
    ):
        ev.evaluate()
    det = CocoDetectionEvaluator(gt, iou_types=("bbox",), verbose=False)
    det.process([{"image_id": people[0]["image_id"], "bboxes": np.array([[0, 0, 10, 10]]), "scores": [1.0]}])
    with pytest.raises(BadSampleError, match="ids must be unique"):
        det.evaluate()
    data["images"][1]["id"] = data["images"][0]["id"]
    gt.write_text(json.dumps(data))
    with pytest.raises(BadSampleError, match=r"dup_gt.json: images\[1\] has id=\d+ like images\[0\]"):
        CocoKeypointEvaluator(gt, verbose=False).evaluate()


def test_nonfinite_detections(coco_json: Path):
    boxes = np.array([[10, 10, 100, 200], [20, 20, np.nan, 90], [0, 0, 50, 50]], float)
    pred = {"image_id": 785, "bboxes": boxes, "scores": np.array([0.9, 0.8, 0.7])}
    ev = CocoDetectionEvaluator(coco_json, iou_types=("bbox",), verbose=False)
    with pytest.raises(
        BadSampleError, match=r"test_coco.json: detections for image_id=785, detection 1: non-finite box"
    ):
        ev.process([pred])
    with pytest.raises(BadSampleError, match="detection 2: non-finite"):
        ev.process([dict(pred, bboxes=boxes[[0, 2, 2]], scores=np.array([0.9, 0.8, np.inf]))])
    miss = CocoDetectionEvaluator(coco_json, iou_types=("bbox",), verbose=False, nonfinite="miss")
    miss.process([pred])
    assert len(miss.nonfinite_dropped) == 1
    assert [r["score"] for r in miss.results("bbox")] == [0.9, 0.7]
