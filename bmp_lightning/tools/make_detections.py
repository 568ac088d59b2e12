"""Person detections (boxes + masks) for a COCO-format image list: the ``bbox_file`` of the pose validation sets.

    python -m bmp_lightning.tools.make_detections ann=<COCO gt json> images=<image dir> \
        detector=<ckpt|pth|tiny_random> out=<json> [device=cpu] [score_thr=0.0] [max_images=N] [segm=true] \
        [input_size=640] [batch_size=4] [overwrite=false] [strict=false]

Detections for the validation sets: BMP validates COCO val2017 on RTMDet-l-Ins detections
(``coco/detections/rtmdet-l-ins-mask.json``, read by ``conf/data/coco.yaml`` and ``conf/data/multi.yaml`` with
``bbox_score_thr: 0.3``), a file the original repository ships but does not say how to make. To write it with our
own detector (MMDetection's ``rtmdet-ins_l_8xb32-300e_coco.pth`` or one of our checkpoints)::

    python -m bmp_lightning.tools.make_detections ann=data/coco/annotations/person_keypoints_val2017.json \
        images=data/coco/val2017 detector=rtmdet-ins_l_8xb32-300e_coco.pth device=cuda \
        out=data/coco/detections/rtmdet-l-ins-mask.json

The detector runs with MMDetection's test config (score >= 0.05, class-aware NMS at IoU 0.6, at most 100 boxes per
image, mask threshold 0.5, ``input_size`` 640; ``tiny_random`` defaults to 320); of its output only label 0
(person) with ``score >= score_thr`` is kept (the validation sets threshold again when they read the file).

Output: a COCO results-format json list, one entry per detection, in the order of the ann json's ``images`` and
then by descending score: ``image_id``, ``category_id`` (the gt json's ``person`` category), ``bbox`` (xywh float
pixels clipped to the image), ``score`` and, with ``segm=true``, ``segmentation`` (compressed RLE of the detector's
mask, ``counts`` a string). ``bmp_lightning.data.readers.read_detections`` and ``pycocotools.COCO.loadRes`` read it.

Resuming: each finished image is appended as one line to the sidecar ``<out>.partial.jsonl`` (its first line holds
the settings; a rerun with other settings stops rather than mixing them). A killed run continues where it stopped;
the final json is written atomically (temporary file beside it + rename) only once every image is done, then the
sidecar is removed. An unreadable image (missing, truncated, corrupt) is logged, counted, has no detections and is
listed with the reason in ``<out>.skipped.json`` (``strict=true``: stop at the first instead).

Many GPUs: ``torchrun --nproc_per_node=N -m bmp_lightning.tools.make_detections ... device=cuda`` (or ``srun``, one
task per GPU) shards the images left to do over the ranks; rank ``r`` appends to ``<out>.partial.rank<r>.jsonl``,
and rank 0 merges every sidecar into ``out`` (the same file as one process writes) once all ranks are done. A killed
run resumes with any number of processes: the finished images of every sidecar are skipped.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bmp_lightning.loop.build import load_detector
from bmp_lightning.structures.files import atomic_write_json, to_json
from bmp_lightning.structures.io import read_image
from bmp_lightning.structures.masks import mask_to_rle
from bmp_lightning.structures.records import BadSampleError
from bmp_lightning.tools.make_sam_masks import write_skip_report
from bmp_lightning.utils.cli import parse_key_values
from bmp_lightning.utils.common import resolve_device
from bmp_lightning.utils.distributed import DistContext, device_for_rank, init_distributed

log = logging.getLogger("bmp_lightning.make_detections")

PERSON_LABEL = 0  # the detector's class index of "person" (COCO order; the only class of a 1-class model)
SIDECAR_VERSION = 1


def partial_path(out: str | os.PathLike, rank: int = 0, world_size: int = 1) -> Path:
    """The progress sidecar of ``out``: ``<out>.partial.jsonl``; rank ``r`` of a distributed run writes its own,
    ``<out>.partial.rank<r>.jsonl``."""
    out = Path(out)
    return out.with_name(out.name + (".partial.jsonl" if world_size == 1 else f".partial.rank{rank}.jsonl"))


def all_partials(out: str | os.PathLike) -> list[Path]:
    """Every progress sidecar of ``out`` (one-process and per-rank ones, whatever the world size was)."""
    out = Path(out)
    single = partial_path(out)
    ranks = sorted(out.parent.glob(glob.escape(out.name) + ".partial.rank*.jsonl"))
    return ([single] if single.is_file() else []) + ranks


def _load_partials(out: Path, settings: dict[str, Any]) -> dict[int, dict[str, Any]]:
    done: dict[int, dict[str, Any]] = {}
    for path in all_partials(out):
        done.update(_load_sidecar(path, settings))
    return done


def person_category_id(gt: dict, source: str) -> int:
    """The id of the gt json's ``person`` category (the only category if there is one; ``1`` if none are listed)."""
    cats = gt.get("categories") or []
    named = [c for c in cats if isinstance(c, dict) and str(c.get("name", "")).lower() == "person"]
    if len(named) == 1:
        return int(named[0]["id"])
    if len(cats) == 1 and isinstance(cats[0], dict) and "id" in cats[0]:
        return int(cats[0]["id"])
    if not cats:
        return 1  # COCO's person id: what read_detections assumes by default
    raise BadSampleError(f"{source}: no single 'person' category among {len(cats)} categories")


