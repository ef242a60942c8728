"""Released checkpoints: read safely, and compared with the keys and shapes a model expects."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

SHOWN = 5  # names listed per kind of difference; the rest are counted


def torch_file(path: Path, mmap: bool = False):
    """torch.load with `weights_only` (no arbitrary objects), or ValueError in one line that
    names what went wrong (torch's own message alone can be a bare number for a foreign file).
    `mmap`: tensors mapped, not read, where the file's format allows it."""
    try:
        if mmap:
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # a file in torch's legacy format cannot be mapped
                pass
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for a foreign or unsafe file
        first = (str(error).strip().splitlines() or [""])[0][:200]
        reason = f"{type(error).__name__}: {first}" if first else type(error).__name__
        raise ValueError(f"{path}: not a torch checkpoint that loads safely ({reason})") from None


def check_state(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> None:
    """Raise ValueError, in one line, unless `state` has exactly `expected`'s keys and shapes.

    Each kind of difference is counted and its first names listed: a released checkpoint holds
    up to a few thousand tensors, so a wrong file must not print them all."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(
        f"{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}"
        for k in set(state) & set(expected)
        if tuple(state[k].shape) != tuple(expected[k].shape)
    )
    found = (("missing", missing), ("unexpected", unexpected), ("of another shape", shapes))
    problems = [
        f"{len(items)} {label}: {', '.join(items[:SHOWN])}{', ...' if len(items) > SHOWN else ''}"
        for label, items in found
        if items
    ]
    if problems:
        raise ValueError("; ".join(problems))
