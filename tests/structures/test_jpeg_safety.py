"""Region JPEG decoding (``structures/jpeg_region.py``) is safe: files it declines (PNG, truncated, CMYK,
EXIF-rotated, 4:1:1, unsupported frames, huge size fields) still give the right pixels through the full decode;
damaged headers never end the process (a fuzz run in a subprocess); a fatal libjpeg error that gets past the
pre-check ends the process naming the file; ``BMP_JPEG_REGION=0`` turns the path off; a library of another struct
layout is refused.
"""

from __future__ import annotations

import io
import json
import os
import re
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from bmp_lightning.structures import jpeg_region
from bmp_lightning.structures.io import EncodedImage, open_image, read_image
from bmp_lightning.structures.jpeg_region import decode_jpeg_region, parse_jpeg
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
