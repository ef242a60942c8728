"""Awkward and broken inputs made from real photos, each with the outcome a build must give it.

Every file is made here (nothing is downloaded or checked in). `make_bad_corpus` returns each
generated name with the outcome a build must give it: "ok" or a reason code from
fgid.schema.REASONS. `corpus_inputs` lists what to hand to a build: the image folder and a list
file naming paths that a folder walk cannot reach (a missing file, a directory called *.jpg).
"""

from __future__ import annotations

import io
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from tests.photos import astronaut, grace_hopper, group_photo

IMAGES = "images"
LIST_FILE = "more.txt"

EXIF_ORIENTATION = 0x0112
EXIF_ROTATED = "exif_rotated.jpg"
UNICODE_NAME = "Zoë 顔 photo.v2.final.jpg"
GROUP = "group.jpg"
BOMB_SIDE = 20_000
# A file name that is not valid UTF-8 (Latin-1 "café"), and how the index shows it.
NON_UTF8_NAME = b"caf\xe9 latin1.jpg"
NON_UTF8_SHOWN = "caf\\xe9 latin1.jpg"
# What each unreadable entry is, so a test can say which kinds were exercised.
UNREADABLE_KINDS = {
    "broken_link.jpg": "symlink to a file that does not exist",
    "locked.jpg": "file with mode 000 (made only where that blocks reading, i.e. not as root)",
    "missing.jpg": "listed in the list file, does not exist",
    NON_UTF8_SHOWN: "a readable photo whose file name is not valid UTF-8",
}
# Special files a folder walk or a list can name; tests/test_special_files.py makes the ones a
# build could hang or run out of memory on (a FIFO, a socket, /dev/zero) in a capped process.
NOT_REGULAR_KINDS = {"folder.jpg": "a directory with an image suffix, listed in the list file"}


def jpeg_bytes(image: Image.Image | np.ndarray, quality: int = 92, **save: object) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality, **save)
    return buffer.getvalue()


def png_bytes(image: Image.Image | np.ndarray) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def exif_rotated_jpeg(upright: np.ndarray, orientation: int = 6) -> bytes:
    """Pixels stored turned a quarter, with the EXIF tag that tells a viewer how to undo it.

    Orientation 6 means "rotate 90 degrees clockwise to display", so the stored pixels are the
    upright photo turned 90 degrees counter-clockwise; 8 is the opposite."""
    if orientation not in (6, 8):
        raise ValueError("orientation must be 6 or 8")
    turn = Image.Transpose.ROTATE_90 if orientation == 6 else Image.Transpose.ROTATE_270
    stored = Image.fromarray(upright).transpose(turn)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    return jpeg_bytes(stored, quality=95, exif=exif.tobytes())


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def bomb_png(side: int = BOMB_SIDE) -> bytes:
    """A valid 1-bit black PNG of side x side pixels that is a few tens of KB on disk."""
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit grayscale
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed pixels
    packer = zlib.compressobj(9)
    data = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", data)
        + png_chunk(b"IEND", b"")
    )


def gray16(image: np.ndarray) -> Image.Image:
    """16-bit grayscale that uses the full 16-bit range (v * 257 maps 0..255 onto 0..65535)."""
    luma = np.asarray(Image.fromarray(image).convert("L"), dtype=np.uint16)
    return Image.fromarray(luma * 257)


def with_transparency(image: np.ndarray, mode: str) -> Image.Image:
    """Transparent outside a rectangle around the astronaut's face, opaque inside it."""
    alpha = np.zeros(image.shape[:2], dtype=np.uint8)
    alpha[30:330, 110:350] = 255
    base = Image.fromarray(image).convert("RGB" if mode == "RGBA" else "L")
    base.putalpha(Image.fromarray(alpha))
    return base


def _chmod_blocks_reading(path: Path) -> bool:
    try:
        path.read_bytes()
    except PermissionError:
        return True
    return False


