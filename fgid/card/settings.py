"""What the publisher says about a dataset (OUT/card.yaml) and the Hub front matter it feeds."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, fields

import yaml

import storage
from fgid.dataset import Dataset

SETTINGS_FILE = "card.yaml"
MAX_TEXT = 4000  # characters per free-text setting: a card, not a document store
MAX_BYTES = 64 * 1024  # the whole file; read only after its size is checked
# Hugging Face Hub size categories: (upper bound, name); n at or above the last bound is n>1T.
SIZE_CATEGORIES = [
    (1_000, "n<1K"),
    (10_000, "1K<n<10K"),
    (100_000, "10K<n<100K"),
    (1_000_000, "100K<n<1M"),
    (10_000_000, "1M<n<10M"),
    (100_000_000, "10M<n<100M"),
    (1_000_000_000, "100M<n<1B"),
    (10_000_000_000, "1B<n<10B"),
    (100_000_000_000, "10B<n<100B"),
    (1_000_000_000_000, "100B<n<1T"),
]
TASK_CATEGORIES = ["text-to-image", "image-to-text", "image-segmentation"]
TAGS = ["faces", "face-parsing", "identity", "fgid", "webdataset"]
SHARD_FILES = "shards/*.tar"  # relative to the repository root the card is published at


@dataclass(frozen=True)
class CardSettings:
    """OUT/card.yaml, every key optional. Unknown keys are refused, so a typo never silently
    publishes the defaults (a licence of `other`, no contact)."""

    license: str = "other"  # a Hub licence id, e.g. cc-by-4.0; `other` until the publisher knows
    license_name: str = ""  # with `license: other`: the licence's name
    license_link: str = ""  # with `license: other`: where its text is
    # The card names no folder: the same dataset reads the same wherever it is kept.
    pretty_name: str = "FGID face dataset"
    contact: str = ""  # who takes removal requests: an e-mail address or a URL
    sources: str = ""  # where the photos came from and on what terms
    consent: str = ""  # how the people shown agreed to be in the dataset
    sample_faces: int = 12  # tiles in the card's sample grid; 0 leaves the faces out of the card


def size_category(samples: int) -> str:
    return next((name for bound, name in SIZE_CATEGORIES if samples < bound), "n>1T")


def _check(key: str, value: object, default: object) -> object:
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 16:
            raise ValueError(f"{SETTINGS_FILE}: {key} must be a whole number from 0 to 16")
        return value
    if not isinstance(value, str) or len(value) > MAX_TEXT:
        raise ValueError(f"{SETTINGS_FILE}: {key} must be text of at most {MAX_TEXT} characters")
    if key == "pretty_name" and not value.strip():
        raise ValueError(f"{SETTINGS_FILE}: pretty_name must not be empty")
    if key == "license" and (not value or any(c.isspace() for c in value)):
        raise ValueError(f"{SETTINGS_FILE}: license must be a Hub licence id such as cc-by-4.0")
    return value.strip()


def read_settings(dataset: Dataset) -> CardSettings:
    """OUT/card.yaml validated, or the defaults when there is none."""
    url = dataset.path(SETTINGS_FILE)
    if not storage.exists(url):
        return CardSettings()
    if storage.size(url) > MAX_BYTES:
        raise ValueError(f"{SETTINGS_FILE} is larger than {MAX_BYTES} bytes")
    try:
        raw = yaml.safe_load(storage.read_text(url)) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"{SETTINGS_FILE} is not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{SETTINGS_FILE} must be a mapping of setting: value")
    defaults = {f.name: f.default for f in fields(CardSettings)}
    for key in raw:
        if key not in defaults:
            near = difflib.get_close_matches(str(key), defaults, n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            raise ValueError(f"{SETTINGS_FILE}: unknown setting {key!r}{hint}")
    return CardSettings(**{k: _check(k, v, defaults[k]) for k, v in raw.items()})


def front_matter(summary: dict, settings: CardSettings) -> str:
    """The card's YAML header, as the Hugging Face Hub reads it."""
    data = {
        "pretty_name": settings.pretty_name,
        "license": settings.license,
        **({"license_name": settings.license_name} if settings.license_name else {}),
        **({"license_link": settings.license_link} if settings.license_link else {}),
        "language": ["en"],  # the captions
        "annotations_creators": ["machine-generated"],
        "task_categories": TASK_CATEGORIES,
        "size_categories": [size_category(summary["samples"])],
        "tags": TAGS,
        "configs": [
            {"config_name": "default", "data_files": [{"split": "train", "path": SHARD_FILES}]}
        ],
    }
    body = yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=1000)
    return f"---\n{body}---\n"
