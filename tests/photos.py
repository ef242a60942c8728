"""Real face photos that ship inside installed packages (never checked into this repo)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def insightface_image(name: str) -> Path:
    import insightface

    path = Path(insightface.__file__).parent / "data" / "images" / name
    if not path.is_file():
        raise FileNotFoundError(f"insightface no longer ships {name}")
    return path


def astronaut() -> np.ndarray:
    """Eileen Collins, one frontal face (scikit-image's sample data)."""
    import skimage.data

    return skimage.data.astronaut()


def group_photo() -> Path:
    """insightface's t1.jpg: six people side by side."""
    return insightface_image("t1.jpg")


def tom_hanks() -> Path:
    """An aligned grayscale portrait (insightface's package data)."""
    return insightface_image("Tom_Hanks_54745.png")


def grace_hopper() -> Path:
    """A portrait photo shipped with matplotlib's sample data."""
    import matplotlib

    return Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
