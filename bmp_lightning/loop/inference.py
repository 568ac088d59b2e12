"""BMP on pictures (the demo): overlays per iteration, an optional GIF, and the instances as JSON.

``python -m bmp_lightning.demo input=<image|folder> detector=<ckpt> pose=<ckpt> [sam=<name|dir>]`` runs
:func:`run_demo`. For every image ``<stem>`` it writes into ``output_dir`` (default: the run dir):

* ``<stem>_iter{k}.png``: the people after iteration ``k`` on the original image (refined masks, boxes, skeletons,
  and the SAM prompt points of the people found in that iteration, numbered in prompt order);
* ``<stem>_steps.png``: one row per iteration, the detector's input (masked out from iteration 2 on) with its boxes
  next to the overlay;
* ``<stem>.gif`` (``gif=true``): the iteration overlays as an animation;
* ``<stem>.json``: :func:`result_to_json` (boxes, keypoints, scores, prompts, RLE masks, per-iteration counts).

``summary.json`` lists every image with its number of people and timings, and under ``skipped`` the images that
could not be read (missing, truncated, corrupt; the others are still processed; ``strict=true`` stops at the first).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from bmp_lightning.loop.bmp import BMPResult
from bmp_lightning.loop.evaluate import build_loop_from_config
from bmp_lightning.loop.render import iteration_figure, iteration_frames, save_gif, save_png
from bmp_lightning.structures.files import atomic_write_json
from bmp_lightning.structures.io import read_image
from bmp_lightning.structures.keypoints import KEYPOINTS
from bmp_lightning.structures.masks import mask_to_rle
from bmp_lightning.structures.records import BadSampleError
from bmp_lightning.utils.common import set_torch_threads

log = logging.getLogger("bmp_lightning.demo")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def list_images(path: str | os.PathLike) -> list[Path]:
    """One image file, or the images of a folder (sorted, not recursive). Clear errors for a bad ``input``."""
    if path is None or str(path) == "":
        raise ValueError("input=<image or folder> is required")
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        if not files:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {p}")
        return files
    raise FileNotFoundError(f"input not found: {p}")


def result_to_json(result: BMPResult, image_path: str | os.PathLike | None = None) -> dict[str, Any]:
    """The loop's output as plain json: per person ``bbox`` (xyxy detector box), ``keypoints`` (K x [x, y, score],
    K = 17 or 21, names in ``keypoint_names``), ``score`` (mean of the 17 COCO keypoint scores), ``bbox_score``,
    ``sam_score``, ``iteration`` (1-based, when found), ``prompts`` (SAM points x, y, score) and ``mask`` (COCO
    compressed RLE, ``counts`` a string); per iteration the detections, new and total people, timings."""
    h, w = result.image_size
    k = result.persons[0].keypoints.shape[0] if result.persons else 17
    persons = []
    for i, p in enumerate(result.persons):
        kpts = np.concatenate([p.keypoints, p.keypoint_scores[:, None]], axis=1)
        persons.append(
            {
                "id": i,
                "iteration": int(p.iteration),
                "bbox": [float(v) for v in p.bbox],
                "score": float(p.score),
                "bbox_score": float(p.bbox_score),
                "sam_score": float(p.sam_score),
                "keypoints": kpts.astype(float).round(3).tolist(),
                "prompts": np.asarray(p.prompts, float).round(3).tolist(),
                "mask": mask_to_rle(p.mask),
                "mask_area": int(p.mask.sum()),
            }
        )
    iterations = [
        {
            "iteration": s.iteration,
            "detections": len(s.det_bboxes),
            "new": len(s.new_indices),
            "people": len(s.persons),
            "skipped": s.skipped,
            "timings": {key: float(v) for key, v in s.timings.items()},
        }
        for s in result.iterations
    ]
    return {
        "image": None if image_path is None else os.fspath(image_path),
        "height": int(h),
        "width": int(w),
        "keypoint_names": list(KEYPOINTS[:k]),
        "persons": persons,
        "iterations": iterations,
    }


def run_demo(cfg: DictConfig) -> list[dict[str, Any]]:
    """Run BMP on ``cfg.input`` (an image or a folder) and write pictures + JSON into ``cfg.output_dir``.

    Returns the per-image summaries (also in ``summary.json``).
    """

    set_torch_threads(cfg.get("torch_threads"))
    files = list_images(cfg.get("input"))
    out_dir = Path(cfg.get("output_dir") or cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bmp = build_loop_from_config(cfg)
    summary, skipped = [], []
    for f in files:
        try:
            image = read_image(f)
        except BadSampleError as err:
            if cfg.get("strict", False):
                raise
            log.warning("skipped (strict=false): %s", err)
            skipped.append({"image": os.fspath(f), "reason": str(err)})
            continue
        result = bmp(image, return_iterations=True)
        stem = f.stem
        frames = iteration_frames(image, result)
        for k, frame in enumerate(frames, 1):
            save_png(frame, out_dir / f"{stem}_iter{k}.png")
        save_png(iteration_figure(image, result), out_dir / f"{stem}_steps.png")
        if cfg.get("gif", True) and frames:
            save_gif(frames, out_dir / f"{stem}.gif", duration_ms=int(cfg.get("gif_ms", 900)))
        atomic_write_json(out_dir / f"{stem}.json", result_to_json(result, f))
        t = result.timings
        summary.append({"image": os.fspath(f), "people": len(result.persons), "timings": t})
        log.info(
            "%s: %d people (%s) in %.2f s (detector %.2f, pose %.2f, sam %.2f)", f.name, len(result.persons),
            " + ".join(str(len(s.new_indices)) for s in result.iterations), t["total"], t["detector"], t["pose"],
            t["sam"],
        )  # fmt: skip
    loop = OmegaConf.to_container(cfg.loop, resolve=True) if isinstance(cfg.loop, DictConfig) else cfg.loop
    doc = {"loop": loop, "images": summary, "num_skipped": len(skipped), "skipped": skipped}
    atomic_write_json(out_dir / "summary.json", doc)
    log.info("pictures and JSON in %s", out_dir)
    if skipped:
        log.warning("%d of %d images could not be read and were skipped:\n  %s", len(skipped), len(files),
                    "\n  ".join(s["reason"] for s in skipped))  # fmt: skip
    if not summary:
        raise BadSampleError(f"none of the {len(files)} images could be read (see {out_dir / 'summary.json'})")
    return summary
