"""Training checkpoints: `checkpoint-{step}` folders, pruned to a limit, resumed from the latest.

A checkpoint is Accelerate's full state (models, optimiser, scheduler, RNG, registered objects)
plus `trainer_state.json`, written last: a folder without that file is an interrupted save and is
neither resumed from nor counted. Saving goes to a temporary folder that is renamed into place,
so a crash mid-save never leaves a half-written `checkpoint-{step}`.

The run's exported weights go to `final/` the same way: written into `.final.tmp`, its own
`trainer_state.json` (the step they come from) last, then renamed. A run is complete when `final/`
holds the state of its last checkpoint; until then a rerun exports again.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

STATE_FILE = "trainer_state.json"
FINAL_DIR = "final"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f"checkpoint-{step}"


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under `output_dir`, oldest step first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _NAME.match(path.name)
        if match and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    done = list_checkpoints(output_dir)
    return done[-1][1] if done else None


def prune_checkpoints(output_dir: str | Path, limit: int | None) -> list[Path]:
    """Delete the oldest checkpoints so that saving one more keeps at most `limit`
    (the diffusers examples' `checkpoints_total_limit`). Also clears interrupted saves."""
    root = Path(output_dir)
    removed = []
    if root.is_dir():
        for stale in root.glob(".checkpoint-*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
    if limit is None:
        return removed
    done = list_checkpoints(root)
    for _, path in done[: max(0, len(done) - (limit - 1))]:
        shutil.rmtree(path)
        removed.append(path)
    return removed


def save_checkpoint(
    accelerator, output_dir: str | Path, step: int, limit: int | None, state: dict[str, Any]
) -> Path | None:
    """Save Accelerate's state as `checkpoint-{step}`; returns the folder (None off the main
    process). `state` (JSON) is the trainer's own bookkeeping: step, samples seen, config."""
    final = checkpoint_dir(output_dir, step)
    tmp = Path(output_dir) / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        prune_checkpoints(output_dir, limit)
        # Every process writes its own RNG state into it: it must exist before any does.
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return None
    (tmp / STATE_FILE).write_text(json.dumps({"step": step, **state}, indent=2, sort_keys=True))
    if final.exists():  # a rerun that reached the same step again
        shutil.rmtree(final)
    tmp.rename(final)
    return final


def resolve_resume(output_dir: str | Path, resume_from: str | None) -> Path | None:
    """`None` -> no resume; "latest" -> the newest complete checkpoint (or None if there is
    none yet, so the same command starts and restarts a run); anything else -> that folder."""
    if resume_from is None:
        return None
    if resume_from == "latest":
        return latest_checkpoint(output_dir)
    path = Path(resume_from)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {STATE_FILE})")
    return path


def load_checkpoint(accelerator, path: str | Path) -> dict[str, Any]:
    """Restore Accelerate's state from `path`; returns the trainer state saved with it."""
    accelerator.load_state(str(path))
    return json.loads((Path(path) / STATE_FILE).read_text())


def final_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / FINAL_DIR


def final_step(output_dir: str | Path) -> int | None:
    """The step of a complete `final/` export, or None when there is none (or it is unfinished,
    or from before exports recorded their step)."""
    state = final_dir(output_dir) / STATE_FILE
    try:
        return int(json.loads(state.read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save_final(output_dir: str | Path, step: int, write: Callable[[Path], None]) -> Path:
    """`write(folder)` the exported weights, then mark them as step `step` and move them to
    `final/`. A crash at any point leaves no `final/` claiming this step."""
    final = final_dir(output_dir)
    tmp = Path(output_dir) / f".{FINAL_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    (tmp / STATE_FILE).write_text(json.dumps({"step": step}, indent=2))  # last: the commit point
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final
