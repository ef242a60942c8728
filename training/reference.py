"""A decoded face sample (`Reference`), and one reference face per identity for evaluation.

`decode_sample` turns a sample's tar members into arrays; training uses it for targets and
references alike. Members are untrusted: the key must have our form, images are checked for
format and pixel count before they are decoded, and `.npy` is loaded without pickles.
`load_references` picks one image per identity (an original, not an exact copy; the choice
depends only on the seed) and fetches just those samples by random access.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from fgid import schema
from fgid.dataset import shard_of
from fgid.shardtar import (
    UnsafeSample,
    check_key,
    decode_embedding,
    decode_meta,
    decode_text,
    image_size,
)
from fgid.stages.align import apply_transform
from training.pairs import IdentityTable, draw
from training.stream import shard_urls
from training.tarindex import ShardReader


@dataclass
class Reference:
    key: str
    identity: str
    image: np.ndarray  # (H, W, 3) uint8 RGB, the aligned face
    label_map: np.ndarray  # (H, W) uint8 CelebAMask-HQ classes
    embedding: np.ndarray  # (D,) float32 identity embedding, zeros when none was recorded
    landmarks: np.ndarray  # (5, 2) float32 in aligned-image pixels
    caption: str
    facial: str
    gender: str | None
    age: float | None


def decode_sample(members: dict[str, bytes], key: str, identity: str) -> Reference:
    """A Reference from a sample's members (jpg, mask.png, id.npy, json, caption/facial.txt);
    UnsafeSample (a ValueError) when a member is missing or fails a check."""
    check_key(key)
    missing = [m for m in (schema.META, schema.IMAGE, schema.MASK) if m not in members]
    if missing:
        raise UnsafeSample("missing_member", f"sample {key} has no {', '.join(missing)}")
    meta = decode_meta(members[schema.META])
    # Header checks first: cv2 would allocate whatever the header declares.
    image_size(members[schema.IMAGE], ("JPEG",))
    image_size(members[schema.MASK], ("PNG",))
    image = cv2.imdecode(np.frombuffer(members[schema.IMAGE], np.uint8), cv2.IMREAD_COLOR)
    label_map = cv2.imdecode(np.frombuffer(members[schema.MASK], np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None or label_map is None:
        raise ValueError(f"sample {key}: image or label map does not decode")
    if schema.EMBEDDING in members:
        embedding = decode_embedding(members[schema.EMBEDDING])
    else:  # the reference trainer's rule for a face without an embedding
        embedding = np.zeros(int(meta.get("embedding", {}).get("dim", 0)))
    transform = np.asarray(meta["aligned"]["transform"], dtype=np.float64)
    source_points = np.asarray(meta["face"]["landmarks"], dtype=np.float64)
    return Reference(
        key=key,
        identity=identity,
        image=cv2.cvtColor(image, cv2.COLOR_BGR2RGB),
        label_map=label_map.astype(np.uint8),
        embedding=embedding.astype(np.float32).reshape(-1),
        landmarks=apply_transform(transform, source_points),
        caption=decode_text(members.get(schema.CAPTION, b"")),
        facial=decode_text(members.get(schema.FACIAL, b"")),
        gender=meta.get("gender"),
        age=meta.get("age"),
    )


def shard_id(url: str) -> int:
    """00012.tar -> 12."""
    return shard_of(url)


def load_references(
    dataset_url: str, identities: int | None = None, seed: int = 0
) -> list[Reference]:
    """One Reference per identity of a finalized build (local folder or s3://), in identity
    name order; `identities` keeps that many identities, drawn with `seed`."""
    if identities is not None and identities < 0:
        raise ValueError("identities must be >= 0")
    urls = {shard_id(u): u for u in shard_urls(str(dataset_url))}
    table = IdentityTable.read(str(dataset_url), shards=set(urls))
    names = [str(n) for n in table.names]
    if identities is not None and identities < len(names):
        names = sorted(draw(seed, "identities").sample(names, identities))
    reader = ShardReader()
    found = []
    for name in names:
        key = table.representative(name, seed)
        members = reader.read(urls[int(table.shards[table.row(key)])], key)
        found.append(decode_sample(members, key, name))
    return found
