"""The detector's forward pass for serving and scoring, with Mask R-CNN's masks kept at the RoI head's
resolution. It lives with the models it runs, so that training (scoring a version on new images) and
inference (pre-labels) share it without depending on each other.

torchvision's ``GeneralizedRCNN.forward`` pastes every detection's 28x28 mask into a float tensor of the
full image size (``transform.postprocess``): 100 candidates on a 12-megapixel photo are 4.8 GB. Here the
boxes are scaled back to the image as torchvision does, but masks stay 28x28 probabilities; ``paste_in_box``
pastes one instance into its own box, only for the regions actually returned.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.roi_heads import expand_boxes
from torchvision.models.detection.transform import resize_boxes

MASK_THRESHOLD = 0.5  # a pixel belongs to the instance when its mask probability reaches this (torchvision's)


def serving_limit(model: nn.Module) -> tuple[int, int] | None:
    """The (shorter, longer) image side ``model`` works at in eval mode; None for a model without torchvision's
    transform. Images are shrunk to it before the forward (``labelstudio.convert.shrink``)."""
    transform = getattr(model, "transform", None)
    return (transform.min_size[-1], transform.max_size) if transform is not None else None


def forward(model: nn.Module, images: list[torch.Tensor]) -> list[dict]:
    """Detections of ``model`` (eval mode) on ``images`` (CxHxW in [0, 1]): ``boxes`` in image pixels,
    ``labels``, ``scores`` and, for a Mask R-CNN, ``masks`` as N x 1 x M x M probabilities in box frames."""
    if not all(hasattr(model, part) for part in ("transform", "backbone", "rpn", "roi_heads")):
        return model(images)  # not a torchvision R-CNN: its own forward
    original_sizes = [tuple(image.shape[-2:]) for image in images]
    image_list, _ = model.transform(images)
    features = model.backbone(image_list.tensors)
    proposals, _ = model.rpn(image_list, features)
    detections, _ = model.roi_heads(features, proposals, image_list.image_sizes)
    for det, size, original in zip(detections, image_list.image_sizes, original_sizes):
        det["boxes"] = resize_boxes(det["boxes"], size, original)
    return detections


def paste_in_box(mask: torch.Tensor, box, width: int, height: int) -> tuple[np.ndarray, tuple[int, int]]:
    """One M x M mask probability map (``1 x M x M`` or ``M x M``) pasted into its pixel ``box`` like
    torchvision's ``paste_mask_in_image`` (1-pixel padding, bilinear resize), thresholded, and clipped to the
    image. Returns the bool crop and its top-left ``(x0, y0)`` in the image: never a full-image array."""
    mask = mask.reshape(mask.shape[-2:]).float().cpu()
    size = mask.shape[-1]
    padded = F.pad(mask, (1, 1, 1, 1))
    scale = (size + 2) / size
    x1, y1, x2, y2 = (int(v) for v in expand_boxes(torch.as_tensor(box, dtype=torch.float32).reshape(1, 4), scale)[0].to(torch.int64))
    w, h = max(x2 - x1 + 1, 1), max(y2 - y1 + 1, 1)
    resized = F.interpolate(padded[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    cx1, cy1 = max(x1, 0), max(y1, 0)
    cx2, cy2 = min(x2 + 1, width), min(y2 + 1, height)
    if cx2 <= cx1 or cy2 <= cy1:
        return np.zeros((0, 0), dtype=bool), (0, 0)
    crop = resized[cy1 - y1 : cy2 - y1, cx1 - x1 : cx2 - x1] >= MASK_THRESHOLD
    return crop.numpy(), (cx1, cy1)


def full_mask(crop: np.ndarray, offset: tuple[int, int], width: int, height: int) -> np.ndarray:
    """A crop from ``paste_in_box`` placed in an empty ``height`` x ``width`` bool mask."""
    out = np.zeros((height, width), dtype=bool)
    x0, y0 = offset
    out[y0 : y0 + crop.shape[0], x0 : x0 + crop.shape[1]] = crop
    return out
