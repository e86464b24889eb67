"""A project's label-stream state in Redis: task embeddings, the cluster centroids, each task's cluster.

Shared by the stream job (``backend.jobs.stream``: embeds tasks, writes the typical-first predictions), the
re-scoring job (attaches each task's ``cluster`` to its prediction) and the status page. How clusters stay
stable across versions is in ``backend.inference.clusters``.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import redis

from backend.inference.clusters import assign, grow, target_clusters
from backend.inference.embeddings import EMBED_DIM, from_bytes, to_bytes
from backend.jobs.state import PREFIX, ProjectState, version_number

FAILED_TTL = 3600  # an image that could not be embedded is tried again after this many seconds


class StreamState:
    def __init__(self, connection: redis.Redis, project: str):
        self.r = connection
        self.project = str(project)
        key = f"{PREFIX}:project:{self.project}:stream"
        self.embeddings_key = f"{key}:embeddings"  # task id -> float16 bytes
        self.assign_key = f"{key}:clusters"  # task id -> cluster id
        self.centroids_key = f"{key}:centroids"  # JSON {"dim", "k"} + the float16 bytes in ...:centroids:data
        self.switched_key = f"{key}:switched"  # set once livetrain has set the project's sampling (LABEL_STREAM)
        self.failed_key = f"{key}:failed"  # task id -> why its image could not be embedded (kept FAILED_TTL)
        self.digest_key = f"{key}:digest"  # what the last typical-first write was computed from
        self.lock_key = f"{key}:lock"  # one stream job at a time per project; cluster updates under it too
        self.pending_key = f"{key}:pending"  # a stream job is queued (coalesces /setup and TASKS_CREATED calls)
        self.recent_key = f"{key}:recent"  # /setup queued one lately (SETUP_COOLDOWN)

    # -- embeddings -------------------------------------------------------------------------------
    def embedded(self) -> set[int]:
        return {int(t) for t in self.r.hkeys(self.embeddings_key)}

    def missing(self, task_ids) -> list[int]:
        """Those of ``task_ids`` without an embedding (one HMGET, not a listing of every key)."""
        ids = [int(t) for t in task_ids]
        if not ids:
            return []
        found = self.r.hmget(self.embeddings_key, [str(t) for t in ids])
        return [t for t, v in zip(ids, found) if v is None]

    def lock(self, blocking_timeout: float = 10.0):
        """The project's stream lock: the stream job holds it while it runs; re-scoring takes it to assign new
        tasks. ``acquire()`` may be False (held elsewhere past ``blocking_timeout``)."""
        return self.r.lock(self.lock_key, timeout=3600, blocking_timeout=blocking_timeout)

    def mark_failed(self, failures: dict[int, str]) -> None:
        if failures:
            pipe = self.r.pipeline()
            pipe.hset(self.failed_key, mapping={str(t): m[:300] for t, m in failures.items()})
            pipe.expire(self.failed_key, FAILED_TTL)
            pipe.execute()

    def failed(self) -> set[int]:
        return {int(t) for t in self.r.hkeys(self.failed_key)}

    def add_embeddings(self, vectors: dict[int, np.ndarray]) -> None:
        if vectors:
            self.r.hset(self.embeddings_key, mapping={str(t): to_bytes(v) for t, v in vectors.items()})

    def embeddings(self) -> tuple[list[int], np.ndarray]:
        """Every stored embedding of the current size (another size: an embedding this version does not make)."""
        raw = {int(t): from_bytes(v) for t, v in self.r.hgetall(self.embeddings_key).items()}
        ids = sorted(t for t, v in raw.items() if v.shape == (EMBED_DIM,))
        if not ids:
            return [], np.zeros((0, EMBED_DIM), np.float32)
        return ids, np.stack([raw[t] for t in ids])

    def forget(self, task_ids) -> None:
        """Tasks deleted in Label Studio: out of the clusters' counts (centroids stay)."""
        ids = [str(int(t)) for t in task_ids]
        if ids:
            self.r.hdel(self.embeddings_key, *ids)
            self.r.hdel(self.assign_key, *ids)

    # -- clusters ---------------------------------------------------------------------------------
    def centroids(self) -> np.ndarray | None:
        """The centroids as stored (float16 precision), read in one MGET: never a shape and data of two writes."""
        meta, data = self.r.mget(self.centroids_key, self.centroids_key + ":data")
        if not meta or not data:
            return None
        shape = json.loads(meta)
        if shape["dim"] != EMBED_DIM:
            return None
        return np.frombuffer(data, dtype=np.float16).astype(np.float32).reshape(shape["k"], shape["dim"])

    def clusters(self, task_ids=None) -> dict[int, int]:
        """task id -> cluster, for ``task_ids`` (default: every clustered task)."""
        if task_ids is None:
            return {int(t): int(c) for t, c in self.r.hgetall(self.assign_key).items()}
        ids = [int(t) for t in task_ids]
        if not ids:
            return {}
        values = self.r.hmget(self.assign_key, [str(t) for t in ids])
        return {t: int(c) for t, c in zip(ids, values) if c is not None}

    def update_clusters(self, seed: int = 0) -> dict:
        """Give every embedded task a cluster: new centroids when the pool has grown enough for more (the old
        ones never move), otherwise only the tasks without one join their nearest centroid. Returns a summary."""
        ids, x = self.embeddings()
        if not ids:
            return {"embedded": 0, "clusters": 0, "grown": False}
        old = self.centroids()
        k = target_clusters(len(ids))
        have = self.clusters(ids)
        grown = old is None or k > len(old)
        if grown:
            # stored as float16: assign with exactly the values every later reader gets back
            centroids = grow(x, old, k, seed=seed).astype(np.float16).astype(np.float32)
            pipe = self.r.pipeline()
            pipe.set(self.centroids_key, json.dumps({"k": int(len(centroids)), "dim": int(centroids.shape[1])}))
            pipe.set(self.centroids_key + ":data", centroids.astype(np.float16).tobytes())
            pipe.execute()
            labels = assign(x, centroids)
            fixed = 0 if old is None else len(old)
            # a task with a cluster moves only into a new one (the old centroids did not move)
            moves = {ids[i]: int(c) for i, c in enumerate(labels) if ids[i] not in have or c >= fixed}
        else:
            centroids = old
            todo = [i for i, t in enumerate(ids) if t not in have]
            moves = {ids[i]: int(c) for i, c in zip(todo, assign(x[todo], centroids))} if todo else {}
        if moves:
            self.r.hset(self.assign_key, mapping={str(t): c for t, c in moves.items()})
        return {"embedded": len(ids), "clusters": int(len(centroids)), "grown": bool(grown and old is not None)}

    def assign_new(self, vectors: dict[int, np.ndarray]) -> dict[int, int]:
        """Give tasks embedded outside the stream job (e.g. by re-scoring; already stored) the nearest existing
        cluster (the stream job grows the clusters when enough have come); returns their clusters."""
        if not vectors:
            return {}
        centroids = self.centroids()
        if centroids is None:  # no clusters yet: make them (from every embedding stored)
            self.update_clusters()
            return self.clusters(list(vectors))
        ids = list(vectors)
        labels = assign(np.stack([vectors[t] for t in ids]), centroids)
        mapping = {t: int(c) for t, c in zip(ids, labels)}
        self.r.hset(self.assign_key, mapping={str(t): c for t, c in mapping.items()})
        return mapping

    # -- the sampling switch ----------------------------------------------------------------------
    def mark_switched(self, record: dict, by_hand: bool = False) -> bool:
        """Remember that this project's sampling was set: by LABEL_STREAM once (False if it already was), or by
        hand (always recorded; LABEL_STREAM never switches such a project again)."""
        return bool(self.r.set(self.switched_key, json.dumps(record), nx=not by_hand))

    def switched(self) -> dict | None:
        raw = self.r.get(self.switched_key)
        return json.loads(raw) if raw else None


