"""Decode stage: every pixel mode becomes RGB uint8, every kind of bad file a specific reason."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
from PIL import Image

from fgid.config import DecodeConfig
from fgid.inputs import UNDECODABLE
from fgid.sample import Sample
from fgid.stages.decode import (
    SIXTEEN_TO_EIGHT,
    DecodeStage,
    Rejected,
    decode_image,
    read_source,
    to_rgb,
)
from tests.corpus import bomb_png, exif_rotated_jpeg, jpeg_bytes, png_bytes

CONFIG = DecodeConfig()


def encode(image: Image.Image, fmt: str, **save: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save)
    return buffer.getvalue()


def decode(data: bytes, **config: object) -> tuple[np.ndarray, dict]:
    return decode_image(data, DecodeConfig(**config))


def rejection(data: bytes, **config: object) -> str:
    with pytest.raises(Rejected) as caught:
        decode(data, **config)
    return caught.value.code


def test_16bit_gray_is_rescaled_not_clipped():
    values = np.zeros((80, 96), dtype=np.uint16)
    values[:, 32:64] = 128 * 257  # mid grey in 16-bit terms
    values[:, 64:] = 65535
    rgb, info = decode(encode(Image.fromarray(values), "PNG"))
    assert info["mode"] == "I;16" and info["bit_depth"] == 16
    assert rgb.shape == (80, 96, 3) and rgb.dtype == np.uint8
    assert (rgb[:, :32] == 0).all()
    assert (rgb[:, 32:64] == 128).all()
    assert (rgb[:, 64:] == 255).all()


def test_16bit_dark_image_stays_dark():
    # A dark 16-bit photo never exceeds 255 in raw value; it must not be read as 8-bit.
    values = np.full((70, 70), 200, dtype=np.uint16)
    rgb, _ = decode(encode(Image.fromarray(values), "PNG"))
    assert (rgb == 1).all()  # 200 / 65535 * 255 = 0.78, rounds to 1


def test_mode_i_from_png_counts_as_16bit():
    # Older Pillow opens 16-bit grayscale PNGs as mode "I"; the scale must not depend on content.
    im = Image.fromarray(np.full((70, 70), 200, dtype=np.int32), mode="I")
    info = {"format": "PNG"}
    assert (to_rgb(im, info) == 1).all()
    assert info["bit_depth"] == 16


def test_cmyk_jpeg_decodes_to_the_right_colour():
    cmyk = Image.new("CMYK", (80, 80), (0, 255, 255, 0))  # no cyan, full magenta+yellow: red
    rgb, info = decode(encode(cmyk, "JPEG", quality=95))
    assert info["mode"] == "CMYK"
    assert rgb.shape == (80, 80, 3) and rgb.dtype == np.uint8
    r, g, b = rgb.reshape(-1, 3).mean(0)
    assert r > 230 and g < 25 and b < 25


def test_palette_maps_to_palette_colours():
    index = np.zeros((80, 80), dtype=np.uint8)
    index[:, 40:] = 1
    im = Image.fromarray(index, mode="P")
    im.putpalette([10, 200, 30, 250, 5, 120] + [0] * 762)
    rgb, info = decode(encode(im, "PNG"))
    assert info["mode"] == "P"
    assert (rgb[:, :40] == (10, 200, 30)).all()
    assert (rgb[:, 40:] == (250, 5, 120)).all()


def test_palette_transparency_is_composited_on_white():
    index = np.zeros((80, 80), dtype=np.uint8)
    index[:, 40:] = 1
    im = Image.fromarray(index, mode="P")
    im.putpalette([10, 200, 30, 0, 0, 0] + [0] * 762)
    rgb, info = decode(encode(im, "PNG", transparency=1))
    assert info.get("alpha_composited") is True
    assert (rgb[:, :40] == (10, 200, 30)).all()
    assert (rgb[:, 40:] == 255).all()


def test_rgba_alpha_is_composited_on_white():
    pixels = np.zeros((80, 90, 4), dtype=np.uint8)
    pixels[..., :3] = (40, 80, 120)
    pixels[:, :30, 3] = 0
    pixels[:, 30:60, 3] = 255
    pixels[:, 60:, 3] = 128
    rgb, info = decode(encode(Image.fromarray(pixels, "RGBA"), "PNG"))
    assert info["mode"] == "RGBA" and info["alpha_composited"] is True
    assert (rgb[:, :30] == 255).all()
    assert (rgb[:, 30:60] == (40, 80, 120)).all()
    half = rgb[:, 60:].reshape(-1, 3).mean(0)
    assert np.allclose(half, [(40 + 255) / 2, (80 + 255) / 2, (120 + 255) / 2], atol=2)


def test_la_is_gray_composited_on_white():
    pixels = np.zeros((80, 80, 2), dtype=np.uint8)
    pixels[..., 0] = 100
    pixels[:, 40:, 1] = 255
    rgb, info = decode(encode(Image.fromarray(pixels, "LA"), "PNG"))
    assert info["mode"] == "LA"
    assert (rgb[:, :40] == 255).all()
    assert (rgb[:, 40:] == 100).all()


@pytest.mark.parametrize("mode", ["L", "1"])
def test_single_channel_becomes_three_equal_channels(mode):
    gray = np.tile(np.linspace(0, 255, 96).astype(np.uint8), (80, 1))
    im = Image.fromarray(gray).convert(mode)
    rgb, info = decode(encode(im, "PNG"))
    assert info["mode"] == mode
    assert rgb.shape == (80, 96, 3) and rgb.dtype == np.uint8
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
    assert np.array_equal(rgb[..., 0], np.asarray(im.convert("L")))


def asymmetric_image() -> np.ndarray:
    """A non-square picture whose every turn and flip looks different."""
    image = np.zeros((80, 120, 3), dtype=np.uint8)
    image[:40, :60] = (255, 0, 0)
    image[:40, 60:] = (0, 255, 0)
    image[40:, :30] = (0, 0, 255)
    image[40:, 30:] = (255, 255, 0)
    return image


@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_orientation_is_applied(orientation):
    upright = asymmetric_image()
    rgb, info = decode(exif_rotated_jpeg(upright, orientation))
    assert info["exif_orientation"] == orientation
    assert rgb.shape == upright.shape
    assert np.abs(rgb.astype(int) - upright).mean() < 6  # equal up to JPEG loss
    stored = np.asarray(Image.open(io.BytesIO(exif_rotated_jpeg(upright, orientation))))
    assert stored.shape == (120, 80, 3)  # the file really holds the turned pixels


def test_unreadable_exif_keeps_the_pixels(monkeypatch):
    # Pillow tolerates most broken EXIF; simulate one it cannot parse.
    def broken(self):
        raise SyntaxError("not a TIFF file")

    monkeypatch.setattr(Image.Image, "getexif", broken)
    upright = asymmetric_image()
    rgb, info = decode(png_bytes(upright))
    assert np.array_equal(rgb, upright)
    assert info["exif_orientation"] == 1 and info["exif_error"] is True


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_files_are_rejected_as_truncated(fmt):
    noise = np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), fmt)
    assert rejection(data[: len(data) // 2]) == "truncated"


def test_non_image_bytes_are_not_an_image():
    assert rejection(b"%PDF-1.4 definitely not a raster image\n" * 10) == "not_an_image"


def test_too_small_uses_the_shorter_side():
    assert rejection(png_bytes(np.zeros((63, 500, 3), dtype=np.uint8))) == "too_small"
    rgb, _ = decode(png_bytes(np.zeros((64, 500, 3), dtype=np.uint8)))
    assert rgb.shape == (64, 500, 3)


def test_pixel_limit_is_checked_before_decoding():
    # Well under Pillow's own bomb limit: our configured limit must fire.
    data = png_bytes(np.zeros((1100, 1000, 3), dtype=np.uint8))
    assert rejection(data, max_pixels=1_000_000) == "too_large"
    assert decode(data, max_pixels=1_100_000)[0].shape == (1100, 1000, 3)


def test_decompression_bomb_is_too_large():
    data = bomb_png()
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (20_000, 20_000)  # 400 megapixels declared in IHDR ...
    assert len(data) < 200_000  # ... in a file of a few tens of KB
    assert rejection(data) == "too_large"


def test_read_source_rejections(tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    big = tmp_path / "big.jpg"
    big.write_bytes(b"x" * 2048)
    folder = tmp_path / "folder.jpg"
    folder.mkdir()
    cases = {
        str(empty): "empty_file",
        str(big): "file_too_large",
        str(folder): "not_regular_file",
        str(tmp_path / "missing.jpg"): "unreadable",
        UNDECODABLE + str(tmp_path / "caf\\xe9.jpg"): "unreadable",
    }
    for path, code in cases.items():
        with pytest.raises(Rejected) as caught:
            read_source(path, max_bytes=1024)
        assert caught.value.code == code, path
    assert read_source(str(big), max_bytes=4096) == b"x" * 2048


def test_stage_fills_samples_and_rejects_per_sample(tmp_path):
    good = tmp_path / "good.jpg"
    good.write_bytes(jpeg_bytes(asymmetric_image()))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    samples = [Sample("a", 0, str(good)), Sample("b", 0, str(bad)), Sample("c", 0, "/nope.jpg")]
    DecodeStage(CONFIG)(samples)
    first, second, third = samples
    assert first.ok and first.image.shape == (80, 120, 3) and first.image.dtype == np.uint8
    assert (first.width, first.height) == (120, 80)
    assert first.sha256 == hashlib.sha256(good.read_bytes()).hexdigest()
    assert first.image.flags["C_CONTIGUOUS"]
    assert second.reason.startswith("not_an_image") and second.image is None
    assert second.sha256 == hashlib.sha256(b"not an image").hexdigest()
    assert third.reason.startswith("unreadable") and third.sha256 is None


def test_a_size_that_lies_is_still_read_only_up_to_the_limit():
    # /proc files report size 0 and hold more: the read stops at the limit, not at st_size.
    maps = "/proc/self/maps"
    with pytest.raises(Rejected) as caught:
        read_source(maps, max_bytes=64)
    assert caught.value.code == "file_too_large"
    assert len(read_source(maps, max_bytes=10_000_000)) > 64


def test_postscript_named_jpg_is_not_an_image():
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 100 100\nnewpath 0 0 moveto showpage\n"
    assert Image.open(io.BytesIO(eps)).format == "EPS"  # what Pillow would otherwise hand on
    assert rejection(eps) == "not_an_image"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF"])
def test_every_accepted_format_decodes(fmt):
    rgb, info = decode(encode(Image.fromarray(asymmetric_image()), fmt))
    assert info["format"] == fmt and rgb.shape == (80, 120, 3)


def test_16bit_table_matches_the_float_formula():
    values = np.arange(65536, dtype=np.float64)
    expected = np.clip(values / 65535.0 * 255.0 + 0.5, 0, 255).astype(np.uint8)
    assert np.array_equal(SIXTEEN_TO_EIGHT, expected)


def test_16bit_decodes_without_wide_copies():
    import tracemalloc

    # A gradient that compresses well: a small file, many pixels (as a 16-bit scan is).
    side = 1500
    ramp = np.linspace(0, 65535, side).astype(np.uint16)
    data = encode(Image.fromarray(np.tile(ramp, (side, 1))), "PNG")
    tracemalloc.start()
    try:
        rgb, info = decode(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info["bit_depth"] == 16 and rgb.shape == (side, side, 3)
    # At most the 8-bit image beside its RGB copy (1 + 1 + 3 bytes a pixel); converting
    # through float64 copies peaked at 24 bytes a pixel.
    assert peak < 6 * side * side, peak


def test_16bit_rgb_is_rotated_after_it_becomes_8bit():
    values = (asymmetric_image()[..., 0].astype(np.uint16)) * 257
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = Image.fromarray(values).transpose(Image.Transpose.ROTATE_90)
    rgb, info = decode(encode(stored, "PNG", exif=exif.tobytes()))
    assert info["exif_orientation"] == 6 and info["bit_depth"] == 16
    assert np.array_equal(rgb[..., 0], asymmetric_image()[..., 0])
