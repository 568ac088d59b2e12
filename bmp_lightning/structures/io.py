"""Image reading: RGB uint8 everywhere in the project (the detector flips to BGR itself).

A truncated JPEG is the one broken file OpenCV does not refuse: libjpeg only warns ("Premature end of JPEG file")
and ``cv2.imread`` returns the image with the missing part filled in gray. :func:`check_image_bytes` finds it from
the file's bytes (the JPEG segment structure must reach its end-of-image marker) before decoding; every other
broken file (random bytes, empty, truncated PNG / WebP / BMP / TIFF) already fails to decode.
"""

from __future__ import annotations

import os

import cv2
import numpy as np

from bmp_lightning.structures import jpeg_region
from bmp_lightning.structures.jpeg_header import next_marker
from bmp_lightning.structures.records import BadSampleError

_CORRUPT = "image unreadable or corrupt"  # the BadSampleError kind (skip reports)
_JPEG_SOI = b"\xff\xd8"
_JPEG_STANDALONE = frozenset([0x01, *range(0xD0, 0xD8)])  # TEM and RST0-7 carry no length


def jpeg_end(data: bytes | memoryview) -> int | None:
    """Offset just past the end-of-image marker (FFD9) of the JPEG in ``data``; ``None`` when it is cut short.

    Walks the segments from the start-of-image marker (skipping each by its length, so an EXIF thumbnail's own
    FFD9 is not taken for the end) and each scan's entropy-coded data to the next marker, as a decoder does. Data
    after the end marker (camera trailers, motion photos) is allowed. Cost: one vectorised pass over the scans.
    """
    n = len(data)
    if n < 4 or bytes(data[:2]) != _JPEG_SOI:
        return None
    pos = 2
    while pos + 1 < n:
        if data[pos] != 0xFF:
            return None  # not a marker where one must be: a damaged file
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xD9:
            return pos + 2
        if marker in _JPEG_STANDALONE:
            pos += 2
            continue
        if pos + 4 > n:
            return None
        end = pos + 2 + ((data[pos + 2] << 8) | data[pos + 3])
        if end > n:
            return None
        pos = end
        if marker == 0xDA:  # start of scan: entropy-coded data up to the next marker
            pos = next_marker(data, pos)
            if pos < 0:
                return None
    return None


def check_image_bytes(data: bytes | memoryview, path: str = "", where: str = "") -> None:
    """Raise :class:`BadSampleError` naming ``path`` when the bytes cannot be a whole image.

    Empty files and truncated JPEGs are caught here; other damage is left to the decoder, which refuses it.
    """
    ctx = f" ({where})" if where else ""
    if len(data) == 0:
        raise BadSampleError(f"image unreadable or corrupt: {path}{ctx}: empty file", kind=_CORRUPT)
    if bytes(data[:2]) == _JPEG_SOI and jpeg_end(data) is None:
        raise BadSampleError(
            f"image unreadable or corrupt: {path}{ctx}: truncated JPEG (no end-of-image marker)", kind=_CORRUPT
        )


def decode_image(data: bytes | memoryview, path: str = "", where: str = "") -> np.ndarray:
    """Checked bytes of an image file -> ``(H, W, 3)`` RGB uint8 (EXIF orientation applied, as ``cv2.imread``)."""
    check_image_bytes(data, path, where)
    ctx = f" ({where})" if where else ""
    try:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    except cv2.error as err:  # e.g. a size field beyond OpenCV's pixel limit
        raise BadSampleError(f"image unreadable or corrupt: {path}{ctx}: {err.err}", kind=_CORRUPT) from err
    if img is None or img.size == 0:
        raise BadSampleError(f"image unreadable or corrupt: {path}{ctx}", kind=_CORRUPT)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def read_image(path: str | os.PathLike, where: str = "") -> np.ndarray:
    """Read an image file as an ``(H, W, 3)`` RGB uint8 array; :class:`BadSampleError` naming the file (and
    ``where``, e.g. the annotation entry) when it is missing, empty, truncated or does not decode."""
    path = os.fspath(path)
    return decode_image(_read_bytes(path, where), path, where)


