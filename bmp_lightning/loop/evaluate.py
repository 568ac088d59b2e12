"""The BMP evaluation job: the loop over a COCO-format split, scored per iteration (docs/recipes.md#evaluation).

``python -m bmp_lightning.bmp split=<split> loop=bmp_d3 detector=<ckpt> pose=<ckpt> [sam=<name|dir>]`` runs
:func:`run_bmp_evaluation`. For every image the loop runs once; after iteration ``k`` the people found so far (the
loop's ``IterationSnapshot.persons``) are that iteration's predictions. Per iteration the job writes, atomically,
in ``<run dir>/results/``:

* ``iter{k}.keypoints.json``: COCO keypoint results (17 keypoints ``x, y, score``; 14 for CrowdPose), ``score`` =
  detector score x mean of the keypoint scores > 0.2 (``eval.score_mode``), ``bbox_score``;
* ``iter{k}.bbox.json``: COCO box results (``bbox`` = ``[x, y, w, h]``, ``score`` per ``eval.det_score``);
* ``iter{k}.segm.json``: the same with the refined mask as compressed RLE (``segmentation``);

scores them with :class:`~bmp_lightning.metrics.coco.CocoKeypointEvaluator` (pose AP, no OKS-NMS, as BMP) and
:class:`~bmp_lightning.metrics.detection.CocoDetectionEvaluator` (box and mask AP), and writes ``metrics.json`` with
``bmp/iter{k}/<split name>/{AP,AP50,...,bbox_AP,...,segm_AP,...}`` plus ``bmp/time/{detector,pose,sam,total}``
(seconds per image) and ``bmp/skipped_images``. An image that cannot be read (missing, truncated, corrupt) is
skipped, its people counted as not found, and listed with the reason under ``bmp/skipped`` in ``metrics.json`` and
in ``results/info.json`` (``strict=true``: the job stops at the first one instead). ``max_images`` restricts the
split to its first images; the ground truth of just those images is then written to ``results/gt.json`` and used for
scoring (``results/info.json`` names the ground truth used).
The first ``num_vis`` images get a picture per image in ``vis/`` (detector input and people per iteration).

Choices of ours (the upstream evaluation script is not public): the box of a person is the detector box clipped to
the image (``eval.box_from_mask=true``: the tight box of the refined mask); box / mask results are ranked by the
detector score (``eval.det_score=instance``: the pose instance score instead).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from bmp_lightning.data.synthetic import generate
from bmp_lightning.loop.bmp import Person
from bmp_lightning.loop.build import build_bmp
from bmp_lightning.loop.config import resolve_loop_config
from bmp_lightning.loop.render import iteration_figure, save_png
from bmp_lightning.metrics.coco import KEYPOINT_METRICS, CocoKeypointEvaluator, rescore
from bmp_lightning.metrics.detection import DETECTION_METRICS, CocoDetectionEvaluator, encode_masks
from bmp_lightning.structures.files import atomic_write_json
from bmp_lightning.structures.io import read_image
from bmp_lightning.structures.keypoints import NUM_COCO_KEYPOINTS
from bmp_lightning.structures.records import BadSampleError
from bmp_lightning.utils.common import resolve_device, set_torch_threads
from bmp_lightning.utils.distributed import device_for_rank, init_distributed
from bmp_lightning.utils.run import instantiate_dict

log = logging.getLogger("bmp_lightning.bmp")

TIMING_KEYS = ("detector", "pose", "sam", "total")


@dataclass
class EvalSplit:
    """A COCO-format evaluation split.

    Attributes:
        name: the dataset part of the metric names (``bmp/iter2/<name>/AP``).
        dataset: keypoint protocol of the evaluator: ``coco``, ``ochuman`` or ``crowdpose``.
        ann_file: ground-truth json.
        img_dir: folder the images' ``file_name`` are relative to.
        segm: score mask AP; ``None`` = when the ground truth has segmentations.
    """

    name: str
    dataset: str
    ann_file: Path
    img_dir: Path
    segm: bool | None = None


def split_from_config(cfg: Mapping[str, Any]) -> EvalSplit:
    """An :class:`EvalSplit` from a ``conf/split`` entry; generates the synthetic split when configured and
    missing. Raises ``FileNotFoundError`` naming the missing file."""
    cfg = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    missing = [k for k in ("name", "ann_file", "img_dir") if not cfg.get(k)]
    if missing:
        raise ValueError(f"bmp split config needs {missing} (see conf/split/)")
    ann_file, img_dir = Path(cfg["ann_file"]), Path(cfg["img_dir"])
    synthetic = cfg.get("synthetic")
    if synthetic and not ann_file.is_file():
        root = Path(cfg.get("root") or ann_file.parent.parent)
        log.info("generating the synthetic dataset in %s (missing %s)", root, ann_file.name)
        generate(root, **synthetic)
    if not ann_file.is_file():
        raise FileNotFoundError(
            f"ground truth of split '{cfg['name']}' not found: {ann_file} "
            "(datasets live under paths.data_dir, i.e. $BMP_DATA_DIR or ./data; see README 'Data')"
        )
    if not img_dir.is_dir():
        raise FileNotFoundError(f"image folder of split '{cfg['name']}' not found: {img_dir}")
    segm = cfg.get("segm", "auto")
    segm = None if segm in (None, "auto") else bool(segm)
    return EvalSplit(str(cfg["name"]), str(cfg.get("dataset", "coco")), ann_file, img_dir, segm)


# ---------------------------------------------------------------------------------------------- predictions
def person_box(p: Person, hw: tuple[int, int], from_mask: bool = False) -> np.ndarray:
    """``(4,)`` xyxy evaluation box: the detector box clipped to the image, or the refined mask's tight box."""
    h, w = hw
    if from_mask and p.mask.any():
        ys, xs = np.nonzero(p.mask)
        return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float64)
    return np.clip(np.asarray(p.bbox, np.float64), 0.0, [w, h, w, h])


