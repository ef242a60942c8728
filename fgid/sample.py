"""The record one input becomes as it moves through the stages."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fgid.protocols import Attributes, Detection
from fgid.schema import STATUS_OK, STATUS_REJECTED


@dataclass
class Sample:
    key: str
    shard: int
    source: str
    label: str | None = None
    status: str = STATUS_OK
    reason: str | None = None
    # decode
    sha256: str | None = None
    image: np.ndarray | None = None  # source RGB uint8, EXIF orientation applied
    width: int | None = None
    height: int | None = None
    source_info: dict = field(default_factory=dict)  # format, mode, bit depth, exif orientation
    # detect
    face_count: int | None = None
    face: Detection | None = None
    # align
    aligned: np.ndarray | None = None
    transform: np.ndarray | None = None  # 2x3 affine, source -> aligned
    aligned_dense: np.ndarray | None = None
    # parse / regions
    label_map: np.ndarray | None = None
    regions: list[str] = field(default_factory=list)
    # embed / attributes / captions
    embedding: np.ndarray | None = None
    attributes: Attributes | None = None
    caption: str | None = None
    facial: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == STATUS_OK

    def reject(self, code: str, detail: str = "") -> None:
        """Mark the sample rejected; its heavy arrays are dropped, its row is kept."""
        self.status = STATUS_REJECTED
        self.reason = f"{code}: {detail}" if detail else code
        self.image = self.aligned = self.label_map = None

    def release(self) -> None:
        """Drop the arrays the writer no longer needs."""
        self.image = None
