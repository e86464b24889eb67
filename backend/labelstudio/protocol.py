"""Small facts of Label Studio's ML protocol (see shared/label-studio/PROTOCOL.md)."""

from __future__ import annotations

from backend.errors import BadRequest


def project_id(value) -> str:
    """Project id from a payload's ``project``: ``"<id>.<created_at>"`` in /setup and /predict,
    a project object in webhooks, a bare id elsewhere."""
    if isinstance(value, dict):
        value = value.get("id")
    if isinstance(value, bool) or value is None:
        raise BadRequest("payload has no project id")
    text = str(value).split(".", 1)[0].strip()
    if not text.isdigit():
        raise BadRequest(f"invalid project {value!r}: expected '<id>.<timestamp>' or a project object")
    return text
