"""Optional HTTP Basic auth (BASIC_AUTH_USER / BASIC_AUTH_PASS) on every route.

Exception: ``POST /webhook`` without credentials is accepted. Label Studio's event webhooks
(ANNOTATION_CREATED, ...) cannot send Basic auth (PROTOCOL.md), and a webhook is only a notification:
training data is always read from Label Studio itself, so an unauthenticated webhook cannot inject any.
Wrong credentials are still refused there.
"""

from __future__ import annotations

import hmac

from flask import Flask, jsonify, request


def init_app(app: Flask, credentials: tuple[str, str] | None) -> None:
    @app.before_request
    def refuse_cross_site():
        # The status page has browsers keep the Basic credentials (or auth is off): a page on another site
        # could then make a browser POST a rollback or train, or start an export, with a plain form or <img>.
        # Browsers say where a request comes from in Sec-Fetch-Site; Label Studio (a server) sends none.
        if request.headers.get("Sec-Fetch-Site") == "cross-site" and (
                request.method not in ("GET", "HEAD") or request.path.endswith("/export")):
            response = jsonify(error="cross-site requests are refused: call this backend from its own page or a server")
            response.status_code = 403
            return response
        return None

    if not credentials:
        return
    user, password = credentials

    @app.before_request
    def require_basic_auth():
        given = request.authorization
        if given is None and request.method == "POST" and request.path == "/webhook":
            return None
        if (
            given is not None
            and given.type == "basic"
            and hmac.compare_digest((given.username or "").encode(), user.encode())
            and hmac.compare_digest((given.password or "").encode(), password.encode())
        ):
            return None
        response = jsonify(error="authentication required: this backend uses Basic auth (set it in the model connection's settings)")
        response.status_code = 401
        response.headers["WWW-Authenticate"] = 'Basic realm="livetrain"'
        return response
