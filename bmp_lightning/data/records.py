"""One person instance in the merged 21-keypoint schema: what every reader returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bmp_lightning.data.keypoints import NUM_KEYPOINTS


class BadSampleError(ValueError):
    """A sample that cannot be used; the message names the file and the entry."""


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
        :class:`~bmp_lightning.data.masks.RleMask` that decodes only the pixel boxes read from it."""
        if not self.has_mask:
            return None
        from bmp_lightning.data.masks import RleMask, segmentation_to_mask

        if height is None or width is None:
            if self.image_size is None:
                raise BadSampleError(f"{self.where()}: image size unknown, cannot decode the mask")
            height, width = self.image_size
        if lazy:
            return RleMask(self.segmentation, height, width)
        return segmentation_to_mask(self.segmentation, height, width)
