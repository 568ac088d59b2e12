"""One person instance in the merged 21-keypoint schema: what every reader returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bmp_lightning.structures.keypoints import NUM_KEYPOINTS
from bmp_lightning.structures.masks import RleMask, segmentation_to_mask


class BadSampleError(ValueError):
    """A sample that cannot be used; the message names the file and the entry.

    ``kind`` is a short category (``image not found``, ``image unreadable or corrupt``, ...) for skip reports,
    which cannot carry every message across DataLoader workers.
    """

    def __init__(self, message: str, kind: str = "bad sample") -> None:
        super().__init__(message)
        self.kind = kind


class SkipLog:
    """The samples a dataset skipped, shared by the main process and its DataLoader workers.

    One shared-memory byte per sample: 0 = not found bad, else ``1 + index`` of the error's ``kind`` in
    :attr:`KINDS`. Workers mark what they skip; the main process reads the total (:attr:`count`) and the list
    (:meth:`report`) at any time, without any message passing. Under DDP every rank holds its own log: combine
    them with ``all_reduce(log.flags, MAX)`` (a sample is bad on every rank that tries it) before counting.
    """

    KINDS: tuple[str, ...] = (
        "bad sample",
        "image not found",
        "image unreadable or corrupt",
        "image size differs from the annotation",
        "segmentation unusable",
    )

    def __init__(self, size: int) -> None:
        import torch

        self.flags = torch.zeros(int(size), dtype=torch.uint8).share_memory_()

    def mark(self, index: int, err: BadSampleError) -> None:
        kind = getattr(err, "kind", "bad sample")
        self.flags[int(index)] = 1 + (self.KINDS.index(kind) if kind in self.KINDS else 0)

    def is_bad(self, index: int) -> bool:
        return bool(self.flags[int(index)])

    @property
    def count(self) -> int:
        """Distinct samples skipped so far (all workers of this process)."""
        return int((self.flags > 0).sum())

    def indices(self) -> list[int]:
        return [int(i) for i in (self.flags > 0).nonzero().flatten()]

    def report(self, describe, limit: int = 100) -> dict[str, Any]:
        """``{"skipped": n, "samples": [{"index", **describe(index), "reason"}, ...]}`` (the first ``limit``).

        ``describe(index)`` gives what names the sample, e.g. ``{"file": ..., "entry": ...}``.
        """
        idx = self.indices()
        samples = [
            {"index": i, **describe(i), "reason": self.KINDS[int(self.flags[i]) - 1]} for i in idx[: max(0, limit)]
        ]
        return {"skipped": len(idx), "samples": samples}


@dataclass
class PersonRecord:
    """A person to crop, in the merged schema.

    Attributes:
        image_path: path of the image file.
        image_id: id of the image in its annotation file.
        instance_id: id of the annotation (unique per person across the dataset; detections get fresh ids).
        source: ``coco``, ``mpii``, ``aic``, ``ochuman``, ``crowdpose``, ``synthetic`` ...
        bbox: ``(4,)`` float32 xyxy in image pixels.
        keypoints: ``(21, 3)`` float32 ``(x, y, v)`` with COCO visibility v in {0, 1, 2}.
        image_size: ``(height, width)`` when known from the annotation, else ``None``.
        segmentation: COCO polygons (list of lists), an RLE dict, or ``None``; decoded by :meth:`mask`.
        bbox_score: detector score (1.0 for ground truth boxes).
        ann_file: the annotation file the record came from (for error messages).
    """

    image_path: str
    image_id: int
    instance_id: int
    source: str
    bbox: np.ndarray
    keypoints: np.ndarray = field(default_factory=lambda: np.zeros((NUM_KEYPOINTS, 3), np.float32))
    image_size: tuple[int, int] | None = None
    segmentation: Any = None
    bbox_score: float = 1.0
    ann_file: str = ""

    @property
    def has_mask(self) -> bool:
        return self.segmentation is not None and len(self.segmentation) > 0

    def where(self) -> str:
        """``file, entry`` string for error messages."""
        return f"{self.ann_file or self.image_path}, image_id={self.image_id}, instance id={self.instance_id}"

    def mask(self, height: int | None = None, width: int | None = None, lazy: bool = False) -> Any:
        """Decode the segmentation to an ``(H, W)`` uint8 0/1 mask (lazily: only when asked). ``lazy``: an
        :class:`~bmp_lightning.structures.masks.RleMask` that decodes only the pixel boxes read from it."""
        if not self.has_mask:
            return None

        if height is None or width is None:
            if self.image_size is None:
                raise BadSampleError(f"{self.where()}: image size unknown, cannot decode the mask")
            height, width = self.image_size
        if lazy:
            return RleMask(self.segmentation, height, width)
        return segmentation_to_mask(self.segmentation, height, width)


def skip_summary(datasets: dict[str, Any], read_reports: list[Any] = (), limit: int = 100) -> dict[str, Any]:
    """What ``skip_bad_samples`` skipped so far, in this process and its DataLoader workers (one rank).

    Returns ``{"entries": n, "samples": n, "per_dataset": {name: n}, "entry_reasons": [str], "sample_list":
    [{"dataset", "index", "file", "entry", "reason"}]}``: ``entries`` are annotation entries the readers skipped
    (``ReadReport``), ``samples`` the samples the datasets skipped (:class:`SkipLog`); lists hold the first ``limit``.
    """
    reasons = [r for rep in read_reports for r in rep.reasons]
    entries = sum(rep.skipped for rep in read_reports)
    per_dataset, sample_list = {}, []
    for name, ds in datasets.items():
        if ds is None or not hasattr(ds, "skip_report"):
            continue
        reasons += getattr(ds, "entries_skipped", [])  # a dataset that reads its own annotation file
        entries += len(getattr(ds, "entries_skipped", []))
        rep = ds.skip_report(limit)
        per_dataset[name] = rep["skipped"]
        sample_list += [{"dataset": name, **s} for s in rep["samples"]]
    return {
        "entries": entries,
        "samples": sum(per_dataset.values()),
        "per_dataset": per_dataset,
        "entry_reasons": reasons[:limit],
        "sample_list": sample_list[:limit],
    }
