"""Published model versions of one project, under ``MODEL_DIR/<project>/``.

    versions/<name>/model.pt     plain state dict (loaded with weights_only=True)
    versions/<name>/meta.json    parent, classes, images/annotations trained on, settings, losses, ...
    ACTIVE                       the name of the version /predict serves

A version is written into a temporary directory and renamed into place, and ACTIVE is replaced with
``os.replace``: readers (other processes, other machines sharing MODEL_DIR) see a whole version or none,
never a half-written one; a write that fails (a full disk) removes its temporary files and leaves the
versions as they were. Names are ``<prefix>-v<N>`` with N increasing, even across rollbacks.

Damage done from outside (a version directory deleted by hand, a truncated or overwritten ``model.pt``, a
broken ``meta.json``) is survived: ``active()`` passes over an ACTIVE version that is gone or visibly broken
to the newest whole version that was not held back, ``load_active()`` also over one that fails to load, and
``list()`` shows a broken version with its ``error`` instead of failing.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
import zipfile
from pathlib import Path

import torch

from backend.errors import BadRequest

log = logging.getLogger(__name__)

BASE_VERSION = "livetrain-base"  # the starting weights, before the first version is published
# the label stream's cold-start predictions (empty result, typical-first score, cluster) before the first version
TYPICAL_VERSION = "livetrain-typical"
# A plain file name: no "/" or leading dot, so a name from a request (rollback, export) cannot leave versions/.
_NAME = re.compile(r"^(?P<prefix>[A-Za-z0-9][A-Za-z0-9_.-]*)-v(?P<n>\d+)$")


def is_version_name(name) -> bool:
    """Whether ``name`` (e.g. from a request) is a version name: a plain file name, never a path."""
    return isinstance(name, str) and len(name) <= 120 and _NAME.fullmatch(name) is not None


def slug(text: str) -> str:
    """A version-name prefix from a project title: lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9]+", "-", (text or "").lower()).strip("-")[:40] or "livetrain"


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:  # e.g. the disk is full: the old file stays, no temporary file is left
        Path(tmp).unlink(missing_ok=True)
        raise


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
        """Each version's meta and whether it is active; a version whose files are broken is listed with its
        name and ``error`` (the reason it is not served)."""
        active = self.active()
        listed = []
        for name in self.names():
            problem = self.problem(name)
            try:
                meta = self.meta(name)
            except (OSError, ValueError):
                meta = {}
            listed.append(dict(meta, name=name, active=name == active, **({"error": problem} if problem else {})))
        return listed

    def problem(self, name: str) -> str | None:
        """Why version ``name`` cannot be served, from a cheap look at its files (a ``model.pt`` that is missing,
        truncated or not a torch file, a ``meta.json`` that does not parse); None when they look whole."""
        folder = self.versions_dir / name
        try:
            meta = json.loads((folder / "meta.json").read_text())
            if not isinstance(meta, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as exc:
            return f"meta.json unreadable ({type(exc).__name__}: {exc})"
        model = folder / "model.pt"
        if not model.is_file():
            return "model.pt missing"
        if not zipfile.is_zipfile(model):  # torch.save writes a zip: a cut or overwritten file has no central directory
            return "model.pt truncated or corrupted (not a readable torch file)"
        try:  # damage inside the file shows only when it is loaded: this process remembers that it failed
            return _unloadable.get((str(model), model.stat().st_mtime_ns))
        except OSError:
            return None

    def active(self) -> str | None:
        """The version served: the one ACTIVE names, or, when that one was deleted or its files are broken, the
        newest whole version that the guard did not hold back (None when ACTIVE is missing or none is whole)."""
        try:
            name = self.active_file.read_text().strip()
        except FileNotFoundError:
            return None
        if _NAME.match(name) and self.problem(name) is None:
            return name
        fallback = next(iter(self.fallbacks(exclude=name)), None)
        _warn_once((str(self.root), name, fallback), "project %s: active version %s is %s; serving %s instead",
                   self.root.name, name, self.problem(name) if _NAME.match(name) else "not a version name",
                   fallback or "the base model")
        return fallback

    def fallbacks(self, exclude: str | None = None) -> list[str]:
        """Whole versions that were not held back, newest first: what is served when the active one is broken."""
        found = []
        for name in reversed(self.names()):
            if name == exclude or self.problem(name) is not None:
                continue
            if not self.meta(name).get("held_back"):
                found.append(name)
        return found

    def load_active(self) -> tuple[str, dict, dict] | None:
        """(name, state dict, meta) of the active version; when it fails to load (damaged inside), of the
        newest older whole version instead, each failure logged. None when there is none."""
        active = self.active()
        if active is None:
            return None
        for name in [active, *(n for n in self.fallbacks(exclude=active) if n != active)]:
            try:
                state, meta = self.load(name)
                return name, state, meta
            except Exception as exc:  # truncated inside, garbage tensors, a file deleted under us
                model = self.versions_dir / name / "model.pt" if hasattr(self, "versions_dir") else None
                if model is not None and model.is_file():
                    _unloadable[(str(model), model.stat().st_mtime_ns)] = f"model.pt cannot be loaded ({type(exc).__name__}: {str(exc)[:200]})"
                log.error("project %s: version %s cannot be loaded (%s: %s); trying the previous one", self.root.name,
                          name, type(exc).__name__, exc)
        return None

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
        try:  # an active version deleted by hand: its number is not given to a new one (Label Studio knows it)
            named = _NAME.match(self.active_file.read_text().strip())
            numbers += [int(named["n"])] if named else []
        except OSError:
            pass
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
            # our own file object: closed whatever happens (a deleted file still open would keep its space on a
            # full disk), and synced before the rename, so that a version in place is a whole one
            with open(tmp / "model.pt", "wb") as fh:
                try:
                    torch.save(state, fh)
                except RuntimeError as exc:  # torch reports a failed write (ENOSPC, EIO) as a RuntimeError
                    raise OSError(f"could not write {name}/model.pt: {exc}") from None
                fh.flush()
                os.fsync(fh.fileno())
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            os.rename(tmp, self.versions_dir / name)  # atomic; fails if a concurrent publisher took the name
        except BaseException:  # e.g. the disk is full: nothing half-written stays, the versions are as they were
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if activate:
            self.set_active(name)
        self.prune(keep, protect)
        return name

    def set_active(self, name: str) -> None:
        if not is_version_name(name) or not (self.versions_dir / name / "model.pt").is_file():
            known = ", ".join(self.names()) or "none"
            raise BadRequest(f"no version {name!r} in project {self.root.name} (versions: {known})")
        write_atomic(self.active_file, name.encode())

    def update_meta(self, name: str, **fields) -> None:
        meta = self.meta(name) | fields
        write_atomic(self.versions_dir / name / "meta.json", json.dumps(meta, indent=1).encode())

    def best(self) -> str | None:
        """The version with the highest measured quality (see ``meta['quality']``), if any was measured."""
        rated = []
        for n in self.names():
            try:
                rated.append((self.meta(n).get("quality"), n))
            except (OSError, ValueError):  # a broken meta.json: not rated
                continue
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


_warned: set = set()
_unloadable: dict = {}  # (model.pt path, mtime) -> why it failed to load in this process (shown by list())


def _warn_once(key, message: str, *args) -> None:
    """Log a damaged store once per process and situation, not at every look at ACTIVE."""
    if key not in _warned:
        _warned.add(key)
        log.error(message, *args)
