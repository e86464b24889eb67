"""Per-project state shared by web processes and workers, in Redis.

Webhooks only *mark* what changed (task ids, deleted annotation ids) and ask for a session; the
session pops the marks and reads the real data from Label Studio. Status is a hash the /status route reads.
"""

from __future__ import annotations

import json
import time

import redis

from backend.errors import LivetrainError

PREFIX = "livetrain"
PROJECTS = f"{PREFIX}:projects"
# KEYS: the moved-version key; ARGV: the version's number, 1 if it is the active version. Sets it when newer
# (or equal: a retried job), or when active.
_CLAIM_VERSION = """
local moved = tonumber(redis.call('GET', KEYS[1]) or '-1')
if ARGV[2] == '1' or tonumber(ARGV[1]) >= moved then redis.call('SET', KEYS[1], ARGV[1]) return 1 end
return 0
"""
LOSS_POINTS = 2000  # points of the loss curve kept per project
ERRORS_KEPT = 20  # recent errors kept per project
QUALITY_WINDOW = 10  # images in the rolling mean of the live quality score that /status reports
LS_FALLBACK = f"{PREFIX}:ls-fallback"  # hostname + access_token from /setup, for workers without LABEL_STUDIO_*


class ProjectState:
    def __init__(self, connection: redis.Redis, project: str):
        self.r = connection
        self.project = str(project)
        key = f"{PREFIX}:project:{self.project}"
        self.dirty_key, self.deleted_key = f"{key}:dirty", f"{key}:deleted"
        self.pending_key, self.full_key = f"{key}:pending", f"{key}:full"
        self.status_key, self.lock_key = f"{key}:status", f"{key}:lock"
        self.rescore_pending_key = f"{key}:rescore-pending"
        self.moved_version_key = f"{key}:ls-model-version"  # number of the version re-scoring moved LS to
        self.quality_key = f"{key}:quality"  # the live quality series: one JSON entry per newly labeled image
        self.loss_key = f"{key}:loss"  # the training loss series: one point every few seconds of a session
        self.errors_key = f"{key}:errors"  # recent errors of training, re-scoring and Complete (newest last)

    def mark(self, tasks=(), deleted_annotations=(), full: bool = False, pipe=None) -> None:
        """Record what changed; with ``pipe``, only add the commands to it (the caller executes)."""
        own = pipe is None
        pipe = self.r.pipeline() if own else pipe
        pipe.sadd(PROJECTS, self.project)
        if tasks:
            pipe.sadd(self.dirty_key, *[int(t) for t in tasks])
        if deleted_annotations:
            pipe.sadd(self.deleted_key, *[int(a) for a in deleted_annotations])
        if full:
            pipe.set(self.full_key, 1)
        if own:
            pipe.execute()

    def pop_marks(self) -> tuple[set[int], set[int], bool]:
        """Take (dirty task ids, deleted annotation ids, full sync wanted) and clear them, atomically."""
        pipe = self.r.pipeline(transaction=True)
        pipe.smembers(self.dirty_key).smembers(self.deleted_key).get(self.full_key)
        pipe.delete(self.dirty_key, self.deleted_key, self.full_key)
        dirty, deleted, full, _ = pipe.execute()
        return {int(t) for t in dirty}, {int(a) for a in deleted}, bool(full)

    def has_marks(self) -> bool:
        pipe = self.r.pipeline(transaction=False)
        pipe.exists(self.dirty_key, self.deleted_key, self.full_key)
        return bool(pipe.execute()[0])

    def restore_marks(self, dirty: set[int], deleted: set[int], full: bool) -> None:
        """Put marks back after a failed sync, so the next sync sees them."""
        self.mark(dirty, deleted, full)

    def set_status(self, **fields) -> None:
        fields["updated_at"] = time.time()
        self.r.hset(self.status_key, mapping={k: json.dumps(v) for k, v in fields.items()})

    def claim_model_version(self, version: str, active: bool = False) -> bool:
        """Whether a re-scoring job may move Label Studio's model_version to ``version``: yes unless a job
        already moved it to a newer one (versions are ``<prefix>-v<N>``). With a version every few seconds a
        job is often superseded before its first batch is written; moving to it anyway keeps the label
        stream on fresh scores, and this keeps two jobs from moving it backwards. The ``active`` version
        (e.g. after a rollback to an older one) may always be moved to."""
        return bool(self.r.eval(_CLAIM_VERSION, 1, self.moved_version_key, version_number(version), int(active)))

    def version_lock(self):
        """Held around "claim the model_version, then PATCH Label Studio": re-scoring and the label stream's
        typical-first job both move it, and the PATCH that lands last must be the one of the newest claim."""
        return self.r.lock(self.moved_version_key + ":lock", timeout=60, blocking_timeout=60)

    def add_quality(self, entry: dict) -> None:
        """Append one image's live quality score (image index, time, version, score, category counts)."""
        self.r.rpush(self.quality_key, json.dumps(entry))

    def quality_series(self, last: int = 0) -> list[dict]:
        return [json.loads(e) for e in self.r.lrange(self.quality_key, -last if last else 0, -1)]

    def add_loss(self, entry: dict) -> None:
        """Append one point of the training loss curve (time, total steps, mean loss since the last point, mode,
        lr); the oldest points go beyond LOSS_POINTS."""
        pipe = self.r.pipeline(transaction=False)
        pipe.rpush(self.loss_key, json.dumps(entry)).ltrim(self.loss_key, -LOSS_POINTS, -1)
        pipe.execute()

    def loss_series(self, last: int = 0) -> list[dict]:
        return [json.loads(e) for e in self.r.lrange(self.loss_key, -last if last else 0, -1)]

    def add_error(self, source: str, message: str) -> None:
        """Remember an error for the status page (the newest ERRORS_KEPT)."""
        entry = {"time": round(time.time(), 3), "source": source, "message": str(message)[:2000]}
        pipe = self.r.pipeline(transaction=False)
        pipe.rpush(self.errors_key, json.dumps(entry)).ltrim(self.errors_key, -ERRORS_KEPT, -1)
        pipe.execute()

    def recent_errors(self, last: int = ERRORS_KEPT) -> list[dict]:
        return [json.loads(e) for e in self.r.lrange(self.errors_key, -last, -1)]

    def status(self) -> dict:
        raw = self.r.hgetall(self.status_key)
        status = {k.decode(): json.loads(v) for k, v in raw.items()}
        window = self.quality_series(QUALITY_WINDOW)
        if window:
            status["quality"] = {"images": self.r.llen(self.quality_key), "window": len(window),
                                 "rolling_mean": round(sum(e["score"] for e in window) / len(window), 4),
                                 "last": window[-1]}
        if self.r.exists(self.pending_key) and status.get("state") != "training":
            status["state"] = "queued"
        status.setdefault("state", "idle")
        return status