def keypoint_predictions(
    persons: list[Person], image_id: int, hw: tuple[int, int], box_from_mask: bool = False
) -> list[dict]:
    """Predictions for :meth:`CocoKeypointEvaluator.process`: all keypoints (17 or 21) with scores, the detector
    score as ``bbox_score`` (rescored by the evaluator) and the box (OKS-NMS area when that is enabled)."""
    return [
        {
            "image_id": int(image_id),
            "instance_id": None,
            "keypoints": np.asarray(p.keypoints, np.float64),
            "keypoint_scores": np.asarray(p.keypoint_scores, np.float64),
            "bbox_score": float(p.bbox_score),
            "bbox": person_box(p, hw, box_from_mask),
        }
        for p in persons
    ]


def detection_prediction(
    persons: list[Person],
    image_id: int,
    hw: tuple[int, int],
    det_score: str = "bbox",
    box_from_mask: bool = False,
    keypoint_score_thr: float = 0.2,
) -> dict:
    """One image's entry for :meth:`CocoDetectionEvaluator.process`: boxes, scores, refined masks (RLE)."""
    if det_score not in ("bbox", "instance"):
        raise ValueError(f"eval.det_score must be 'bbox' or 'instance', got {det_score!r}")
    h, w = hw
    boxes = np.stack([person_box(p, hw, box_from_mask) for p in persons]) if persons else np.zeros((0, 4))
    if det_score == "bbox":
        scores = [p.bbox_score for p in persons]
    else:
        scores = [rescore(p.bbox_score, p.keypoint_scores[:NUM_COCO_KEYPOINTS], keypoint_score_thr) for p in persons]
    masks = np.stack([p.mask for p in persons]) if persons else np.zeros((0, h, w), bool)
    return {
        "image_id": int(image_id),
        "bboxes": boxes,
        "scores": np.asarray(scores, np.float64),
        "labels": np.zeros(len(persons), np.int64),
        "masks": encode_masks(masks),
    }


# ---------------------------------------------------------------------------------------------- ground truth
def load_ground_truth(split: EvalSplit, max_images: int | None) -> tuple[dict, list[dict]]:
    """The ground-truth json and the images to run on (the first ``max_images`` in file order)."""
    with open(split.ann_file) as f:
        try:
            gt = json.load(f)
        except json.JSONDecodeError as err:
            raise BadSampleError(f"{split.ann_file}: not valid json ({err})") from err
    if not isinstance(gt, dict) or not isinstance(gt.get("images"), list) or "annotations" not in gt:
        raise BadSampleError(f"{split.ann_file}: not a COCO-format ground truth (needs 'images' and 'annotations')")
    images = gt["images"]
    if max_images is not None:
        images = images[: int(max_images)]
    for i, im in enumerate(images):
        if "id" not in im or "file_name" not in im:
            raise BadSampleError(f"{split.ann_file}, images[{i}]: needs 'id' and 'file_name'")
    return gt, images


