"""Small facts of Label Studio's ML protocol (see shared/label-studio/PROTOCOL.md)."""

from __future__ import annotations

from backend.errors import BadRequest


def project_id(value) -> str:
    """Project id from a payload's ``project``: ``"<id>.<created_at>"`` in /setup and /predict,
    a project object in webhooks, a bare id elsewhere. Always ASCII digits (it names Redis keys and folders)."""
    if isinstance(value, dict):
        value = value.get("id")
    if isinstance(value, bool) or value is None:
        raise BadRequest("payload has no project id")
    if isinstance(value, int):
        text = str(value) if 0 <= value < 10**18 else ""  # str() of a 5000-digit int raises ValueError
    elif isinstance(value, (str, float)):
        text = str(value).split(".", 1)[0].strip()
    else:
        text = ""
    # isdigit() alone admits "²" and "٣" (other scripts' digits): not an id Label Studio makes
    if not (text.isascii() and text.isdigit() and len(text) <= 18):
        raise BadRequest(f"invalid project {short_repr(value)}: expected '<id>.<timestamp>' or a project object")
    return str(int(text))


def short_repr(value, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters, for error messages about values a client sent."""
    try:
        text = repr(value) if not isinstance(value, int) or abs(value) < 10**100 else f"<a {value.bit_length()}-bit int>"
    except (RecursionError, ValueError):
        text = f"<a deeply nested {type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."
