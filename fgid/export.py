"""Export a built dataset to the ConsistentID reference trainer's layout (FGID_SPEC §4).

Layout under OUT (local folder or s3:// prefix):

    OUT/images/<key>.jpg          resize_IMG: the aligned face, 512x512 RGB
    OUT/parsing/<key>.png         parsing_mask_IMG: CelebAMask-HQ label map (0..18), 512x512 8-bit
    OUT/id_embeds/<key>.pt        id_embed_file_*: torch.save of a float32 tensor (1, dim)
    OUT/fgid_consistentid.json    a JSON list, one record per sample; written last
    OUT/fgid_export_files.json    every file this export wrote: a rerun deletes only files named
                                  there (a user's own files in OUT are never touched)

Record paths are relative to OUT. The reference loader joins each path with a root of its own
(image_root_path, parsing_root_path, faceid_root_path), so all three roots are OUT: pass
`--data_json_file OUT/fgid_consistentid.json --data_root_path OUT --parsing_root_path OUT
--faceid_root_path OUT` to its training script. An export holds OUT's lock while it runs.
"""

from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image

import storage
from fgid import schema
from fgid.dataset import Dataset, DatasetInUse
from fgid.shardtar import (
    IMAGE_FORMATS,
    check_key,
    decode_embedding,
    decode_text,
    image_size,
    is_key,
)
from storage.lock import OutputLock

SIZE = 512  # the reference trainer's resolution, and the (1, 512) of its id embedding
REFERENCE_DIM = 512
JSON_NAME = "fgid_consistentid.json"
MANIFEST_NAME = "fgid_export_files.json"
FOLDERS = {"images": ".jpg", "parsing": ".png", "id_embeds": ".pt"}
MEMBERS = (schema.IMAGE, schema.MASK, schema.EMBEDDING, schema.CAPTION, schema.FACIAL)


class EmbeddingDimError(ValueError):
    """The dataset's identity embeddings are not the 512-d ones the reference trainer needs."""


def export_consistentid(
    dataset: str,
    out_dir: str,
    *,
    include_duplicates: bool = False,
    allow_any_dim: bool = False,
    jpeg_quality: int = 95,
) -> dict:
    """Write the reference layout for every kept sample of `dataset`; returns a summary.

    Exact duplicates (identities.parquet `duplicate_of`) are left out unless
    `include_duplicates`. Embeddings that are not 512-d (the lite set's 128-d dlib descriptors)
    are refused unless `allow_any_dim`, which writes (1, dim) tensors the reference trainer
    cannot use as is. Reruns rewrite only files whose bytes changed and delete files of
    samples no longer exported (after a takedown), so OUT mirrors the dataset."""
    out = str(out_dir).rstrip("/")
    data = Dataset.open(str(dataset).rstrip("/"), finished=True)
    summary_dim = data.summary().get("embedding_dim")
    if summary_dim is not None:  # refused before anything is written
        _check_dim(np.zeros(int(summary_dim)), None, allow_any_dim)
    storage.makedirs(out)
    with OutputLock(out, "fgid export", error=DatasetInUse):
        return _export(data, out, include_duplicates, allow_any_dim, jpeg_quality)


def _export(
    data: Dataset, out: str, include_duplicates: bool, allow_any_dim: bool, jpeg_quality: int
) -> dict:
    # Keys are checked (Dataset.identities): they become file names under OUT.
    rows = data.identities().to_pylist()
    wanted = {r["key"]: r for r in rows if include_duplicates or not r["duplicate_of"]}
    counts = {"written": 0, "unchanged": 0, "resized": 0}
    records, dim = [], None
    written: set[str] = set()
    for shard in sorted({r["shard"] for r in wanted.values()}):
        for key, members in data.samples(shard):
            if key not in wanted or any(m not in members for m in MEMBERS):
                continue
            embedding = decode_embedding(members[schema.EMBEDDING])
            dim = _check_dim(embedding, dim, allow_any_dim)
            image, mask, resized = _to_reference_size(
                members[schema.IMAGE], members[schema.MASK], jpeg_quality
            )
            counts["resized"] += resized
            files = {"images": image, "parsing": mask, "id_embeds": _tensor_bytes(embedding)}
            paths = {}
            for folder, content in files.items():
                name = f"{check_key(key)}{FOLDERS[folder]}"
                paths[folder] = f"{folder}/{name}"  # relative to OUT, the loader's root
                changed = _put(storage.join(out, folder, name), content)
                written.add(paths[folder])
                counts["written" if changed else "unchanged"] += 1
            records.append(_record(key, wanted[key]["identity"], members, paths))
    missing = sorted(set(wanted) - {r["key"] for r in records})
    if missing:
        raise ValueError(
            f"{len(missing)} samples in identities.parquet are in no shard: {missing[:5]}"
        )
    # The JSON is the commit point: a reader who finds it finds every file it names.
    json_url = storage.join(out, JSON_NAME)
    # ASCII escapes: the reference reads it with a bare open(), i.e. the locale's encoding.
    storage.atomic_write_text(json_url, json.dumps(records, indent=1) + "\n")
    pruned = _prune(out, written)
    return {
        "json": json_url,
        "root": out,
        "samples": len(records),
        "skipped_duplicates": len(rows) - len(wanted),
        "embedding_dim": dim,
        "reference_compatible": dim in (None, REFERENCE_DIM),
        "files": counts["written"] + counts["unchanged"],
        "written": counts["written"],
        "unchanged": counts["unchanged"],
        "resized_to_512": counts["resized"],
        "pruned": pruned,
    }


