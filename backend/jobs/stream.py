"""The label stream: Label Studio serves the task that teaches the model most, in every Label Studio.

``prepare_stream`` (an RQ job on the re-scoring queue) runs when a project connects (``/setup``) and when tasks
are imported (``TASKS_CREATED``):

1. **Switch the stream on** (LABEL_STREAM=uncertainty): the project's sampling is set to "Uncertainty sampling"
   once. Community's settings page greys that option out, but its server implements it (``next_task.py``).
   Once: a project someone switches back stays so; LABEL_STREAM=keep never touches it.
2. **Embed and cluster** the tasks not seen yet: one forward of the pretrained backbone per image
   (``backend.inference.embeddings``), clusters that stay stable across versions (``backend.inference.clusters``).
3. **Typical first, before any version** (with uncertainty sampling on): every unlabeled task gets a prediction
   with an empty result, its ``cluster``, and a score that serves the most typical image of each uncovered cluster first
   (``TYPICAL_VERSION``), and the project's ``model_version`` moves to it. Label Studio orders by how many
   tasks of the task's cluster the annotator labeled, then by score: the first labels cover the data. Once a
   trained version exists its re-scoring takes over (those predictions are the stalest, so re-scored first).

Re-scoring attaches the same clusters to every prediction it writes (``ClusterLookup``). Progress and what the
stream will serve next are in the project's status under ``stream`` (``GET /status``, the status page).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from datetime import timedelta

import numpy as np
import redis
from rq import get_current_job

from backend.errors import LivetrainError
from backend.inference.embeddings import Embedder
from backend.inference.predictor import has_annotations
from backend.jobs.connection import connect
from backend.jobs.queue import RETRY_DELAYS, rescore_queue
from backend.jobs.state import PROJECTS, ProjectState, ls_credentials
from backend.jobs import stream_typical as typical
from backend.jobs.stream_state import StreamState, cluster_summary, next_tasks, stream_lag
from backend.labelstudio.client import LabelStudioClient, LabelStudioError, LabelStudioUnavailable
from backend.labelstudio.images import ImageFetcher
from backend.labelstudio.label_config import parse_label_config
from backend.model_store.stores import version_store
from backend.settings import Settings

log = logging.getLogger(__name__)

JOB_TIMEOUT = 3600  # a run embeds for EMBED_SECONDS; the typical-first writes of a big project take longer
EMBED_BATCH = 16  # tasks embedded between two progress reports
EMBED_SECONDS = 120  # a stream job embeds this long at most, then queues itself again (other jobs go first)
BUSY_DELAY = 30  # seconds before looking again when another worker runs the project's stream job
_EMBEDDER = Embedder()  # one per process: the weights load at the first embedding, not at import


def enqueue_stream(connection: redis.Redis, project: str, attempt: int = 0, delay: float = 0,
                   cooldown: float = 0) -> str | None:
    """Queue ``prepare_stream`` unless one is pending, or (``cooldown`` seconds) one was queued that recently:
    ``/setup`` comes before every predict batch, and each run lists the project's tasks."""
    project = str(project)
    stream = StreamState(connection, project)
    job_id = f"stream-{project}-{uuid.uuid4().hex[:12]}"
    if cooldown and connection.exists(stream.recent_key):
        return None
    if not connection.set(stream.pending_key, job_id, nx=True, ex=3600):
        return None
    if cooldown:
        connection.set(stream.recent_key, 1, ex=int(cooldown))
    options = dict(job_id=job_id, job_timeout=JOB_TIMEOUT, result_ttl=24 * 3600, failure_ttl=7 * 24 * 3600,
                   description=f"label stream of project {project}")
    try:
        queue = rescore_queue(connection)
        if delay:
            queue.enqueue_in(timedelta(seconds=delay), prepare_stream, project, attempt, **options)
        else:
            queue.enqueue(prepare_stream, project, attempt, **options)
    except Exception:
        connection.delete(stream.pending_key)
        raise
    return job_id


