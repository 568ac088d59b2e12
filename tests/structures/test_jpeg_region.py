"""Region JPEG decoding (``structures/jpeg_region.py``) and :class:`EncodedImage`: a box decoded alone has exactly the
pixels of the same box of a full OpenCV decode, on the shared sample images (COCO baseline, AIC / MPII progressive)
and on generated files of every chroma subsampling, baseline / progressive, with / without restart markers,
grayscale, OpenCV- and Pillow-written. Files the module declines (PNG, truncated, CMYK, EXIF-rotated, 4:1:1, ...)
still give the right pixels through the full decode; damaged headers never end the process (a fuzz run in a
subprocess); ``BMP_JPEG_REGION=0`` turns the path off.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import re
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageFile

from bmp_lightning.structures import jpeg_region
from bmp_lightning.structures.io import EncodedImage, open_image, read_image
from bmp_lightning.structures.jpeg_region import JpegInfo, decode_jpeg_region, parse_jpeg
from bmp_lightning.structures.records import BadSampleError

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


# ---------------------------------------------------------------------------------------------- real files
@needs_region
@pytest.mark.parametrize("dataset, progressive", [("coco", False), ("aic", True), ("mpii", True)])
def test_shared_sample_images_exact(sample_data_dir: Path, dataset: str, progressive: bool):
    paths = sorted((sample_data_dir / dataset).glob("*.jpg"))
    if not paths:
        pytest.skip(f"no {dataset} images in the shared sample data")
    rng = np.random.default_rng(10)
    checked = 0
    for path in paths:
        data = path.read_bytes()
        info = parse_jpeg(data)
        assert info is not None and info.progressive == progressive and info.components == 3, path.name
        checked += _assert_exact(data, rng, 150, path.name)
        img = open_image(path)  # the dataset's entry point takes the region path too
        assert img.region_decoding and img.shape == cv2.imread(str(path)).shape
    print(f"{dataset}: {checked} boxes in {len(paths)} files")


# ---------------------------------------------------------------------------------------------- generated files
@needs_region
@pytest.mark.parametrize("progressive", [False, True], ids=["baseline", "progressive"])
@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_opencv_written_files_exact(sampling: str, progressive: bool):
    """Every size x restart interval x quality of one subsampling / coding mode."""
    rng = np.random.default_rng(20)
    checked = 0
    for (h, w), rst, quality in itertools.product(SIZES, (0, 3), (50, 95)):
        what = f"{h}x{w} {sampling} progressive={progressive} rst={rst} q={quality}"
        data = _cv2_jpeg(_texture(h, w, h * w + rst), sampling, progressive, rst, quality)
        info = parse_jpeg(data)
        if sampling == "411":  # documented decline: only the common subsamplings
            assert info is None, what
            img = EncodedImage(data)
            ref = _cv2_rgb(data)
            assert not img.region_decoding and img.shape == ref.shape
            for x0, y0, x1, y1 in _boxes(h, w, rng, 10):
                np.testing.assert_array_equal(img[y0:y1, x0:x1], ref[y0:y1, x0:x1], err_msg=what)
            continue
        assert info == JpegInfo(h, w, 3, progressive, sampling != "444", 1), what
        checked += _assert_exact(data, rng, 16, what)
    print(f"{sampling} progressive={progressive}: {checked} boxes")


@needs_region
@pytest.mark.parametrize("progressive", [False, True], ids=["baseline", "progressive"])
def test_grayscale_files_exact(progressive: bool):
    rng = np.random.default_rng(30)
    checked = 0
    for (h, w), rst, quality in itertools.product(SIZES, (0, 2), (50, 95)):
        gray = cv2.cvtColor(_texture(h, w, h + w), cv2.COLOR_RGB2GRAY)
        for data in (
            _cv2_jpeg(gray, progressive=progressive, rst=rst, quality=quality),
            _pil_jpeg(gray, progressive=progressive, quality=quality),
        ):
            assert parse_jpeg(data) == JpegInfo(h, w, 1, progressive, False, 1)
            checked += _assert_exact(data, rng, 8, f"gray {h}x{w} progressive={progressive} rst={rst}")
    print(f"gray progressive={progressive}: {checked} boxes")


@needs_region
@pytest.mark.parametrize("optimize", [False, True], ids=["", "optimize"])
@pytest.mark.parametrize("progressive", [False, True], ids=["baseline", "progressive"])
@pytest.mark.parametrize("subsampling", [0, 1, 2], ids=["444", "422", "420"])
def test_pillow_written_files_exact(subsampling: int, progressive: bool, optimize: bool):
    rng = np.random.default_rng(40)
    checked = 0
    for (h, w), quality in itertools.product(SIZES, (50, 95)):
        data = _pil_jpeg(
            _texture(h, w, 7), subsampling=subsampling, progressive=progressive, optimize=optimize, quality=quality
        )
        assert parse_jpeg(data) == JpegInfo(h, w, 3, progressive, subsampling != 0, 1)
        checked += _assert_exact(data, rng, 16, f"pillow {h}x{w} sub={subsampling} q={quality}")
    print(f"pillow subsampling={subsampling} progressive={progressive} optimize={optimize}: {checked} boxes")


def _scan_starts(data: bytes) -> list[int]:
    """Offsets of the start-of-scan markers (a progressive file has one per scan of its progression)."""
    starts, pos = [], 2
    while data[pos + 1] != 0xD9:
        end = pos + 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        if data[pos + 1] == 0xDA:
            starts.append(pos)
            end = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]").search(data, end).start()
        pos = end
    return starts


def _incomplete_progressions(data: bytes) -> list[bytes]:
    """The file cut before each of its scans after the second, closed with an end marker (what a cut download
    fixed up looks like): coefficients left unrefined, so libjpeg smooths those blocks from DC values two blocks
    away, the widest reach :data:`MARGIN` must cover."""
    return [data[:s] + b"\xff\xd9" for s in _scan_starts(data)[2:]]


@needs_region
@pytest.mark.parametrize("sampling", ["420", "422", "444"])
def test_incomplete_progression_exact(sampling: str):
    rng = np.random.default_rng(90)
    data = _cv2_jpeg(_texture(333, 517, 15), sampling, True, quality=90)
    parts = _incomplete_progressions(data)
    assert len(parts) >= 5
    checked = sum(_assert_exact(part, rng, 16, f"{sampling} cut at scan {k + 2}") for k, part in enumerate(parts))
    print(f"incomplete progression {sampling}: {checked} boxes in {len(parts)} files")


@needs_region
def test_incomplete_progression_of_a_real_file_exact(sample_data_dir: Path):
    path = sample_data_dir / "mpii" / "004645041.jpg"  # progressive 4:2:0, 1280 x 720
    if not path.is_file():
        pytest.skip(f"{path.name} not in the shared sample data")
    rng = np.random.default_rng(91)
    parts = _incomplete_progressions(path.read_bytes())
    checked = sum(_assert_exact(part, rng, 12, f"cut at scan {k + 2}") for k, part in enumerate(parts))
    print(f"incomplete progression {path.name}: {checked} boxes in {len(parts)} files")


@needs_region
def test_trailer_exif_comments_and_rgb_coding_are_fine():
    """Bytes after the end marker, an EXIF block saying 'upright', comments, JFIF, an RGB-coded file (Adobe
    marker, no YCbCr): still the region path."""
    img = _texture(120, 161, 1)
    exif = Image.Exif()
    exif[0x0112] = 1
    rng = np.random.default_rng(50)
    rgb_coded = [_pil_jpeg(img, keep_rgb=True, subsampling=0, progressive=p) for p in (False, True)]
    assert all(d[2:11] == b"\xff\xee\x00\x0eAdobe" and d[17] == 0 for d in rgb_coded)  # Adobe transform 0: RGB
    for data in (
        _cv2_jpeg(img, "420", True) + b"\x00" * 16 + b"MOTION-PHOTO-DATA\xff\xd8\xff",
        _pil_jpeg(img, exif=exif.tobytes(), comment=b"hello", progressive=True),
        _cv2_jpeg(img, "422", False, rst=1),
        *rgb_coded,
    ):
        info = parse_jpeg(data)
        assert info is not None and info.orientation == 1
        _assert_exact(data, rng, 40)
        assert EncodedImage(data).region_decoding


@needs_region
def test_threads_decode_concurrently_exact():
    data = _cv2_jpeg(_texture(240, 320, 2), "420", True, rst=2)
    ref, info = _cv2_rgb(data), parse_jpeg(data)
    boxes = _boxes(240, 320, np.random.default_rng(60), 60)

    def one(box):
        x0, y0, x1, y1 = box
        return np.array_equal(decode_jpeg_region(data, box, info, where="t.jpg"), ref[y0:y1, x0:x1])

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(one, boxes))


@needs_region
@pytest.mark.parametrize("progressive", [False, True], ids=["baseline", "progressive"])
def test_the_margin_is_needed(monkeypatch, progressive: bool):
    """With a band margin too small the box edges differ from the full decode: the exactness tests see a band cut
    too tight (the margin is what they check, not an accident of the boxes)."""
    data = _cv2_jpeg(_texture(333, 517, 3), "420", progressive)
    monkeypatch.setitem(jpeg_region.MARGIN, "progressive" if progressive else "baseline_subsampled", 0)
    with pytest.raises(AssertionError, match="not exact"):
        _assert_exact(data, np.random.default_rng(70), 100)
    if progressive:  # block smoothing of an incomplete progression reaches 2 chroma blocks (32 px) + upsampling
        part = _incomplete_progressions(_cv2_jpeg(_texture(333, 517, 15), "420", True, quality=90))[0]
        monkeypatch.setitem(jpeg_region.MARGIN, "progressive", 32)
        with pytest.raises(AssertionError, match="not exact"):
            _assert_exact(part, np.random.default_rng(90), 40)


def test_box_outside_the_image_is_a_value_error():
    if not jpeg_region.available():
        pytest.skip("region decoding unavailable")
    data = _cv2_jpeg(_texture(20, 30, 4))
    info = parse_jpeg(data)
    for box in [(0, 0, 31, 20), (0, 0, 30, 21), (-1, 0, 5, 5), (5, 5, 5, 6), (3, 4, 2, 6)]:
        with pytest.raises(ValueError, match="outside the 30x20 image"):
            decode_jpeg_region(data, box, info)


# ---------------------------------------------------------------------------------------------- declines
def test_png_and_non_jpeg_bytes_are_declined():
    img = _texture(37, 53, 5)
    png = cv2.imencode(".png", cv2.cvtColor(img, cv2.COLOR_RGB2BGR))[1].tobytes()
    for data in (png, b"", b"\xff\xd8", b"\xff\xd8\xff\xd9", np.random.default_rng(0).bytes(3000)):
        assert parse_jpeg(data) is None
    assert decode_jpeg_region(png, (0, 0, 5, 5)) is None
    enc = EncodedImage(png, "a.png")
    assert not enc.region_decoding and enc.shape == (37, 53, 3)
    np.testing.assert_array_equal(enc[3:20, 7:40], img[3:20, 7:40])


@pytest.mark.parametrize("progressive", [False, True], ids=["baseline", "progressive"])
def test_truncated_jpeg_is_declined_and_refused(tmp_path: Path, progressive: bool):
    data = _cv2_jpeg(_texture(64, 96, 6), "420", progressive, rst=2)
    sos = data.index(b"\xff\xda")
    for cut in [3, 20, sos, sos + 5, sos + 40, len(data) // 2, len(data) - 2, len(data) - 1]:
        part = data[:cut]
        assert parse_jpeg(part) is None, cut
        assert decode_jpeg_region(part, (0, 0, 8, 8)) is None
        path = tmp_path / f"cut{cut}.jpg"
        path.write_bytes(part)
        with pytest.raises(BadSampleError, match="truncated JPEG") as refused:
            read_image(path, where="ann.json, image id 7")
        with pytest.raises(BadSampleError) as also_refused:
            open_image(path, where="ann.json, image id 7")
        assert str(also_refused.value) == str(refused.value)  # the same message, naming file and entry


def test_cmyk_jpeg_is_declined_and_decoded_whole():
    rgb = _texture(41, 67, 8)
    buf = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(buf, "JPEG", quality=95)
    data = buf.getvalue()
    assert parse_jpeg(data) is None
    assert decode_jpeg_region(data, (0, 0, 4, 4)) is None
    enc, ref = EncodedImage(data), _cv2_rgb(data)
    assert not enc.region_decoding and enc.shape == ref.shape == (41, 67, 3)
    np.testing.assert_array_equal(enc[5:30, 10:60], ref[5:30, 10:60])


def test_exif_rotated_jpeg_is_declined_and_decoded_rotated(tmp_path: Path):
    """Orientation 6 (rotate 90 degrees clockwise): OpenCV applies it, so the region path must not be taken."""
    rgb = _texture(40, 70, 9)  # stored 40 x 70, shown 70 x 40
    exif = Image.Exif()
    exif[0x0112] = 6
    for progressive in (False, True):
        data = _pil_jpeg(rgb, exif=exif.tobytes(), quality=95, progressive=progressive)
        info = parse_jpeg(data)
        assert info is not None and info.orientation == 6 and (info.height, info.width) == (40, 70)
        assert decode_jpeg_region(data, (0, 0, 10, 10), info) is None
        path = tmp_path / "rot.jpg"
        path.write_bytes(data)
        ref = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        assert ref.shape == (70, 40, 3)
        enc = open_image(path)
        assert not enc.region_decoding and enc.shape == (70, 40, 3)
        np.testing.assert_array_equal(enc[:, :], ref)
        np.testing.assert_array_equal(enc[10:60, 5:30], ref[10:60, 5:30])
        np.testing.assert_array_equal(np.asarray(enc), read_image(path))


def _with_exif_orientation(data: bytes, orientation: int, order: str) -> bytes:
    """``data`` with a hand-made EXIF block (byte order ``"II"`` or ``"MM"``) holding only the orientation tag."""
    bo = "little" if order == "II" else "big"
    tiff = order.encode() + (42).to_bytes(2, bo) + (8).to_bytes(4, bo) + (1).to_bytes(2, bo)
    tiff += (0x0112).to_bytes(2, bo) + (3).to_bytes(2, bo) + (1).to_bytes(4, bo)  # SHORT, count 1
    tiff += orientation.to_bytes(2, bo) + b"\x00\x00" + (0).to_bytes(4, bo)  # value (left-justified), no next IFD
    payload = b"Exif\x00\x00" + tiff
    return data[:2] + b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload + data[2:]


@pytest.mark.parametrize("order", ["II", "MM"])
def test_every_exif_orientation_follows_opencv(order: str):
    """OpenCV applies all 8 orientations (either byte order): only 1 takes the region path, the rest are decoded
    whole and rotated / mirrored exactly as ``cv2.imdecode``."""
    data = _cv2_jpeg(_texture(24, 40, 16), "420")
    for orientation in range(1, 9):
        tagged = _with_exif_orientation(data, orientation, order)
        assert parse_jpeg(tagged).orientation == orientation
        enc, ref = EncodedImage(tagged), _cv2_rgb(tagged)
        assert ref.shape == ((24, 40, 3) if orientation <= 4 else (40, 24, 3))
        assert enc.shape == ref.shape and enc.region_decoding == (orientation == 1 and jpeg_region.available())
        np.testing.assert_array_equal(enc[:, :], ref, err_msg=f"orientation {orientation}")
        np.testing.assert_array_equal(enc[3:17, 5:21], ref[3:17, 5:21], err_msg=f"orientation {orientation}")


def _with_xmp(data: bytes) -> bytes:
    payload = b"http://ns.adobe.com/xap/1.0/\x00<x:xmpmeta/>"
    return data[:2] + b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload + data[2:]


@pytest.mark.parametrize(
    "blocks",
    [
        (6, 1),
        (1, 6),
        ("xmp", 6),
    ],
    ids=["exif6-then-exif1", "exif1-then-exif6", "xmp-then-exif6"],
)
def test_several_app1_blocks_follow_opencv(blocks: tuple):
    """A file with two APP1 blocks (edited photos: EXIF twice, or XMP before EXIF): the pixels and shape are still
    OpenCV's, whichever block it reads the orientation from."""
    data = _cv2_jpeg(_texture(24, 40, 17), "420")
    for block in reversed(blocks):  # the first listed ends up first in the file
        data = _with_xmp(data) if block == "xmp" else _with_exif_orientation(data, block, "II")
    enc, ref = EncodedImage(data), _cv2_rgb(data)
    assert enc.shape == ref.shape
    np.testing.assert_array_equal(enc[:, :], ref)
    np.testing.assert_array_equal(enc[2:20, 3:22], ref[2:20, 3:22])


