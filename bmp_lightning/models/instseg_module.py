"""InstSegLitModule: RTMDet-Ins training and COCO box / mask validation (BMP's detector fine-tune).

Recipe (docs/recipes.md#mask-out-fine-tune):

- input: the datamodule's RGB 0..255 batch is flipped to BGR and normalised with the BGR mean/std on the device;
- losses: :class:`~bmp_lightning.models.components.rtmdet.criterion.RTMDetInsCriterion` (QFL + 2 GIoU + 2 Dice);
- AdamW (lr 0.004 at 256 images per step upstream, 0.002 for BMP's batch-16 fine-tune), weight decay 0.05 on conv /
  linear weights only: every norm parameter and every bias is excluded, shared (aliased) convs are counted once;
- lr per optimizer step: linear warm-up from ``warmup_factor`` over ``warmup_iters``, constant, then cosine from
  ``cosine_begin_epoch`` to the last epoch down to ``eta_min_ratio * lr`` (iteration based);
- EMA (:class:`~bmp_lightning.models.ema.ExpMomentumEMA`) updated after every optimizer step; validation and the
  deployable weights use it. Checkpoint layout: ``model.*`` raw weights, ``ema_model.module.*`` the EMA weights,
  plus ``net_config`` / ``num_classes`` (``Detector.from_checkpoint`` picks the EMA copy);
- validation: RTMDet post-processing to original image pixels, COCO ``bbox`` and ``segm`` AP against the
  datamodule's val json, gathered and de-duplicated by ``image_id`` under DDP; metrics ``val/<name>/{bbox,segm}_AP``...
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from torch import nn

from bmp_lightning.interop.hub import resolve_weights
from bmp_lightning.interop.mmdet import rtmdet_state_dict
from bmp_lightning.metrics.detection import CocoDetectionEvaluator
from bmp_lightning.models.components.rtmdet.criterion import RTMDetInsCriterion
from bmp_lightning.models.ema import ExpMomentumEMA
from bmp_lightning.models.optim import build_warmup_cosine, make_optimizer, train_steps_per_epoch
from bmp_lightning.structures.checkpoint import safe_load
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

MEAN_BGR = (103.53, 116.28, 123.675)
STD_BGR = (57.375, 57.12, 58.395)

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


# ---------------------------------------------------------------------------------------------- optimiser / schedule
def rtmdet_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups, as MMEngine's ``paramwise_cfg(norm_decay_mult=0, bias_decay_mult=0, bypass_duplicate=True)``.

    ``decay``: every weight of a non-norm module (convs, linears). ``no_decay``: every parameter of a norm module and
    every ``bias``. A tensor shared by several modules (RTMDet's aliased head convs) is listed once, under its first
    name. Frozen parameters are left out. Each group records ``group_name`` and ``param_names``.
    """
    decay: dict[str, Any] = {"params": [], "param_names": [], "weight_decay": weight_decay, "group_name": "decay"}
    no_decay: dict[str, Any] = {"params": [], "param_names": [], "weight_decay": 0.0, "group_name": "no_decay"}
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        for p_name, param in module.named_parameters(recurse=False):
            if id(param) in seen or not param.requires_grad:
                continue
            seen.add(id(param))
            group = no_decay if isinstance(module, _NORMS) or p_name == "bias" else decay
            group["params"].append(param)
            group["param_names"].append(f"{mod_name}.{p_name}" if mod_name else p_name)
    return [g for g in (decay, no_decay) if g["params"]]