def known_projects(connection: redis.Redis) -> list[str]:
    return sorted((p.decode() for p in connection.smembers(PROJECTS)), key=lambda p: int(p) if p.isdigit() else 0)


def save_ls_fallback(connection: redis.Redis, hostname: str | None, access_token: str | None) -> None:
    if hostname and access_token:
        connection.hset(LS_FALLBACK, mapping={"hostname": hostname, "access_token": access_token})


def load_ls_fallback(connection: redis.Redis) -> tuple[str, str]:
    raw = connection.hgetall(LS_FALLBACK)
    return raw.get(b"hostname", b"").decode(), raw.get(b"access_token", b"").decode()


def ls_credentials(settings, connection: redis.Redis) -> tuple[str, str]:
    """LABEL_STUDIO_URL with LABEL_STUDIO_API_KEY (or the token /setup sent); without LABEL_STUDIO_URL, the hostname
    and token /setup sent. LABEL_STUDIO_API_KEY goes only to LABEL_STUDIO_URL: /setup's hostname comes from whoever
    called /setup, so it must never receive the configured key (nor, with LABEL_STUDIO_URL set, redirect traffic)."""
    hostname, token = load_ls_fallback(connection)
    if settings.label_studio_url:
        url, key = settings.label_studio_url, settings.label_studio_api_key or token
    else:
        url, key = hostname, token
    if url and key:
        return url, key
    if settings.label_studio_api_key and not settings.label_studio_url:
        raise LivetrainError("LABEL_STUDIO_API_KEY is set but LABEL_STUDIO_URL is not: set LABEL_STUDIO_URL too "
                             "(the key is only ever sent to that address)")
    raise LivetrainError("set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY for the worker (or connect the model in "
                         "Label Studio first, whose /setup call tells livetrain where Label Studio is)")


def version_number(version: str) -> int:
    """N of ``<prefix>-v<N>``; 0 for anything else (``livetrain-base``)."""
    head, _, number = version.rpartition("-v")
    return int(number) if head and number.isdigit() else 0
