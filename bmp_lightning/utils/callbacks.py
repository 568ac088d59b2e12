"""Training callbacks: the pose visualiser (GT vs. prediction skeletons on the validation crops)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only

from bmp_lightning.data.datasets import IMAGE_MEAN, IMAGE_STD
from bmp_lightning.utils.visualize import denormalize, draw_masks, draw_skeletons, grid

log = logging.getLogger(__name__)

GT_COLOR = (0, 255, 0)
PRED_COLOR = (255, 64, 64)
MASK_COLOR = (64, 160, 255)


def image_to_crop(
    points: np.ndarray, center: np.ndarray, scale: np.ndarray, input_size: Sequence[int] = (192, 256)
) -> np.ndarray:
    """Image pixels ``(B, K, 2)`` -> crop pixels: the inverse of ``codec.keypoints_to_image`` (rotation 0).

    ``center``/``scale`` are ``(B, 2)``; ``input_size`` is ``(w, h)``. x_in = (x_img - center + scale/2) (size-1)/scale.
    """
    size = np.array([input_size[0] - 1, input_size[1] - 1], np.float64)
    center, scale = np.asarray(center, np.float64), np.asarray(scale, np.float64)
    return (np.asarray(points, np.float64) - (center - 0.5 * scale)[:, None, :]) * (size / scale)[:, None, :]


def crop_affine(center: np.ndarray, scale: np.ndarray, input_size: Sequence[int] = (192, 256)) -> np.ndarray:
    """The ``(2, 3)`` image -> crop matrix of one crop (``cv2.warpAffine``), as :func:`image_to_crop`."""
    sx, sy = (input_size[0] - 1) / float(scale[0]), (input_size[1] - 1) / float(scale[1])
    x0, y0 = float(center[0]) - 0.5 * float(scale[0]), float(center[1]) - 0.5 * float(scale[1])
    return np.array([[sx, 0.0, -x0 * sx], [0.0, sy, -y0 * sy]], np.float64)


def render_pose_panels(
    crops: np.ndarray,
    gt: np.ndarray,
    gt_visible: np.ndarray,
    pred: np.ndarray,
    pred_scores: np.ndarray,
    masks: Sequence[np.ndarray | None] | None = None,
    score_thr: float = 0.3,
    cols: int = 4,
) -> np.ndarray:
    """Side-by-side panels per crop: left GT skeleton (+ instance-mask outline), right the prediction.

    Args:
        crops: ``(B, H, W, 3)`` RGB uint8 crops.
        gt, pred: ``(B, K, 2)`` keypoints in crop pixels; gt_visible ``(B, K)`` (> 0: labelled), pred_scores ``(B, K)``.
        masks: per crop an ``(H, W)`` 0/1 mask in crop pixels, or None.
        cols: crop pairs per row.

    Returns:
        one RGB uint8 image (the tiled grid).
    """
    tiles = []
    for i in range(len(crops)):
        left = crops[i]
        if masks is not None and masks[i] is not None:
            left = draw_masks(left, masks[i][None], colors=[MASK_COLOR], alpha=0.25)
        left = draw_skeletons(left, gt[i][None], (gt_visible[i] > 0)[None].astype(np.float32), 0.5, [GT_COLOR])
        right = draw_skeletons(crops[i], pred[i][None], pred_scores[i][None], score_thr, [PRED_COLOR])
        tiles.append(np.concatenate([left, np.full((left.shape[0], 2, 3), 255, np.uint8), right], axis=1))
    return grid(tiles, cols=max(1, cols))


class PanelVisualizer(Callback):
    """What the pose and detector visualisers share: when to draw (every ``every_n_epochs`` validation epochs and
    the last; rank 0; not in the sanity check) and where the grid goes (``<run dir>/<dirname>/epoch_XXX_step_XXXXXX
    .png`` for any logger, W&B image ``log_key`` with a ``WandbLogger``). Subclasses collect panels, call ``_write``."""

    caption = "GT (left) | prediction (right)"

    def __init__(
        self,
        every_n_epochs: int = 5,
        num_samples: int = 8,
        cols: int = 4,
        dataloader_idx: int = 0,
        score_thr: float = 0.3,
        dirname: str = "vis",
        log_key: str = "val/vis",
    ) -> None:
        super().__init__()
        if every_n_epochs < 1 or num_samples < 1:
            raise ValueError(f"every_n_epochs and num_samples must be >= 1, got {every_n_epochs}, {num_samples}")
        self.every_n_epochs, self.num_samples, self.cols = int(every_n_epochs), int(num_samples), int(cols)
        self.dataloader_idx, self.score_thr = int(dataloader_idx), float(score_thr)
        self.dirname, self.log_key = dirname, log_key
        self.saved: list[Path] = []

    def _active(self, trainer: L.Trainer) -> bool:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return False
        epoch = trainer.current_epoch + 1
        last = trainer.max_epochs is not None and epoch >= trainer.max_epochs
        return epoch % self.every_n_epochs == 0 or last

    @rank_zero_only
    def _write(self, trainer: L.Trainer, image: np.ndarray) -> None:
        out_dir = Path(trainer.default_root_dir or ".") / self.dirname
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"epoch_{trainer.current_epoch:03d}_step_{trainer.global_step:06d}.png"
        cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        self.saved.append(path)
        caption = f"epoch {trainer.current_epoch} step {trainer.global_step}: {self.caption}"
        for lg in trainer.loggers:
            if type(lg).__name__ == "WandbLogger":
                lg.log_image(key=self.log_key, images=[image], caption=[caption], step=trainer.global_step)


class PoseVisualizer(PanelVisualizer):
    """Every ``every_n_epochs`` validation epochs, draw GT vs. predicted skeletons on the first validation crops.

    The crops are the network's input (denormalised; MaskPose crops show the dimmed background), the instance mask
    is outlined when the record has one, predictions come from the module's ``predict_heatmaps`` + ``codec.decode``
    (crop pixels). The grid goes to ``<run dir>/<dirname>/epoch_XXX_step_XXXXXX.png`` for any logger and to W&B as an
    image (``log_key``) when a ``WandbLogger`` is attached. Rank 0 only; nothing during the sanity check.

    Args:
        every_n_epochs: draw on validation epochs whose ``current_epoch + 1`` is a multiple (and the last one).
        num_samples: crops taken from the first validation batch(es) of ``dataloader_idx``.
        cols: crop pairs per row; score_thr: predicted joints below it are not drawn.
    """

    caption = "GT (left, green) | prediction (right)"

    def __init__(
        self,
        every_n_epochs: int = 5,
        num_samples: int = 8,
        cols: int = 4,
        dataloader_idx: int = 0,
        score_thr: float = 0.3,
        dirname: str = "vis",
        log_key: str = "val/vis",
    ) -> None:
        super().__init__(every_n_epochs, num_samples, cols, dataloader_idx, score_thr, dirname, log_key)
        self._panels: list[dict[str, np.ndarray]] = []
        self._warned = False

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._panels = []

    @torch.no_grad()
    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: dict[str, Any],
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        have = sum(len(p["crops"]) for p in self._panels)
        if dataloader_idx != self.dataloader_idx or have >= self.num_samples or not self._active(trainer):
            return
        if not (hasattr(pl_module, "predict_heatmaps") and hasattr(pl_module, "codec")):
            if not self._warned:
                log.warning("PoseVisualizer: %s is not a heatmap pose module; nothing drawn", type(pl_module).__name__)
                self._warned = True
            return
        n = min(self.num_samples - have, batch["img"].shape[0])
        img = batch["img"][:n]
        heatmaps = pl_module.predict_heatmaps(img)
        pred, scores = pl_module.codec.decode(heatmaps.float())  # crop pixels
        input_size = tuple(pl_module.codec.input_size)
        center = batch["bbox_center"][:n].cpu().numpy()
        scale = batch["bbox_scale"][:n].cpu().numpy()
        gt = batch["keypoints_gt"][:n].cpu().numpy()
        if img.is_floating_point():
            crops = np.stack([denormalize(x, IMAGE_MEAN, IMAGE_STD) for x in img.float().cpu().numpy()])
        else:  # uint8 crops (normalised on the device by the module)
            crops = img.permute(0, 2, 3, 1).cpu().numpy()
        self._panels.append(
            {
                "crops": crops,
                "gt": image_to_crop(gt[..., :2], center, scale, input_size),
                "gt_visible": gt[..., 2],
                "pred": pred.cpu().numpy(),
                "scores": scores.cpu().numpy(),
                "masks": self._crop_masks(trainer, batch, n, center, scale, input_size),
            }
        )

    def _crop_masks(self, trainer: L.Trainer, batch: dict[str, Any], n: int, center, scale, input_size) -> list:
        """The records' instance masks warped into the crops (None where unavailable)."""
        infos = getattr(getattr(trainer, "datamodule", None), "val_sets_info", None) or []
        if self.dataloader_idx >= len(infos) or "idx" not in batch:
            return [None] * n
        records = infos[self.dataloader_idx].records
        out: list[np.ndarray | None] = []
        for i in range(n):
            rec = records[int(batch["idx"][i])]
            h, w = (int(v) for v in batch["image_size"][i])
            try:
                mask = rec.mask(h, w)
            except (ValueError, TypeError, KeyError):  # the visualiser never stops a run
                mask = None
            if mask is None:
                out.append(None)
                continue
            m = crop_affine(center[i], scale[i], input_size)
            out.append(cv2.warpAffine(mask, m, (int(input_size[0]), int(input_size[1])), flags=cv2.INTER_NEAREST))
        return out

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._panels or not self._active(trainer):
            self._panels = []
            return
        cat = {k: np.concatenate([p[k] for p in self._panels]) for k in ("crops", "gt", "gt_visible", "pred", "scores")}
        masks = [m for p in self._panels for m in p["masks"]]
        self._panels = []
        image = render_pose_panels(
            cat["crops"], cat["gt"], cat["gt_visible"], cat["pred"], cat["scores"], masks, self.score_thr, self.cols
        )
        self._write(trainer, image)
