"""Conversion between Label Studio results (percent coordinates, polygons, brush RLE) and pixel tensors/masks.

Boxes and masks share this module: a box project emits ``rectanglelabels`` regions, a mask project
``polygonlabels`` (one region per part of an instance) or ``brushlabels`` (one full-frame RLE per region).
"""

from __future__ import annotations

import uuid

import numpy as np
import torch
from PIL import Image

from backend.labelstudio.label_config import ControlTag


def region_id() -> str:
    return uuid.uuid4().hex[:10]


def box_to_region(box, label: str, score: float, width: int, height: int, control: ControlTag) -> dict | None:
    """One pixel box ``(x1, y1, x2, y2)`` as a Label Studio ``rectanglelabels`` region.

    Label Studio stores x/y/width/height as percentages of the original image size. The box is clipped
    to the image; a box with no area after clipping gives None.
    """
    x1, y1, x2, y2 = (float(v) for v in box)
    x1, x2 = max(0.0, min(x1, width)), max(0.0, min(x2, width))
    y1, y2 = max(0.0, min(y1, height)), max(0.0, min(y2, height))
    if x2 <= x1 or y2 <= y1:
        return None
    return {
        "id": region_id(),
        "from_name": control.from_name,
        "to_name": control.to_name,
        "type": "rectanglelabels",
        "original_width": int(width),
        "original_height": int(height),
        "image_rotation": 0,
        "value": {
            "x": x1 / width * 100.0,
            "y": y1 / height * 100.0,
            "width": (x2 - x1) / width * 100.0,
            "height": (y2 - y1) / height * 100.0,
            "rotation": 0,
            "rectanglelabels": [label],
        },
        "score": float(score),
    }


def working_scale(width: int, height: int, limit: tuple[int, int] | None) -> float:
    """The factor that brings an image down to ``limit`` = (shorter side, longer side), never up.

    The detector resizes every image to its ``min_size`` anyway (``max_size`` for the longer side); shrinking
    a large image to the largest size it will be used at first loses nothing and keeps the image tensor and,
    for masks, every instance mask small (a 4000x3000 photo with 30 objects would be 360 MB of masks).
    """
    if not limit:
        return 1.0
    short, long = limit
    return min(1.0, short / min(width, height), long / max(width, height))


def shrink(image: Image.Image, limit: tuple[int, int] | None) -> tuple[Image.Image, float]:
    """``image`` at ``working_scale`` (antialiased), and that scale: training and prediction both use it, so
    the model sees the same kind of pixels in both."""
    scale = working_scale(image.width, image.height, limit)
    if scale >= 1.0:
        return image, 1.0
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.BILINEAR), scale


def region_mask(shape: dict, width: int, height: int) -> np.ndarray:
    """A stored shape (``LabeledImage.masks`` item) as a bool mask at ``width`` x ``height``, which may be
    smaller than the image: polygons are rasterised directly at that size (memory stays bounded), brush RLE
    is decoded at the size it was painted at and then resized."""
    from backend.labelstudio.masks import polygon_to_mask, rle_to_mask

    if "points" in shape:
        return polygon_to_mask(shape["points"], width, height)
    if abs(shape["width"] / shape["height"] - width / height) > 0.02 * width / height:
        # e.g. painted on an EXIF-rotated view of the image: stretching it would put it in the wrong place
        raise ValueError(f"brush mask {shape['width']}x{shape['height']} does not have the image's aspect ratio "
                         f"({width}x{height})")
    mask = rle_to_mask(shape["rle"], shape["width"], shape["height"])
    if mask.shape != (height, width):
        resized = Image.fromarray(mask.astype(np.uint8) * 255).resize((width, height), Image.BILINEAR)
        mask = np.asarray(resized) >= 128
    return mask


def _mask_region(control: ControlTag, label: str, score: float | None, width: int, height: int, value: dict) -> dict:
    region = {"id": region_id(), "from_name": control.from_name, "to_name": control.to_name,
              "type": control.result_type, "original_width": int(width), "original_height": int(height),
              "image_rotation": 0, "value": {**value, control.result_type: [label]}}
    if score is not None:
        region["score"] = float(score)
    return region


def mask_to_regions(mask: np.ndarray, offset: tuple[int, int], label: str, score: float | None, width: int,
                    height: int, control: ControlTag, tolerance: float = 1.5, max_points: int = 200) -> list[dict]:
    """One instance (or one class, in semantic output) as Label Studio regions.

    ``mask`` is a bool crop of a ``width`` x ``height`` image whose top-left pixel sits at ``offset``.
    PolygonLabels: one closed polygon per part (Label Studio polygons are single rings: holes are
    filled, multi-part objects become several regions, each with its own id and the object's score).
    BrushLabels: one 0/255 RLE of the full image (Label Studio decodes it into a canvas of the image's
    natural size and draws the alpha channel).
    """
    from backend.labelstudio.masks import mask_to_polygons, mask_to_rle

    if control.result_type == "polygonlabels":
        polygons = mask_to_polygons(mask, width, height, offset=offset, tolerance=tolerance, max_points=max_points)
        return [_mask_region(control, label, score, width, height, {"points": points, "closed": True})
                for points in polygons]
    if not mask.any():
        return []
    full = np.zeros((height, width), dtype=np.uint8)
    x0, y0 = offset
    full[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]] = mask
    return [_mask_region(control, label, score, width, height, {"format": "rle", "rle": mask_to_rle(full)})]


def image_to_tensor(image) -> torch.Tensor:
    """RGB PIL image -> float tensor CxHxW in [0, 1] (what torchvision detectors take)."""
    array = np.array(image, dtype=np.uint8)  # a writable copy: torch refuses to share read-only memory
    return torch.from_numpy(array).permute(2, 0, 1).float().div_(255.0)
