"""Add SAM 2 person masks to MPII / AIC annotations (BBoxMaskPose's ``*_sam_*.json`` training files).

    python -m bmp_lightning.tools.make_sam_masks ann=<json> images=<dir> [out=<json>] [format=auto|mpii|coco] \
        [sam=sam2.1-b+] [device=cpu] [mask_format=rle|polygon] [every=50] [local_files_only=false] [strict=false]

MaskPose trains on COCO's ground-truth polygons and on SAM masks for MPII and AIC, which have none; BMP ships those
masks as ``annotations/{mpii,aic}_sam_{train,val}.json`` but neither the script nor its prompting
(docs/departures.md#sam-masks-for-mpii-and-aic). Our prompting, per person: the ground-truth box (MPII: MMPose's
square box from ``center`` / ``scale``) plus
every *visible* keypoint as a positive point (COCO format ``v == 2``; MPII's ``joints_vis`` only says "labelled",
so every labelled joint), points outside the image dropped, one mask per person (no multi-mask choice). Box and
keypoints together pin the mask to the annotated person in crowds: the box alone often covers two people, and
occluded keypoints (COCO ``v == 1``) lie on the occluder, so they are not used.

Output: the input json with ``segmentation`` (compressed RLE with a string ``counts``, or polygons) and
``sam_score`` (SAM's predicted IoU) added to each person; ``bmp_lightning.data.readers.read_mpii`` /
``read_coco_keypoints`` read it. Entries that already have a ``segmentation`` or a ``sam_score`` are left as they
are, so a rerun resumes (the output file is the progress record: it is rewritten atomically every ``every``
images and at the end). ``out`` defaults to BMP's naming: ``mpii_train.json`` -> ``mpii_sam_train.json``.

An image that cannot be read (missing, truncated, corrupt) is skipped: its people keep no mask (a rerun tries them
again), and the images are listed with the reason in ``<out>.skipped.json`` (``strict=true``: stop at the first).

Many GPUs (SAM on ~420k MPII + AIC people): ``torchrun --nproc_per_node=N -m bmp_lightning.tools.make_sam_masks ...
device=cuda`` (or ``srun``) shards the images left to do over the ranks; rank ``r`` appends each finished image's
masks to ``<out>.partial.rank<r>.jsonl`` and rank 0 merges every sidecar into ``out`` (atomically, the same file as
one process writes) once all ranks are done. A killed run resumes with any number of processes (sidecars included).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bmp_lightning.data.readers import mpii_box
from bmp_lightning.loop.build import load_segmenter
from bmp_lightning.loop.segmenter import DEFAULT_SAM2
from bmp_lightning.structures.files import atomic_write_json
from bmp_lightning.structures.io import read_image
from bmp_lightning.structures.masks import mask_to_polygons, mask_to_rle
from bmp_lightning.structures.records import BadSampleError
from bmp_lightning.utils.cli import parse_key_values
from bmp_lightning.utils.common import resolve_device
from bmp_lightning.utils.distributed import DistContext, device_for_rank, init_distributed

log = logging.getLogger("bmp_lightning.make_sam_masks")


@dataclass
class MaskJob:
    """One person to segment: where it lives in the json and its prompts (image pixels)."""

    index: int  # position in the MPII list / COCO ``annotations``
    box: np.ndarray  # (4,) xyxy, clipped to the image
    points: np.ndarray  # (P, 2) positive points


def skipped_path(out: str | os.PathLike) -> Path:
    """Where a run lists its unreadable images: ``<out>.skipped.json``."""
    out = Path(out)
    return out.with_name(out.name + ".skipped.json")


def write_skip_report(out: str | os.PathLike, skipped: list[dict[str, Any]]) -> None:
    """``<out>.skipped.json`` = ``{"skipped": n, "images": [{"file", ..., "reason"}]}`` when images were skipped;
    an old one is removed when none was (it would describe another run)."""
    path = skipped_path(out)
    if skipped:
        atomic_write_json(path, {"skipped": len(skipped), "images": skipped})
        log.warning("%d unreadable images skipped, listed in %s", len(skipped), path)
    else:
        path.unlink(missing_ok=True)


def default_out(ann: str | os.PathLike) -> Path:
    """BMP's naming: ``<name>_<split>.json`` -> ``<name>_sam_<split>.json`` (else ``<stem>_sam.json``)."""
    p = Path(ann)
    head, sep, tail = p.stem.partition("_")
    return p.with_name(f"{head}_sam_{tail}.json" if sep else f"{p.stem}_sam.json")


