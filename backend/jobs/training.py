"""The training job: sync from Label Studio, then train one round and publish a version.

Coalescing: per project at most one job is pending (a Redis key set with NX holds its id) and at most one
runs (a Redis lock with a TTL that the running job keeps renewing; a killed worker's lock simply expires).
A job clears the pending key when it starts, so events that arrive during a round queue exactly one more.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
import uuid

import redis
from rq import get_current_job

from backend.errors import BadRequest, LivetrainError
from backend.jobs.connection import connect
from backend.jobs.queue import job_queue
from backend.jobs.state import ProjectState, load_ls_fallback
from backend.jobs.sync import sync_project
from backend.labelstudio.client import LabelStudioClient, LabelStudioUnavailable
from backend.labelstudio.images import ImageFetcher
from backend.labelstudio.label_config import parse_label_config
from backend.model_store.models import pick_device, version_task
from backend.model_store.versions import VersionStore
from backend.model_store.weights import StartingWeightsByTask
from backend.settings import Settings
from backend.training.dataset import TrainingSet
from backend.training.engine import Hook, TrainState
from backend.training.round import RoundInputs, run_round

log = logging.getLogger(__name__)

JOB_TIMEOUT = 6 * 3600


def enqueue_training(connection: redis.Redis, project: str, full: bool = False, tasks=(), deleted=()) -> str | None:
    """Record the changed ``tasks`` / ``deleted`` annotations and queue a round for ``project`` unless one is
    already pending, in one Redis round trip (this is the webhook's hot path); returns the new job id or None."""
    state = ProjectState(connection, project)
    job_id = f"train-{project}-{uuid.uuid4().hex[:12]}"
    pipe = connection.pipeline(transaction=False)
    state.mark(tasks, deleted, full, pipe=pipe)
    pipe.set(state.pending_key, job_id, nx=True, ex=24 * 3600)
    if not pipe.execute()[-1]:
        return None
    try:
        job_queue(connection).enqueue(train_project, project, job_id=job_id, job_timeout=JOB_TIMEOUT,
                                      result_ttl=3600, failure_ttl=7 * 24 * 3600, description=f"train project {project}")
    except Exception:
        connection.delete(state.pending_key)
        raise
    return job_id


class _LockKeeper:
    """Renews the project lock every third of its TTL while the job lives."""

    def __init__(self, lock, ttl: float):
        self.lock, self.ttl = lock, ttl
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self):
        while not self._stop.wait(self.ttl / 3):
            try:
                self.lock.extend(self.ttl, replace_ttl=True)
            except Exception:
                log.exception("could not renew the project lock")


class _Progress(Hook):
    def __init__(self, state: ProjectState, every: int = 5):
        self.state, self.every, self.job = state, every, get_current_job()

    def after_step(self, s: TrainState) -> None:
        if s.step % self.every and s.step != s.total_steps:
            return
        progress = {"step": s.step, "steps": s.total_steps, "loss": round(s.last_losses.get("loss", 0.0), 4)}
        self.state.set_status(progress=progress)
        if self.job is not None:
            self.job.meta["progress"] = progress
            self.job.save_meta()


def ls_credentials(settings: Settings, connection: redis.Redis) -> tuple[str, str]:
    """LABEL_STUDIO_URL / _API_KEY, else what Label Studio's /setup call told the web process."""
    hostname, token = load_ls_fallback(connection)
    url, key = settings.label_studio_url or hostname, settings.label_studio_api_key or token
    if url and key:
        return url, key
    raise LivetrainError("set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY for the worker (or connect the model in "
                         "Label Studio first, whose /setup call tells livetrain where Label Studio is)")


def train_project(project: str) -> dict:
    """The RQ job. Returns a short report; raises (job failed, status 'error') when the round fails."""
    settings = Settings.from_env()
    connection = connect(settings)
    state = ProjectState(connection, project)
    state.set_status(state="syncing", progress=None)  # before the pending key goes: never looks idle meanwhile
    this_job = get_current_job()
    if this_job is not None and connection.get(state.pending_key) == this_job.id.encode():
        connection.delete(state.pending_key)
    # thread_local=False: the keeper thread must be able to extend the lock this thread took
    lock = connection.lock(state.lock_key, timeout=settings.lock_ttl, blocking_timeout=JOB_TIMEOUT, thread_local=False)
    if not lock.acquire():
        raise LivetrainError(f"project {project} stayed locked by another worker for {JOB_TIMEOUT} s")
    try:
        with _LockKeeper(lock, settings.lock_ttl):
            return _train_locked(settings, connection, state, project)
    except Exception as exc:
        message = exc.message if isinstance(exc, LivetrainError) else f"{type(exc).__name__}: {exc}"
        state.set_status(state="error", last_error=message, progress=None)
        log.error("project %s: round failed: %s\n%s", project, message, traceback.format_exc())
        raise
    finally:
        try:
            lock.release()
        except Exception:  # expired meanwhile: nothing to release
            pass