def subset_ground_truth(gt: dict, images: list[dict]) -> dict:
    """The ground truth restricted to ``images`` (pycocotools scores every image of its ground truth)."""
    ids = {im["id"] for im in images}
    return {**gt, "images": list(images), "annotations": [a for a in gt["annotations"] if a.get("image_id") in ids]}


def person_category(gt: dict) -> int:
    cats = gt.get("categories") or [{"id": 1, "name": "person"}]
    person = [c["id"] for c in cats if c.get("name") == "person"]
    return int(person[0] if person else cats[0]["id"])


# ---------------------------------------------------------------------------------------------- the job
def build_loop_from_config(cfg: DictConfig, device: str | None = None):
    """The ``BMP`` of a job config: the models of its ``models`` node (partial loaders, conf/bmp_models/) called
    with the device, and its ``loop``; ``device`` overrides the config's (a distributed rank's own GPU)."""
    import hydra

    loop_cfg = cfg.loop
    if isinstance(loop_cfg, DictConfig) and "_target_" in loop_cfg:
        loop = hydra.utils.instantiate(loop_cfg)
    else:
        loop = resolve_loop_config(loop_cfg)
    device = device or resolve_device(cfg.get("device"))
    models = cfg.models
    detector = hydra.utils.instantiate(models.detector)(device=device)
    pose = hydra.utils.instantiate(models.pose)(device=device)
    sam = hydra.utils.instantiate(models.sam)(device=device) if loop.segmenter == "sam2" else None
    return build_bmp(detector, pose, sam, loop=loop, device=device)


def _progress(items: list, desc: str, disable: bool = False):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return items
    return tqdm(items, desc=desc, unit="img", dynamic_ncols=True, disable=disable)


@dataclass
class ImageResult:
    """One image's loop output as evaluation entries: ``keypoints[k]`` / ``detection[k]`` are iteration ``k + 1``'s
    inputs of the keypoint / detection evaluators; ``index`` is the image's position in the split (ranks gather
    their results and rank 0 restores the split's order)."""

    index: int
    image_id: int
    keypoints: list[list[dict]]
    detection: list[dict]
    timings: dict[str, float]


def evaluate_image(
    bmp,
    split: EvalSplit,
    info: dict,
    index: int,
    det_score: str = "bbox",
    box_from_mask: bool = False,
    vis_path: Path | None = None,
) -> ImageResult:
    """Run the loop on one image of the split; ``vis_path``: also save its picture (detector input + people per
    iteration) there."""

    image_id = int(info["id"])
    image = read_image(split.img_dir / info["file_name"], where=f"{split.ann_file}, image id {image_id}")
    hw = image.shape[:2]
    result = bmp(image, return_iterations=vis_path is not None)
    keypoints, detection = [], []
    for snap in result.iterations:
        keypoints.append(keypoint_predictions(snap.persons, image_id, hw, box_from_mask))
        detection.append(detection_prediction(snap.persons, image_id, hw, det_score, box_from_mask))
    if vis_path is not None:
        save_png(iteration_figure(image, result), vis_path)
    return ImageResult(index, image_id, keypoints, detection, dict(result.timings))


