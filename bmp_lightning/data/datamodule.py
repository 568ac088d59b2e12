"""PoseDataModule: multi-source top-down pose training and per-dataset validation, wired by Hydra (conf/data/)."""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from bmp_lightning.data.datasets import TopDownPoseDataset, concat_records
from bmp_lightning.data.pipeline import build_pose_pipeline
from bmp_lightning.data.readers import ReadReport, read_detections, read_source
from bmp_lightning.data.samplers import MultiSourceBatchSampler, ResumableDataLoader, fit_loop_epoch
from bmp_lightning.data.synthetic import generate_if_missing
from bmp_lightning.structures.records import PersonRecord, skip_summary
from bmp_lightning.utils.common import dist_world, to_plain

log = logging.getLogger(__name__)


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed the global numpy / random state of each worker differently.

    Our own augmentations use per-sample generators; this covers libraries that draw from global state.
    ``torch.initial_seed()`` already differs per worker and per DataLoader iterator.
    """
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)  # noqa: NPY002 - the global state is exactly what third-party code draws from
    random.seed(seed)


def cpus_available() -> int:
    """CPU cores this process may run on (the affinity mask under SLURM/taskset, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_num_workers(devices_per_node: int, cpus: int | None = None, max_workers: int = 16) -> int:
    """Workers per device when ``num_workers`` is not set: the node's CPUs shared by its devices, one core per
    device left to the training process itself, at most ``max_workers``."""
    cpus = cpus_available() if cpus is None else cpus
    return max(0, min(max_workers, cpus // max(1, devices_per_node) - 1))


def measure_samples_per_s(dataset: Any, n: int = 16, seed: int = 0) -> float:
    """Samples/s of ``dataset[i]`` in this process with one thread (what one DataLoader worker delivers)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(dataset), n + 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        dataset[int(idx[0])]  # warm-up: first image read, lazy imports
        t = time.perf_counter()
        for i in idx[1:]:
            dataset[int(i)]
        return n / max(time.perf_counter() - t, 1e-9)
    finally:
        torch.set_num_threads(threads)


@dataclass
class ValSet:
    """One validation set: where its ground truth lives (for COCO evaluation) and the records it crops."""

    name: str
    source: str
    ann_file: str
    img_dir: str
    bbox_file: str | None = None
    bbox_score_thr: float | None = None
    use_mask: bool = False
    reader: str = "coco"
    records: list[PersonRecord] = field(default_factory=list)
    dataset: TopDownPoseDataset | None = None


class PoseDataModule(L.LightningDataModule):
    """Top-down pose data: fixed-share multi-source training batches and one validation loader per dataset.

    Args:
        train_sources: one dict per source, in batch order (the first takes the batch remainder):
            ``name``, ``source`` (keypoint mapping, default ``name``), ``ann_file``, ``img_dir``,
            ``reader`` (``coco`` for any COCO-format json, ``mpii`` for MMPose's MPII list), ``ratio`` (default 1),
            optional ``keypoint_format``.
        val_sets: one dict per validation set: ``name`` (metric prefix ``val/<name>/...``), ``source``, ``ann_file``
            (the GT json, also used for evaluation), ``img_dir``, optional ``bbox_file`` (a detections json;
            default: GT boxes), ``bbox_score_thr``, ``use_mask`` and ``mask_optional`` (defaults: the module's),
            ``reader``.
        root: base for relative ``ann_file`` / ``img_dir`` / ``bbox_file`` paths.
        batch_size: training batch per device (64 upstream); val_batch_size likewise (128 upstream).
        num_workers: DataLoader workers per device; None: :func:`default_num_workers` (the node's CPUs per device
            minus one). ``persistent_workers`` (kept across epochs), ``prefetch_factor`` (batches queued per worker)
            and ``pin_memory`` (on CUDA) are on by default: what a GPU run wants.
        gpu_samples_per_s: the model's training appetite in samples/s per device (documented per model in the
            README's performance section). When set and the run trains on GPUs, one worker's samples/s is measured
            at start and a warning says when ``num_workers`` of them cannot keep up. ``feed_check`` forces the
            check on (True) or off (False); None: GPU runs only.
        use_mask: MaskPose input (instance masks dim the background); ``mask_optional``: people without a mask
            pass unmasked instead of raising (upstream raises). The pipeline knobs
            ``mask_alpha``, ``mask_perturb``, ``photometric``, ``input_size`` (w, h), ``heatmap_size`` (w, h), ``sigma``
            go to ``bmp_lightning.data.pipeline.build_pose_pipeline``.
        normalize: normalise crops in the workers (float32); default False: workers hand uint8 crops (4x fewer
            bytes through worker queues and pinned memory) and ``PoseLitModule.normalize`` runs on the device.
        skip_bad_samples: skip (count, log) broken annotations and images instead of failing.
        seed: seed of the batch sampler's streams and the augmentation RNG.
        synthetic: ``{out_dir, n_images, seed, ...}``: generate the synthetic dataset there when its files are missing
            (``bmp_lightning.data.synthetic.generate``).

    Under DDP the training batch sampler shards itself (``Trainer(use_distributed_sampler=False)`` is required);
    validation loaders get a ``DistributedSampler`` without shuffling (padding duplicates share instance ids).
    """

    def __init__(
        self,
        train_sources: Sequence[Mapping[str, Any]] | None = None,
        val_sets: Sequence[Mapping[str, Any]] | None = None,
        root: str | None = None,
        batch_size: int = 64,
        val_batch_size: int = 128,
        num_workers: int | None = None,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        prefetch_factor: int = 4,
        gpu_samples_per_s: float | None = None,
        feed_check: bool | None = None,
        use_mask: bool = False,
        mask_optional: bool = False,
        mask_alpha: float = 0.2,
        mask_perturb: bool = True,
        photometric: bool = True,
        input_size: Sequence[int] = (192, 256),
        heatmap_size: Sequence[int] = (48, 64),
        sigma: float = 2.0,
        normalize: bool = False,
        shuffle: bool = True,
        skip_bad_samples: bool = False,
        seed: int = 0,
        synthetic: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.root = os.fspath(root) if root else None
        self.train_sources = [self._source_cfg(s, i) for i, s in enumerate(to_plain(train_sources) or [])]
        self.val_cfgs = [dict(v) for v in (to_plain(val_sets) or [])]
        self.batch_size = int(batch_size)
        self.val_batch_size = int(val_batch_size)
        self._num_workers = None if num_workers is None else int(num_workers)
        self.pin_memory = bool(pin_memory)
        self._persistent_workers = bool(persistent_workers)
        self.prefetch_factor = int(prefetch_factor)
        self.gpu_samples_per_s = None if gpu_samples_per_s is None else float(gpu_samples_per_s)
        self.feed_check = feed_check
        self.feed_rate: float | None = None  # measured samples/s of one worker (set by the feed check)
        self.use_mask = bool(use_mask)
        self.pipeline_kwargs = {
            "mask_continue_on_failure": bool(mask_optional),
            "mask_alpha": float(mask_alpha),
            "mask_perturb": bool(mask_perturb),
            "photometric": bool(photometric),
            "input_size": tuple(int(v) for v in to_plain(input_size)),
            "heatmap_size": tuple(int(v) for v in to_plain(heatmap_size)),
            "sigma": float(sigma),
        }
        self.normalize = normalize
        self.shuffle = shuffle
        self.skip_bad_samples = bool(skip_bad_samples)
        self.seed = int(seed)
        self.synthetic = dict(to_plain(synthetic)) if synthetic else None

        self.train_dataset: TopDownPoseDataset | None = None
        self.train_source_sizes: list[int] = []
        self.val_sets_info: list[ValSet] = []
        self.read_reports: list[ReadReport] = []  # what the readers kept / filtered / skipped, per file

    # ------------------------------------------------------------------ loader settings
    def _devices_per_node(self) -> int:
        trainer = getattr(self, "trainer", None)
        n = getattr(trainer, "num_devices", None) if trainer is not None else None
        if n:
            return int(n)
        return max(1, torch.cuda.device_count())

    def _on_gpu(self) -> bool:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return False
        return type(getattr(trainer, "accelerator", None)).__name__ == "CUDAAccelerator"

    @property
    def num_workers(self) -> int:
        """Workers per device: the configured number, else :func:`default_num_workers`."""
        if self._num_workers is not None:
            return self._num_workers
        return default_num_workers(self._devices_per_node())

    @num_workers.setter
    def num_workers(self, value: int | None) -> None:
        self._num_workers = None if value is None else int(value)

    @property
    def persistent_workers(self) -> bool:
        return self._persistent_workers and self.num_workers > 0

    def _loader_kwargs(self) -> dict[str, Any]:
        workers = self.num_workers
        kwargs: dict[str, Any] = {
            "num_workers": workers,
            "pin_memory": self.pin_memory and torch.cuda.is_available(),
            "persistent_workers": self.persistent_workers,
            "worker_init_fn": seed_worker,
        }
        if workers > 0:
            kwargs["prefetch_factor"] = self.prefetch_factor
        return kwargs

    def check_feed_rate(self) -> float | None:
        """Measure one worker's samples/s on the training set and warn when ``num_workers`` of them cannot feed a
        device that trains at ``gpu_samples_per_s``. Returns the total samples/s per device (None: not checked)."""
        check = self._on_gpu() if self.feed_check is None else self.feed_check
        if not check or self.gpu_samples_per_s is None or self.train_dataset is None or len(self.train_dataset) == 0:
            return None
        self.feed_rate = measure_samples_per_s(self.train_dataset, seed=self.seed)
        workers = self.num_workers
        total = self.feed_rate * max(workers, 1)
        if total < self.gpu_samples_per_s:
            need = int(np.ceil(self.gpu_samples_per_s / self.feed_rate))
            log.warning(
                "data loading cannot feed the GPUs: %d workers x %.0f samples/s = %.0f samples/s per device, the model "
                "trains at ~%.0f (data.gpu_samples_per_s). Give it >= %d workers per device (data.num_workers; %d CPUs "
                "here for %d devices) or expect the GPUs to wait.",
                workers,
                self.feed_rate,
                total,
                self.gpu_samples_per_s,
                need,
                cpus_available(),
                self._devices_per_node(),
            )
        else:
            log.info(
                "data loading: %d workers x %.0f samples/s per device (model: ~%.0f)",
                workers,
                self.feed_rate,
                self.gpu_samples_per_s,
            )
        return total

    # ------------------------------------------------------------------ config helpers
    def _path(self, p: str | None) -> str | None:
        if p is None:
            return None
        p = os.path.expanduser(os.fspath(p))
        return p if os.path.isabs(p) or not self.root else os.path.join(self.root, p)

    def _source_cfg(self, cfg: Mapping[str, Any], i: int) -> dict[str, Any]:
        cfg = dict(cfg)
        missing = [k for k in ("ann_file", "img_dir") if not cfg.get(k)]
        if missing:
            raise ValueError(f"train source #{i} ({cfg.get('name')}) lacks {missing}")
        cfg.setdefault("name", cfg.get("source", f"source{i}"))
        cfg.setdefault("source", cfg["name"])
        cfg.setdefault("reader", "coco")
        cfg.setdefault("ratio", 1.0)
        return cfg

    @property
    def train_records(self) -> Sequence[PersonRecord]:
        """The concatenated training records (source ``i`` occupies the ``i``-th block of ``train_source_sizes``)."""
        return self.train_dataset.records if self.train_dataset is not None else []

    @property
    def train_source_names(self) -> list[str]:
        return [s["name"] for s in self.train_sources]

    @property
    def val_set_names(self) -> list[str]:
        """Validation set names in dataloader order (``dataloader_idx`` i -> ``val_set_names[i]``)."""
        if self.val_sets_info:
            return [v.name for v in self.val_sets_info]
        return [v.get("name", v.get("source", f"val{i}")) for i, v in enumerate(self.val_cfgs)]

    @property
    def val_ann_files(self) -> list[str]:
        """The ground-truth json of each validation set (what COCO evaluation scores against)."""
        return [self._path(v["ann_file"]) for v in self.val_cfgs]

    def pipeline(self, train: bool, use_mask: bool | None = None, mask_optional: bool | None = None) -> Any:
        """``build_pose_pipeline`` with this module's knobs (``use_mask``/``mask_optional`` overridable per set)."""

        kwargs = dict(self.pipeline_kwargs)
        if mask_optional is not None:
            kwargs["mask_continue_on_failure"] = bool(mask_optional)
        use_mask = self.use_mask if use_mask is None else use_mask
        kwargs.setdefault("warp_mask", False)  # batches carry no mask: do not warp it to the crop
        return build_pose_pipeline(train=train, use_mask=use_mask, **kwargs)

    # ------------------------------------------------------------------ synthetic data
    def _needed_files(self) -> list[str]:
        files = [self._path(s["ann_file"]) for s in self.train_sources]
        files += [self._path(v["ann_file"]) for v in self.val_cfgs]
        return files

    def _maybe_generate(self) -> None:
        if not self.synthetic:
            return

        out_dir = self._path(self.synthetic.get("out_dir")) or self.root
        generate_if_missing(self.synthetic, self._needed_files(), out_dir, log)

    def prepare_data(self) -> None:
        """Rank 0 only: write the synthetic dataset if it is configured and missing."""
        self._maybe_generate()

    # ------------------------------------------------------------------ datasets
    def _read_train(self) -> None:
        per_source = []
        for s in self.train_sources:
            extra = {k: s[k] for k in ("keypoint_format", "num_keypoints") if s.get(k) is not None}
            recs = read_source(
                s["reader"],
                self._path(s["ann_file"]),
                self._path(s["img_dir"]),
                source=s["source"],
                skip_bad_samples=self.skip_bad_samples,
                report=self._new_report(),
                **extra,
            )
            if not recs and float(s["ratio"]) > 0:
                raise ValueError(f"train source {s['name']!r} has no usable instances ({self._path(s['ann_file'])})")
            per_source.append(recs)
        records, self.train_source_sizes = concat_records(per_source)
        del per_source  # the dataset keeps them serialised: no per-object Python state for forked workers to copy
        log.info("train sources %s", dict(zip(self.train_source_names, self.train_source_sizes)))
        self.train_dataset = TopDownPoseDataset(
            records,
            self.pipeline(train=True),
            skip_bad_samples=self.skip_bad_samples,
            normalize=self.normalize,
            seed=self.seed,
            use_mask=self.use_mask,
        )

    def _read_val(self) -> None:
        self.val_sets_info = []
        for i, v in enumerate(self.val_cfgs):
            name = v.get("name", v.get("source", f"val{i}"))
            vs = ValSet(
                name=name,
                source=v.get("source", name),
                ann_file=self._path(v["ann_file"]),
                img_dir=self._path(v["img_dir"]),
                bbox_file=self._path(v.get("bbox_file")),
                bbox_score_thr=v.get("bbox_score_thr"),
                use_mask=bool(v.get("use_mask", self.use_mask)),
                reader=v.get("reader", "coco"),
            )
            if vs.bbox_file:
                vs.records = read_detections(
                    vs.bbox_file,
                    vs.ann_file,
                    vs.img_dir,
                    score_thr=vs.bbox_score_thr,
                    source=vs.source,
                    skip_bad_samples=self.skip_bad_samples,
                    report=self._new_report(),
                )
            else:
                extra = {k: v[k] for k in ("keypoint_format", "num_keypoints") if v.get(k) is not None}
                vs.records = read_source(
                    vs.reader, vs.ann_file, vs.img_dir, vs.source, skip_bad_samples=self.skip_bad_samples,
                    report=self._new_report(), **extra,
                )  # fmt: skip
            vs.dataset = TopDownPoseDataset(
                vs.records,
                self.pipeline(train=False, use_mask=vs.use_mask, mask_optional=v.get("mask_optional")),
                skip_bad_samples=self.skip_bad_samples,
                normalize=self.normalize,
                seed=self.seed,
                use_mask=vs.use_mask,
            )
            self.val_sets_info.append(vs)
            log.info("val set %s: %d instances (%s)", name, len(vs.records), "detections" if vs.bbox_file else "GT")

    def setup(self, stage: str | None = None) -> None:
        self._maybe_generate()  # no-op when the files exist (prepare_data ran) or nothing is synthetic
        if stage in (None, "fit") and self.train_sources and self.train_dataset is None:
            self._read_train()
        if stage in (None, "fit", "validate", "test", "predict") and self.val_cfgs and not self.val_sets_info:
            self._read_val()

    # ------------------------------------------------------------------ loaders
    def _check_lightning_sampler(self) -> None:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return
        conn = getattr(trainer, "_accelerator_connector", None)
        if conn is not None and conn.use_distributed_sampler and conn.is_distributed:
            raise RuntimeError(
                "PoseDataModule shards training batches itself (MultiSourceBatchSampler): "
                "set trainer.use_distributed_sampler=false for distributed training"
            )

    def train_batch_sampler(self) -> MultiSourceBatchSampler:
        ratios = [float(s["ratio"]) for s in self.train_sources]
        return MultiSourceBatchSampler(
            self.train_source_sizes,
            batch_size=self.batch_size,
            source_ratio=ratios,
            shuffle=self.shuffle,
            seed=self.seed,
        )

    def train_dataloader(self) -> ResumableDataLoader:
        if not self.train_sources:
            raise RuntimeError("no train_sources configured in this data config (an evaluation-only config?)")
        if self.train_dataset is None:
            self._maybe_generate()
            self._read_train()
        self._check_lightning_sampler()
        sampler = self.train_batch_sampler()
        sampler.add_epoch_callback(self.train_dataset.set_epoch)
        # Lightning creates the first iterator (and workers draw indices) before it calls set_epoch, so a fresh
        # sampler must already hold the loop's epoch: a run resumed at epoch e > 0 would otherwise draw epoch 0's
        # order. A mid-epoch resume then restores the exact position (ResumableDataLoader.load_state_dict).
        epoch = fit_loop_epoch(getattr(self, "trainer", None))
        if epoch:
            sampler.set_epoch(epoch)
        if self.feed_rate is None:
            self.check_feed_rate()
        return ResumableDataLoader(self.train_dataset, batch_sampler=sampler, **self._loader_kwargs())

    def val_dataloader(self) -> list[DataLoader]:
        if not self.val_sets_info:
            self.setup("validate")
        world, rank = dist_world()
        loaders = []
        for vs in self.val_sets_info:
            sampler = DistributedSampler(vs.dataset, world, rank, shuffle=False) if world > 1 else None
            loaders.append(
                DataLoader(
                    vs.dataset,
                    batch_size=self.val_batch_size,
                    shuffle=False,
                    sampler=sampler,
                    **self._loader_kwargs(),
                )
            )
        return loaders

    def test_dataloader(self) -> list[DataLoader]:
        return self.val_dataloader()

    # ------------------------------------------------------------------ bad input
    def _new_report(self) -> ReadReport:
        self.read_reports.append(ReadReport())
        return self.read_reports[-1]

    def skip_report(self, limit: int = 100) -> dict[str, Any]:
        """Annotation entries and samples skipped so far (``skip_bad_samples=true``) on this rank, workers included
        (:func:`bmp_lightning.structures.records.skip_summary`; datasets ``train`` and ``val/<name>``). Across ranks:
        ``all_reduce(dataset.skips.flags, MAX)`` before counting (a rank sees the samples its sampler drew)."""
        datasets = {"train": self.train_dataset, **{f"val/{vs.name}": vs.dataset for vs in self.val_sets_info}}
        return skip_summary(datasets, self.read_reports, limit)
