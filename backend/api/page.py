"""The status page for people: ``GET /`` in a browser (content negotiation), and the JSON it refreshes from.

- ``GET /``: HTML when the Accept header prefers text/html (a browser), else the health JSON that Label Studio,
  curl and scripts expect (``/health`` is always JSON).
- ``GET /dashboard``: every project's view model (backend/api/dashboard.py) as JSON; the page polls it.
- ``GET /projects/<project>/dashboard``: one project's.

The page is rendered on the server (works without JavaScript; charts are inline SVG from backend/api/plots.py);
static/status.js refreshes it every few seconds while something runs and posts rollbacks. No CDN, no web fonts.
"""

from __future__ import annotations

import logging

import redis
from flask import Blueprint, jsonify, make_response, render_template, request, url_for

from backend.api import dashboard as views
from backend.api import plots, routes
from backend.api.state import state
from backend.errors import ServiceUnavailable
from backend.labelstudio.protocol import project_id

log = logging.getLogger(__name__)
bp = Blueprint("page", __name__, template_folder="templates", static_folder="static",
               static_url_path="/page-static")

POLL_BUSY_MS = 2500  # while a project trains or a job runs
POLL_IDLE_MS = 10000  # otherwise: a new session still shows up within seconds


def wants_html() -> bool:
    """Whether the client prefers text/html over JSON (browsers do; ``*/*``, no Accept and JSON clients don't)."""
    accept = request.accept_mimetypes
    return accept.best_match(["application/json", "text/html"]) == "text/html" and \
        accept["text/html"] > accept["application/json"]


def health_summary() -> dict:
    try:
        return routes.health().get_json()
    except Exception as exc:  # the page still shows the projects
        log.warning("status page: health failed: %s", exc)
        return {"status": "?", "error": str(exc)}


@bp.get("/")
def index():
    if not wants_html():
        response = routes.health()
    else:
        app = state()
        health, error = health_summary(), ""
        try:
            data = views.dashboard(app.settings, app.redis, health)
        except redis.RedisError as exc:
            error = f"Redis is unavailable ({exc}): project state cannot be shown; versions on disk are still served."
            data = {"generated": views.fmt_time(None), "busy": False, "health": health,
                    "columns": views.VERSION_COLUMNS, "projects": []}
        response = make_response(render_template(
            "status.html", data=data, health=health, error=error, svg=plots.svg,
            poll_busy_ms=POLL_BUSY_MS, poll_idle_ms=POLL_IDLE_MS,
            dashboard_url=url_for("page.dashboard_json"),
            rollback_url=url_for("livetrain.rollback", project="__project__")))
        response.headers["Cache-Control"] = "no-store"
    response.headers.add("Vary", "Accept")
    return response


@bp.get("/dashboard")
def dashboard_json():
    """Everything the status page shows, for every project."""
    app = state()
    try:
        data = views.dashboard(app.settings, app.redis, health_summary())
    except redis.RedisError as exc:
        raise ServiceUnavailable(f"Redis is unavailable ({exc})") from None
    response = jsonify(data)
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.get("/projects/<project>/dashboard")
def project_dashboard(project):
    """What the status page shows of one project."""
    app = state()
    project = project_id(project)
    try:
        view = views.project_view(app.settings, app.redis, project)
    except redis.RedisError as exc:
        raise ServiceUnavailable(f"Redis is unavailable ({exc})") from None
    response = jsonify(view)
    response.headers["Cache-Control"] = "no-store"
    return response