def partial_path(out: str | os.PathLike, rank: int) -> Path:
    """Rank ``rank``'s progress sidecar of a distributed run: ``<out>.partial.rank<r>.jsonl``."""
    out = Path(out)
    return out.with_name(f"{out.name}.partial.rank{rank}.jsonl")


def all_partials(out: str | os.PathLike) -> list[Path]:
    out = Path(out)
    return sorted(out.parent.glob(glob.escape(out.name) + ".partial.rank*.jsonl"))


def _read_partial(path: Path, settings: dict, repair: bool) -> list[dict]:
    """The image records of a sidecar; a torn last line (killed write) is ignored, and cut off with ``repair``."""
    data = path.read_bytes()
    lines = data.split(b"\n")
    if lines[-1].strip():
        log.warning("%s: dropping an incomplete last line (an interrupted write)", path)
        if repair:
            with open(path, "r+b") as f:
                f.truncate(len(data) - len(lines[-1]))
    records = []
    for n, line in enumerate(lines[:-1]):
        try:
            rec = json.loads(line)
        except ValueError as err:
            raise BadSampleError(f"{path}, line {n + 1}: not valid json ({err}); delete it to start over") from err
        if n == 0:
            if rec.get("settings") != settings:
                raise BadSampleError(
                    f"{path}: progress of a run with other settings ({rec.get('settings')}, now {settings}); "
                    "delete it to start over or rerun with the same settings"
                )
            continue
        records.append(rec)
    return records


def apply_partials(entries: list[dict], out: Path, settings: dict, repair: bool = False) -> int:
    """Put the masks of every sidecar of ``out`` into ``entries``; the number of people set."""
    n = 0
    for path in all_partials(out):
        for rec in _read_partial(path, settings, repair):
            for m in rec["masks"]:
                entries[m["index"]]["segmentation"] = m["segmentation"]
                entries[m["index"]]["sam_score"] = m["sam_score"]
                n += 1
    return n


def is_done(entry: dict) -> bool:
    """Already has a mask (ground truth, or from an earlier run of this tool)."""
    return "sam_score" in entry or bool(entry.get("segmentation"))


