"""The data tools on a truncated image (which OpenCV alone decodes into gray): skipped, counted and listed with the
reason in ``<out>.skipped.json``; ``strict=true`` stops at it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bmp_lightning.loop.build import load_detector
from bmp_lightning.structures.records import BadSampleError
from bmp_lightning.tools import make_detections, make_sam_masks

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def _copy_with_one_truncated(src: Path, names: list[str], dst: Path, bad: str) -> Path:
    dst.mkdir()
    for name in names:
        data = (src / name).read_bytes()
        (dst / name).write_bytes(data[: len(data) // 2] if name == bad else data)
    return dst


def test_make_detections_skips_a_truncated_image(sample_data_dir: Path, tmp_path: Path):
    torch.set_num_threads(1)
    ann = sample_data_dir / "coco" / "test_coco.json"
    ims = json.loads(ann.read_text())["images"][:2]
    bad = ims[1]
    folder = _copy_with_one_truncated(
        sample_data_dir / "coco", [im["file_name"] for im in ims], tmp_path / "im", bad["file_name"]
    )
    detector = load_detector("tiny_random", "cpu", batch_size=1)
    out = tmp_path / "dets.json"
    stats = make_detections.make_detections(ann, folder, out, detector, max_images=2, progress=False)
    assert (stats["new"], stats["skipped"]) == (1, 1)
    assert {d["image_id"] for d in json.loads(out.read_text())} <= {ims[0]["id"]}
    report = json.loads(make_sam_masks.skipped_path(out).read_text())
    assert report["skipped"] == 1
    (entry,) = report["images"]
    assert entry["image_id"] == bad["id"] and entry["file"].endswith(bad["file_name"])
    assert "truncated JPEG" in entry["reason"] and f"image id {bad['id']}" in entry["reason"]
    with pytest.raises(BadSampleError, match=rf"{bad['file_name']} .*truncated JPEG"):
        make_detections.make_detections(ann, folder, tmp_path / "strict.json", detector, max_images=2,
                                        progress=False, strict=True)  # fmt: skip


def test_make_sam_masks_skips_a_truncated_image(sample_data_dir: Path, tmp_path: Path):
    ann = sample_data_dir / "aic" / "test_aic.json"
    doc = json.loads(ann.read_text())
    names = [im["file_name"] for im in doc["images"]]
    bad = doc["images"][0]
    folder = _copy_with_one_truncated(sample_data_dir / "aic", names, tmp_path / "im", bad["file_name"])
    out = tmp_path / "aic_sam_test.json"
    stats = make_sam_masks.make_sam_masks(ann, folder, out, segmenter=lambda: _tiny_sam(), progress=False)
    bad_people = [a for a in doc["annotations"] if a["image_id"] == bad["id"]]
    assert (stats["skipped_images"], stats["skipped_people"]) == (1, len(bad_people))
    assert stats["new"] == len(doc["annotations"]) - len(bad_people)
    written = json.loads(out.read_text())["annotations"]
    assert [a["id"] for a in written if "segmentation" not in a] == [a["id"] for a in bad_people]
    report = json.loads(make_sam_masks.skipped_path(out).read_text())
    assert report["skipped"] == 1 and report["images"][0]["file"].endswith(bad["file_name"])
    assert "truncated JPEG" in report["images"][0]["reason"]
    # the image repaired, a rerun segments exactly the people left and removes the stale report
    (folder / bad["file_name"]).write_bytes((sample_data_dir / "aic" / bad["file_name"]).read_bytes())
    again = make_sam_masks.make_sam_masks(ann, folder, out, segmenter=lambda: _tiny_sam(), progress=False)
    assert (again["new"], again["skipped_images"]) == (len(bad_people), 0)
    assert not make_sam_masks.skipped_path(out).exists()
    _copy_with_one_truncated(sample_data_dir / "aic", names, tmp_path / "im2", bad["file_name"])
    with pytest.raises(SystemExit, match=rf"error: .*{bad['file_name']} .*truncated JPEG"):
        make_sam_masks.main([f"ann={ann}", f"images={tmp_path / 'im2'}", f"out={tmp_path / 'o.json'}",
                             "sam=tiny_random", "strict=true"])  # fmt: skip


def _tiny_sam():
    from bmp_lightning.loop.segmenter import Sam2Segmenter

    return Sam2Segmenter.tiny_random(seed=0)