@pytest.mark.parametrize(
    "edit",
    ["12-bit", "arithmetic SOF9", "lossless SOF3", "hierarchical SOF5", "2 components", "4:1:1 luma", "DNL height 0"],
)
def test_unsupported_frames_are_declined(edit: str):
    """Frames libjpeg-turbo would refuse or this module does not take, made by editing a baseline file's SOF."""
    data = bytearray(_cv2_jpeg(_texture(24, 40, 11), "420"))
    sof = _sof_offset(data)
    if edit == "12-bit":
        data[sof + 4] = 12
    elif edit.startswith(("arithmetic", "lossless", "hierarchical")):
        data[sof + 1] = {"arithmetic SOF9": 0xC9, "lossless SOF3": 0xC3, "hierarchical SOF5": 0xC5}[edit]
    elif edit == "2 components":
        data[sof + 9] = 2
    elif edit == "4:1:1 luma":
        data[sof + 11] = 0x41
    elif edit == "DNL height 0":
        data[sof + 5 : sof + 7] = b"\x00\x00"
    data = bytes(data)
    assert parse_jpeg(data) is None
    assert decode_jpeg_region(data, (0, 0, 4, 4)) is None


# ---------------------------------------------------------------------------------------------- EncodedImage
@needs_region
def test_encoded_image_region_first(tmp_path: Path):
    path = tmp_path / "a.jpg"
    path.write_bytes(_cv2_jpeg(_texture(333, 517, 12), "420", True, rst=3))
    ref = read_image(path)
    img = open_image(path, where="ann.json, image id 3")
    assert img.region_decoding and img.shape == ref.shape == cv2.imread(str(path)).shape
    rng = np.random.default_rng(80)
    for x0, y0, x1, y1 in _boxes(333, 517, rng, 40):
        np.testing.assert_array_equal(img[y0:y1, x0:x1], ref[y0:y1, x0:x1])
    for key in (np.s_[:, :], np.s_[-10:, -7:], np.s_[100:10000, 3:], np.s_[5:6, 7:8], np.s_[0:333:1, :-1]):
        got = img[key]
        assert got.shape == ref[key].shape and np.array_equal(got, ref[key]), key
    assert img.region_decoding  # none of these decoded the whole image
    # anything but two step-1 slices indexes the whole decoded image
    for key in (np.s_[10], np.s_[::2, ::3], np.s_[10:5, :], np.s_[4:9, 2], np.s_[..., 0], np.s_[:, :, ::-1]):
        got = img[key]
        assert got.shape == ref[key].shape and np.array_equal(got, ref[key]), key
    np.testing.assert_array_equal(np.asarray(img), ref)
    np.testing.assert_array_equal(np.asarray(img, dtype=np.float32), ref.astype(np.float32))
    assert img.full() is img.full()  # decoded once


