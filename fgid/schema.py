"""The shard format, defined once: tar member names, index columns, statuses and reasons.

A sample in a shard is the members `{key}.{ext}` for each ext in SAMPLE_FIELDS. Keys carry no
dots, so a plain webdataset reader splits them correctly. Every input, kept or rejected, has a
row in the shard's Parquet index.
"""

from __future__ import annotations

import pyarrow as pa

FORMAT_VERSION = 1

# Tar member extensions; every reader and writer names members through these.
IMAGE = "jpg"
MASK = "mask.png"
EMBEDDING = "id.npy"
CAPTION = "caption.txt"
FACIAL = "facial.txt"
META = "json"

# tar member extension -> what it holds
SAMPLE_FIELDS: dict[str, str] = {
    IMAGE: "aligned face, RGB, FFHQ-style crop of align.size pixels",
    MASK: "label map, 8-bit single channel, CelebAMask-HQ class ids (0..18)",
    EMBEDDING: "identity embedding, float32 (dim,) as produced by the embedder",
    CAPTION: "raw answer to CAPTION_PROMPT",
    FACIAL: "raw answer to FACIAL_PROMPT",
    META: "provenance and per-sample metadata (see sample_meta in fgid/pipeline.py)",
}

# Sample keys as our writer makes them (fgid.inputs.sample_key: 20 hex digits); readers accept
# this wider form and nothing else, so a key can never name a folder, a parent or a device.
KEY_PATTERN = r"[A-Za-z0-9_-]{1,128}"


def caption_member(field: str) -> str:
    """The member of caption field `field` (a caption run's `--field`): `{key}.{field}.txt`."""
    return f"{field}.txt"


# FGID_SPEC §4, verbatim.
CAPTION_PROMPT = (
    "Please describe the people in the image, including their gender, age, clothing, "
    "facial expressions, and any other distinguishing features."
)
FACIAL_PROMPT = (
    "Describe this person's facial features for me, including face, ears, eyes, nose, and mouth."
)

# FGID_SPEC §2: CelebAMask-HQ label order used by BiSeNet (facexlib).
PARSING_CLASSES = (
    "background",
    "skin",
    "l_brow",
    "r_brow",
    "l_eye",
    "r_eye",
    "eyeglasses",
    "l_ear",
    "r_ear",
    "earring",
    "nose",
    "mouth",
    "u_lip",
    "l_lip",
    "neck",
    "necklace",
    "cloth",
    "hair",
    "hat",
)
CLASS_ID = {name: i for i, name in enumerate(PARSING_CLASSES)}

# The five facial regions, in the order ConsistentID consumes them.
REGIONS: dict[str, tuple[int, ...]] = {
    "face": (1,),
    "eyes": (4, 5),
    "ears": (7, 8),
    "nose": (10,),
    "mouth": (12, 13),  # lips only; 11 (inner mouth) is not used by the reference
}

STATUS_OK = "ok"
STATUS_REJECTED = "rejected"

# Rejection reasons: the first word of `reason`; details may follow after ": ".
REASONS = {
    "unreadable": "the path could not be opened or read",
    "not_regular_file": "a directory, FIFO, socket or device where an image file was expected",
    "empty_file": "zero bytes",
    "file_too_large": "more bytes than decode.max_bytes (download.max_bytes for URLs)",
    "not_an_image": "no image decoder recognised the bytes",
    "truncated": "the image data ends early or is corrupt",
    "too_large": "more pixels than decode.max_pixels (decompression bomb guard)",
    "too_small": "shorter side below decode.min_side",
    "no_face": "the detector found no face above detect.min_score",
    "too_many_faces": "more faces than detect.max_faces",
    "face_too_small": "the primary face box is smaller than detect.min_face_size",
    "stage_error": "a model raised on this sample; the message names the stage",
    # Downloads (fgid.download); HTTP statuses not listed here are `http_error`.
    "http_400": "the server answered 400 Bad Request",
    "http_401": "the server answered 401 Unauthorized",
    "http_403": "the server answered 403 Forbidden",
    "http_404": "the server answered 404 Not Found",
    "http_410": "the server answered 410 Gone",
    "http_429": "the server answered 429 Too Many Requests, after download.retries retries",
    "http_451": "the server answered 451 Unavailable For Legal Reasons",
    "http_500": "the server answered 500 Internal Server Error, after download.retries retries",
    "http_502": "the server answered 502 Bad Gateway, after download.retries retries",
    "http_503": "the server answered 503 Service Unavailable, after download.retries retries",
    "http_504": "the server answered 504 Gateway Timeout, after download.retries retries",
    "http_error": "another HTTP error status; the detail names it",
    "timeout": "no complete answer within download.timeout, after download.retries retries",
    "connection_error": "the host could not be reached or dropped the connection, after retries",
    "bad_url": "not an http(s) URL, a redirect to another scheme or to credentials, or too "
    "many redirects",
    "blocked_address": "the URL's host is at a loopback, private, link-local or other "
    "non-public address (download.private_addresses allows them)",
    "opted_out": "the server sent an X-Robots-Tag directive refusing this use (noai, noimageai, "
    "noindex, noimageindex, none); download.honour_opt_out",
}

INDEX_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.int32()),
        ("source", pa.string()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("sha256", pa.string()),
        ("label", pa.string()),  # identity label from the source (e.g. CelebA), if any
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("face_count", pa.int32()),
        ("det_score", pa.float32()),
        ("age", pa.float32()),
        ("gender", pa.string()),
        ("regions", pa.list_(pa.string())),
        ("embedding", pa.list_(pa.float32())),
        # What the input's table, archive or shard said about it (fgid.sources); null for plain
        # files. Last and nullable: older shard indexes read with this schema get nulls here.
        ("source_caption", pa.string()),
        ("source_license", pa.string()),
        ("source_url", pa.string()),
    ]
)

# Written by finalize, one row per kept sample.
IDENTITY_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.int32()),
        ("identity", pa.string()),
        ("identity_source", pa.string()),  # "label" | "cluster"
        ("identity_size", pa.int32()),
        ("duplicate_of", pa.string()),  # exact content duplicate of this key
        ("near_duplicate_of", pa.string()),  # embedding near-duplicate of this key
    ]
)


def shard_name(shard_id: int) -> str:
    return f"{shard_id:05d}"


def reason_code(reason: str | None) -> str | None:
    return None if reason is None else reason.split(":", 1)[0]
