"""Where a project's model versions live: MODEL_DIR on disk (a shared volume across machines), or an
S3-compatible object store when MODEL_STORE is set. Every caller opens its store here."""

from __future__ import annotations

from pathlib import Path

from backend.model_store.versions import VersionStore


def version_store(where, project: str) -> VersionStore:
    """The version store of ``project``. ``where``: the Settings (MODEL_STORE, S3_ENDPOINT_URL, MODEL_DIR), or a
    MODEL_DIR path (always on disk)."""
    if isinstance(where, (str, Path)):
        return VersionStore(Path(where), str(project))
    if getattr(where, "model_store", ""):
        from backend.model_store.object_store import ObjectVersionStore

        return ObjectVersionStore(where.model_store, where.model_dir, str(project), where.s3_endpoint_url)
    return VersionStore(where.model_dir, str(project))


def list_projects(where) -> list[str]:
    """Projects that have versions or an ACTIVE marker (``where`` as in ``version_store``), sorted."""
    if not isinstance(where, (str, Path)) and getattr(where, "model_store", ""):
        from backend.model_store.object_store import list_projects as in_bucket

        return in_bucket(where.model_store, where.s3_endpoint_url)
    model_dir = Path(where if isinstance(where, (str, Path)) else where.model_dir)
    if not model_dir.is_dir():
        return []
    return sorted(p.name for p in model_dir.iterdir() if (p / "versions").is_dir() or (p / "ACTIVE").is_file())
