"""Every error leaves as JSON with a message a person can act on; nothing as a bare HTML 500."""

from __future__ import annotations

import logging

from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from backend.errors import LivetrainError
from backend.model_store.object_store import ObjectStoreError

log = logging.getLogger(__name__)


def init_app(app: Flask) -> None:
    @app.errorhandler(LivetrainError)
    def livetrain_error(exc: LivetrainError):
        return jsonify(error=exc.message), exc.status

    @app.errorhandler(ObjectStoreError)
    def store_unreachable(exc: ObjectStoreError):
        # MODEL_STORE=s3://... down or refusing: say so; what this process holds in memory is still served
        log.warning("model store: %s", exc)
        return jsonify(error=f"the model store (MODEL_STORE) cannot be reached right now: {exc}"), 503

    @app.errorhandler(RequestEntityTooLarge)
    def too_large(exc: RequestEntityTooLarge):
        limit = app.config.get("MAX_CONTENT_LENGTH")
        return jsonify(error=f"request body is over the limit of {limit} bytes (MAX_REQUEST_BYTES); send fewer "
                             "tasks per request, or raise MAX_REQUEST_BYTES"), 413

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        return jsonify(error=f"{exc.name}: {exc.description}"), exc.code

    @app.errorhandler(Exception)
    def unexpected(exc: Exception):
        log.exception("unhandled error")
        return jsonify(error=f"internal error ({type(exc).__name__}: {exc}); see the backend log"), 500
