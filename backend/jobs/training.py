"""The training job: a **session** per project that keeps the model in memory and trains while people annotate.

A webhook only marks what changed (``ProjectState.mark``) and queues a session unless one is pending or
running: per project at most one job is pending (a Redis key set with NX holds its id; the check and the
set are one Lua call) and at most one runs (a Redis lock with a TTL that the running job keeps renewing; a
killed worker's lock simply expires). A running session takes in the marks between steps (``sync_marked``),
so a submit enters training within a second or two; it publishes a version every PUBLISH_INTERVAL while it
trained on something new, ends when the project is idle (decay tail, final version) and frees the worker.
After it lets go of the lock it looks for marks once more, so a submit that raced its end starts the next.

Fair share: when another project's session waits in the queue and this one ran SESSION_SLICE seconds, it
publishes, checkpoints, queues itself behind and exits. A killed worker loses the steps since the last
checkpoint (CHECKPOINT_EVERY); the next session resumes from it (``TrainingSession.resume``).

Faults, each survived without manual action:

* Label Studio down: a session that has synced before trains on and retries its sync with a growing pause
  (``feed.retry_delay``: seconds at first, five minutes at most); a first sync that fails, or marks left when a session
  ends, queue the session again after such a pause (``enqueue_training(delay=...)``; RQ's scheduler runs it).
* Redis lost mid-session: the session checkpoints (nothing trained is lost), waits for Redis, and queues a
  session with a full sync that resumes from the checkpoint and finds what was labeled meanwhile.
* A version that cannot be written (a full disk): the error goes to the project status, nothing partial stays,
  the active version stays served, and the session trains on and tries again at the next interval.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
import uuid
from datetime import timedelta

import redis
from rq import get_current_job

from backend.errors import BadRequest, LivetrainError
from backend.jobs import counters
from backend.jobs.connection import connect, wait_for_redis
from backend.jobs.queue import job_queue
from backend.jobs.rescoring import rescore_after_publish
from backend.jobs.feed import Feed, retry_delay
from backend.jobs.state import ProjectState
from backend.labelstudio.client import LabelStudioUnavailable
from backend.model_store.models import pick_device, version_task
from backend.model_store.stores import version_store
from backend.model_store.weights import StartingWeightsByTask
from backend.settings import Settings
from backend.training.dataset import TrainingSet
from backend.training.session import SessionInputs, TrainingSession
from backend.training.validation import split_records

log = logging.getLogger(__name__)

JOB_TIMEOUT = 24 * 3600  # a session of a busy project may run for hours (fair share pauses it when others wait)
POLL_SECONDS = 1.0  # how often a session looks for marks (one Redis call)
STATUS_SECONDS = 2.0  # how often it reports progress and checks the queue for other projects
PUBLISH_RETRY_CAP = 120.0  # a publish that failed (a full disk) is tried again after PUBLISH_INTERVAL, doubling up to this
REDIS_ERRORS = (redis.ConnectionError, redis.TimeoutError)


# Set the pending key unless a session holds the project's lock (then it takes the marks in itself) or a
# job is pending already. KEYS: lock, pending; ARGV: job id, ttl, force (ignore the lock).
_CLAIM = """
if ARGV[3] == '0' and redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'EX', ARGV[2]) then return 1 end
return 0
"""


def enqueue_training(connection: redis.Redis, project: str, full: bool = False, tasks=(), deleted=(),
                     force: bool = False, delay: float = 0, attempt: int = 0) -> str | None:
    """Record the changed ``tasks`` / ``deleted`` annotations and queue a session for ``project`` unless one
    is pending or running, in one Redis round trip (this is the webhook's hot path); returns the new job id
    or None. ``force``: queue even while a session runs (it is about to exit: fair share, worker start).
    ``delay``: run it that many seconds from now (a retry while Label Studio is down; ``attempt`` counts them)."""
    state = ProjectState(connection, project)
    job_id = f"train-{project}-{uuid.uuid4().hex[:12]}"
    pipe = connection.pipeline(transaction=False)
    state.mark(tasks, deleted, full, pipe=pipe)
    pipe.eval(_CLAIM, 2, state.lock_key, state.pending_key, job_id, 24 * 3600, int(force))
    if not pipe.execute()[-1]:
        return None
    try:
        options = dict(job_id=job_id, job_timeout=JOB_TIMEOUT, result_ttl=3600, failure_ttl=7 * 24 * 3600,
                       description=f"train project {project}")
        if delay:
            job_queue(connection).enqueue_in(timedelta(seconds=delay), train_project, project, attempt, **options)
        else:
            job_queue(connection).enqueue(train_project, project, attempt, **options)
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


def train_project(project: str, attempt: int = 0) -> dict:
    """The RQ job: one training session. Returns a short report; raises (job failed, status 'error') when
    the session fails. ``attempt``: how many tries in a row Label Studio was unavailable (the retry pause)."""
    settings = Settings.from_env()
    connection = connect(settings)
    state = ProjectState(connection, project)
    this_job = get_current_job()
    # thread_local=False: the keeper thread must be able to extend the lock this thread took. A live session
    # renews its lock; a dead one's expires within LOCK_TTL: waiting a little longer tells the two apart.
    lock = connection.lock(state.lock_key, timeout=settings.lock_ttl, blocking_timeout=2 * settings.lock_ttl + 5,
                           thread_local=False)
    # the token names the job holding the lock (unique: job ids carry a uuid), so /status or a test can tell which
    # worker trains the project (job.worker_name)
    acquired = lock.acquire(token=this_job.id if this_job is not None else None)
    if this_job is not None and connection.get(state.pending_key) == this_job.id.encode():
        connection.delete(state.pending_key)  # only now: until here a webhook sees a job pending
    if not acquired:  # another session runs for this project: it takes the marks in
        return {"published": None, "reason": "another session of this project is running"}
    report: dict = {}
    redis_lost = False
    try:
        state.set_status(state="syncing")
        with _LockKeeper(lock, settings.lock_ttl):
            report = _train_locked(settings, connection, state, project)
    except REDIS_ERRORS as exc:
        # Redis restarted or unreachable: the session checkpointed (``_run``); continue once it is back
        log.warning("project %s: lost Redis (%s); the session stopped and continues once Redis is back", project, exc)
        wait_for_redis(connection, f"project {project}")
        redis_lost = True
    except LabelStudioUnavailable as exc:  # the first sync failed and nothing was ever synced: try again later
        delay = retry_delay(attempt + 1)
        message = f"{exc.message} (trying again in {delay:.0f} s)"
        state.set_status(state="idle", last_error=message, waiting=f"Label Studio unavailable; trying again in {delay:.0f} s")
        state.add_error("training", message)
        log.warning("project %s: %s", project, message)
        report = {"published": None, "label_studio_unavailable": True}
    except Exception as exc:
        message = exc.message if isinstance(exc, LivetrainError) else f"{type(exc).__name__}: {exc}"
        state.set_status(state="error", last_error=message, progress=None)
        state.add_error("training", message)
        log.error("project %s: session failed: %s\n%s", project, message, traceback.format_exc())
        raise
    finally:
        try:
            lock.release()
        except Exception:  # expired meanwhile: nothing to release
            pass
    if redis_lost:  # a full sync: what was labeled while Redis was down (its webhooks got 503s) is found
        return {"published": None, "redis_lost": True,
                "requeued": enqueue_training(connection, project, full=True, force=True)}
    # While Label Studio fails: the session again after a growing pause (not a job after job that cannot sync),
    # if its first sync failed or marks wait. Otherwise a submit that came as the session ended starts the next.
    if report.get("label_studio_unavailable") and ("end" not in report or state.has_marks()):
        next_attempt = attempt + 1
        report["retry"] = enqueue_training(connection, project, delay=retry_delay(next_attempt), attempt=next_attempt)
    elif report.get("end") not in ("slice", "rolled back") and state.has_marks():
        enqueue_training(connection, project)
    return report


def _train_locked(settings: Settings, connection: redis.Redis, state: ProjectState, project: str) -> dict:
    feed = Feed(settings, connection, state, project)
    report = _train(settings, connection, state, project, feed)
    return dict(report, label_studio_unavailable=feed.unavailable)


def _train(settings: Settings, connection: redis.Redis, state: ProjectState, project: str, feed: "Feed") -> dict:
    feed.first_sync()
    training_set = feed.training_set
    records = training_set.ordered()
    # MIN_ANNOTATIONS counts training images: the validation split (VALIDATION_FRACTION) is never trained on
    training, validation = split_records(records, project, settings.validation_fraction)
    store = version_store(settings, project)
    active = store.active()
    state.set_status(labeled_images=len(records), validation_images=len(validation), active_version=active, title=feed.title)
    if len(training) < settings.min_annotations:
        held_out = f" ({len(validation)} more held out for validation)" if validation else ""
        state.set_status(state="idle", waiting=f"{len(training)}/{settings.min_annotations} labeled images{held_out} before the first version")
        return {"published": None, "labeled_images": len(records)}
    task = feed.control.task if feed.control is not None else training_set.task
    active_meta = store.meta(active) if active else {}
    same_kind = active is not None and version_task(active_meta) == task
    trained = active_meta.get("trained_annotations", {}) if same_kind else {}
    checkpoint = store.root / "checkpoints" / "session.pt"
    if trained == {str(r.task_id): r.updated_at for r in training} and not checkpoint.exists():
        state.set_status(state="idle", waiting=None)
        return {"published": None, "reason": "nothing changed since " + active}
    # Label Studio down: the labels are those of the active version plus any the synced annotations use
    labels = feed.control.labels if feed.control is not None else tuple(dict.fromkeys(
        [*active_meta.get("classes", []), *(label for r in records for label in r.labels)]))
    session = TrainingSession(settings, StartingWeightsByTask(settings)(task), feed.fetcher,
                              SessionInputs(project, feed.title, labels, task), pick_device(settings.device),
                              seed=len(store.names()))
    session.update(records)
    if session.resume():
        log.info("project %s: resuming the interrupted session (%d steps, %d total)", project, session.steps,
                 session.total_steps)
    _score_new(session, state, records)
    return _run(settings, connection, state, project, feed, session)


def _score_new(session: TrainingSession, state: ProjectState, records) -> None:
    """The live quality score of each image the model never trained on, by the version served when it
    arrived, before it trains on it (see backend/metrics/quality.py); /status reports its rolling mean."""
    for entry in session.score_new(records):
        state.add_quality(entry)


def _other_project_waits(connection: redis.Redis, project: str) -> bool:
    return any(not job_id.startswith(f"train-{project}-") for job_id in job_queue(connection).get_job_ids())


def _run(settings: Settings, connection: redis.Redis, state: ProjectState, project: str, feed: Feed,
         session: TrainingSession) -> dict:
    started = time.monotonic()
    counted = counters.StepCounter(connection, project, session.steps)  # GET /metrics: livetrain_training_steps
    state.set_status(state="training", waiting=None, session=session.status(), last_error=None)
    publisher = _Publisher(settings, connection, state, session)
    try:
        end = _loop(settings, connection, state, project, feed, session, counted, publisher, started)
        point = session.loss_point()
        if point is not None:
            state.add_loss(point)
        if end == "rolled back":
            session.clear_checkpoint()
            enqueue_training(connection, project, force=True)
        elif session.loss_steps or session.has_new():
            if not publisher.publish() and end != "slice":
                _checkpoint(session)  # the final version could not be written: the next session resumes here
                end = "publish failed"
        if end == "slice":  # let the waiting project train; continue from here afterwards
            _checkpoint(session)
            enqueue_training(connection, project, force=True)
        elif end not in ("rolled back", "publish failed"):
            session.clear_checkpoint()
    except REDIS_ERRORS:
        _checkpoint(session)  # what it trained is kept: the session queued once Redis is back resumes from here
        raise
    counted.update(session.steps)
    counters.session_ended(connection, project, time.monotonic() - started)
    final = dict(session.status(), ended_at=time.time(), end_reason=end)
    state.set_status(state="idle", session=None, last_session=final, progress=None)
    log.info("project %s: session ended (%s) after %d steps, %d version(s)", project, end, session.steps,
             len(session.versions))
    return {"published": session.versions[-1] if session.versions else None, "versions": session.versions,
            "steps": session.steps, "end": end}


def _loop(settings: Settings, connection: redis.Redis, state: ProjectState, project: str, feed: Feed,
          session: TrainingSession, counted, publisher: "_Publisher", started: float) -> str:
    """Train until the session ends; returns why (idle, slice, rolled back, too few images)."""
    job = get_current_job()
    last_activity = last_status = started
    last_poll = 0.0
    checkpointed = session.steps
    while True:
        now = time.monotonic()
        if now - last_poll >= POLL_SECONDS:
            last_poll = now
            if feed.poll():
                records = feed.training_set.ordered()
                before = len(session.sampler.records)
                changed = session.update(records)  # training records only: the validation split stays out
                _score_new(session, state, changed)
                if changed or len(session.sampler.records) != before:
                    last_activity = now
                if session.decay_at is not None and changed:  # new work: back to the constant rate
                    session.decay_at = None
                state.set_status(labeled_images=len(records), validation_images=len(session.validator.records))
                if len(session.sampler.records) < settings.min_annotations:
                    return "too few images"
        if now - last_status >= STATUS_SECONDS:
            last_status = now
            state.set_status(session=session.status())
            counted.update(session.steps)
            point = session.loss_point()
            if point is not None:
                state.add_loss(point)
            if job is not None:
                job.meta["progress"] = session.status()
                job.save_meta()
            if session.store.active() != session.active_name:
                return "rolled back"  # someone chose another version: train on from that one, in a new session
            if now - started >= settings.session_slice and _other_project_waits(connection, project):
                return "slice"
        if session.decay_at is None and now - last_activity >= settings.idle_after and session.settled():
            log.info("project %s: idle; decaying the learning rate over %d steps", project, session.start_decay())
        session.step()
        if session.steps - checkpointed >= settings.checkpoint_every:
            _checkpoint(session)
            checkpointed = session.steps
        if session.decay_done():
            return "idle"
        if session.has_new() and publisher.due():
            publisher.publish()


def _checkpoint(session: TrainingSession) -> None:
    """A checkpoint, or a logged error: a full disk must not end the session (the last one, if any, stays)."""
    try:
        session.checkpoint()
    except OSError as exc:
        log.error("project %s: could not write the session checkpoint: %s", session.inputs.project, exc)


class _Publisher:
    """Publishes every PUBLISH_INTERVAL; a version that cannot be written (a full disk, a read-only volume) is
    reported in the project status, leaves nothing behind (``VersionStore.publish``) and the active version
    served, and is tried again after a growing pause, while the session trains on."""

    def __init__(self, settings: Settings, connection: redis.Redis, state: ProjectState, session: TrainingSession):
        self.settings, self.connection, self.state, self.session = settings, connection, state, session
        self.last = time.monotonic()
        self.failures = 0

    def due(self) -> bool:
        pause = retry_delay(self.failures, self.settings.publish_interval, PUBLISH_RETRY_CAP) if self.failures \
            else self.settings.publish_interval
        return time.monotonic() - self.last >= pause

    def publish(self) -> bool:
        try:
            _publish(self.settings, self.connection, self.state, self.session)
            self.failures = 0
            return True
        except OSError as exc:
            self.failures += 1
            project, active = self.session.inputs.project, self.session.active_name
            message = (f"could not publish a version ({type(exc).__name__}: {exc}); {active or 'the base model'} "
                       f"stays active, trying again in {retry_delay(self.failures, self.settings.publish_interval, PUBLISH_RETRY_CAP):.0f} s")
            log.error("project %s: %s", project, message)
            self.state.set_status(last_error=message)
            self.state.add_error("training", message)
            return False
        finally:
            self.last = time.monotonic()


def _publish(settings: Settings, connection: redis.Redis, state: ProjectState, session: TrainingSession) -> None:
    name = session.publish()
    counters.version_published(connection, session.inputs.project)
    meta = session.store.meta(name)
    # the guard (backend/training/guard.py) may have held it back: then the active version stays (or reverts)
    active = session.store.meta(session.active_name) if session.active_name != name else meta
    extra = {"held_back": state.status().get("held_back", 0) + 1} if meta.get("held_back") else {}
    state.set_status(active_version=session.active_name, trained_images=active["images"], last_error=None, **extra,
                     last_version={k: meta.get(k) for k in ("name", "parent", "images", "new_images", "annotations",
                                                             "mode", "steps", "total_steps", "losses", "published_at",
                                                             "held_back", "guard", "validation")})
    served_changed = meta.get("held_back") is None or session.last_verdict.revert_to is not None
    if settings.rescore_on_publish and served_changed:  # fresh scores for Label Studio's uncertainty sampling; never fails training
        rescore_after_publish(connection, project=session.inputs.project)


def rollback_to(settings: Settings, project: str, version: str) -> None:
    """Make ``version`` the one served (and trained from), refusing a version of the other kind (boxes vs
    masks) than the project's label config now asks for: it would be neither served nor trained from."""
    store = version_store(settings, project)
    if version in store.names():
        training_set = TrainingSet(settings.model_dir, project)
        kind = version_task(store.meta(version))
        if training_set.synced_at is not None and kind != training_set.task:
            raise BadRequest(f"version {version} predicts {kind}, but project {project} now labels "
                             f"{training_set.task}; roll back to a {training_set.task} version")
    store.set_active(version)
    # a paused or killed session's checkpoint continues the version it replaced: the next session starts here
    (store.root / "checkpoints" / "session.pt").unlink(missing_ok=True)


def queue_known_projects(settings: Settings, connection: redis.Redis) -> list[str]:
    """On worker start: a full sync + session for every project this MODEL_DIR knows (catch-up after downtime)."""
    projects = sorted(p.name for p in settings.model_dir.glob("*") if (p / "dataset.json").is_file())
    for project in projects:  # force: a killed worker's lock may linger for LOCK_TTL; the job waits it out
        enqueue_training(connection, project, full=True, force=True)
    return projects


def wait_for_idle(connection: redis.Redis, project: str, timeout: float = 600.0) -> dict:
    """Block until the project has no pending or running session (used by the CLI and benchmarks)."""
    state = ProjectState(connection, project)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = state.status()
        if status["state"] in ("idle", "error") and not connection.exists(state.pending_key):
            return status
        time.sleep(0.5)
    raise TimeoutError(f"project {project} still busy after {timeout} s")