def test_fallback_boxes_are_views_of_the_full_decode(tmp_path: Path):
    path = tmp_path / "a.png"
    rgb = _texture(50, 60, 13)
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    img = open_image(path)
    assert not img.region_decoding and img.shape == (50, 60, 3)
    box = img[10:20, 5:45]
    assert np.shares_memory(box, img.full()) and np.array_equal(box, rgb[10:20, 5:45])
    np.testing.assert_array_equal(np.asarray(img), read_image(path))


def test_bad_files_are_refused_like_read_image(tmp_path: Path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "random.jpg").write_bytes(np.random.default_rng(1).bytes(5000))
    (tmp_path / "header_only.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    for name, msg in [
        ("missing.jpg", r"image not found: .*missing\.jpg \(ann\.json, image id 7\)"),
        ("empty.jpg", r"image unreadable or corrupt: .*empty\.jpg \(ann\.json, image id 7\): empty file"),
        ("random.jpg", r"image unreadable or corrupt: .*random\.jpg \(ann\.json, image id 7\)"),
        ("header_only.jpg", r"header_only\.jpg \(ann\.json, image id 7\): truncated JPEG"),
    ]:
        with pytest.raises(BadSampleError, match=msg) as refused:
            read_image(tmp_path / name, where="ann.json, image id 7")
        with pytest.raises(BadSampleError, match=msg) as also_refused:
            open_image(tmp_path / name, where="ann.json, image id 7")
        assert str(also_refused.value) == str(refused.value)
        assert also_refused.value.kind == refused.value.kind


