"""Which facial regions a label map holds: counted from one class histogram, they must be the
regions whose masks (the definition the trainers use) cover enough of the crop."""

from __future__ import annotations

import numpy as np

from fgid.schema import REGIONS
from fgid.stages.parse import MIN_REGION_FRACTION, region_mask, regions_present


def by_masks(label_map: np.ndarray) -> list[str]:
    least = MIN_REGION_FRACTION * label_map.size
    return [name for name in REGIONS if region_mask(label_map, name).sum() >= least]


def test_regions_present_agrees_with_the_region_masks():
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(300):
        side = int(rng.integers(8, 96))
        label_map = rng.integers(0, 19, (side, side), dtype=np.uint8)
        label_map[~(rng.random(19) < 0.5)[label_map]] = 0  # some classes absent
        label_map[rng.random(label_map.shape) < rng.random()] = rng.integers(0, 19)
        found = regions_present(label_map)
        assert found == by_masks(label_map)
        seen.add(len(found))
    assert len(seen) > 2  # maps with few and with many regions were both checked
    # Exactly at the threshold: 2e-4 of 500x500 is 50 pixels.
    label_map = np.zeros((500, 500), np.uint8)
    label_map.flat[:50] = REGIONS["nose"][0]
    assert regions_present(label_map) == ["nose"] == by_masks(label_map)
    label_map.flat[49] = 0
    assert regions_present(label_map) == [] == by_masks(label_map)