def _train_locked(settings: Settings, connection: redis.Redis, state: ProjectState, project: str) -> dict:
    training_set = TrainingSet(settings.model_dir, project)
    fetcher = ImageFetcher(settings)
    dirty, deleted, full = state.pop_marks()
    try:
        url, key = ls_credentials(settings, connection)
        fetcher.set_fallback(url, key)
        client = LabelStudioClient(url, key)
        info = client.project(project)
        control = parse_label_config(info["label_config"]).primary
        title = info.get("title") or f"project-{project}"
        sync_project(client, project, control, training_set, dirty, deleted, full)
    except LabelStudioUnavailable as exc:
        # Label Studio down: keep the marks for next time and train on what was synced before, if anything.
        state.restore_marks(dirty, deleted, full)
        if training_set.synced_at is None:
            raise
        log.warning("project %s: %s; training on the last synced data", project, exc.message)
        control, title = None, state.status().get("title") or f"project-{project}"
    records = training_set.ordered()
    store = VersionStore(settings.model_dir, project)
    active = store.active()
    state.set_status(labeled_images=len(records), active_version=active, title=title)
    if len(records) < settings.min_annotations:
        state.set_status(state="idle", waiting=f"{len(records)}/{settings.min_annotations} labeled images before the first round")
        return {"published": None, "labeled_images": len(records)}
    task = control.task if control is not None else training_set.task
    active_meta = store.meta(active) if active else {}
    same_kind = active is not None and version_task(active_meta) == task
    trained = active_meta.get("trained_annotations", {}) if same_kind else {}
    if trained == {str(r.task_id): r.updated_at for r in records}:
        state.set_status(state="idle", waiting=None)
        return {"published": None, "reason": "nothing changed since " + active}
    # Label Studio down: the labels are those of the active version plus any the synced annotations use
    labels = control.labels if control is not None else tuple(dict.fromkeys(
        [*active_meta.get("classes", []), *(label for r in records for label in r.labels)]))
    starting = StartingWeightsByTask(settings)(task)
    state.set_status(state="training", waiting=None, progress={"step": 0, "steps": settings.train_steps})
    meta = run_round(settings, starting, fetcher, RoundInputs(project, title, labels, records, task),
                     pick_device(settings.device), hooks=[_Progress(state)])
    last_round = {k: meta[k] for k in ("name", "parent", "images", "new_images", "annotations", "mode", "steps",
                                       "losses", "duration_s", "published_at")}
    state.set_status(state="idle", active_version=meta["name"], trained_images=meta["images"], last_round=last_round,
                     last_error=None, progress=None)
    if settings.rescore_on_publish:  # fresh scores for Label Studio's uncertainty sampling; never fails the round
        from backend.jobs.rescoring import rescore_after_publish  # here: rescoring imports this module

        rescore_after_publish(connection, project)
    return {"published": meta["name"], "images": meta["images"], "duration_s": meta["duration_s"]}


def rollback_to(settings: Settings, project: str, version: str) -> None:
    """Make ``version`` the one served (and trained from), refusing a version of the other kind (boxes vs
    masks) than the project's label config now asks for: it would be neither served nor trained from."""
    store = VersionStore(settings.model_dir, project)
    if version in store.names():
        training_set = TrainingSet(settings.model_dir, project)
        kind = version_task(store.meta(version))
        if training_set.synced_at is not None and kind != training_set.task:
            raise BadRequest(f"version {version} predicts {kind}, but project {project} now labels "
                             f"{training_set.task}; roll back to a {training_set.task} version")
    store.set_active(version)


def queue_known_projects(settings: Settings, connection: redis.Redis) -> list[str]:
    """On worker start: a full sync + round for every project this MODEL_DIR knows (catch-up after downtime)."""
    projects = sorted(p.name for p in settings.model_dir.glob("*") if (p / "dataset.json").is_file())
    for project in projects:
        enqueue_training(connection, project, full=True)
    return projects


def wait_for_idle(connection: redis.Redis, project: str, timeout: float = 600.0) -> dict:
    """Block until the project has no pending or running round (used by the CLI and benchmarks)."""
    state = ProjectState(connection, project)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = state.status()
        if status["state"] in ("idle", "error") and not connection.exists(state.pending_key):
            return status
        time.sleep(0.5)
    raise TimeoutError(f"project {project} still busy after {timeout} s")
