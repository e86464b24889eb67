"""Detector architectures: build a torchvision detector with a box predictor sized to a project.

Models are always constructed with ``weights=None, weights_backbone=None`` (so torchvision never tries
to download anything); starting weights are loaded afterwards by ``backend.model_store.weights``.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torchvision.models import detection
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.ops.misc import FrozenBatchNorm2d

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
}


def coco_weights_enum(arch: str):
    """torchvision's COCO weights entry for ``arch`` (its ``url`` and ``meta['categories']``)."""
    return _TORCHVISION[arch][1]


def coco_categories(arch: str) -> list[str]:
    return list(coco_weights_enum(arch).meta["categories"])


def build_detector(arch: str, num_classes: int, **kwargs) -> nn.Module:
    """An untrained detector; ``num_classes`` includes background. ``kwargs`` go to FasterRCNN."""
    if arch not in _TORCHVISION:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(_TORCHVISION)}")
    constructor, _ = _TORCHVISION[arch]
    return constructor(weights=None, weights_backbone=None, num_classes=num_classes, **kwargs)


def replace_box_predictor(model: nn.Module, num_classes: int) -> None:
    """Give ``model`` a fresh box predictor for ``num_classes`` (incl. background)."""
    in_features = model.roi_heads.box_predictor.cls_score.in_features
    model.roi_heads.box_predictor = FastRCNNPredictor(in_features, num_classes)


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d under ``module`` by FrozenBatchNorm2d with the same statistics.

    Pretrained statistics are worth more than anything a batch of 2 few-shot images can estimate.
    """
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            with torch.no_grad():
                frozen.weight.copy_(child.weight)
                frozen.bias.copy_(child.bias)
                frozen.running_mean.copy_(child.running_mean)
                frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            freeze_batchnorm(child)
    return module