# ------------------------------------------------------------------------------------------ off switch, fatal errors
_OFF_SWITCH = """
import json, sys
import cv2, numpy as np
from bmp_lightning.structures import jpeg_region
from bmp_lightning.structures.io import EncodedImage
data = open(sys.argv[1], "rb").read()
ref = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
img = EncodedImage(data)
boxes = [(0, 0, 517, 333), (10, 20, 11, 21), (500, 300, 517, 333), (100, 50, 260, 200)]
same = all(np.array_equal(img[y0:y1, x0:x1], ref[y0:y1, x0:x1]) for x0, y0, x1, y1 in boxes)
print(json.dumps({"available": jpeg_region.available(), "region": img.region_decoding, "same": same,
                  "decoded": jpeg_region.decode_jpeg_region(data, (0, 0, 4, 4)) is not None}))
"""


@needs_region
def test_off_switch(tmp_path: Path):
    path = tmp_path / "a.jpg"
    path.write_bytes(_cv2_jpeg(_texture(333, 517, 14), "420", True))
    results = {}
    for value in ("0", "1"):
        proc = _run(_OFF_SWITCH, str(path), env={"BMP_JPEG_REGION": value})
        assert proc.returncode == 0, proc.stderr
        results[value] = json.loads(proc.stdout.splitlines()[-1])
    assert results["0"] == {"available": False, "region": False, "same": True, "decoded": False}
    assert results["1"] == {"available": True, "region": True, "same": True, "decoded": True}


