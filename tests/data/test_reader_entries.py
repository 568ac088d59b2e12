"""Malformed image entries and repeated ids in annotation files: a clear error naming the file, the entry and the
field (never a bare ``KeyError``), or with ``skip_bad_samples`` a skip counted in the reader's report.

Each reader path the DataModules use: ``reader: coco`` for COCO / AIC / OCHuman / CrowdPose keypoint files,
``reader: mpii`` for MMPose's MPII list, the detections reader (its ground truth's ``images``), and the
instance-segmentation dataset of the detector.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bmp_lightning.data.readers import ReadReport, read_detections, read_source
from bmp_lightning.structures.keypoints import SOURCE_NUM_KEYPOINTS
from bmp_lightning.structures.records import BadSampleError

SOURCES = ["coco", "aic", "ochuman", "crowdpose"]


def _image(id_: int, **kw) -> dict:
    return {"id": id_, "file_name": f"{id_:0>6}.jpg", "width": 100, "height": 80, **kw}


def _ann(id_: int, image_id: int, source: str, **kw) -> dict:
    k = SOURCE_NUM_KEYPOINTS[source]
    return {"id": id_, "image_id": image_id, "category_id": 1, "bbox": [5, 5, 20, 30], "keypoints": [10, 10, 2] * k,
            "num_keypoints": k, **kw}  # fmt: skip


def _write(tmp_path: Path, images: list, anns: list, name: str = "ann.json") -> Path:
    f = tmp_path / name
    f.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "person"}]}))
    return f


def _read(f: Path, source: str, skip: bool = False, report: ReadReport | None = None):
    return read_source("coco", f, f.parent, source, skip_bad_samples=skip, report=report)


BAD_IMAGES = {
    "repeated-id": (_image(1, file_name="other.jpg"), r"images\[1\]: id 1 repeats images\[0\]"),
    "no-file_name": ({"id": 2, "width": 100, "height": 80}, r"images\[1\] \(id=2\): 'file_name' must be a non-empty"),
    "no-width": ({"id": 2, "file_name": "b.jpg", "height": 80}, r"images\[1\] \(id=2, b.jpg\): no 'width'"),
    "zero-height": (
        _image(2, height=0),
        r"images\[1\] \(id=2, 000002.jpg\): 'height' must be a positive integer, got 0",
    ),
    "text-width": (_image(2, width="640"), r"images\[1\] \(id=2, 000002.jpg\): 'width' must be a positive integer"),
    "float-width": (_image(2, width=99.5), r"'width' must be a positive integer, got 99.5"),
    "no-id": ({"file_name": "b.jpg", "width": 100, "height": 80}, r"images\[1\]: no 'id'"),
    "text-id": (_image("2"), r"images\[1\]: 'id' must be an integer, got '2'"),
}


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("case", list(BAD_IMAGES))
def test_malformed_image_entries(tmp_path: Path, source: str, case: str):
    bad, msg = BAD_IMAGES[case]
    f = _write(tmp_path, [_image(1), bad, _image(3)], [_ann(10, 1, source), _ann(11, 2, source), _ann(12, 3, source)])
    with pytest.raises(BadSampleError, match=msg) as err:
        _read(f, source)
    assert str(f) in str(err.value)
    report = ReadReport()
    recs = _read(f, source, skip=True, report=report)
    if case == "repeated-id":  # which image annotation 10 means is unknown: both entries go, and their people
        # (annotation 11 points at image 2, which this case does not list)
        assert [r.instance_id for r in recs] == [12]
        assert report.skipped == 4 and "repeats images[0]" in report.reasons[0] and "is repeated" in report.reasons[1]
        assert "annotation id=10: image_id=1 images[1] skipped" in report.reasons[2]
    elif case in ("no-id", "text-id"):  # annotation 11's image_id 2 is then not listed
        assert [r.instance_id for r in recs] == [10, 12] and report.skipped == 2
    else:
        assert [r.instance_id for r in recs] == [10, 12] and report.skipped == 2
        assert "annotation id=11: image_id=2 images[1] skipped" in report.reasons[1]
    assert report.kept == len(recs)


@pytest.mark.parametrize("source", SOURCES)
def test_repeated_and_missing_annotation_ids(tmp_path: Path, source: str):
    anns = [_ann(10, 1, source), _ann(11, 1, source), _ann(11, 1, source, bbox=[50, 5, 20, 30]), _ann(12, 1, source)]
    f = _write(tmp_path, [_image(1)], anns)
    with pytest.raises(BadSampleError, match=r"ann.json, annotations\[2\]: id=11 repeats annotations\[1\]"):
        _read(f, source)
    report = ReadReport()
    assert [r.instance_id for r in _read(f, source, skip=True, report=report)] == [10, 11, 12]
    assert report.skipped == 1 and "annotations[2]" in report.reasons[0]

    del anns[2]["id"]
    f = _write(tmp_path, [_image(1)], anns, "noid.json")
    with pytest.raises(BadSampleError, match=r"noid.json, annotations\[2\]: no 'id'"):
        _read(f, source)


def test_mpii_entries(tmp_path: Path):
    good = {"image": "000001.jpg", "center": [50, 50], "scale": 0.5, "joints": [[10, 10]] * 16, "joints_vis": [1] * 16}
    f = tmp_path / "mpii.json"
    f.write_text(json.dumps([dict(good, id=5), dict(good, id=6), dict(good, id=5), dict(good, image=""), good]))
    with pytest.raises(BadSampleError, match=r"mpii.json, entry 2: instance id 5 repeats entry 0"):
        read_source("mpii", f, tmp_path, "mpii")
    report = ReadReport()
    recs = read_source("mpii", f, tmp_path, "mpii", skip_bad_samples=True, report=report)
    assert [r.instance_id for r in recs] == [5, 6, 4]
    assert report.skipped == 2 and "'image' must be a non-empty file name" in report.reasons[1]
    f.write_text(json.dumps([good, dict(good, image=7)]))
    with pytest.raises(BadSampleError, match=r"mpii.json, entry 1: 'image' must be a non-empty file name, got 7"):
        read_source("mpii", f, tmp_path, "mpii")


def test_detections_need_well_formed_ground_truth_images(tmp_path: Path):
    gt = _write(tmp_path, [_image(1), {"id": 2, "file_name": "b.jpg", "width": 100}], [], "gt.json")
    det = tmp_path / "det.json"
    det.write_text(json.dumps([{"image_id": i, "category_id": 1, "bbox": [1, 2, 3, 4], "score": 0.9} for i in (1, 2)]))
    with pytest.raises(BadSampleError, match=r"gt.json, images\[1\] \(id=2, b.jpg\): no 'height'"):
        read_detections(det, gt, tmp_path)
    report = ReadReport()
    recs = read_detections(det, gt, tmp_path, skip_bad_samples=True, report=report)
    assert [r.image_id for r in recs] == [1] and report.skipped == 2
    assert "detection 1: image_id=2 images[1] skipped" in report.reasons[1]


def test_instseg_dataset_entries(tmp_path: Path):
    from bmp_lightning.data.instseg_dataset import InstSegDataset
    from bmp_lightning.structures.records import skip_summary

    poly = [[5, 5, 25, 5, 25, 35, 5, 35]]
    anns = [dict(_ann(10 + i, i + 1, "coco"), segmentation=poly, area=600.0) for i in range(3)]
    f = _write(tmp_path, [_image(1), {"id": 2, "file_name": "b.jpg", "height": 80}, _image(3)], anns)
    with pytest.raises(BadSampleError, match=r"ann.json, images\[1\] \(id=2, b.jpg\): no 'width'"):
        InstSegDataset(f, tmp_path, min_size=0)
    ds = InstSegDataset(f, tmp_path, min_size=0, skip_bad_samples=True)
    assert ds.image_ids == [1, 3] and len(ds.entries_skipped) == 2
    summary = skip_summary({"train": ds})
    assert summary["entries"] == 2 and summary["samples"] == 0 and "no 'width'" in summary["entry_reasons"][0]
    f = _write(tmp_path, [_image(1), _image(1)], anns[:1], "dup.json")
    with pytest.raises(BadSampleError, match=r"dup.json, images\[1\]: id 1 repeats"):
        InstSegDataset(f, tmp_path, min_size=0)
    f = _write(tmp_path, [_image(1)], [anns[0], anns[0]], "dupann.json")
    with pytest.raises(BadSampleError, match=r"dupann.json, annotations\[1\]: id=10 repeats"):
        InstSegDataset(f, tmp_path, min_size=0)
