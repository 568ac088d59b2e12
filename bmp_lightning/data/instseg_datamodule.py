"""Instance segmentation DataModule (RTMDet-Ins) and the stage-2 pipeline switch.

The dataset, its collate function and the validation sampler live in :mod:`bmp_lightning.data.instseg_dataset`
(batch format and annotation filters are described there) and are re-exported here, so configs and imports that name
``bmp_lightning.data.instseg_datamodule.<X>`` keep working.

Training resumes mid-epoch exactly: the train loader is a :class:`~bmp_lightning.data.samplers.ResumableDataLoader`
over a :class:`~bmp_lightning.data.samplers.ShardedBatchSampler` (``DistributedSampler`` order), whose position
Lightning checkpoints and restores; the sampler's epoch reaches the dataset's augmentation RNG and the stage-2 switch
before any sample of the epoch is loaded, so a resumed run sees the same images with the same augmentation as an
uninterrupted one. A checkpoint from another setup (image count, batch size, world size, seed) warns and restarts its
epoch.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from bmp_lightning.data.instseg_dataset import (
    META_KEYS,
    EpochDistributedSampler,
    InstSegDataset,
    collate_instseg,
    to_tensors,
)
from bmp_lightning.data.instseg_transforms import Compose, build_test_pipeline, build_train_pipeline
from bmp_lightning.data.samplers import ResumableDataLoader, ShardedBatchSampler, fit_loop_epoch
from bmp_lightning.data.synthetic import generate_if_missing
from bmp_lightning.structures.records import skip_summary
from bmp_lightning.utils.common import to_plain

__all__ = [
    "META_KEYS",
    "EpochDistributedSampler",
    "InstSegDataModule",
    "InstSegDataset",
    "InstSegPipelineSwitch",
    "collate_instseg",
    "to_tensors",
]

log = logging.getLogger(__name__)


class InstSegDataModule(L.LightningDataModule):
    """COCO-format instance segmentation for RTMDet-Ins (person fine-tune or 80 classes).

    Args:
        train_ann, train_img_dir, val_ann, val_img_dir: json files and image folders (relative to ``root``).
        root: base of relative paths.
        classes: ``"person"``, ``"all"`` or a list of category names (see :class:`InstSegDataset`).
        batch_size: training images per device; ``val_batch_size`` likewise (default: ``batch_size``).
        input_size: square network input (640); images are padded to it.
        train_scale: RandomResize base scale of stage 1 (1280); ``stage2_scale`` of stage 2 (default ``input_size``).
        ratio_range: RandomResize multiplier range ((0.1, 2.0) for RTMDet-L in both stages).
        remove_prob, remove_fill, remove_dilate: :class:`RemoveRandomInstances` (stage 1 only; ``remove_prob=0``
            disables it). ``person_label``: the label it may remove (``None``: any instance).
        hsv, flip_prob, pad_val, min_gt_bbox_wh: the remaining pipeline knobs.
        filter_empty_gt, min_size: training image filter (upstream ``filter_cfg``).
        stage: initial pipeline stage (1, or 2 for the no-mask-out LSJ-640 tail); see :meth:`set_stage`.
        seed: augmentation and shuffling seed.
        max_train_images, max_val_images: truncate the datasets (quick runs).
        synthetic: ``{out_dir, n_images, seed, ...}``: generate the synthetic dataset there (default ``root``) when the
            json files are missing (``bmp_lightning.data.synthetic.generate``).

    Under DDP both loaders shard themselves in ``DistributedSampler`` order (``Trainer(use_distributed_sampler=False)``
    is required, as in the project's trainer configs); validation pads with repeated images, so evaluation must
    de-duplicate image ids. The training loader is resumable mid-epoch (see the module docstring).
    """

    def __init__(
        self,
        train_ann: str | None = None,
        train_img_dir: str | None = None,
        val_ann: str | None = None,
        val_img_dir: str | None = None,
        root: str | None = None,
        classes: str | Sequence[str] = "person",
        batch_size: int = 16,
        val_batch_size: int | None = None,
        num_workers: int = 4,
        pin_memory: bool = True,
        persistent_workers: bool = False,
        input_size: int = 640,
        train_scale: int = 1280,
        stage2_scale: int | None = None,
        ratio_range: Sequence[float] = (0.1, 2.0),
        remove_prob: float = 0.5,
        remove_fill: str = "black",
        remove_dilate: int = 0,
        person_label: int | None = 0,
        hsv: Sequence[int] = (5, 30, 30),
        flip_prob: float = 0.5,
        pad_val: int = 114,
        min_gt_bbox_wh: Sequence[float] = (1.0, 1.0),
        filter_empty_gt: bool = True,
        min_size: int = 32,
        stage: int = 1,
        seed: int = 0,
        skip_bad_samples: bool = False,
        max_train_images: int | None = None,
        max_val_images: int | None = None,
        synthetic: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.root = os.fspath(root) if root else None
        self.train_ann, self.train_img_dir = self._path(train_ann), self._path(train_img_dir)
        self.val_ann, self.val_img_dir = self._path(val_ann), self._path(val_img_dir)
        classes = to_plain(classes)
        self.classes = classes if isinstance(classes, str) else list(classes)
        self.batch_size = int(batch_size)
        self.val_batch_size = int(val_batch_size or batch_size)
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory)
        self.persistent_workers = bool(persistent_workers) and self.num_workers > 0
        self.input_size = int(input_size)
        self.pad_val = int(pad_val)
        self.pipeline_kwargs = {
            "input_size": self.input_size,
            "scale": int(train_scale),
            "stage2_scale": int(stage2_scale) if stage2_scale else None,
            "ratio_range": tuple(float(v) for v in to_plain(ratio_range)),
            "remove_prob": float(remove_prob),
            "remove_fill": str(remove_fill),
            "remove_dilate": int(remove_dilate),
            "person_label": person_label,
            "hsv": tuple(int(v) for v in to_plain(hsv)),
            "flip_prob": float(flip_prob),
            "pad_val": self.pad_val,
            "min_gt_bbox_wh": tuple(float(v) for v in to_plain(min_gt_bbox_wh)),
        }
        self.filter_empty_gt = bool(filter_empty_gt)
        self.min_size = int(min_size)
        self._stage = int(stage)
        self.seed = int(seed)
        self.skip_bad_samples = bool(skip_bad_samples)
        self.max_train_images = max_train_images
        self.max_val_images = max_val_images
        self.synthetic = dict(to_plain(synthetic)) if synthetic else None
        self.train_dataset: InstSegDataset | None = None
        self.val_dataset: InstSegDataset | None = None
        # first epoch of stage 2, set by InstSegPipelineSwitch.setup: the training sampler's epoch switches the
        # pipeline before the epoch's first sample is loaded (also on a mid-epoch resume, where Lightning skips
        # on_train_epoch_start, and before DataLoader workers prefetch)
        self.stage2_epoch: int | None = None

    def _path(self, p: str | os.PathLike | None) -> str | None:
        if p is None:
            return None
        p = os.path.expanduser(os.fspath(p))
        return p if os.path.isabs(p) or not self.root else os.path.join(self.root, p)

    # ------------------------------------------------------------------ pipelines / stage
    def train_pipeline(self, stage: int | None = None) -> Compose:
        return build_train_pipeline(stage=stage or self._stage, **self.pipeline_kwargs)

    def test_pipeline(self) -> Compose:
        return build_test_pipeline(self.input_size, self.pad_val)

    @property
    def stage(self) -> int:
        return self._stage

    def set_stage(self, stage: int) -> None:
        """Switch the training pipeline: 2 drops RemoveRandomInstances and resizes around ``stage2_scale``.

        Takes effect from the next sample drawn, in DataLoader workers too (the stage lives in shared memory).
        """
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage}")
        if stage != self._stage:
            log.info("instance-segmentation training pipeline: stage %d -> %d", self._stage, stage)
        self._stage = stage
        if self.train_dataset is not None:
            self.train_dataset.set_stage(stage)

    def _on_train_epoch(self, epoch: int) -> None:
        """The training sampler's epoch listener: augmentation seed and, from ``stage2_epoch`` on, stage 2."""
        if self.stage2_epoch is not None and epoch >= self.stage2_epoch and self._stage != 2:
            self.set_stage(2)
        if self.train_dataset is not None:
            self.train_dataset.set_epoch(epoch)

    @property
    def num_classes(self) -> int:
        ds = self.train_dataset or self.val_dataset
        if ds is not None:
            return ds.num_classes
        if self.classes == "all":
            raise RuntimeError("num_classes of classes='all' is known after setup()")
        return 1 if isinstance(self.classes, str) else len(self.classes)

    @property
    def cat_ids(self) -> list[int]:
        """COCO category id of each contiguous label (for writing detections back to COCO format)."""
        ds = self.val_dataset or self.train_dataset
        if ds is None:
            raise RuntimeError("call setup() first")
        return ds.cat_ids

    # ------------------------------------------------------------------ synthetic data
    def _maybe_generate(self) -> None:
        if not self.synthetic:
            return

        out_dir = self._path(self.synthetic.get("out_dir")) or self.root
        generate_if_missing(self.synthetic, (self.train_ann, self.val_ann), out_dir, log)

    def prepare_data(self) -> None:
        """Rank 0 only: write the synthetic dataset if it is configured and missing."""
        self._maybe_generate()

    def setup(self, stage: str | None = None) -> None:
        self._maybe_generate()
        if stage in (None, "fit") and self.train_ann and self.train_dataset is None:
            self.train_dataset = InstSegDataset(
                self.train_ann,
                self.train_img_dir or "",
                classes=self.classes,
                filter_empty_gt=self.filter_empty_gt,
                min_size=self.min_size,
                seed=self.seed,
                max_images=self.max_train_images,
                skip_bad_samples=self.skip_bad_samples,
                pipelines={1: self.train_pipeline(1), 2: self.train_pipeline(2)},
            )
            self.train_dataset.set_stage(self._stage)
        if self.val_ann and self.val_dataset is None:
            self.val_dataset = InstSegDataset(
                self.val_ann,
                self.val_img_dir or "",
                self.test_pipeline(),
                classes=self.classes,
                test_mode=True,
                seed=self.seed,
                max_images=self.max_val_images,
            )

    # ------------------------------------------------------------------ loaders
    def _check_lightning_sampler(self) -> None:
        conn = getattr(getattr(self, "trainer", None), "_accelerator_connector", None)
        if conn is not None and conn.use_distributed_sampler and conn.is_distributed:
            raise RuntimeError(
                "InstSegDataModule shards training batches itself (ShardedBatchSampler): "
                "set trainer.use_distributed_sampler=false for distributed training"
            )

    def train_batch_sampler(self) -> ShardedBatchSampler:
        """``DistributedSampler`` order over the training images (shuffled, ``seed + epoch``), batched, resumable."""
        if self.train_dataset is None:
            raise RuntimeError("call setup('fit') first")
        return ShardedBatchSampler(len(self.train_dataset), self.batch_size, shuffle=True, seed=self.seed)

    def train_dataloader(self) -> ResumableDataLoader:
        if self.train_dataset is None:
            self.setup("fit")
        if self.train_dataset is None:
            raise RuntimeError("no train_ann configured")
        self._check_lightning_sampler()
        sampler = self.train_batch_sampler()
        sampler.add_epoch_callback(self._on_train_epoch)
        # Lightning creates the first iterator (workers start loading) before it calls set_epoch: a fresh sampler
        # must already hold the loop's epoch (order, augmentation seed, stage). A mid-epoch resume then restores the
        # position (ResumableDataLoader.load_state_dict, before that first iterator).
        sampler.set_epoch(fit_loop_epoch(getattr(self, "trainer", None)))
        return ResumableDataLoader(
            self.train_dataset,
            batch_sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            collate_fn=collate_instseg,
        )

    def val_dataloader(self) -> DataLoader:
        if self.val_dataset is None:
            self.setup("validate")
        if self.val_dataset is None:
            raise RuntimeError("no val_ann configured")
        return DataLoader(
            self.val_dataset,
            batch_size=self.val_batch_size,
            sampler=EpochDistributedSampler(self.val_dataset, shuffle=False, seed=self.seed),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            collate_fn=collate_instseg,
        )

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def skip_report(self, limit: int = 100) -> dict[str, Any]:
        """Images skipped so far (``skip_bad_samples=true``) on this rank, workers included (see
        :func:`bmp_lightning.structures.records.skip_summary`; datasets ``train`` and ``val``)."""
        return skip_summary({"train": self.train_dataset, "val": self.val_dataset}, limit=limit)


class InstSegPipelineSwitch(L.Callback):
    """Stage-2 switch of the RTMDet recipe (mmdet ``PipelineSwitchHook``).

    From ``switch_epoch`` on, the datamodule's training pipeline drops RemoveRandomInstances and uses the 640
    large-scale jitter. :meth:`setup` hands ``switch_epoch`` to an :class:`InstSegDataModule`, whose training
    sampler then switches when it enters that epoch, before any of its samples is loaded (also on a resume, mid-epoch
    included, where Lightning skips ``on_train_epoch_start``); the epoch-start check covers other datamodules.
    """

    def __init__(self, switch_epoch: int = 280) -> None:
        self.switch_epoch = int(switch_epoch)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        dm = getattr(trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "stage2_epoch"):
            dm.stage2_epoch = self.switch_epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "set_stage"):
            return
        if trainer.current_epoch >= self.switch_epoch and dm.stage != 2:
            dm.set_stage(2)
