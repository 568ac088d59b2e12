"""COCO / CrowdPose keypoint AP: oracles from pycocotools, hand-made rescoring and NMS, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from bmp_lightning.metrics.coco import KEYPOINT_METRICS, CocoKeypointEvaluator, rescore
from bmp_lightning.metrics.cocotools import quiet
from bmp_lightning.structures.keypoints import CROWDPOSE_SIGMAS, to_merged
from bmp_lightning.structures.records import BadSampleError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def coco_json(sample_data_dir) -> Path:
    path = sample_data_dir / "coco" / "test_coco.json"
    if not path.is_file():
        pytest.skip("test_coco.json not found in the shared sample data")
    return path


def _gt_predictions(ann_file: Path, merged: bool = False) -> list[dict]:
    """Ground truth persons with keypoints as predictions (keypoint scores 1, box score 1)."""
    data = json.loads(ann_file.read_text())
    preds = []
    for a in data["annotations"]:
        if a["num_keypoints"] == 0:
            continue
        k = np.array(a["keypoints"], float).reshape(-1, 3)
        k[:, 2] = 1.0
        if merged:
            k = to_merged(k, "coco")
            k[17:] = [5.0, 5.0, 0.99]  # extra slots must not matter
        x, y, w, h = a["bbox"]
        preds.append(
            {
                "image_id": a["image_id"],
                "instance_id": a["id"],
                "keypoints": k[:, :2],
                "keypoint_scores": k[:, 2],
                "bbox_score": 1.0,
                "bbox": [x, y, x + w, y + h],
            }
        )
    return preds


def _perturbed(ann_file: Path, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    preds = []
    for p in _gt_predictions(ann_file):
        if rng.random() < 0.25:
            continue  # a missed person
        k = p["keypoints"].copy()
        moved = rng.random(17) < 0.4
        k[moved] += rng.normal(0, 12, (moved.sum(), 2))
        preds.append(dict(p, keypoints=k, keypoint_scores=rng.uniform(0, 1, 17), bbox_score=float(rng.uniform(0.3, 1))))
    # a few false positives
    for n, image_id in enumerate([785, 40083, 196141]):
        preds.append(
            {
                "image_id": image_id,
                "instance_id": 10_000 + n,
                "keypoints": rng.uniform(0, 300, (17, 2)),
                "keypoint_scores": rng.uniform(0, 1, 17),
                "bbox_score": float(rng.uniform(0.3, 1)),
            }
        )
    return preds


def _pycocotools(ann_file: Path, results_file: Path, sigmas=None, crowd_area: bool = False) -> np.ndarray:
    with quiet():
        gt = COCO(str(ann_file))
        if crowd_area:
            for a in gt.dataset["annotations"]:
                a["area"] = a["bbox"][2] * a["bbox"][3] * 0.53
            gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(str(results_file)), "keypoints")
        if sigmas is not None:
            ev.params.kpt_oks_sigmas = np.array(sigmas)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


@pytest.mark.parametrize("merged", [False, True])
def test_gt_as_predictions_gives_ap_1(coco_json, merged):
    ev = CocoKeypointEvaluator(coco_json, verbose=False)
    ev.process(_gt_predictions(coco_json, merged=merged))
    m = ev.evaluate()
    assert set(KEYPOINT_METRICS) <= set(m)
    assert m["AP"] == 1.0 and m["AP50"] == 1.0 and m["AR"] == 1.0


def test_perturbed_matches_pycocotools(coco_json, tmp_path):
    ev = CocoKeypointEvaluator(coco_json, verbose=False)
    ev.process(_perturbed(coco_json))
    m = ev.evaluate(outfile_prefix=tmp_path / "run")
    results_file = tmp_path / "run.keypoints.json"
    stats = _pycocotools(coco_json, results_file)
    assert [m[k] for k in KEYPOINT_METRICS] == stats.tolist()
    assert 0.1 < m["AP"] < 0.95
    # the json holds rescored scores, bbox scores and flattened (x, y, score) keypoints
    res = json.loads(results_file.read_text())
    r = res[0]
    assert len(r["keypoints"]) == 51 and {"score", "bbox_score", "category_id", "image_id"} <= set(r)
    kscores = np.array(r["keypoints"][2::3])
    assert r["score"] == pytest.approx(r["bbox_score"] * kscores[kscores > 0.2].mean(), rel=1e-4)


def test_duplicates_do_not_change_ap(coco_json):
    preds = _perturbed(coco_json, seed=1)
    ev = CocoKeypointEvaluator(coco_json, verbose=False)
    ev.process(preds)
    ref = ev.evaluate()
    ev.reset()
    ev.process(preds + preds[:5] + preds[-2:])  # as from DDP padding
    assert ev.evaluate() == ref
    # sanity: without ids the repeats are scored and AP changes
    ev.reset()
    no_ids = [dict(p, instance_id=None) for p in preds]
    ev.process(no_ids + no_ids[:5])
    assert ev.evaluate()["AP"] != ref["AP"]


def test_images_without_predictions_and_no_predictions(coco_json, tmp_path):
    preds = [p for p in _gt_predictions(coco_json) if p["image_id"] != 197388]
    ev = CocoKeypointEvaluator(coco_json, verbose=False)
    ev.process(preds)
    m = ev.evaluate()
    assert m["AP50"] < 1.0 and m["AR"] < 1.0
    ev.reset()
    m = ev.evaluate(outfile_prefix=tmp_path / "empty")
    assert m == {k: 0.0 for k in KEYPOINT_METRICS}
    assert json.loads((tmp_path / "empty.keypoints.json").read_text()) == []


def test_bad_predictions(coco_json):
    ev = CocoKeypointEvaluator(coco_json, verbose=False)
    with pytest.raises(BadSampleError, match="instance_id=7"):
        ev.process([{"image_id": 785, "instance_id": 7, "keypoints": np.zeros((5, 2)), "keypoint_scores": np.ones(5)}])
    ev.process([{"image_id": 123456, "instance_id": 1, "keypoints": np.zeros((17, 3)) + 1}])
    with pytest.raises(BadSampleError, match="123456"):
        ev.evaluate()


def _tiny_gt(tmp_path: Path) -> Path:
    gt = {
        "images": [{"id": 1, "width": 2000, "height": 2000, "file_name": "a.jpg"}],
        "categories": [{"id": 1, "name": "person"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 100, 100], "area": 5000, "iscrowd": 0,
             "num_keypoints": 17, "keypoints": np.c_[np.random.default_rng(3).uniform(0, 100, (17, 2)),
                                                     np.full(17, 2)].reshape(-1).tolist()},
        ],
    }  # fmt: skip
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    return path


def test_rescoring_and_oks_nms_hand_made(tmp_path):
    ann = _tiny_gt(tmp_path)
    base = np.random.default_rng(3).uniform(0, 100, (17, 2))

    def inst(iid, kpts, scores, bbox_score):
        return {"image_id": 1, "instance_id": iid, "keypoints": kpts, "keypoint_scores": np.asarray(scores),
                "bbox_score": bbox_score, "area": 10000.0}  # fmt: skip

    merged = np.zeros((21, 2))
    merged[:17] = base
    preds = [
        # 21 slots; extra slots' scores (1.0) must not enter the mean: 0.8 * 0.9 = 0.72
        inst(10, merged, [0.9] * 10 + [0.1] * 7 + [1.0] * 4, 0.8),
        # near-identical to 10, lower score 1.0 * 0.5 = 0.5 -> suppressed by OKS-NMS
        inst(11, base + 0.5, [0.5] * 17, 1.0),
        # far; 0.2 is not above the threshold: 0.5 * 0.6 = 0.3
        inst(12, base + 1000, [0.2] * 16 + [0.6], 0.5),
        # far elsewhere; no keypoint above 0.2 -> score 0, still kept
        inst(13, base + 500, [0.1] * 17, 0.9),
        # all keypoint scores 0 -> dropped (xtcocotools ignores such detections)
        inst(14, base - 700, [0.0] * 17, 0.9),
    ]
    ev = CocoKeypointEvaluator(ann, nms="oks", nms_thr=0.9, verbose=False)
    ev.process(preds)
    res = ev.results()
    assert [r["instance_id"] for r in res] == [10, 12, 13]
    assert [r["score"] for r in res] == pytest.approx([0.72, 0.3, 0.0])
    assert [r["bbox_score"] for r in res] == pytest.approx([0.8, 0.5, 0.9])
    assert all(len(r["keypoints"]) == 51 for r in res)
    ev_no_nms = CocoKeypointEvaluator(ann, nms=None, verbose=False)
    ev_no_nms.process(preds)
    res = ev_no_nms.results()
    assert [r["instance_id"] for r in res] == [10, 11, 12, 13]
    assert [r["score"] for r in res] == pytest.approx([0.72, 0.5, 0.3, 0.0])
    # score_mode='bbox' keeps the box score
    ev_bbox = CocoKeypointEvaluator(ann, score_mode="bbox", verbose=False)
    ev_bbox.process(preds[:2])
    assert [r["score"] for r in ev_bbox.results()] == pytest.approx([0.8, 1.0])
    assert rescore(0.5, np.array([0.1, 0.2, 0.3, 0.5])) == pytest.approx(0.2)


def _crowdpose_gt(tmp_path: Path) -> tuple[Path, list[np.ndarray]]:
    rng = np.random.default_rng(5)
    images, anns, kpts = [], [], []
    for img_id, crowd in [(1, 0.1), (2, 0.5), (3, 0.9)]:
        images.append({"id": img_id, "width": 640, "height": 480, "file_name": f"{img_id}.jpg", "crowdIndex": crowd})
        for n in range(2):
            x0, y0 = 50 + 250 * n, 60
            k = np.c_[rng.uniform(0, 150, (14, 2)) + [x0, y0], np.where(rng.random(14) < 0.85, 2, 0)]
            anns.append({"id": len(anns) + 1, "image_id": img_id, "category_id": 1, "bbox": [x0, y0, 150, 150],
                         "iscrowd": 0, "num_keypoints": int((k[:, 2] > 0).sum()),
                         "keypoints": k.reshape(-1).tolist()})  # fmt: skip
            kpts.append(k)
    cats = [{"id": 1, "name": "person", "keypoints": ["left_shoulder"] * 14, "skeleton": []}]
    path = tmp_path / "crowdpose.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path, kpts


def test_crowdpose_mapping_gt_gives_ap_1(tmp_path):
    ann, kpts = _crowdpose_gt(tmp_path)
    data = json.loads(ann.read_text())
    rng = np.random.default_rng(0)
    preds = []
    for a, k in zip(data["annotations"], kpts):
        m = to_merged(np.c_[k[:, :2], np.ones(14)], "crowdpose")  # (21, 3)
        unused = m[:, 2] == 0
        m[unused] = np.c_[rng.uniform(0, 640, (unused.sum(), 2)), np.full(unused.sum(), 0.9)]  # junk in other slots
        preds.append({"image_id": a["image_id"], "instance_id": a["id"], "keypoints": m, "bbox_score": 1.0})
    ev = CocoKeypointEvaluator(ann, dataset="crowdpose", verbose=False)
    assert ev.num_keypoints == 14 and ev.use_area is False
    np.testing.assert_array_equal(ev.sigmas, CROWDPOSE_SIGMAS)
    ev.process(preds)
    res = ev.results()
    assert all(len(r["keypoints"]) == 42 for r in res)
    m = ev.evaluate()
    assert m["AP"] == 1.0 and m["AR"] == 1.0
    assert m["AP_easy"] == m["AP_medium"] == m["AP_hard"] == 1.0


def test_crowdpose_perturbed_matches_pycocotools(tmp_path):
    ann, kpts = _crowdpose_gt(tmp_path)
    data = json.loads(ann.read_text())
    rng = np.random.default_rng(1)
    preds = []
    for a, k in zip(data["annotations"], kpts):
        xy = k[:, :2] + rng.normal(0, 6, (14, 2))
        preds.append({"image_id": a["image_id"], "instance_id": a["id"], "keypoints": xy,
                      "keypoint_scores": rng.uniform(0, 1, 14), "bbox_score": float(rng.uniform(0.5, 1))})  # fmt: skip
    ev = CocoKeypointEvaluator(ann, dataset="crowdpose", verbose=False)
    ev.process(preds)
    m = ev.evaluate(outfile_prefix=tmp_path / "cp")
    stats = _pycocotools(ann, tmp_path / "cp.keypoints.json", sigmas=CROWDPOSE_SIGMAS, crowd_area=True)
    assert [m[k] for k in KEYPOINT_METRICS] == stats.tolist()
    assert m["AP"] < 1.0


def test_cli_writes_metrics(coco_json, tmp_path):
    ev = CocoKeypointEvaluator(coco_json, verbose=False)
    ev.process(_perturbed(coco_json, seed=2))
    expected = ev.evaluate(outfile_prefix=tmp_path / "run")
    # as a third-party results file: scores only as bbox_score + keypoint third slots, no ids
    res = json.loads((tmp_path / "run.keypoints.json").read_text())
    for r in res:
        r.pop("score")
        r.pop("instance_id")
    (tmp_path / "results.json").write_text(json.dumps(res))
    out = tmp_path / "metrics" / "m.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bmp_lightning.tools.coco_eval", f"gt={coco_json}",
         f"results={tmp_path / 'results.json'}", f"out={out}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "Average Precision" in proc.stdout and "AP50" in proc.stdout
    metrics = json.loads(out.read_text())
    assert metrics == pytest.approx(expected)
    assert not list(out.parent.glob("*.tmp"))


def test_cli_rejects_bad_arguments(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "bmp_lightning.tools.coco_eval", "gt=x.json"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode != 0 and "required" in proc.stderr
