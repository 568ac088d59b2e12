"""Write synthetic scenes to disk in the real annotation formats, so the project's real readers parse them.

Layout under ``out_dir``::

    images/{train,val}/000000000001.jpg          numeric names (MMPose's MPII reader takes int(stem) as the id)
    annotations/person_keypoints_{split}.json    COCO-17 keypoints (+ segmentation, area, iscrowd 0)
    annotations/instances_{split}.json           COCO instances, category person (id 1): bbox + segmentation
    annotations/mpii_{split}.json                MMPose MPII list (center, scale, joints, joints_vis) + segmentation
    annotations/aic_{split}.json                 COCO-format AIC-14 (no area / iscrowd, as real AIC) + segmentation
    annotations/person_keypoints21_{split}.json  the exact 21-keypoint ground truth (coordinates kept for v=0)

Every file describes the same people with the same annotation ids (MPII has none). Boxes in the COCO-format files
are the tight boxes of the *visible* masks (as COCO's); the MPII box is a square around the whole in-image figure.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from bmp_lightning.data.synthetic.scene import Scene, sample_scene
from bmp_lightning.structures.keypoints import (
    KEYPOINTS,
    NUM_COCO_KEYPOINTS,
    SKELETON,
    from_merged,
)
from bmp_lightning.structures.masks import mask_to_polygons, mask_to_rle

GENERATOR_VERSION = "1"
MPII_PIXEL_STD = 200.0  # MPII scale unit: box side = scale * 200 px

# Facts of the public formats (1-based joint indices), as in the COCO and AIC annotation files.
COCO_SKELETON = [
    [16, 14], [14, 12], [17, 15], [15, 13], [12, 13], [6, 12], [7, 13], [6, 7], [6, 8], [7, 9], [8, 10], [9, 11],
    [2, 3], [1, 2], [1, 3], [2, 4], [3, 5], [4, 6], [5, 7],
]  # fmt: skip
AIC_NAMES = [
    "Right Shoulder", "Right Elbow", "Right Wrist", "Left Shoulder", "Left Elbow", "Left Wrist", "Right Hip",
    "Right Knee", "Right Ankle", "Left Hip", "Left Knee", "Left Ankle", "Head top", "Neck",
]  # fmt: skip
AIC_SKELETON = [
    [3, 2], [2, 1], [1, 14], [14, 4], [4, 5], [5, 6], [9, 8], [8, 7], [7, 10], [10, 11], [11, 12], [13, 14], [1, 7],
    [4, 10],
]  # fmt: skip
SPLITS = ("train", "val")


def mpii_center_scale(box: np.ndarray) -> tuple[list[float], float]:
    """xyxy box -> MMPose MPII ``(center, scale)`` whose decoded square (side ``scale*200``) is centred on the box.

    The reader shifts the centre's y by ``+15 * scale`` px and subtracts 1 (1-based -> 0-based), so we store the
    inverse of those two steps.
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    side = max(x1 - x0, y1 - y0, 1.0)
    scale = round(side / MPII_PIXEL_STD, 6)
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    return [round(cx + 1.0, 2), round(cy - 15.0 * scale + 1.0, 2)], scale


def _segmentation(mask: np.ndarray, kind: str) -> Any:
    if kind == "rle":
        return mask_to_rle(mask)
    polygons = mask_to_polygons(mask)
    # Polygons cannot hold a speck smaller than a triangle; fall back to RLE for that person.
    return [[round(v, 2) for v in poly] for poly in polygons] if polygons else mask_to_rle(mask)


def _flat(kps: np.ndarray, zero_invisible: bool) -> list[float | int]:
    out: list[float | int] = []
    for x, y, v in kps:
        if zero_invisible and v <= 0:
            out += [0, 0, 0]
        else:
            out += [round(float(x), 2), round(float(y), 2), int(v)]
    return out


def _coco_doc(categories: list[dict], description: str) -> dict:
    return {
        "info": {"description": description, "version": GENERATOR_VERSION, "contributor": "bmp_lightning"},
        "licenses": [],
        "images": [],
        "annotations": [],
        "categories": categories,
    }


def _person_category(names: list[str] | None = None, skeleton: list[list[int]] | None = None) -> list[dict]:
    cat: dict[str, Any] = {"supercategory": "person", "id": 1, "name": "person"}
    if names is not None:
        cat["keypoints"] = names
        cat["skeleton"] = skeleton
    return [cat]


