"""Model versions in an S3-compatible object store (``MODEL_STORE=s3://bucket/prefix``), for many machines.

The same layout as on disk, as objects under ``<prefix>/<project>/``::

    versions/<name>/model.pt     written first
    versions/<name>/meta.json    written second: the commit point (a version without it does not exist)
    ACTIVE                       the served version's name; replaced with one PUT (atomic in S3)

A single PUT (or a completed multipart upload) is atomic, so a reader sees an object whole or not at all.
A version counts only when both its objects exist, so a publisher killed after model.pt leaves nothing
visible (``names()`` skips it, ``set_active`` and ``load`` refuse it, ``prune`` removes it after an hour);
``prune`` deletes meta.json before model.pt for the same reason. Web processes notice a new version by
``marker()``: one HEAD of ACTIVE, whose ETag is the MD5 of its content. Downloaded model.pt files are
cached under ``MODEL_DIR/.cache/versions/<project>/`` by name and ETag (versions never change).

Local parts that are not versions (dataset.json, checkpoints, exports, the image cache, the embedded Redis)
stay under ``MODEL_DIR/<project>/`` (``root``). Credentials come from boto3's usual sources (the
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` variables, a profile, an instance role) and are never logged.
Two publishers of one project at a time are excluded by the project's training lock, not by the store.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
import threading
import time
from pathlib import Path

import torch

from backend.errors import BadRequest
from backend.model_store.versions import _NAME, VersionStore, slug

log = logging.getLogger(__name__)

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_clients: dict = {}
_clients_lock = threading.Lock()
_markers: dict[tuple, str] = {}  # (bucket, key) -> the last ACTIVE marker seen: served while S3 is unreachable
_warned = {"at": 0.0}


class ObjectStoreError(OSError):
    """S3 failed (unreachable, denied, ...): an OSError, so callers that tolerate a disk hiccup tolerate it too."""


def parse_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> (bucket, "some/prefix")."""
    if not url.startswith("s3://"):
        raise ValueError(f"MODEL_STORE must be empty or s3://bucket[/prefix], got {url!r}")
    bucket, _, prefix = url[len("s3://"):].partition("/")
    if not _BUCKET.match(bucket):
        raise ValueError(f"MODEL_STORE: {bucket!r} is not a valid bucket name")
    return bucket, prefix.strip("/")


def client(endpoint_url: str = ""):
    """One boto3 S3 client per process and endpoint (clients are thread-safe; a forked child makes its own)."""
    key = (os.getpid(), endpoint_url)
    with _clients_lock:
        if key not in _clients:
            import boto3
            from botocore.config import Config

            config = Config(connect_timeout=5, read_timeout=60, retries={"max_attempts": 4, "mode": "standard"},
                            s3={"addressing_style": "path"} if endpoint_url else None)
            _clients[key] = boto3.session.Session().client("s3", endpoint_url=endpoint_url or None, config=config)
        return _clients[key]


def _missing(exc) -> bool:
    code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
    return code in ("404", "NoSuchKey", "NotFound")


