"""PoseLitModule: top-down heatmap pose estimation (ViTPose-B multi-dataset and MaskPose-B).

MaskPose is this same module: the mask enters only through the data pipeline (MaskBackground), so the module just
records ``use_mask`` for the inference API and the visualiser.
"""

from __future__ import annotations

import functools
import logging
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import nn

from bmp_lightning.data.codec import UDPHeatmap, flip_test_heatmaps, keypoint_mse_loss
from bmp_lightning.data.datasets import IMAGE_MEAN, IMAGE_STD
from bmp_lightning.interop.pose_weights import load_pose_weights
from bmp_lightning.models.optim import (
    build_warmup_multistep,
    layer_decay_param_groups,
    make_optimizer,
    train_steps_per_epoch,
)
from bmp_lightning.models.pose_eval import evaluate_val_sets
from bmp_lightning.structures.keypoints import NUM_KEYPOINTS, flip_indices_for
from bmp_lightning.utils.common import to_plain
from bmp_lightning.utils.fit_guard import (
    NonFiniteGuard,
    check_finite_state,
    check_loader_state_applied,
    guarded_optimizer_step,
    keep_epoch_unfinished,
)
from bmp_lightning.utils.skips import log_skips

log = logging.getLogger(__name__)


class PoseLitModule(L.LightningModule):
    """Train / validate a top-down heatmap network.

    Args:
        net: ``(B,3,256,192) -> (B,K,64,48)`` heatmap network (e.g. ``pose_net.vitpose_b``).
        lr: AdamW base lr (5e-4 for batch 64 per device).
        weight_decay: AdamW weight decay (0.1); none on 1-D params, biases, pos_embed.
        layer_decay: layer-wise lr decay rate over ``num_layers`` ids (0.75 over 14 for ViT-B).
        warmup_iters: linear warm-up iterations from factor ``warmup_factor``.
        milestones: epochs where the lr is multiplied by ``gamma``.
        flip_test: average with the mirrored, channel-swapped heatmaps of the flipped crop at validation.
        use_mask: MaskPose (the data pipeline dims the background by the instance mask).
        init_weights: weights to start from (ours, an official MMPose ``.pth``, a name such as ``vitpose-b-multi``, or
            ``mae``); ``ckpt_path`` resumes instead.
        allow_random_init: ``mae`` weights that cannot be fetched leave the random init instead of stopping the run.
        score_thr: keypoint score threshold for the COCO instance score (0.2 upstream).
        max_nonfinite_steps: NaN/inf losses to skip (no optimizer step; counted as ``train/nonfinite_steps``) before
            the run stops with an error; 0 stops at the first.
        optimizer: the ``optimizer`` config group, a partial called with the parameter groups (``None``: AdamW with
            ``lr``, ``betas``, ``weight_decay``); the numbers stay this module's keys.
        scheduler: the ``scheduler`` config group, a partial called with the optimizer and the steps per epoch
            (``None``: warm-up + multi-step from this module's keys); stepped after every optimizer step.
    """

    def __init__(
        self,
        net: nn.Module,
        lr: float = 5e-4,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.999),
        layer_decay: float = 0.75,
        num_layers: int | None = None,
        warmup_iters: int = 500,
        warmup_factor: float = 0.001,
        milestones: tuple[int, ...] = (170, 200),
        gamma: float = 0.1,
        flip_test: bool = True,
        use_mask: bool = False,
        init_weights: str | None = None,
        allow_random_init: bool = False,
        input_size: tuple[int, int] = (192, 256),
        heatmap_size: tuple[int, int] = (48, 64),
        sigma: float = 2.0,
        compile: bool = False,
        max_nonfinite_steps: int = 0,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False, ignore=["net", "optimizer", "scheduler"])
        self.optimizer_factory = optimizer or functools.partial(
            torch.optim.AdamW, lr=lr, betas=tuple(betas), weight_decay=weight_decay
        )
        self.scheduler_factory = scheduler or functools.partial(
            build_warmup_multistep,
            warmup_iters=warmup_iters,
            warmup_factor=warmup_factor,
            milestones=tuple(milestones),
            gamma=gamma,
        )
        self.net = net
        self.codec = UDPHeatmap(input_size=tuple(input_size), heatmap_size=tuple(heatmap_size), sigma=sigma)
        if init_weights:
            load_pose_weights(self.net, init_weights, allow_random_init=allow_random_init)
        self._val_preds: dict[int, list[dict[str, Any]]] = defaultdict(list)
        # the Hydra config of `net` (set by the entry point), stored in checkpoints so PoseEstimator can rebuild it
        self.net_config: dict[str, Any] | None = None
        self.nonfinite = NonFiniteGuard(max_nonfinite_steps)
        # uint8 crops are normalised here, on the device (MMPose's data preprocessor): 4x fewer bytes through the
        # DataLoader. Not persistent: checkpoints carry no new keys, old ones load unchanged.
        self.register_buffer("pixel_mean", torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGE_STD).view(1, 3, 1, 1), persistent=False)

    def normalize(self, img: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` uint8 RGB crops -> ``(x - mean) / std`` float32; float input is taken as normalised."""
        if img.is_floating_point():
            return img
        return (img.float() - self.pixel_mean) / self.pixel_std

    # ------------------------------------------------------------------ forward
    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(img))

    @property
    def num_keypoints(self) -> int:
        return int(self.net.num_keypoints) if hasattr(self.net, "num_keypoints") else NUM_KEYPOINTS

    def flip_indices(self) -> list[int]:
        return list(flip_indices_for(self.num_keypoints))

    @torch.no_grad()
    def predict_heatmaps(self, img: torch.Tensor, flip_test: bool | None = None) -> torch.Tensor:
        """Heatmaps, averaged with the flipped crop's heatmaps (mirrored and channel-swapped, no shift)."""
        flip_test = self.hparams.flip_test if flip_test is None else flip_test
        return flip_test_heatmaps(self.net, self.normalize(img), self.flip_indices(), flip_test)

    @torch.no_grad()
    def decode(
        self, heatmaps: torch.Tensor, center: torch.Tensor, scale: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Heatmaps -> keypoints (B,K,2) in image pixels and scores (B,K) (DARK-UDP)."""
        return self.codec.decode_to_image(heatmaps, center, scale)

    # ------------------------------------------------------------------ train
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        self.nonfinite.before_forward(self)
        heatmaps = self.net(self.normalize(batch["img"]))
        loss = keypoint_mse_loss(heatmaps, batch["heatmaps"], batch["keypoint_weights"])
        if not self.nonfinite.check(self, loss):
            self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=heatmaps.shape[0])
        if self.nonfinite.max_steps:
            self.log(
                "train/nonfinite_steps", float(self.nonfinite.count), on_step=False, on_epoch=True, reduce_fx="max"
            )
        return loss

    def on_train_start(self) -> None:
        check_loader_state_applied(self.trainer)  # a mid-epoch resume continues where it stopped, or fails

    def on_train_epoch_end(self) -> None:
        log_skips(self)  # train/skipped_samples, train/skipped_entries: over DataLoader workers and DDP ranks

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        guarded_optimizer_step(self, optimizer, optimizer_closure)

    # ------------------------------------------------------------------ validation
    def on_validation_epoch_start(self) -> None:
        self._val_preds = defaultdict(list)

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        heatmaps = self.predict_heatmaps(batch["img"])
        if "heatmaps" in batch:
            loss = keypoint_mse_loss(heatmaps, batch["heatmaps"], batch["keypoint_weights"])
            self.log("val/loss", loss, add_dataloader_idx=False, batch_size=heatmaps.shape[0], sync_dist=True)
        kpts, scores = self.decode(heatmaps, batch["bbox_center"], batch["bbox_scale"])
        kpts, scores = kpts.cpu().numpy(), scores.cpu().numpy()
        center = batch["bbox_center"].cpu().numpy()
        scale = batch["bbox_scale"].cpu().numpy()
        gt = batch["keypoints_gt"].cpu().numpy() if "keypoints_gt" in batch else None
        for i in range(kpts.shape[0]):
            pred = {
                "image_id": int(batch["image_id"][i]),
                "instance_id": int(batch["instance_id"][i]),
                "keypoints": kpts[i],
                "keypoint_scores": scores[i],
                "bbox_score": float(batch["bbox_score"][i]),
                "area": float(np.prod(scale[i])),
                "bbox_center": center[i],
                "bbox_scale": scale[i],
            }
            if gt is not None:
                pred["keypoints_gt"] = gt[i]
            self._val_preds[dataloader_idx].append(pred)

    def on_validation_epoch_end(self) -> None:

        metrics = evaluate_val_sets(self, self._val_preds)
        for name, value in metrics.items():
            self.log(name, value, add_dataloader_idx=False, sync_dist=False, rank_zero_only=False)
        self._val_preds = defaultdict(list)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_finite_state(checkpoint, trainer=self._trainer)  # NaN/inf weights are never saved
        keep_epoch_unfinished(self._trainer, checkpoint)
        checkpoint["net_config"] = self.net_config
        checkpoint["nonfinite_steps"] = self.nonfinite.count
        # Hydra passes ListConfig/DictConfig arguments; plain containers keep the checkpoint loadable with
        # torch.load(weights_only=True), which Lightning uses to resume (ckpt_path)
        if "hyper_parameters" in checkpoint:
            checkpoint["hyper_parameters"] = to_plain(checkpoint["hyper_parameters"])

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.net_config = checkpoint.get("net_config", self.net_config)
        self.nonfinite.load_state_dict({"count": checkpoint.get("nonfinite_steps", 0)})

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        groups = layer_decay_param_groups(
            self.net, base_lr=hp.lr, weight_decay=hp.weight_decay, layer_decay=hp.layer_decay, num_layers=hp.num_layers
        )
        optimizer = make_optimizer(self.optimizer_factory, groups)
        scheduler = self.scheduler_factory(optimizer, steps_per_epoch=train_steps_per_epoch(self.trainer))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