class _SplitWriter:
    """Collects the five annotation documents of one split."""

    def __init__(self, split: str, seed: int, segmentation: str) -> None:
        desc = f"bmp_lightning synthetic crowded scenes ({split}, seed {seed})"
        self.segmentation = segmentation
        self.coco = _coco_doc(_person_category(list(KEYPOINTS[:NUM_COCO_KEYPOINTS]), COCO_SKELETON), desc)
        self.instances = _coco_doc(_person_category(), desc)
        self.aic = _coco_doc(_person_category(AIC_NAMES, AIC_SKELETON), desc)
        self.kp21 = _coco_doc(_person_category(list(KEYPOINTS), [[a + 1, b + 1] for a, b in SKELETON]), desc)
        self.mpii: list[dict] = []

    def add(self, scene: Scene, image_id: int, file_name: str, next_ann_id: int) -> int:
        """Append one image and its people; returns the next free annotation id."""
        height, width = scene.image.shape[:2]
        entry = {"id": image_id, "file_name": file_name, "height": height, "width": width}
        for doc in (self.coco, self.instances, self.aic, self.kp21):
            doc["images"].append(dict(entry))
        for p in range(len(scene.figures)):
            mask = scene.masks[p]
            area = int(mask.sum())
            if area == 0:
                continue
            rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
            bbox = [float(cols[0]), float(rows[0]), float(cols[-1] + 1 - cols[0]), float(rows[-1] + 1 - rows[0])]
            seg = _segmentation(mask, self.segmentation)
            kp21 = scene.keypoints[p]
            coco_kp = kp21[:NUM_COCO_KEYPOINTS]
            aic_kp = from_merged(kp21, "aic")
            mpii_kp = from_merged(kp21, "mpii")
            common = {"id": next_ann_id, "image_id": image_id, "category_id": 1}
            self.coco["annotations"].append(
                {
                    **common,
                    "iscrowd": 0,
                    "area": float(area),
                    "bbox": bbox,
                    "num_keypoints": int((coco_kp[:, 2] > 0).sum()),
                    "keypoints": _flat(coco_kp, zero_invisible=True),
                    "segmentation": seg,
                }
            )
            self.instances["annotations"].append(
                {**common, "iscrowd": 0, "area": float(area), "bbox": bbox, "segmentation": seg}
            )
            self.aic["annotations"].append(
                {
                    **common,
                    "bbox": bbox,
                    "num_keypoints": int((aic_kp[:, 2] > 0).sum()),
                    "keypoints": _flat(aic_kp, zero_invisible=True),
                    "segmentation": seg,
                }
            )
            self.kp21["annotations"].append(
                {
                    **common,
                    "iscrowd": 0,
                    "area": float(area),
                    "bbox": bbox,
                    "num_keypoints": int((kp21[:, 2] > 0).sum()),
                    "keypoints": _flat(kp21, zero_invisible=False),
                    "segmentation": seg,
                    "amodal_bbox_xyxy": [float(v) for v in scene.amodal_boxes[p]],
                }
            )
            if (mpii_kp[:, 2] > 0).any():
                center, scale = mpii_center_scale(scene.amodal_boxes[p])
                self.mpii.append(
                    {
                        "joints_vis": [int(v > 0) for v in mpii_kp[:, 2]],
                        "joints": [
                            [round(float(x), 2), round(float(y), 2)] if v > 0 else [-1.0, -1.0] for x, y, v in mpii_kp
                        ],
                        "image": file_name,
                        "scale": scale,
                        "center": center,
                        "segmentation": seg,
                    }
                )
            next_ann_id += 1
        return next_ann_id

    def write(self, ann_dir: Path, split: str, keypoints21: bool) -> dict[str, Path]:
        docs: dict[str, tuple[str, Any]] = {
            "coco": (f"person_keypoints_{split}.json", self.coco),
            "instances": (f"instances_{split}.json", self.instances),
            "mpii": (f"mpii_{split}.json", self.mpii),
            "aic": (f"aic_{split}.json", self.aic),
        }
        if keypoints21:
            docs["keypoints21"] = (f"person_keypoints21_{split}.json", self.kp21)
        out = {}
        for key, (name, doc) in docs.items():
            path = ann_dir / name
            path.write_text(json.dumps(doc, separators=(",", ":"), allow_nan=False))
            out[f"{key}_{split}"] = path
        return out


