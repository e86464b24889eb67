"""Layers shared by every architecture: frozen BatchNorm (the one Lite0's timm blocks need too).

This module depends on nothing else in ``model_store``; ``lite0`` and ``architectures`` import it.
"""

from __future__ import annotations

import torch
from timm.layers import BatchNormAct2d
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d


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


def quiet_mask_logits(predictor: nn.Module) -> nn.Module:
    """Start a new Mask R-CNN predictor's 1x1 logits layer near zero (std 0.001, as detectron2 does).

    torchvision's kaiming init gives logits of tens on Lite0's FPN features: the first mask losses are
    ~16 instead of ~0.7, and the first few live-training steps only undo that.
    """
    nn.init.normal_(predictor.mask_fcn_logits.weight, std=0.001)
    nn.init.zeros_(predictor.mask_fcn_logits.bias)
    return predictor
