"""A grid of sample aligned faces beside their parsing overlay, with captions, from the shards."""

from __future__ import annotations

import contextlib
import io
import textwrap
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from fgid import shardtar
from fgid.dataset import Dataset
from fgid.schema import CAPTION, IMAGE, MASK, PARSING_CLASSES

SAMPLE_FACES = 12  # tiles in the grid: 3 rows of 4
COLUMNS, FACE, GAP, CAPTION_LINES = 4, 160, 12, 4
FONT_SIZE, LINE = 11, 14
ALPHA = 0.5  # overlay weight: the face stays visible under the colours
# The CelebAMask-HQ visualisation palette (face-parsing.PyTorch), one colour per class id.
PALETTE = np.array(
    [
        (0, 0, 0), (255, 85, 0), (255, 170, 0), (255, 0, 85), (255, 0, 170), (0, 255, 0),
        (85, 255, 0), (170, 255, 0), (0, 255, 85), (0, 255, 170), (0, 0, 255), (85, 0, 255),
        (170, 0, 255), (0, 85, 255), (0, 170, 255), (255, 255, 0), (255, 255, 85),
        (255, 255, 170), (255, 0, 255),
    ],
    dtype=np.uint8,
)  # fmt: skip
assert len(PALETTE) == len(PARSING_CLASSES)


@dataclass(frozen=True)
class Tile:
    key: str
    image: np.ndarray  # (H, W, 3) uint8 aligned face
    label_map: np.ndarray  # (H, W) uint8 class ids
    caption: str


def pick_samples(dataset: Dataset, count: int) -> list[tuple[int, str]]:
    """(shard, key) of up to `count` kept samples: the first of each identity in index order,
    then other distinct samples; duplicates never. Deterministic for a given dataset."""
    if count <= 0:
        return []
    table = dataset.identities(["key", "shard", "identity", "duplicate_of", "near_duplicate_of"])
    firsts, others, seen = [], [], set()
    for row in table.to_pylist():
        if row["duplicate_of"] or row["near_duplicate_of"]:
            continue
        pick = (row["shard"], row["key"])
        (others if row["identity"] in seen else firsts).append(pick)
        seen.add(row["identity"])
        if len(firsts) >= count:
            break
    return (firsts + others)[:count]


def read_tiles(dataset: Dataset, picks: list[tuple[int, str]]) -> list[Tile]:
    """The picked samples' face, label map and caption, read from their shards in pick order."""
    found: dict[str, Tile] = {}
    for shard in sorted({s for s, _ in picks}):
        wanted = {k for s, k in picks if s == shard}
        # Closed at once when the last wanted sample is found: the shard's file too.
        with contextlib.closing(dataset.samples(shard)) as samples:
            for key, members in samples:
                if key not in wanted or not {IMAGE, MASK} <= members.keys():
                    continue
                found[key] = Tile(
                    key,
                    shardtar.decode_rgb(members[IMAGE]),
                    shardtar.decode_label_map(members[MASK]),
                    shardtar.decode_text(members.get(CAPTION, b"")).strip(),
                )
                wanted.discard(key)
                if not wanted:
                    break  # the rest of the shard is never read
    return [found[k] for _, k in picks if k in found]


def overlay(image: np.ndarray, label_map: np.ndarray) -> np.ndarray:
    """The label map's colours blended over the face; background (class 0) left as it is."""
    if label_map.shape != image.shape[:2]:
        resized = Image.fromarray(label_map).resize(image.shape[1::-1], Image.Resampling.NEAREST)
        label_map = np.asarray(resized)
    ids = np.minimum(label_map, len(PALETTE) - 1)
    blended = image * (1 - ALPHA) + PALETTE[ids] * ALPHA
    return np.where((ids > 0)[..., None], blended, image).astype(np.uint8)


def _font(size: int = FONT_SIZE) -> ImageFont.FreeTypeFont:
    # The font matplotlib ships: present wherever the card's plots can be drawn.
    from matplotlib import font_manager

    return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)