def cluster_summary(clusters: dict[int, int], labeled: set[int]) -> list[dict]:
    """Per cluster: how many tasks, how many of them labeled; largest first."""
    size, done = Counter(clusters.values()), Counter(c for t, c in clusters.items() if t in labeled)
    return [{"cluster": c, "tasks": n, "labeled": done.get(c, 0)} for c, n in sorted(size.items(),
                                                                                       key=lambda kv: (-kv[1], kv[0]))]


def next_tasks(candidates: list[dict], covered: Counter, limit: int = 5) -> list[dict]:
    """The tasks Label Studio's uncertainty sampling serves next, in order, for one annotator who labeled the
    ``covered`` counts per cluster: least-covered cluster first, then lowest score. ``candidates``: ``{"task",
    "score", "cluster", "model_version"}`` of the unlabeled tasks' predictions of the project's model_version."""
    covered = Counter(covered)
    left = [c for c in candidates if isinstance(c.get("score"), (int, float))]
    out = []
    while left and len(out) < limit:
        best = min(left, key=lambda c: (covered.get(c.get("cluster"), 0), c["score"], c["task"]))
        out.append(best)
        left.remove(best)
        covered[best.get("cluster")] += 1
    return out


def stream_lag(connection: redis.Redis, project: str, versions: list[dict], now: float) -> dict:
    """How far Label Studio's label stream (the version re-scoring last moved its model_version to) is behind
    the active version: in versions, and in seconds since the first newer version was published (how long its
    scores have been stale). ``versions``: the project's version metas (``VersionStore.list``)."""
    raw = connection.get(ProjectState(connection, project).moved_version_key)
    moved = int(raw) if raw is not None else 0
    active = next((v for v in versions if v.get("active")), None)
    if active is None:
        return {"versions": 0, "seconds": 0.0, "stream_version": moved}
    behind = max(0, version_number(active["name"]) - moved)
    newer = [v["published_at"] for v in versions if version_number(v["name"]) > moved
             and isinstance(v.get("published_at"), (int, float))]
    seconds = round(max(0.0, now - min(newer)), 1) if behind and newer else 0.0
    return {"versions": behind, "seconds": seconds, "stream_version": moved}
