"""Top-down pose dataset: one person record -> one normalised crop with targets and evaluation metadata."""

from __future__ import annotations

import logging
import pickle
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from bmp_lightning.structures.io import open_image, read_image
from bmp_lightning.structures.records import BadSampleError, PersonRecord, SkipLog

log = logging.getLogger(__name__)

# ImageNet statistics on the 0-255 RGB scale (MMPose's PoseDataPreprocessor after BGR->RGB).
IMAGE_MEAN: tuple[float, float, float] = (123.675, 116.28, 103.53)
IMAGE_STD: tuple[float, float, float] = (58.395, 57.12, 57.375)

_MEAN_F32 = np.asarray(IMAGE_MEAN, np.float32)
_INV_STD_F32 = 1.0 / np.asarray(IMAGE_STD, np.float32)

Pipeline = Callable[[dict[str, Any], np.random.Generator], dict[str, Any]]


def normalize_image(img: np.ndarray) -> torch.Tensor:
    """``(H, W, 3)`` RGB uint8 -> ``(3, H, W)`` float32, ``(x - mean) / std`` per channel."""
    # numpy, not torch: small per-sample tensor ops in DataLoader workers pay torch's thread-pool overhead
    x = (img.astype(np.float32) - _MEAN_F32) * _INV_STD_F32
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


class SerializedList:
    """A read-only list stored as one pickled byte buffer (numpy) plus offsets.

    DataLoader workers are forked; touching millions of Python objects (even just their reference counts or the
    garbage collector's headers) copies the parent's memory pages into every worker. One numpy buffer has no such
    per-object state, so a 500k-person dataset costs its bytes once (MMEngine's ``serialize_data`` idea).
    """

    def __init__(self, items: Sequence[Any]) -> None:
        blobs = [pickle.dumps(x, protocol=pickle.HIGHEST_PROTOCOL) for x in items]
        self._ends = np.cumsum([len(b) for b in blobs], dtype=np.int64)
        self._data = np.frombuffer(b"".join(blobs), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, i: int) -> Any:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} items")
        i = i % len(self)
        start = int(self._ends[i - 1]) if i > 0 else 0
        return pickle.loads(self._data[start : int(self._ends[i])].tobytes())

    def __iter__(self) -> Iterator[Any]:
        return (self[i] for i in range(len(self)))


def concat_records(sources: Sequence[Sequence[PersonRecord]]) -> tuple[list[PersonRecord], list[int]]:
    """Concatenate per-source record lists; returns the records and the per-source sizes (index ranges in order)."""
    records = [r for recs in sources for r in recs]
    return records, [len(recs) for recs in sources]


