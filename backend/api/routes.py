"""The routes Label Studio's ML module calls; each parses, delegates and answers."""

from __future__ import annotations

import json
import logging
import re
import time

import redis
from flask import Blueprint, current_app, jsonify, request
from werkzeug.exceptions import RequestEntityTooLarge

from backend import __version__
from backend.api import metrics
from backend.api.state import state
from backend.errors import BadRequest, NotFound, ServiceUnavailable
from backend.inference.predictor import BASE_VERSION
from backend.jobs.connection import ping
from backend.jobs.jobs import job_report
from backend.jobs.rescoring import complete_options, enqueue_complete, enqueue_rescore, rescore_after_publish
from backend.jobs.state import ProjectState, known_projects, save_ls_fallback
from backend.jobs.stream import SETUP_COOLDOWN, enqueue_stream, stream_after_event, stream_report, stream_wanted
from backend.jobs.training import enqueue_training, rollback_to
from backend.labelstudio.label_config import parse_label_config
from backend.labelstudio.protocol import project_id, short_repr
from backend.model_store.stores import list_projects, version_store
from backend.model_store.versions import is_version_name

log = logging.getLogger(__name__)
bp = Blueprint("livetrain", __name__)


def json_body() -> dict:
    raw = request.get_data(cache=True)  # 413 (errors.py) when Content-Length is over MAX_REQUEST_BYTES
    limit = current_app.config.get("MAX_CONTENT_LENGTH")
    if limit is not None and request.content_length is None and len(raw) >= limit and request.environ["wsgi.input"].read(1):
        # A chunked body (no Content-Length) is cut at the limit by Werkzeug without an error: one byte more is too large.
        raise RequestEntityTooLarge()
    try:
        body = json.loads(raw or b"null")
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: arrays nested ~100k deep
        raise BadRequest(f"request body is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    return body


@bp.get("/health")  # also GET / for clients that do not prefer HTML (backend/api/page.py)
def health():
    app = state()
    starting = app.starting
    return jsonify(
        status="UP",
        model_class=starting.arch,
        model_version=BASE_VERSION,
        active_versions=active_versions(app.settings),
        pretrained=starting.pretrained,
        weights_source=starting.source,
        weights_detail=starting.detail,
        warnings=list(starting.warnings),
        mask_model=_weights_summary(app.starting_for("masks")),
        redis=ping(app.settings),
        version=__version__,
    )


def _weights_summary(starting) -> dict:
    """What PolygonLabels / BrushLabels projects start from (Mask R-CNN)."""
    return {"model_class": starting.arch, "pretrained": starting.pretrained, "weights_source": starting.source,
            "warnings": list(starting.warnings)}


def active_versions(settings) -> dict:
    """Project -> its active version, for the projects that have one (MODEL_DIR or MODEL_STORE)."""
    try:
        found = {p: version_store(settings, p).active() for p in list_projects(settings)}
    except OSError as exc:  # the object store unreachable: the web process still serves what it has loaded
        log.warning("cannot read the active versions: %s", exc)
        return {}
    return {p: name for p, name in found.items() if name is not None}


@bp.post("/setup")
def setup():
    body = json_body()
    project = project_id(body.get("project"))
    control = parse_label_config(body.get("schema")).primary  # a 400 here tells the user at connect time
    hostname, token = (v if isinstance(v, str) else None for v in (body.get("hostname"), body.get("access_token")))
    state().fetcher.set_fallback(hostname, token)
    try:  # the worker may need them too (when LABEL_STUDIO_URL / _API_KEY are not set)
        save_ls_fallback(state().redis, hostname, token)
    except redis.RedisError as exc:
        log.warning("could not share Label Studio's address with the worker: %s", exc)
    # connecting (or Label Studio's next call) switches the label stream on and prepares clusters: in the worker
    stream_after_event(state().redis, state().settings, project, cooldown=SETUP_COOLDOWN)
    return jsonify(model_version=state().predictor.version(project, control))


@bp.post("/predict")
def predict():
    body = json_body()
    tasks = body.get("tasks")
    if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
        raise BadRequest("'tasks' must be a list of task objects")
    project = project_id(body.get("project"))
    config = parse_label_config(body.get("label_config"))
    # a task whose data is not an object gets an empty prediction ("no image URL"), like a task whose image fails
    tasks = [{**t, "data": t.get("data") if isinstance(t.get("data"), dict) else {},
              "annotations": t.get("annotations") if isinstance(t.get("annotations"), list) else []} for t in tasks]
    started = time.perf_counter()
    results = state().predictor.predict(tasks, config, project)
    log.info("predicted %d task(s) for project %s in %.0f ms", len(tasks), project, 1000 * (time.perf_counter() - started))
    metrics.count_predictions(project, results)
    return jsonify(results=results)


# Events that change annotations; each feeds or starts the project's training session unless TRAIN_ON=start_training.
ANNOTATION_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED", "ANNOTATIONS_DELETED", "TASKS_DELETED")


@bp.post("/webhook")
def webhook():
    """Record what changed and start a training session unless one runs (it takes the change in); answers in milliseconds. The payload is only a hint: the
    worker reads annotations from Label Studio, so a forged webhook cannot inject training data."""
    body = json_body()
    action = body.get("action")
    if not isinstance(action, str) or not action:
        raise BadRequest("webhook payload has no 'action'")
    metrics.count_webhook(action)
    if action in STREAM_EVENTS:
        return _stream_event(action, body)
    if action != "START_TRAINING" and action not in ANNOTATION_EVENTS:
        return jsonify(status="ignored", action=action)
    annotation = body.get("annotation") if isinstance(body.get("annotation"), dict) else {}
    project = project_id(body.get("project") or annotation.get("project"))
    tasks = _ids([body.get("task")] + _list(body.get("tasks")))
    deleted = _ids(_list(body.get("annotations"))) if action == "ANNOTATIONS_DELETED" else []
    settings = state().settings
    try:
        queued = None
        if action == "START_TRAINING" or settings.train_on == "annotation":
            queued = enqueue_training(state().redis, project, tasks=tasks, deleted=deleted)
        else:
            ProjectState(state().redis, project).mark(tasks, deleted)
    except redis.RedisError as exc:
        raise ServiceUnavailable(f"cannot queue training, Redis is unavailable ({exc}). Nothing is lost: the worker "
                                 "re-reads Label Studio at its next sync and on startup.") from None
    return jsonify(status="ok", action=action, project=project, queued=queued is not None)


STREAM_EVENTS = ("TASKS_CREATED",)


def _stream_event(action: str, body: dict):
    """Imported tasks: embed, cluster and (before the first version) pre-score them for the label stream."""
    project = project_id(body.get("project"))
    if not stream_wanted(state().settings):
        return jsonify(status="ignored", action=action)
    try:
        queued = enqueue_stream(state().redis, project)
    except redis.RedisError as exc:
        raise ServiceUnavailable(f"cannot queue the label stream job, Redis is unavailable ({exc}). Nothing is lost: "
                                 "the next job (at the next /setup or import) embeds every task not seen yet.") from None
    return jsonify(status="ok", action=action, project=project, queued=queued is not None)


def _list(value) -> list:
    return value if isinstance(value, list) else []


def _ids(objects) -> list[int]:
    """The ``id`` of each object that has a positive integer one (a webhook payload is only a hint: others are skipped)."""
    ids = [o.get("id") for o in objects if isinstance(o, dict)]
    return [i for i in ids if isinstance(i, int) and not isinstance(i, bool) and 0 < i < 2**63]


@bp.get("/versions")
def versions():
    """``{"versions": [...]}`` for Label Studio (every project's, newest last); ``?project=ID`` for one,
    with ``details`` (meta of each version, which one is active)."""
    settings = state().settings
    wanted = request.args.get("project")
    projects = [project_id(wanted)] if wanted else list_projects(settings)
    names, details = [BASE_VERSION], {}
    for project in projects:
        listed = version_store(settings, project).list()
        names += [v["name"] for v in listed]
        details[project] = [{k: v.get(k) for k in VERSION_FIELDS} for v in listed]
    return jsonify(versions=names, details=details)


VERSION_FIELDS = ("name", "active", "parent", "images", "new_images", "annotations", "classes", "mode", "steps",
                  "losses", "quality", "duration_s", "published_at", "trained_annotations", "validation", "held_back",
                  "guard", "final", "session", "error")


@bp.post("/projects/<project>/rollback")
def rollback(project):
    """Serve an earlier version: ``{"version": "<name>"}``. Training continues from it."""
    version = json_body().get("version")
    if not isinstance(version, str) or not version:
        raise BadRequest("body must be {\"version\": \"<name>\"}; GET /versions?project=ID lists them")
    project = project_id(project)
    version = version_name(version, project)
    rollback_to(state().settings, project, version)
    if state().settings.rescore_on_publish:  # Label Studio's scores and model_version follow the served version
        rescore_after_publish(state().redis, project)
    return jsonify(status="ok", project=project, active=version)


def version_name(name: str, project: str) -> str:
    """``name`` when it looks like a version name (``<prefix>-v<N>``), else a 400 (it would name a folder)."""
    if not is_version_name(name):
        raise BadRequest(f"no version {short_repr(name)} in project {project}: version names look like 'cells-v3'; "
                         f"GET /versions?project={project} lists them")
    return name


@bp.get("/projects/<project>/export")
def export(project):
    """The model as a .zip: ``?format=torchscript|onnx&version=<name>`` (default: the active version); see docs/export.md."""
    from flask import send_file

    from backend.model_store.export import check_format, export_zip

    project, settings = project_id(project), state().settings
    fmt = check_format(request.args.get("format", ""))
    version = request.args.get("version") or None
    path, filename = export_zip(settings, project, version and version_name(version, project), fmt,
                                min_size=settings.min_size, score_threshold=settings.score_threshold,
                                max_detections=settings.max_detections)
    return send_file(path, mimetype="application/zip", as_attachment=True, download_name=filename)


@bp.post("/projects/<project>/train")
def train(project):
    """On demand: full sync from Label Studio, then a session (coalesced like webhooks)."""
    project = project_id(project)
    try:
        queued = enqueue_training(state().redis, project, full=True)
    except redis.RedisError as exc:
        raise ServiceUnavailable(f"cannot queue training, Redis is unavailable ({exc})") from None
    return jsonify(status="ok", project=project, queued=queued is not None)


@bp.post("/projects/<project>/rescore")
def rescore(project):
    """On demand: score the unlabeled tasks with the active version and write them into Label Studio."""
    project = project_id(project)
    try:
        job = enqueue_rescore(state().redis, project)
    except redis.RedisError as exc:
        raise ServiceUnavailable(f"cannot queue re-scoring, Redis is unavailable ({exc})") from None
    return jsonify(status="ok", project=project, queued=job is not None, job=job)


@bp.post("/projects/<project>/complete")
def complete(project):
    """Pre-label all or selected tasks with the active version, as a background job:
    ``{"tasks": [ids] | "all", "min_score", "max_detections", "remove_existing", "skip_annotated"}``.
    Poll ``GET /jobs/<job>`` (or ``/status``) for progress."""
    project = project_id(project)
    options = complete_options(json_body())
    if version_store(state().settings, project).active() is None:
        raise BadRequest(f"project {project} has no model version yet: label "
                         f"{state().settings.min_annotations} images first")
    try:
        job = enqueue_complete(state().redis, project, options)
    except redis.RedisError as exc:
        raise ServiceUnavailable(f"cannot queue the job, Redis is unavailable ({exc})") from None
    return jsonify(status="ok", project=project, job=job), 202


@bp.get("/jobs/<job_id>")
def job(job_id):
    """A background job's status, progress, result and error."""
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,200}", job_id):  # RQ raises ValueError on any other id
        raise NotFound(f"no job {short_repr(job_id)}: job ids are letters, digits, '-' and '_'")
    try:
        return jsonify(job_report(state().redis, job_id))
    except redis.RedisError as exc:
        raise ServiceUnavailable(f"Redis is unavailable ({exc})") from None


@bp.get("/status")
def status():
    """Per project: state, active version, labeled/trained images, the session (running or last), live quality, last error."""
    connection, settings = state().redis, state().settings
    try:
        projects = {p: ProjectState(connection, p).status() for p in known_projects(connection)}
        for p, status in projects.items():  # the label stream: how far behind the active version it is, now
            if (report := stream_report(settings, connection, p, status)) is not None:
                status["stream"] = report
    except redis.RedisError as exc:
        raise ServiceUnavailable(f"Redis is unavailable ({exc})") from None
    return jsonify(projects=projects)
