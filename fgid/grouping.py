"""Identity grouping, exact and near-duplicate flags from face embeddings, in bounded time.

Clustering is a deterministic leader algorithm over samples in plan order: each face joins the
identity whose running centroid is nearest if that distance is within the threshold, otherwise
it starts a new identity. It runs once over all shards at finalize time, so the same embeddings
always give the same identities, whichever shard or worker produced them.

Scaling (ARCHITECTURE.md, "Identity threshold"): samples go in blocks of BLOCK. Each block is
searched at once against the centroids as they stood before it (CANDIDATES per sample);
inside the block, samples are resolved one by one against those candidates, re-ranked exactly,
and, exactly, against every centroid the block itself changed or created. With the exact float
search this is the leader algorithm exactly; above EXACT_UP_TO samples (cosine only) the block
search compares CODE_BITS-bit sign codes instead (ann.HammingTable), about 20x cheaper per
pair, so the candidates are approximate and the decisions still exact distances. Where there is
a GPU, the search stays exact at every size (ann.exact_table).

Thresholds (GroupConfig documents and overrides them):
- dlib 128-d descriptors: euclidean 0.6 — dlib's own "same person" threshold (99.38% on LFW).
- ArcFace 512-d normed embeddings: cosine distance 0.6 (similarity 0.4), a common operating point
  for buffalo_l verification; near duplicates at cosine distance 0.05.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fgid import ann
from fgid.schema import IDENTITY_SCHEMA

DEFAULTS = {
    # embedding dim -> (metric, identity threshold, near-duplicate threshold)
    128: ("euclidean", 0.6, 0.15),
    512: ("cosine", 0.6, 0.05),
}
BLOCK = 256  # samples searched together; the in-block exact part grows with it
CANDIDATES = 16  # centroids per sample from the block search, re-ranked exactly
EXACT_UP_TO = 50_000  # samples clustered with the exact float search
CODE_BITS = 512  # sign-code length of the approximate search (ann.HammingTable)
SMALL_GROUP = 64  # near duplicates: identities up to this size are compared in batches
EXACT_GROUP = 20_000  # larger identities use a kNN search within the identity
NEAR_NEIGHBOURS = 32


def resolve(dim: int, metric: str | None, threshold: float | None, near: float | None):
    """Fill unset settings from the defaults for this embedding size (0.0 is a setting)."""
    default = DEFAULTS.get(dim, ("cosine", 0.6, 0.05))
    return (
        default[0] if metric is None else metric,
        default[1] if threshold is None else threshold,
        default[2] if near is None else near,
    )


def unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)


def distances(vectors: np.ndarray, points: np.ndarray, metric: str) -> np.ndarray:
    """(..., N, D) x (..., M, D) -> (..., N, M) distances."""
    if metric == "cosine":
        return 1.0 - unit(vectors) @ np.swapaxes(unit(points), -1, -2)
    sq = (
        (vectors**2).sum(-1)[..., :, None]
        + (points**2).sum(-1)[..., None, :]
        - 2.0 * vectors @ np.swapaxes(points, -1, -2)
    )
    return np.sqrt(np.maximum(sq, 0.0))


class _Centroids:
    """Running sums and counts per identity, and the search table of their centroids."""

    def __init__(self, dim: int, cosine: bool, exact: bool, small: bool, device: str) -> None:
        self.cosine = cosine
        # float64 sums make a small exact search equal the one-by-one algorithm; past that it
        # is not bit-exact anyway, and float32 halves the largest table (1 GB at 200k).
        self.sums = ann.Rows(dim, np.float64 if small else np.float32)
        self.counts = np.zeros(1024, np.int64)
        if exact:
            self.table = ann.exact_table(dim, cosine, device)
        else:
            self.table = ann.HammingTable(dim, CODE_BITS)

    def __len__(self) -> int:
        return self.sums.size

    def point(self, ids: np.ndarray | int) -> np.ndarray:
        """What a query is compared with: the unit centroid (cosine) or the centroid."""
        if isinstance(ids, np.ndarray):
            centroid = self.sums.take(ids) / self.counts[ids][:, None]
            return unit(centroid) if self.cosine else centroid
        centroid = self.sums.get(ids) / self.counts[ids]
        return centroid / max(np.sqrt(centroid @ centroid), 1e-12) if self.cosine else centroid

    def seed(self, sums: np.ndarray, counts: np.ndarray) -> None:
        """Start with identities made before: their running sums (taken over, not copied:
        at 200k identities they are 400 MB) and member counts."""
        self.sums.adopt(sums)
        self.counts = np.zeros(max(1024, 2 * len(counts)), np.int64)
        self.counts[: len(counts)] = counts
        ids = np.arange(len(counts))
        for lo in range(0, len(ids), 65536):
            self.table.set(ids[lo : lo + 65536], self.point(ids[lo : lo + 65536]))

    def join(self, identity: int, vector: np.ndarray) -> None:
        self.sums.add(identity, vector)
        self.counts[identity] += 1

    def create(self, vector: np.ndarray) -> int:
        identity = self.sums.append(vector)
        if identity == len(self.counts):
            self.counts = np.concatenate([self.counts, np.zeros_like(self.counts)])
        self.counts[identity] = 1
        return identity


def _distance(query: np.ndarray, points: np.ndarray, cosine: bool) -> np.ndarray:
    """One query (D,) against points (..., D) that are already unit (cosine) or centroids."""
    if cosine:
        return 1.0 - points @ query
    sq = query @ query + (points**2).sum(-1) - 2.0 * points @ query
    return np.sqrt(np.maximum(sq, 0.0))


def _lowest(dist: np.ndarray, ids: np.ndarray) -> tuple[float, int]:
    """The smallest distance and, among ties, the lowest id (what a scan in id order picks)."""
    best = dist.min()
    return float(best), int(ids[dist == best].min())


def cluster(
    embeddings: np.ndarray,
    metric: str,
    threshold: float,
    *,
    exact: bool | None = None,
    seed: tuple[np.ndarray, np.ndarray] | None = None,
    rows: np.ndarray | None = None,
    device: str = "auto",
) -> np.ndarray:
    """Leader clustering in row order -> identity per row (0, 1, ... in order of first use).

    `rows` clusters only those rows of `embeddings`, in that order (one label per row given),
    without copying them out: at a million 512-d faces a copy is 2 GB.

    `seed` (sums (k, D), counts (k,)) starts from k identities already made, as the clustering
    of earlier rows left them: ids 0..k-1 are those, new ones follow from k.
    `exact=None` picks the exact search up to EXACT_UP_TO rows; above, the exact search on a
    GPU where there is one (`device`, as models.device: "auto", "cpu", "cuda[:N]"), else sign
    codes (cosine only: the codes estimate angles, not euclidean distances)."""
    x = np.asarray(embeddings, np.float32)
    n, dim = (len(x) if rows is None else len(rows)), x.shape[1]
    labels = np.empty(n, np.int64)
    cosine = metric == "cosine"
    seeded = 0 if seed is None else int(seed[1].sum())
    small = n + seeded <= EXACT_UP_TO
    where = "cpu" if small or device == "cpu" else ann.search_device(device)
    if exact is None:
        exact = small or where != "cpu"
    state = _Centroids(dim, cosine, exact or not cosine, small, where)
    if seeded:
        state.seed(*seed)
    for start in range(0, n, BLOCK):
        block = slice(start, start + BLOCK) if rows is None else rows[start : start + BLOCK]
        raw = x[block].astype(np.float64)
        labels[start : start + len(raw)] = _cluster_block(raw, state, threshold, exact)
    return labels


def _cluster_block(raw: np.ndarray, state: _Centroids, threshold: float, exact: bool):
    queries = unit(raw) if state.cosine else raw
    found = state.table.search(queries.astype(np.float32), CANDIDATES)
    # Distances to the candidates as they stand now; exact while the block leaves them alone.
    before = np.full(found.shape, np.inf)
    valid = found >= 0
    if valid.any():
        points = state.point(found[valid])
        before[valid] = _distance_rows(queries[np.nonzero(valid)[0]], points, state.cosine)
    changed: dict[int, int] = {}  # identity -> row of `points` below
    ids = np.empty(len(raw), np.int64)
    points = np.empty_like(raw)
    labels = np.empty(len(raw), np.int64)
    for r, query in enumerate(queries):
        best_d, best = np.inf, -1
        row = found[r]
        free = valid[r] & np.fromiter((c not in changed for c in row), bool, len(row))
        if free.any():
            best_d, best = _lowest(np.where(free, before[r], np.inf), row)
        elif exact and valid[r].all() and len(state) > len(row):
            # Every candidate was changed by this block: the nearest unchanged centroid may lie
            # past them, so scan all (rare; only in exact mode).
            every = np.arange(len(state))
            best_d, best = _lowest(_distance(query, state.point(every), state.cosine), every)
        if changed:
            m = len(changed)
            near_d, near = _lowest(_distance(query, points[:m], state.cosine), ids[:m])
            if (near_d, near) < (best_d, best):
                best_d, best = near_d, near
        if best >= 0 and best_d <= threshold:
            state.join(best, raw[r])
        else:
            best = state.create(raw[r])
        slot = changed.setdefault(best, len(changed))
        ids[slot], points[slot] = best, state.point(best)
        labels[r] = best
    m = len(changed)
    state.table.set(ids[:m], points[:m])
    return labels


def _distance_rows(queries: np.ndarray, points: np.ndarray, cosine: bool) -> np.ndarray:
    """Row-wise distance between queries[i] and points[i]."""
    if cosine:
        return 1.0 - (queries * points).sum(1)
    sq = (queries**2).sum(1) + (points**2).sum(1) - 2.0 * (queries * points).sum(1)
    return np.sqrt(np.maximum(sq, 0.0))


def near_duplicates(
    embeddings: np.ndarray, identities: np.ndarray, metric: str, threshold: float
) -> np.ndarray:
    """Index of the earliest earlier row of the same identity within `threshold`, else -1.

    Only rows of one identity are compared, so the cost is the sum of squared identity sizes;
    identities above EXACT_GROUP rows use a kNN search within the identity instead."""
    n = len(embeddings)
    result = np.full(n, -1, dtype=np.int64)
    if n < 2:
        return result
    order = np.argsort(identities, kind="stable")  # each identity's rows, in row order
    starts = np.r_[0, np.flatnonzero(np.diff(identities[order])) + 1]
    sizes = np.diff(np.r_[starts, n])
    for size in np.unique(sizes[sizes > 1]):
        firsts = starts[sizes == size]
        if size <= SMALL_GROUP:
            # Groups of one size in one batched product, about 32 MB at a time.
            step = max(1, (1 << 23) // (size * embeddings.shape[1]))
            for lo in range(0, len(firsts), step):
                members = order[firsts[lo : lo + step, None] + np.arange(size)]
                dist = distances(embeddings[members], embeddings[members], metric)
                _first_close(dist, members, members, threshold, result)
        else:
            for first in firsts:
                _near_in_group(embeddings, order[first : first + size], metric, threshold, result)
    return result


def _first_close(dist, rows, cols, threshold, result, offset: int = 0) -> None:
    """result[rows[i]] = cols[first j < i + offset with dist[i, j] <= threshold]."""
    earlier = np.arange(dist.shape[-1])[None, :] < (np.arange(dist.shape[-2]) + offset)[:, None]
    close = (dist <= threshold) & earlier
    has = close.any(-1)
    first = close.argmax(-1)
    src = np.take_along_axis(cols, first, axis=-1) if cols.ndim > 1 else cols[first]
    result[rows[has]] = src[has]


def _near_in_group(embeddings, members, metric, threshold, result) -> None:
    vectors = embeddings[members]
    if len(members) <= EXACT_GROUP:
        for lo in range(0, len(members), 1024):
            rows = members[lo : lo + 1024]
            dist = distances(vectors[lo : lo + 1024], vectors[: lo + len(rows)], metric)
            _first_close(dist, rows, members[: lo + len(rows)], threshold, result, offset=lo)
        return
    table = ann.VectorTable(vectors.shape[1], metric == "cosine")
    points = unit(vectors) if metric == "cosine" else vectors
    table.set(np.arange(len(members)), points)
    found = table.search(points, NEAR_NEIGHBOURS)
    safe = np.maximum(found, 0)
    dist = distances(vectors[:, None, :], vectors[safe], metric)[:, 0, :]
    ok = (found >= 0) & (found < np.arange(len(members))[:, None]) & (dist <= threshold)
    first = np.where(ok, found, len(members)).min(1)
    has = first < len(members)
    result[members[has]] = members[first[has]]


def assign(
    kept: pa.Table,
    embeddings: np.ndarray,
    metric: str,
    threshold: float,
    near: float,
    previous: tuple[pa.Array, pa.Array] | None = None,
    device: str = "auto",
) -> pa.Table:
    """IDENTITY_SCHEMA table, one row per kept sample (`key`, `shard`, `sha256`, `label`).
    `device` is where a big clustering searches (cluster()).

    `previous` (identity and identity_source per kept row, null where there is none) keeps the
    identities of an earlier build: those rows keep theirs, and the others are clustered after
    them, starting from the earlier clusters' centroids in order of first appearance. An old
    sample never changes identity; a new one joins an old identity or starts a new one."""
    n = kept.num_rows
    if not n:
        return IDENTITY_SCHEMA.empty_table()
    keys = kept["key"].combine_chunks()
    rows = np.arange(n)
    # Exact duplicates: same content hash as an earlier row (first appearance wins).
    hashes = pc.dictionary_encode(pc.fill_null(kept["sha256"], "")).combine_chunks()
    _, first_of_hash = np.unique(hashes.indices.to_numpy(), return_index=True)
    exact_of = first_of_hash[hashes.indices.to_numpy()]
    is_exact = exact_of != rows

    label = kept["label"].combine_chunks()
    labelled = pc.fill_null(pc.greater(pc.utf8_length(label), 0), False).to_numpy(False)
    if previous is None:
        previous = (pa.nulls(n, pa.string()), pa.nulls(n, pa.string()))
    old_names, old_sources = (_array(pc.cast(a, pa.string())) for a in previous)
    old = pc.is_valid(old_names).to_numpy(False)
    todo = np.flatnonzero(~labelled & ~old)
    # Every row's name is taken from [label names | old names | cluster names] by position.
    choice = np.where(old, n + rows, rows)
    cluster_names = pa.array([], pa.string())
    if len(todo):
        seed, seed_names = _seed(old_names, old_sources, embeddings)
        clusters = cluster(embeddings, metric, threshold, seed=seed, rows=todo, device=device)
        # Named after the first member's key, not a running number: the name stays the same
        # when other identities are removed (takedowns) or added, and it never collides.
        # New ids follow the seeds without gaps, in order of first use.
        _, first = np.unique(clusters[clusters >= len(seed_names)], return_index=True)
        fresh = keys.take(pa.array(todo[clusters >= len(seed_names)][first]))
        cluster_names = pa.concat_arrays(
            [seed_names, pc.binary_join_element_wise("cluster-", fresh, "")]
        )
        choice[todo] = 2 * n + clusters
    label_names = pc.binary_join_element_wise("label-", label, "")
    table = pa.concat_arrays([label_names.cast(pa.string()), old_names, cluster_names])
    names = table.take(pa.array(choice))
    sources = pc.if_else(
        pa.array(old), old_sources, pc.if_else(pa.array(labelled), "label", "cluster")
    )
    codes = pc.dictionary_encode(names).indices.to_numpy(False)
    near_of = near_duplicates(embeddings, codes, metric, near)
    is_near = (near_of >= 0) & ~is_exact
    return pa.table(
        {
            "key": keys,
            "shard": kept["shard"],
            "identity": names,
            "identity_source": sources,
            "identity_size": pa.array(np.bincount(codes)[codes], pa.int32()),
            "duplicate_of": _keys_where(keys, exact_of, is_exact),
            "near_duplicate_of": _keys_where(keys, np.maximum(near_of, 0), is_near),
        },
        schema=IDENTITY_SCHEMA,
    )


def _array(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    return values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values


def _seed(names: pa.Array, sources: pa.Array, embeddings: np.ndarray):
    """((sums, counts), names) of the clusters among the old rows, in order of first appearance;
    (None, []) without any. Summed a block of rows at a time in float64, and kept in float64
    where cluster() can still be exact, in float32 above (as cluster() then sums)."""
    is_cluster = pc.fill_null(pc.equal(sources, "cluster"), False)
    rows = np.flatnonzero(is_cluster.to_numpy(False))
    if not len(rows):
        return None, pa.array([], pa.string())
    encoded = pc.dictionary_encode(names.take(pa.array(rows)))
    codes = encoded.indices.to_numpy(False).astype(np.int64)
    k = len(encoded.dictionary)
    dtype = np.float64 if len(rows) <= EXACT_UP_TO else np.float32
    sums = np.zeros((k, embeddings.shape[1]), dtype)
    step = 16384
    for lo in range(0, len(rows), step):
        part = codes[lo : lo + step]
        order = np.argsort(part, kind="stable")
        found, starts = np.unique(part[order], return_index=True)
        block = embeddings[rows[lo : lo + step][order]].astype(np.float64)
        sums[found] += np.add.reduceat(block, starts, axis=0)
    return (sums, np.bincount(codes, minlength=k)), encoded.dictionary.cast(pa.string())


def _keys_where(keys: pa.Array, rows: np.ndarray, mask: np.ndarray) -> pa.Array:
    missing = pa.scalar(None, pa.string())
    return pc.if_else(pa.array(mask, pa.bool_()), keys.take(pa.array(rows)), missing)