SETUP_COOLDOWN = 300  # seconds: /setup (called before every predict batch) re-runs the stream job at most this often


def stream_wanted(settings: Settings) -> bool:
    """Whether the stream job has anything to do: embed and cluster (STREAM_PREPARE), or switch the sampling."""
    return settings.stream_prepare or settings.label_stream != "keep"


def stream_after_event(connection: redis.Redis, settings: Settings, project: str, cooldown: float = 0) -> str | None:
    """From the web process (``/setup``): never raises, answers at once."""
    if not stream_wanted(settings):
        return None
    try:
        return enqueue_stream(connection, project, cooldown=cooldown)
    except Exception as exc:
        log.warning("project %s: could not queue the label stream job (%s)", project, exc)
        return None


def switch_sampling(settings: Settings, client: LabelStudioClient, stream: StreamState, project: dict) -> str:
    """LABEL_STREAM=uncertainty: set the project's sampling to "Uncertainty sampling", once. Returns the mode."""
    sampling = str(project.get("sampling") or "")
    if settings.label_stream != "uncertainty" or stream.switched() is not None:
        return sampling
    target = LabelStudioClient.SAMPLING["uncertainty"]
    if sampling != target:
        try:
            client.set_sampling(project["id"], "uncertainty")
        except LabelStudioUnavailable:
            raise
        except LabelStudioError as exc:  # e.g. a token whose user may not change project settings
            message = f"could not switch the project to uncertainty sampling: {exc.message}"
            log.warning("project %s: %s", project["id"], message)
            ProjectState(stream.r, str(project["id"])).add_error("stream", message)
            return sampling
        log.info("project %s: sampling switched from %r to %r (LABEL_STREAM=uncertainty; set LABEL_STREAM=keep "
                 "to leave it alone, or `livetrain stream %s sequential` to undo)", project["id"], sampling, target,
                 project["id"])
    stream.mark_switched({"from": sampling, "to": target, "at": round(time.time(), 3)})
    return target


def embed_tasks(stream: StreamState, tasks: list[dict], fetcher: ImageFetcher, value_key: str,
                progress=lambda done, total: None, seconds: float = 0) -> tuple[dict[int, np.ndarray], int]:
    """Embed and store the ``tasks`` (their images) that have no embedding yet, for at most ``seconds`` (0: no
    limit); returns the new embeddings and how many are left to do. An image that fails (broken, gone) is
    remembered for FAILED_TTL and skipped meanwhile: no cluster for it, the others go on."""
    failed_before = stream.failed()
    missing = set(stream.missing([t["id"] for t in tasks]))
    todo = [t for t in tasks if t["id"] in missing and t["id"] not in failed_before]
    failed, made = {}, {}
    began = time.monotonic()
    for start in range(0, len(todo), EMBED_BATCH):
        if seconds and start and time.monotonic() - began > seconds:
            return made, len(todo) - start
        vectors = {}
        for task in todo[start:start + EMBED_BATCH]:
            url = (task.get("data") or {}).get(value_key)
            try:
                if not isinstance(url, str) or not url:
                    raise LivetrainError(f"task data has no '{value_key}' image URL")
                vectors[task["id"]] = _EMBEDDER.embed([fetcher.fetch(url)])[0]
            except LivetrainError as exc:
                failed[task["id"]] = exc.message
        stream.add_embeddings(vectors)
        stream.mark_failed(failed)
        failed.clear()
        made.update(vectors)
        progress(min(start + EMBED_BATCH, len(todo)), len(todo))
    return made, 0


