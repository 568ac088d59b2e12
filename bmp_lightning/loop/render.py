"""Pictures of the BMP loop: per-iteration overlays (masks, skeletons, boxes, SAM prompts), panels and GIFs.

RGB uint8 in, RGB uint8 out. A person keeps its colour across iterations (colours follow the order in which the
loop found the people).
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from bmp_lightning.loop.bmp import BMPResult, IterationSnapshot, Person
from bmp_lightning.structures.files import atomic_path, atomic_write_bytes
from bmp_lightning.utils.visualize import draw_boxes, draw_masks, draw_skeletons, palette


def person_colors(result: BMPResult) -> dict[int, tuple[int, int, int]]:
    """``id(person) -> RGB`` for every person of every iteration, in order of discovery."""
    order: list[int] = []
    for snap in result.iterations:
        for p in snap.persons:
            if id(p) not in order:
                order.append(id(p))
    for p in result.persons:
        if id(p) not in order:
            order.append(id(p))
    return dict(zip(order, palette(len(order))))


def draw_prompts(image: np.ndarray, prompts: np.ndarray, color: tuple[int, int, int]) -> np.ndarray:
    """SAM positive prompt points ``(P, 2|3)``: a white-ringed dot in the person's colour, numbered in prompt order."""
    out = image.copy()
    pts = np.asarray(prompts, np.float64)
    if pts.size == 0:
        return out
    for i, p in enumerate(pts.reshape(len(pts), -1)):
        x, y = int(round(float(p[0]))), int(round(float(p[1])))
        cv2.circle(out, (x, y), 4, (255, 255, 255), -1, cv2.LINE_AA)
        cv2.circle(out, (x, y), 3, color, -1, cv2.LINE_AA)
        cv2.putText(out, str(i + 1), (x + 4, y - 3), cv2.FONT_HERSHEY_SIMPLEX, 0.3, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def draw_persons(
    image: np.ndarray,
    persons: list[Person],
    colors: list[tuple[int, int, int]] | None = None,
    prompts_of: set[int] | None = None,
    kpt_thr: float = 0.3,
    labels: bool = True,
) -> np.ndarray:
    """Masks, boxes, skeletons (all K keypoints with score >= ``kpt_thr``) and, for people whose ``id`` is in
    ``prompts_of`` (default: all), their SAM prompts."""
    out = np.ascontiguousarray(image).copy()
    if not persons:
        return out
    colors = colors or palette(len(persons))
    out = draw_masks(out, np.stack([p.mask for p in persons]), colors)
    text = [f"it{p.iteration} {p.score:.2f}" for p in persons] if labels else None
    out = draw_boxes(out, np.stack([p.bbox for p in persons]), colors, text)
    kpts = np.stack([p.keypoints for p in persons])
    out = draw_skeletons(out, kpts, np.stack([p.keypoint_scores for p in persons]), thr=kpt_thr, colors=colors)
    for p, c in zip(persons, colors):
        if (prompts_of is None or id(p) in prompts_of) and len(p.prompts):
            out = draw_prompts(out, p.prompts, c)
    return out


def _title(image: np.ndarray, text: str) -> np.ndarray:
    bar = np.full((16, image.shape[1], 3), 32, np.uint8)
    cv2.putText(bar, text, (3, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
    return np.concatenate([bar, image], axis=0)


def iteration_overlay(
    image: np.ndarray, result: BMPResult, snap: IterationSnapshot, colors: dict[int, tuple[int, int, int]] | None = None
) -> np.ndarray:
    """The people after iteration ``snap`` on the original image; prompts drawn for the people it found."""
    colors = colors or person_colors(result)
    new = {id(p) for p in snap.persons if p.iteration == snap.iteration}
    out = draw_persons(image, snap.persons, [colors[id(p)] for p in snap.persons], prompts_of=new)
    note = f" ({snap.skipped})" if snap.skipped else ""
    return _title(out, f"iteration {snap.iteration}: {len(snap.persons)} people, {len(new)} new{note}")


def detector_panel(snap: IterationSnapshot, fallback: np.ndarray) -> np.ndarray:
    """The detector's input of an iteration (the masked-out image from iteration 2 on) with its kept boxes."""
    img = snap.image if snap.image is not None else fallback
    out = draw_boxes(img, snap.det_bboxes, [(255, 255, 255)] * len(snap.det_bboxes),
                     [f"{s:.2f}" for s in snap.det_scores])  # fmt: skip
    return _title(out, f"detector input {snap.iteration}: {len(snap.det_bboxes)} boxes")


def iteration_frames(image: np.ndarray, result: BMPResult) -> list[np.ndarray]:
    """One overlay per iteration (the GIF frames)."""
    colors = person_colors(result)
    return [iteration_overlay(image, result, snap, colors) for snap in result.iterations]


def iteration_figure(image: np.ndarray, result: BMPResult) -> np.ndarray:
    """A grid: one row per iteration, ``[detector input + boxes | people after the iteration]``."""
    colors = person_colors(result)
    rows = []
    for snap in result.iterations:
        left = detector_panel(snap, image)
        right = iteration_overlay(image, result, snap, colors)
        gap = np.zeros((left.shape[0], 4, 3), np.uint8)
        rows.append(np.concatenate([left, gap, right], axis=1))
    if not rows:
        return image.copy()
    gap = np.zeros((4, rows[0].shape[1], 3), np.uint8)
    out = [rows[0]]
    for r in rows[1:]:
        out += [gap, r]
    return np.concatenate(out, axis=0)


def save_png(image: np.ndarray, path: str | os.PathLike) -> Path:
    """Write an RGB uint8 image as PNG (through a temporary file, so no half-written picture is left)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(".png", cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError(f"PNG encoding failed for {path}")
    return atomic_write_bytes(path, buf.tobytes())


def save_gif(frames: list[np.ndarray], path: str | os.PathLike, duration_ms: int = 900) -> Path:
    """Animated GIF of RGB frames (Pillow), looping forever."""
    from PIL import Image

    if not frames:
        raise ValueError("save_gif needs at least one frame")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images = [Image.fromarray(np.ascontiguousarray(f)) for f in frames]
    with atomic_path(path) as tmp:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=duration_ms, loop=0)
    return path