def test_pillow_wheel_library_is_found():
    """Where Pillow is the manylinux wheel (its libraries in pillow.libs), the region path is on."""
    import PIL

    libs = Path(PIL.__file__).resolve().parents[1] / "pillow.libs"
    if not sys.platform.startswith("linux") or not list(libs.glob("libjpeg*.so.62*")):
        pytest.skip("Pillow without a bundled libjpeg-turbo")
    if os.environ.get("BMP_JPEG_REGION") == "0":
        pytest.skip("BMP_JPEG_REGION=0 in this environment")
    assert jpeg_region.available()
    assert re.search(r"libjpeg.*\.so\.62", jpeg_region._library().path)


_FATAL = """
import sys
import cv2, numpy as np
from bmp_lightning.structures.jpeg_region import JpegInfo, decode_jpeg_region, parse_jpeg
data = cv2.imencode(".jpg", np.full((16, 16, 3), 90, np.uint8))[1].tobytes()
no_dqt = data
while b"\\xff\\xdb" in no_dqt:  # drop the quantisation tables (one segment each)
    i = no_dqt.index(b"\\xff\\xdb")
    no_dqt = no_dqt[:i] + no_dqt[i + 2 + int.from_bytes(no_dqt[i + 2 : i + 4], "big") :]
assert b"\\xff\\xdb" not in no_dqt and parse_jpeg(no_dqt) is None  # the pre-check declines it...
forced = JpegInfo(16, 16, 3, False, False, 1)
decode_jpeg_region(no_dqt, (0, 0, 4, 4), forced, where="data/bad.jpg")  # ...forced through
print("returned")
"""