def generate(
    out_dir: str | Path,
    n_images: int = 32,
    seed: int = 0,
    val_fraction: float = 0.2,
    n_val: int | None = None,
    image_size: tuple[int, int] = (256, 320),
    min_people: int = 2,
    max_people: int = 6,
    segmentation: str = "rle",
    jpeg_quality: int = 92,
    keypoints21: bool = True,
    **scene_kwargs: Any,
) -> dict[str, Path]:
    """Generate ``n_images`` crowded scenes and write images + annotations under ``out_dir``.

    Image ``i`` (0-based) is drawn from ``numpy.random.default_rng([seed, i])``, so it does not depend on
    ``n_images``; the first ``n_images - n_val`` images form ``train``, the rest ``val`` (``n_val`` defaults to
    ``round(n_images * val_fraction)``). Image ids are ``i + 1``. ``image_size`` is ``(H, W)``.
    ``segmentation``: ``"rle"`` (exact visible masks, compressed RLE with a string ``counts``) or ``"polygon"``
    (outer contours, as COCO's polygons; holes are filled). ``scene_kwargs`` go to :func:`sample_scene`.

    Returns paths keyed ``root``, ``images_{split}``, ``{coco,instances,mpii,aic,keypoints21}_{split}``.
    The output is deterministic for a seed: identical json bytes and identical image bytes.
    """
    if n_images < 0:
        raise ValueError(f"n_images must be >= 0, got {n_images}")
    if n_val is None:
        if not 0.0 <= val_fraction <= 1.0:
            raise ValueError(f"val_fraction must be in [0, 1], got {val_fraction}")
        n_val = int(round(n_images * val_fraction))
    if not 0 <= n_val <= n_images:
        raise ValueError(f"n_val must be in [0, n_images={n_images}], got {n_val}")
    if segmentation not in ("rle", "polygon"):
        raise ValueError(f"segmentation must be 'rle' or 'polygon', got {segmentation!r}")
    height, width = (int(v) for v in image_size)
    root = Path(out_dir)
    ann_dir = root / "annotations"
    ann_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {"root": root}
    writers = {split: _SplitWriter(split, seed, segmentation) for split in SPLITS}
    for split in SPLITS:
        paths[f"images_{split}"] = root / "images" / split
        paths[f"images_{split}"].mkdir(parents=True, exist_ok=True)

    n_train = n_images - n_val
    ann_id = 1
    for i in range(n_images):
        split = "train" if i < n_train else "val"
        rng = np.random.default_rng([int(seed), i])
        scene = sample_scene(rng, (height, width), min_people=min_people, max_people=max_people, **scene_kwargs)
        image_id = i + 1
        file_name = f"{image_id:012d}.jpg"
        ok, buf = cv2.imencode(
            ".jpg", cv2.cvtColor(scene.image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality]
        )
        if not ok:
            raise RuntimeError(f"JPEG encoding failed for synthetic image {file_name}")
        (paths[f"images_{split}"] / file_name).write_bytes(buf.tobytes())
        ann_id = writers[split].add(scene, image_id, file_name, ann_id)
    for split in SPLITS:
        paths.update(writers[split].write(ann_dir, split, keypoints21))
    return paths


def generate_if_missing(synthetic: Any, needed_files: Any, out_dir: str | Path | None, logger: Any = None) -> bool:
    """A DataModule's ``data.synthetic`` settings: :func:`generate` them into ``out_dir`` when any of
    ``needed_files`` (falsy entries ignored) is missing. Returns whether it generated. ``synthetic``'s own
    ``out_dir`` key is the caller's to resolve (pass the result as ``out_dir``)."""
    if not synthetic:
        return False
    missing = [f for f in needed_files if f and not Path(f).is_file()]
    if not missing:
        return False
    if not out_dir:
        raise ValueError("data.synthetic needs an out_dir (or data.root)")
    cfg = {k: v for k, v in dict(synthetic).items() if k != "out_dir"}
    if logger is not None:
        logger.info("generating the synthetic dataset in %s (missing: %s)", out_dir, missing[0])
    generate(out_dir, **cfg)
    return True
