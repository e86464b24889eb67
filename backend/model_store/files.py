"""Weight-file integrity: sha256 of files on disk. Depends on nothing else in ``model_store``."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from backend.errors import WeightsError


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: Path, expected: str | None) -> None:
    if not expected:
        return
    actual = sha256_file(path)
    if actual != expected.lower():
        raise WeightsError(f"{path} has sha256 {actual}, expected {expected}: the file is corrupt or not the one named")


def verify_name_prefix(path: Path, name: str) -> None:
    """torchvision names weight files ``<name>-<first 8 hex of sha256>.pth``: check what the name promises."""
    m = re.search(r"-([0-9a-f]{8,})\.pth?$", name)
    if m is None:
        return
    actual = sha256_file(path)
    if not actual.startswith(m.group(1)):
        raise WeightsError(f"{path} has sha256 {actual}, which does not start with the {m.group(1)} its name promises: "
                           "the file is corrupt or not the one named")
