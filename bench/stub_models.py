"""Bench-only stand-in models: a fixed face box, constant masks and attributes, so a build's own
overhead (planning, decoding, writing, bookkeeping) is what is measured, not the models'."""

from __future__ import annotations

import hashlib

import numpy as np

from fgid.protocols import Attributes, Detection, ModelSet


class FixedDetector:
    name = "bench-fixed-box"

    def detect(self, images):
        faces = []
        for image in images:
            h, w = image.shape[:2]
            box = np.array([0.25 * w, 0.2 * h, 0.75 * w, 0.8 * h], np.float32)
            marks = np.array(
                [[0.38, 0.42], [0.62, 0.42], [0.5, 0.55], [0.41, 0.68], [0.59, 0.68]], np.float32
            ) * np.array([w, h], np.float32)
            faces.append([Detection(box, 0.99, marks)])
        return faces


class BlankParser:
    name, unseen_classes = "bench-blank-parser", frozenset()

    def parse(self, aligned, dense_landmarks):
        return [np.ones(a.shape[:2], np.uint8) for a in aligned]  # class 1: skin


class HashEmbedder:
    """A unit vector seeded by the image bytes: distinct images, distinct identities."""

    name, dim = "bench-hash-embedder", 128

    def embed(self, images, faces):
        out = np.empty((len(images), self.dim), np.float32)
        for row, image in enumerate(images):
            seed = int.from_bytes(hashlib.sha1(image.tobytes()).digest()[:8], "little")
            vector = np.random.default_rng(seed).standard_normal(self.dim)
            out[row] = vector / np.linalg.norm(vector)
        return out


class FixedAttributes:
    name = "bench-fixed-attributes"

    def estimate(self, images, faces):
        return [Attributes(30.0, "female") for _ in images]


class FixedCaptioner:
    name = "bench-fixed-captioner"

    def caption(self, images, prompt, hints):
        return ["a face"] * len(images)


def stub_model_set() -> ModelSet:
    return ModelSet(
        FixedDetector(), BlankParser(), HashEmbedder(), FixedAttributes(), FixedCaptioner()
    )