class _S3:
    """The few S3 calls the store makes; botocore errors become OSErrors (FileNotFoundError when missing)."""

    def __init__(self, bucket: str, endpoint_url: str):
        self.bucket, self.endpoint_url = bucket, endpoint_url

    @contextlib.contextmanager
    def _errors(self, key: str, what: str):
        """boto errors as OSErrors: FileNotFoundError for a missing object, ObjectStoreError otherwise."""
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except ClientError as exc:
            if _missing(exc):
                raise FileNotFoundError(f"s3://{self.bucket}/{key} does not exist") from None
            raise ObjectStoreError(f"s3://{self.bucket}/{key}: {what} failed: {exc}") from None
        except (BotoCoreError, S3UploadFailedError) as exc:
            raise ObjectStoreError(f"s3://{self.bucket}/{key}: {what} failed: {exc}") from None

    def _call(self, method: str, key: str = "", **kw):
        with self._errors(key, method):
            return getattr(client(self.endpoint_url), method)(Bucket=self.bucket, **({"Key": key} if key else {}), **kw)

    def get(self, key: str) -> bytes:
        return self._call("get_object", key)["Body"].read()

    def put(self, key: str, data: bytes) -> str:
        return self._call("put_object", key, Body=data)["ETag"]

    def head(self, key: str) -> dict:
        return self._call("head_object", key)

    def exists(self, key: str) -> bool:
        try:
            self.head(key)
            return True
        except FileNotFoundError:
            return False

    def delete(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):
            chunk = keys[start : start + 1000]
            if chunk:
                self._call("delete_objects", Delete={"Objects": [{"Key": k} for k in chunk], "Quiet": True})

    def upload(self, key: str, path: Path) -> None:
        """A file of any size (multipart above 8 MB: the object appears whole when the upload completes)."""
        with self._errors(key, "upload"):
            client(self.endpoint_url).upload_file(str(path), self.bucket, key)

    def download(self, key: str, path: Path) -> None:
        with self._errors(key, "download"):
            client(self.endpoint_url).download_file(self.bucket, key, str(path))

    def listing(self, prefix: str, delimiter: str = "") -> tuple[list[dict], list[str]]:
        """(objects, common prefixes) under ``prefix``, all pages."""
        objects, prefixes, token = [], [], None
        while True:
            kw = {"Prefix": prefix, **({"Delimiter": delimiter} if delimiter else {}),
                  **({"ContinuationToken": token} if token else {})}
            page = self._call("list_objects_v2", **kw)
            objects += page.get("Contents", [])
            prefixes += [p["Prefix"] for p in page.get("CommonPrefixes", [])]
            if not page.get("IsTruncated"):
                return objects, prefixes
            token = page["NextContinuationToken"]


def list_projects(url: str, endpoint_url: str = "") -> list[str]:
    """Projects that have anything in the store under the prefix, sorted."""
    bucket, prefix = parse_url(url)
    base = f"{prefix}/" if prefix else ""
    _, prefixes = _S3(bucket, endpoint_url).listing(base, "/")
    return sorted(p[len(base):].strip("/") for p in prefixes if p[len(base):].strip("/"))