class ClusterLookup:
    """Each task's cluster for the predictions re-scoring writes. A task never embedded (imported while no stream
    job ran) is embedded here and joins its nearest cluster; before the stream job made any clusters, tasks get
    none (a handful of tasks must not fix the project's first centroids, which never move). Never raises: a
    cluster is worth less than the score it goes with."""

    def __init__(self, stream: StreamState, fetcher: ImageFetcher, value_key: str):
        self.stream, self.fetcher, self.value_key = stream, fetcher, value_key

    def __call__(self, tasks: list[dict]) -> dict[int, int]:
        try:
            found = self.stream.clusters([t["id"] for t in tasks])
            missing = [t for t in tasks if t["id"] not in found]
            if missing and self.stream.centroids() is not None:
                made, _ = embed_tasks(self.stream, missing, self.fetcher, self.value_key)
                lock = self.stream.lock()
                if lock.acquire():
                    try:
                        found.update(self.stream.assign_new(made))
                    finally:
                        lock.release()
            return found
        except Exception as exc:  # noqa: BLE001 - Redis, an odd image: the prediction goes without a cluster
            log.warning("project %s: no clusters for this batch: %s", self.stream.project, exc)
            return {}


def stream_status(state: ProjectState, stream: StreamState, tasks: list[dict], model_version: str | None,
                  sampling: str, settings: Settings, labeled: set[int] | None = None, **extra) -> dict:
    """The ``stream`` part of the project's status: mode, clusters, the next tasks Label Studio serves.
    ``tasks``: as listed from Label Studio (with predictions); ``labeled``: the labeled task ids when ``tasks``
    holds only the unlabeled ones (re-scoring lists only those)."""
    clusters = stream.clusters()
    if labeled is None:
        labeled = {t["id"] for t in tasks if has_annotations(t)}
    candidates = []
    for task in tasks:
        if task["id"] in labeled:
            continue
        for p in task.get("predictions") or ():
            if p.get("model_version") == model_version:
                candidates.append({"task": task["id"], "score": p.get("score"), "model_version": model_version,
                                   "cluster": p.get("cluster")})
    covered = Counter(clusters[t] for t in labeled if t in clusters)
    report = {"label_stream": settings.label_stream, "sampling": sampling, "switched": stream.switched(),
              "model_version": model_version, "clusters": len(set(clusters.values())),
              "embedded": len(clusters), "per_cluster": cluster_summary(clusters, labeled),
              "next": next_tasks(candidates, covered), "updated_at": round(time.time(), 3), **extra}
    state.set_status(stream=report)
    return report


def status_after_rescore(settings: Settings, state: ProjectState, stream: StreamState, client: LabelStudioClient,
                         project: str, unlabeled: list[dict], writes: dict[int, dict]) -> None:
    """Re-scoring's view of the stream once it wrote: the unlabeled tasks with what it wrote added. Never raises:
    the status is a report, re-scoring's work is done."""
    try:
        info = client.project(project)
        view = [{**t, "predictions": list(t.get("predictions") or ()) + ([writes[t["id"]]] if t["id"] in writes
                                                                          else [])} for t in unlabeled]
        open_ids = {t["id"] for t in unlabeled}
        labeled = {t for t in stream.clusters() if t not in open_ids}
        stream_status(state, stream, view, info.get("model_version"), str(info.get("sampling") or ""), settings,
                      labeled=labeled)
    except Exception as exc:  # noqa: BLE001 - a status report must not fail the job that did the work
        log.warning("project %s: could not update the label stream's status: %s", project, exc)


def stream_report(settings: Settings, connection: redis.Redis, project: str, status: dict) -> dict | None:
    """The project's ``stream`` status with how far behind the active version it is right now (``behind``)."""
    report = status.get("stream")
    if not isinstance(report, dict):
        return None
    try:
        versions = version_store(settings, project).list()
    except (OSError, ValueError, KeyError) as exc:  # the store unreachable or a version pruned meanwhile
        log.warning("project %s: cannot list the versions for the stream's lag: %s", project, exc)
        versions = []
    return {**report, "behind": stream_lag(connection, project, versions, time.time())}