def fit_mask(mask: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """An ``(h, w)`` mask cropped / zero-padded (bottom, right) to ``hw``: ``(H, W)`` uint8.

    ``Detector`` returns masks of exactly the image size (``masks_to_original`` repeats the row / column that
    MMDetection's swapped rescale factors can leave short); this guards other detectors' outputs, since an RLE must
    have the image's size.
    """
    h, w = hw
    out = np.zeros((h, w), np.uint8)
    mh, mw = min(h, mask.shape[0]), min(w, mask.shape[1])
    out[:mh, :mw] = mask[:mh, :mw]
    return out


def image_detections(
    result: dict[str, np.ndarray],
    image_id: int,
    hw: tuple[int, int],
    category_id: int = 1,
    score_thr: float = 0.0,
    segm: bool = True,
) -> list[dict[str, Any]]:
    """COCO results entries of the persons in one detector result.

    Args:
        result: the ``Detector`` output of one image: ``bboxes (N, 4)`` xyxy, ``scores (N,)``, ``labels (N,)``,
            ``masks (N, h, w)`` (``(h, w)`` the image size ``hw``; otherwise fitted, see ``fit_mask``).
        hw: the image's ``(H, W)``.

    Returns:
        entries with ``bbox`` xywh clipped to the image (zero-area ones dropped), ``score`` and, with ``segm``, the
        mask as compressed RLE of size ``hw``; in the detector's (score) order.
    """
    masks = result["masks"]
    h, w = hw
    entries = []
    for i in range(len(result["scores"])):
        score = float(result["scores"][i])
        if int(result["labels"][i]) != PERSON_LABEL or score < score_thr:
            continue
        # The network clamps boxes to its padded input, which extends past the image on one side.
        # Corners rounded before the size, so that x + w stays inside the image.
        x1, y1, x2, y2 = (round(float(v), 3) for v in np.clip(result["bboxes"][i], 0.0, [w, h, w, h]))
        bw, bh = round(x2 - x1, 3), round(y2 - y1, 3)
        if bw <= 0 or bh <= 0:
            continue
        entry: dict[str, Any] = {
            "image_id": image_id,
            "category_id": category_id,
            "bbox": [x1, y1, bw, bh],
            "score": round(score, 6),
        }
        if segm:
            entry["segmentation"] = mask_to_rle(fit_mask(np.asarray(masks[i]), hw))
        entries.append(entry)
    return entries


def _load_sidecar(path: Path, settings: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """Finished images from the sidecar ``{image_id: record}``; a torn last line (a killed write) is cut off."""
    if not path.is_file():
        return {}
    lines = path.read_bytes().split(b"\n")
    done: dict[int, dict[str, Any]] = {}
    good = 0  # bytes of the complete lines read so far
    for n, line in enumerate(lines):
        if n == len(lines) - 1:  # after the last newline: empty, or a write cut short by a kill
            if line.strip():
                log.warning("%s: dropping an incomplete last line (an interrupted write)", path)
                with open(path, "r+b") as f:
                    f.truncate(good)
            break
        good += len(line) + 1
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as err:
            raise BadSampleError(
                f"{path}, line {n + 1}: not valid json ({err}); delete the file to start over"
            ) from err
        if n == 0 or "settings" in rec:
            if rec.get("settings") != settings:
                raise BadSampleError(
                    f"{path}: progress of a run with other settings ({rec.get('settings')}, now {settings}); "
                    "delete it to start over or rerun with the same settings"
                )
        elif "image_id" in rec and ("detections" in rec or "skipped" in rec):
            done[int(rec["image_id"])] = rec
        else:
            raise BadSampleError(f"{path}, line {n + 1}: not a progress record; delete the file to start over")
    return done


def _chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), max(1, size)):
        yield items[start : start + max(1, size)]