@needs_region
def test_fatal_libjpeg_error_ends_the_process_naming_the_file():
    """A file without quantisation tables forced past the pre-check: libjpeg's fatal error must stop the process
    with exit code 70 and the file named, not return into undefined state."""
    proc = _run(_FATAL)
    assert proc.returncode == 70, (proc.returncode, proc.stdout, proc.stderr)
    assert "returned" not in proc.stdout
    assert "fatal libjpeg error in region decoding of data/bad.jpg" in proc.stderr
    assert "BMP_JPEG_REGION=0" in proc.stderr


# ---------------------------------------------------------------------------------------------- fuzz
_FUZZ = r"""
import json, re, resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))  # a runaway allocation fails (exit 70), not the machine
import cv2, numpy as np
from PIL import Image, ImageFile
from bmp_lightning.structures.io import EncodedImage
from bmp_lightning.structures.records import BadSampleError

ImageFile.MAXBLOCK = 1 << 24
NEXT = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
n_mutants, budget_s, real = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3:]
rng = np.random.default_rng(0)

def texture(h, w):
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 2, yy * 3, (xx ^ yy) & 255], -1) + rng.integers(0, 30, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)

def cv2_jpeg(img, sampling, progressive, rst):
    params = [cv2.IMWRITE_JPEG_PROGRESSIVE, progressive, cv2.IMWRITE_JPEG_RST_INTERVAL, rst,
              cv2.IMWRITE_JPEG_SAMPLING_FACTOR, sampling]
    return cv2.imencode(".jpg", img, params)[1].tobytes()

def pil_jpeg(img, **kw):
    import io
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", **kw)
    return buf.getvalue()

sources = [
    cv2_jpeg(texture(96, 128), cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420, 0, 2),
    cv2_jpeg(texture(96, 128), cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420, 1, 0),
    cv2_jpeg(texture(57, 83), cv2.IMWRITE_JPEG_SAMPLING_FACTOR_422, 1, 3),
    pil_jpeg(texture(80, 72), subsampling=0, progressive=True, optimize=True),
    pil_jpeg(texture(64, 40)[..., 0], progressive=True),
] + [open(p, "rb").read() for p in real]

def segments(d):
    # (marker, start, end) of each marker segment before EOI (an SOS: its header), and the entropy-coded spans
    segs, scans, pos = [], [], 2
    while pos + 4 <= len(d) and d[pos] == 0xFF:
        m = d[pos + 1]
        if m == 0xD9:
            break
        if m == 0xFF or 0xD0 <= m <= 0xD7 or m == 1:
            pos += 1 if m == 0xFF else 2
            continue
        end = pos + 2 + (d[pos + 2] << 8 | d[pos + 3])
        segs.append((m, pos, end))
        pos = end
        if m == 0xDA:
            nxt = NEXT.search(d, pos)
            scans.append((pos, nxt.start()))
            pos = nxt.start()
    return segs, scans

def mutate(d):
    segs, scans = segments(d)
    progressive = any(m == 0xC2 for m, _, _ in segs)
    pool = segs
    if progressive and rng.random() < 0.7:  # scans, tables: the progression's checks
        pool = [s for s in segs if s[0] in (0xDA, 0xC4, 0xDB)]
    m, a, b = pool[rng.integers(len(pool))]
    d = bytearray(d)
    kinds = ["overwrite"] * 5 + ["insert", "delete", "truncate", "cut+EOI", "drop", "dup", "entropy", "huffman"]
    kind = rng.choice(kinds)
    if kind == "huffman":  # a code length moved in a Huffman table: same size, maybe not a valid code any more
        dhts = [s for s in segs if s[0] == 0xC4]
        if not dhts:
            kind = "overwrite"
        else:
            m, a, b = dhts[rng.integers(len(dhts))]
            i, j = a + 5 + rng.integers(16, size=2)
            if d[i] > 0:
                d[i] -= 1
                d[j] += 1
    if kind == "overwrite":
        for _ in range(rng.integers(1, 4)):
            i = int(rng.integers(a, b))
            d[i] = int(rng.choice([rng.integers(256), d[i] ^ (1 << rng.integers(8)), 0, 255, (d[i] + 1) & 255]))
    elif kind == "insert":
        i = int(rng.integers(a, b + 1))
        d[i:i] = rng.bytes(int(rng.integers(1, 9)))
    elif kind == "delete":
        i = int(rng.integers(a, b))
        del d[i : i + int(rng.integers(1, 9))]
    elif kind == "truncate":
        d = d[: int(rng.integers(2, len(d)))]
    elif kind == "cut+EOI":  # a cut the truncation check does not see
        d = d[: int(rng.integers(2, len(d)))] + b"\xff\xd9"
    elif kind == "drop":
        del d[a:b]
    elif kind == "dup":
        d[b:b] = d[a:b]
    else:
        s0, s1 = scans[rng.integers(len(scans))]
        for _ in range(rng.integers(1, 6)):
            if s1 > s0:
                d[int(rng.integers(s0, s1))] = int(rng.integers(256))
    return bytes(d), kind

stats = {"mutants": 0, "region": 0, "declined": 0, "refused": 0, "boxes": 0, "box_errors": 0,
         "region_differs": 0, "region_where_cv2_fails": 0, "kinds": {}}
t0 = time.time()
for k in range(n_mutants):
    if time.time() - t0 > budget_s:
        break
    data, kind = mutate(sources[k % len(sources)])
    stats["mutants"] += 1
    stats["kinds"][kind] = stats["kinds"].get(kind, 0) + 1
    try:
        img = EncodedImage(data, f"mutant{k}.jpg", kind)
    except BadSampleError:
        stats["refused"] += 1
        continue
    stats["region" if img.region_decoding else "declined"] += 1
    h, w = img.shape[:2]
    bw, bh = min(w, int(rng.integers(1, 65))), min(h, int(rng.integers(1, 65)))
    x, y = int(rng.integers(w - bw + 1)), int(rng.integers(h - bh + 1))
    boxes = [(x, y, x + bw, y + bh), (0, 0, min(w, 16), min(h, 16)), (0, h - min(h, 8), w, h)]
    got = []
    for x0, y0, x1, y1 in boxes:
        stats["boxes"] += 1
        try:
            got.append(img[y0:y1, x0:x1])
        except (BadSampleError, ValueError):
            stats["box_errors"] += 1
            got.append(None)
    if img.region_decoding and h * w <= 4_000_000:  # for the record: damaged data vs OpenCV's full decode
        full = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        if full is None:
            stats["region_where_cv2_fails"] += 1
        else:
            full = cv2.cvtColor(full, cv2.COLOR_BGR2RGB)
            stats["region_differs"] += any(
                g is not None and not np.array_equal(g, full[y0:y1, x0:x1]) for g, (x0, y0, x1, y1) in zip(got, boxes)
            )
stats["seconds"] = round(time.time() - t0, 2)
print(json.dumps(stats))
"""


