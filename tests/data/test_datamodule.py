from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from bmp_lightning.data.codec import UDPHeatmap
from bmp_lightning.data.datasets import IMAGE_MEAN, IMAGE_STD, TopDownPoseDataset, concat_records
from bmp_lightning.data.pipeline import build_pose_pipeline
from bmp_lightning.data.readers import read_coco_keypoints, read_mpii
from bmp_lightning.data.samplers import MultiSourceBatchSampler
from bmp_lightning.structures.masks import segmentation_to_mask

CONF = Path(__file__).resolve().parents[2] / "conf"


@pytest.fixture(scope="module")
def coco_records(sample_data_dir: Path):
    return read_coco_keypoints(sample_data_dir / "coco" / "test_coco.json", sample_data_dir / "coco")


def test_val_sample_meta_round_trips_to_image(coco_records):
    """Heatmaps of the val crop decoded with the returned center/scale land on the ground truth."""
    pipe = build_pose_pipeline(train=False, use_mask=False, val_targets=True)
    ds = TopDownPoseDataset(coco_records, pipe)
    codec = UDPHeatmap()
    for i in (0, 5):
        s = ds[i]
        rec = coco_records[i]
        assert s["img"].shape == (3, 256, 192) and s["img"].dtype == torch.float32
        assert s["heatmaps"].shape == (21, 64, 48)
        x1, y1, x2, y2 = rec.bbox
        np.testing.assert_allclose(s["bbox_center"], [(x1 + x2) / 2, (y1 + y2) / 2], rtol=1e-5)
        w, h = (x2 - x1) * 1.25, (y2 - y1) * 1.25  # padding 1.25, then the short side grows to 192:256
        w, h = (w, w / 0.75) if w > 0.75 * h else (0.75 * h, h)
        np.testing.assert_allclose(s["bbox_scale"], [w, h], rtol=1e-5)
        np.testing.assert_array_equal(s["keypoints_gt"].numpy(), rec.keypoints)
        assert s["image_id"] == rec.image_id and s["instance_id"] == rec.instance_id and s["source"] == "coco"
        assert s["idx"] == i and s["bbox_score"] == 1.0 and s["image_size"].tolist() == list(rec.image_size)
        kp, _ = codec.decode_to_image(s["heatmaps"][None], s["bbox_center"][None], s["bbox_scale"][None])
        vis = rec.keypoints[:, 2] > 0
        err = np.abs(kp[0].numpy()[vis] - rec.keypoints[vis, :2])
        assert err.max() < 0.5  # DARK-UDP recovers the encoded positions to sub-pixel accuracy
        np.testing.assert_array_equal(s["keypoint_weights"].numpy()[17:], 0)  # COCO has no slots 17-20


def test_normalisation_values(coco_records):
    pipe = build_pose_pipeline(train=False, use_mask=False)
    raw = TopDownPoseDataset(coco_records, pipe, normalize=False)[2]["img"]
    norm = TopDownPoseDataset(coco_records, pipe)[2]["img"]
    assert raw.dtype == torch.uint8 and raw.shape == (3, 256, 192)
    expect = (raw.float() - torch.tensor(IMAGE_MEAN).view(3, 1, 1)) / torch.tensor(IMAGE_STD).view(3, 1, 1)
    torch.testing.assert_close(norm, expect)
    assert norm[0, 0, 0] == pytest.approx((int(raw[0, 0, 0]) - 123.675) / 58.395, abs=1e-5)


def test_train_randomness_per_epoch(coco_records):
    ds = TopDownPoseDataset(coco_records, build_pose_pipeline(train=True, use_mask=True), seed=3, use_mask=True)
    a, b = ds[4], ds[4]
    torch.testing.assert_close(a["img"], b["img"])  # same (seed, epoch, index): same augmentation
    torch.testing.assert_close(a["heatmaps"], b["heatmaps"])
    ds.set_epoch(1)
    c = ds[4]
    assert not torch.equal(a["img"], c["img"])
    assert c["heatmaps"].shape == (21, 64, 48) and c["keypoint_weights"].shape == (21,)