def make_detections(
    ann: str | os.PathLike,
    images: str | os.PathLike,
    out: str | os.PathLike,
    detector: Any = None,
    score_thr: float = 0.0,
    segm: bool = True,
    max_images: int | None = None,
    overwrite: bool = False,
    settings: dict[str, Any] | None = None,
    progress: bool = True,
    loader: Callable[[], Any] | None = None,
    strict: bool = False,
    dist: DistContext | None = None,
) -> dict[str, int]:
    """Detect persons on the images of the gt json ``ann`` (files under ``images``) and write ``out``; resumable.

    Args:
        detector: a ``Detector`` (called with a list of RGB uint8 arrays, see ``bmp_lightning.detector``); its
            ``batch_size`` sets how many images go into one call.
        score_thr: keep persons with ``score >= score_thr``.
        segm: add the masks as ``segmentation`` (compressed RLE).
        max_images: only the first ``max_images`` images of ``ann`` (``None``: all).
        overwrite: redo a finished ``out`` (otherwise an existing ``out`` without a sidecar is an error).
        settings: what identifies the run in the sidecar besides ``score_thr`` / ``segm`` (e.g. the detector).
        loader: builds the detector when ``detector`` is ``None``, only if some image is left to do.
        strict: stop at an unreadable image instead of skipping it.
        dist: the rank of a torchrun / srun launch (:func:`bmp_lightning.utils.distributed.init_distributed`): the
            images left to do are sharded over the ranks, each appends to its own sidecar, and rank 0 merges them all
            into ``out`` once every rank is done (the same file as one process writes).

    Returns:
        counts: ``images`` (selected), ``done_before`` (from the sidecar), ``new`` (detected now), ``skipped``
        (unreadable, now or in the sidecar: no detections), ``detections`` (in ``out``).
    """
    ann, images, out = Path(ann), Path(images), Path(out)
    if not ann.is_file():
        raise FileNotFoundError(f"annotation file not found: {ann}")
    if not images.is_dir():
        raise FileNotFoundError(f"image directory not found: {images}")
    dist = dist or DistContext()
    sidecar = partial_path(out, dist.rank, dist.world_size)
    if out.exists() and not all_partials(out) and not overwrite:
        raise FileExistsError(f"{out} exists (a finished run); pass overwrite=true to write it again")
    try:
        gt = json.loads(ann.read_text())
    except json.JSONDecodeError as err:
        raise BadSampleError(f"{ann}: not valid json ({err})") from err
    if not isinstance(gt, dict) or not isinstance(gt.get("images"), list):
        raise BadSampleError(f"{ann}: expected a COCO-format json with an 'images' list")
    category_id = person_category_id(gt, str(ann))
    todo_images, seen = [], set()
    for i, im in enumerate(gt["images"][:max_images] if max_images is not None else gt["images"]):
        if not isinstance(im, dict) or "id" not in im or "file_name" not in im:
            raise BadSampleError(f"{ann}, images[{i}]: needs 'id' and 'file_name'")
        if int(im["id"]) in seen:
            raise BadSampleError(f"{ann}, images[{i}]: duplicate image id {im['id']}")
        seen.add(int(im["id"]))
        todo_images.append(im)

    settings = {"version": SIDECAR_VERSION, "category_id": category_id, "score_thr": score_thr, "segm": segm,
                **(settings or {})}  # fmt: skip
    # rank 0 reads every sidecar (cutting torn lines) before any rank appends; the others get the finished ids
    done, error = {}, None
    if dist.is_main:
        try:
            done = _load_partials(out, settings)
        except BadSampleError as err:
            error = str(err)
    finished, error = dist.broadcast((set(done), error))
    if error:
        raise BadSampleError(error)
    if finished:
        log.info("resuming from %s (%d images done)", ", ".join(map(str, all_partials(out))), len(finished))
    remaining = [im for im in todo_images if int(im["id"]) not in finished]
    stats = {"images": len(todo_images), "done_before": len(todo_images) - len(remaining), "new": 0, "skipped": 0}
    remaining = dist.shard(remaining)
    if remaining and detector is None:
        if loader is None:
            raise ValueError("make_detections needs a detector (or a loader) for the images left to do")
        detector = loader()
    batch = int(getattr(detector, "batch_size", 1) or 1)

    bar = None
    if progress and remaining and dist.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(remaining), desc=f"detections {ann.name}", unit="img", dynamic_ncols=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(sidecar, "a") as f:
        if f.tell() == 0:
            f.write(to_json({"settings": settings}) + "\n")
        for chunk in _chunks(remaining, batch):
            records, arrays, metas = [], [], []
            for im in chunk:
                try:
                    arrays.append(read_image(images / im["file_name"], where=f"{ann}, image id {im['id']}"))
                    metas.append(im)
                except BadSampleError as err:
                    if strict:
                        raise
                    log.warning("skipped: %s", err)
                    records.append({"image_id": im["id"], "skipped": str(err)})
            results = detector(arrays) if arrays else []
            for im, img, res in zip(metas, arrays, results):
                dets = image_detections(res, im["id"], img.shape[:2], category_id, score_thr, segm)
                records.append({"image_id": im["id"], "detections": dets})
            for rec in records:
                done[int(rec["image_id"])] = rec
                f.write(to_json(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())  # a finished image survives a crash of the machine, not only of the process
            stats["new"] += len(metas)
            if bar is not None:
                bar.update(len(chunk))
    if bar is not None:
        bar.close()
    new = dist.gather(stats["new"])
    dist.barrier()  # every rank's sidecar is complete
    if not dist.is_main:
        return stats
    stats["new"] = sum(new)
    if dist.distributed:
        stats["new_per_rank"] = new
    done = _load_partials(out, settings)

    result = [d for im in todo_images for d in done[int(im["id"])].get("detections", [])]
    skipped = [done[int(im["id"])]["skipped"] for im in todo_images if "skipped" in done[int(im["id"])]]
    atomic_write_json(out, result)
    write_skip_report(out, [
        {"file": os.fspath(images / im["file_name"]), "image_id": im["id"], "reason": done[int(im["id"])]["skipped"]}
        for im in todo_images if "skipped" in done[int(im["id"])]
    ])  # fmt: skip
    for path in all_partials(out):
        path.unlink()
    stats.update(skipped=len(skipped), detections=len(result))
    if skipped:
        log.warning("%d of %d images unreadable and left out:\n  %s", len(skipped), len(todo_images),
                    "\n  ".join(skipped))  # fmt: skip
    log.info("%s: %d images (%d done before, %d now, %d skipped), %d person detections -> %s", ann, stats["images"],
             stats["done_before"], stats["new"], stats["skipped"], stats["detections"], out)  # fmt: skip
    return stats


def _flag(value: str, key: str) -> bool:
    v = value.strip().lower()
    if v not in ("1", "true", "yes", "0", "false", "no"):
        raise SystemExit(f"{key}= takes true or false, got {value!r}")
    return v in ("1", "true", "yes")


def main(argv: Sequence[str] | None = None) -> dict[str, int]:
    """CLI (see the module docstring)."""

    args = parse_key_values(sys.argv[1:] if argv is None else argv, __doc__ or "")
    allowed = {"ann", "images", "detector", "out", "device", "score_thr", "max_images", "segm", "input_size",
               "batch_size", "overwrite", "strict"}  # fmt: skip
    if bad := sorted(set(args) - allowed):
        raise SystemExit(f"unknown arguments {bad}; allowed: {sorted(allowed)}")
    if missing := [k for k in ("ann", "images", "detector", "out") if k not in args]:
        raise SystemExit(f"missing {', '.join(k + '=' for k in missing)}\n{__doc__}")
    try:
        opts = {k: int(args[k]) for k in ("input_size", "batch_size") if k in args}
        score_thr = float(args.get("score_thr", 0.0))
        max_images = int(args["max_images"]) if args.get("max_images", "") not in ("", "null", "none") else None
    except ValueError as err:
        raise SystemExit(f"error: {err}") from err

    device = resolve_device(args.get("device", "cpu"))
    dist = init_distributed(device)  # torchrun / srun: one shard of the images per rank
    device = device_for_rank(device, dist.local_rank)
    spec = args["detector"]
    # The sidecar remembers what made the detections (not the device or batch size: they do not change them).
    settings = {"detector": os.path.basename(spec), "input_size": opts.get("input_size")}
    try:
        return make_detections(
            args["ann"],
            args["images"],
            args["out"],
            score_thr=score_thr,
            segm=_flag(args.get("segm", "true"), "segm"),
            max_images=max_images,
            overwrite=_flag(args.get("overwrite", "false"), "overwrite"),
            settings=settings,
            loader=lambda: load_detector(spec, device, **opts),
            strict=_flag(args.get("strict", "false"), "strict"),
            dist=dist,
        )
    except (BadSampleError, FileNotFoundError, FileExistsError, ValueError) as err:
        raise SystemExit(f"error: {err}") from err
    finally:
        dist.close()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    main()