# ---------------------------------------------------------------------------------------------- weights
def load_init_weights(net: nn.Module, path: str | os.PathLike, keep_classes: bool = False) -> list[str]:
    """Initialise an ``RTMDetIns`` from ours, a Lightning ``.ckpt`` (its EMA copy) or official MMDetection weights.

    When the file's class count differs from the network's (the COCO model's 80 -> person-only 1), ``rtm_cls`` is
    reinitialised as MMEngine does on a shape mismatch; ``keep_classes=True`` keeps the first rows instead (person is
    COCO's label 0). Any other missing or unexpected key is an error.

    Returns:
        the keys left at their initial values.
    """

    path = resolve_weights(path, key="model.init_weights", kind="detector")  # a name such as rtmdet-l-bmp
    ckpt = safe_load(path, placeholders=True)
    try:
        sd = rtmdet_state_dict(ckpt)
    except (ValueError, KeyError) as err:
        raise ValueError(f"{path}: cannot read RTMDet-Ins weights: {err}") from err
    want = int(net.num_classes)
    have = int(sd["head.rtm_cls.0.weight"].shape[0]) if "head.rtm_cls.0.weight" in sd else want
    cls_keys = [k for k in sd if k.startswith("head.rtm_cls.")]
    if have != want:
        if keep_classes and want < have:
            log.info("%s: keeping the first %d of %d classes of rtm_cls", path, want, have)
            sd.update({k: sd[k][:want].clone() for k in cls_keys})
        else:
            log.info("%s: %d classes in the file, %d in the model: rtm_cls reinitialised", path, have, want)
            for k in cls_keys:
                del sd[k]
    missing, unexpected = net.load_state_dict(sd, strict=False)
    bad_missing = [k for k in missing if not k.startswith("head.rtm_cls.")]
    if bad_missing or unexpected:
        raise ValueError(
            f"{path}: weights do not match the network: missing {bad_missing[:10]} ({len(bad_missing)}), "
            f"unexpected {list(unexpected)[:10]} ({len(unexpected)})"
        )
    log.info("initialised the detector from %s (%d tensors; %d left at init)", path, len(sd), len(missing))
    return list(missing)


