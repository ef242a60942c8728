"""Identity pairing: for a target sample, a deterministic other image of the same identity.

identities.parquet (one row per kept sample, written by finalize) is read once into numpy
arrays: about 100 bytes a sample, so a worker holds a million-sample table in ~100 MB. The
reference for (target, seed, round) is drawn with a generator seeded by exactly those, among
the identity's other images: never the target itself, never a byte-identical copy of it, and
exact duplicates (`duplicate_of`) only when nothing else is left. An identity with no other
image pairs the target with itself (`has_reference` False). Keys in shards that finished after
finalize are missing from the table and pair with themselves too.

Why not pair inside the shuffle buffer, which needs no extra reads: an identity's images are
rarely in one buffer at once (a large dataset has far more identities than a buffer holds
samples), so most targets would go unpaired, and the pair would depend on buffer timing rather
than on the seed. Random access costs one ranged read per target and stays exact.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

import storage
from fgid.dataset import IDENTITIES_FILE, Dataset

COLUMNS = ["key", "shard", "identity", "duplicate_of"]


def draw(seed: int, *parts: object) -> random.Random:
    """A generator seeded by a string (hashed with SHA-512 by `random`), identical in every
    process and run, unlike `hash()` of a tuple."""
    return random.Random(":".join(str(p) for p in (seed, *parts)))


@dataclass(frozen=True)
class IdentityTable:
    keys: np.ndarray  # str, sorted
    shards: np.ndarray  # int32, the shard holding each key
    identity: np.ndarray  # int32 code into `names`
    names: np.ndarray  # str, identity names, sorted
    root: np.ndarray  # int64 row of the first copy of the same bytes (itself if unique)
    members: np.ndarray  # int64 rows grouped by identity, key order within a group
    starts: np.ndarray  # int64 (identities + 1,) group bounds in `members`

    @classmethod
    def read(cls, dataset_url: str, shards: set[int] | None = None) -> IdentityTable:
        """The table of a finished build; `shards` keeps only rows in those shard ids."""
        dataset = Dataset(dataset_url)
        url = dataset.path(IDENTITIES_FILE)
        if not storage.exists(url):
            raise FileNotFoundError(f"{url} not found: identity pairing needs a finalized build")
        # Keys are checked there: they name files (evaluation images) and tar members.
        table = dataset.identities(COLUMNS).to_pydict()
        rows = sorted(zip(*(table[c] for c in COLUMNS), strict=True))
        if shards is not None:
            rows = [r for r in rows if r[1] in shards]
        keys = np.array([r[0] for r in rows], dtype=str)
        names, identity = np.unique(np.array([r[2] for r in rows], dtype=str), return_inverse=True)
        dup_of = np.array([r[3] or r[0] for r in rows], dtype=str)
        root = np.searchsorted(keys, dup_of)
        if len(keys):
            # A copy whose original is not in the table (its shard is unfinished) is its own root.
            lost = (root >= len(keys)) | (keys[np.minimum(root, len(keys) - 1)] != dup_of)
            root[lost] = np.arange(len(keys))[lost]
        members = np.argsort(identity, kind="stable").astype(np.int64)
        starts = np.searchsorted(identity[members], np.arange(len(names) + 1)).astype(np.int64)
        return cls(
            keys=keys,
            shards=np.array([r[1] for r in rows], dtype=np.int32),
            identity=identity.astype(np.int32),
            names=names,
            root=root.astype(np.int64),
            members=members,
            starts=starts,
        )

    def __len__(self) -> int:
        return len(self.keys)

    def row(self, key: str) -> int:
        """Row of `key`, or -1 when the table does not know it."""
        i = int(np.searchsorted(self.keys, key))
        return i if i < len(self.keys) and self.keys[i] == key else -1

    def identity_of(self, key: str) -> str | None:
        i = self.row(key)
        return None if i < 0 else str(self.names[self.identity[i]])

    def group(self, identity: str) -> np.ndarray:
        """Rows of one identity, in key order."""
        code = int(np.searchsorted(self.names, identity))
        if code >= len(self.names) or self.names[code] != identity:
            raise KeyError(identity)
        return self.members[self.starts[code] : self.starts[code + 1]]

    def candidates(self, row: int) -> np.ndarray:
        """Rows that may serve as `row`'s reference, best kind first available."""
        code = self.identity[row]
        group = self.members[self.starts[code] : self.starts[code + 1]]
        other = group[self.root[group] != self.root[row]]
        originals = other[self.root[other] == other]
        return originals if len(originals) else other

    def reference(self, key: str, seed: int, round_: int = 0) -> tuple[str, int] | None:
        """(key, shard) of the reference for target `key`, or None to use the target itself."""
        row = self.row(key)
        if row < 0:
            return None
        found = self.candidates(row)
        if not len(found):
            return None
        pick = int(found[draw(seed, "reference", round_, key).randrange(len(found))])
        return str(self.keys[pick]), int(self.shards[pick])

    def representative(self, identity: str, seed: int) -> str:
        """One image to stand for `identity` (evaluation, inference): an original, not a copy."""
        group = self.group(identity)
        originals = group[self.root[group] == group]
        group = originals if len(originals) else group
        return str(
            self.keys[int(group[draw(seed, "representative", identity).randrange(len(group))])]
        )
