"""Broken image files: truncated JPEGs (which OpenCV decodes into gray), random bytes, empty files.

``read_image`` must refuse each with a :class:`BadSampleError` naming the file; with ``skip_bad_samples`` the pose
and instance-segmentation datasets skip the image, count it in a log their DataLoader workers share, and say why.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from bmp_lightning.structures.io import read_image
from bmp_lightning.structures.records import BadSampleError

COCO_IMAGE = "000000000785.jpg"  # 425 x 640 in the shared COCO sample


@pytest.fixture
def coco_jpeg(sample_data_dir: Path) -> Path:
    path = sample_data_dir / "coco" / COCO_IMAGE
    if not path.is_file():
        pytest.skip(f"{COCO_IMAGE} not in the shared sample data")
    return path


def _truncated(src: Path, dst: Path, keep: float) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * keep)])
    return dst


@pytest.mark.parametrize("keep", [0.3, 0.9, 0.999])
def test_truncated_jpeg_is_refused_not_gray_filled(tmp_path: Path, coco_jpeg: Path, keep: float):
    bad = _truncated(coco_jpeg, tmp_path / "cut.jpg", keep)
    # what OpenCV alone does: a full-size image whose missing part is gray (the silent failure)
    gray = cv2.imread(str(bad))
    assert gray is not None and gray.shape == (425, 640, 3)
    with pytest.raises(
        BadSampleError, match=r"image unreadable or corrupt: .*cut\.jpg \(ann\.json, image id 7\): truncated JPEG"
    ):
        read_image(bad, where="ann.json, image id 7")


def test_every_cut_of_a_real_jpeg_is_found(coco_jpeg: Path):
    from bmp_lightning.structures.io import jpeg_end

    data = coco_jpeg.read_bytes()
    assert jpeg_end(data) == len(data)
    cuts = np.linspace(3, len(data) - 1, 400).astype(int)
    assert [c for c in cuts if jpeg_end(data[:c]) is not None] == []


def test_whole_images_still_read(tmp_path: Path, sample_data_dir: Path, coco_jpeg: Path):
    for path in sorted(sample_data_dir.glob("*/*.jpg")):  # every shared image: same pixels as cv2.imread
        ref = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        np.testing.assert_array_equal(read_image(path), ref)
    # data after the end-of-image marker (camera trailers) is allowed, as by every decoder
    trailer = tmp_path / "trailer.jpg"
    trailer.write_bytes(coco_jpeg.read_bytes() + b"\x00" * 16 + b"MOTION-PHOTO-DATA")
    assert read_image(trailer).shape == (425, 640, 3)
    # progressive JPEG and restart markers
    img = read_image(coco_jpeg)
    for name, params in (
        ("prog.jpg", [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]),
        ("rst.jpg", [cv2.IMWRITE_JPEG_RST_INTERVAL, 4]),
    ):
        cv2.imwrite(str(tmp_path / name), img, params)
        assert read_image(tmp_path / name).shape == (425, 640, 3)
        with pytest.raises(BadSampleError, match="truncated JPEG"):
            read_image(_truncated(tmp_path / name, tmp_path / f"cut_{name}", 0.6))


def test_truncated_jpeg_with_a_complete_thumbnail_inside(tmp_path: Path, coco_jpeg: Path):
    """An EXIF-style thumbnail carries its own end marker early in the file; only the outer one counts."""
    thumb = cv2.imencode(".jpg", np.zeros((8, 8, 3), np.uint8))[1].tobytes()
    app = b"\xff\xe1" + (len(thumb) + 2).to_bytes(2, "big") + thumb  # an APP1 segment holding a whole JPEG
    data = coco_jpeg.read_bytes()
    whole = data[:2] + app + data[2:]
    (tmp_path / "thumb.jpg").write_bytes(whole)
    assert read_image(tmp_path / "thumb.jpg").shape == (425, 640, 3)
    (tmp_path / "thumb_cut.jpg").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(BadSampleError, match="truncated JPEG"):
        read_image(tmp_path / "thumb_cut.jpg")


def test_random_bytes_empty_file_and_truncated_png(tmp_path: Path, coco_jpeg: Path):
    (tmp_path / "random.jpg").write_bytes(np.random.default_rng(0).integers(0, 256, 5000, np.uint8).tobytes())
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "header_only.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    cv2.imwrite(str(tmp_path / "whole.png"), read_image(coco_jpeg))
    _truncated(tmp_path / "whole.png", tmp_path / "cut.png", 0.9)
    for name, msg in [
        ("random.jpg", r"image unreadable or corrupt: .*random\.jpg"),
        ("empty.jpg", r"image unreadable or corrupt: .*empty\.jpg: empty file"),
        ("header_only.jpg", r"header_only\.jpg: truncated JPEG"),
        ("cut.png", r"image unreadable or corrupt: .*cut\.png"),
        ("missing.jpg", r"image not found: .*missing\.jpg"),
    ]:
        with pytest.raises(BadSampleError, match=msg):
            read_image(tmp_path / name)


# ---------------------------------------------------------------------------------------------------- datasets
def _coco_with_a_truncated_image(tmp_path: Path, coco_jpeg: Path) -> Path:
    """Three images of 425 x 640 (two whole copies of the COCO sample, one truncated), one person on each."""
    data = coco_jpeg.read_bytes()
    (tmp_path / "a.jpg").write_bytes(data)
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) * 2 // 3])
    (tmp_path / "c.jpg").write_bytes(data)
    images = [
        {"id": i + 1, "file_name": n, "width": 640, "height": 425} for i, n in enumerate(["a.jpg", "cut.jpg", "c.jpg"])
    ]
    poly = [[100, 100, 300, 100, 300, 400, 100, 400]]
    anns = [
        {"id": 10 + i, "image_id": i + 1, "category_id": 1, "bbox": [100, 100, 200, 300], "area": 60000.0,
         "iscrowd": 0, "segmentation": poly, "keypoints": [150, 150, 2] * 17, "num_keypoints": 17}
        for i in range(3)
    ]  # fmt: skip
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "person"}]}))
    return ann


def test_pose_dataset_truncated_image(tmp_path: Path, coco_jpeg: Path):
    from bmp_lightning.data.datasets import TopDownPoseDataset
    from bmp_lightning.data.pipeline import build_pose_pipeline
    from bmp_lightning.data.readers import read_coco_keypoints

    ann = _coco_with_a_truncated_image(tmp_path, coco_jpeg)
    recs = read_coco_keypoints(ann, tmp_path)
    pipe = build_pose_pipeline(train=False, use_mask=False)
    with pytest.raises(
        BadSampleError, match=r"corrupt: .*cut\.jpg \(.*ann\.json, image_id=2, instance id=11\): truncated JPEG"
    ):
        TopDownPoseDataset(recs, pipe)[1]
    ds = TopDownPoseDataset(recs, pipe, skip_bad_samples=True)
    assert [int(ds[i]["instance_id"]) for i in range(3)] != [10, 11, 12]
    assert int(ds[1]["instance_id"]) in (10, 12)
    assert ds.num_bad == 1
    report = ds.skip_report()
    assert report == {
        "skipped": 1,
        "samples": [{"index": 1, "file": os.path.join(str(tmp_path), "cut.jpg"),
                     "entry": f"{ann}, image_id=2, instance id=11", "reason": "image unreadable or corrupt"}],
    }  # fmt: skip


def test_skips_in_dataloader_workers_reach_the_main_process(tmp_path: Path, coco_jpeg: Path):
    """Two workers share the log: the main process sees the one bad sample once, whichever worker met it."""
    from bmp_lightning.data.datasets import TopDownPoseDataset
    from bmp_lightning.data.pipeline import build_pose_pipeline
    from bmp_lightning.data.readers import read_coco_keypoints

    ann = _coco_with_a_truncated_image(tmp_path, coco_jpeg)
    recs = read_coco_keypoints(ann, tmp_path) * 2  # indices 1 and 4 are the truncated image
    ds = TopDownPoseDataset(recs, build_pose_pipeline(train=False, use_mask=False), skip_bad_samples=True)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2)
    ids = torch.cat([b["instance_id"] for b in loader]).tolist()
    assert len(ids) == 6 and 11 not in ids
    assert ds.num_skipped == 0  # nothing was loaded in this process...
    assert ds.num_bad == 2 and [s["index"] for s in ds.skip_report()["samples"]] == [
        1,
        4,
    ]  # ...but the workers' skips are seen


def test_instseg_dataset_truncated_image(tmp_path: Path, coco_jpeg: Path):
    from bmp_lightning.data.instseg_dataset import InstSegDataset

    ann = _coco_with_a_truncated_image(tmp_path, coco_jpeg)
    ds = InstSegDataset(ann, tmp_path)
    assert ds.load_sample(0)["img"].shape == (425, 640, 3)
    with pytest.raises(BadSampleError, match=r"corrupt: .*cut\.jpg \(.*ann\.json, image_id=2\): truncated JPEG"):
        ds[1]
    skipping = InstSegDataset(ann, tmp_path, skip_bad_samples=True)
    assert skipping[1]["image_id"] in (1, 3)  # another image drawn instead
    assert skipping.num_bad == 1
    assert skipping.skip_report()["samples"] == [
        {"index": 1, "file": os.path.join(str(tmp_path), "cut.jpg"), "entry": f"{ann}, image_id=2",
         "reason": "image unreadable or corrupt"}
    ]  # fmt: skip
    with pytest.raises(BadSampleError, match="truncated JPEG"):  # validation never skips
        InstSegDataset(ann, tmp_path, skip_bad_samples=True, test_mode=True)[1]


def test_datamodule_skip_report_through_hydra(tmp_path: Path, sample_data_dir: Path):
    """``data=sample`` with a truncated COCO image and a repeated annotation id, ``skip_bad_samples=true``, two
    workers: training and validation finish and ``skip_report()`` counts and names both kinds of bad input."""
    import shutil

    import hydra
    from hydra import compose, initialize_config_dir

    root = tmp_path / "data"
    shutil.copytree(sample_data_dir, root)
    _truncated(sample_data_dir / "coco" / COCO_IMAGE, root / "coco" / COCO_IMAGE, 0.5)
    gt = json.loads((root / "coco" / "test_coco.json").read_text())
    dup = dict(gt["annotations"][0], bbox=[1, 1, 30, 30])
    gt["annotations"].append(dup)  # same id as annotations[0]
    (root / "coco" / "test_coco.json").write_text(json.dumps(gt))
    conf = Path(__file__).resolve().parents[2] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(config_name=None, overrides=["+paths=default", "+data=sample", f"data.root={root}",
                                                   "data.skip_bad_samples=true", "data.num_workers=2"])  # fmt: skip
    dm = hydra.utils.instantiate(cfg.data)
    dm.setup("fit")
    assert sum(len(b["img"]) for b in dm.train_dataloader()) > 0
    (vloader,) = dm.val_dataloader()
    seen = torch.cat([b["instance_id"] for b in vloader]).tolist()
    bad_ids = [r.instance_id for r in dm.val_sets_info[0].records if r.image_path.endswith(COCO_IMAGE)]
    assert bad_ids and not set(bad_ids) & set(seen)

    report = dm.skip_report()
    # the repeated id, once in the training source and once in the validation set (both read the file)
    assert report["entries"] == 2 and all(
        f"id={dup['id']} repeats annotations[0]" in r for r in report["entry_reasons"]
    )
    assert report["per_dataset"]["val/coco"] == len(bad_ids)
    assert 1 <= report["per_dataset"]["train"] <= len(bad_ids)  # the people of that image the sampler drew
    assert {(s["file"], s["reason"]) for s in report["sample_list"]} == {
        (str(root / "coco" / COCO_IMAGE), "image unreadable or corrupt")
    }
    assert report["samples"] == report["per_dataset"]["train"] + len(bad_ids)