def run_bmp_evaluation(cfg: DictConfig) -> dict[str, float]:
    """Run the BMP loop over ``cfg.split``, write results / metrics / pictures into ``cfg.paths.output_dir``.

    Under ``torchrun`` / ``srun`` (several processes) every rank runs the loop on its share of the images and rank 0
    scores the gathered results in the split's order: the same result files and metrics as one process, plus
    ``bmp/dist/world_size`` and ``bmp/dist/rank<r>/images`` (the images each rank processed). Returns the metrics
    (also in ``metrics.json``; an empty dict on the other ranks).
    """

    set_torch_threads(cfg.get("torch_threads"))
    device = resolve_device(cfg.get("device"))
    ctx = init_distributed(device)
    try:
        # the ranks' own Hydra run dirs may differ by a timestamp second: everything goes to rank 0's
        out_dir = Path(ctx.broadcast(str(cfg.paths.output_dir)))
        results_dir, vis_dir = out_dir / "results", out_dir / "vis"
        split = split_from_config(cfg.split) if ctx.is_main else None
        split = ctx.broadcast(split)  # rank 0 generates a missing synthetic split, once
        gt, images = load_ground_truth(split, cfg.get("max_images"))
        ev = cfg.get("eval") or {}
        det_score = ev.get("det_score", "bbox")
        box_from_mask = bool(ev.get("box_from_mask", False))
        num_vis = int(cfg.get("num_vis") or 0)

        bmp = build_loop_from_config(cfg, device=device_for_rank(device, ctx.local_rank))
        mine = ctx.shard(list(range(len(images))))
        if ctx.is_main:
            log.info(
                "BMP on %s (%d images, %s), %d iterations, segmenter=%s, %d process(es)", split.name, len(images),
                split.ann_file, bmp.cfg.num_iters, bmp.cfg.segmenter, ctx.world_size,
            )  # fmt: skip
        t_start = time.perf_counter()
        local: list[ImageResult] = []
        skipped: list[dict[str, Any]] = []  # unreadable images: their people count as not found
        for n in _progress(mine, f"BMP {split.name}", disable=not ctx.is_main):
            info = images[n]
            vis_path = vis_dir / f"{int(info['id']):012d}.png" if n < num_vis else None
            try:
                local.append(evaluate_image(bmp, split, info, n, det_score, box_from_mask, vis_path))
            except BadSampleError as err:
                if cfg.get("strict", False):
                    raise
                log.warning("skipped (strict=false): %s", err)
                path = os.fspath(split.img_dir / info["file_name"])
                skipped.append({"file": path, "image_id": int(info["id"]), "reason": str(err)})
        wall = time.perf_counter() - t_start
        parts = ctx.gather({"rank": ctx.rank, "results": local, "skipped": skipped, "wall_seconds": wall})
        if not ctx.is_main:
            return {}
        metrics = score_bmp_results(cfg, split, gt, images, parts, bmp.cfg.num_iters, results_dir)
        skipped = [s for p in parts for s in p["skipped"]]
        order = {int(im["id"]): i for i, im in enumerate(images)}
        skipped.sort(key=lambda s: order[s["image_id"]])
        atomic_write_json(out_dir / "metrics.json", {**metrics, "bmp/skipped": skipped} if skipped else metrics)
        _log_metrics(cfg, metrics, bmp.cfg.num_iters, instantiate_dict(cfg.get("logger")))
        log.info("%s", format_summary(metrics, split.name, bmp.cfg.num_iters))
        if skipped:
            log.warning("%d of %d images could not be read and were skipped (their people count as not found):\n  %s",
                        len(skipped), len(images), "\n  ".join(s["reason"] for s in skipped))  # fmt: skip
        log.info("results in %s", out_dir)
        return metrics
    finally:
        ctx.close()