# ---------------------------------------------------------------------------------------------- module
class InstSegLitModule(L.LightningModule):
    """Train / validate an RTMDet-Ins network.

    Args:
        net: an ``RTMDetIns`` (e.g. ``rtmdet_ins.rtmdet_ins_l``); its state-dict keys are ours.
        num_classes: expected classes of ``net`` (checked against it and against the datamodule); ``None``: the net's.
        lr, weight_decay, betas: AdamW (no decay on norms and biases).
        warmup_iters, warmup_factor: linear warm-up in optimizer steps.
        cosine_begin_epoch: first epoch of the cosine decay (it ends at ``trainer.max_epochs``).
        eta_min_ratio: final lr as a fraction of ``lr``.
        ema, ema_momentum, ema_gamma: ExpMomentumEMA of the network (validation and deployment use it).
        init_weights: weights to start from (ours, a Lightning ``.ckpt`` or official MMDetection ``.pth``);
            ``ckpt_path`` of the entry point resumes a run instead.
        init_keep_classes: with ``init_weights`` of more classes, keep the first rows of ``rtm_cls`` instead of
            reinitialising it (upstream reinitialises).
        score_thr, nms_pre, nms_iou, max_per_img, mask_thr: validation post-processing (MMDetection test_cfg).
        val_name: metric namespace ``val/<val_name>/...``; default the datamodule's ``val_name``/``name`` attribute,
            else the folder holding the val json's ``annotations`` folder (``coco``, ``synthetic``...).
        criterion: loss keyword arguments for ``RTMDetInsCriterion`` (weights, eps).
        max_nonfinite_steps: NaN/inf losses to skip (no optimizer or EMA step; counted as ``train/nonfinite_steps``)
            before the run stops with an error; 0 stops at the first.
        optimizer: the ``optimizer`` config group, a partial called with the parameter groups (``None``: AdamW with
            ``lr``, ``betas``, ``weight_decay``); the numbers stay this module's keys.
        scheduler: the ``scheduler`` config group, a partial called with the optimizer, the steps per epoch and
            ``max_epochs`` (``None``: warm-up + cosine from this module's keys); stepped after every optimizer step.
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int | None = None,
        lr: float = 0.004,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_iters: int = 1000,
        warmup_factor: float = 1e-5,
        cosine_begin_epoch: int = 150,
        eta_min_ratio: float = 0.05,
        ema: bool = True,
        ema_momentum: float = 0.0002,
        ema_gamma: float = 2000.0,
        init_weights: str | None = None,
        init_keep_classes: bool = False,
        score_thr: float = 0.05,
        nms_pre: int = 1000,
        nms_iou: float = 0.6,
        max_per_img: int = 100,
        mask_thr: float = 0.5,
        val_name: str | None = None,
        criterion: dict[str, Any] | None = None,
        max_nonfinite_steps: int = 0,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
    ) -> None:
        betas = tuple(float(b) for b in to_plain(betas))  # plain values in the checkpoint's hyper_parameters
        criterion = dict(to_plain(criterion)) if criterion else None
        super().__init__()
        self.save_hyperparameters(logger=False, ignore=["net", "optimizer", "scheduler"])
        self.optimizer_factory = optimizer or functools.partial(
            torch.optim.AdamW, lr=lr, betas=betas, weight_decay=weight_decay
        )
        self.scheduler_factory = scheduler or functools.partial(
            build_warmup_cosine,
            warmup_iters=warmup_iters,
            warmup_factor=warmup_factor,
            cosine_begin_epoch=cosine_begin_epoch,
            eta_min_ratio=eta_min_ratio,
        )
        if num_classes is not None and int(num_classes) != int(net.num_classes):
            raise ValueError(f"model.num_classes={num_classes} but the network has {net.num_classes} classes")
        self.model = net
        if init_weights:
            load_init_weights(self.model, init_weights, keep_classes=init_keep_classes)
        # built after init_weights so that validating before any step (eval of official weights) uses them
        self.ema_model = ExpMomentumEMA(self.model, ema_momentum, ema_gamma) if ema else None
        self.criterion = RTMDetInsCriterion(
            int(net.num_classes), strides=net.strides, mask_stride=net.strides[0], **(criterion or {})
        )
        self.register_buffer("mean", torch.tensor(MEAN_BGR).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(STD_BGR).view(1, 3, 1, 1), persistent=False)
        # the Hydra config of `net` (set by the entry point), stored in checkpoints
        self.net_config: dict[str, Any] | None = None
        self._evaluator = None
        self._val_name: str | None = val_name
        self.nonfinite = NonFiniteGuard(max_nonfinite_steps)

    # ------------------------------------------------------------------ basics
    @property
    def num_classes(self) -> int:
        return int(self.model.num_classes)

    @property
    def eval_model(self) -> nn.Module:
        """The network used for validation and deployment: the EMA copy when there is one."""
        return self.ema_model.module if self.ema_model is not None else self.model

    def normalize(self, img: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` RGB 0..255 -> BGR normalised with the BGR mean/std (the network's input)."""
        return (img.flip(1) - self.mean.to(img.dtype)) / self.std.to(img.dtype)

    def forward(self, img: torch.Tensor) -> dict[str, Any]:
        """Raw head outputs of the training network for an RGB 0..255 batch."""
        return self.model(self.normalize(img))

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        try:
            n = getattr(dm, "num_classes", None) if dm is not None else None
        except RuntimeError:  # classes='all' before the datamodule's setup
            n = None
        if n is not None and int(n) != self.num_classes:
            raise ValueError(f"the datamodule has {n} classes but the detector has {self.num_classes}")

    # ------------------------------------------------------------------ train
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        self.nonfinite.before_forward(self)
        out = self.model(self.normalize(batch["img"]))
        losses = self.criterion(out, batch["targets"])
        loss = losses["loss_cls"] + losses["loss_bbox"] + losses["loss_mask"]
        bsz = batch["img"].shape[0]
        if not self.nonfinite.check(self, loss):
            for k, v in losses.items():
                self.log(f"train/{k}", v.detach(), on_step=True, on_epoch=True, batch_size=bsz)
            self.log("train/loss", loss.detach(), on_step=True, on_epoch=True, prog_bar=True, batch_size=bsz)
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
        """The optimizer step (skipped on a tolerated non-finite loss), then one EMA update (before any callback's
        ``on_train_batch_end``, so a checkpoint written there holds the EMA of this very step)."""
        if guarded_optimizer_step(self, optimizer, optimizer_closure) and self.ema_model is not None:
            self.ema_model.update(self.model)

    # ------------------------------------------------------------------ validation
    def _resolve_val_name(self) -> str:
        if self._val_name:
            return self._val_name
        dm = getattr(self.trainer, "datamodule", None)
        for attr in ("val_name", "name"):
            value = getattr(dm, attr, None)
            if isinstance(value, str) and value:
                return value
        ann = getattr(dm, "val_ann", None)
        if ann:
            parent = Path(ann).resolve().parent
            return (parent.parent.name if parent.name == "annotations" else parent.name) or "val"
        return "val"

    def _build_evaluator(self):

        dm = getattr(self.trainer, "datamodule", None)
        ann = getattr(dm, "val_ann", None)
        if not ann:
            return None
        verbose = self.trainer.is_global_zero
        return CocoDetectionEvaluator(ann, ("bbox", "segm"), category_ids=dm.cat_ids, verbose=verbose)

    def on_validation_epoch_start(self) -> None:
        if self._evaluator is None:
            self._evaluator = self._build_evaluator()
        if self._evaluator is not None:
            self._evaluator.reset()

    @torch.no_grad()
    def predict_batch(self, batch: dict[str, Any], model: nn.Module | None = None) -> list[dict[str, torch.Tensor]]:
        """Detections in original image pixels for a datamodule batch (EMA network unless ``model`` is given)."""

        net = model if model is not None else self.eval_model
        x = self.normalize(batch["img"])
        was_training = net.training
        net.eval()  # BN on running statistics, whatever mode the caller is in
        meta = batch["meta"]
        try:
            return net.predict(
                x,
                [tuple(m["ori_shape"]) for m in meta],
                [tuple(m["scale_factor"]) for m in meta],
                score_thr=self.hparams.score_thr,
                nms_pre=self.hparams.nms_pre,
                nms_iou=self.hparams.nms_iou,
                max_per_img=self.hparams.max_per_img,
                mask_thr=self.hparams.mask_thr,
            )
        finally:
            net.train(was_training)

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        dets = self.predict_batch(batch)
        if self._evaluator is None:
            return
        self._evaluator.process(
            {
                "image_id": int(m["image_id"]),
                "bboxes": d["bboxes"].cpu(),
                "scores": d["scores"].cpu(),
                "labels": d["labels"].cpu(),
                "masks": d["masks"].cpu().numpy(),
            }
            for d, m in zip(dets, batch["meta"])
        )

    def on_validation_epoch_end(self) -> None:
        if self._evaluator is None:
            return
        self._evaluator.gather()  # collective under DDP; evaluate() de-duplicates the padded repeats by image_id
        name = self._resolve_val_name()
        metrics: dict[str, float] = {}
        if self.trainer.is_global_zero:
            out_dir = Path(self.trainer.default_root_dir or ".")
            result = self._evaluator.evaluate(outfile_prefix=str(out_dir / f"results_{name}"))
            metrics = {f"val/{name}/{k}": float(v) for k, v in result.items()}
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            box = [metrics]
            dist.broadcast_object_list(box, src=0)
            metrics = box[0]
        for k, v in metrics.items():
            self.log(k, v, sync_dist=False, rank_zero_only=False)
        self._evaluator.reset()

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_finite_state(checkpoint, trainer=self._trainer)  # NaN/inf weights are never saved
        keep_epoch_unfinished(self._trainer, checkpoint)
        checkpoint["net_config"] = self.net_config
        checkpoint["num_classes"] = self.num_classes
        checkpoint["nonfinite_steps"] = self.nonfinite.count

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.net_config = checkpoint.get("net_config", self.net_config)
        self.nonfinite.load_state_dict({"count": checkpoint.get("nonfinite_steps", 0)})

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = make_optimizer(self.optimizer_factory, rtmdet_param_groups(self.model, self.hparams.weight_decay))
        max_epochs = self.trainer.max_epochs
        if not max_epochs or max_epochs < 0:
            raise ValueError("InstSegLitModule needs trainer.max_epochs (the cosine schedule ends there)")
        steps = train_steps_per_epoch(self.trainer)
        scheduler = self.scheduler_factory(optimizer, steps_per_epoch=steps, max_epochs=max_epochs)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