def _check_dim(embedding: np.ndarray, dim: int | None, allow_any_dim: bool) -> int:
    this = int(embedding.size)
    if dim is not None and this != dim:
        raise ValueError(f"embeddings of different sizes in one dataset: {dim} and {this}")
    if this != REFERENCE_DIM and not allow_any_dim:
        raise EmbeddingDimError(
            f"this dataset's identity embeddings are {this}-d; the ConsistentID reference "
            f"trainer needs {REFERENCE_DIM}-d InsightFace embeddings, shape (1, {REFERENCE_DIM}). "
            "Build it with `--models full`, or pass allow_any_dim to export (1, "
            f"{this}) tensors anyway."
        )
    return this


def _to_reference_size(jpg: bytes, png: bytes, quality: int) -> tuple[bytes, bytes, bool]:
    """The aligned image and label map at 512x512; the shard's bytes when already that size."""
    image_size(jpg, ("JPEG",))  # format and pixel checks before anything is decoded
    image_size(png, ("PNG",))
    image = Image.open(io.BytesIO(jpg), formats=list(IMAGE_FORMATS))
    mask = Image.open(io.BytesIO(png), formats=["PNG"])
    if image.size == (SIZE, SIZE) and mask.size == (SIZE, SIZE) and mask.mode == "L":
        return jpg, png, False
    # Nearest for the label map: interpolating class ids would invent classes at edges.
    mask = mask.convert("L").resize((SIZE, SIZE), Image.Resampling.NEAREST)
    image = image.convert("RGB").resize((SIZE, SIZE), Image.Resampling.LANCZOS)
    image_out, mask_out = io.BytesIO(), io.BytesIO()
    image.save(image_out, format="JPEG", quality=quality)
    mask.save(mask_out, format="PNG")
    return image_out.getvalue(), mask_out.getvalue(), True


def _tensor_bytes(embedding: np.ndarray) -> bytes:
    import torch  # only here: importing fgid stays light

    # A copy, so the saved storage holds exactly these dim floats and nothing else.
    tensor = torch.from_numpy(np.array(embedding, dtype=np.float32).reshape(1, -1))
    buffer = io.BytesIO()
    torch.save(tensor, buffer)
    return buffer.getvalue()


def _record(key: str, identity: str, members: dict[str, bytes], paths: dict[str, str]) -> dict:
    return {
        "key": key,
        "identity": identity,
        "resize_IMG": paths["images"],
        "parsing_mask_IMG": paths["parsing"],
        "vqa_llva": decode_text(members[schema.CAPTION]),
        "vqa_llva_more_face_detail": decode_text(members[schema.FACIAL]),
        # Both point at one file: our embedding is computed once, on the source image (the
        # reference has one from the source and one from the resized crop; its loader prefers
        # id_embed_file_origin).
        "id_embed_file_resize": paths["id_embeds"],
        "id_embed_file_origin": paths["id_embeds"],
    }


def _put(url: str, data: bytes) -> bool:
    """Write `url` atomically unless it already holds exactly `data`; True if written."""
    if storage.exists(url) and storage.size(url) == len(data) and storage.read_bytes(url) == data:
        return False
    storage.atomic_write_bytes(url, data)
    return True


def _prune(out: str, written: set[str]) -> int:
    """Delete files an earlier export wrote that this one did not (samples removed, or now
    duplicates), then record what this one wrote. Only files named in the earlier manifest go:
    anything else under OUT is not ours to delete."""
    manifest = storage.join(out, MANIFEST_NAME)
    before: list[str] = []
    if storage.exists(manifest):
        before = json.loads(storage.read_text(manifest)).get("files", [])
    removed = 0
    for rel in sorted(set(before) - written):
        folder, _, name = rel.partition("/")
        # A manifest is data too: only names this module could have written are acted on.
        stem = name.removesuffix(FOLDERS.get(folder, "\0"))
        if folder in FOLDERS and stem != name and is_key(stem):
            url = storage.join(out, folder, name)
            if storage.exists(url):
                storage.remove(url)
                removed += 1
    storage.atomic_write_text(manifest, json.dumps({"files": sorted(written)}, indent=0) + "\n")
    return removed
