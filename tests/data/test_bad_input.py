"""Broken input: a clear error naming the file and the entry; with skip_bad_samples a counted, logged skip."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from bmp_lightning.data.readers import ReadReport, read_coco_keypoints, read_detections, read_mpii
from bmp_lightning.structures.masks import mask_to_rle
from bmp_lightning.structures.records import BadSampleError

KP17 = [10, 10, 2] * 17


def _coco(tmp_path: Path, anns: list[dict], name: str = "bad.json") -> Path:
    img = {"id": 1, "file_name": "a.jpg", "width": 100, "height": 80}
    f = tmp_path / name
    f.write_text(json.dumps({"images": [img], "annotations": anns}))
    return f


def _ann(id_: int, **kw) -> dict:
    a = {"id": id_, "image_id": 1, "bbox": [5, 5, 20, 30], "keypoints": KP17, "num_keypoints": 17, "category_id": 1}
    a.update(kw)
    return a


def test_missing_annotation_file(tmp_path: Path):
    with pytest.raises(BadSampleError, match="annotation file not found: .*nope.json"):
        read_coco_keypoints(tmp_path / "nope.json", tmp_path)
    with pytest.raises(BadSampleError, match="nope_mpii.json"):
        read_mpii(tmp_path / "nope_mpii.json", tmp_path)


def test_malformed_json(tmp_path: Path):
    f = tmp_path / "broken.json"
    f.write_text('{"images": [], "annotations": [')
    with pytest.raises(BadSampleError, match="malformed json in .*broken.json"):
        read_coco_keypoints(f, tmp_path)
    f2 = tmp_path / "list.json"
    f2.write_text("[1, 2]")
    with pytest.raises(BadSampleError, match="list.json"):
        read_coco_keypoints(f2, tmp_path)


@pytest.mark.parametrize(
    ("bad", "msg"),
    [
        (_ann(77, keypoints=[10, 10, 2] * 16), "annotation id=77: expected 17 keypoints .* got 48 values"),
        (_ann(77, bbox=[5, 5, -3, 30]), "annotation id=77: bbox has negative size"),
        (_ann(77, bbox=[5, 5, 20, 0]), "annotation id=77: bbox has zero size"),
        (_ann(77, bbox=[5, 5, 20]), "annotation id=77: bbox must be 4 numbers"),
        (_ann(77, image_id=999), "annotation id=77: image_id=999 is not in the file's images list"),
    ],
    ids=["wrong-keypoint-count", "negative-box", "zero-size-box", "short-box", "missing-image-entry"],
)
def test_bad_coco_entries(tmp_path: Path, caplog, bad: dict, msg: str):
    f = _coco(tmp_path, [_ann(1), bad, _ann(2)])
    with pytest.raises(BadSampleError, match=msg) as err:
        read_coco_keypoints(f, tmp_path)
    assert str(f) in str(err.value)
    report = ReadReport()
    with caplog.at_level(logging.WARNING, logger="bmp_lightning.data.readers"):
        recs = read_coco_keypoints(f, tmp_path, skip_bad_samples=True, report=report)
    assert [r.instance_id for r in recs] == [1, 2]
    assert report.skipped == 1 and "annotation id=77" in report.reasons[0]
    assert "skipped 1 bad entries" in caplog.text and "annotation id=77" in caplog.text


def test_bad_mpii_entries(tmp_path: Path, caplog):
    good = {"image": "000001.jpg", "center": [50, 50], "scale": 0.5, "joints": [[10, 10]] * 16, "joints_vis": [1] * 16}
    bad_count = dict(good, joints=[[10, 10]] * 14, joints_vis=[1] * 14)
    bad_scale = dict(good, scale=0.0)
    f = tmp_path / "mpii.json"
    f.write_text(json.dumps([good, bad_count, bad_scale, good]))
    with pytest.raises(BadSampleError, match=r"mpii.json, entry 1 \(image 000001.jpg\): expected 16 joints"):
        read_mpii(f, tmp_path)
    report = ReadReport()
    with caplog.at_level(logging.WARNING, logger="bmp_lightning.data.readers"):
        recs = read_mpii(f, tmp_path, skip_bad_samples=True, report=report)
    assert [r.instance_id for r in recs] == [0, 3]
    assert report.skipped == 2 and "entry 2" in report.reasons[1] and "zero-size" in report.reasons[1]
    assert "skipped 2 bad entries" in caplog.text


def test_bad_detections(tmp_path: Path):
    gt = _coco(tmp_path, [_ann(1)], "gt.json")
    dets = [
        {"image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4], "score": 0.9},
        {"image_id": 5, "category_id": 1, "bbox": [1, 2, 3, 4], "score": 0.9},
        {"image_id": 1, "category_id": 1, "bbox": [1, 2, -3, 4], "score": 0.9},
        {"image_id": 1, "category_id": 1, "bbox": [1, 2, 0, 4], "score": 0.9},  # degenerate: dropped silently
    ]
    f = tmp_path / "det.json"
    f.write_text(json.dumps(dets))
    with pytest.raises(BadSampleError, match=r"det.json, detection 1: image_id=5 is not in .*gt.json"):
        read_detections(f, gt, tmp_path)
    report = ReadReport()
    recs = read_detections(f, gt, tmp_path, skip_bad_samples=True, report=report)
    assert len(recs) == 1 and report.skipped == 2 and report.filtered == {"empty box": 1}
    np.testing.assert_allclose(recs[0].bbox, [1, 2, 4, 6])


# ---------------------------------------------------------------------------------------------------- images
def _image_dataset(tmp_path: Path, skip: bool):
    """Four people on four images: #1 has no image file, #2 has corrupt bytes, #3 a mask of the wrong size."""
    import cv2

    from bmp_lightning.data.datasets import TopDownPoseDataset
    from bmp_lightning.data.pipeline import build_pose_pipeline

    img = np.full((80, 100, 3), 120, np.uint8)
    cv2.imwrite(str(tmp_path / "ok.jpg"), img)
    cv2.imwrite(str(tmp_path / "ok2.jpg"), img)
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    images = [
        {"id": i + 1, "file_name": n, "width": 100, "height": 80}
        for i, n in enumerate(["ok.jpg", "missing.jpg", "corrupt.jpg", "ok2.jpg"])
    ]
    seg = [[5, 5, 25, 5, 25, 35, 5, 35]]
    anns = [_ann(10 + i, image_id=i + 1, segmentation=seg) for i in range(4)]
    anns[3]["segmentation"] = mask_to_rle(np.ones((40, 50), np.uint8))  # an RLE of another image size
    f = tmp_path / "imgs.json"
    f.write_text(json.dumps({"images": images, "annotations": anns}))
    recs = read_coco_keypoints(f, tmp_path)
    pipe = build_pose_pipeline(train=False, use_mask=True)
    return TopDownPoseDataset(recs, pipe, skip_bad_samples=skip, use_mask=True), f


