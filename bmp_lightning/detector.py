"""RTMDet-Ins inference API: RGB images in, boxes / scores / labels / masks in original pixels out.

    det = Detector.from_checkpoint("rtmdet-ins_l_8xb32-300e_coco.pth")   # MMDetection, ours, or a Lightning .ckpt
    det = Detector.from_pretrained("rtmdet-l-bmp")                        # BMP's detector by name (huggingface_hub)
    results = det(["a.jpg", rgb_array])                                   # one dict per image

Test-time preprocessing follows MMDetection (docs/recipes.md#rtmdet-ins-l): keep-ratio resize to fit 640x640
(cv2 bilinear, new size ``int(x * f + 0.5)``), pad bottom/right with 114, RGB -> BGR, normalise with the BGR
mean/std. Post-processing is ``rtmdet.postprocess``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np
import torch

from bmp_lightning.interop.hub import resolve_weights
from bmp_lightning.interop.mmdet import rtmdet_state_dict
from bmp_lightning.models.components.rtmdet.rtmdet_ins import RTMDetIns, build_rtmdet_ins, infer_rtmdet_ins_config
from bmp_lightning.structures.checkpoint import safe_load
from bmp_lightning.structures.io import as_rgb_array

log = logging.getLogger(__name__)

MEAN_BGR = (103.53, 116.28, 123.675)
STD_BGR = (57.375, 57.12, 58.395)
PAD_VALUE = 114

ImageLike = np.ndarray | str | os.PathLike


def resize_pad(
    image: np.ndarray, size: int = 640, pad_value: int = PAD_VALUE
) -> tuple[np.ndarray, tuple[float, float]]:
    """Keep-ratio resize of an ``(H, W, 3)`` uint8 image to fit ``size x size``, padded bottom/right.

    Returns:
        the ``(size, size, 3)`` canvas and ``(w_scale, h_scale)`` = ``(new_w / W, new_h / H)``.
    """
    h, w = image.shape[:2]
    f = min(size / h, size / w)
    new_w, new_h = int(w * f + 0.5), int(h * f + 0.5)
    resized = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    canvas = np.full((size, size, 3), pad_value, dtype=np.uint8)
    canvas[:new_h, :new_w] = resized
    return canvas, (new_w / w, new_h / h)


class Detector:
    """Batched RTMDet-Ins inference on RGB uint8 images.

    Args:
        model: an ``RTMDetIns`` (put in eval mode and moved to ``device``).
        device: torch device.
        score_thr, nms_iou, max_per_img, nms_pre, mask_thr: test config (MMDetection defaults).
        input_size: square network input side.
        batch_size: images per forward pass.
    """

    def __init__(
        self,
        model: RTMDetIns,
        device: str | torch.device = "cpu",
        score_thr: float = 0.05,
        nms_iou: float = 0.6,
        max_per_img: int = 100,
        nms_pre: int = 1000,
        mask_thr: float = 0.5,
        input_size: int = 640,
        batch_size: int = 4,
    ) -> None:
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        self.score_thr = score_thr
        self.nms_iou = nms_iou
        self.max_per_img = max_per_img
        self.nms_pre = nms_pre
        self.mask_thr = mask_thr
        self.input_size = input_size
        self.batch_size = batch_size
        self._mean = torch.tensor(MEAN_BGR, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(STD_BGR, device=self.device).view(1, 3, 1, 1)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        device: str | torch.device = "cpu",
        num_classes: int | None = None,
        score_thr: float = 0.05,
        nms_iou: float = 0.6,
        max_per_img: int = 100,
        **kwargs: Any,
    ) -> Detector:
        """Build the network that matches the weights (size and class count are read from them) and load them.

        ``path`` may be our weights, a Lightning ``.ckpt`` or an official MMDetection ``.pth`` (auto-detected).
        ``num_classes`` below the checkpoint's keeps its first classes (``1`` = person on a COCO model).
        """
        ckpt = safe_load(path, placeholders=True)
        if not isinstance(ckpt, Mapping):
            raise ValueError(f"{path}: expected a checkpoint dict, got {type(ckpt).__name__}")
        sd = rtmdet_state_dict(ckpt, num_classes)
        cfg = infer_rtmdet_ins_config(sd)
        if num_classes is not None and num_classes != cfg["num_classes"]:
            raise ValueError(f"{path}: has {cfg['num_classes']} classes, cannot provide {num_classes}")
        model = build_rtmdet_ins(**cfg)
        model.load_state_dict(sd, strict=True)
        log.info("loaded RTMDet-Ins (%d classes) from %s", cfg["num_classes"], path)
        return cls(model, device, score_thr, nms_iou, max_per_img, **kwargs)

    @classmethod
    def from_pretrained(cls, name: str = "rtmdet-l-bmp", device: str | torch.device = "cpu", **kwargs: Any) -> Detector:
        """Published weights by name (``rtmdet-l-bmp``: BBoxMaskPose's RTMDet-Ins-L from ``vrg-prague/BBoxMaskPose``,
        downloaded with huggingface_hub and cached) or a local path; see :meth:`from_checkpoint`.

        Raises:
            WeightsUnavailableError: offline and not cached (names the repository, the file and the command).
        """

        return cls.from_checkpoint(resolve_weights(name, key="detector", kind="detector"), device=device, **kwargs)

    def preprocess(self, images: Sequence[np.ndarray]) -> tuple[torch.Tensor, list[tuple[float, float]]]:
        """RGB uint8 images -> ``(B, 3, S, S)`` normalised BGR batch and per-image ``(w_scale, h_scale)``."""
        canvases, scales = [], []
        for img in images:
            canvas, scale = resize_pad(img, self.input_size)
            canvases.append(canvas[..., ::-1])  # RGB -> BGR: the network was trained on BGR
            scales.append(scale)
        batch = torch.from_numpy(np.ascontiguousarray(np.stack(canvases))).to(self.device)
        batch = batch.permute(0, 3, 1, 2).float()
        return (batch - self._mean) / self._std, scales

    @torch.inference_mode()
    def __call__(self, images: ImageLike | Sequence[ImageLike]) -> list[dict[str, np.ndarray]]:
        """Detect on one image or a list (RGB uint8 ``(H, W, 3)`` arrays or file paths).

        Returns:
            one dict per image: ``bboxes (N, 4)`` float32 xyxy original pixels, ``scores (N,)`` float32,
            ``labels (N,)`` int64, ``masks (N, H, W)`` bool, sorted by score.
        """
        if isinstance(images, (np.ndarray, str, os.PathLike)):
            images = [images]
        arrays = [as_rgb_array(im) for im in images]
        results: list[dict[str, np.ndarray]] = []
        for start in range(0, len(arrays), self.batch_size):
            chunk = arrays[start : start + self.batch_size]
            x, scales = self.preprocess(chunk)
            dets = self.model.predict(
                x,
                [im.shape[:2] for im in chunk],
                scales,
                score_thr=self.score_thr,
                nms_pre=self.nms_pre,
                nms_iou=self.nms_iou,
                max_per_img=self.max_per_img,
                mask_thr=self.mask_thr,
            )
            for d in dets:
                results.append(
                    {
                        "bboxes": d["bboxes"].float().cpu().numpy(),
                        "scores": d["scores"].float().cpu().numpy(),
                        "labels": d["labels"].long().cpu().numpy(),
                        "masks": d["masks"].cpu().numpy(),
                    }
                )
        return results
