from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from bmp_lightning.data.readers import ReadReport, mpii_box, read_coco_keypoints, read_detections, read_mpii


def _expected_coco_style(ann_file: Path) -> int:
    """Independent count of the upstream filters on a COCO-format json."""
    data = json.loads(ann_file.read_text())
    sizes = {im["id"]: (im["width"], im["height"]) for im in data["images"]}
    kept = 0
    for a in data["annotations"]:
        if a.get("iscrowd", 0):
            continue
        k = a["keypoints"]
        xs, ys = k[0::3], k[1::3]
        n = a["num_keypoints"] if "num_keypoints" in a else sum(1 for x, y in zip(xs, ys) if max(x, y) != 0)
        if n == 0:
            continue
        w_img, h_img = sizes[a["image_id"]]
        x, y, w, h = a["bbox"]
        x1, x2 = min(max(x, 0), w_img - 1), min(max(x + w, 0), w_img - 1)
        y1, y2 = min(max(y, 0), h_img - 1), min(max(y + h, 0), h_img - 1)
        if x2 <= x1 or y2 <= y1 or max(xs + ys) <= 0:
            continue
        kept += 1
    return kept


def test_coco_counts_and_fields(sample_data_dir: Path):
    ann = sample_data_dir / "coco" / "test_coco.json"
    report = ReadReport()
    recs = read_coco_keypoints(ann, sample_data_dir / "coco", report=report)
    assert len(recs) == _expected_coco_style(ann) == 12  # NOTICE.md: 14 people, 12 with keypoints
    assert report.filtered == {"num_keypoints == 0": 2} and report.skipped == 0
    r = next(r for r in recs if r.instance_id == 442619)
    # bbox [280.79, 44.73, 218.7, 346.68] in a 640x425 image -> xyxy, inside the image so unclipped
    np.testing.assert_allclose(r.bbox, [280.79, 44.73, 280.79 + 218.7, 44.73 + 346.68], rtol=1e-6)
    assert r.image_size == (425, 640) and r.image_id == 785 and r.source == "coco"
    assert r.image_path.endswith("000000000785.jpg")
    np.testing.assert_array_equal(r.keypoints[0], [367, 81, 2])  # nose stays in slot 0
    assert (r.keypoints[17:] == 0).all()  # thorax/neck/top_head/pelvis are not annotated in COCO
    assert isinstance(r.segmentation, list)
    # annotation 543117 has x = 0.5: clipping keeps it, x2 = 0.5 + 90.1
    r2 = next(r for r in recs if r.instance_id == 543117)
    np.testing.assert_allclose(r2.bbox[[0, 2]], [0.5, 90.6], rtol=1e-6)


def test_bbox_clipping(tmp_path: Path):
    img = {"id": 1, "file_name": "a.jpg", "width": 100, "height": 50}
    kp = [10, 10, 2] + [0, 0, 0] * 16
    anns = [
        {"id": 1, "image_id": 1, "bbox": [-5, -5, 200, 20], "keypoints": kp, "num_keypoints": 1, "category_id": 1},
        {"id": 2, "image_id": 1, "bbox": [120, 10, 10, 10], "keypoints": kp, "num_keypoints": 1, "category_id": 1},
        {"id": 3, "image_id": 1, "bbox": [10, 10, 10, 10], "keypoints": kp, "iscrowd": 1, "category_id": 1},
    ]
    f = tmp_path / "a.json"
    f.write_text(json.dumps({"images": [img], "annotations": anns}))
    report = ReadReport()
    recs = read_coco_keypoints(f, tmp_path, report=report)
    assert [r.instance_id for r in recs] == [1]
    np.testing.assert_allclose(recs[0].bbox, [0, 0, 99, 15])  # clipped to [0, W-1] x [0, H-1]
    assert report.filtered == {"empty box after clipping": 1, "iscrowd": 1}


def test_aic_counts_mapping_and_missing_num_keypoints(sample_data_dir: Path, tmp_path: Path):
    ann = sample_data_dir / "aic" / "test_aic.json"
    recs = read_coco_keypoints(ann, sample_data_dir / "aic", source="aic")
    assert len(recs) == _expected_coco_style(ann) == 9
    data = json.loads(ann.read_text())
    raw = {a["id"]: np.array(a["keypoints"], np.float32).reshape(14, 3) for a in data["annotations"]}
    r = recs[0]
    src = raw[r.instance_id]
    np.testing.assert_array_equal(r.keypoints[6], src[0])  # AIC right_shoulder -> slot 6
    np.testing.assert_array_equal(r.keypoints[19], src[12])  # head_top -> top_head
    np.testing.assert_array_equal(r.keypoints[17], src[13])  # AIC neck -> slot 17 (thorax), as released
    assert (r.keypoints[[0, 1, 2, 3, 4, 18, 20]] == 0).all()
    # without num_keypoints (the real AIC files), it is counted from the coordinates
    for a in data["annotations"]:
        a.pop("num_keypoints", None)
    data["annotations"][0]["keypoints"] = [0] * 42
    f = tmp_path / "aic.json"
    f.write_text(json.dumps(data))
    report = ReadReport()
    assert len(read_coco_keypoints(f, tmp_path, source="aic", report=report)) == 8
    assert report.filtered == {"num_keypoints == 0": 1}