def _read_bytes(path: str, where: str) -> bytes:
    if not os.path.isfile(path):
        ctx = f" ({where})" if where else ""
        raise BadSampleError(f"image not found: {path}{ctx}", kind="image not found")
    with open(path, "rb") as f:
        return f.read()


class EncodedImage:
    """An image file's checked bytes, decoded on demand: whole, or only the box a crop reads.

    What region-first pipelines receive as ``sample["img"]`` (:class:`~bmp_lightning.data.pipeline.RoiCompose`):
    ``shape`` comes from the JPEG header and ``img[y0:y1, x0:x1]`` decodes that box only
    (:func:`~bmp_lightning.structures.jpeg_region.decode_jpeg_region`), with exactly the pixels the same box of
    :func:`read_image` has. Files the region decoder does not take (PNG, CMYK, EXIF-rotated, 12-bit, ...) or a
    platform without it: the whole image is decoded once, at construction, and boxes are views of it.
    """

    __slots__ = ("data", "path", "where", "info", "_full", "shape")

    def __init__(self, data: bytes, path: str = "", where: str = "") -> None:
        self.data, self.path, self.where = data, path, where
        self._full: np.ndarray | None = None
        self.info = jpeg_region.parse_jpeg(data) if jpeg_region.available() else None
        if self.info is not None and self.info.orientation == 1:
            self.shape = (self.info.height, self.info.width, 3)
        else:  # checks the bytes (truncation, ...) and decodes everything
            self._full = decode_image(data, path, where)
            self.shape = self._full.shape

    def _name(self) -> str:
        return f"{self.path} ({self.where})" if self.where else self.path or "<bytes>"

    @property
    def region_decoding(self) -> bool:
        """Whether boxes are decoded on their own (else they are cut from the whole decoded image)."""
        return self._full is None

    def full(self) -> np.ndarray:
        """The whole ``(H, W, 3)`` RGB uint8 image (decoded once, then kept)."""
        if self._full is None:
            self._full = decode_image(self.data, self.path, self.where)
        return self._full

    def decode_into(self, out: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
        """Write the pixels of ``box = (x0, y0, x1, y1)`` into the image-sized ``out`` at their place (only the box
        is guaranteed; nearby pixels may be written too) and return ``out``."""
        x0, y0, x1, y1 = box
        if (
            self._full is None
            and jpeg_region.decode_jpeg_region(self.data, box, self.info, where=self._name(), out=out) is not None
        ):
            return out
        out[y0:y1, x0:x1] = self.full()[y0:y1, x0:x1]
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        img = self.full()
        return img if dtype is None else img.astype(dtype)

    def __getitem__(self, key) -> np.ndarray:
        """``img[y0:y1, x0:x1]`` (step-1 slices within the image): that box's pixels; anything else indexes
        the whole decoded image."""
        if (
            self._full is None
            and isinstance(key, tuple)
            and len(key) == 2
            and all(isinstance(k, slice) and k.step in (None, 1) for k in key)
        ):
            (y0, y1, _), (x0, x1, _) = (k.indices(n) for k, n in zip(key, self.shape[:2], strict=True))
            if y1 > y0 and x1 > x0:
                box = jpeg_region.decode_jpeg_region(self.data, (x0, y0, x1, y1), self.info, where=self._name())
                if box is not None:
                    return box
        return self.full()[key]


def open_image(path: str | os.PathLike, where: str = "") -> EncodedImage:
    """:func:`read_image` for region-first pipelines: the checked file, decoded only where it is read."""
    path = os.fspath(path)
    return EncodedImage(_read_bytes(path, where), path, where)


def as_rgb_array(image: str | os.PathLike | np.ndarray) -> np.ndarray:
    """Accept a path or an RGB uint8 array (what the public APIs take)."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an RGB uint8 HxWx3 array, got {image.dtype} {image.shape}")
        return image
    return read_image(image)