def test_workers_follow_set_epoch(coco_records):
    """Persistent DataLoader workers see the epoch of the main process (shared-memory counter)."""
    ds = TopDownPoseDataset(coco_records, build_pose_pipeline(train=True, use_mask=False, photometric=False))
    sampler = MultiSourceBatchSampler([len(ds)], batch_size=4, num_replicas=1, rank=0)
    sampler.add_epoch_callback(ds.set_epoch)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=1, persistent_workers=True)
    imgs = {}
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        batch = next(iter(loader))
        idx = int(batch["idx"][0])
        imgs[epoch] = (idx, batch["img"][0])
    for epoch, (idx, img) in imgs.items():
        ds.set_epoch(epoch)
        torch.testing.assert_close(img, ds[idx]["img"])  # the worker used the right epoch's RNG


class _Spy:
    """A stand-in pipeline that records what the dataset hands it."""

    def __init__(self) -> None:
        self.seen: list[dict] = []

    def __call__(self, sample: dict, rng: np.random.Generator) -> dict:
        self.seen.append(sample)
        out = dict(sample)
        out["img"] = np.zeros((256, 192, 3), np.uint8)
        return out


def test_masks_decoded_only_when_used(coco_records):
    spy = _Spy()
    TopDownPoseDataset(coco_records, spy, use_mask=False)[0]
    assert spy.seen[0]["mask"] is None
    TopDownPoseDataset(coco_records, spy, use_mask=True)[0]
    rec = coco_records[0]
    h, w = rec.image_size
    np.testing.assert_array_equal(spy.seen[1]["mask"], segmentation_to_mask(rec.segmentation, h, w))
    s = spy.seen[1]
    np.testing.assert_array_equal(s["keypoints"], rec.keypoints[:, :2])
    np.testing.assert_array_equal(s["keypoints_visible"], np.minimum(rec.keypoints[:, 2], 1))
    assert s["img"].shape == (h, w, 3) and s["bbox_score"] == 1.0


def _source_counts(batch: dict) -> Counter:
    return Counter(batch["source"])


def test_sample_config_through_hydra(sample_data_dir: Path, cfg_data):
    import hydra

    cfg = cfg_data("sample", f"paths.shared_dir={sample_data_dir.parent}", "data.batch_size=6")
    dm = hydra.utils.instantiate(cfg.data)
    dm.setup("fit")
    assert dm.train_source_names == ["coco", "mpii", "aic"] and dm.train_source_sizes == [12, 5, 9]
    loader = dm.train_dataloader()
    assert len(loader) == 5  # ceil(26 / 6)
    batch = next(iter(loader))
    assert _source_counts(batch) == {"coco": 2, "mpii": 2, "aic": 2}
    assert batch["source"] == ["coco"] * 2 + ["mpii"] * 2 + ["aic"] * 2
    assert batch["img"].shape == (6, 3, 256, 192) and batch["heatmaps"].shape == (6, 21, 64, 48)
    w = batch["keypoint_weights"]
    assert (w[:2, 17:] == 0).all() and (w[2:4, :5] == 0).all()  # COCO lacks 17-20, MPII lacks the face
    assert (w[4:, [0, 1, 2, 3, 4, 18, 20]] == 0).all()  # AIC lacks the face, neck slot 18 and pelvis
    assert w[2:4].sum() > 0 and w[4:].sum() > 0
    # validation: one loader per set, GT boxes, no augmentation
    assert dm.val_set_names == ["coco"] and dm.val_ann_files[0].endswith("test_coco.json")
    (vloader,) = dm.val_dataloader()
    vb = next(iter(vloader))
    assert vb["img"].shape == (8, 3, 256, 192) and "heatmaps" not in vb
    assert len(dm.val_sets_info[0].records) == 12


def test_mpii_records_scatter_in_batches(sample_data_dir: Path):
    recs, sizes = concat_records(
        [
            read_coco_keypoints(sample_data_dir / "coco" / "test_coco.json", sample_data_dir / "coco"),
            read_mpii(sample_data_dir / "mpii" / "test_mpii.json", sample_data_dir / "mpii"),
        ]
    )
    assert sizes == [12, 5] and recs[12].source == "mpii"
    s = TopDownPoseDataset(recs, build_pose_pipeline(train=False, use_mask=False, val_targets=True))[12]
    assert s["image_size"].tolist() == [720, 1280]  # MPII sizes come from the image
    assert s["keypoint_weights"][16] == 1 and s["keypoints_gt"][16].tolist() == [804, 711, 1]


