"""Flask application factory: ``create_app(settings)``; gunicorn runs ``backend.api:create_app()``."""

from __future__ import annotations

import logging

from flask import Flask

from backend.settings import Settings


def create_app(settings: Settings | None = None) -> Flask:
    from backend.api import auth, errors, metrics, routes
    from backend.api import page
    from backend.api.state import AppState

    settings = settings or Settings.from_env()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = Flask("livetrain")
    app.json.sort_keys = False
    # Bodies over MAX_REQUEST_BYTES get a 413 before they are read: Werkzeug checks Content-Length up front
    # and stops a chunked body (no Content-Length) as soon as it passes the limit (see errors.py for the reply).
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    # The model is loaded here, once per process, so /health answers within Label Studio's 1 s.
    app.extensions["livetrain"] = AppState.build(settings)
    auth.init_app(app, settings.basic_auth, settings.webhook_secret)
    errors.init_app(app)
    app.register_blueprint(routes.bp)
    app.register_blueprint(page.bp)  # GET / in a browser: the status page; GET /dashboard: its JSON
    metrics.init_app(app)  # GET /metrics, and the request / prediction / webhook counters
    return app
