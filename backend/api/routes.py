"""The routes Label Studio's ML module calls; each parses, delegates and answers."""

from __future__ import annotations

import json
import logging
import time

from flask import Blueprint, jsonify, request

from backend import __version__
from backend.api.state import state
from backend.errors import BadRequest
from backend.inference.predictor import BASE_VERSION
from backend.jobs.connection import ping
from backend.labelstudio.label_config import parse_label_config
from backend.labelstudio.protocol import project_id

log = logging.getLogger(__name__)
bp = Blueprint("livetrain", __name__)


def json_body() -> dict:
    raw = request.get_data(cache=True)
    try:
        body = json.loads(raw or b"null")
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    return body


@bp.get("/")
@bp.get("/health")
def health():
    app = state()
    starting = app.starting
    return jsonify(
        status="UP",
        model_class=starting.arch,
        model_version=BASE_VERSION,
        pretrained=starting.pretrained,
        weights_source=starting.source,
        weights_detail=starting.detail,
        warnings=list(starting.warnings),
        redis=ping(app.settings),
        version=__version__,
    )


@bp.post("/setup")
def setup():
    body = json_body()
    project = project_id(body.get("project"))
    parse_label_config(body.get("schema"))  # a 400 here tells the user at connect time
    state().fetcher.set_fallback(body.get("hostname"), body.get("access_token"))
    return jsonify(model_version=state().predictor.version(project))


@bp.post("/predict")
def predict():
    body = json_body()
    tasks = body.get("tasks")
    if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
        raise BadRequest("'tasks' must be a list of task objects")
    project = project_id(body.get("project"))
    config = parse_label_config(body.get("label_config"))
    started = time.perf_counter()
    results = state().predictor.predict(tasks, config, project)
    log.info("predicted %d task(s) for project %s in %.0f ms", len(tasks), project, 1000 * (time.perf_counter() - started))
    return jsonify(results=results)


@bp.post("/webhook")
def webhook():
    body = json_body()
    action = body.get("action")
    if not isinstance(action, str) or not action:
        raise BadRequest("webhook payload has no 'action'")
    log.info("webhook %s", action)
    return jsonify(status="ok", action=action)


@bp.get("/versions")
def versions():
    return jsonify(versions=[BASE_VERSION])
