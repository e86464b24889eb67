"""Fresh predictions in Label Studio: re-scoring after each version, and "Complete" (pre-label a set).

Label Studio's uncertainty sampling only looks at predictions whose ``model_version`` equals the
project's, and never asks again for a task that has one (PROTOCOL.md). So after every published version
the ``rescore_project`` job scores the unlabeled tasks with it, writes the predictions in batches
(``POST /api/projects/{id}/import/predictions``), deletes livetrain's predictions of older versions
(RESCORE_OLD_PREDICTIONS) and moves the project's ``model_version`` to the new version as soon as the
first batch is written (so the label stream serves the most uncertain of the freshly scored tasks at once).

* Most useful first: tasks never scored, then the stalest (newest prediction of the oldest version), then
  those whose newest previous score is lowest; RESCORE_LIMIT
  caps how many tasks carry the version (0 = all). A task that already has this version's prediction is
  done and never written twice, so a job that stops can simply be queued again.
* A per-version budget: with a training session publishing a version every few seconds, a job scores the
  most useful tasks first until a newer version supersedes it (checked between batches: that version's
  own job takes over) or RESCORE_LIMIT is reached. It runs on a worker of its own (RESCORE_NICE,
  RESCORE_THREADS; ``backend/jobs/workers.py``), so it makes progress while a session trains.
* Label Studio down or slow: the job queues itself again after a growing delay (RETRY_DELAYS: 5 s, 15 s,
  ... 10 min), then fails with Label Studio's error in the project status. Training never waits for it:
  the enqueue after a version is wrapped so that no failure here can fail the session.

``complete_tasks`` (``POST /projects/<id>/complete``, ``livetrain complete``) is the same code path over
all or selected tasks with its own min score / max detections, optionally removing the tasks' existing
predictions first and skipping annotated tasks. Both run on the rescore queue.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Callable

import redis
from rq import get_current_job

from backend.errors import BadRequest, LivetrainError
from backend.inference.predictor import BASE_VERSION, RAW_SCORE_FLOOR, LoadedModel, Predictor, has_annotations
from backend.jobs import counters
from backend.jobs.connection import connect
from backend.jobs.queue import RETRY_DELAYS, rescore_queue
from backend.jobs.state import ProjectState, ls_credentials, version_number
from backend.jobs.stream import ClusterLookup, status_after_rescore
from backend.jobs.stream_state import StreamState
from backend.labelstudio.client import LabelStudioClient, LabelStudioError, LabelStudioUnavailable
from backend.labelstudio.images import ImageFetcher
from backend.labelstudio.label_config import parse_label_config
from backend.model_store.models import for_inference, model_from_version, pick_device, version_task
from backend.model_store.stores import version_store
from backend.model_store.versions import TYPICAL_VERSION
from backend.settings import Settings

log = logging.getLogger(__name__)

JOB_TIMEOUT = 6 * 3600


# -- queueing -------------------------------------------------------------------------------------
def enqueue_rescore(connection: redis.Redis, project: str, attempt: int = 0, delay: float = 0) -> str | None:
    """Queue a re-scoring of ``project``'s active version unless one is already pending; returns the job id."""
    project = str(project)
    job_id = f"rescore-{project}-{uuid.uuid4().hex[:12]}"
    key = ProjectState(connection, project).rescore_pending_key
    if not connection.set(key, job_id, nx=True, ex=24 * 3600):
        return None
    state = ProjectState(connection, project)
    # before enqueueing: a job that finishes at once must not have its "done" overwritten by "queued"
    state.set_status(rescore={"state": "queued", "job": job_id, "attempt": attempt})
    try:
        options = dict(job_id=job_id, job_timeout=JOB_TIMEOUT, result_ttl=24 * 3600, failure_ttl=7 * 24 * 3600,
                       description=f"re-score project {project}")
        queue = rescore_queue(connection)
        if delay:
            queue.enqueue_in(timedelta(seconds=delay), rescore_project, project, attempt, **options)
        else:
            queue.enqueue(rescore_project, project, attempt, **options)
    except Exception as exc:
        connection.delete(key)
        state.set_status(rescore={"state": "error", "error": f"could not queue re-scoring: {exc}"})
        raise
    return job_id


