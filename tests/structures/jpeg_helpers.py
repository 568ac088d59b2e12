"""Helpers of the region JPEG decoder tests (test_jpeg_region.py, test_jpeg_safety.py): JPEGs written by OpenCV and
Pillow, boxes that stress the band edges, the bit-for-bit comparison with OpenCV's full decode, a fresh interpreter."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageFile

from bmp_lightning.structures import jpeg_region
from bmp_lightning.structures.jpeg_region import decode_jpeg_region, parse_jpeg

ROOT = Path(__file__).resolve().parents[2]

needs_region = pytest.mark.skipif(
    not jpeg_region.available(), reason="region decoding unavailable (no libjpeg-turbo in Pillow, or BMP_JPEG_REGION=0)"
)

# the chroma subsamplings OpenCV can write (4:1:1 is declined by the module: only 1x1, 2x1, 1x2, 2x2 luma factors)
SAMPLINGS = [s for s in ("444", "422", "420", "440", "411") if hasattr(cv2, f"IMWRITE_JPEG_SAMPLING_FACTOR_{s}")]
SIZES = [(333, 517), (1, 1), (9, 17), (17, 9), (31, 700), (700, 31)]  # (height, width): odd, tiny, wide, tall


# ---------------------------------------------------------------------------------------------- helpers
def _cv2_rgb(data: bytes) -> np.ndarray:
    """What ``read_image`` returns: OpenCV's full decode, RGB."""
    return cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def _texture(h: int, w: int, seed: int) -> np.ndarray:
    """RGB uint8 with what stresses the band edges: gradients, noise, a checkerboard of sharp edges, a saturated
    disc (strong chroma edges, where upsampling across a band edge would show)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) % 64 * 4], -1).astype(np.int16)
    img += rng.integers(-40, 41, img.shape, dtype=np.int16)
    img[(xx // 7 + yy // 11) % 2 == 0] ^= 0x80
    img[(xx - w / 3) ** 2 + (yy - h / 2) ** 2 < (min(h, w) / 4) ** 2] = (255, 0, 40)
    return np.clip(img, 0, 255).astype(np.uint8)


def _cv2_jpeg(img: np.ndarray, sampling: str = "420", progressive: bool = False, rst: int = 0, quality: int = 95):
    params = [cv2.IMWRITE_JPEG_QUALITY, quality, cv2.IMWRITE_JPEG_PROGRESSIVE, int(progressive)]
    params += [cv2.IMWRITE_JPEG_RST_INTERVAL, rst]
    if img.ndim == 3:
        params += [cv2.IMWRITE_JPEG_SAMPLING_FACTOR, getattr(cv2, f"IMWRITE_JPEG_SAMPLING_FACTOR_{sampling}")]
    ok, enc = cv2.imencode(".jpg", img, params)
    assert ok
    return enc.tobytes()


def _pil_jpeg(img: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", **kw)
    return buf.getvalue()


def _boxes(h: int, w: int, rng: np.random.Generator, n: int) -> list[tuple[int, int, int, int]]:
    """``(x0, y0, x1, y1)`` half-open: the whole image, 1-px boxes at the 4 corners, 1-px strips along the 4 edges,
    then ``n`` random ones (a quarter 1-px, a quarter small, the rest spanning, most of them touching an edge)."""
    out = [(0, 0, w, h), (0, 0, 1, 1), (w - 1, 0, w, 1), (0, h - 1, 1, h), (w - 1, h - 1, w, h)]
    out += [(0, 0, w, 1), (0, h - 1, w, h), (0, 0, 1, h), (w - 1, 0, w, h)]
    for k in range(n):
        if k % 4 == 0:  # one pixel
            x, y = int(rng.integers(w)), int(rng.integers(h))
            out.append((x, y, x + 1, y + 1))
            continue
        if k % 4 == 1:  # small, anywhere
            bw, bh = int(rng.integers(1, min(w, 48) + 1)), int(rng.integers(1, min(h, 48) + 1))
            x, y = int(rng.integers(w - bw + 1)), int(rng.integers(h - bh + 1))
            out.append((x, y, x + bw, y + bh))
            continue
        x0, x1 = sorted(int(v) for v in rng.integers(0, w + 1, 2))
        y0, y1 = sorted(int(v) for v in rng.integers(0, h + 1, 2))
        side = int(rng.integers(6))  # 0-3: pushed against that edge; 4, 5: left inside
        x0, y0, x1, y1 = [
            0 if side == 0 else x0,
            0 if side == 1 else y0,
            w if side == 2 else x1,
            h if side == 3 else y1,
        ]
        x0, y0 = min(x0, w - 1), min(y0, h - 1)
        out.append((x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)))
    return out


def _assert_exact(data: bytes, rng: np.random.Generator, n: int, what: str = "") -> int:
    """Decode boxes of ``data`` alone and compare each with the same box of OpenCV's full decode, bit for bit;
    fails naming every box that differs (and by how much). Returns the number of boxes checked."""
    info = parse_jpeg(data)
    ref = _cv2_rgb(data)
    assert info is not None, f"{what}: declined"
    assert (info.height, info.width) == ref.shape[:2]
    boxes = _boxes(info.height, info.width, rng, n)
    bad = []
    for x0, y0, x1, y1 in boxes:
        got = decode_jpeg_region(data, (x0, y0, x1, y1), info)
        want = ref[y0:y1, x0:x1]
        if got is None or got.shape != want.shape:
            bad.append(f"box {(x0, y0, x1, y1)}: got {None if got is None else got.shape}, want {want.shape}")
        elif not np.array_equal(got, want):
            diff = np.abs(got.astype(int) - want)
            bad.append(f"box {(x0, y0, x1, y1)}: {np.count_nonzero(diff.max(-1))} px differ, max |diff| {diff.max()}")
    assert not bad, f"{what}: {len(bad)}/{len(boxes)} boxes not exact: " + "; ".join(bad[:5])
    return len(boxes)


def _sof_offset(data: bytes) -> int:
    """Where the frame header (SOF0 / SOF2) starts: the segments before it walked by their lengths."""
    pos = 2
    while data[pos + 1] not in (0xC0, 0xC2):
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return pos


def _run(script: str, *args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``script`` in a fresh interpreter on this checkout (a fatal libjpeg error or a crash ends it, not pytest)."""
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=full_env,
    )


@pytest.fixture(autouse=True)
def _pillow_big_buffers(monkeypatch):
    # Pillow's progressive / optimized writer into BytesIO needs the whole file in one buffer ("Suspension not
    # allowed here" on noisy images otherwise)
    monkeypatch.setattr(ImageFile, "MAXBLOCK", 1 << 24)