def person_prompts(box_xyxy: Any, keypoints: Any, visible: Any, hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Box clipped to the image ``(4,)`` and the visible keypoints inside it ``(P, 2)`` (the SAM prompts)."""
    h, w = hw
    box = np.clip(np.asarray(box_xyxy, np.float64).reshape(4), 0.0, [w, h, w, h])
    kpts = np.asarray(keypoints, np.float64).reshape(-1, 2)
    vis = np.asarray(visible).reshape(-1).astype(bool)
    inside = (kpts[:, 0] >= 0) & (kpts[:, 0] < w) & (kpts[:, 1] >= 0) & (kpts[:, 1] < h)
    return box, kpts[vis & inside]


def collect_jobs(doc: Any, fmt: str, source: str) -> dict[str, tuple[Any, list[tuple[int, dict]]]]:
    """``file name -> (image key, [(index, entry)])`` of the people still without a mask."""
    todo: dict[str, list[tuple[int, dict]]] = defaultdict(list)
    keys: dict[str, Any] = {}
    if fmt == "mpii":
        for i, e in enumerate(doc):
            if not isinstance(e, dict) or not {"image", "center", "scale", "joints", "joints_vis"} <= e.keys():
                raise BadSampleError(f"{source}, entry {i}: not an MMPose MPII entry")
            if not is_done(e):
                todo[str(e["image"])].append((i, e))
                keys[str(e["image"])] = e["image"]
    else:
        images = {im["id"]: im for im in doc.get("images", [])}
        for i, a in enumerate(doc["annotations"]):
            if "bbox" not in a or "image_id" not in a:
                raise BadSampleError(f"{source}, annotations[{i}] (id {a.get('id')}): needs 'bbox' and 'image_id'")
            if a["image_id"] not in images:
                raise BadSampleError(f"{source}, annotations[{i}]: image_id {a['image_id']} not in 'images'")
            if not is_done(a):
                name = images[a["image_id"]]["file_name"]
                todo[name].append((i, a))
                keys[name] = a["image_id"]
    return {name: (keys[name], entries) for name, entries in todo.items()}


def entry_prompts(entry: dict, fmt: str, hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The SAM prompts of one annotation (see the module docstring for the choice)."""
    if fmt == "mpii":
        box = mpii_box(entry["center"], float(entry["scale"]))
        return person_prompts(box, entry["joints"], np.asarray(entry["joints_vis"]) > 0, hw)
    x, y, bw, bh = (float(v) for v in entry["bbox"])
    kpts = np.asarray(entry.get("keypoints") or [], np.float64).reshape(-1, 3)
    return person_prompts([x, y, x + bw, y + bh], kpts[:, :2], kpts[:, 2] == 2, hw)


def make_sam_masks(
    ann: str | os.PathLike,
    images: str | os.PathLike,
    out: str | os.PathLike | None = None,
    segmenter: Any = None,
    fmt: str = "auto",
    mask_format: str = "rle",
    every: int = 50,
    progress: bool = True,
    strict: bool = False,
    dist: DistContext | None = None,
) -> dict[str, int]:
    """Add SAM masks to the annotations ``ann`` (images under ``images``) and write ``out``; resumes from ``out``.

    Args:
        segmenter: a ``Sam2Segmenter`` (``set_image`` / ``predict`` with boxes), or a function that returns one
            (called only when some person still needs a mask).
        fmt: ``mpii`` (MMPose list json), ``coco`` (COCO-format keypoints json: AIC), ``auto`` (by the json type).
        mask_format: ``rle`` (exact) or ``polygon`` (outer contours, as COCO polygons).
        every: rewrite ``out`` after this many images (the progress checkpoint; distributed: fsync the sidecar).
        dist: the rank of a torchrun / srun launch: images sharded over the ranks, per-rank sidecars merged by rank 0.
        strict: stop at an unreadable image instead of skipping it (listed in :func:`skipped_path`).

    Returns:
        counts: ``people`` (in the file), ``done_before`` (already with a mask), ``new`` (segmented now), ``images``
        (read now), ``skipped_images`` / ``skipped_people`` (unreadable images and their people, left without mask).
    """
    ann, out = Path(ann), Path(out) if out is not None else default_out(ann)
    if mask_format not in ("rle", "polygon"):
        raise ValueError(f"mask_format must be 'rle' or 'polygon', got {mask_format!r}")
    dist = dist or DistContext()
    dist.barrier()  # a rank may read `out` only once rank 0 has decided on it (previous runs' files)
    source = out if out.is_file() else ann
    with open(source) as f:
        try:
            doc = json.load(f)
        except json.JSONDecodeError as err:
            raise BadSampleError(f"{source}: not valid json ({err})") from err
    if fmt == "auto":
        fmt = "mpii" if isinstance(doc, list) else "coco"
    if fmt not in ("mpii", "coco"):
        raise ValueError(f"format must be 'mpii', 'coco' or 'auto', got {fmt!r}")
    if (fmt == "mpii") != isinstance(doc, list) or (fmt == "coco" and "annotations" not in doc):
        raise BadSampleError(f"{source}: not a {'MMPose MPII list' if fmt == 'mpii' else 'COCO-format'} json")
    if source == out:
        log.info("resuming from %s", out)
    entries = doc if fmt == "mpii" else doc["annotations"]
    settings = {"ann": ann.name, "format": fmt, "mask_format": mask_format}
    # masks of an interrupted distributed run (rank 0 first cuts torn lines, then every rank reads the same files)
    error, resumed = None, 0
    if dist.is_main:
        try:
            resumed = apply_partials(entries, out, settings, repair=True)
        except BadSampleError as err:
            error = str(err)
    error = dist.broadcast(error)
    if error:
        raise BadSampleError(error)
    if not dist.is_main:
        apply_partials(entries, out, settings)
    jobs = collect_jobs(doc, fmt, str(source))
    stats = {"people": len(entries), "done_before": len(entries) - sum(len(v[1]) for v in jobs.values()), "new": 0}
    stats.update(images=0, skipped_images=0, skipped_people=0)
    skipped: list[dict[str, Any]] = []
    names = dist.shard(sorted(jobs))
    if names and segmenter is None:
        raise ValueError("make_sam_masks needs a segmenter for the people without a mask")
    if names and not hasattr(segmenter, "set_image"):
        segmenter = segmenter()  # a loader: SAM is loaded only when there is work left
    bar = names
    sidecar = None
    if dist.distributed:
        sidecar = open(partial_path(out, dist.rank), "a")  # noqa: SIM115 - closed below, also on errors
        if sidecar.tell() == 0:
            sidecar.write(json.dumps({"settings": settings}) + "\n")
    if progress and dist.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(names, desc=f"SAM masks {ann.name}", unit="img", dynamic_ncols=True)
    try:
        _segment(names, bar, jobs, images, ann, fmt, mask_format, segmenter, stats, every, out, doc, sidecar, strict,
                 skipped)  # fmt: skip
    finally:
        if sidecar is not None:
            sidecar.close()
    keys = ("new", "images", "skipped_images", "skipped_people")
    parts = dist.gather(([stats[k] for k in keys], skipped))
    dist.barrier()  # every rank's sidecar is complete
    if not dist.is_main:
        return stats
    stats.update({k: sum(p[0][i] for p in parts) for i, k in enumerate(keys)})
    skipped = sorted((s for p in parts for s in p[1]), key=lambda s: s["file"])
    if dist.distributed:
        stats["new_per_rank"] = [p[0][0] for p in parts]
        apply_partials(entries, out, settings)
    if names or stats["new"] or resumed or not out.is_file():
        atomic_write_json(out, doc)
    write_skip_report(out, skipped)
    for path in all_partials(out):
        path.unlink()
    log.info("%s: %d people, %d had a mask, %d segmented now (%d images) -> %s", ann, stats["people"],
             stats["done_before"], stats["new"], stats["images"], out)  # fmt: skip
    return stats


def _segment(
    names, bar, jobs, images, ann, fmt, mask_format, segmenter, stats, every, out, doc, sidecar, strict, skipped
) -> None:
    """SAM on this rank's images: masks into the entries (one process: ``out`` rewritten every ``every`` images),
    or appended to the rank's ``sidecar``."""
    for n, name in enumerate(bar):
        _, todo = jobs[name]
        try:
            image = read_image(Path(images) / name, where=f"{ann}, {len(todo)} people")
        except BadSampleError as err:
            if strict:
                raise
            log.warning("skipped (strict=false): %s", err)
            skipped.append({"file": os.fspath(Path(images) / name), "people": len(todo), "reason": str(err)})
            stats["skipped_images"] += 1
            stats["skipped_people"] += len(todo)
            continue
        hw = image.shape[:2]
        prompts = [entry_prompts(e, fmt, hw) for _, e in todo]
        segmenter.set_image(image)
        masks, scores = segmenter.predict(
            [p for _, p in prompts],
            [np.ones(len(p), np.int64) for _, p in prompts],
            boxes=np.stack([b for b, _ in prompts]),
        )
        for (_, e), m, s in zip(todo, masks, scores):
            e["segmentation"] = mask_to_rle(m) if mask_format == "rle" else mask_to_polygons(m)
            e["sam_score"] = round(float(s), 4)
        stats["new"] += len(todo)
        stats["images"] += 1
        if sidecar is not None:
            rec = {"image": name, "masks": [{"index": i, "segmentation": e["segmentation"],
                                             "sam_score": e["sam_score"]} for i, e in todo]}  # fmt: skip
            sidecar.write(json.dumps(rec) + "\n")
            sidecar.flush()
            if every > 0 and (n + 1) % every == 0:
                os.fsync(sidecar.fileno())
        elif every > 0 and (n + 1) % every == 0 and n + 1 < len(names):
            atomic_write_json(out, doc)  # progress checkpoint: a rerun skips what is written here


def main(argv: Sequence[str] | None = None) -> dict[str, int]:
    """CLI (see the module docstring)."""

    args = parse_key_values(sys.argv[1:] if argv is None else argv, __doc__ or "")
    allowed = {"ann", "images", "out", "format", "sam", "device", "mask_format", "every", "local_files_only", "strict"}
    if bad := sorted(set(args) - allowed):
        raise SystemExit(f"unknown arguments {bad}; allowed: {sorted(allowed)}")
    if "ann" not in args or "images" not in args:
        raise SystemExit(f"ann=<json> and images=<dir> are required\n{__doc__}")
    local = args.get("local_files_only", "false").lower() in ("1", "true", "yes")
    opts = {"local_files_only": local} if args.get("sam", DEFAULT_SAM2) != "tiny_random" else {}

    device = resolve_device(args.get("device", "cpu"))
    dist = init_distributed(device)  # torchrun / srun: one shard of the images per rank
    device = device_for_rank(device, dist.local_rank)
    segmenter = lambda: load_segmenter(args.get("sam", DEFAULT_SAM2), device, **opts)  # noqa: E731
    try:
        return make_sam_masks(
            args["ann"],
            args["images"],
            args.get("out"),
            segmenter=segmenter,
            fmt=args.get("format", "auto"),
            mask_format=args.get("mask_format", "rle"),
            every=int(args.get("every", 50)),
            strict=args.get("strict", "false").lower() in ("1", "true", "yes"),
            dist=dist,
        )
    except (BadSampleError, FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from err
    finally:
        dist.close()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    main()
