"""Drawing helpers shared by the training visualiser, the demo and the notebooks (RGB uint8 in, RGB uint8 out)."""

from __future__ import annotations

import colorsys

import cv2
import numpy as np

from bmp_lightning.structures.keypoints import SKELETON


def palette(n: int, seed: int = 0) -> list[tuple[int, int, int]]:
    """``n`` well-separated RGB colours (golden-ratio hues)."""
    out = []
    for i in range(n):
        h = (seed * 0.137 + i * 0.618033988749895) % 1.0
        r, g, b = colorsys.hsv_to_rgb(h, 0.75, 1.0)
        out.append((int(r * 255), int(g * 255), int(b * 255)))
    return out


def draw_masks(image: np.ndarray, masks: np.ndarray, colors=None, alpha: float = 0.45) -> np.ndarray:
    """Blend ``(N,H,W)`` binary masks onto ``image`` and outline them."""
    out = image.copy()
    colors = colors or palette(len(masks))
    for m, c in zip(masks, colors):
        m = m.astype(bool)
        if not m.any():
            continue
        out[m] = (out[m] * (1 - alpha) + np.array(c) * alpha).astype(np.uint8)
        contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, c, 1, cv2.LINE_AA)
    return out


def draw_boxes(image: np.ndarray, boxes: np.ndarray, colors=None, labels: list[str] | None = None) -> np.ndarray:
    out = image.copy()
    colors = colors or palette(len(boxes))
    for i, (b, c) in enumerate(zip(np.asarray(boxes).reshape(-1, 4), colors)):
        x1, y1, x2, y2 = (int(round(v)) for v in b)
        cv2.rectangle(out, (x1, y1), (x2, y2), c, 1, cv2.LINE_AA)
        if labels:
            cv2.putText(out, labels[i], (x1, max(0, y1 - 3)), cv2.FONT_HERSHEY_SIMPLEX, 0.4, c, 1, cv2.LINE_AA)
    return out


def draw_skeletons(
    image: np.ndarray,
    keypoints: np.ndarray,
    scores: np.ndarray | None = None,
    thr: float = 0.3,
    colors=None,
    radius: int = 2,
) -> np.ndarray:
    """Draw ``(N,K,2)`` keypoints (K = 17 or 21) with the schema's skeleton; joints with score < thr are skipped."""
    out = image.copy()
    keypoints = np.asarray(keypoints).reshape(len(keypoints), -1, 2) if len(keypoints) else np.zeros((0, 17, 2))
    k = keypoints.shape[1]
    scores = np.ones(keypoints.shape[:2]) if scores is None else np.asarray(scores)
    colors = colors or palette(len(keypoints))
    for kp, sc, c in zip(keypoints, scores, colors):
        ok = sc >= thr
        for a, b in SKELETON:
            if a < k and b < k and ok[a] and ok[b]:
                cv2.line(out, tuple(int(v) for v in kp[a]), tuple(int(v) for v in kp[b]), c, 1, cv2.LINE_AA)
        for j in range(k):
            if ok[j]:
                cv2.circle(out, (int(kp[j, 0]), int(kp[j, 1])), radius, c, -1, cv2.LINE_AA)
    return out


def draw_points(image: np.ndarray, points: np.ndarray, color=(255, 255, 255), marker: int = cv2.MARKER_STAR):
    out = image.copy()
    for p in np.asarray(points).reshape(-1, 2):
        cv2.drawMarker(out, (int(p[0]), int(p[1])), color, marker, 8, 1, cv2.LINE_AA)
    return out


def denormalize(img: np.ndarray, mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375)) -> np.ndarray:
    """(3,H,W) normalised float -> (H,W,3) RGB uint8."""
    x = np.asarray(img).transpose(1, 2, 0) * np.array(std) + np.array(mean)
    return np.clip(x, 0, 255).astype(np.uint8)


def grid(images: list[np.ndarray], cols: int = 4, pad: int = 2) -> np.ndarray:
    """Tile equally sized RGB images."""
    if not images:
        return np.zeros((8, 8, 3), np.uint8)
    h, w = images[0].shape[:2]
    rows = (len(images) + cols - 1) // cols
    out = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        out[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = im
    return out
