"""Region JPEG decoding (``structures/jpeg_region.py``) and :class:`EncodedImage`: a box decoded alone has exactly the
pixels of the same box of a full OpenCV decode, on the shared sample images (COCO baseline, AIC / MPII progressive)
and on generated files of every chroma subsampling, baseline / progressive, with / without restart markers,
grayscale, OpenCV- and Pillow-written. What it declines and how it stays safe: test_jpeg_safety.py.
"""

from __future__ import annotations

import itertools
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from bmp_lightning.structures import jpeg_region
from bmp_lightning.structures.io import EncodedImage, open_image, read_image
from bmp_lightning.structures.jpeg_region import JpegInfo, decode_jpeg_region, parse_jpeg
from bmp_lightning.structures.records import BadSampleError
from tests.structures.jpeg_helpers import (  # noqa: F401 (_pillow_big_buffers: an autouse fixture)
    ROOT,
    SAMPLINGS,
    SIZES,
    _assert_exact,
    _boxes,
    _cv2_jpeg,
    _cv2_rgb,
    _pil_jpeg,
    _pillow_big_buffers,
    _run,
    _sof_offset,
    _texture,
    needs_region,
)


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