@needs_region
def test_fuzz_damaged_headers_never_crash(shared_dir_or_none):
    """3000 mutants of real and generated files (header / table / scan-header bytes overwritten, inserted,
    deleted, segments dropped or repeated, cuts, damaged scans) through ``EncodedImage``: each is decoded by region,
    declined to the full decode, or refused with a BadSampleError; the process never dies."""
    real = []
    if shared_dir_or_none is not None:
        for rel in ("coco/000000040083.jpg", "mpii/052475643.jpg", "aic/054d9ce9201beffc76e5ff2169d2af2f027002ca.jpg"):
            if (shared_dir_or_none / rel).is_file():
                real.append(str(shared_dir_or_none / rel))
    proc = _run(_FUZZ, "3000", "15", *real, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-3000:]}"
    stats = json.loads(proc.stdout.splitlines()[-1])
    print(stats)
    assert stats["mutants"] >= 500
    assert stats["region"] > 0.2 * stats["mutants"] and stats["declined"] + stats["refused"] > 0.2 * stats["mutants"]


@pytest.fixture
def shared_dir_or_none(request) -> Path | None:
    try:
        return request.getfixturevalue("sample_data_dir")
    except pytest.skip.Exception:
        return None


# ---------------------------------------------------------------------------------------------- known bugs
def _claim_size(data: bytes, h: int, w: int) -> bytes:
    """The same JPEG with its frame header claiming ``h`` x ``w`` (what a bit flip in a real file does)."""
    d, sof = bytearray(data), _sof_offset(data)
    d[sof + 5 : sof + 9] = h.to_bytes(2, "big") + w.to_bytes(2, "big")
    return bytes(d)


