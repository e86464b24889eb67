"""The label stream's building blocks: stable clusters, typicality, typical-first order, score spread, and the
order Label Studio's uncertainty sampling serves (emulated as ``next_task.py`` does it)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from PIL import Image

from backend.inference.clusters import assign, grow, target_clusters, typical_first_scores, typicality
from backend.inference.embeddings import EMBED_DIM, Embedder, from_bytes, to_bytes
from backend.inference.uncertainty import least_confidence, mean_confidence
from backend.jobs.stream_state import cluster_summary, next_tasks


def blobs(centres, per: int, spread: float = 0.05, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([np.asarray(c, np.float32) + spread * rng.standard_normal((per, len(c))) for c in centres])


def test_cluster_count_grows_with_the_pool():
    assert [target_clusters(n) for n in (0, 1, 3, 10, 150, 5000, 10**6)] == [0, 1, 1, 2, 9, 50, 64]


def test_growing_keeps_old_centroids_and_moves_tasks_only_into_new_clusters():
    x = blobs([(0, 0), (5, 0)], 30)
    first = grow(x, None, 2, seed=1)
    before = assign(x, first)
    assert len(set(before[:30])) == 1 and len(set(before[30:])) == 1 and before[0] != before[30]
    more = np.concatenate([x, blobs([(0, 5)], 30, seed=2)])
    second = grow(more, first, 3, seed=1)
    assert np.array_equal(second[:2], first)  # old clusters never move: their ids keep meaning the same
    after = assign(more, second)
    assert np.array_equal(after[:60], before)  # the old tasks stay where they were
    assert set(after[60:]) == {2}  # the new blob is the new cluster
    assert np.array_equal(grow(more, second, 3), second)  # nothing to grow: unchanged


def test_typicality_prefers_dense_regions():
    x = np.concatenate([blobs([(0, 0)], 40), np.array([[3.0, 3.0]], np.float32)])
    t = typicality(x, knn=10)
    assert t[-1] < t[:-1].min()  # the outlier is the least typical
    assert typicality(x[:1]).tolist() == [1.0]


def test_typical_first_serves_the_most_typical_of_each_cluster_largest_first():
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2])
    typical = np.array([1.0, 5.0, 2.0, 3.0, 1.0, 4.0, 9.0, 1.0, 2.0])
    candidates = np.ones(9, bool)
    scores = typical_first_scores(typical, labels, candidates)
    order = list(np.argsort(scores))
    # rank 0 of clusters 0 (4 tasks), 2 (3), 1 (2); then rank 1 of each, and so on
    assert order[:3] == [1, 6, 5] and order[3:6] == [3, 8, 4]
    assert 0 <= scores.min() and scores.max() < 1
    # a cluster that already has labels comes after the uncovered ones
    covered = typical_first_scores(typical, labels, candidates, covered={0: 1})
    assert list(np.argsort(covered))[:2] == [6, 5]
    # labeled images are not candidates but count as cluster members
    some = candidates.copy()
    some[1] = False
    assert len(typical_first_scores(typical, labels, some)) == 8


def test_mean_confidence_spreads_where_least_confidence_saturates():
    sure = [0.97] * 19
    one_doubt = sure + [0.5]
    many_doubts = [0.97] * 10 + [0.45, 0.55, 0.5, 0.6, 0.4, 0.5, 0.52, 0.48, 0.5, 0.5]
    assert least_confidence(one_doubt) == pytest.approx(least_confidence(many_doubts), abs=0.01)  # saturated
    assert mean_confidence(one_doubt) - mean_confidence(many_doubts) > 0.2
    assert mean_confidence([]) == 1.0 and mean_confidence([0.999, 0.001]) > 0.99
    assert mean_confidence([0.5]) == pytest.approx(0.0)


def test_next_tasks_follow_label_studios_uncertainty_sampling():
    candidates = [{"task": 1, "score": 0.2, "cluster": 0}, {"task": 2, "score": 0.1, "cluster": 0},
                  {"task": 3, "score": 0.9, "cluster": 1}, {"task": 4, "score": 0.5, "cluster": 2},
                  {"task": 5, "score": None, "cluster": 2}]
    # cluster 0 already has two labels from this annotator: the other clusters come first, lowest score first
    order = [n["task"] for n in next_tasks(candidates, Counter({0: 2}), limit=5)]
    assert order == [4, 3, 2, 1]  # 4 (cluster 2, 0 labeled), 3 (cluster 1, 0), then cluster 0 by score
    assert [n["task"] for n in next_tasks(candidates, Counter(), limit=2)] == [2, 4]  # 2 covers cluster 0: then cluster 2 (0.5) before 1 (0.9)


def test_cluster_summary():
    assert cluster_summary({1: 0, 2: 0, 3: 1}, {1}) == [{"cluster": 0, "tasks": 2, "labeled": 1},
                                                        {"cluster": 1, "tasks": 1, "labeled": 0}]


def test_embeddings_are_unit_vectors_that_tell_images_apart():
    embedder = Embedder(side=64)
    red, red2 = Image.new("RGB", (80, 60), (200, 30, 30)), Image.new("RGB", (90, 70), (190, 40, 30))
    stripes = Image.fromarray((np.indices((60, 80)).sum(0) % 8 < 4).astype(np.uint8)[..., None].repeat(3, 2) * 255)
    e = embedder.embed([red, red2, stripes])
    assert e.shape == (3, EMBED_DIM) and np.allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-4)
    assert e[0] @ e[1] > e[0] @ e[2]  # two reds are nearer each other than to the stripes
    assert np.allclose(from_bytes(to_bytes(e[0])), e[0], atol=1e-3)