def rescore_after_publish(connection: redis.Redis, project: str) -> str | None:
    """Called by the training session after each version: never raises (a failure here must not fail training)."""
    try:
        return enqueue_rescore(connection, project)
    except Exception as exc:
        log.warning("project %s: could not queue re-scoring (%s); POST /projects/%s/rescore retries", project, exc,
                    project)
        return None


COMPLETE_OPTIONS = ("tasks", "min_score", "max_detections", "remove_existing", "skip_annotated")


def complete_options(body: dict) -> dict:
    """Validate "Complete" options from a request body or the CLI; raise BadRequest naming the field."""
    unknown = sorted(set(body) - set(COMPLETE_OPTIONS))
    if unknown:
        raise BadRequest(f"unknown option(s) {', '.join(unknown)}; allowed: {', '.join(COMPLETE_OPTIONS)}")
    tasks = body.get("tasks")
    if tasks in (None, "all"):
        tasks = None
    elif not isinstance(tasks, list) or not tasks or not all(isinstance(t, int) and not isinstance(t, bool) for t in tasks):
        raise BadRequest("'tasks' must be \"all\" or a non-empty list of task ids")
    min_score = body.get("min_score")
    if min_score is not None and (not isinstance(min_score, (int, float)) or not 0.0 <= min_score <= 1.0):
        raise BadRequest("'min_score' must be a number between 0 and 1")
    max_detections = body.get("max_detections")
    if max_detections is not None and (not isinstance(max_detections, int) or max_detections < 0):
        raise BadRequest("'max_detections' must be a whole number >= 0")
    flags = {}
    for name in ("remove_existing", "skip_annotated"):
        if not isinstance(body.get(name, False), bool):
            raise BadRequest(f"'{name}' must be true or false")
        flags[name] = body.get(name, False)
    return {"tasks": tasks, "min_score": min_score, "max_detections": max_detections, **flags}


def enqueue_complete(connection: redis.Redis, project: str, options: dict) -> str:
    options = complete_options(options)
    job_id = f"complete-{project}-{uuid.uuid4().hex[:12]}"
    rescore_queue(connection).enqueue(complete_tasks, str(project), options, 0, job_id=job_id, job_timeout=JOB_TIMEOUT,
                                      result_ttl=7 * 24 * 3600, failure_ttl=7 * 24 * 3600,
                                      description=f"complete project {project}")
    ProjectState(connection, project).set_status(complete={"state": "queued", "job": job_id})
    return job_id


# -- choosing tasks -------------------------------------------------------------------------------
def is_livetrain_version(model_version: str | None, prefix: str) -> bool:
    """Whether a prediction's version is one of this project's livetrain versions (``<prefix>-v<N>``), the
    cold-start ``livetrain-base`` or the stream's ``livetrain-typical``: only those are ever deleted as "older
    versions"."""
    if not model_version:
        return False
    return model_version in (BASE_VERSION, TYPICAL_VERSION) or re.fullmatch(re.escape(prefix) + r"-v\d+", model_version) is not None


def version_prefix(version: str) -> str:
    return version.rsplit("-v", 1)[0]


def has_version(task: dict, version: str) -> bool:
    return any(p.get("model_version") == version for p in task.get("predictions") or ())


# The tasks an annotator going down the task list opens next (the data manager lists by id). Opening a task
# that has any prediction never makes Label Studio ask /predict (tasks/api.py), and from the label stream's cold
# start on every task has one, so without this the task opened next would show whatever old version re-scoring
# last reached. The stream picks among every task the batch scored, so these few slots cost it little.
NEXT_IN_LINE = 4


