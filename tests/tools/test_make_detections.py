"""tools/make_detections: person detections for the pose validation sets (COCO results json), resumable."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from bmp_lightning.data.readers import read_detections
from bmp_lightning.loop.build import load_detector
from bmp_lightning.structures.io import read_image
from bmp_lightning.structures.records import BadSampleError
from bmp_lightning.tools import make_detections as tool

N_IMAGES = 3


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


class Counting:
    """Wraps a detector: records the (H, W) of every image it sees and can fail on the n-th call (a killed run)."""

    def __init__(self, detector, fail_at: int | None = None):
        self.detector, self.fail_at = detector, fail_at
        self.batch_size = detector.batch_size
        self.calls = 0
        self.seen: list[tuple[int, int]] = []

    def __call__(self, images):
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise KeyboardInterrupt("simulated kill")
        self.seen += [im.shape[:2] for im in images]
        return self.detector(images)


@pytest.fixture(scope="module")
def coco(sample_data_dir) -> tuple[Path, Path, list[dict]]:
    ann = sample_data_dir / "coco" / "test_coco.json"
    return ann, sample_data_dir / "coco", json.loads(ann.read_text())["images"][:N_IMAGES]


@pytest.fixture(scope="module")
def detector():
    torch.set_num_threads(1)
    return load_detector("tiny_random", "cpu", batch_size=1)


@pytest.fixture(scope="module")
def scratch(coco, detector, tmp_path_factory) -> tuple[Path, dict]:
    """A from-scratch run on the first 3 images."""
    torch.set_num_threads(1)
    ann, images, _ = coco
    out = tmp_path_factory.mktemp("dets") / "detections" / "rtmdet-l-ins-mask.json"
    stats = tool.make_detections(ann, images, out, detector, max_images=N_IMAGES, progress=False)
    return out, stats


def test_image_detections_hand_made():
    mask = np.zeros((3, 4, 5), bool)
    mask[0, 1:3, 2:4] = True
    result = {
        "bboxes": np.array([[-5, 1, 7, 3.5], [0, 0, 2, 2], [1, 1, 1, 3], [0, 0, 1, 1]], np.float32),
        "scores": np.array([0.9, 0.8, 0.7, 0.2], np.float32),
        "labels": np.array([0, 1, 0, 0]),
        "masks": mask,  # (4, 5): one column short of the (4, 6) image, as RTMDet's rescale can give
    }
    dets = tool.image_detections(result, 7, (4, 6), category_id=3, score_thr=0.5)
    # label 1 is not a person, the third box has zero width, the last scores below 0.5
    assert len(dets) == 1
    d = dets[0]
    assert (d["image_id"], d["category_id"], d["score"]) == (7, 3, pytest.approx(0.9))
    assert d["bbox"] == [0.0, 1.0, 6.0, 2.5]  # clipped to x in [0, 6]
    assert d["segmentation"]["size"] == [4, 6] and isinstance(d["segmentation"]["counts"], str)
    expected = np.zeros((4, 6), np.uint8)
    expected[1:3, 2:4] = 1
    np.testing.assert_array_equal(mask_utils.decode(d["segmentation"]), expected)
    assert "segmentation" not in tool.image_detections(result, 7, (4, 6), segm=False)[0]
    np.testing.assert_array_equal(tool.fit_mask(np.ones((3, 3), bool), (2, 4)), [[1, 1, 1, 0], [1, 1, 1, 0]])


def test_person_category_id():
    assert tool.person_category_id({"categories": [{"id": 5, "name": "car"}, {"id": 9, "name": "person"}]}, "x") == 9
    assert tool.person_category_id({"categories": [{"id": 4, "name": "human"}]}, "x") == 4
    assert tool.person_category_id({}, "x") == 1
    with pytest.raises(BadSampleError, match="x: no single 'person'"):
        tool.person_category_id({"categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}, "x")


def test_output_reads_with_project_reader_and_coco(coco, scratch):
    ann, images, ims = coco
    out, stats = scratch
    assert stats == {"images": 3, "done_before": 0, "new": 3, "skipped": 0, "detections": stats["detections"]}
    assert not tool.partial_path(out).exists()  # removed once the json is written
    dets = json.loads(out.read_text())
    assert len(dets) == stats["detections"] > 0
    sizes = {im["id"]: (im["height"], im["width"]) for im in ims}
    assert [d["image_id"] for d in dets] == sorted((d["image_id"] for d in dets), key=list(sizes).index)
    assert set(d["image_id"] for d in dets) == set(sizes)  # the tiny detector fires on every image
    for d in dets:
        h, w = sizes[d["image_id"]]
        x, y, bw, bh = d["bbox"]
        assert d["category_id"] == 1 and 0.0 <= d["score"] <= 1.0
        assert 0 <= x and 0 <= y and bw > 0 and bh > 0 and x + bw <= w + 1e-6 and y + bh <= h + 1e-6
        assert d["segmentation"]["size"] == [h, w]

    records = read_detections(out, ann, images)
    assert len(records) == len(dets)
    r, d = records[0], dets[0]
    np.testing.assert_allclose(r.bbox, [d["bbox"][0], d["bbox"][1], d["bbox"][0] + d["bbox"][2],
                                        d["bbox"][1] + d["bbox"][3]], atol=1e-3)  # fmt: skip
    assert r.bbox_score == pytest.approx(d["score"]) and r.segmentation == d["segmentation"]
    assert r.image_path == os.path.join(images, ims[0]["file_name"])

    gt = COCO(str(ann))
    res = gt.loadRes(str(out))
    assert len(res.getAnnIds()) == len(dets)
    assert sorted(res.getImgIds()) == sorted(gt.getImgIds())


def test_rle_is_the_detector_mask(coco, detector, scratch):
    _, images, ims = coco
    out, _ = scratch
    image = read_image(images / ims[0]["file_name"])  # 425 x 640: at input 320 the masks come out 425 x 639
    direct = detector([image])[0]
    person = direct["labels"] == 0
    mine = [d for d in json.loads(out.read_text()) if d["image_id"] == ims[0]["id"]]
    assert len(mine) == int(person.sum())
    h, w = image.shape[:2]
    for d, box, score, mask in zip(mine, direct["bboxes"][person], direct["scores"][person], direct["masks"][person]):
        decoded = mask_utils.decode(d["segmentation"])
        assert decoded.shape == (h, w)
        mh, mw = mask.shape
        assert mh <= h and mw <= w
        np.testing.assert_array_equal(decoded[:mh, :mw], mask[:h, :w])
        assert not decoded[mh:].any() and not decoded[:, mw:].any()
        x1, y1, x2, y2 = np.clip(box, 0, [w, h, w, h])
        np.testing.assert_allclose(d["bbox"], [x1, y1, x2 - x1, y2 - y1], atol=1e-3)
        assert d["score"] == pytest.approx(float(score), abs=1e-6)


def test_resume_skips_finished_images(coco, detector, scratch, tmp_path):
    ann, images, ims = coco
    out = tmp_path / "dets.json"
    first = Counting(detector, fail_at=2)  # killed while detecting the second image
    with pytest.raises(KeyboardInterrupt):
        tool.make_detections(ann, images, out, first, max_images=N_IMAGES, progress=False)
    sidecar = tool.partial_path(out)
    assert not out.exists() and sidecar.name == "dets.json.partial.jsonl"
    lines = sidecar.read_text().splitlines()
    assert len(lines) == 2 and "settings" in json.loads(lines[0]) and json.loads(lines[1])["image_id"] == ims[0]["id"]
    with open(sidecar, "a") as f:
        f.write('{"image_id": 40083, "detec')  # a line torn by the kill: dropped, the image is redone

    second = Counting(detector)
    stats = tool.make_detections(ann, images, out, second, max_images=N_IMAGES, progress=False)
    assert second.seen == [(im["height"], im["width"]) for im in ims[1:]]  # the first image is not re-run
    assert (stats["done_before"], stats["new"], stats["skipped"]) == (1, 2, 0)
    assert json.loads(out.read_text()) == json.loads(scratch[0].read_text())
    assert not sidecar.exists()
    with pytest.raises(FileExistsError, match="dets.json exists"):
        tool.make_detections(ann, images, out, detector, max_images=N_IMAGES, progress=False)


def test_sidecar_of_other_settings_is_refused(coco, tmp_path):
    ann, images, _ = coco
    out = tmp_path / "dets.json"
    tool.partial_path(out).write_text(json.dumps({"settings": {"segm": False}}) + "\n")
    with pytest.raises(BadSampleError, match="other settings"):
        tool.make_detections(ann, images, out, object(), max_images=N_IMAGES, progress=False)


def test_corrupt_image_is_skipped_and_counted(coco, detector, scratch, tmp_path, caplog):
    ann, images, ims = coco
    folder = tmp_path / "images"
    folder.mkdir()
    for im in ims:
        (folder / im["file_name"]).symlink_to(images / im["file_name"])
    bad = ims[1]["file_name"]
    (folder / bad).unlink()
    (folder / bad).write_bytes(b"\xff\xd8 not a jpeg")
    out = tmp_path / "dets.json"
    with caplog.at_level(logging.WARNING, logger="bmp_lightning.make_detections"):
        stats = tool.make_detections(ann, folder, out, detector, max_images=N_IMAGES, progress=False)
    assert (stats["new"], stats["skipped"]) == (2, 1)
    assert bad in caplog.text and "1 of 3 images unreadable" in caplog.text
    expected = [d for d in json.loads(scratch[0].read_text()) if d["image_id"] != ims[1]["id"]]
    assert json.loads(out.read_text()) == expected


def test_missing_inputs_are_clear_errors(coco, tmp_path):
    ann, images, _ = coco
    missing = tmp_path / "nope" / "person_keypoints_val2017.json"
    with pytest.raises(FileNotFoundError, match="annotation file not found: .*nope.*person_keypoints_val2017.json"):
        tool.make_detections(missing, images, tmp_path / "o.json", object())
    with pytest.raises(SystemExit, match="person_keypoints_val2017.json"):
        tool.main([f"ann={missing}", f"images={images}", "detector=tiny_random", f"out={tmp_path / 'o.json'}"])
    with pytest.raises(FileNotFoundError, match="image directory not found: .*no_images"):
        tool.make_detections(ann, tmp_path / "no_images", tmp_path / "o.json", object())
    with pytest.raises(SystemExit, match="unknown arguments"):
        tool.main(["ann=a", "images=b", "detector=tiny_random", "out=c", "colour=red"])


def test_cli_without_masks(coco, tmp_path):
    ann, images, ims = coco
    out = tmp_path / "cli.json"
    argv = [f"ann={ann}", f"images={images}", "detector=tiny_random", f"out={out}", "max_images=1", "segm=false"]
    stats = tool.main(argv + ["input_size=256", "score_thr=0.35"])
    dets = json.loads(out.read_text())
    assert stats["images"] == 1 and len(dets) == stats["detections"] > 0
    assert all("segmentation" not in d and d["score"] >= 0.35 and d["image_id"] == ims[0]["id"] for d in dets)
    assert len(COCO(str(ann)).loadRes(str(out)).getAnnIds()) == len(dets)
