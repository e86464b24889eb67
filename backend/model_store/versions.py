"""Published model versions of one project, under ``MODEL_DIR/<project>/``.

    versions/<name>/model.pt     plain state dict (loaded with weights_only=True)
    versions/<name>/meta.json    parent, classes, images/annotations trained on, settings, losses, ...
    ACTIVE                       the name of the version /predict serves

A version is written into a temporary directory and renamed into place, and ACTIVE is replaced with
``os.replace``: readers (other processes, other machines sharing MODEL_DIR) see a whole version or none,
never a half-written one. Names are ``<prefix>-v<N>`` with N increasing, even across rollbacks.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import torch

from backend.errors import BadRequest

BASE_VERSION = "livetrain-base"  # the starting weights, before the first version is published
_NAME = re.compile(r"^(?P<prefix>.+)-v(?P<n>\d+)$")


def slug(text: str) -> str:
    """A version-name prefix from a project title: lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9]+", "-", (text or "").lower()).strip("-")[:40] or "livetrain"


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class VersionStore:
    def __init__(self, model_dir: Path, project: str):
        self.root = Path(model_dir) / str(project)
        self.versions_dir = self.root / "versions"
        self.active_file = self.root / "ACTIVE"

    # reading -------------------------------------------------------------
    def names(self) -> list[str]:
        """Version names, oldest first."""
        if not self.versions_dir.is_dir():
            return []
        found = [p.name for p in self.versions_dir.iterdir() if p.is_dir() and _NAME.match(p.name) and (p / "meta.json").is_file()]
        return sorted(found, key=lambda name: int(_NAME.match(name)["n"]))

    def meta(self, name: str) -> dict:
        return json.loads((self.versions_dir / name / "meta.json").read_text())

    def list(self) -> list[dict]:
        active = self.active()
        return [dict(self.meta(name), active=name == active) for name in self.names()]

    def active(self) -> str | None:
        try:
            name = self.active_file.read_text().strip()
        except FileNotFoundError:
            return None
        return name if (self.versions_dir / name / "model.pt").is_file() else None

    def marker(self) -> float:
        """Changes whenever ACTIVE is replaced: a cheap check for web processes (one stat call)."""
        try:
            return self.active_file.stat().st_mtime_ns
        except FileNotFoundError:
            return 0

    def load(self, name: str) -> tuple[dict, dict]:
        state = torch.load(self.versions_dir / name / "model.pt", map_location="cpu", weights_only=True)
        return state, self.meta(name)

    # writing -------------------------------------------------------------
    def next_name(self, prefix: str) -> str:
        numbers = [int(_NAME.match(n)["n"]) for n in self.names()]
        return f"{slug(prefix)}-v{max(numbers, default=0) + 1}"

    def publish(self, state: dict, meta: dict, prefix: str, keep: int = 5, activate: bool = True,
                protect=()) -> str:
        """Write a new version atomically, make it active (unless not ``activate``: a version the guard held
        back is kept but not served), prune old ones (never the active, the best or ``protect``). Returns its name."""
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.versions_dir, prefix=".tmp-"))
        try:
            name = self.next_name(prefix)
            meta = dict(meta, name=name, published_at=time.time())
            torch.save(state, tmp / "model.pt")
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            os.rename(tmp, self.versions_dir / name)  # atomic; fails if a concurrent publisher took the name
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if activate:
            self.set_active(name)
        self.prune(keep, protect)
        return name

    def set_active(self, name: str) -> None:
        if not (self.versions_dir / name / "model.pt").is_file():
            known = ", ".join(self.names()) or "none"
            raise BadRequest(f"no version {name!r} in project {self.root.name} (versions: {known})")
        write_atomic(self.active_file, name.encode())

    def update_meta(self, name: str, **fields) -> None:
        meta = self.meta(name) | fields
        write_atomic(self.versions_dir / name / "meta.json", json.dumps(meta, indent=1).encode())

    def best(self) -> str | None:
        """The version with the highest measured quality (see ``meta['quality']``), if any was measured."""
        rated = [(self.meta(n).get("quality"), n) for n in self.names()]
        rated = [(q, n) for q, n in rated if isinstance(q, (int, float))]
        return max(rated)[1] if rated else None

    def prune(self, keep: int, protect=()) -> None:
        names = self.names()
        protected = set(names[-keep:]) | {self.active(), self.best()} | set(protect)
        for name in names:
            if name not in protected:
                shutil.rmtree(self.versions_dir / name, ignore_errors=True)
        for stale in self.versions_dir.glob(".tmp-*"):  # left by a writer killed mid-publish
            if time.time() - stale.stat().st_mtime > 3600:
                shutil.rmtree(stale, ignore_errors=True)
