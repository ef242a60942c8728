"""Decode and validate: file bytes -> RGB uint8 array, or a rejection with a specific reason.

A source is a local file, an object, a member of an archive or Parquet dataset (fgid.sources)
or an http(s) URL, whose batch is downloaded in parallel first (fgid.download). Its bytes are
hashed the same way whichever it is.
"""

from __future__ import annotations

import hashlib
import io
import time
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

import storage
from fgid.budget import BUDGET
from fgid.config import DecodeConfig, DownloadConfig
from fgid.download import fetch, fetch_all
from fgid.inputs import UNDECODABLE
from fgid.sample import Sample
from fgid.sources import BAD_URL, Unusable, is_web, read_member, split_member
from fgid.stages.base import Stage
from storage.local import NotRegularFile, read_regular

EXIF_ORIENTATION = 0x0112
# The formats of fgid.inputs.IMAGE_SUFFIXES (the JPEG opener also gives multi-picture MPO files
# from cameras). Pillow is never asked to try anything else, so a PostScript or PDF file named
# .jpg is `not_an_image`, never handed to Ghostscript.
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")
# EXIF orientation -> the transpose that shows the photo upright (as ImageOps.exif_transpose).
UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
HIGH_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I", "F"})
# 16-bit value -> 8-bit, rounded: the conversion of a 16-bit image is one table lookup.
SIXTEEN_TO_EIGHT = np.clip(np.arange(65536) / 65535.0 * 255.0 + 0.5, 0, 255).astype(np.uint8)
ROWS_PIXELS = 1 << 20  # pixels per block where a conversion needs a wider temporary type


class Rejected(Exception):
    def __init__(self, code: str, detail: str = "") -> None:
        super().__init__(detail)
        self.code, self.detail = code, detail


# What an object store says about one object. Anything else is the storage failing, not the
# input, and raises so that the shard is retried: connection refused, timeouts, server errors,
# and access denied (wrong credentials would otherwise reject every input as unreadable).
OBJECT_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError)


def read_source(path: str, max_bytes: int, download: DownloadConfig | None = None) -> bytes:
    """A source's bytes; never more than `max_bytes + 1` are read, only regular files opened.

    http(s) sources are downloaded with `download`'s settings (its max_bytes, else ours)."""
    if path.startswith(UNDECODABLE):
        raise Rejected("unreadable", "file name is not valid UTF-8")
    if path.startswith(BAD_URL):
        raise Rejected("bad_url", "not an http(s) URL")
    try:
        if is_web(path):
            settings = download or DownloadConfig()
            return fetch(path, settings, settings.max_bytes or max_bytes)
        if split_member(path) is not None:
            return read_member(path, max_bytes)
    except Unusable as failure:
        raise Rejected(failure.code, failure.detail) from None
    if storage.is_remote(path):
        return _read_object(path, max_bytes)
    try:
        data = read_regular(path, max_bytes)
    except NotRegularFile as exc:
        raise Rejected("not_regular_file", exc.kind) from exc
    except OSError as exc:
        raise Rejected("unreadable", f"{type(exc).__name__}: {exc.strerror or exc}") from exc
    if len(data) > max_bytes:
        raise Rejected("file_too_large", f"more than {max_bytes} bytes")
    if not data:
        raise Rejected("empty_file")
    return data


def _read_object(url: str, max_bytes: int) -> bytes:
    try:
        fs, path = storage.filesystem(url)
        info = fs.info(path)  # one HEAD request: an object wins over a prefix of the same name
        if info["type"] != "file":
            raise Rejected("unreadable", "is a directory")
        size = int(info.get("size") or 0)
        if size > max_bytes:
            raise Rejected("file_too_large", f"{size} bytes > {max_bytes}")
        if size == 0:
            raise Rejected("empty_file")  # a range of an empty object is an error on S3
        # A ranged read: an object replaced by a bigger one since the HEAD is still bounded.
        data = fs.cat_file(path, start=0, end=max_bytes + 1)
    except OBJECT_ERRORS as exc:
        raise Rejected("unreadable", f"{type(exc).__name__}: {exc}") from exc
    except ValueError as exc:  # a malformed URL, e.g. an invalid bucket name
        raise Rejected("unreadable", f"ValueError: {exc}") from exc
    if len(data) > max_bytes:
        raise Rejected("file_too_large", f"more than {max_bytes} bytes")
    if not data:
        raise Rejected("empty_file")
    return data


