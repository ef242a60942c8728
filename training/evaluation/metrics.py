"""The paper's per-image metrics (FGID_SPEC §7), batch-in, batch-out, models loaded once.

All similarities are cosines reported x100, as in the paper's tables:
- CLIP-T: prompt text vs generated image (CLIP).
- CLIP-I: generated image vs the reference's aligned face (CLIP).
- DINO: generated image vs reference, DINO ViT CLS features.
- FaceSim (the paper's column): FaceNet (Inception-ResNet-v1, VGGFace2; facenet.py) embedding
  of the generated image's largest face vs the reference's, both cropped at the build's
  detection box; 0 when no face is found in the generated image, NaN when the reference has none.
- FaceSim-ArcFace (extra column): the same with the model set's embedder (ArcFace in the full
  set), the embedding the dataset was built with; if no face is found in the reference crop,
  its stored build embedding is used.
- FGIS: DINO cosine between the same facial region of reference and generated image, averaged
  over the regions present in both (fgid's presence rule). Regions of the generated image come
  from the model set's parser after detect+align; the reference's from its label map. 0 when the
  generated image has no face (the identity did not survive, as for FaceSim); NaN when a face
  is found but no region is present in both, since nothing was measured.
FID is a set metric (fid.py); seconds per image is measured where images are generated (run.py).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from fgid.config import DetectConfig, ModelsConfig
from fgid.schema import REGIONS
from training.evaluation.backbones import ClipScorer, DinoScorer, as_array
from training.evaluation.facenet import FaceNetScorer, load_facenet
from training.evaluation.faces import FaceAnalyzer, cosine, region_crops
from training.evaluation.fid import DinoFeatures, FeatureNetwork, InceptionFeatures

if TYPE_CHECKING:
    from training.reference import Reference

log = logging.getLogger(__name__)

METRICS = ("clip_t", "clip_i", "dino", "face_sim", "face_sim_arcface", "fgis")


class MetricConfig(BaseModel):
    """Which models score the images; hub names or local folders."""

    model_config = ConfigDict(extra="forbid")

    clip: str = Field("openai/clip-vit-large-patch14", description="CLIP for CLIP-T and CLIP-I")
    dino: str = Field("facebook/dino-vits16", description="DINO ViT for DINO and FGIS")
    faces: ModelsConfig = Field(
        default_factory=ModelsConfig,
        description="fgid model set for FaceSim/FGIS; use the one the dataset was built with",
    )
    detect: DetectConfig = Field(default_factory=DetectConfig)
    facenet: str | None = Field(
        None,
        description="FaceNet VGGFace2 weights (20180402-114759-vggface2.pt) for FaceSim; "
        "None = the file in TORCH_HOME's checkpoints folder, where facenet-pytorch keeps it",
    )
    align_size: int = Field(512, description="side of the aligned crop that is parsed for FGIS")
    fid: Literal["inception", "dino", "none"] = Field(
        "inception", description="FID features: pytorch-fid InceptionV3, DINO CLS, or no FID"
    )
    device: str = "auto"
    batch_size: int = Field(16, ge=1, description="images per backbone call")


@dataclass
class ReferenceFeatures:
    clip: np.ndarray
    dino: np.ndarray
    face: np.ndarray | None  # the model set's identity embedding; None when none was had
    facenet: np.ndarray | None = None  # FaceNet embedding; None without a detected face
    regions: dict[str, np.ndarray] = field(default_factory=dict)  # region -> DINO embedding


class MetricModels:
    """The loaded scoring models; reference features are computed once per reference key."""

    def __init__(
        self,
        clip: ClipScorer,
        dino: DinoScorer,
        faces: FaceAnalyzer,
        fid: FeatureNetwork | None = None,
        facenet: FaceNetScorer | None = None,
    ) -> None:
        self.clip, self.dino, self.faces, self.fid = clip, dino, faces, fid
        self.facenet = facenet  # None: no FaceNet column (NaN)
        self._references: dict[str, ReferenceFeatures] = {}

    @classmethod
    def load(cls, config: MetricConfig | None = None) -> MetricModels:
        config = config or MetricConfig()
        kw = {"device": config.device, "batch_size": config.batch_size}
        clip = ClipScorer.from_pretrained(config.clip, **kw)
        dino = DinoScorer.from_pretrained(config.dino, **kw)
        faces = FaceAnalyzer.load(config.faces, config.detect, config.align_size)
        fid: FeatureNetwork | None = None
        if config.fid == "inception":
            fid = InceptionFeatures(**kw)
        elif config.fid == "dino":
            fid = DinoFeatures(dino)
        from training.weights import facenet_path

        path, facenet = facenet_path(config.facenet), None
        if path.is_file():
            facenet = FaceNetScorer(load_facenet(path), **kw)
        else:
            log.warning("no FaceNet weights at %s: FaceSim is n/a, FaceSim-ArcFace is scored", path)
        return cls(clip, dino, faces, fid, facenet)

    def describe(self) -> dict[str, str]:
        return {
            "clip": self.clip.name,
            "dino": self.dino.name,
            "faces": self.faces.name,
            "facenet": self.facenet.name if self.facenet else "none",
            "fid": self.fid.name if self.fid else "none",
        }

    def reference_features(self, references: Sequence[Reference]) -> list[ReferenceFeatures]:
        todo = list({r.key: r for r in references if r.key not in self._references}.values())
        if todo:
            images = [as_array(r.image) for r in todo]
            clip = self.clip.image_embeddings(images)
            dino = self.dino.embeddings(images)
            found = self.faces.analyze(images)
            crops = [
                region_crops(image, r.label_map) for image, r in zip(images, todo, strict=True)
            ]
            region_embeds = self._embed_regions(crops)
            facenet = self._facenet(images, found)
            dim = self.faces.models.embedder.dim
            for n, ref in enumerate(todo):
                face = found[n].embedding if found[n] is not None else None
                if face is None and ref.embedding is not None and len(ref.embedding) == dim:
                    face = np.asarray(ref.embedding, dtype=np.float32)
                self._references[ref.key] = ReferenceFeatures(
                    clip[n], dino[n], face, regions=region_embeds[n], facenet=facenet[n]
                )
        return [self._references[r.key] for r in references]

    def _facenet(self, images: list[np.ndarray], faces: list) -> list[np.ndarray | None]:
        """FaceNet embeddings of the detected faces, in one batch; None where none."""
        hits = [i for i, f in enumerate(faces) if f is not None and f.box is not None]
        out: list[np.ndarray | None] = [None] * len(images)
        if self.facenet is None or not hits:
            return out
        vectors = self.facenet.embeddings([images[i] for i in hits], [faces[i].box for i in hits])
        for i, vector in zip(hits, vectors, strict=True):
            out[i] = vector
        return out

    def _embed_regions(self, crops: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        """One DINO call for every region crop of every image."""
        flat = [(n, name, crop) for n, per in enumerate(crops) for name, crop in per.items()]
        vectors = self.dino.embeddings([crop for _, _, crop in flat]) if flat else []
        out: list[dict[str, np.ndarray]] = [{} for _ in crops]
        for (n, name, _), vector in zip(flat, vectors, strict=True):
            out[n][name] = vector
        return out

    def score(
        self,
        references: Sequence[Reference],
        images: Sequence[Image.Image | np.ndarray],
        prompts: Sequence[str],
    ) -> list[dict]:
        """Per-image metrics for generated `images`, each drawn from `references[i]` and
        `prompts[i]`. Returns one dict per image: METRICS plus face_found and fgis_regions."""
        if not len(references) == len(images) == len(prompts):
            raise ValueError("references, images and prompts must have the same length")
        if not images:
            return []
        refs = self.reference_features(references)
        arrays = [as_array(i) for i in images]
        clip_images = self.clip.image_embeddings(arrays)
        clip_texts = self.clip.text_embeddings(list(prompts))
        dino = self.dino.embeddings(arrays)
        faces = self.faces.analyze(arrays)
        crops = [
            {} if face is None else region_crops(face.aligned, face.label_map) for face in faces
        ]
        for per, ref in zip(crops, refs, strict=True):
            for name in [name for name in per if name not in ref.regions]:
                del per[name]  # only regions present in both are compared
        region_embeds = self._embed_regions(crops)
        facenet = self._facenet(arrays, faces)
        rows = []
        for n, ref in enumerate(refs):
            face = faces[n]
            if ref.face is None:
                arcface = float("nan")
            else:
                arcface = 0.0 if face is None else 100 * cosine(ref.face, face.embedding)
            if ref.facenet is None or self.facenet is None:
                face_sim = float("nan")
            else:
                face_sim = 0.0 if facenet[n] is None else 100 * cosine(ref.facenet, facenet[n])
            common = [name for name in REGIONS if name in region_embeds[n]]
            if face is None:
                fgis = 0.0
            elif not common:
                fgis = float("nan")
            else:
                sims = [cosine(ref.regions[name], region_embeds[n][name]) for name in common]
                fgis = 100 * float(np.mean(sims))
            rows.append(
                {
                    "clip_t": 100 * float(clip_images[n] @ clip_texts[n]),
                    "clip_i": 100 * float(clip_images[n] @ ref.clip),
                    "dino": 100 * float(dino[n] @ ref.dino),
                    "face_sim": face_sim,
                    "face_sim_arcface": arcface,
                    "fgis": fgis,
                    "face_found": face is not None,
                    "fgis_regions": common,
                }
            )
        return rows

    def fid_features(self, images: Sequence[Image.Image | np.ndarray]) -> np.ndarray | None:
        return None if self.fid is None else self.fid.features(images)