class TopDownPoseDataset(Dataset):
    """Person crops for a top-down pose network.

    ``__getitem__`` reads the image, decodes the instance mask only when the pipeline uses one, runs
    ``pipeline(sample, rng)`` on the sample dict (``img`` (H, W, 3) RGB uint8, ``bbox`` (4,) xyxy,
    ``keypoints`` (21, 2), ``keypoints_visible`` (21,) = min(1, v), ``mask`` (H, W) uint8 or ``None``,
    ``bbox_score``) and returns tensors:

    * ``img``: (3, 256, 192) float32 normalised with :data:`IMAGE_MEAN` / :data:`IMAGE_STD`
      (``normalize=False``: the uint8 crop as (3, 256, 192) uint8);
    * ``heatmaps`` (21, 64, 48) and ``keypoint_weights`` (21,) when the pipeline (or ``codec``) produces them;
    * metadata: ``bbox_center``, ``bbox_scale`` (2,) of the crop, ``bbox`` (4,) the record's box,
      ``keypoints_gt`` (21, 3) ground truth in image pixels (for PCK), ``image_id``, ``instance_id``, ``bbox_score``,
      ``idx``, ``image_size`` (2,) (H, W) and ``source`` (a string).

    Augmentation randomness comes from ``np.random.default_rng([seed, epoch, index])``: reproducible, different
    every epoch (:meth:`set_epoch`) and independent of worker scheduling.

    Args:
        records: the people, e.g. a concatenation of sources (see :func:`concat_records`).
        pipeline: ``pipeline(sample, rng) -> sample`` (``bmp_lightning.data.pipeline.build_pose_pipeline``).
        codec: encodes ``keypoints``/``keypoints_visible`` of the transformed sample into heatmaps when the
            pipeline does not (anything with ``encode(keypoints, visible) -> (heatmaps, weights)``).
        skip_bad_samples: on a missing/corrupt image or an unusable mask, log, count and return another sample
            instead of raising :class:`BadSampleError`. The skipped samples are in :attr:`skips` (shared with the
            DataLoader workers: :attr:`num_bad`, :meth:`skip_report`); ``num_skipped`` counts the substitutions
            made in this process.
        normalize: normalise the image here (else the model does it on the device).
        seed: base seed of the augmentation RNG.
        use_mask: decode instance masks; default: the pipeline's ``use_mask``/``needs_mask`` attribute.
        max_substitutions: how many replacement indices to try for one bad sample.
        serialize: keep the records in one byte buffer (:class:`SerializedList`) instead of a Python list.
    """

    def __init__(
        self,
        records: Sequence[PersonRecord],
        pipeline: Pipeline | None,
        codec: Any = None,
        skip_bad_samples: bool = False,
        normalize: bool = True,
        seed: int = 0,
        use_mask: bool | None = None,
        max_substitutions: int = 50,
        serialize: bool = True,
    ) -> None:
        self.records: Sequence[PersonRecord] = SerializedList(records) if serialize else list(records)
        self.pipeline = pipeline
        self.codec = codec
        self.skip_bad_samples = skip_bad_samples
        self.normalize = normalize
        self.seed = int(seed)
        if use_mask is None:
            use_mask = bool(getattr(pipeline, "use_mask", getattr(pipeline, "needs_mask", False)))
        self.use_mask = use_mask
        self.max_substitutions = max_substitutions
        # shared memory: DataLoader workers (persistent ones too) see set_epoch() of the main process
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self.num_skipped = 0
        self.skips = SkipLog(len(self.records))

    def __len__(self) -> int:
        return len(self.records)

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(int(epoch))

    def rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, index])

    def load_sample(self, index: int, rec: PersonRecord | None = None) -> dict[str, Any]:
        """The sample dict the pipeline receives (full image, nothing transformed yet)."""
        rec = self.records[index] if rec is None else rec
        region_first = bool(getattr(self.pipeline, "region_first", False))
        # a region-first pipeline decodes only the pixels it reads, of the image and of the mask
        img = (open_image if region_first else read_image)(rec.image_path, where=rec.where())
        h, w = img.shape[:2]
        if rec.image_size is not None and tuple(rec.image_size) != (h, w):
            raise BadSampleError(
                f"{rec.where()}: image {rec.image_path} is {h}x{w} but the annotation says "
                f"{rec.image_size[0]}x{rec.image_size[1]}",
                kind="image size differs from the annotation",
            )
        mask = None
        if self.use_mask and rec.has_mask:
            try:
                mask = rec.mask(h, w, lazy=region_first)
            except (TypeError, ValueError, KeyError) as err:  # BadSampleError is a ValueError too
                raise BadSampleError(
                    f"{rec.where()}: cannot decode the segmentation: {err}", kind="segmentation unusable"
                ) from err
            if mask.shape != (h, w):
                raise BadSampleError(
                    f"{rec.where()}: mask is {mask.shape}, image {rec.image_path} is {(h, w)}",
                    kind="segmentation unusable",
                )
        kpts = rec.keypoints
        return {
            "img": img,
            "bbox": rec.bbox.astype(np.float32).copy(),
            "keypoints": kpts[:, :2].astype(np.float32).copy(),
            "keypoints_visible": np.minimum(1.0, kpts[:, 2]).astype(np.float32),
            "mask": mask,
            "bbox_score": float(rec.bbox_score),
            "image_id": rec.image_id,
            "instance_id": rec.instance_id,
            "source": rec.source,
            "ori_shape": (h, w),
            "where": rec.where(),  # for the pipeline's error messages
            "image_path": rec.image_path,
        }

    def _prepare(self, index: int) -> dict[str, Any]:
        rec = self.records[index]
        sample = self.load_sample(index, rec)
        image_hw = sample["ori_shape"]
        if self.pipeline is not None:
            sample = self.pipeline(sample, self.rng(index))
        if "heatmaps" not in sample and self.codec is not None:
            sample["heatmaps"], sample["keypoint_weights"] = self.codec.encode(
                sample["keypoints"], sample["keypoints_visible"]
            )
        img = sample["img"]
        out: dict[str, Any] = {
            "img": normalize_image(img)
            if self.normalize
            else torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)
        }
        for key in ("heatmaps", "keypoint_weights"):
            if key in sample:
                out[key] = torch.as_tensor(np.asarray(sample[key], np.float32))
        center = sample.get("bbox_center")
        scale = sample.get("bbox_scale")
        if center is None or scale is None:  # a pipeline without a crop: describe the record's box
            x1, y1, x2, y2 = rec.bbox
            center, scale = ((x1 + x2) / 2, (y1 + y2) / 2), (x2 - x1, y2 - y1)
        out["bbox_center"] = torch.as_tensor(np.asarray(center, np.float32).reshape(2))
        out["bbox_scale"] = torch.as_tensor(np.asarray(scale, np.float32).reshape(2))
        out["bbox"] = torch.from_numpy(rec.bbox.astype(np.float32))
        out["keypoints_gt"] = torch.from_numpy(rec.keypoints.astype(np.float32))
        out["image_id"] = torch.scalar_tensor(rec.image_id, dtype=torch.int64)  # 2x cheaper than torch.tensor
        out["instance_id"] = torch.scalar_tensor(rec.instance_id, dtype=torch.int64)
        out["bbox_score"] = torch.scalar_tensor(rec.bbox_score, dtype=torch.float32)
        out["image_size"] = torch.from_numpy(np.array(image_hw, np.int64))
        out["idx"] = torch.scalar_tensor(index, dtype=torch.int64)
        out["source"] = rec.source
        return out

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not self.skip_bad_samples:
            return self._prepare(index)
        tried = index
        for attempt in range(self.max_substitutions + 1):
            if not self.skips.is_bad(tried):
                try:
                    return self._prepare(tried)
                except BadSampleError as err:
                    self.skips.mark(tried, err)
                    self.num_skipped += 1
                    log.warning("skipping bad sample #%d (%d so far in this process): %s", tried, self.num_skipped, err)
            # a deterministic substitute: the same replacement for the same (seed, epoch, index, attempt)
            tried = int(np.random.default_rng([self.seed, self.epoch, index, attempt]).integers(len(self)))
        raise BadSampleError(f"no usable sample found after {self.max_substitutions} substitutions for index {index}")

    @property
    def num_bad(self) -> int:
        """Distinct samples found bad and skipped so far, by this process and its DataLoader workers."""
        return self.skips.count

    def skip_report(self, limit: int = 100) -> dict[str, Any]:
        """``{"skipped": n, "samples": [{"index", "file", "entry", "reason"}, ...]}`` (see :class:`SkipLog`)."""

        def describe(i: int) -> dict[str, str]:
            rec = self.records[i]
            return {"file": rec.image_path, "entry": rec.where()}

        return self.skips.report(describe, limit)
