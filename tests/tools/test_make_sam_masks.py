"""tools/make_sam_masks: SAM masks for MPII / AIC annotations, readable by the project readers, resumable."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bmp_lightning.data.readers import mpii_box, read_coco_keypoints, read_mpii
from bmp_lightning.loop.segmenter import Sam2Segmenter
from bmp_lightning.structures.io import read_image
from bmp_lightning.structures.masks import segmentation_to_mask
from bmp_lightning.tools import make_sam_masks as tool

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


class Counting:
    """A tiny random SAM that counts its images and can fail on the n-th one (an interrupted run)."""

    def __init__(self, fail_at: int | None = None):
        self.sam = Sam2Segmenter.tiny_random(seed=0)
        self.fail_at = fail_at
        self.images = 0
        self.prompts: list[tuple[list, np.ndarray]] = []

    def set_image(self, image):
        self.images += 1
        if self.fail_at is not None and self.images == self.fail_at:
            raise KeyboardInterrupt("simulated interruption")
        self.sam.set_image(image)

    def predict(self, points, labels, boxes=None, **kw):
        self.prompts.append(([np.array(p) for p in points], np.array(boxes)))
        return self.sam.predict(points, labels, boxes=boxes, **kw)


def test_default_out_follows_bmp_naming():
    assert tool.default_out("ann/mpii_train.json") == Path("ann/mpii_sam_train.json")
    assert tool.default_out("aic_val.json") == Path("aic_sam_val.json")
    assert tool.default_out("people.json") == Path("people_sam.json")


def test_prompts_box_and_visible_keypoints_inside_the_image():
    box, pts = tool.person_prompts([-5, 10, 50, 300], [[1, 2], [3, 4], [60, 5], [-1, 5]], [1, 0, 1, 1], (200, 55))
    np.testing.assert_allclose(box, [0, 10, 50, 200])
    np.testing.assert_allclose(pts, [[1, 2]])  # (3,4) invisible, (60,5) and (-1,5) outside
    # COCO format: only v == 2 (visible) keypoints; v == 1 lies on the occluder
    entry = {"bbox": [10, 20, 30, 40], "keypoints": [11, 21, 2, 12, 22, 1, 0, 0, 0]}
    box, pts = tool.entry_prompts(entry, "coco", (100, 100))
    np.testing.assert_allclose(box, [10, 20, 40, 60])
    np.testing.assert_allclose(pts, [[11, 21]])
    # MPII: MMPose's square box from center / scale, every labelled joint
    entry = {"center": [50, 60], "scale": 0.2, "joints": [[40, 50], [0, 0]], "joints_vis": [1, 0]}
    box, pts = tool.entry_prompts(entry, "mpii", (500, 500))
    np.testing.assert_allclose(box, mpii_box([50, 60], 0.2))
    np.testing.assert_allclose(pts, [[40, 50]])


def test_mpii_masks_readable_and_resumable(tmp_path, sample_data_dir):
    ann, images = sample_data_dir / "mpii" / "test_mpii.json", sample_data_dir / "mpii"
    out = tmp_path / "mpii_sam_test.json"
    n_people = len(json.loads(ann.read_text()))

    first = Counting(fail_at=3)  # interrupted on the third image, after a checkpoint every image
    with pytest.raises(KeyboardInterrupt):
        tool.make_sam_masks(ann, images, out, segmenter=first, every=1, progress=False)
    partial = json.loads(out.read_text())
    done = [i for i, e in enumerate(partial) if "sam_score" in e]
    assert 0 < len(done) < n_people

    second = Counting()
    stats = tool.make_sam_masks(ann, images, out, segmenter=second, every=1, progress=False)
    assert stats["done_before"] == len(done) and stats["new"] == n_people - len(done)
    assert second.images == len({e["image"] for e in partial if "sam_score" not in e})

    records = read_mpii(out, images)
    assert len(records) == n_people and all(r.segmentation for r in records)
    doc = json.loads(out.read_text())
    # value check: the written mask is SAM's mask for the box + visible-keypoint prompts of that person
    e = doc[0]
    img = read_image(images / e["image"])
    box, pts = tool.entry_prompts(e, "mpii", img.shape[:2])
    sam = Sam2Segmenter.tiny_random(seed=0)
    sam.set_image(img)
    want, score = sam.predict([pts], [np.ones(len(pts), np.int64)], boxes=box[None])
    got = segmentation_to_mask(e["segmentation"], *img.shape[:2]).astype(bool)
    np.testing.assert_array_equal(got, want[0])
    assert e["sam_score"] == pytest.approx(float(score[0]), abs=1e-4)
    assert e["joints"] == json.loads(ann.read_text())[0]["joints"]  # the annotation itself is untouched

    # a rerun does no new work and leaves the file as it is
    before = out.read_bytes()
    stats = tool.make_sam_masks(ann, images, out, segmenter=lambda: pytest.fail("SAM loaded"), progress=False)
    assert stats == {"people": n_people, "done_before": n_people, "new": 0, "images": 0, "skipped_images": 0,
                     "skipped_people": 0}  # fmt: skip
    assert out.read_bytes() == before


def test_aic_coco_format_polygons(tmp_path, sample_data_dir):
    ann, images = sample_data_dir / "aic" / "test_aic.json", sample_data_dir / "aic"
    out = tmp_path / "aic_sam_test.json"
    sam = Counting()
    stats = tool.make_sam_masks(ann, images, out, segmenter=sam, mask_format="polygon", progress=False)
    src = json.loads(ann.read_text())
    assert stats["new"] == len(src["annotations"]) and sam.images == len(src["images"])
    doc = json.loads(out.read_text())
    assert all(isinstance(a["segmentation"], list) and "sam_score" in a for a in doc["annotations"])
    records = read_coco_keypoints(out, images, source="aic")
    assert records and any(r.segmentation for r in records)  # an empty SAM mask has no polygon
    # prompts: the box and exactly the v == 2 keypoints of each annotation
    boxes = np.concatenate([b for _, b in sam.prompts])
    np.testing.assert_allclose(np.sort(boxes[:, 0]), np.sort([a["bbox"][0] for a in src["annotations"]]))
    n_vis = sorted(int((np.asarray(a["keypoints"])[2::3] == 2).sum()) for a in src["annotations"])
    assert sorted(len(p) for pts, _ in sam.prompts for p in pts) == n_vis
    assert tool.make_sam_masks(ann, images, out, segmenter=None, progress=False)["new"] == 0


def test_cli_and_bad_input(tmp_path, sample_data_dir):
    out = tmp_path / "m.json"
    stats = tool.main([f"ann={sample_data_dir / 'aic' / 'test_aic.json'}", f"images={sample_data_dir / 'aic'}",
                       f"out={out}", "sam=tiny_random", "format=coco"])  # fmt: skip
    assert stats["new"] > 0 and out.is_file()
    with pytest.raises(SystemExit, match="unknown arguments"):
        tool.main(["ann=a", "images=b", "bogus=1"])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"image": "x.jpg"}]))
    with pytest.raises(SystemExit, match="entry 0: not an MMPose MPII entry"):
        tool.main([f"ann={bad}", f"images={tmp_path}", "sam=tiny_random"])