def make_bad_corpus(folder: str | Path) -> dict[str, str]:
    """Write the corpus under `folder`; return {file name: expected outcome}."""
    root = Path(folder)
    images = root / IMAGES
    images.mkdir(parents=True, exist_ok=True)
    photo = astronaut()
    hopper = np.asarray(Image.open(grace_hopper()).convert("RGB"))
    expected: dict[str, str] = {}

    def write(name: str, data: bytes, outcome: str) -> None:
        (images / name).write_bytes(data)
        expected[name] = outcome

    jpeg, png = jpeg_bytes(photo), png_bytes(photo)
    write("empty.jpg", b"", "empty_file")
    write("truncated.jpg", jpeg[: len(jpeg) // 2], "truncated")
    write("truncated.png", png[: len(png) // 2], "truncated")
    write("notes.jpg", b"not a photo, just some text\n" * 20, "not_an_image")

    write("cmyk.jpg", jpeg_bytes(Image.fromarray(photo).convert("CMYK")), "ok")
    write("gray16.png", png_bytes(gray16(photo)), "ok")
    write("palette.png", png_bytes(Image.fromarray(photo).quantize(256)), "ok")
    write("rgba_transparent.png", png_bytes(with_transparency(photo, "RGBA")), "ok")
    write("la.png", png_bytes(with_transparency(photo, "LA")), "ok")
    write("gray.jpg", jpeg_bytes(Image.fromarray(hopper).convert("L")), "ok")
    write(EXIF_ROTATED, exif_rotated_jpeg(photo, 6), "ok")
    write(GROUP, group_photo().read_bytes(), "ok")
    write(UNICODE_NAME, jpeg_bytes(hopper), "ok")

    write("tiny.png", png_bytes(photo[100:120, 200:220]), "too_small")
    write("bomb.png", bomb_png(), "too_large")
    import skimage.data

    write("coffee.jpg", jpeg_bytes(skimage.data.coffee()), "no_face")

    os.symlink(images / "no such file.jpg", images / "broken_link.jpg")
    expected["broken_link.jpg"] = "unreadable"
    locked = images / "locked.jpg"
    shutil.copyfile(images / "cmyk.jpg", locked)
    locked.chmod(0)
    if _chmod_blocks_reading(locked):
        expected["locked.jpg"] = "unreadable"
    else:  # running as root: mode 000 does not stop reading, so the case would be a lie
        locked.chmod(0o644)
        locked.unlink()

    # A directory with an image suffix: a folder walk skips it, a list file can still name it.
    (images / "folder.jpg").mkdir()
    expected["folder.jpg"] = "not_regular_file"
    # One undecodable name gives one row; it must not abort the plan for everything else.
    with open(os.path.join(os.fsencode(images), NON_UTF8_NAME), "wb") as handle:
        handle.write(jpeg_bytes(hopper))
    expected[NON_UTF8_SHOWN] = "unreadable"
    expected["missing.jpg"] = "unreadable"
    (root / LIST_FILE).write_text(
        f"# paths relative to this file\n{IMAGES}/folder.jpg\nmissing.jpg\n"
    )
    return expected


def corpus_inputs(folder: str | Path) -> list[str]:
    """What a build of the corpus takes: the image folder and the list file."""
    return [str(Path(folder) / IMAGES), str(Path(folder) / LIST_FILE)]


# Faces in insightface's t1.jpg (x1, y1, x2, y2), as the lite detector boxes them. These three are
# far apart in dlib's embedding space (>= 0.76 from each other, >= 0.7 from the two portraits).
GROUP_PEOPLE = {
    "a": (1115, 282, 1229, 395),
    "b": (729, 356, 842, 470),
    "c": (455, 295, 569, 408),
}


def augmented(photo: np.ndarray) -> dict[str, bytes]:
    """Copies of one photo as a crawl finds them: flipped, re-exposed, re-framed, re-saved."""
    from PIL import ImageEnhance

    image = Image.fromarray(photo)
    width, height = image.size
    brighter = ImageEnhance.Brightness(image).enhance(1.3)
    turned = image.rotate(8, resample=Image.Resampling.BICUBIC)
    return {
        "flip": jpeg_bytes(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), quality=92),
        "bright": jpeg_bytes(ImageEnhance.Contrast(brighter).enhance(0.8), quality=92),
        "rotcrop": jpeg_bytes(
            turned.crop(
                (int(width * 0.08), int(height * 0.06), int(width * 0.94), int(height * 0.9))
            ),
            quality=92,
        ),
        "jpeg30": jpeg_bytes(image, quality=30),
    }


def make_identity_corpus(folder: str | Path) -> dict[str, str]:
    """Several photos of each of five people; returns {file name: person}.

    `hopper_9_copy.jpg` is a byte-for-byte copy of `hopper_0_original.jpg`."""
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    people: dict[str, str] = {}

    def write(name: str, data: bytes, person: str) -> None:
        (root / name).write_bytes(data)
        people[name] = person

    copies = augmented(astronaut())
    for n, kind in enumerate(("flip", "bright", "rotcrop", "jpeg30"), 1):
        write(f"astronaut_{n}_{kind}.jpg", copies[kind], "astronaut")
    hopper_file = grace_hopper().read_bytes()
    copies = augmented(np.asarray(Image.open(io.BytesIO(hopper_file)).convert("RGB")))
    write("hopper_0_original.jpg", hopper_file, "hopper")
    write("hopper_1_flip.jpg", copies["flip"], "hopper")
    write("hopper_2_bright.jpg", copies["bright"], "hopper")
    write("hopper_9_copy.jpg", hopper_file, "hopper")
    group = np.asarray(Image.open(group_photo()).convert("RGB"))
    margin = 70
    for person, (x1, y1, x2, y2) in GROUP_PEOPLE.items():
        crop = group[max(0, y1 - margin) : y2 + margin, max(0, x1 - margin) : x2 + margin]
        write(f"group_person_{person}.jpg", jpeg_bytes(crop, quality=92), f"group_{person}")
    return people
