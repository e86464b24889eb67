"""Optional HTTP Basic auth (BASIC_AUTH_USER / BASIC_AUTH_PASS) on every route.

Exception: ``POST /webhook`` without credentials is accepted. Label Studio's event webhooks
(ANNOTATION_CREATED, ...) cannot send Basic auth (PROTOCOL.md), and a webhook is only a notification:
training data is always read from Label Studio itself, so an unauthenticated webhook cannot inject any.
Wrong credentials are still refused there. With WEBHOOK_SECRET set, such a webhook must carry the secret in
the ``X-Livetrain-Secret`` header (Label Studio's webhooks can send custom headers); the ML module's own
START_TRAINING call cannot, so it needs Basic auth then.
"""

from __future__ import annotations

import hmac

from flask import Flask, jsonify, request


SECRET_HEADER = "X-Livetrain-Secret"


def init_app(app: Flask, credentials: tuple[str, str] | None, webhook_secret: str = "") -> None:
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

    if not credentials and not webhook_secret:
        return

    def basic_ok(given) -> bool:
        return (credentials is not None and given is not None and given.type == "basic"
                and hmac.compare_digest((given.username or "").encode(), credentials[0].encode())
                and hmac.compare_digest((given.password or "").encode(), credentials[1].encode()))

    @app.before_request
    def require_auth():
        given = request.authorization
        if basic_ok(given):
            return None
        if request.method == "POST" and request.path == "/webhook" and not (given is not None and credentials):
            if not webhook_secret:
                return None
            sent = request.headers.get(SECRET_HEADER, "")
            if hmac.compare_digest(sent.encode(), webhook_secret.encode()):
                return None
            return _refuse(f"this backend requires a webhook secret: add the header {SECRET_HEADER} with the value of "
                           "WEBHOOK_SECRET to the webhook (Label Studio: project Settings > Webhooks > Headers)"
                           + (", or call it with Basic auth" if credentials else ""))
        if credentials is None:
            return None
        return _refuse("authentication required: this backend uses Basic auth (set it in the model connection's settings)")


def _refuse(message: str):
    response = jsonify(error=message)
    response.status_code = 401
    response.headers["WWW-Authenticate"] = 'Basic realm="livetrain"'
    return response
