"""A finished build as a Hugging Face dataset repository: the files, their layout, the push.

The repository holds the done shards (`shards/NNNNN.tar`, which the card's front matter names as
the `webdataset` data files the Hub viewer and `datasets.load_dataset` read), their Parquet
indexes under `index/`, the card `README.md` (front matter from fgid.card) with its plots and
build report beside it, and `summary.json` and `identities.parquet`. The build's own record
(`build.json`) stays behind: its config holds the builder's local paths. A local DEST gets the
layout written into it; a repository id is staged in a temporary folder and uploaded.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import storage
from fgid.card import CARD_DIR
from fgid.dataset import IDENTITIES_FILE, SHARDS_DIR, SUMMARY_FILE, Dataset, NotADataset
from fgid.errors import FailureError, UsageError

INDEX_DIR = "index"  # the shard indexes in a published repository
README = "README.md"
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")
HUB_PREFIX = "hf://datasets/"


def hub_repo(dest: str) -> str | None:
    """The repository id DEST names (`user/name` or hf://datasets/user/name), else None.

    A `user/name` that exists as a local path, or starts like one, is a folder."""
    name = dest.removeprefix(HUB_PREFIX)
    if not REPO_ID.fullmatch(name) or name.endswith((".git", "..")):
        return None
    if dest.startswith(HUB_PREFIX):
        return name
    return None if os.path.lexists(dest) else name


def repository_files(dataset: Dataset) -> dict[str, str]:
    """{path in the repository: URL of the file in the build}, for every file published."""
    card = dataset.path(CARD_DIR)
    readme = storage.join(card, README)
    if not storage.exists(readme):
        raise NotADataset(f"{dataset.root} has no {CARD_DIR}/{README}: rerun the build to finish")
    files = {README: readme}
    for url in storage.list_files(card):
        if storage.name(url) != README:
            files[storage.name(url)] = url
    for shard in dataset.done_shards():
        paths = dataset.shard(shard)
        files[f"{SHARDS_DIR}/{storage.name(paths.tar)}"] = paths.tar
        files[f"{INDEX_DIR}/{storage.name(paths.index)}"] = paths.index
    for name in (SUMMARY_FILE, IDENTITIES_FILE):
        files[name] = dataset.path(name)
    return files


def write_repository(dataset: Dataset, folder: Path) -> list[str]:
    """Write the repository layout into `folder`; returns the paths written, sorted.

    Shards of a local build are hard-linked where the file system allows (a shard is never
    rewritten in place: takedowns and caption runs replace it by rename), other files copied.
    Shards and indexes of an earlier publish that the build no longer has are deleted."""
    files = repository_files(dataset)
    for kept in (SHARDS_DIR, INDEX_DIR):
        for old in sorted((folder / kept).glob("*")) if (folder / kept).is_dir() else []:
            if f"{kept}/{old.name}" not in files and old.is_file():
                old.unlink()
    for relative, url in sorted(files.items()):
        target = folder / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.publishing")
        temporary.unlink(missing_ok=True)
        if storage.is_remote(url):
            with storage.open_input(url) as source, open(temporary, "wb") as out:
                shutil.copyfileobj(source, out, 1 << 20)
        else:
            try:
                if not url.endswith(".tar"):
                    raise OSError("copied, so that editing the copy never edits the build")
                os.link(url, temporary)
            except OSError:
                shutil.copyfile(url, temporary)
        os.replace(temporary, target)
    return sorted(files)


def publish(out_dir: str, dest: str, *, private: bool = True) -> dict:
    """Publish the finished build at `out_dir` to a local folder or a Hub dataset repository."""
    dataset = Dataset.open(out_dir, finished=True)
    repo = hub_repo(dest)
    if repo is None:
        if storage.is_remote(dest):
            raise UsageError(f"publish writes to a local folder or a Hub repository id, not {dest}")
        folder = Path(dest)
        if folder.exists() and not folder.is_dir():
            raise UsageError(f"{dest} exists and is not a folder")
        files = write_repository(dataset, folder)
        return {"dest": str(folder), "repo": None, "files": files}
    return _push(dataset, repo, private)


def _push(dataset: Dataset, repo: str, private: bool) -> dict:
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError

    if huggingface_hub.is_offline_mode():
        raise FailureError(f"cannot push to {repo}: the Hub is offline (HF_HUB_OFFLINE is set)")
    api = huggingface_hub.HfApi()
    with tempfile.TemporaryDirectory(prefix="fgid-publish-") as staging:
        files = write_repository(dataset, Path(staging))
        try:
            api.create_repo(repo, repo_type="dataset", private=private, exist_ok=True)
            commit = api.upload_folder(
                folder_path=staging,
                repo_id=repo,
                repo_type="dataset",
                commit_message=f"fgid publish: {len(dataset.done_shards())} shards",
            )
        except HfHubHTTPError as error:
            raise FailureError(f"cannot push to {repo}: {str(error).splitlines()[0]}") from None
        except OSError as error:  # no network, DNS, a refused connection
            raise FailureError(f"cannot push to {repo}: {type(error).__name__}: {error}") from None
    return {"dest": f"{HUB_PREFIX}{repo}", "repo": repo, "files": files, "commit": str(commit)}
