"""Conversion between Label Studio results (percent coordinates) and pixel tensors."""

from __future__ import annotations

import uuid

import numpy as np
import torch

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


def image_to_tensor(image) -> torch.Tensor:
    """RGB PIL image -> float tensor CxHxW in [0, 1] (what torchvision detectors take)."""
    array = np.array(image, dtype=np.uint8)  # a writable copy: torch refuses to share read-only memory
    return torch.from_numpy(array).permute(2, 0, 1).float().div_(255.0)
