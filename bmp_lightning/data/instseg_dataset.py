"""Instance segmentation dataset (RTMDet-Ins training / validation) from COCO ``instances`` json files.

Samples collate to ``{"img": (B, 3, S, S) float32 RGB in 0..255 (NOT normalised: the detector flips to BGR and
normalises on the device), "targets": [{"boxes" (M, 4) float32 xyxy input pixels, "labels" (M,) int64,
"masks" (M, S, S) uint8 at the padded input size}], "meta": [{"image_id", "ori_shape" (h, w), "img_shape" (h, w)
of the resized content before padding, "scale_factor" (w, h), "flip", "file_name"}]}``.

Annotation handling follows MMDetection's ``CocoDataset`` (``filter_cfg``, docs/recipes.md#sources): an annotation is
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

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

from bmp_lightning.data.instseg_transforms import Compose
from bmp_lightning.data.readers import check_image_entry
from bmp_lightning.structures.io import read_image
from bmp_lightning.structures.masks import segmentation_to_mask
from bmp_lightning.structures.records import BadSampleError, SkipLog
from bmp_lightning.utils.common import dist_world

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
        skip_bad_samples: log and redraw on a missing/corrupt image instead of raising (training only); the
            skipped images are in :attr:`skips` (shared with the DataLoader workers: :attr:`num_bad`,
            :meth:`skip_report`).
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
        self.skips = SkipLog(len(self))

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
        images: dict[int, dict] = {}
        skipped: dict[int, str] = {}  # image id -> why (skip_bad_samples)
        self.entries_skipped: list[str] = []
        for i, img in enumerate(doc["images"]):
            try:
                check_image_entry(img, f"{self.ann_file}, images[{i}]")
                if img["id"] in images:
                    raise BadSampleError(f"{self.ann_file}, images[{i}]: id {img['id']} repeats an earlier entry")
            except BadSampleError as err:
                if not self.skip_bad_samples:
                    raise
                self.entries_skipped.append(str(err))
                if isinstance(img, dict) and isinstance(img.get("id"), int):
                    skipped[img["id"]] = f"images[{i}] skipped"
                    images.pop(img["id"], None)
                continue
            if img["id"] not in skipped:
                images[img["id"]] = img
                per_image[img["id"]] = []
        ann_ids: set[int] = set()
        for i, ann in enumerate(doc["annotations"]):
            img_id = ann.get("image_id")
            try:
                if ann.get("id") is not None and ann["id"] in ann_ids:
                    raise BadSampleError(f"{self.ann_file}, annotations[{i}]: id={ann['id']} repeats an earlier one")
                if img_id not in images:
                    why = skipped.get(img_id, "is unknown")
                    raise BadSampleError(f"{self.ann_file}: annotation id={ann.get('id')}: image {img_id} {why}")
            except BadSampleError as err:
                if not self.skip_bad_samples:
                    raise
                self.entries_skipped.append(str(err))
                continue
            ann_ids.add(ann.get("id"))
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
        if self.entries_skipped:
            log.warning("skipped %d bad entries in %s (first: %s)", len(self.entries_skipped), self.ann_file,
                        "; ".join(self.entries_skipped[:5]))  # fmt: skip

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
            raise BadSampleError(
                f"{where}: image {path} is {h}x{w} but the json says {rec['height']}x{rec['width']}",
                kind="image size differs from the annotation",
            )
        anns = rec["anns"]
        masks = np.zeros((len(anns), h, w), np.uint8)
        for i, (_, _, seg, ann_id) in enumerate(anns):
            try:
                m = segmentation_to_mask(seg, h, w)
            except Exception as err:  # pycocotools raises plain Exceptions on malformed RLE
                raise BadSampleError(
                    f"{where}, annotation id={ann_id}: cannot decode the segmentation: {err}",
                    kind="segmentation unusable",
                ) from err
            if m.shape != (h, w):
                raise BadSampleError(
                    f"{where}, annotation id={ann_id}: mask is {m.shape}, image is {(h, w)}",
                    kind="segmentation unusable",
                )
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
            sample = None
            if not self.skips.is_bad(index):
                try:
                    sample = self.load_sample(index)
                except BadSampleError as err:
                    if self.test_mode or not self.skip_bad_samples:
                        raise
                    self.skips.mark(index, err)
                    log.warning("skipping a bad sample (%d images so far): %s", self.skips.count, err)
            pipeline = self.pipeline
            if sample is not None and pipeline is not None:
                sample = pipeline(sample, rng)
            if sample is not None:
                return to_tensors(sample)
            if self.test_mode:
                raise RuntimeError(f"the test pipeline dropped image index {index} of {self.ann_file}")
            index = int(rng.integers(len(self)))  # as mmdet: draw another image
        raise RuntimeError(f"{self.ann_file}: {self.max_refetch} redraws in a row were dropped by the pipeline")

    @property
    def num_bad(self) -> int:
        """Distinct images found bad and skipped so far, by this process and its DataLoader workers."""
        return self.skips.count

    def skip_report(self, limit: int = 100) -> dict[str, Any]:
        """``{"skipped": n, "samples": [{"index", "file", "entry", "reason"}, ...]}`` (see :class:`SkipLog`)."""

        def describe(i: int) -> dict[str, str]:
            rec = self.record(i)
            return {
                "file": os.path.join(self.img_dir, rec["file_name"]),
                "entry": f"{self.ann_file}, image_id={rec['image_id']}",
            }

        return self.skips.report(describe, limit)


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
