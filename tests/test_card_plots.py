"""Card pieces that need no build: identity-size bins at 20,000 identities, size categories,
card.yaml validation, caption wrapping and the parsing overlay."""

from __future__ import annotations

import io
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from fgid.card.grid import PALETTE, _font, overlay, wrap
from fgid.card.plots import (
    identity_size_bins,
    identity_stats,
    images_per_identity_figure,
    plot_images_per_identity,
)
from fgid.card.settings import SETTINGS_FILE, read_settings, size_category
from fgid.dataset import Dataset


def long_tail_summary(identities: int = 20_000) -> dict:
    """Identity sizes with many singletons and a tail into the thousands, as real data has."""
    sizes = np.minimum(np.random.default_rng(0).zipf(1.8, identities), 3000)
    per_identity = Counter(int(s) for s in sizes)
    return {
        "identities": {
            "total": identities,
            "recognizable": int((sizes >= 2).sum()),
            "images_per_identity": {str(k): v for k, v in sorted(per_identity.items())},
        }
    }


def test_identity_sizes_bin_into_a_bounded_histogram():
    summary = long_tail_summary()
    per_identity = summary["identities"]["images_per_identity"]
    assert len(per_identity) > 200  # one bar per size would be a wall of labels
    bins = identity_size_bins(per_identity)
    assert sum(bins.values()) == 20_000
    assert list(bins)[:7] == ["1", "2", "3", "4", "5", "6-10", "11-20"]
    assert list(bins)[-1] == "2001-5000" and len(bins) == 14
    assert identity_size_bins({"1": 3, "2": 1}) == {"1": 3, "2": 1}
    assert identity_size_bins({"7": 2}) == {"1": 0, "2": 0, "3": 0, "4": 0, "5": 0, "6-10": 2}
    assert identity_size_bins({}) == {}
    assert identity_stats({"1": 3, "2": 1, "10": 1}) == {"mean": 3.0, "median": 1, "max": 10}


def test_images_per_identity_plot_stays_readable_at_20000_identities():
    summary = long_tail_summary()
    fig = images_per_identity_figure(summary)
    ax = fig.axes[0]
    fig.canvas.draw()  # tick labels exist only once drawn
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == list(identity_size_bins(summary["identities"]["images_per_identity"]))
    assert ax.get_yscale() == "log"
    assert "20,000 identities" in ax.get_title()
    # Plain counts on the log axis, and only the decades labelled.
    y_labels = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
    assert "10,000" in y_labels and not any("^" in t for t in y_labels)
    image = Image.open(io.BytesIO(plot_images_per_identity(summary)))
    assert image.size == (640, 360)


@pytest.mark.parametrize(
    ("samples", "category"),
    [
        (0, "n<1K"),
        (999, "n<1K"),
        (1_000, "1K<n<10K"),
        (9_999, "1K<n<10K"),
        (10_000, "10K<n<100K"),
        (524_258, "100K<n<1M"),  # the paper's FGID
        (1_000_000, "1M<n<10M"),
        (10**13, "n>1T"),
    ],
)
def test_size_category_follows_the_hub_buckets(samples, category):
    assert size_category(samples) == category


def test_card_settings_are_validated(tmp_path):
    dataset = Dataset(str(tmp_path))
    assert read_settings(dataset).license == "other"
    (tmp_path / SETTINGS_FILE).write_text("license: cc-by-4.0\ncontact: data@example.org\n")
    settings = read_settings(dataset)
    assert (settings.license, settings.contact, settings.sample_faces) == (
        "cc-by-4.0",
        "data@example.org",
        12,
    )
    for text, message in [
        ("licence: cc-by-4.0\n", "unknown setting 'licence' (did you mean license?)"),
        ("sample_faces: 40\n", "sample_faces must be a whole number from 0 to 16"),
        ("license: [a, b]\n", "license must be text"),
        ("license: cc by\n", "license must be a Hub licence id"),
        ("- a list\n", "must be a mapping"),
        ("license: {\n", "not valid YAML"),
        ("sources: " + "x" * 70_000 + "\n", "larger than"),
    ]:
        (tmp_path / SETTINGS_FILE).write_text(text)
        with pytest.raises(ValueError, match=re.escape(message)):
            read_settings(dataset)


def test_caption_wraps_to_the_tile_and_is_cut_with_an_ellipsis():
    font = _font()
    text = "A photo of a smiling woman with curly hair and a red scarf, " * 6
    lines = wrap(text, font, 320, 4)
    assert len(lines) == 4 and lines[-1].endswith("…")
    assert all(font.getlength(line) <= 320 for line in lines)
    assert wrap("short caption", font, 320, 4) == ["short caption"]
    long_word = wrap("x" * 400, font, 320, 4)  # a word wider than the tile is broken
    assert all(font.getlength(line) <= 320 for line in long_word)


def test_overlay_colours_classes_and_leaves_background():
    image = np.full((4, 4, 3), 100, np.uint8)
    labels = np.zeros((4, 4), np.uint8)
    labels[0, 0], labels[1, 1] = 1, 10  # skin, nose
    out = overlay(image, labels)
    assert (out[2:, 2:] == 100).all()
    for y, x, class_id in [(0, 0, 1), (1, 1, 10)]:
        expected = (100 * 0.5 + PALETTE[class_id] * 0.5).astype(np.uint8)
        assert (out[y, x] == expected).all()
    # A label map of another size (a hostile or older shard) is resized, not an error.
    assert overlay(np.zeros((8, 8, 3), np.uint8), labels).shape == (8, 8, 3)
