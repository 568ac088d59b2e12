"""The detector's counterpart of :class:`~bmp_lightning.utils.callbacks.PoseVisualizer`: GT | predicted boxes and
masks on the first validation images, as a PNG grid in ``<run dir>/vis/`` and a W&B image with the wandb logger."""

from __future__ import annotations

import logging
from typing import Any

import cv2
import lightning as L
import numpy as np
import torch

from bmp_lightning.utils.callbacks import PanelVisualizer
from bmp_lightning.utils.visualize import draw_boxes, draw_masks, grid

log = logging.getLogger("bmp_lightning")


def render_detection_panels(
    images: list[np.ndarray], gts: list[dict[str, np.ndarray]], preds: list[dict[str, np.ndarray]], cols: int = 2,
    pad: int = 2,
) -> np.ndarray:  # fmt: skip
    """One ``GT | prediction`` pair per image (``boxes`` ``(N, 4)`` xyxy and ``masks`` ``(N, H, W)`` in the image's
    pixels; predicted boxes labelled with their score), tiled ``cols`` pairs per row."""
    h = max(im.shape[0] for im in images)
    w = max(im.shape[1] for im in images)
    pairs = []
    for im, gt, pred in zip(images, gts, preds):
        canvas = np.zeros((h, w, 3), np.uint8)
        canvas[: im.shape[0], : im.shape[1]] = im
        left = draw_boxes(draw_masks(canvas, gt["masks"]), gt["boxes"])
        labels = [f"{s:.2f}" for s in pred.get("scores", [])]
        right = draw_boxes(draw_masks(canvas, pred["masks"]), pred["boxes"], labels=labels or None)
        pairs.append(np.concatenate([left, np.zeros((h, pad, 3), np.uint8), right], axis=1))
    return grid(pairs, cols=cols, pad=pad)


class DetectionVisualizer(PanelVisualizer):
    """Every ``every_n_epochs`` validation epochs (and the last), draw GT vs. predicted instances (``score_thr`` and
    above; the module's ``predict_batch``, EMA network) on the first ``num_samples`` validation images, in the
    network's input frame. Same arguments and outputs as ``PoseVisualizer``; rank 0 only, not during the sanity
    check."""

    def __init__(
        self,
        every_n_epochs: int = 5,
        num_samples: int = 4,
        cols: int = 2,
        dataloader_idx: int = 0,
        score_thr: float = 0.3,
        dirname: str = "vis",
        log_key: str = "val/vis",
    ) -> None:
        super().__init__(every_n_epochs, num_samples, cols, dataloader_idx, score_thr, dirname, log_key)
        self._items: list[tuple[np.ndarray, dict, dict]] = []

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._items = []

    @torch.no_grad()
    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: dict[str, Any], batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        if dataloader_idx != self.dataloader_idx or len(self._items) >= self.num_samples or not self._active(trainer):
            return
        n = min(self.num_samples - len(self._items), batch["img"].shape[0])
        dets = pl_module.predict_batch({"img": batch["img"][:n], "meta": batch["meta"][:n]})
        for i, (det, meta, target) in enumerate(zip(dets, batch["meta"][:n], batch["targets"][:n])):
            h, w = (int(v) for v in meta["img_shape"])
            sx, sy = (float(v) for v in meta["scale_factor"])
            image = batch["img"][i, :, :h, :w].permute(1, 2, 0).clamp(0, 255).byte().cpu().numpy()
            keep = det["scores"] >= self.score_thr
            masks = det["masks"][keep].cpu().numpy().astype(np.uint8)
            pred = {
                "boxes": det["bboxes"][keep].cpu().numpy() * np.array([sx, sy, sx, sy]),
                "scores": det["scores"][keep].cpu().numpy(),
                "masks": np.stack([cv2.resize(m, (w, h), interpolation=cv2.INTER_NEAREST) for m in masks])
                if len(masks) else np.zeros((0, h, w), np.uint8),
            }  # fmt: skip
            gt = {"boxes": target["boxes"].cpu().numpy(), "masks": target["masks"][:, :h, :w].cpu().numpy()}
            self._items.append((np.ascontiguousarray(image), gt, pred))

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        items, self._items = self._items, []
        if not items or not self._active(trainer):
            return
        images, gts, preds = zip(*items)
        self._write(trainer, render_detection_panels(list(images), list(gts), list(preds), self.cols))
