"""Real face photos that ship inside installed packages, copied out for a demo build.

Sources: scikit-image's `astronaut` (Eileen Collins, NASA, public domain), matplotlib's
`grace_hopper.jpg`, insightface's `t1.jpg` and `Tom_Hanks_54745.png`, scikit-image's `coffee`
(no face). Check each package's licence before redistributing a build made from them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from PIL import Image, ImageEnhance, ImageOps


def _package_file(module: str, *parts: str) -> Path:
    import importlib

    mod = importlib.import_module(module)
    return Path(mod.__file__).parent.joinpath(*parts)


def write_samples(folder: str | Path) -> list[Path]:
    """Write a small, varied input folder; returns the files written (sorted)."""
    import skimage.data

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    astronaut = Image.fromarray(skimage.data.astronaut())
    written = {
        "astronaut.png": astronaut,
        "astronaut flipped.jpg": ImageOps.mirror(astronaut),
        "astronaut-brighter.jpg": ImageEnhance.Brightness(astronaut).enhance(1.3),
        "coffee (no face).png": Image.fromarray(skimage.data.coffee()),
    }
    for name, image in written.items():
        image.convert("RGB").save(out / name)
    shutil.copy(out / "astronaut.png", out / "astronaut copy.png")  # an exact duplicate
    copies = {
        "group-t1.jpg": _package_file("insightface", "data", "images", "t1.jpg"),
        "tom_hanks.png": _package_file("insightface", "data", "images", "Tom_Hanks_54745.png"),
    }
    try:
        import matplotlib

        copies["grace_hopper.jpg"] = (
            Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
        )
    except ImportError:
        pass
    for name, source in copies.items():
        shutil.copy(source, out / name)
    hopper = out / "grace_hopper.jpg"
    if hopper.exists():
        ImageOps.mirror(Image.open(hopper)).save(out / "grace_hopper flipped.jpg")
    (out / "notes.jpg").write_bytes(b"not an image, only a name that says so\n")
    return sorted(p for p in out.iterdir() if p.is_file())