def prepare_stream(project: str, attempt: int = 0) -> dict:
    """The RQ job (see the module doc). One per project at a time (the project's stream lock); it embeds for at
    most EMBED_SECONDS, then queues itself again, so that other projects' re-scoring is not held up for long."""
    settings = Settings.from_env()
    connection = connect(settings)
    state, stream = ProjectState(connection, project), StreamState(connection, project)
    job = get_current_job()
    if job is not None and connection.get(stream.pending_key) == job.id.encode():
        connection.delete(stream.pending_key)
    report = {"state": "running", "job": job.id if job else None}
    lock = stream.lock(blocking_timeout=0)
    if not lock.acquire():  # another worker runs this project's stream job: look again once it is done
        enqueue_stream(connection, project, attempt, delay=BUSY_DELAY)
        return {**report, "state": "busy"}
    try:
        return _prepare(settings, connection, state, stream, project, attempt, report)
    finally:
        lock.release()


def _prepare(settings: Settings, connection: redis.Redis, state: ProjectState, stream: StreamState, project: str,
             attempt: int, report: dict) -> dict:
    def progress(done: int, total: int) -> None:
        state.set_status(stream_job={**report, "done": done, "total": total})

    written, left = 0, 0
    try:
        url, key = ls_credentials(settings, connection)
        client = LabelStudioClient(url, key)
        info = client.project(project)
        connection.sadd(PROJECTS, project)  # a project Label Studio knows: on /status and the status page from now
        sampling = switch_sampling(settings, client, stream, info)
        control = parse_label_config(info["label_config"]).primary
        fetcher = ImageFetcher(settings)
        fetcher.set_fallback(url, key)
        tasks = list(client.iter_tasks(project, only_labeled=False))
        stream.forget(stream.embedded() - {t["id"] for t in tasks})  # deleted in Label Studio
        if settings.stream_prepare:
            _, left = embed_tasks(stream, tasks, fetcher, control.value_key, progress, seconds=EMBED_SECONDS)
        summary = stream.update_clusters()
        model_version = info.get("model_version")
        store = version_store(settings, project)
        # Typical-first predictions only serve uncertainty sampling (LS orders by them); any other mode would only
        # be kept from calling /predict by them (Label Studio asks for a prediction only for a task with none).
        uncertainty = sampling == LabelStudioClient.SAMPLING["uncertainty"]
        if settings.stream_prepare and uncertainty and not left:
            clusters = stream.clusters()
            fingerprint = typical.digest(tasks, clusters)
            if store.active() is None and connection.get(stream.digest_key) != fingerprint.encode():
                wanted = typical.typical_predictions(stream, tasks) + typical.coverage_predictions(stream, tasks)
                written = typical.write_typical(client, state, project, tasks, wanted,
                                                has_version=lambda: store.active() is not None)
                connection.set(stream.digest_key, fingerprint)
                model_version = client.project(project).get("model_version")
        stream_status(state, stream, tasks, model_version, sampling, settings)
    except LabelStudioUnavailable as exc:
        if attempt < len(RETRY_DELAYS):
            delay = RETRY_DELAYS[attempt]
            log.warning("project %s: %s; label stream again in %d s", project, exc.message, delay)
            report = {**report, "state": "waiting", "error": exc.message, "retry_in_s": delay}
            state.set_status(stream_job=report)
            enqueue_stream(connection, project, attempt + 1, delay)
            return report
        state.set_status(stream_job={**report, "state": "error", "error": exc.message})
        state.add_error("stream", exc.message)
        raise
    except Exception as exc:
        message = exc.message if isinstance(exc, LivetrainError) else f"{type(exc).__name__}: {exc}"
        state.set_status(stream_job={**report, "state": "error", "error": message})
        state.add_error("stream", message)
        raise
    report = {**report, "state": "continuing" if left else "done", **summary, "typical_written": written,
              "left": left, "failed": len(stream.failed())}
    state.set_status(stream_job=report)
    if left:  # the time box ran out: the rest in a new job, behind whatever else is queued
        enqueue_stream(connection, project)
    log.info("project %s: label stream: %d task(s) in %d cluster(s), %d left to embed, %d typical-first "
             "prediction(s) written, sampling %r", project, summary["embedded"], summary["clusters"], left, written,
             sampling)
    return report