def test_synthetic_config_generates_and_trains(tmp_path: Path, cfg_data):
    import hydra

    cfg = cfg_data(
        "synthetic",
        f"paths.data_dir={tmp_path}",
        "data.synthetic.n_images=6",
        "+data.synthetic.max_people=3",
        "data.batch_size=8",
        "data.num_workers=0",
        "data.use_mask=true",
    )
    dm = hydra.utils.instantiate(cfg.data)
    dm.prepare_data()
    assert (tmp_path / "synthetic" / "annotations" / "mpii_train.json").is_file()
    dm.setup("fit")
    assert dm.train_source_sizes[0] == dm.train_source_sizes[1] == dm.train_source_sizes[2] > 0
    batch = next(iter(dm.train_dataloader()))
    assert _source_counts(batch) == {"coco": 4, "mpii": 2, "aic": 2}  # 8 * 1/3 -> 2, remainder to the first
    assert torch.isfinite(batch["img"]).all() and batch["heatmaps"].amax() > 0.5
    assert dm.val_set_names == ["coco"] and len(dm.val_sets_info[0].records) > 0


def test_train_yaml_wires_mask_from_model(sample_data_dir: Path):
    """Through the training entry config, data.use_mask follows the model (MaskPose-B by default)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train.yaml", overrides=["data=sample", "model=maskpose_b"])
        assert cfg.data.use_mask is True and list(cfg.data.input_size) == [192, 256]
        cfg = compose("train.yaml", overrides=["data=sample", "model=vitpose_b"])
        assert cfg.data.use_mask is False


@pytest.mark.parametrize("name", ["multi", "coco", "ochuman"])
def test_real_dataset_configs_point_at_upstream_files(tmp_path: Path, name: str, cfg_data):
    """Without the datasets, instantiation works and setup names the first missing file."""
    import hydra

    from bmp_lightning.structures.records import BadSampleError

    cfg = cfg_data(name, f"paths.data_dir={tmp_path}")
    dm = hydra.utils.instantiate(cfg.data)
    expected_val = {
        "multi": ["coco", "ochuman"],
        "coco": ["coco"],
        "ochuman": ["ochuman", "ochuman_test"],
    }[name]
    assert dm.val_set_names == expected_val
    assert dm.val_ann_files[0].startswith(str(tmp_path))
    if name == "multi":
        assert dm.train_source_names == ["coco", "mpii", "aic"]
        assert [s["reader"] for s in dm.train_sources] == ["coco", "mpii", "coco"]
        assert dm.val_cfgs[0]["bbox_file"] == "coco/detections/rtmdet-l-ins-mask.json"
        assert dm.val_cfgs[0]["bbox_score_thr"] == 0.3 and "bbox_file" not in dm.val_cfgs[1]
        assert dm.batch_size == 64 and dm.val_batch_size == 128 and dm.skip_bad_samples is False
    stage = "validate" if name == "ochuman" else "fit"
    first = dm.val_ann_files[0] if name == "ochuman" else str(tmp_path / dm.train_sources[0]["ann_file"])
    with pytest.raises(BadSampleError, match=re.escape(f"annotation file not found: {first}")):
        dm.setup(stage)
    if name == "ochuman":
        with pytest.raises(RuntimeError, match="no train_sources"):
            dm.train_dataloader()


def test_serialized_records_round_trip(coco_records):
    from bmp_lightning.data.datasets import SerializedList

    sl = SerializedList(coco_records)
    assert len(sl) == 12
    for a, b in zip(sl, coco_records):
        assert a.instance_id == b.instance_id and a.segmentation == b.segmentation
        np.testing.assert_array_equal(a.keypoints, b.keypoints)
        np.testing.assert_array_equal(a.bbox, b.bbox)
    assert sl[-1].instance_id == coco_records[-1].instance_id
    with pytest.raises(IndexError):
        sl[12]