class ObjectVersionStore(VersionStore):
    """VersionStore's interface on an S3 bucket (see the module doc)."""

    def __init__(self, url: str, model_dir: Path, project: str, endpoint_url: str = ""):
        bucket, prefix = parse_url(url)
        self.s3 = _S3(bucket, endpoint_url)
        self.project = str(project)
        self.root = Path(model_dir) / self.project  # local parts: checkpoints, exports, dataset.json
        self.cache_dir = Path(model_dir) / ".cache" / "versions" / self.project
        self.base = f"{prefix}/{self.project}/" if prefix else f"{self.project}/"
        self.active_key = self.base + "ACTIVE"

    def _key(self, name: str, file: str) -> str:
        return f"{self.base}versions/{name}/{file}"

    def _versions(self) -> dict[str, dict[str, float]]:
        """Every version name with objects: {name: {file: last modified (epoch s)}}, complete or not."""
        objects, _ = self.s3.listing(self.base + "versions/")
        found: dict[str, dict[str, float]] = {}
        for item in objects:
            name, _, file = item["Key"][len(self.base + "versions/"):].partition("/")
            if _NAME.match(name) and file:
                found.setdefault(name, {})[file] = item["LastModified"].timestamp()
        return found

    # reading -------------------------------------------------------------
    def names(self) -> list[str]:
        """Complete versions (model.pt and meta.json both there), oldest first."""
        found = [n for n, files in self._versions().items() if {"model.pt", "meta.json"} <= files.keys()]
        return sorted(found, key=lambda name: int(_NAME.match(name)["n"]))

    def _complete(self, name: str) -> bool:
        return bool(_NAME.match(name)) and self.s3.exists(self._key(name, "meta.json")) and self.s3.exists(self._key(name, "model.pt"))

    def meta(self, name: str) -> dict:
        return json.loads(self.s3.get(self._key(name, "meta.json")))

    def problem(self, name: str) -> str | None:
        return None  # no cheap look at remote files: a version that fails to load is passed over by load_active()

    def active(self) -> str | None:
        try:
            name = self.s3.get(self.active_key).decode().strip()
        except FileNotFoundError:
            return None
        return name if self._complete(name) else None

    def marker(self) -> str | int:
        """The ETag of ACTIVE (one HEAD); 0 when there is none. While S3 is unreachable, the last one seen (a web
        process keeps serving what it has) and a warning once a minute."""
        where = (self.s3.bucket, self.active_key)
        try:
            value = self.s3.head(self.active_key)["ETag"]
        except FileNotFoundError:
            value = 0
        except OSError as exc:
            if where not in _markers:
                raise
            if time.monotonic() - _warned["at"] > 60:
                _warned["at"] = time.monotonic()
                log.warning("object store unreachable, serving the versions loaded: %s", exc)
            return _markers[where]
        _markers[where] = value
        return value

    def load(self, name: str) -> tuple[dict, dict]:
        """The version's state dict and meta; FileNotFoundError for a version that is not complete."""
        meta = self.meta(name)  # the commit point first: no meta, no version
        etag = self.s3.head(self._key(name, "model.pt"))["ETag"].strip('"')
        path = self.cache_dir / f"{name}.{re.sub(r'[^A-Za-z0-9-]', '', etag)}.pt"
        if not path.is_file():
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.cache_dir, prefix=".tmp-")
            os.close(fd)
            try:
                self.s3.download(self._key(name, "model.pt"), Path(tmp))
                os.replace(tmp, path)
            finally:
                Path(tmp).unlink(missing_ok=True)
            self._clean_cache(keep=set(self.names()))
        state = torch.load(path, map_location="cpu", weights_only=True)
        return state, meta

    def _clean_cache(self, keep: set[str]) -> None:
        for old in self.cache_dir.glob("*.pt") if self.cache_dir.is_dir() else ():
            if old.name.split(".", 1)[0] not in keep:
                old.unlink(missing_ok=True)

    # writing -------------------------------------------------------------
    def next_name(self, prefix: str) -> str:
        numbers = [int(_NAME.match(n)["n"]) for n in self._versions()]  # incomplete ones too: never reused
        return f"{slug(prefix)}-v{max(numbers, default=0) + 1}"

    def publish(self, state: dict, meta: dict, prefix: str, keep: int = 5, activate: bool = True,
                protect=()) -> str:
        """Upload model.pt, then meta.json (the commit point), then replace ACTIVE (unless not ``activate``),
        then prune. Returns the new version's name."""
        name = self.next_name(prefix)
        meta = dict(meta, name=name, published_at=time.time())
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.cache_dir, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as fh:
                torch.save(state, fh)
            self.s3.upload(self._key(name, "model.pt"), Path(tmp))
            self.s3.put(self._key(name, "meta.json"), json.dumps(meta, indent=1).encode())
            etag = self.s3.head(self._key(name, "model.pt"))["ETag"].strip('"')  # keep it: this machine loads it next
            os.replace(tmp, self.cache_dir / f"{name}.{re.sub(r'[^A-Za-z0-9-]', '', etag)}.pt")
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            try:
                self.s3.delete([self._key(name, "meta.json"), self._key(name, "model.pt")])
            except OSError:
                pass  # prune removes the leftover later
            raise
        if activate:
            self.set_active(name)
        self.prune(keep, protect)
        return name

    def set_active(self, name: str) -> None:
        if not self._complete(name):
            known = ", ".join(self.names()) or "none"
            raise BadRequest(f"no version {name!r} in project {self.project} (versions: {known})")
        self.s3.put(self.active_key, name.encode())

    def update_meta(self, name: str, **fields) -> None:
        meta = self.meta(name) | fields
        self.s3.put(self._key(name, "meta.json"), json.dumps(meta, indent=1).encode())

    def prune(self, keep: int, protect=()) -> None:
        found = self._versions()
        names = self.names()
        protected = set(names[-keep:]) | {self.active(), self.best()} | set(protect)
        doomed = [n for n in names if n not in protected]
        stale = [n for n, files in found.items() if n not in names and time.time() - max(files.values()) > 3600]
        # meta.json first: a version being deleted stops existing before its weights go
        self.s3.delete([self._key(n, "meta.json") for n in doomed + stale])
        self.s3.delete([self._key(n, f) for n in doomed + stale for f in found[n] if f != "meta.json"])
        if doomed or stale:
            self._clean_cache(keep=set(names) - set(doomed))