def plan_rescore(tasks: list[dict], version: str, limit: int) -> list[dict]:
    """The tasks to score with ``version``: first those of the NEXT_IN_LINE lowest ids, then the most useful:
    never scored; then the stalest (the newest scored prediction of the oldest version: with a version every few
    seconds each job is superseded after a batch or two, and Label Studio shows a task's stored prediction,
    never asking again, so stale ones must come round); then the lowest previous score (ties by id). With
    ``limit``, at most that many tasks carry the version, counting those already done."""
    done = sum(1 for t in tasks if has_version(t, version))
    todo = [t for t in tasks if not has_version(t, version)]
    in_line = {t["id"] for t in sorted(tasks, key=lambda t: t["id"])[:NEXT_IN_LINE]}  # those done stay done

    def usefulness(task):
        scored = [p for p in task.get("predictions") or () if isinstance(p.get("score"), (int, float))]
        if not scored:
            return (0, 0, 0.0, task["id"])
        newest = max(scored, key=lambda p: p.get("id") or 0)
        return (1, version_number(newest.get("model_version") or ""), newest["score"], task["id"])

    todo.sort(key=lambda t: (t["id"] not in in_line, usefulness(t)))
    return todo[: max(0, limit - done)] if limit else todo


# -- the shared scoring loop ------------------------------------------------------------------------
@dataclass
class Run:
    """One scoring pass: which tasks, with what, and how far it got (reported as progress)."""

    kind: str  # "rescore" or "complete"
    project: str
    version: str
    state: ProjectState
    total: int = 0
    done: int = 0
    written: int = 0
    deleted: int = 0
    failed: int = 0
    moved: bool = False
    started: float = field(default_factory=time.time)
    writes: dict = field(default_factory=dict)  # task id -> the prediction written (score, cluster, version)

    def report(self, state: str, **extra) -> dict:
        report = {"state": state, "version": self.version, "done": self.done, "total": self.total,
                  "written": self.written, "deleted": self.deleted, "failed": self.failed,
                  "tasks_per_s": round(self.done / max(time.time() - self.started, 1e-6), 3), **extra}
        job = get_current_job()
        if job is not None:
            report["job"] = job.id
            job.meta["progress"] = report
            job.save_meta()
        self.state.set_status(**{self.kind: report})
        if state == "error":
            self.state.add_error(self.kind, extra.get("error", "failed"))
        return report


def score_and_write(run: Run, client: LabelStudioClient, predictor: Predictor, loaded: LoadedModel, control,
                    tasks: list[dict], batch: int, *, threshold=None, max_detections=None,
                    delete: Callable[[dict], bool] = lambda p: False,
                    stop: Callable[[], str | None] = lambda: None,
                    may_move: Callable[[], bool] | None = None,
                    clusters: Callable[[list[dict]], dict[int, int]] | None = None) -> str | None:
    """Score ``tasks`` in batches, write one prediction per task (with its ``cluster`` from ``clusters``, for
    Label Studio's diverse uncertainty sampling), delete the tasks' predictions for which ``delete`` holds, move
    the project's model_version after the first write. Returns why it stopped early (``stop()``'s answer,
    checked between batches) or None when it went through every task."""
    run.total = len(tasks)
    run.report("running")
    for start in range(0, len(tasks), batch):
        if start and (reason := stop()):
            return reason
        chunk = tasks[start:start + batch]
        predictions = predictor.predict_with(loaded, chunk, control, threshold=threshold,
                                             max_detections=max_detections)
        found = clusters([t for t, p in zip(chunk, predictions) if p["score"] is not None]) if clusters else {}
        writes = []
        for task, prediction in zip(chunk, predictions):
            if prediction["score"] is None:  # the image failed (logged): no prediction rather than a null score
                run.failed += 1
                continue
            writes.append({"task": task["id"], "result": prediction["result"], "score": prediction["score"],
                           "model_version": loaded.version, "cluster": found.get(task["id"])})
        run.written += _write(client, run.project, writes)
        run.writes.update({w["task"]: {k: w[k] for k in ("score", "cluster", "model_version")} for w in writes})
        if writes and not run.moved:
            with run.state.version_lock():  # claim + PATCH as one step (the label stream's job moves it too)
                if not (may_move() if may_move else stop() != "superseded"):  # a newer version's job moved it
                    return "superseded"
                client.set_model_version(run.project, loaded.version)
            run.moved = True
        written = {w["task"] for w in writes}
        for task in chunk:
            if task["id"] not in written:
                continue  # keep what it had: a failed image must not lose the task's previous prediction
            for old in task.get("predictions") or ():  # as listed before this write: the new one is not among them
                if delete(old) and client.delete_prediction(old["id"]):
                    run.deleted += 1
        run.done += len(chunk)
        run.report("running")
    return None


