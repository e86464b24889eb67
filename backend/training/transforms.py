"""Training augmentation on (image CxHxW float tensor, target dict with pixel ``boxes``, ``labels``,
optional ``masks`` NxHxW).

Scale jitter is not done here: torchvision's detectors resize every image to ``min_size`` inside the
model, so jitter must change that size; ``scale_jitter`` below sets the model's multi-scale training sizes.
"""

from __future__ import annotations

import random

import torch


def hflip(image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
    width = image.shape[-1]
    target = dict(target)
    boxes = target["boxes"].clone()
    boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
    target["boxes"] = boxes
    if "masks" in target:
        target["masks"] = target["masks"].flip(-1)
    return image.flip(-1), target


def color_jitter(image: torch.Tensor, strength: float = 0.2) -> torch.Tensor:
    """Random brightness and contrast: cheap, and label-preserving for any detector."""
    brightness = 1.0 + random.uniform(-strength, strength)
    contrast = 1.0 + random.uniform(-strength, strength)
    mean = image.mean()
    return ((image - mean) * contrast + mean * brightness).clamp_(0.0, 1.0)


def augment(image: torch.Tensor, target: dict, flip_p: float = 0.5) -> tuple[torch.Tensor, dict]:
    if random.random() < flip_p:
        image, target = hflip(image, target)
    return color_jitter(image), target


def scale_jitter(model, base: int, factors=(0.8, 0.9, 1.0, 1.1, 1.2)) -> None:
    """Train at several input scales: GeneralizedRCNNTransform picks one of ``min_size`` per batch in training."""
    model.transform.min_size = tuple(int(round(base * f / 32) * 32) for f in factors)


def drop_degenerate(target: dict) -> dict:
    """Drop boxes with no area (torchvision's detectors refuse them)."""
    boxes = target["boxes"]
    keep = (boxes[:, 2] > boxes[:, 0] + 1e-3) & (boxes[:, 3] > boxes[:, 1] + 1e-3)
    return {k: (v[keep] if k in ("boxes", "labels", "masks") else v) for k, v in target.items()}
