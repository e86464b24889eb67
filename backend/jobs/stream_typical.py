"""The label stream before the first version: typical-first predictions, and clusters on labeled tasks.

Label Studio's uncertainty sampling orders by how many tasks of a candidate's ``cluster`` the annotator labeled
(a labeled task counts for the largest ``cluster`` among its predictions), then by ``score``. Before any version
livetrain writes, for every unlabeled task, a prediction with no regions, its cluster and a typical-first score
(``backend.inference.clusters.typical_first_scores``), under ``TYPICAL_VERSION``; a labeled task that carries no
clustered prediction (labeled before the stream existed) gets one too, so that Label Studio counts it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from typing import Callable

import numpy as np

from backend.inference.clusters import typical_first_scores, typicality
from backend.inference.predictor import has_annotations
from backend.jobs.state import ProjectState
from backend.jobs.stream_state import StreamState
from backend.labelstudio.client import LabelStudioClient
from backend.model_store.versions import TYPICAL_VERSION

log = logging.getLogger(__name__)

CHECK_EVERY = 16  # typical-first writes between two looks at whether a trained version appeared


def typical_predictions(stream: StreamState, tasks: list[dict]) -> list[dict]:
    """``{"task", "result": [], "score", "cluster", "model_version": TYPICAL_VERSION}`` for each unlabeled task
    with a cluster. Typicality is measured within each cluster (TypiClust's density, at a cost that grows with
    the clusters' sizes, not the pool's square)."""
    ids, x = stream.embeddings()
    clusters = stream.clusters(ids)
    keep = [i for i, t in enumerate(ids) if t in clusters]
    if not keep:
        return []
    ids, x = [ids[i] for i in keep], x[keep]
    labels = np.array([clusters[t] for t in ids])
    typical = np.zeros(len(ids), dtype=np.float32)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        typical[members] = typicality(x[members])
    state = {t["id"]: has_annotations(t) for t in tasks}
    candidates = np.array([state.get(t) is False for t in ids])
    covered = Counter(clusters[t] for t in ids if state.get(t))
    scores = typical_first_scores(typical, labels, candidates, dict(covered))
    chosen = [t for t, c in zip(ids, candidates) if c]
    return [{"task": t, "result": [], "score": round(float(s), 6), "cluster": clusters[t],
             "model_version": TYPICAL_VERSION} for t, s in zip(chosen, scores)]


def coverage_predictions(stream: StreamState, tasks: list[dict]) -> list[dict]:
    """For labeled tasks whose predictions carry no cluster: an empty prediction with the cluster, so that Label
    Studio counts the label for its cluster (no score: a labeled task is never a candidate)."""
    labeled = [t for t in tasks if has_annotations(t)
               and not any(p.get("cluster") is not None for p in t.get("predictions") or ())]
    clusters = stream.clusters([t["id"] for t in labeled])
    return [{"task": t["id"], "result": [], "cluster": clusters[t["id"]], "model_version": TYPICAL_VERSION}
            for t in labeled if t["id"] in clusters]


def digest(tasks: list[dict], clusters: dict[int, int]) -> str:
    """What the typical-first scores depend on: the tasks, which are labeled, and their clusters."""
    items = sorted((t["id"], has_annotations(t), clusters.get(t["id"])) for t in tasks)
    return hashlib.sha1(json.dumps(items).encode()).hexdigest()


def write_typical(client: LabelStudioClient, state: ProjectState, project: str, tasks: list[dict],
                  wanted: list[dict], has_version: Callable[[], bool]) -> int:
    """Write the predictions in ``wanted`` that differ from the task's (deleting its older typical ones) and move
    the project's model_version to TYPICAL_VERSION; stop as soon as a trained version exists (``has_version``:
    its re-scoring takes over, and the model_version must never move back). Updates ``tasks``' predictions in
    place as written. Returns how many were written."""
    by_id = {t["id"]: t for t in tasks}
    written = 0
    for i, prediction in enumerate(wanted):
        if i % CHECK_EVERY == 0 and has_version():
            log.info("project %s: a trained version exists; typical-first writes stop", project)
            return written
        task = by_id[prediction["task"]]
        old = [p for p in task.get("predictions") or () if p.get("model_version") == TYPICAL_VERSION]
        if len(old) == 1 and old[0].get("cluster") == prediction["cluster"] and \
                abs((old[0].get("score") or 0) - (prediction.get("score") or 0)) < 1e-6:
            continue
        if not client.create_predictions(project, [prediction]):
            continue  # the task was deleted meanwhile
        written += 1
        for p in old:
            if p.get("id") is not None:  # one written earlier in this run has no id here (nor a second copy)
                client.delete_prediction(p["id"])
        task["predictions"] = [p for p in task.get("predictions") or () if p not in old] + [dict(prediction)]
    has_any = any(p.get("model_version") == TYPICAL_VERSION and p.get("score") is not None
                  for t in tasks for p in t.get("predictions") or ())
    if has_any:
        with state.version_lock():  # claim + PATCH as one step: a re-scoring PATCH never lands before ours
            if not has_version() and state.claim_model_version(TYPICAL_VERSION):
                client.set_model_version(project, TYPICAL_VERSION)
    return written
