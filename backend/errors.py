"""Errors that carry a clear, user-facing message and the HTTP status they map to.

Every layer raises these instead of returning sentinel values; the API turns them into
JSON replies (see ``backend.api.errors``), the worker into a logged job failure.
"""


class LivetrainError(Exception):
    """Base class: ``message`` is shown to the user, ``status`` is the HTTP status."""

    status = 500

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class BadRequest(LivetrainError):
    status = 400


class NotFound(LivetrainError):
    """A project, model version or other named thing does not exist."""

    status = 404


class LabelConfigError(BadRequest):
    """The project's label config has nothing livetrain can train or predict."""


class ImageError(LivetrainError):
    """An image could not be fetched or decoded (404, too large, corrupt, unsupported URL)."""

    status = 422


class WeightsError(LivetrainError):
    """A weights file is missing, has the wrong hash, or does not fit the model."""


class ServiceUnavailable(LivetrainError):
    """A service livetrain depends on (Redis, Label Studio) cannot be reached right now."""

    status = 503
