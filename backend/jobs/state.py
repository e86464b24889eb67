"""Per-project state shared by web processes and workers, in Redis.

Webhooks only *mark* what changed (task ids, deleted annotation ids) and ask for a round; the worker
pops the marks and reads the real data from Label Studio. Status is a hash the /status route reads.
"""

from __future__ import annotations

import json
import time

import redis

PREFIX = "livetrain"
PROJECTS = f"{PREFIX}:projects"
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

    def restore_marks(self, dirty: set[int], deleted: set[int], full: bool) -> None:
        """Put marks back after a failed sync, so the next round sees them."""
        self.mark(dirty, deleted, full)

    def set_status(self, **fields) -> None:
        fields["updated_at"] = time.time()
        self.r.hset(self.status_key, mapping={k: json.dumps(v) for k, v in fields.items()})

    def status(self) -> dict:
        raw = self.r.hgetall(self.status_key)
        status = {k.decode(): json.loads(v) for k, v in raw.items()}
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
