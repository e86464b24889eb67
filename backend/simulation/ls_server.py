"""A throwaway Label Studio 1.23.2 on 127.0.0.1, for the e2e tests and the simulator.

Label Studio is installed once into its own venv (it pins Django and friends that must not meet our
dependencies): ``LS_VENV`` if set, else ``~/.cache/livetrain/label-studio-1.23.2``. The first start of a
data dir runs ~45 s of migrations; a migrated snapshot (with the user, its legacy token and personal
access token, and the SECRET_KEY that signs the PAT) is kept next to the venv, so later starts take ~5 s.

The environment is the one PROTOCOL.md lists for a local ML backend: loopback ML URLs allowed, SSRF
protection off (webhooks to 127.0.0.1), legacy tokens on, and every outbound call (Sentry, analytics,
version check) off, so nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import requests

log = logging.getLogger(__name__)

LS_VERSION = "1.23.2"
USER, PASSWORD = "e2e@example.com", "e2e-pass-12345"
LEGACY_TOKEN = "0123456789abcdef0123456789abcdef01234567"  # <= 40 characters, as LS requires


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "livetrain"


def ensure_venv(venv: Path | None = None) -> Path:
    """The venv holding ``label-studio==1.23.2``; installs it (pip, ~1 GB, 1-2 min) if missing."""
    venv = Path(venv or os.environ.get("LS_VENV") or cache_dir() / f"label-studio-{LS_VERSION}")
    marker = venv / ".livetrain-ok"  # written once the version is known right: later calls skip the check
    if marker.exists():
        return venv
    if (venv / "bin" / "label-studio").exists() and _version(venv) == LS_VERSION:
        try:
            marker.write_text(LS_VERSION)
        except OSError:  # a read-only venv someone else installed: fine, check again next time
            pass
        return venv
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f".{venv.name}.lock", "w") as lock:  # two test sessions must not both install
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not marker.exists():
            log.info("installing label-studio==%s into %s (once; ~1 GB)", LS_VERSION, venv)
            if not (venv / "bin" / "python").exists():
                subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", f"label-studio=={LS_VERSION}"],
                           check=True)
            if _version(venv) != LS_VERSION:
                raise RuntimeError(f"label-studio {LS_VERSION} did not install into {venv}")
            marker.write_text(LS_VERSION)
    return venv


def _version(venv: Path) -> str | None:
    out = subprocess.run([str(venv / "bin" / "python"), "-c", "import label_studio; print(label_studio.__version__)"],
                         capture_output=True, text=True, check=False)
    return out.stdout.strip() or None


@dataclass
class Credentials:
    url: str
    token: str  # legacy "Authorization: Token" key
    pat: str  # personal access token (JWT refresh token)


class LabelStudioServer:
    """``label-studio start`` with a throwaway data dir in ``run_dir``; ``stop()`` kills it by pid."""

    def __init__(self, run_dir: Path | None = None, port: int | None = None, venv: Path | None = None):
        from backend.simulation.processes import free_port

        self.venv = ensure_venv(venv)
        self.run_dir = Path(run_dir or tempfile.mkdtemp(prefix="livetrain-ls-"))
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.credentials: Credentials | None = None

    def start(self, timeout: float = 300.0) -> Credentials:
        data = self.run_dir / "data"
        template = cache_dir() / f"label-studio-{LS_VERSION}-snapshot"
        fresh = not (template / "label_studio.sqlite3").exists()
        if not fresh and not (data / "label_studio.sqlite3").exists():
            shutil.copytree(template, data, dirs_exist_ok=True)
        data.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, LABEL_STUDIO_HOST=self.url, LABEL_STUDIO_BASE_DATA_DIR=str(data),
                   LABEL_STUDIO_ML_BLOCK_LOCAL_IP="false", LABEL_STUDIO_SSRF_PROTECTION_ENABLED="false",
                   LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN="true", SENTRY_DSN="", FRONTEND_SENTRY_DSN="",
                   COLLECT_ANALYTICS="false", LATEST_VERSION_CHECK="false",
                   LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED="false", LOG_LEVEL="WARNING", DJANGO_DB="sqlite")
        self.log_path = self.run_dir / "ls.log"
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                [str(self.venv / "bin" / "label-studio"), "start", "--no-browser", "--internal-host", "127.0.0.1",
                 "--port", str(self.port), "--data-dir", str(data), "--username", USER, "--password", PASSWORD,
                 "--user-token", LEGACY_TOKEN, "--enable-legacy-api-token"],
                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_health(timeout)
        pat = self._personal_access_token(data)
        self.credentials = Credentials(self.url, LEGACY_TOKEN, pat)
        if fresh:
            self._snapshot(data, template)
        return self.credentials

    def _wait_health(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"label-studio exited with {self.proc.returncode}; see {self.log_path}")
            try:
                if requests.get(self.url + "/health", timeout=2).ok:
                    reply = requests.get(self.url + "/api/current-user/whoami", timeout=10,
                                         headers={"Authorization": f"Token {LEGACY_TOKEN}"})
                    reply.raise_for_status()
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"label-studio did not answer within {timeout} s; see {self.log_path}")

    def _personal_access_token(self, data: Path) -> str:
        """POST /api/token/ creates the user's PAT; it answers 409 once one exists, so it is kept in the data dir."""
        saved = data / "livetrain-pat.txt"
        if saved.exists():
            pat = saved.read_text().strip()
            if requests.post(self.url + "/api/token/refresh/", json={"refresh": pat}, timeout=10).ok:
                return pat
        reply = requests.post(self.url + "/api/token/", headers={"Authorization": f"Token {LEGACY_TOKEN}"}, timeout=10)
        reply.raise_for_status()
        pat = reply.json()["token"]
        saved.write_text(pat)
        return pat

    def _snapshot(self, data: Path, template: Path) -> None:
        tmp = template.with_name(template.name + f".tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)  # written aside, renamed into place: never half a snapshot
        for name in (".env", "livetrain-pat.txt"):  # .env holds the SECRET_KEY that signs the PAT
            if (data / name).exists():
                shutil.copy2(data / name, tmp / name)
        source, target = sqlite3.connect(data / "label_studio.sqlite3"), sqlite3.connect(tmp / "label_studio.sqlite3")
        source.backup(target)
        source.close(), target.close()
        try:
            tmp.rename(template)
        except OSError:  # another session wrote it first
            shutil.rmtree(tmp, ignore_errors=True)

    def stop(self, remove: bool = True) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=15)
            except ProcessLookupError:
                pass
        if remove:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def __enter__(self) -> "LabelStudioServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
