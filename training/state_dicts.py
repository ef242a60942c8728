"""Comparing a state dict with the keys and shapes a model expects, for strict released loads."""

from __future__ import annotations

from collections.abc import Mapping

import torch

SHOWN = 5  # names listed per kind of difference; the rest are counted


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