def test_read_image_refuses_a_header_claiming_a_huge_image(tmp_path: Path):
    path = tmp_path / "huge.jpg"
    path.write_bytes(_claim_size(_cv2_jpeg(np.full((64, 64, 3), 128, np.uint8)), 65500, 65500))
    with pytest.raises(BadSampleError, match=r"huge\.jpg"):
        read_image(path)


_HUGE = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))  # progressive: libjpeg's coefficient buffer, 25 GB
from bmp_lightning.structures.io import open_image
from bmp_lightning.structures.records import BadSampleError
try:
    img = open_image(sys.argv[1])
    img[0:8, 0:8]
    print("pixels")
except BadSampleError as e:
    print("refused", e)
"""


@needs_region
@pytest.mark.parametrize("progressive", [False, True], ids=["baseline", "progressive"])
def test_region_path_refuses_a_header_claiming_a_huge_image(tmp_path: Path, progressive: bool):
    path = tmp_path / "huge.jpg"
    path.write_bytes(_claim_size(_cv2_jpeg(np.full((64, 64, 3), 128, np.uint8), progressive=progressive), 65500, 65500))
    proc = _run(_HUGE, str(path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("refused") and "huge.jpg" in proc.stdout


@needs_region
def test_a_library_of_another_struct_layout_is_refused(monkeypatch):
    """The binding checks libjpeg's ABI version and struct size at load (jpeg_CreateDecompress's own check, probed
    with a returning error handler): a mismatch refuses the library (whole images are then decoded) instead of
    running on a wrong layout."""
    import ctypes

    lib = jpeg_region._library()
    jpeg_region._Lib(lib.path)  # the real layout passes

    class Wider(ctypes.Structure):
        _fields_ = [*jpeg_region._Decompress._fields_, ("extra", ctypes.c_long)]

    monkeypatch.setattr(jpeg_region, "_Decompress", Wider)
    with pytest.raises(OSError, match="not the libjpeg ABI 62"):
        jpeg_region._Lib(lib.path)