@pytest.mark.parametrize(
    ("index", "msg"),
    [
        (1, r"image not found: .*missing.jpg \(.*imgs.json, image_id=2, instance id=11\)"),
        (2, r"image unreadable or corrupt: .*corrupt.jpg \(.*imgs.json, image_id=3, instance id=12\)"),
        (3, r"imgs.json, image_id=4, instance id=13: mask is \(40, 50\), image .*ok2.jpg is \(80, 100\)"),
    ],
    ids=["missing-image", "corrupt-image", "mask-size-mismatch"],
)
def test_bad_images_raise(tmp_path: Path, index: int, msg: str):
    ds, _ = _image_dataset(tmp_path, skip=False)
    assert ds[0]["img"].shape == (3, 256, 192)
    with pytest.raises(BadSampleError, match=msg):
        ds[index]


def test_bad_images_skipped_and_counted(tmp_path: Path, caplog):
    ds, _ = _image_dataset(tmp_path, skip=True)
    with caplog.at_level(logging.WARNING, logger="bmp_lightning.data.datasets"):
        out = [ds[i] for i in range(4)]
    # every bad index is replaced by the only good sample
    assert [int(o["instance_id"]) for o in out] == [10, 10, 10, 10]
    assert ds.num_skipped == 3
    assert "missing.jpg" in caplog.text and "corrupt.jpg" in caplog.text and "(3 so far" in caplog.text
    ds[1]  # known-bad indices are not retried
    assert ds.num_skipped == 3


def test_missing_mask_for_maskpose(tmp_path: Path):
    from bmp_lightning.data.datasets import TopDownPoseDataset
    from bmp_lightning.data.pipeline import build_pose_pipeline

    f = _coco(tmp_path, [_ann(5)])
    recs = read_coco_keypoints(f, tmp_path)
    import cv2

    cv2.imwrite(str(tmp_path / "a.jpg"), np.zeros((80, 100, 3), np.uint8))
    ds = TopDownPoseDataset(recs, build_pose_pipeline(train=False, use_mask=True), use_mask=True)
    with pytest.raises(BadSampleError, match=r"bad.json, image_id=1, instance id=5: MaskBackground needs"):
        ds[0]
    optional = build_pose_pipeline(train=False, use_mask=True, mask_continue_on_failure=True)
    assert TopDownPoseDataset(recs, optional, use_mask=True)[0]["img"].shape == (3, 256, 192)
