"""Decode only a box of a JPEG: libjpeg-turbo's partial decoding, through the copy of the library that Pillow ships.

A top-down crop reads a small part of the image, yet OpenCV, Pillow, simplejpeg, torchvision and imagecodecs decode
the whole file (1.4-1.7 ms for a COCO image, most of a data worker's time per sample). libjpeg-turbo can do less:
``jpeg_skip_scanlines`` runs only the entropy decoder for the rows above the box, ``jpeg_crop_scanline`` runs the
inverse DCT, upsampling and colour conversion only for the box's columns, and decoding stops after its last row.
No maintained pip package exposes this, but Pillow's wheels carry libjpeg-turbo as a shared library with these
functions exported; it is bound here with :mod:`ctypes` (no compiler, no system library).

Exactness: libjpeg-turbo treats the edges of a cropped or skipped-to band as image edges (chroma upsampling and
progressive block smoothing read neighbouring samples), so the band decoded is the box plus :data:`MARGIN` pixels
on every side and the box is cut out of it: the pixels equal a full ``cv2.imdecode`` (same library family, same
default integer IDCT and fancy upsampling; tests compare them on real and generated files of every subsampling).

Safety: libjpeg reports fatal errors through a callback that must not return (C code uses ``longjmp``), which
Python cannot do. So a file is handed to libjpeg only after
:func:`~bmp_lightning.structures.jpeg_header.parse_jpeg` has checked every condition under
which libjpeg-turbo's decoder raises a fatal error (marker lengths, frame, tables, scans, progression parameters);
anything unusual (12-bit, arithmetic coding, lossless, CMYK, EXIF rotation, ...) returns ``None`` and the caller
decodes the whole image as before. Damaged entropy-coded data only makes libjpeg warn (as it does inside OpenCV).
Should a fatal error still reach the callback, the process stops with the file named rather than run on
undefined state; ``BMP_JPEG_REGION=0`` turns the whole path off.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys
import threading

import numpy as np

from bmp_lightning.structures.jpeg_header import JpegInfo, parse_jpeg

__all__ = ["JpegInfo", "parse_jpeg", "decode_jpeg_region", "available", "MARGIN", "margin_kind"]

# px decoded around the box, whose edges libjpeg treats as image edges. Baseline 4:4:4 (most COCO images): none, each
# 8x8 block decodes on its own. Chroma-subsampled: upsampling reaches 1 chroma sample (2 px) past an edge.
# Progressive: block smoothing also reads DC values 2 blocks away (32 px of 4:2:0 chroma).
MARGIN = {"baseline_444": 0, "baseline_subsampled": 16, "progressive": 48}
_SLACK = 4  # rows per jpeg_read_scanlines call at most (a row group is max_v_samp_factor <= 2 rows)
_LIB_VERSION = 62  # the libjpeg ABI of Pillow's copy (libjpeg.so.62)
_JCS_RGB = 2


# ---------------------------------------------------------------------------------------------- the library
class _ErrorMgr(ctypes.Structure):
    _fields_ = [
        ("error_exit", ctypes.c_void_p),
        ("emit_message", ctypes.c_void_p),
        ("output_message", ctypes.c_void_p),
        ("format_message", ctypes.c_void_p),
        ("reset_error_mgr", ctypes.c_void_p),
        ("msg_code", ctypes.c_int),
        ("msg_parm", ctypes.c_char * 80),
        ("trace_level", ctypes.c_int),
        ("num_warnings", ctypes.c_long),
        ("jpeg_message_table", ctypes.c_void_p),
        ("last_jpeg_message", ctypes.c_int),
        ("addon_message_table", ctypes.c_void_p),
        ("first_addon_message", ctypes.c_int),
        ("last_addon_message", ctypes.c_int),
    ]


_I, _U, _P = ctypes.c_int, ctypes.c_uint, ctypes.c_void_p


class _Decompress(ctypes.Structure):  # struct jpeg_decompress_struct, JPEG_LIB_VERSION 62
    _fields_ = [
        ("err", ctypes.POINTER(_ErrorMgr)),
        ("mem", _P),
        ("progress", _P),
        ("client_data", _P),
        ("is_decompressor", _I),
        ("global_state", _I),
        ("src", _P),
        ("image_width", _U),
        ("image_height", _U),
        ("num_components", _I),
        ("jpeg_color_space", _I),
        ("out_color_space", _I),
        ("scale_num", _U),
        ("scale_denom", _U),
        ("output_gamma", ctypes.c_double),
        ("buffered_image", _I),
        ("raw_data_out", _I),
        ("dct_method", _I),
        ("do_fancy_upsampling", _I),
        ("do_block_smoothing", _I),
        ("quantize_colors", _I),
        ("dither_mode", _I),
        ("two_pass_quantize", _I),
        ("desired_number_of_colors", _I),
        ("enable_1pass_quant", _I),
        ("enable_external_quant", _I),
        ("enable_2pass_quant", _I),
        ("output_width", _U),
        ("output_height", _U),
        ("out_color_components", _I),
        ("output_components", _I),
        ("rec_outbuf_height", _I),
        ("actual_number_of_colors", _I),
        ("colormap", _P),
        ("output_scanline", _U),
        ("input_scan_number", _I),
        ("input_iMCU_row", _U),
        ("output_scan_number", _I),
        ("output_iMCU_row", _U),
        ("coef_bits", _P),
        ("quant_tbl_ptrs", _P * 4),
        ("dc_huff_tbl_ptrs", _P * 4),
        ("ac_huff_tbl_ptrs", _P * 4),
        ("data_precision", _I),
        ("comp_info", _P),
        ("progressive_mode", _I),
        ("arith_code", _I),
        ("arith_dc_L", ctypes.c_ubyte * 16),
        ("arith_dc_U", ctypes.c_ubyte * 16),
        ("arith_ac_K", ctypes.c_ubyte * 16),
        ("restart_interval", _U),
        ("saw_JFIF_marker", _I),
        ("JFIF_major_version", ctypes.c_ubyte),
        ("JFIF_minor_version", ctypes.c_ubyte),
        ("density_unit", ctypes.c_ubyte),
        ("X_density", ctypes.c_ushort),
        ("Y_density", ctypes.c_ushort),
        ("saw_Adobe_marker", _I),
        ("Adobe_transform", ctypes.c_ubyte),
        ("CCIR601_sampling", _I),
        ("marker_list", _P),
        ("max_h_samp_factor", _I),
        ("max_v_samp_factor", _I),
        ("min_DCT_scaled_size", _I),
        ("total_iMCU_rows", _U),
        ("sample_range_limit", _P),
        ("comps_in_scan", _I),
        ("cur_comp_info", _P * 4),
        ("MCUs_per_row", _U),
        ("MCU_rows_in_scan", _U),
        ("blocks_in_MCU", _I),
        ("MCU_membership", _I * 10),
        ("Ss", _I),
        ("Se", _I),
        ("Ah", _I),
        ("Al", _I),
        ("unread_marker", _I),
        ("master", _P),
        ("main", _P),
        ("coef", _P),
        ("post", _P),
        ("inputctl", _P),
        ("marker", _P),
        ("entropy", _P),
        ("idct", _P),
        ("upsample", _P),
        ("cconvert", _P),
        ("cquantize", _P),
    ]


_ERROR_EXIT = ctypes.CFUNCTYPE(None, ctypes.POINTER(_Decompress))
_EMIT = ctypes.CFUNCTYPE(None, ctypes.POINTER(_Decompress), ctypes.c_int)
_state = threading.local()  # the file being decoded, for the fatal-error message


def _pillow_libjpeg() -> str | None:
    """Path of the libjpeg-turbo (ABI 62) shared library inside the installed Pillow wheel, if it has one."""
    try:
        import PIL
    except ImportError:
        return None
    root = os.path.dirname(os.path.dirname(PIL.__file__))
    pats = [  # manylinux wheels; macOS wheels
        os.path.join(root, "pillow.libs", "libjpeg*.so.62*"),
        os.path.join(os.path.dirname(PIL.__file__), ".dylibs", "libjpeg.62*.dylib"),
    ]
    for pat in pats:
        hits = sorted(glob.glob(pat))
        if hits:
            return hits[0]
    return None


def _fatal(cinfo) -> None:  # libjpeg's error_exit: must not return, so it ends the process, naming the file
    err = cinfo.contents.err.contents
    msg = ctypes.create_string_buffer(200)
    ctypes.CFUNCTYPE(None, ctypes.POINTER(_Decompress), ctypes.c_char_p)(err.format_message)(cinfo, msg)
    what = msg.value.decode(errors="replace")
    sys.stderr.write(
        f"fatal libjpeg error in region decoding of {getattr(_state, 'where', '?')}: {what}"
        " (the file passed the pre-check: please report it; BMP_JPEG_REGION=0 decodes whole images instead)\n"
    )
    sys.stderr.flush()
    os._exit(70)


def _quiet(cinfo, level) -> None:  # warnings (damaged entropy data) are ignored, as OpenCV does
    if level < 0:
        cinfo.contents.err.contents.num_warnings += 1


class _Lib:
    def __init__(self, path: str) -> None:
        lib = ctypes.CDLL(path)
        for name in ("jpeg_crop_scanline", "jpeg_skip_scanlines", "jpeg_mem_src"):
            getattr(lib, name)  # AttributeError: not libjpeg-turbo >= 1.5
        dp = ctypes.c_void_p  # the struct's address as an int: the cheapest argument for ctypes
        lib.jpeg_std_error.argtypes = [ctypes.POINTER(_ErrorMgr)]
        lib.jpeg_std_error.restype = ctypes.POINTER(_ErrorMgr)
        lib.jpeg_CreateDecompress.argtypes = [dp, ctypes.c_int, ctypes.c_size_t]
        lib.jpeg_mem_src.argtypes = [dp, ctypes.c_char_p, ctypes.c_ulong]
        lib.jpeg_read_header.argtypes = [dp, ctypes.c_int]
        lib.jpeg_start_decompress.argtypes = [dp]
        lib.jpeg_crop_scanline.argtypes = [dp, ctypes.c_void_p, ctypes.c_void_p]
        lib.jpeg_skip_scanlines.argtypes = [dp, ctypes.c_uint]
        lib.jpeg_skip_scanlines.restype = ctypes.c_uint
        lib.jpeg_read_scanlines.argtypes = [dp, ctypes.c_void_p, ctypes.c_uint]
        lib.jpeg_read_scanlines.restype = ctypes.c_uint
        lib.jpeg_abort_decompress.argtypes = [dp]
        lib.jpeg_destroy_decompress.argtypes = [dp]
        self.lib = lib
        self.read_scanlines = ctypes.CDLL(path).jpeg_read_scanlines  # the per-row call, without argtypes
        self.read_scanlines.restype = ctypes.c_uint
        self.max_lines = ctypes.c_uint(_SLACK)
        self.path = path
        self._fatal = _ERROR_EXIT(_fatal)  # kept alive with the library
        self._emit = _EMIT(_quiet)
        self._check_abi()

    def _check_abi(self) -> None:
        """Refuse a library whose ABI version or struct size differs from ours (``OSError``).

        ``jpeg_CreateDecompress`` checks both first and reports a mismatch through ``error_exit``; here (only)
        that callback may return: the library then clears and initialises the struct with *its* size, which an
        oversized buffer absorbs, and the instance is destroyed normally.
        """
        seen: list[int] = []
        probe = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(lambda c: seen.append(err.msg_code))
        err = _ErrorMgr()
        self.lib.jpeg_std_error(ctypes.byref(err))
        err.error_exit = ctypes.cast(probe, ctypes.c_void_p)
        room = (ctypes.c_char * (4 * ctypes.sizeof(_Decompress)))()
        ctypes.cast(room, ctypes.POINTER(_Decompress)).contents.err = ctypes.pointer(err)
        self.lib.jpeg_CreateDecompress(ctypes.addressof(room), _LIB_VERSION, ctypes.sizeof(_Decompress))
        self.lib.jpeg_destroy_decompress(ctypes.addressof(room))
        if seen:
            raise OSError(f"{self.path}: not the libjpeg ABI {_LIB_VERSION} this module binds (error {seen[0]})")


_lib: _Lib | None | bool = False  # False: not looked for yet; None: not available


def _library() -> _Lib | None:
    global _lib
    if _lib is False:
        path = None if os.environ.get("BMP_JPEG_REGION", "1") == "0" else _pillow_libjpeg()
        try:
            _lib = _Lib(path) if path else None
        except (OSError, AttributeError):
            _lib = None
    return _lib  # type: ignore[return-value]


def available() -> bool:
    """Whether region decoding is on (Pillow's libjpeg-turbo found and ``BMP_JPEG_REGION`` is not 0)."""
    return _library() is not None


def margin_kind(info: JpegInfo) -> str:
    """The :data:`MARGIN` entry of a file."""
    return "progressive" if info.progressive else "baseline_subsampled" if info.subsampled else "baseline_444"


def decode_jpeg_region(
    data: bytes,
    box: tuple[int, int, int, int],
    info: JpegInfo | None = None,
    where: str = "",
    out: np.ndarray | None = None,
) -> np.ndarray | None:
    """RGB uint8 pixels ``[y0:y1, x0:x1]`` of the JPEG ``data`` (``box = (x0, y0, x1, y1)``, half-open, inside
    the image), equal to the same box of a full decode; ``None`` when the file or the platform is not supported
    (then decode the whole image).

    ``out``: an image-sized ``(H, W, 3)`` uint8 array with contiguous rows to decode into, in place (the band around
    the box is written at its image position; the rest of ``out`` is left alone); the result is then a view of it.
    """
    lib = _library()
    if lib is None:
        return None
    info = parse_jpeg(data) if info is None else info
    if info is None or info.orientation != 1:
        return None
    x0, y0, x1, y1 = (int(v) for v in box)
    if not (0 <= x0 < x1 <= info.width and 0 <= y0 < y1 <= info.height):
        raise ValueError(f"box {box} outside the {info.width}x{info.height} image")
    if out is not None and (
        out.shape != (info.height, info.width, 3) or out.dtype != np.uint8 or out.strides[1:] != (3, 1)
    ):
        raise ValueError(f"out must be a ({info.height}, {info.width}, 3) uint8 array with contiguous rows")
    # the band decoded: the box plus MARGIN (libjpeg widens the columns further, to iMCU boundaries)
    m = MARGIN[margin_kind(info)]
    bx0, by0 = max(0, x0 - m), max(0, y0 - m)
    bx1, by1 = min(info.width, x1 + m), min(info.height, y1 + m)
    err = _ErrorMgr()
    cinfo = _Decompress()
    L = lib.lib
    L.jpeg_std_error(ctypes.byref(err))
    err.error_exit = ctypes.cast(lib._fatal, ctypes.c_void_p)
    err.emit_message = ctypes.cast(lib._emit, ctypes.c_void_p)
    cinfo.err = ctypes.pointer(err)
    _state.where = where or "<bytes>"
    ci = ctypes.addressof(cinfo)
    L.jpeg_CreateDecompress(ci, _LIB_VERSION, ctypes.sizeof(_Decompress))
    try:
        L.jpeg_mem_src(ci, data, len(data))
        L.jpeg_read_header(ci, 1)
        cinfo.out_color_space = _JCS_RGB
        L.jpeg_start_decompress(ci)
        xoff, width = ctypes.c_uint(bx0), ctypes.c_uint(bx1 - bx0)
        if bx0 > 0 or bx1 < info.width:
            L.jpeg_crop_scanline(ci, ctypes.addressof(xoff), ctypes.addressof(width))
        if by0 > 0:
            L.jpeg_skip_scanlines(ci, by0)
        start = cinfo.output_scanline
        rows = by1 - start
        if out is None:
            band = np.empty((rows + _SLACK, width.value, 3), np.uint8)  # _SLACK spare rows: see below
            first, col = 0, 0
        else:
            band, first, col = out, start, xoff.value
        # the row pointers (JSAMPARRAY) as one integer array. libjpeg returns a row group (1-2 rows) per call, so
        # the call is the hot loop: one reused pointer object, no argument conversion, a constant max_lines while
        # rows remain (into a private band, spare rows take what a last call may write past the box)
        stride = band.strides[0]
        n_ptrs = rows + (_SLACK if out is None else 0)
        ptrs = band.ctypes.data + (first * stride + 3 * col) + np.arange(n_ptrs, dtype=np.uintp) * np.uintp(stride)
        addr = ptrs.ctypes.data
        cur, read, cptr, nmax = ctypes.c_void_p(addr), lib.read_scanlines, ctypes.c_void_p(ci), lib.max_lines
        done = 0
        while done < rows:
            cur.value = addr + 8 * done
            if out is not None and rows - done < _SLACK:
                nmax = ctypes.c_uint(rows - done)
            got = read(cptr, cur, nmax)
            if got == 0:
                return None  # cannot happen with an in-memory source; be safe
            done += got
    finally:
        L.jpeg_abort_decompress(ci)
        L.jpeg_destroy_decompress(ci)
        _state.where = None
    if out is not None:
        return out[y0:y1, x0:x1]
    cx0, cy0 = x0 - xoff.value, y0 - start
    return band[cy0 : cy0 + (y1 - y0), cx0 : cx0 + (x1 - x0)]
