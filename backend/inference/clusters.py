"""Clusters of a project's images for a diverse label stream, and typicality for a typical-first cold start.

Label Studio's uncertainty sampling orders the candidate tasks by how many tasks of the same prediction ``cluster``
the annotator has already labeled, then by ``score``. For those counts to mean anything a task's cluster must
stay the same from version to version, so the clusters here are built to be **stable**:

* embeddings come from a network that never changes (``backend.inference.embeddings``: the ImageNet body), and a
  task is embedded once;
* the cluster count grows with the pool (``target_clusters``: about sqrt(n/2)), never shrinks;
* a cluster's centroid, once made, is never moved: new tasks join the nearest one, and when the pool has grown
  enough for more clusters, the new centroids are placed (k-means++ seeding, then k-means over the new ones only)
  while the old ones stay put. A task therefore changes cluster only when a new cluster is made closer to it.
  Cluster ids are the centroids' positions: 0, 1, 2, ... in the order they were made.

Typicality is TypiClust's (Hacohen et al., 2022): the inverse of the mean distance to the K nearest neighbours.
At low budgets, labeling the most typical image of each not-yet-covered cluster beats labeling uncertain ones.
"""

from __future__ import annotations

import math

import numpy as np

MAX_CLUSTERS = 64
KNN = 20  # neighbours in the typicality estimate (TypiClust uses 20)
LLOYD_ITERATIONS = 25
RANK_SCALE = 10.0  # typical-first score = rank / (rank + RANK_SCALE): rank 0 -> ~0, rank 10 -> ~0.5


def target_clusters(n: int, cap: int = MAX_CLUSTERS) -> int:
    """How many clusters a pool of ``n`` images gets: ~sqrt(n / 2) (150 images: 9; 5,000: 50), 1 to ``cap``."""
    return max(1, min(cap, n, round(math.sqrt(n / 2)))) if n > 0 else 0


def _sq_dist(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    return np.maximum((x * x).sum(1)[:, None] - 2.0 * x @ c.T + (c * c).sum(1)[None, :], 0.0)


def assign(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """The nearest centroid of each row of ``x`` (ties: the older cluster)."""
    if len(x) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.argmin(_sq_dist(x, centroids), axis=1)


def _seed_more(x: np.ndarray, centroids: np.ndarray, extra: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding of ``extra`` more centroids around the existing ones (none: the first one at random)."""
    chosen = [c for c in centroids]
    if not chosen:
        chosen.append(x[rng.integers(len(x))])
        extra -= 1
    for _ in range(extra):
        d = _sq_dist(x, np.stack(chosen)).min(axis=1)
        total = d.sum()
        index = rng.choice(len(x), p=d / total) if total > 0 else rng.integers(len(x))
        chosen.append(x[index])
    return np.stack(chosen).astype(np.float32)


def grow(x: np.ndarray, centroids: np.ndarray | None, k: int, seed: int = 0) -> np.ndarray:
    """Centroids for ``x`` with ``k`` clusters: the given ones kept as they are and ``k - len(centroids)`` new
    ones fitted (k-means in which only the new centroids move). With no centroids yet, a plain k-means."""
    x = np.asarray(x, dtype=np.float32)
    old = np.zeros((0, x.shape[1]), np.float32) if centroids is None else np.asarray(centroids, np.float32)
    if k <= len(old) or len(x) == 0:
        return old
    rng = np.random.default_rng(seed)
    c = _seed_more(x, old, k - len(old), rng)
    fixed = len(old)
    for _ in range(LLOYD_ITERATIONS):
        labels = assign(x, c)
        moved = False
        for j in range(fixed, len(c)):
            members = x[labels == j]
            if len(members):
                new = members.mean(axis=0)
                moved |= not np.allclose(new, c[j], atol=1e-6)
                c[j] = new
        if not moved:
            break
    return c


def typicality(x: np.ndarray, knn: int = KNN, chunk: int = 1024) -> np.ndarray:
    """1 / (mean distance to the ``knn`` nearest other rows): high = typical (a dense region), low = an outlier."""
    x = np.asarray(x, dtype=np.float32)
    n = len(x)
    if n <= 1:
        return np.ones(n, dtype=np.float32)
    k = min(knn, n - 1)
    out = np.empty(n, dtype=np.float32)
    for start in range(0, n, chunk):
        d = np.sqrt(_sq_dist(x[start:start + chunk], x))
        d[np.arange(len(d)), np.arange(start, start + len(d))] = np.inf  # not its own neighbour
        nearest = np.partition(d, k - 1, axis=1)[:, :k]
        out[start:start + chunk] = 1.0 / (nearest.mean(axis=1) + 1e-6)
    return out


def typical_first_scores(typical: np.ndarray, labels: np.ndarray, candidates: np.ndarray,
                         covered: dict[int, int] | None = None) -> np.ndarray:
    """A score for each candidate (low = served first) that serves the most typical image of each uncovered
    cluster first, largest clusters first, then the second most typical of each, and so on.

    ``typical``/``labels``: every embedded image's typicality and cluster; ``candidates``: a bool mask of the
    unlabeled ones (the rest only count as coverage, with ``covered``: cluster -> labeled images). An image's
    rank is its typicality rank among its cluster's candidates plus its cluster's labeled count; ties of rank
    go to the larger cluster. Scores lie in [0, 1): Label Studio orders by ``cluster`` coverage and then by
    them; sorting the Data Manager by score gives the same order. The mapping from rank to score does not depend
    on the pool's size, so importing more tasks changes only the scores of tasks whose rank changed.
    """
    covered = covered or {}
    labels = np.asarray(labels)
    scores = np.zeros(int(np.sum(candidates)), dtype=np.float64)
    if not len(scores):
        return scores
    sizes = {int(c): int(np.sum(labels == c)) for c in np.unique(labels)}
    by_size = sorted(sizes, key=lambda c: (-sizes[c], c))
    order_of = {c: i for i, c in enumerate(by_size)}
    ranks = np.zeros(len(labels), dtype=np.float64)
    for c in sizes:
        members = np.flatnonzero((labels == c) & candidates)
        ordered = members[np.argsort(-typical[members], kind="stable")]
        ranks[ordered] = np.arange(len(ordered)) + covered.get(c, 0)
    cand = np.flatnonzero(candidates)
    tie = np.array([(order_of[int(labels[i])] + 0.5) / len(by_size) for i in cand])
    raw = ranks[cand] + tie
    return raw / (raw + RANK_SCALE)
