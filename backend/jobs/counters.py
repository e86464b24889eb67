"""Counters of what the workers do (training steps, versions, sessions, image failures), kept in Redis.

Workers may run on other machines than the web processes, so they cannot use prometheus_client's files:
they add to Redis hashes here and ``GET /metrics`` (``backend/api/metrics.py``) exports the hashes. Every
function here swallows Redis errors: a metric must never fail a training session or a re-scoring job.
"""

from __future__ import annotations

import logging
import re

import redis

from backend.jobs.state import PREFIX

log = logging.getLogger(__name__)

STEPS = f"{PREFIX}:metrics:steps"  # project -> training steps
VERSIONS = f"{PREFIX}:metrics:versions"  # project -> versions published
SESSIONS = f"{PREFIX}:metrics:sessions"  # "<project>|<bucket>" -> count, "<project>|sum" -> seconds
FETCH_FAILURES = f"{PREFIX}:metrics:fetch-failures"  # "<where>|<reason>" -> image fetch failures
# Upper bounds (seconds) of the session duration histogram: sessions last from seconds to hours.
SESSION_BUCKETS = (10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0)

_HTTP = re.compile(r"returned HTTP (\d{3})")


def failure_reason(message: str) -> str:
    """A short, fixed-vocabulary reason for an ImageError's message (the message itself names URLs, so it
    never becomes a label)."""
    text = str(message)
    if "timed out" in text:
        return "timeout"
    if "unreachable" in text:
        return "unreachable"
    if "personal access token" in text:
        return "auth"
    match = _HTTP.search(text)
    if match:
        return f"http_{match.group(1)}"
    if "MAX_IMAGE_BYTES" in text or "MAX_IMAGE_PIXELS" in text or "too large" in text:
        return "too_large"
    if "decode" in text:
        return "decode"
    if "unsupported image URL" in text or "invalid port" in text or "no '" in text:
        return "bad_url"
    if "address is unknown" in text:
        return "no_label_studio_url"
    if "download of image" in text or "could not fetch" in text:
        return "download"
    return "other"


def _safely(what: str, call) -> bool:
    try:
        call()
        return True
    except (redis.RedisError, OSError) as exc:
        log.debug("metrics: could not record %s: %s", what, exc)
        return False


def version_published(connection: redis.Redis, project: str) -> None:
    _safely("a published version", lambda: connection.hincrby(VERSIONS, str(project), 1))


def session_ended(connection: redis.Redis, project: str, seconds: float) -> None:
    """One session's duration into the project's histogram (cumulative buckets, as Prometheus wants them)."""
    def record():
        pipe = connection.pipeline(transaction=True)
        for bound in (*SESSION_BUCKETS, "+Inf"):
            if bound == "+Inf" or seconds <= bound:
                pipe.hincrby(SESSIONS, f"{project}|{bound}", 1)
        pipe.hincrbyfloat(SESSIONS, f"{project}|sum", float(seconds))
        pipe.execute()
    _safely("a session's duration", record)


def fetch_failure_hook(connection: redis.Redis, where: str):
    """An ``ImageFetcher.on_failure`` that counts the failure under ``where`` (training, rescore)."""
    def on_failure(exc) -> None:
        reason = failure_reason(getattr(exc, "message", exc))
        _safely("an image failure", lambda: connection.hincrby(FETCH_FAILURES, f"{where}|{reason}", 1))
    return on_failure


class StepCounter:
    """Adds a session's steps to the project's counter every few seconds (one Redis call, not one a step)."""

    def __init__(self, connection: redis.Redis, project: str, steps: int):
        self.connection, self.project, self.counted = connection, str(project), steps

    def update(self, steps: int) -> None:
        new = steps - self.counted
        if new > 0 and _safely("training steps", lambda: self.connection.hincrby(STEPS, self.project, new)):
            self.counted = steps  # on a failure the steps are added at the next update instead


def read(connection: redis.Redis) -> dict:
    """Every counter, decoded: {"steps": {project: n}, "versions": {...}, "sessions": {project: {"buckets":
    {bound: n}, "sum": s}}, "fetch_failures": {(where, reason): n}}. Raises RedisError (the caller reports it)."""
    pipe = connection.pipeline(transaction=False)
    pipe.hgetall(STEPS).hgetall(VERSIONS).hgetall(SESSIONS).hgetall(FETCH_FAILURES)
    steps, versions, sessions, failures = pipe.execute()
    out = {"steps": {k.decode(): int(v) for k, v in steps.items()},
           "versions": {k.decode(): int(v) for k, v in versions.items()},
           "sessions": {}, "fetch_failures": {}}
    for key, value in sessions.items():
        project, _, field = key.decode().rpartition("|")
        entry = out["sessions"].setdefault(project, {"buckets": {}, "sum": 0.0})
        if field == "sum":
            entry["sum"] = float(value)
        else:
            entry["buckets"][field] = int(value)
    for key, value in failures.items():
        where, _, reason = key.decode().partition("|")
        out["fetch_failures"][(where, reason)] = int(value)
    return out