def test_mpii_box_rule_and_mapping(sample_data_dir: Path):
    recs = read_mpii(sample_data_dir / "mpii" / "test_mpii.json", sample_data_dir / "mpii")
    assert len(recs) == 5
    r = recs[0]  # 005808361.jpg: center (966, 340), scale 4.718488
    side = 4.718488 * 200  # 943.6976
    cx, cy = 966 - 1, 340 + 15 * 4.718488 - 1  # y shift 15/200 * side, then 1-based -> 0-based
    np.testing.assert_allclose(r.bbox, [cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], rtol=1e-6)
    np.testing.assert_allclose(r.bbox, [493.1512, -62.07148, 1436.8488, 881.6261], rtol=1e-6)
    np.testing.assert_allclose(mpii_box([966, 340], 4.718488), r.bbox)
    assert r.image_id == 5808361 and r.instance_id == 0 and r.image_size is None
    # joints keep their coordinates (no -1); MPII right_ankle (0) -> slot 16, head_top (9) -> 19, pelvis (6) -> 20
    np.testing.assert_array_equal(r.keypoints[16], [804, 711, 1])
    np.testing.assert_allclose(r.keypoints[19], [962.2409, 80.0306, 1], rtol=1e-6)
    np.testing.assert_array_equal(r.keypoints[20], [974, 446, 1])
    assert (r.keypoints[:5] == 0).all()  # MPII has no face joints
    # an invisible joint keeps visibility 0 (051423444.jpg: r_ankle and l_ankle unlabelled)
    r3 = recs[2]
    assert r3.keypoints[16, 2] == 0 and r3.keypoints[15, 2] == 0 and r3.keypoints[14, 2] == 1


def test_mpii_unknown_center_not_shifted():
    np.testing.assert_allclose(mpii_box([-1, 100], 1.0), [-102, -1, 98, 199])


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """Column-major run lengths starting with a run of zeros (COCO's uncompressed RLE)."""
    flat = mask.flatten(order="F")
    counts, cur, run = [], 0, 0
    for v in flat:
        if v == cur:
            run += 1
        else:
            counts.append(run)
            cur, run = v, 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


def test_rle_and_polygon_masks_agree(sample_data_dir: Path, tmp_path: Path):
    ann = sample_data_dir / "coco" / "test_coco.json"
    data = json.loads(ann.read_text())
    poly_recs = {r.instance_id: r for r in read_coco_keypoints(ann, sample_data_dir / "coco")}
    sizes = {im["id"]: (im["height"], im["width"]) for im in data["images"]}
    for a in data["annotations"]:
        h, w = sizes[a["image_id"]]
        rle = mask_utils.merge(mask_utils.frPyObjects(a["segmentation"], h, w))
        if a["id"] % 2:
            a["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
        else:
            a["segmentation"] = _uncompressed_rle(mask_utils.decode(rle))
    f = tmp_path / "rle.json"
    f.write_text(json.dumps(data))
    rle_recs = read_coco_keypoints(f, sample_data_dir / "coco")
    assert len(rle_recs) == 12
    for r in rle_recs:
        assert isinstance(r.segmentation, dict)  # kept raw: decoded lazily
        m_rle, m_poly = r.mask(), poly_recs[r.instance_id].mask()
        assert m_rle.shape == r.image_size and m_rle.dtype == np.uint8
        assert m_rle.sum() > 100
        np.testing.assert_array_equal(m_rle, m_poly)


def test_detections_count_and_threshold(sample_data_dir: Path, tmp_path: Path):
    det_file = sample_data_dir / "coco" / "test_coco_det_AP_H_56.json"
    gt = sample_data_dir / "coco" / "test_coco.json"
    dets = json.loads(det_file.read_text())
    recs = read_detections(det_file, gt, sample_data_dir / "coco")
    assert len(recs) == len(dets) == 118  # category 1 only, no threshold (the MMPose test setting)
    assert [r.instance_id for r in recs] == list(range(118))
    d0 = dets[0]
    x, y, w, h = d0["bbox"]
    np.testing.assert_allclose(recs[0].bbox, [x, y, x + w, y + h], rtol=1e-6)
    assert recs[0].bbox_score == pytest.approx(d0["score"]) and (recs[0].keypoints == 0).all()
    assert recs[0].image_size == (425, 640)
    expected = sum(d["score"] >= 0.3 for d in dets)
    thr = read_detections(det_file, gt, sample_data_dir / "coco", score_thr=0.3)
    assert len(thr) == expected == 33
    assert min(r.bbox_score for r in thr) >= 0.3
    # other categories are dropped, a detection's segmentation is carried; the images list may be given directly
    extra = [dict(d0, category_id=2), dict(d0, segmentation={"size": [425, 640], "counts": "PPY82"})]
    f = tmp_path / "det.json"
    f.write_text(json.dumps(extra))
    images = json.loads(gt.read_text())["images"]
    recs2 = read_detections(f, images, sample_data_dir / "coco")
    assert len(recs2) == 1 and recs2[0].segmentation["counts"] == "PPY82"