def _write(client: LabelStudioClient, project: str, writes: list[dict]) -> int:
    """Write a batch; a task deleted since the listing makes Label Studio reject the whole batch (400), so
    on a rejection the batch is written again without the tasks that are gone."""
    if any(w.get("cluster") is not None for w in writes):
        return client.create_predictions(project, writes)  # one by one: a deleted task is skipped there, no re-send
    try:
        return client.create_predictions(project, writes)
    except LabelStudioUnavailable:
        raise
    except LabelStudioError:
        existing = client.tasks_by_id(project, [w["task"] for w in writes])
        kept = [w for w in writes if w["task"] in existing]
        if len(kept) == len(writes):
            raise  # not a deleted task: a real error
        log.info("project %s: %d task(s) deleted meanwhile, left out of the batch", project, len(writes) - len(kept))
        return client.create_predictions(project, kept)


# -- jobs -----------------------------------------------------------------------------------------
def _setup(settings: Settings, connection: redis.Redis, project: str, version: str):
    url, key = ls_credentials(settings, connection)
    client = LabelStudioClient(url, key)
    control = parse_label_config(client.project(project)["label_config"]).primary
    fetcher = ImageFetcher(settings)
    fetcher.set_fallback(url, key)
    fetcher.on_failure = counters.fetch_failure_hook(connection, "rescore")
    state, meta = version_store(settings, project).load(version)
    if version_task(meta) != control.task:
        # e.g. the config moved from rectangles to polygons: boxes written under a polygon tag break the editor
        raise LivetrainError(f"version {version} predicts {version_task(meta)} but the project's label config "
                             f"asks for {control.task}; the next training session makes a {control.task} version")
    model = model_from_version(state, meta, settings.min_size)
    model.roi_heads.score_thresh = RAW_SCORE_FLOOR  # as /predict serves it: the uncertainty sees every candidate
    for_inference(model, pick_device(settings.device))
    loaded = LoadedModel.from_version(model, version, meta)
    predictor = Predictor.from_settings(None, fetcher, settings, skip_annotated=False)
    return client, control, loaded, predictor


def _retry_or_fail(run: Run, exc: LabelStudioUnavailable, attempt: int, again: Callable[[float], str | None]):
    """Label Studio unavailable: queue the same work again after a delay (``again`` returns the new job's
    id), or, after the last delay, fail with Label Studio's error."""
    if attempt < len(RETRY_DELAYS):
        delay = RETRY_DELAYS[attempt]
        log.warning("project %s: %s; %s again in %d s", run.project, exc.message, run.kind, delay)
        return run.report("waiting", error=exc.message, retry_in_s=delay, next_job=again(delay))
    run.report("error", error=exc.message)
    raise exc