def wrap(text: str, font: ImageFont.FreeTypeFont, width: int, lines: int) -> list[str]:
    """Greedy word wrap to `width` pixels, at most `lines` lines, an ellipsis when cut."""
    words, out, line = " ".join(text.split()).split(" "), [], ""
    for word in words:
        while font.getlength(word) > width:  # a word wider than the tile (a URL, a hash)
            cut = max(1, int(len(word) * width / font.getlength(word)) - 1)
            out.append(f"{line} {word[:cut]}".strip() if line else word[:cut])
            line, word = "", word[cut:]
        candidate = f"{line} {word}".strip()
        if font.getlength(candidate) <= width:
            line = candidate
        else:
            out.append(line)
            line = word
    if line:
        out.append(line)
    if len(out) > lines:
        out = out[:lines]
        out[-1] = textwrap.shorten(out[-1] + " …", width=max(4, len(out[-1])), placeholder=" …")
    return out


def _legend(draw: ImageDraw.ImageDraw, top: int, present: set[int], font) -> None:
    x = GAP
    for class_id in sorted(present - {0}):
        name = PARSING_CLASSES[class_id]
        draw.rectangle(
            (x, top + 2, x + 10, top + 12), fill=tuple(int(c) for c in PALETTE[class_id])
        )
        draw.text((x + 14, top), name, fill=(40, 40, 40), font=font)
        x += 14 + int(font.getlength(name)) + GAP
        if x > COLUMNS * (2 * FACE + GAP) - 80:  # legend wraps like text
            x, top = GAP, top + LINE + 2


def render_grid(tiles: list[Tile]) -> bytes:
    """PNG of the tiles: face | overlay, caption below; a colour legend of the classes shown."""
    font = _font()
    cell_w, cell_h = 2 * FACE + GAP, FACE + CAPTION_LINES * LINE + GAP
    rows = -(-len(tiles) // COLUMNS)
    columns = -(-len(tiles) // rows)  # 6 tiles: 2 rows of 3, not 4 + 2
    width = columns * cell_w + GAP
    height = rows * cell_h + GAP + 3 * (LINE + 2)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    present: set[int] = set()
    for i, tile in enumerate(tiles):
        x, y = GAP + (i % columns) * cell_w, GAP + (i // columns) * cell_h
        face = Image.fromarray(tile.image).resize((FACE, FACE), Image.Resampling.LANCZOS)
        parsed = Image.fromarray(overlay(tile.image, tile.label_map))
        canvas.paste(face, (x, y))
        canvas.paste(parsed.resize((FACE, FACE), Image.Resampling.LANCZOS), (x + FACE, y))
        text = wrap(tile.caption or "(no caption)", font, 2 * FACE, CAPTION_LINES)
        for n, line in enumerate(text):
            draw.text((x, y + FACE + 2 + n * LINE), line, fill=(30, 30, 30), font=font)
        present |= set(np.unique(tile.label_map).tolist()) & set(range(len(PALETTE)))
    _legend(draw, rows * cell_h + GAP, present, font)
    buf = io.BytesIO()
    canvas.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def sample_grid(dataset: Dataset, count: int = SAMPLE_FACES) -> bytes | None:
    """The grid PNG of up to `count` samples, or None when the dataset has none to show."""
    tiles = read_tiles(dataset, pick_samples(dataset, count))
    return render_grid(tiles) if tiles else None


def preview_jpeg(png: bytes, width: int = 640) -> bytes:
    """A small JPEG of the grid, for places that carry images inline (the Prefect artifact)."""
    with Image.open(io.BytesIO(png)) as image:
        scale = min(1.0, width / image.width)
        small = image.convert("RGB").resize(
            (round(image.width * scale), round(image.height * scale)), Image.Resampling.LANCZOS
        )
    buf = io.BytesIO()
    small.save(buf, format="JPEG", quality=80)
    return buf.getvalue()