def _pixel_bytes(im: Image.Image) -> int:
    """Pillow's bytes per pixel for `im`'s mode: 1 for 8-bit single band, 2 for 16-bit, else 4."""
    if im.mode in ("1", "L", "P"):
        return 1
    return 2 if im.mode.startswith("I;16") else 4


def decode_image(data: bytes, config: DecodeConfig) -> tuple[np.ndarray, dict]:
    """Bytes -> (RGB uint8 HxWx3 with EXIF orientation applied, facts about the source).

    The decoded pixels are reserved on the decoded-bytes budget (fgid.budget) before any is
    decoded: an estimate of the peak while converting, settled to the RGB array kept."""
    with warnings.catch_warnings():
        # Our own pixel limit is checked below, before any pixel is decoded.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
        except Image.DecompressionBombError as exc:
            raise Rejected("too_large", str(exc)) from exc
        except UnidentifiedImageError as exc:
            raise Rejected("not_an_image", "no accepted format recognised the data") from exc
        except Exception as exc:  # noqa: BLE001 - a broken header can raise anything
            raise Rejected("not_an_image", f"{type(exc).__name__}: {exc}") from exc
        width, height = im.size
        if width * height > config.max_pixels:
            raise Rejected("too_large", f"{width}x{height} > {config.max_pixels} pixels")
        info = {"format": im.format, "mode": im.mode}
        # Decoded as Pillow holds it, a converted copy, and the RGB array.
        estimate = width * height * (2 * _pixel_bytes(im) + 4)
        reservation = BUDGET.reserve(estimate, config.memory_budget_mb << 20)
        kept = 0
        try:
            try:
                # Load before reading EXIF: a PNG's eXIf chunk may follow the pixel data, so
                # getexif() decodes the image and would raise on a truncated file.
                info["frames"] = getattr(im, "n_frames", 1)
                im.load()
            except Exception as exc:  # noqa: BLE001
                raise Rejected("truncated", f"{type(exc).__name__}: {exc}") from exc
            orientation = exif_orientation(im, info)
            im = eight_bit(im, info)  # before any copy: 16-bit data is never copied wide
            rgb = to_rgb(turn_upright(im, orientation, info), info)
            del im
            kept = rgb.nbytes
        finally:
            reservation.settle(kept)
    if min(rgb.shape[:2]) < config.min_side:
        raise Rejected("too_small", f"{rgb.shape[1]}x{rgb.shape[0]} < {config.min_side}")
    return rgb, info


