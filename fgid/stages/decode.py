"""Decode and validate: file bytes -> RGB uint8 array, or a rejection with a specific reason."""

from __future__ import annotations

import hashlib
import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

import storage
from fgid.config import DecodeConfig
from fgid.sample import Sample
from fgid.stages.base import Stage

EXIF_ORIENTATION = 0x0112


class Rejected(Exception):
    def __init__(self, code: str, detail: str = "") -> None:
        super().__init__(detail)
        self.code, self.detail = code, detail


# What an object store says about one object. Anything else is the storage failing, not the
# input, and raises so that the shard is retried: connection refused, timeouts, server errors,
# and access denied (wrong credentials would otherwise reject every input as unreadable).
OBJECT_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError)


def read_source(path: str, max_bytes: int) -> bytes:
    if storage.is_remote(path):
        return _read_object(path, max_bytes)
    p = Path(path)
    try:
        size = p.stat().st_size
        if p.is_dir():
            raise Rejected("unreadable", "is a directory")
        if size > max_bytes:
            raise Rejected("file_too_large", f"{size} bytes > {max_bytes}")
        data = p.read_bytes()
    except OSError as exc:
        raise Rejected("unreadable", f"{type(exc).__name__}: {exc.strerror or exc}") from exc
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
        data = fs.cat_file(path)
    except OBJECT_ERRORS as exc:
        raise Rejected("unreadable", f"{type(exc).__name__}: {exc}") from exc
    except ValueError as exc:  # a malformed URL, e.g. an invalid bucket name
        raise Rejected("unreadable", f"ValueError: {exc}") from exc
    if not data:
        raise Rejected("empty_file")
    return data


def decode_image(data: bytes, config: DecodeConfig) -> tuple[np.ndarray, dict]:
    """Bytes -> (RGB uint8 HxWx3 with EXIF orientation applied, facts about the source)."""
    with warnings.catch_warnings():
        # Our own pixel limit is checked below, before any pixel is decoded.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:
            raise Rejected("too_large", str(exc)) from exc
        except UnidentifiedImageError as exc:
            raise Rejected("not_an_image", "no decoder recognised the data") from exc
        except Exception as exc:  # noqa: BLE001 - a broken header can raise anything
            raise Rejected("not_an_image", f"{type(exc).__name__}: {exc}") from exc
        width, height = im.size
        if width * height > config.max_pixels:
            raise Rejected("too_large", f"{width}x{height} > {config.max_pixels} pixels")
        info = {"format": im.format, "mode": im.mode}
        try:
            # Load before reading EXIF: a PNG's eXIf chunk may follow the pixel data, so
            # getexif() decodes the image and would raise on a truncated file.
            info["frames"] = getattr(im, "n_frames", 1)
            im.load()
        except Exception as exc:  # noqa: BLE001
            raise Rejected("truncated", f"{type(exc).__name__}: {exc}") from exc
    im = upright(im, info)  # detection must see the photo upright
    rgb = to_rgb(im, info)
    if min(rgb.shape[:2]) < config.min_side:
        raise Rejected("too_small", f"{rgb.shape[1]}x{rgb.shape[0]} < {config.min_side}")
    return rgb, info


def upright(im: Image.Image, info: dict) -> Image.Image:
    """Apply the EXIF orientation. Unreadable EXIF is metadata damage, not a bad photo: the
    pixels are kept as stored and the orientation recorded as 1."""
    try:
        info["exif_orientation"] = int(im.getexif().get(EXIF_ORIENTATION, 1))
        return ImageOps.exif_transpose(im)
    except Exception:  # noqa: BLE001 - a broken EXIF block can raise anything
        info["exif_orientation"] = 1
        info["exif_error"] = True
        return im


def to_rgb(im: Image.Image, info: dict) -> np.ndarray:
    """Any PIL mode -> RGB uint8. High bit depths are rescaled, alpha is composited on white."""
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        # PNG has no 32-bit integer pixels: mode "I" from a PNG (older Pillow) is 16-bit data,
        # even when a dark image never exceeds 255.
        sixteen = mode.startswith("I;16") or (mode == "I" and info.get("format") == "PNG")
        peak = 65535.0 if sixteen or arr.max() > 255 else 255.0
        info["bit_depth"] = 16 if peak > 255 else 8
        arr = np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.stack([arr] * 3, axis=-1))
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        info["alpha_composited"] = True
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, im.convert("RGBA"))
    rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
    if rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.dtype == np.uint8:
        return np.ascontiguousarray(rgb)
    raise Rejected("not_an_image", f"unsupported mode {mode}")


class DecodeStage(Stage):
    name = "decode"

    def __init__(self, config: DecodeConfig) -> None:
        super().__init__()
        self.config = config

    def process(self, samples: list[Sample]) -> None:
        for sample in samples:
            try:
                data = read_source(sample.source, self.config.max_bytes)
                sample.sha256 = hashlib.sha256(data).hexdigest()
                sample.image, sample.source_info = decode_image(data, self.config)
                sample.height, sample.width = sample.image.shape[:2]
            except Rejected as rej:
                sample.reject(rej.code, rej.detail)