def score_bmp_results(
    cfg: DictConfig,
    split: EvalSplit,
    gt: dict,
    images: list[dict],
    parts: list[dict],
    num_iters: int,
    results_dir: Path,
) -> dict[str, float]:
    """Rank 0: the ranks' :class:`ImageResult` lists -> per-iteration results json, ``info.json`` and the metrics."""

    results = sorted((r for part in parts for r in part["results"]), key=lambda r: r.index)
    order = {int(im["id"]): i for i, im in enumerate(images)}
    skipped = sorted((s for part in parts for s in part.get("skipped", [])), key=lambda s: order[s["image_id"]])
    gone = {order[s["image_id"]] for s in skipped}
    if [r.index for r in results] != [i for i in range(len(images)) if i not in gone]:
        raise RuntimeError(
            f"BMP job: gathered {len(results)} image results + {len(skipped)} skipped for {len(images)} images"
        )
    gt_file = split.ann_file
    if len(images) < len(gt["images"]):
        gt_file = atomic_write_json(results_dir / "gt.json", subset_ground_truth(gt, images), indent=None)
    has_segm = any(a.get("segmentation") for a in gt["annotations"])
    segm = has_segm if split.segm is None else split.segm
    ev = cfg.get("eval") or {}
    score_mode = ev.get("score_mode", "bbox_keypoint")
    verbose = bool(ev.get("verbose", False))
    kp_evals = [
        CocoKeypointEvaluator(gt_file, dataset=split.dataset, score_mode=score_mode, nms=None, verbose=verbose)
        for _ in range(num_iters)
    ]
    iou_types = ("bbox", "segm") if segm else ("bbox",)
    det_evals = [
        CocoDetectionEvaluator(gt_file, iou_types=iou_types, category_ids=(person_category(gt),), verbose=verbose)
        for _ in range(num_iters)
    ]
    times = dict.fromkeys(TIMING_KEYS, 0.0)
    for r in results:
        for k, (keypoints, detection) in enumerate(zip(r.keypoints, r.detection)):
            kp_evals[k].process(keypoints)
            det_evals[k].process([detection])
        for key, value in r.timings.items():
            times[key] = times.get(key, 0.0) + value

    metrics: dict[str, float] = {}
    for k in range(num_iters):
        prefix = results_dir / f"iter{k + 1}"
        name = f"bmp/iter{k + 1}/{split.name}"
        kp = kp_evals[k].evaluate(outfile_prefix=prefix)
        det = det_evals[k].evaluate(outfile_prefix=prefix)
        metrics.update({f"{name}/{m}": float(v) for m, v in kp.items()})
        metrics.update({f"{name}/{m}": float(v) for m, v in det.items()})
    n_img = max(len(images) - len(skipped), 1)
    metrics.update({f"bmp/time/{key}": times.get(key, 0.0) / n_img for key in TIMING_KEYS})
    # a run that silently did not shard shows world_size 1 / every image on rank 0
    metrics["bmp/dist/world_size"] = float(len(parts))
    for p in parts:
        metrics[f"bmp/dist/rank{p['rank']}/images"] = float(len(p["results"]))
        metrics[f"bmp/dist/rank{p['rank']}/skipped"] = float(len(p.get("skipped", [])))
    metrics["bmp/skipped_images"] = float(len(skipped))
    atomic_write_json(
        results_dir / "info.json",
        {
            "split": split.name,
            "dataset": split.dataset,
            "ground_truth": os.fspath(gt_file),
            "images": len(images),
            "skipped": skipped,
            "iterations": num_iters,
            "iou_types": list(iou_types),
            "loop": OmegaConf.to_container(cfg.loop, resolve=True) if isinstance(cfg.loop, DictConfig) else cfg.loop,
            "wall_seconds": max(p["wall_seconds"] for p in parts),
            "world_size": len(parts),
            "ranks": [
                {
                    "rank": p["rank"],
                    "images": len(p["results"]),
                    "skipped": p.get("skipped", []),
                    "wall_seconds": p["wall_seconds"],
                }
                for p in parts
            ],  # fmt: skip
        },
    )
    return metrics


def _log_metrics(cfg: DictConfig, metrics: dict[str, float], num_iters: int, loggers: list[Any]) -> None:
    """Hyper-parameters once, then each iteration's metrics at step ``k`` (timings with the last iteration)."""
    if not loggers:
        return
    try:
        hp = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # noqa: BLE001 - e.g. ${hydra:...} outside a Hydra run (compose API): log unresolved
        hp = OmegaConf.to_container(cfg, resolve=False)
    for lg in loggers:
        lg.log_hyperparams(hp)
        for k in range(1, num_iters + 1):
            step = {m: v for m, v in metrics.items() if m.startswith(f"bmp/iter{k}/")}
            if k == num_iters:
                step.update({m: v for m, v in metrics.items() if m.startswith("bmp/time/")})
                step["bmp/skipped_images"] = metrics.get("bmp/skipped_images", 0.0)
            lg.log_metrics(step, step=k)
        lg.save()
        lg.finalize("success")


def format_summary(metrics: dict[str, float], name: str, num_iters: int) -> str:
    """A small table: pose / box / mask AP per iteration, and the time per image."""
    lines = [f"BMP on {name}", f"{'iter':>4}  {'AP':>6}  {'bbox_AP':>7}  {'segm_AP':>7}"]
    for k in range(1, num_iters + 1):
        row = [metrics.get(f"bmp/iter{k}/{name}/{m}") for m in ("AP", "bbox_AP", "segm_AP")]
        lines.append(f"{k:>4}  " + "  ".join(f"{v:>{w}.4f}" if v is not None else f"{'-':>{w}}"
                                             for v, w in zip(row, (6, 7, 7))))  # fmt: skip
    t = {key: metrics.get(f"bmp/time/{key}", 0.0) for key in TIMING_KEYS}
    lines.append("s/img: " + ", ".join(f"{k} {v:.3f}" for k, v in t.items()))
    return "\n".join(lines)


__all__ = [
    "DETECTION_METRICS",
    "KEYPOINT_METRICS",
    "EvalSplit",
    "build_loop_from_config",
    "ImageResult",
    "detection_prediction",
    "evaluate_image",
    "format_summary",
    "keypoint_predictions",
    "load_ground_truth",
    "person_box",
    "run_bmp_evaluation",
    "score_bmp_results",
    "split_from_config",
    "subset_ground_truth",
]