def rescore_project(project: str, attempt: int = 0) -> dict:
    """The RQ job: score the unlabeled tasks with the project's active version (see the module doc)."""
    settings = Settings.from_env()
    connection = connect(settings)
    state = ProjectState(connection, project)
    job = get_current_job()
    if job is not None and connection.get(state.rescore_pending_key) == job.id.encode():
        connection.delete(state.rescore_pending_key)
    store = version_store(settings, project)
    version = store.active()
    run = Run("rescore", project, version or "", state)
    if version is None:
        return run.report("done", reason="no published version yet")

    def stop() -> str | None:
        return "superseded" if store.active() != version else None

    def may_move() -> bool:  # superseded or not: never backwards, and always to the active version
        return state.claim_model_version(version, active=store.active() == version)

    try:
        client, control, loaded, predictor = _setup(settings, connection, project, version)
        prefix = version_prefix(version)
        delete_old = settings.old_predictions == "delete"
        unlabeled = list(client.iter_unlabeled_tasks(project))
        tasks = plan_rescore(unlabeled, version, settings.rescore_limit)
        stream = StreamState(connection, project)
        reason = score_and_write(run, client, predictor, loaded, control, tasks, settings.rescore_batch,
                                 delete=lambda p: delete_old and p.get("model_version") != version
                                 and is_livetrain_version(p.get("model_version"), prefix),
                                 stop=stop, may_move=may_move,
                                 clusters=ClusterLookup(stream, predictor.fetcher, control.value_key)
                                 if settings.stream_prepare else None)
        # Nothing needed scoring: the project must still point here. Label Studio refuses a model_version that
        # none of its predictions carries (400 "Model version doesn't exist..."), e.g. when every task is labeled.
        if reason is None and not run.moved and any(has_version(t, version) for t in unlabeled):
            with state.version_lock():
                if may_move():
                    client.set_model_version(project, version)
        status_after_rescore(settings, state, stream, client, project, unlabeled, run.writes)
    except LabelStudioUnavailable as exc:
        return _retry_or_fail(run, exc, attempt, lambda delay: enqueue_rescore(connection, project, attempt + 1, delay))
    except Exception as exc:
        run.report("error", error=exc.message if isinstance(exc, LivetrainError) else f"{type(exc).__name__}: {exc}")
        raise
    log.info("project %s: re-scored %d/%d task(s) with %s (%d written, %d old deleted, %d failed)%s", project,
             run.done, run.total, version, run.written, run.deleted, run.failed, f"; {reason}" if reason else "")
    return run.report(reason or "done")


def complete_tasks(project: str, options: dict, attempt: int = 0) -> dict:
    """The RQ job behind "Complete": pre-label all or selected tasks with the active version."""
    settings = Settings.from_env()
    connection = connect(settings)
    state = ProjectState(connection, project)
    version = version_store(settings, project).active()
    run = Run("complete", project, version or "", state)
    if version is None:
        run.report("error", error="no model version yet: label a few images first (MIN_ANNOTATIONS)")
        raise LivetrainError(f"project {project} has no model version yet: label {settings.min_annotations} images first")
    try:
        client, control, loaded, predictor = _setup(settings, connection, project, version)
        if options["tasks"] is None:
            tasks = list(client.iter_tasks(project, only_labeled=False))
            missing = []
        else:
            found = client.tasks_by_id(project, options["tasks"])
            tasks = [found[t] for t in sorted(found)]
            missing = sorted(set(options["tasks"]) - set(found))
        skipped = [t["id"] for t in tasks if options["skip_annotated"] and has_annotations(t)]
        tasks = [t for t in tasks if t["id"] not in skipped]
        if not options["remove_existing"]:  # no duplicates: a task with this version's prediction is done
            skipped += [t["id"] for t in tasks if has_version(t, version)]
            tasks = [t for t in tasks if not has_version(t, version)]
        score_and_write(run, client, predictor, loaded, control, tasks, settings.rescore_batch,
                        threshold=options["min_score"], max_detections=options["max_detections"],
                        delete=lambda p: options["remove_existing"],
                        clusters=ClusterLookup(StreamState(connection, project), predictor.fetcher, control.value_key)
                        if settings.stream_prepare else None)  # after the write: a failed image keeps its old one
        if not run.moved:
            client.set_model_version(project, version)
    except LabelStudioUnavailable as exc:
        def again(delay):
            job_id = f"complete-{project}-{uuid.uuid4().hex[:12]}"
            rescore_queue(connection).enqueue_in(timedelta(seconds=delay), complete_tasks, project, options,
                                                 attempt + 1, job_id=job_id, job_timeout=JOB_TIMEOUT,
                                                 result_ttl=7 * 24 * 3600, failure_ttl=7 * 24 * 3600)
            return job_id
        return _retry_or_fail(run, exc, attempt, again)
    except Exception as exc:
        run.report("error", error=exc.message if isinstance(exc, LivetrainError) else f"{type(exc).__name__}: {exc}")
        raise
    log.info("project %s: completed %d task(s) with %s (%d written, %d removed, %d failed)", project, run.done,
             version, run.written, run.deleted, run.failed)
    return run.report("done", skipped=sorted(skipped), missing=missing)