def exif_orientation(im: Image.Image, info: dict) -> int:
    """The EXIF orientation (1 = as stored). Unreadable EXIF is metadata damage, not a bad
    photo: the pixels are kept as stored and the orientation recorded as 1."""
    try:
        info["exif_orientation"] = int(im.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - a broken EXIF block can raise anything
        info["exif_orientation"] = 1
        info["exif_error"] = True
    return info["exif_orientation"]


def turn_upright(im: Image.Image, orientation: int, info: dict) -> Image.Image:
    """Detection must see the photo upright."""
    method = UPRIGHT.get(orientation)
    if method is None:
        return im
    try:
        return im.transpose(method)
    except Exception:  # noqa: BLE001
        info["exif_orientation"], info["exif_error"] = 1, True
        return im


def eight_bit(im: Image.Image, info: dict) -> Image.Image:
    """High-bit-depth gray (16-bit, 32-bit int, float) -> 8-bit "L"; other modes unchanged.

    16-bit values are mapped through a table, with no float copy of the image; wider types are
    converted a block of rows at a time, so a temporary is never the whole image."""
    mode = im.mode
    if mode not in HIGH_BIT_MODES:
        return im
    arr = np.asarray(im)
    # PNG has no 32-bit integer pixels: mode "I" from a PNG (older Pillow) is 16-bit data,
    # even when a dark image never exceeds 255.
    sixteen = mode.startswith("I;16") or (mode == "I" and info.get("format") == "PNG")
    peak = 65535 if sixteen or (arr.size and arr.max() > 255) else 255
    info["bit_depth"] = 16 if peak > 255 else 8
    if mode.startswith("I;16"):
        out = SIXTEEN_TO_EIGHT[arr]
    else:
        out = np.empty(arr.shape, dtype=np.uint8)
        step = max(1, ROWS_PIXELS // max(1, arr.shape[1]))
        for top in range(0, arr.shape[0], step):
            block = arr[top : top + step]
            if mode == "I" and peak == 65535:
                out[top : top + step] = SIXTEEN_TO_EIGHT[np.clip(block, 0, 65535)]
            elif mode == "I":
                out[top : top + step] = np.clip(block, 0, 255)
            else:  # float data: the same arithmetic as ever, one block at a time
                out[top : top + step] = np.clip(block / float(peak) * 255.0 + 0.5, 0, 255)
    del arr
    return Image.fromarray(np.ascontiguousarray(out), mode="L")


def to_rgb(im: Image.Image, info: dict) -> np.ndarray:
    """Any PIL mode -> RGB uint8. High bit depths are rescaled, alpha is composited on white."""
    mode = im.mode
    im = eight_bit(im, info)
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        info["alpha_composited"] = True
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, im.convert("RGBA"))
    if im.mode == "L":  # gray: three equal channels, without Pillow's RGB copy
        gray = np.asarray(im, dtype=np.uint8)
        return np.ascontiguousarray(np.stack([gray] * 3, axis=-1))
    rgb = np.asarray(im if im.mode == "RGB" else im.convert("RGB"), dtype=np.uint8)
    if rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.dtype == np.uint8:
        return np.ascontiguousarray(rgb)
    raise Rejected("not_an_image", f"unsupported mode {mode}")


class DecodeStage(Stage):
    """Decoding; a sample's `source_info` already holds its table's or shard's facts
    (`provenance`), and decoding adds the image's own."""

    name = "decode"

    def __init__(self, config: DecodeConfig, download: DownloadConfig | None = None) -> None:
        super().__init__()
        self.config = config
        self.download = download or DownloadConfig()
        self._fetched: dict[str, bytes | Unusable] = {}

    def __call__(self, batch: list[Sample]) -> list[Sample]:
        # The batch's URLs are fetched side by side first (download.concurrency at a time);
        # decoding, threaded or not, then finds their bytes here.
        urls = [s.source for s in batch if s.ok and is_web(s.source)]
        if not urls:
            return super().__call__(batch)
        started = time.perf_counter()
        max_bytes = self.download.max_bytes or self.config.max_bytes
        self._fetched = fetch_all(urls, self.download, max_bytes)
        self.timing.seconds += time.perf_counter() - started
        try:
            return super().__call__(batch)
        finally:
            self._fetched = {}

    def _read(self, source: str) -> bytes:
        fetched = self._fetched.get(source)
        if isinstance(fetched, Unusable):
            raise Rejected(fetched.code, fetched.detail)
        if fetched is not None:
            return fetched
        return read_source(source, self.config.max_bytes, self.download)

    def process(self, samples: list[Sample]) -> None:
        for sample in samples:
            try:
                data = self._read(sample.source)
                sample.sha256 = hashlib.sha256(data).hexdigest()
                sample.image, info = decode_image(data, self.config)
                sample.source_info = {**sample.source_info, **info}
                sample.height, sample.width = sample.image.shape[:2]
            except Rejected as rej:
                sample.reject(rej.code, rej.detail)
