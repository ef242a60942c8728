"""Matplotlib figures for the card and the build report, rendered to PNG bytes."""

from __future__ import annotations

import base64
import io

# Figure without pyplot: no global backend state, safe in a worker thread (the finalize task).
from matplotlib.figure import Figure

BAR = "#4c72b0"
FIGSIZE, DPI = (6.4, 3.6), 100  # 640 x 360 px


def figure(title: str) -> tuple[Figure, object]:
    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=11)
    ax.spines[["top", "right"]].set_visible(False)
    return fig, ax


def png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    # No Software/date chunks: the same summary renders to the same bytes.
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def no_data(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#666")
    ax.set_axis_off()


def barh(ax, labels: list[str], values: list[float], fmt: str = "%g") -> None:
    bars = ax.barh(labels, values, color=BAR)
    ax.bar_label(bars, fmt=fmt, fontsize=8, padding=2)
    ax.invert_yaxis()  # first label on top, as in the tables


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")
