"""InstSegDataset / InstSegDataModule: COCO parsing and filters, samples, collate, stage switch, synthetic data."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from bmp_lightning.data.instseg_datamodule import (
    InstSegDataModule,
    InstSegDataset,
    InstSegPipelineSwitch,
    collate_instseg,
)
from bmp_lightning.data.instseg_transforms import build_train_pipeline, masks_to_boxes
from bmp_lightning.structures.masks import mask_to_rle
from bmp_lightning.structures.records import BadSampleError


def _write_img(path: Path, h: int, w: int, seed: int = 0) -> None:
    img = np.random.default_rng(seed).integers(20, 230, size=(h, w, 3), dtype=np.uint8)
    cv2.imwrite(str(path), img)


def _toy_coco(tmp_path: Path) -> tuple[Path, Path]:
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    sizes = {1: (100, 120), 2: (20, 200), 3: (80, 80), 4: (64, 64)}
    for i, (h, w) in sizes.items():
        _write_img(img_dir / f"{i}.jpg", h, w, i)
    rle_mask = np.zeros((100, 120), np.uint8)
    rle_mask[50:90, 60:100] = 1
    anns = [
        # image 1: polygon person, RLE person, crowd person, a car, a sub-pixel person, a person outside the image
        {"id": 11, "image_id": 1, "category_id": 1, "bbox": [10, 20, 30, 40], "area": 1200, "iscrowd": 0,
         "segmentation": [[10, 20, 40, 20, 40, 60, 10, 60]]},
        {"id": 12, "image_id": 1, "category_id": 1, "bbox": [60, 50, 40, 40], "area": 1600, "iscrowd": 0,
         "segmentation": mask_to_rle(rle_mask)},
        {"id": 13, "image_id": 1, "category_id": 1, "bbox": [0, 0, 50, 50], "area": 900, "iscrowd": 1,
         "segmentation": mask_to_rle(np.ones((100, 120), np.uint8))},
        {"id": 14, "image_id": 1, "category_id": 3, "bbox": [70, 5, 20, 10], "area": 200, "iscrowd": 0,
         "segmentation": [[70, 5, 90, 5, 90, 15, 70, 15]]},
        {"id": 15, "image_id": 1, "category_id": 1, "bbox": [5, 5, 0.5, 10], "area": 5, "iscrowd": 0,
         "segmentation": [[5, 5, 5.5, 5, 5.5, 15, 5, 15]]},
        {"id": 16, "image_id": 1, "category_id": 1, "bbox": [130, 10, 20, 20], "area": 400, "iscrowd": 0,
         "segmentation": [[130, 10, 150, 10, 150, 30, 130, 30]]},
        # image 2: too small (min side 20 < 32); image 3: only a car; image 4: only a crowd person
        {"id": 21, "image_id": 2, "category_id": 1, "bbox": [10, 2, 30, 15], "area": 450, "iscrowd": 0,
         "segmentation": [[10, 2, 40, 2, 40, 17, 10, 17]]},
        {"id": 31, "image_id": 3, "category_id": 3, "bbox": [10, 10, 30, 30], "area": 900, "iscrowd": 0,
         "segmentation": [[10, 10, 40, 10, 40, 40, 10, 40]]},
        {"id": 41, "image_id": 4, "category_id": 1, "bbox": [0, 0, 64, 64], "area": 4096, "iscrowd": 1,
         "segmentation": mask_to_rle(np.ones((64, 64), np.uint8))},
    ]  # fmt: skip
    doc = {
        "images": [{"id": i, "file_name": f"{i}.jpg", "height": h, "width": w} for i, (h, w) in sizes.items()],
        "annotations": anns,
        "categories": [{"id": 18, "name": "dog"}, {"id": 1, "name": "person"}, {"id": 3, "name": "car"}],
    }
    ann = tmp_path / "instances.json"
    ann.write_text(json.dumps(doc))
    return ann, img_dir


def test_person_dataset_filters_and_targets(tmp_path: Path) -> None:
    ann, img_dir = _toy_coco(tmp_path)
    ds = InstSegDataset(ann, img_dir, classes="person")
    assert ds.cat_ids == [1] and ds.num_classes == 1
    assert ds.image_ids == [1, 4]  # 2: smaller than min_size, 3: no person; 4 kept (crowd counts as "has GT")
    s = ds[0]
    np.testing.assert_array_equal(s["boxes"].numpy(), [[10, 20, 40, 60], [60, 50, 100, 90]])
    assert s["labels"].tolist() == [0, 0]
    assert s["img"].shape == (3, 100, 120) and s["img"].dtype == torch.uint8
    masks = s["masks"].numpy()
    assert masks.shape == (2, 100, 120)
    expected = np.zeros((100, 120), np.uint8)
    expected[50:90, 60:100] = 1
    np.testing.assert_array_equal(masks[1], expected)  # RLE decoded exactly
    # polygon rasterised by pycocotools: about the 30x40 rectangle
    assert abs(int(masks[0].sum()) - 1200) < 80
    np.testing.assert_allclose(masks_to_boxes(masks[:1])[0], [10, 20, 40, 60], atol=1)
    empty = ds[1]
    assert empty["boxes"].shape == (0, 4) and empty["masks"].shape == (0, 64, 64)
    # min_size and filter_empty_gt are configurable; test mode keeps every image
    assert InstSegDataset(ann, img_dir, min_size=0).image_ids == [1, 2, 4]
    assert InstSegDataset(ann, img_dir, filter_empty_gt=False).image_ids == [1, 3, 4]
    assert InstSegDataset(ann, img_dir, test_mode=True).image_ids == [1, 2, 3, 4]


def test_all_classes_label_mapping(tmp_path: Path) -> None:
    ann, img_dir = _toy_coco(tmp_path)
    ds = InstSegDataset(ann, img_dir, classes="all")
    assert ds.cat_ids == [1, 3, 18] and ds.class_names == ["person", "car", "dog"]
    assert ds.image_ids == [1, 3, 4]
    assert ds[0]["labels"].tolist() == [0, 0, 1]  # person, person, car (category 3 -> label 1)
    assert ds[1]["labels"].tolist() == [1]
    with pytest.raises(ValueError, match="unicorn"):
        InstSegDataset(ann, img_dir, classes=["unicorn"])


def test_bad_samples_name_the_file(tmp_path: Path) -> None:
    ann, img_dir = _toy_coco(tmp_path)
    _write_img(img_dir / "1.jpg", 50, 50)  # json says 100x120
    ds = InstSegDataset(ann, img_dir)
    with pytest.raises(BadSampleError, match=r"image_id=1.*1\.jpg is 50x50"):
        ds[0]
    (img_dir / "4.jpg").unlink()
    with pytest.raises(BadSampleError, match="not found"):
        ds[1]
    # training may skip them instead: both images are bad, so redraws run out
    with pytest.raises(RuntimeError, match="redraws"):
        InstSegDataset(ann, img_dir, skip_bad_samples=True, max_refetch=5)[0]


def test_train_sample_collate_and_reproducibility(tmp_path: Path) -> None:
    ann, img_dir = _toy_coco(tmp_path)
    pipe = build_train_pipeline(stage=1, input_size=64, scale=128, remove_prob=0.5)
    ds = InstSegDataset(ann, img_dir, pipe, seed=3)
    a, b = ds[0], ds[0]
    assert torch.equal(a["img"], b["img"]) and torch.equal(a["boxes"], b["boxes"])  # same (seed, epoch, index)
    ds.set_epoch(1)
    imgs = [ds[0]["img"] for _ in range(2)]
    assert torch.equal(imgs[0], imgs[1]) and not torch.equal(imgs[0], a["img"])
    batch = collate_instseg([ds[0], ds[1]])
    assert batch["img"].shape == (2, 3, 64, 64) and batch["img"].dtype == torch.float32
    assert 0 <= batch["img"].min() and batch["img"].max() <= 255
    for t in batch["targets"]:
        assert t["masks"].shape[1:] == (64, 64) and t["masks"].shape[0] == t["boxes"].shape[0] == t["labels"].shape[0]
        np.testing.assert_array_equal(masks_to_boxes(t["masks"].numpy()), t["boxes"].numpy())
    assert [m["image_id"] for m in batch["meta"]] == [1, 4]
    assert batch["meta"][0]["ori_shape"] == (100, 120)


def _tag_pipeline(stage: int):
    def run(sample, rng):
        sample = dict(sample)
        sample["stage"] = stage
        return sample

    return run


def _first(batch):
    return batch[0]


def test_stage_switch_reaches_persistent_workers(tmp_path: Path) -> None:
    ann, img_dir = _toy_coco(tmp_path)
    ds = InstSegDataset(ann, img_dir, pipelines={1: _tag_pipeline(1), 2: _tag_pipeline(2)})
    loader = DataLoader(ds, batch_size=1, num_workers=1, persistent_workers=True, collate_fn=_first)
    assert [s["stage"] for s in loader] == [1, 1]
    ds.set_stage(2)
    assert [s["stage"] for s in loader] == [2, 2]
    with pytest.raises(ValueError, match="stage 3"):
        ds.set_stage(3)


def test_datamodule_on_synthetic_data(tmp_path: Path) -> None:
    root = tmp_path / "syn"
    dm = InstSegDataModule(
        train_ann="annotations/instances_train.json",
        train_img_dir="images/train",
        val_ann="annotations/instances_val.json",
        val_img_dir="images/val",
        root=str(root),
        batch_size=2,
        num_workers=0,
        pin_memory=False,
        input_size=128,
        train_scale=256,
        remove_prob=1.0,
        synthetic={"n_images": 5, "seed": 0, "n_val": 2},
    )
    dm.prepare_data()
    assert (root / "annotations" / "instances_train.json").is_file()
    dm.setup("fit")
    assert dm.num_classes == 1 and dm.cat_ids == [1]
    assert len(dm.train_dataset) == 3 and len(dm.val_dataset) == 2
    assert "RemoveRandomInstances" in repr(dm.train_dataset.pipeline)
    batch = next(iter(dm.train_dataloader()))
    assert batch["img"].shape == (2, 3, 128, 128)
    val = next(iter(dm.val_dataloader()))
    assert val["img"].shape == (2, 3, 128, 128)
    m = val["meta"][0]
    assert m["ori_shape"] == (256, 320) and m["img_shape"] == (102, 128)
    assert m["scale_factor"] == (128 / 320, 102 / 256)
    assert (val["img"][0, :, 102:] == 114).all()  # bottom padding
    # the stage-2 switch (callback): no mask-out, LSJ around the input size
    cb = InstSegPipelineSwitch(switch_epoch=3)

    class _Trainer:
        datamodule = dm
        current_epoch = 2

    cb.on_train_epoch_start(_Trainer(), None)
    assert dm.stage == 1
    _Trainer.current_epoch = 3
    cb.on_train_epoch_start(_Trainer(), None)
    assert dm.stage == 2 and dm.train_dataset.stage == 2
    assert "RemoveRandomInstances" not in repr(dm.train_dataset.pipeline)
    assert "scale=(128, 128)" in repr(dm.train_dataset.pipeline)


def test_batch_feeds_the_criterion(tmp_path: Path) -> None:
    """A real collated batch goes through RTMDetInsCriterion (random head outputs at the padded size)."""
    from bmp_lightning.models.components.rtmdet.criterion import RTMDetInsCriterion

    ann, img_dir = _toy_coco(tmp_path)
    ds = InstSegDataset(ann, img_dir, build_train_pipeline(stage=2, input_size=64, scale=64), seed=1)
    batch = collate_instseg([ds[0], ds[1]])
    g = torch.Generator().manual_seed(0)
    out = {
        "cls_scores": [torch.randn(2, 1, 64 // s, 64 // s, generator=g, requires_grad=True) for s in (8, 16, 32)],
        "bbox_preds": [
            torch.rand(2, 4, 64 // s, 64 // s, generator=g).mul(2 * s).requires_grad_() for s in (8, 16, 32)
        ],
        "kernel_preds": [torch.randn(2, 169, 64 // s, 64 // s, generator=g).mul(0.3) for s in (8, 16, 32)],
        "mask_feat": torch.randn(2, 8, 8, 8, generator=g),
    }
    losses = RTMDetInsCriterion(num_classes=1)(out, batch["targets"])
    assert all(torch.isfinite(v) for v in losses.values())


def test_real_coco_sample(sample_data_dir: Path) -> None:
    coco = sample_data_dir / "coco"
    ds = InstSegDataset(coco / "test_coco.json", coco, classes="person", test_mode=True)
    assert len(ds) >= 1
    s = ds[0]
    masks, boxes = s["masks"].numpy(), s["boxes"].numpy()
    assert masks.shape[0] == boxes.shape[0] > 0 and masks.shape[1:] == tuple(s["ori_shape"])
    # COCO boxes hug the polygons: the mask box is within a few pixels of the annotated box
    np.testing.assert_allclose(masks_to_boxes(masks), boxes, atol=3)


def test_hydra_configs_instantiate(tmp_path: Path, cfg_data) -> None:
    from hydra.utils import instantiate

    dm = instantiate(cfg_data("instseg_coco", f"paths.data_dir={tmp_path}").data)
    assert isinstance(dm, InstSegDataModule)
    assert dm.train_ann == str(tmp_path / "coco" / "annotations" / "instances_train2017.json")
    assert dm.val_img_dir == str(tmp_path / "coco" / "val2017")
    assert dm.input_size == 640 and dm.pipeline_kwargs["scale"] == 1280 and dm.pipeline_kwargs["stage2_scale"] == 640
    assert dm.pipeline_kwargs["ratio_range"] == (0.1, 2.0) and dm.min_size == 32 and dm.filter_empty_gt

    cfg = cfg_data("instseg_synthetic", f"paths.data_dir={tmp_path}").data
    cfg.synthetic.n_images = 4
    cfg.synthetic.val_fraction = 0.5
    cfg.num_workers = 0
    cfg.pin_memory = False
    dm = instantiate(cfg)
    dm.prepare_data()  # generates the missing synthetic files
    assert (tmp_path / "synthetic" / "annotations" / "instances_val.json").is_file()
    batch = next(iter(dm.train_dataloader()))
    assert len(dm.train_dataset) == 2
    assert batch["img"].shape == (2, 3, 320, 320)
