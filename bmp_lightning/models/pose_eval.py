"""Validation-epoch scoring for PoseLitModule: gather across ranks, de-duplicate, score each val set on rank 0."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch.distributed as dist

from bmp_lightning.metrics.coco import CocoKeypointEvaluator
from bmp_lightning.metrics.gather import deduplicate, gather_predictions
from bmp_lightning.metrics.pck import pck

log = logging.getLogger(__name__)

# evaluated with COCO keypoint AP against their ground-truth json
COCO_STYLE = ("coco", "ochuman", "crowdpose", "synthetic")


def _val_specs(module: Any) -> list[dict[str, Any]]:
    """One spec per val dataloader: name, ann_file and the metric (COCO AP for COCO-format sets, else PCK)."""
    dm = getattr(module.trainer, "datamodule", None)
    infos = getattr(dm, "val_sets_info", None) if dm is not None else None
    if not infos:
        return [{"name": "val", "metric": "pck"}]
    specs = []
    for info in infos:
        dataset = getattr(info, "source", "coco")
        metric = "coco" if dataset in COCO_STYLE and getattr(info, "ann_file", None) else "pck"
        specs.append({"name": info.name, "ann_file": info.ann_file, "dataset": dataset, "metric": metric})
    return specs


def _pck_metrics(preds: list[dict[str, Any]], thr: float = 0.2) -> dict[str, float]:
    """PCK@thr normalised by the GT-box size (the bbox_scale / 1.25 box), over labelled joints."""

    preds = [p for p in preds if "keypoints_gt" in p]
    if not preds:
        return {}
    pred = np.stack([p["keypoints"] for p in preds])
    gt = np.stack([p["keypoints_gt"] for p in preds])
    norm = np.stack([np.max(p["bbox_scale"]) / 1.25 for p in preds])
    result = pck(pred, gt[..., :2], gt[..., 2] > 0, norm, thr)
    return {"PCK": float(result.mean)}


def evaluate_val_sets(module: Any, preds_by_loader: dict[int, list[dict[str, Any]]]) -> dict[str, float]:
    specs = _val_specs(module)
    metrics: dict[str, float] = {}
    for idx, spec in enumerate(specs):
        preds = deduplicate(gather_predictions(preds_by_loader.get(idx, [])), key="instance_id")
        if not module.trainer.is_global_zero:
            continue
        name = spec.get("name", f"val{idx}")
        kind = spec.get("metric", "coco")
        if kind == "coco" and spec.get("ann_file"):
            evaluator = CocoKeypointEvaluator(spec["ann_file"], dataset=spec.get("dataset", "coco"))
            evaluator.process(preds)
            out_dir = Path(module.trainer.default_root_dir or ".")
            result = evaluator.evaluate(outfile_prefix=str(out_dir / f"results_{name}"))
        else:
            result = _pck_metrics(preds)
        for k, v in result.items():
            metrics[f"val/{name}/{k}"] = float(v)
    if dist.is_available() and dist.is_initialized():
        box = [metrics]
        dist.broadcast_object_list(box, src=0)
        metrics = box[0]
    return metrics
