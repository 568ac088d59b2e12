"""Instance segmentation data (RTMDet-Ins training / validation) from COCO ``instances`` json files.

Batches are ``{"img": (B, 3, S, S) float32 RGB in 0..255 (NOT normalised: the detector flips to BGR and
normalises on the device), "targets": [{"boxes" (M, 4) float32 xyxy input pixels, "labels" (M,) int64,
"masks" (M, S, S) uint8 at the padded input size}], "meta": [{"image_id", "ori_shape" (h, w), "img_shape" (h, w)
of the resized content before padding, "scale_factor" (w, h), "flip", "file_name"}]}``.

Annotation handling follows MMDetection's ``CocoDataset`` (``bmp_reference.md`` §4, ``filter_cfg``): an annotation is
used when its box overlaps the image, ``area > 0``, ``w >= 1``, ``h >= 1`` and its category is selected; crowd
annotations and annotations without a usable polygon are ignored (upstream carries them as "ignore" instances, which
RTMDet never uses). Training images are kept when ``min(w, h) >= min_size`` and, with ``filter_empty_gt``, when the
json has at least one annotation of a selected category for them (crowd ones included, as upstream).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from bmp_lightning.data.instseg_transforms import Compose, build_test_pipeline, build_train_pipeline
from bmp_lightning.data.io import read_image
from bmp_lightning.data.masks import segmentation_to_mask
from bmp_lightning.data.records import BadSampleError
from bmp_lightning.utils.common import dist_world, to_plain

log = logging.getLogger(__name__)


def _valid_polygons(seg: Any) -> bool:
    if isinstance(seg, dict):
        return "counts" in seg and "size" in seg
    if isinstance(seg, list):
        return any(len(p) >= 6 and len(p) % 2 == 0 for p in seg)
    return False


class InstSegDataset(Dataset):
    """Images with all their instances (boxes, labels, masks) from a COCO instances json.

    Args:
        ann_file: COCO instances json.
        img_dir: folder of the images (``file_name`` is relative to it).
        pipeline: ``pipeline(sample, rng) -> sample | None`` (``None``: draw another image, training only);
            ``None`` means no transform. For stage switching pass ``pipelines={1: ..., 2: ...}`` instead.
        classes: ``"person"``, ``"all"`` (every category, labels in category-id order: COCO's 80 -> 0..79) or a list
            of category names.
        filter_empty_gt: drop images without annotations of the selected categories (training only).
        min_size: drop images whose shorter side is below this (training only).
        test_mode: no filtering, no redraws.
        seed: augmentation RNG is ``default_rng([seed, epoch, index])``.
        max_images: keep only the first N images (after filtering); for quick runs.
        skip_bad_samples: log and redraw on a missing/corrupt image instead of raising (training only).
        pipelines: ``{stage: pipeline}``; :meth:`set_stage` picks one (shared memory, so DataLoader workers follow).
    """

    def __init__(
        self,
        ann_file: str | os.PathLike,
        img_dir: str | os.PathLike,
        pipeline: Compose | None = None,
        classes: str | Sequence[str] = "person",
        filter_empty_gt: bool = True,
        min_size: int = 32,
        test_mode: bool = False,
        seed: int = 0,
        max_images: int | None = None,
        skip_bad_samples: bool = False,
        pipelines: Mapping[int, Compose | None] | None = None,
        max_refetch: int = 100,
    ) -> None:
        self.ann_file = os.fspath(ann_file)
        self.img_dir = os.fspath(img_dir)
        self.test_mode = test_mode
        self.seed = int(seed)
        self.skip_bad_samples = skip_bad_samples
        self.max_refetch = max_refetch
        self.pipelines = dict(pipelines) if pipelines is not None else {1: pipeline}
        # shared memory: persistent DataLoader workers see set_epoch()/set_stage() of the main process
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self._stage = torch.full((), min(self.pipelines), dtype=torch.int64).share_memory_()
        self._load(classes, filter_empty_gt, min_size, max_images)

    # ------------------------------------------------------------------ annotations
    def _load(self, classes: str | Sequence[str], filter_empty_gt: bool, min_size: int, max_images: int | None) -> None:
        if not os.path.isfile(self.ann_file):
            raise FileNotFoundError(f"annotation file not found: {self.ann_file}")
        with open(self.ann_file) as f:
            doc = json.load(f)
        for key in ("images", "annotations", "categories"):
            if key not in doc:
                raise BadSampleError(f"{self.ann_file}: not a COCO instances json (no '{key}')")
        cats = sorted(doc["categories"], key=lambda c: c["id"])
        if classes == "all":
            chosen = cats
        else:
            names = [classes] if isinstance(classes, str) else list(classes)
            chosen = [c for c in cats if c["name"] in names]
            missing = set(names) - {c["name"] for c in chosen}
            if missing:
                raise ValueError(f"{self.ann_file}: categories {sorted(missing)} not in the json")
        self.cat_ids: list[int] = [int(c["id"]) for c in chosen]
        self.class_names: list[str] = [c["name"] for c in chosen]
        cat2label = {cid: i for i, cid in enumerate(self.cat_ids)}

        per_image: dict[int, list[tuple[list[float], int, Any, int]]] = {}
        has_cat: set[int] = set()
        images = {}
        for img in doc["images"]:
            images[img["id"]] = img
            per_image[img["id"]] = []
        for ann in doc["annotations"]:
            img_id = ann.get("image_id")
            if img_id not in images:
                raise BadSampleError(f"{self.ann_file}: annotation id={ann.get('id')} refers to unknown image {img_id}")
            cid = ann.get("category_id")
            if cid not in cat2label:
                continue
            has_cat.add(img_id)
            if ann.get("ignore", False) or ann.get("iscrowd", 0):
                continue
            info = images[img_id]
            try:
                x1, y1, w, h = (float(v) for v in ann["bbox"])
            except (KeyError, TypeError, ValueError) as err:
                raise BadSampleError(f"{self.ann_file}: annotation id={ann.get('id')}: bad bbox ({err})") from err
            inter_w = max(0.0, min(x1 + w, info["width"]) - max(x1, 0.0))
            inter_h = max(0.0, min(y1 + h, info["height"]) - max(y1, 0.0))
            if inter_w * inter_h == 0 or ann.get("area", w * h) <= 0 or w < 1 or h < 1:
                continue
            seg = ann.get("segmentation")
            if not _valid_polygons(seg):
                continue
            per_image[img_id].append(([x1, y1, x1 + w, y1 + h], cat2label[cid], seg, int(ann.get("id", -1))))

        records = []
        for img_id, info in images.items():
            if not self.test_mode:
                if filter_empty_gt and img_id not in has_cat:
                    continue
                if min(info["width"], info["height"]) < min_size:
                    continue
            records.append(
                {
                    "image_id": img_id,
                    "file_name": info["file_name"],
                    "height": int(info["height"]),
                    "width": int(info["width"]),
                    "anns": per_image[img_id],
                }
            )
        if max_images is not None:
            records = records[: int(max_images)]
        # one flat byte buffer instead of many Python objects: DataLoader workers share it without copy-on-read
        blobs = [pickle.dumps(r, protocol=pickle.HIGHEST_PROTOCOL) for r in records]
        self._offsets = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
        self._buffer = np.frombuffer(b"".join(blobs), dtype=np.uint8) if blobs else np.zeros(0, np.uint8)
        log.info("%s: %d images, %d classes", self.ann_file, len(records), len(self.cat_ids))

    @property
    def num_classes(self) -> int:
        return len(self.cat_ids)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def record(self, index: int) -> dict[str, Any]:
        """The parsed image entry: image_id, file_name, height, width, anns [(xyxy, label, segmentation, id)]."""
        a, b = self._offsets[index], self._offsets[index + 1]
        return pickle.loads(self._buffer[a:b].tobytes())

    @property
    def image_ids(self) -> list[int]:
        return [self.record(i)["image_id"] for i in range(len(self))]

    # ------------------------------------------------------------------ epoch / stage
    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(int(epoch))

    @property
    def stage(self) -> int:
        return int(self._stage)

    def set_stage(self, stage: int) -> None:
        if stage not in self.pipelines:
            raise ValueError(f"no pipeline for stage {stage} (have {sorted(self.pipelines)})")
        self._stage.fill_(int(stage))

    @property
    def pipeline(self) -> Compose | None:
        return self.pipelines[self.stage]

    def rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, index])

    # ------------------------------------------------------------------ samples
    def load_sample(self, index: int) -> dict[str, Any]:
        """The raw sample: full image, boxes, labels and decoded masks (nothing transformed)."""
        rec = self.record(index)
        path = os.path.join(self.img_dir, rec["file_name"])
        where = f"{self.ann_file}, image_id={rec['image_id']}"
        img = read_image(path, where=where)
        h, w = img.shape[:2]
        if (h, w) != (rec["height"], rec["width"]):
            raise BadSampleError(f"{where}: image {path} is {h}x{w} but the json says {rec['height']}x{rec['width']}")
        anns = rec["anns"]
        masks = np.zeros((len(anns), h, w), np.uint8)
        for i, (_, _, seg, ann_id) in enumerate(anns):
            try:
                m = segmentation_to_mask(seg, h, w)
            except Exception as err:  # pycocotools raises plain Exceptions on malformed RLE
                raise BadSampleError(f"{where}, annotation id={ann_id}: cannot decode the segmentation: {err}") from err
            if m.shape != (h, w):
                raise BadSampleError(f"{where}, annotation id={ann_id}: mask is {m.shape}, image is {(h, w)}")
            masks[i] = m
        return {
            "img": img,
            "boxes": np.array([a[0] for a in anns], np.float32).reshape(-1, 4),
            "labels": np.array([a[1] for a in anns], np.int64),
            "masks": masks,
            "image_id": rec["image_id"],
            "file_name": rec["file_name"],
            "ori_shape": (h, w),
            "img_shape": (h, w),
            "scale_factor": (1.0, 1.0),
            "flip": False,
        }

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = self.rng(index)
        for _ in range(self.max_refetch):
            try:
                sample = self.load_sample(index)
            except BadSampleError as err:
                if self.test_mode or not self.skip_bad_samples:
                    raise
                log.warning("skipping a bad sample: %s", err)
                sample = None
            pipeline = self.pipeline
            if sample is not None and pipeline is not None:
                sample = pipeline(sample, rng)
            if sample is not None:
                return to_tensors(sample)
            if self.test_mode:
                raise RuntimeError(f"the test pipeline dropped image index {index} of {self.ann_file}")
            index = int(rng.integers(len(self)))  # as mmdet: draw another image
        raise RuntimeError(f"{self.ann_file}: {self.max_refetch} redraws in a row were dropped by the pipeline")


def to_tensors(sample: dict[str, Any]) -> dict[str, Any]:
    """Numpy sample -> ``img`` (3, H, W) uint8 tensor, ``boxes``/``labels``/``masks`` tensors, meta kept as is."""
    out = dict(sample)
    out["img"] = torch.from_numpy(np.ascontiguousarray(sample["img"].transpose(2, 0, 1)))
    out["boxes"] = torch.from_numpy(np.ascontiguousarray(sample["boxes"], dtype=np.float32)).reshape(-1, 4)
    out["labels"] = torch.from_numpy(np.ascontiguousarray(sample["labels"], dtype=np.int64))
    out["masks"] = torch.from_numpy(np.ascontiguousarray(sample["masks"], dtype=np.uint8))
    return out


META_KEYS = ("image_id", "file_name", "ori_shape", "img_shape", "scale_factor", "flip")


def collate_instseg(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack images to ``(B, 3, H, W)`` float32 RGB 0..255 (not normalised); targets and meta as lists."""
    shapes = {tuple(b["img"].shape) for b in batch}
    if len(shapes) != 1:
        raise ValueError(f"images of one batch must share their (padded) size, got {sorted(shapes)}")
    return {
        "img": torch.stack([b["img"] for b in batch]).float(),
        "targets": [{"boxes": b["boxes"], "labels": b["labels"], "masks": b["masks"]} for b in batch],
        "meta": [{k: b[k] for k in META_KEYS if k in b} for b in batch],
    }


class EpochDistributedSampler(DistributedSampler):
    """A ``DistributedSampler`` (one replica when not distributed) whose ``set_epoch`` also reaches the dataset.

    Lightning calls ``set_epoch`` on the loader's sampler every epoch; the dataset uses it to reseed augmentation.
    """

    def __init__(self, dataset: Dataset, shuffle: bool = True, seed: int = 0, drop_last: bool = False) -> None:
        world, rank = dist_world()
        super().__init__(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)


class InstSegDataModule(L.LightningDataModule):
    """COCO-format instance segmentation for RTMDet-Ins (person fine-tune or 80 classes).

    Args:
        train_ann, train_img_dir, val_ann, val_img_dir: json files and image folders (relative to ``root``).
        root: base of relative paths.
        classes: ``"person"``, ``"all"`` or a list of category names (see :class:`InstSegDataset`).
        batch_size: training images per device; ``val_batch_size`` likewise (default: ``batch_size``).
        input_size: square network input (640); images are padded to it.
        train_scale: RandomResize base scale of stage 1 (1280); ``stage2_scale`` of stage 2 (default ``input_size``).
        ratio_range: RandomResize multiplier range ((0.1, 2.0) for RTMDet-L in both stages).
        remove_prob, remove_fill, remove_dilate: :class:`RemoveRandomInstances` (stage 1 only; ``remove_prob=0``
            disables it). ``person_label``: the label it may remove (``None``: any instance).
        hsv, flip_prob, pad_val, min_gt_bbox_wh: the remaining pipeline knobs.
        filter_empty_gt, min_size: training image filter (upstream ``filter_cfg``).
        stage: initial pipeline stage (1, or 2 for the no-mask-out LSJ-640 tail); see :meth:`set_stage`.
        seed: augmentation and shuffling seed.
        max_train_images, max_val_images: truncate the datasets (quick runs).
        synthetic: ``{out_dir, n_images, seed, ...}``: generate the synthetic dataset there (default ``root``) when the
            json files are missing (``bmp_lightning.data.synthetic.generate``).

    Under DDP both loaders shard themselves with a ``DistributedSampler`` (``use_distributed_sampler=false`` as in
    the project's trainer configs); validation pads with repeated images, so evaluation must de-duplicate image ids.
    """

    def __init__(
        self,
        train_ann: str | None = None,
        train_img_dir: str | None = None,
        val_ann: str | None = None,
        val_img_dir: str | None = None,
        root: str | None = None,
        classes: str | Sequence[str] = "person",
        batch_size: int = 16,
        val_batch_size: int | None = None,
        num_workers: int = 4,
        pin_memory: bool = True,
        persistent_workers: bool = False,
        input_size: int = 640,
        train_scale: int = 1280,
        stage2_scale: int | None = None,
        ratio_range: Sequence[float] = (0.1, 2.0),
        remove_prob: float = 0.5,
        remove_fill: str = "black",
        remove_dilate: int = 0,
        person_label: int | None = 0,
        hsv: Sequence[int] = (5, 30, 30),
        flip_prob: float = 0.5,
        pad_val: int = 114,
        min_gt_bbox_wh: Sequence[float] = (1.0, 1.0),
        filter_empty_gt: bool = True,
        min_size: int = 32,
        stage: int = 1,
        seed: int = 0,
        skip_bad_samples: bool = False,
        max_train_images: int | None = None,
        max_val_images: int | None = None,
        synthetic: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.root = os.fspath(root) if root else None
        self.train_ann, self.train_img_dir = self._path(train_ann), self._path(train_img_dir)
        self.val_ann, self.val_img_dir = self._path(val_ann), self._path(val_img_dir)
        classes = to_plain(classes)
        self.classes = classes if isinstance(classes, str) else list(classes)
        self.batch_size = int(batch_size)
        self.val_batch_size = int(val_batch_size or batch_size)
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory)
        self.persistent_workers = bool(persistent_workers) and self.num_workers > 0
        self.input_size = int(input_size)
        self.pad_val = int(pad_val)
        self.pipeline_kwargs = {
            "input_size": self.input_size,
            "scale": int(train_scale),
            "stage2_scale": int(stage2_scale) if stage2_scale else None,
            "ratio_range": tuple(float(v) for v in to_plain(ratio_range)),
            "remove_prob": float(remove_prob),
            "remove_fill": str(remove_fill),
            "remove_dilate": int(remove_dilate),
            "person_label": person_label,
            "hsv": tuple(int(v) for v in to_plain(hsv)),
            "flip_prob": float(flip_prob),
            "pad_val": self.pad_val,
            "min_gt_bbox_wh": tuple(float(v) for v in to_plain(min_gt_bbox_wh)),
        }
        self.filter_empty_gt = bool(filter_empty_gt)
        self.min_size = int(min_size)
        self._stage = int(stage)
        self.seed = int(seed)
        self.skip_bad_samples = bool(skip_bad_samples)
        self.max_train_images = max_train_images
        self.max_val_images = max_val_images
        self.synthetic = dict(to_plain(synthetic)) if synthetic else None
        self.train_dataset: InstSegDataset | None = None
        self.val_dataset: InstSegDataset | None = None

    def _path(self, p: str | os.PathLike | None) -> str | None:
        if p is None:
            return None
        p = os.path.expanduser(os.fspath(p))
        return p if os.path.isabs(p) or not self.root else os.path.join(self.root, p)

    # ------------------------------------------------------------------ pipelines / stage
    def train_pipeline(self, stage: int | None = None) -> Compose:
        return build_train_pipeline(stage=stage or self._stage, **self.pipeline_kwargs)

    def test_pipeline(self) -> Compose:
        return build_test_pipeline(self.input_size, self.pad_val)

    @property
    def stage(self) -> int:
        return self._stage

    def set_stage(self, stage: int) -> None:
        """Switch the training pipeline: 2 drops RemoveRandomInstances and resizes around ``stage2_scale``.

        Takes effect from the next sample drawn, in DataLoader workers too (the stage lives in shared memory).
        """
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage}")
        if stage != self._stage:
            log.info("instance-segmentation training pipeline: stage %d -> %d", self._stage, stage)
        self._stage = stage
        if self.train_dataset is not None:
            self.train_dataset.set_stage(stage)

    @property
    def num_classes(self) -> int:
        ds = self.train_dataset or self.val_dataset
        if ds is not None:
            return ds.num_classes
        if self.classes == "all":
            raise RuntimeError("num_classes of classes='all' is known after setup()")
        return 1 if isinstance(self.classes, str) else len(self.classes)

    @property
    def cat_ids(self) -> list[int]:
        """COCO category id of each contiguous label (for writing detections back to COCO format)."""
        ds = self.val_dataset or self.train_dataset
        if ds is None:
            raise RuntimeError("call setup() first")
        return ds.cat_ids

    # ------------------------------------------------------------------ synthetic data
    def _maybe_generate(self) -> None:
        if not self.synthetic:
            return
        missing = [f for f in (self.train_ann, self.val_ann) if f and not os.path.isfile(f)]
        if not missing:
            return
        from bmp_lightning.data.synthetic import generate

        cfg = dict(self.synthetic)
        out_dir = self._path(cfg.pop("out_dir", None)) or self.root
        if not out_dir:
            raise ValueError("data.synthetic needs an out_dir (or data.root)")
        log.info("generating the synthetic dataset in %s (missing: %s)", out_dir, missing[0])
        generate(out_dir, **cfg)

    def prepare_data(self) -> None:
        """Rank 0 only: write the synthetic dataset if it is configured and missing."""
        self._maybe_generate()

    def setup(self, stage: str | None = None) -> None:
        self._maybe_generate()
        if stage in (None, "fit") and self.train_ann and self.train_dataset is None:
            self.train_dataset = InstSegDataset(
                self.train_ann,
                self.train_img_dir or "",
                classes=self.classes,
                filter_empty_gt=self.filter_empty_gt,
                min_size=self.min_size,
                seed=self.seed,
                max_images=self.max_train_images,
                skip_bad_samples=self.skip_bad_samples,
                pipelines={1: self.train_pipeline(1), 2: self.train_pipeline(2)},
            )
            self.train_dataset.set_stage(self._stage)
        if self.val_ann and self.val_dataset is None:
            self.val_dataset = InstSegDataset(
                self.val_ann,
                self.val_img_dir or "",
                self.test_pipeline(),
                classes=self.classes,
                test_mode=True,
                seed=self.seed,
                max_images=self.max_val_images,
            )

    # ------------------------------------------------------------------ loaders
    def _loader(self, ds: InstSegDataset, batch_size: int, train: bool) -> DataLoader:
        return DataLoader(
            ds,
            batch_size=batch_size,
            sampler=EpochDistributedSampler(ds, shuffle=train, seed=self.seed),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            collate_fn=collate_instseg,
        )

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            self.setup("fit")
        if self.train_dataset is None:
            raise RuntimeError("no train_ann configured")
        return self._loader(self.train_dataset, self.batch_size, train=True)

    def val_dataloader(self) -> DataLoader:
        if self.val_dataset is None:
            self.setup("validate")
        if self.val_dataset is None:
            raise RuntimeError("no val_ann configured")
        return self._loader(self.val_dataset, self.val_batch_size, train=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


class InstSegPipelineSwitch(L.Callback):
    """Stage-2 switch of the RTMDet recipe (mmdet ``PipelineSwitchHook``).

    From ``switch_epoch`` on, the datamodule's training pipeline drops RemoveRandomInstances and uses the 640
    large-scale jitter. Checked at every epoch start, so it also holds after a resume.
    """

    def __init__(self, switch_epoch: int = 280) -> None:
        self.switch_epoch = int(switch_epoch)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "set_stage"):
            return
        if trainer.current_epoch >= self.switch_epoch and dm.stage != 2:
            dm.set_stage(2)
