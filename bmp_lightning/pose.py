"""PoseEstimator: the inference API of ViTPose / MaskPose (what the BMP loop, the demo and users call).

from bmp_lightning import PoseEstimator
pose = PoseEstimator.from_checkpoint("MaskPose-b.pth", device="cuda")
pose = PoseEstimator.from_pretrained("maskpose-b", device="cuda")   # by name, from vrg-prague/BBoxMaskPose (cached)
keypoints, scores = pose(image, bboxes, masks)      # (N,K,2) image pixels, (N,K)
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from bmp_lightning.data.codec import UDPHeatmap, flip_test_heatmaps
from bmp_lightning.data.crop import source_region, warp_region
from bmp_lightning.data.datasets import IMAGE_MEAN, IMAGE_STD
from bmp_lightning.data.transforms import GetBBoxCenterScale, MaskBackground, TopdownAffine
from bmp_lightning.interop.hub import hub_weights, resolve_weights
from bmp_lightning.interop.pose_weights import build_net_from_weights
from bmp_lightning.structures.io import as_rgb_array
from bmp_lightning.structures.keypoints import flip_indices_for

log = logging.getLogger(__name__)


class PoseEstimator:
    """Top-down pose on given boxes with the validation pipeline of the paper.

    Per person: box x1.25 with aspect 192:256, MaskBackground (when the model is a MaskPose and a mask is given),
    UDP warp, network (+ flip test), DARK-UDP decode back to image pixels. Persons are batched.

    Args:
        net: heatmap network ``(B,3,H,W) -> (B,K,h,w)``.
        use_mask: the model is a MaskPose (masks dim the background; without a mask the image is used as is).
        flip_test: average with the flipped crop's heatmaps.
        batch_size: persons per forward pass.
    """

    def __init__(
        self,
        net: nn.Module,
        use_mask: bool = True,
        flip_test: bool = True,
        device: str | torch.device = "cpu",
        input_size: tuple[int, int] = (192, 256),
        heatmap_size: tuple[int, int] = (48, 64),
        mask_alpha: float = 0.2,
        batch_size: int = 64,
    ) -> None:
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()
        self.use_mask = use_mask
        self.flip_test = flip_test
        self.batch_size = batch_size
        self.input_size = tuple(input_size)
        self.codec = UDPHeatmap(input_size=self.input_size, heatmap_size=tuple(heatmap_size))
        self._center_scale = GetBBoxCenterScale(padding=1.25)
        self._mask_bg = MaskBackground(alpha=mask_alpha, perturb=False, continue_on_failure=True)
        self._affine = TopdownAffine(input_size=self.input_size)
        self._mean = torch.tensor(IMAGE_MEAN, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(IMAGE_STD, device=self.device).view(1, 3, 1, 1)

    @property
    def num_keypoints(self) -> int:
        return int(getattr(self.net, "num_keypoints", 21))

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        device: str | torch.device = "cpu",
        preset: str | None = None,
        use_mask: bool | None = None,
        allow_objects: bool = False,
        **kwargs,
    ) -> PoseEstimator:
        """Load our weights (Lightning ``.ckpt`` or an exported state dict) or an official MMPose ``.pth``.

        The preset is inferred from the weights (embedding width / depth / keypoint count) unless given.
        ``use_mask`` defaults to the checkpoint's hyper-parameter, else to ``True`` for files named *mask*.
        The file is read with ``torch.load(weights_only=True)``: one that pickles other Python objects is refused
        (``UnsafeCheckpointError``) unless ``allow_objects=True``, which keeps them as inert placeholders.
        """

        net, meta = build_net_from_weights(path, preset=preset, allow_objects=allow_objects)
        if use_mask is None:
            use_mask = meta.get("use_mask")
        if use_mask is None:
            use_mask = "mask" in Path(path).name.lower()
        return cls(net, use_mask=bool(use_mask), device=device, **kwargs)

    @classmethod
    def from_pretrained(cls, name: str = "maskpose-b", device: str | torch.device = "cpu", **kwargs) -> PoseEstimator:
        """Published weights by name: ``maskpose-b`` (MaskPose-B) or ``vitpose-b-multi`` (ViTPose-B multi-dataset)
        from ``vrg-prague/BBoxMaskPose``, downloaded with huggingface_hub and cached; a local path works too.

        Raises:
            WeightsUnavailableError: offline and not cached (names the repository, the file and the command).
        """

        w = hub_weights(name)
        if w is not None and w.kind == "pose":
            kwargs.setdefault("use_mask", w.name.startswith("maskpose"))
        return cls.from_checkpoint(resolve_weights(name, key="pose", kind="pose"), device=device, **kwargs)

    def _crops(
        self, image: np.ndarray, bboxes: np.ndarray, masks: list[np.ndarray | None] | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """uint8 crops ``(N, h, w, 3)``, centers and scales: the validation pipeline in the upstream full-image order
        (box -> MaskBackground -> UDP warp), bit for bit, but region-first: the background of a person is dimmed only
        in the pixels its warp samples, so an image with many people costs a crop per person, not an image."""
        crops, centers, scales = [], [], []
        rng = np.random.default_rng(0)  # the val pipeline has no random step
        height, width = image.shape[:2]
        for i, box in enumerate(bboxes):
            mask = masks[i] if masks is not None else None
            sample = {
                "img": image,
                "bbox": np.asarray(box, np.float32),
                "mask": mask,
                "keypoints": np.zeros((1, 2), np.float32),  # none known at inference
                "keypoints_visible": np.zeros(1, np.float32),
            }
            sample = self._center_scale(sample, rng)
            geometry = self._affine.geometry(sample)
            mat = geometry[0]
            if self.use_mask and mask is not None and np.any(mask):
                x0, y0, x1, y1 = source_region(mat, self._affine.input_size, width, height)
                region, _ = self._mask_bg.apply_region(sample, rng, (x0, y0, x1, y1))
                crop = warp_region(region, mat, (x0, y0), self._affine.input_size, cv2.INTER_LINEAR, (height, width))
            else:
                crop = cv2.warpAffine(image, mat, self._affine.input_size, flags=cv2.INTER_LINEAR)
            sample = self._affine.finish(sample, geometry, crop, None)
            crops.append(sample["img"])
            centers.append(sample["bbox_center"])
            scales.append(sample["bbox_scale"])
        return np.stack(crops), np.stack(centers).astype(np.float32), np.stack(scales).astype(np.float32)

    @torch.inference_mode()
    def __call__(
        self,
        image: np.ndarray | str | os.PathLike,
        bboxes: np.ndarray,
        masks: np.ndarray | list[np.ndarray | None] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Keypoints ``(N,K,2)`` in image pixels and scores ``(N,K)`` for ``N`` xyxy boxes."""
        image = as_rgb_array(image)
        bboxes = np.asarray(bboxes, np.float32).reshape(-1, 4)
        k = self.num_keypoints
        if len(bboxes) == 0:
            return np.zeros((0, k, 2), np.float32), np.zeros((0, k), np.float32)
        if masks is not None and len(masks) != len(bboxes):
            raise ValueError(f"got {len(masks)} masks for {len(bboxes)} boxes")
        out_k, out_s = [], []
        for start in range(0, len(bboxes), self.batch_size):
            sl = slice(start, start + self.batch_size)
            crops, centers, scales = self._crops(image, bboxes[sl], None if masks is None else list(masks[sl]))
            x = torch.from_numpy(crops).to(self.device).permute(0, 3, 1, 2).float()
            x = (x - self._mean) / self._std
            hm = self._heatmaps(x)
            kpts, scores = self.codec.decode_to_image(hm, torch.from_numpy(centers), torch.from_numpy(scales))
            out_k.append(kpts.cpu().numpy())
            out_s.append(scores.cpu().numpy())
        return np.concatenate(out_k), np.concatenate(out_s)

    pose = __call__

    def _heatmaps(self, x: torch.Tensor) -> torch.Tensor:
        return flip_test_heatmaps(self.net, x, flip_indices_for, self.flip_test)
