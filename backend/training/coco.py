"""Read a COCO-format detection dataset (used by the benchmarks and the annotation simulator)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

import torch


@dataclass
class CocoImage:
    id: int
    path: Path
    width: int
    height: int
    split: str
    boxes: list = field(default_factory=list)  # [x1, y1, x2, y2] pixels
    labels: list = field(default_factory=list)  # 1-based index into the dataset's classes
    # Parallel to boxes: each object's polygon segmentation as a list of rings (one or more parts), each ring
    # [[x, y], ...] in pixels (at least 3 points). [] for an object without one (RLE / iscrowd / no segmentation).
    polygons: list = field(default_factory=list)

    @property
    def has_polygons(self) -> bool:
        return any(self.polygons)

    def load(self) -> torch.Tensor:
        array = np.array(Image.open(self.path).convert("RGB"), dtype=np.uint8)
        return torch.from_numpy(array).permute(2, 0, 1).float().div_(255.0)

    def target(self) -> dict:
        return {"boxes": torch.tensor(self.boxes, dtype=torch.float32).reshape(-1, 4),
                "labels": torch.tensor(self.labels, dtype=torch.int64)}

    def mask(self, index: int, width: int | None = None, height: int | None = None) -> np.ndarray:
        """Object ``index``'s polygon mask (all its rings together) as a bool array ``(height, width)``,
        by default at the image size; a smaller size rasterises the same polygons scaled down. A pixel is set
        when its centre is inside (``backend.labelstudio.masks.polygon_to_mask``). All False without polygons."""
        from backend.labelstudio.masks import polygon_to_mask

        width, height = width or self.width, height or self.height
        mask = np.zeros((height, width), dtype=bool)
        for ring in self.polygons[index] if index < len(self.polygons) else ():
            mask |= polygon_to_mask(ring_to_percent(ring, self.width, self.height), width, height)
        return mask


def ring_to_percent(ring, width: int, height: int) -> list[list[float]]:
    """A pixel ring ``[[x, y], ...]`` as Label Studio polygon points (percent of the image, clipped to 0..100)."""
    return [[min(100.0, max(0.0, x / width * 100.0)), min(100.0, max(0.0, y / height * 100.0))] for x, y in ring]


def _rings(segmentation) -> list[list[list[float]]]:
    """COCO polygon segmentation ``[[x1, y1, x2, y2, ...], ...]`` -> rings of >= 3 points; RLE (a dict) -> []."""
    if not isinstance(segmentation, list):
        return []
    rings = []
    for flat in segmentation:
        if isinstance(flat, list) and len(flat) >= 6:
            ring = [[float(flat[i]), float(flat[i + 1])] for i in range(0, len(flat) - 1, 2)]
            rings.append(ring)
    return rings


def load_coco(root: str | Path, annotations: str = "annotations.json") -> tuple[list[str], list[CocoImage]]:
    """Classes (in category-id order) and images (in id order) with their boxes and polygon segmentations."""
    root = Path(root)
    data = json.loads((root / annotations).read_text())
    categories = sorted(data["categories"], key=lambda c: c["id"])
    index = {c["id"]: i + 1 for i, c in enumerate(categories)}
    images = {
        im["id"]: CocoImage(im["id"], root / im["file_name"], im["width"], im["height"], im.get("split", ""))
        for im in data["images"]
    }
    for ann in data["annotations"]:
        x, y, w, h = ann["bbox"]
        if w <= 0 or h <= 0:
            continue
        image = images[ann["image_id"]]
        image.boxes.append([x, y, x + w, y + h])
        image.labels.append(index[ann["category_id"]])
        image.polygons.append([] if ann.get("iscrowd") else _rings(ann.get("segmentation")))
    return [c["name"] for c in categories], [images[k] for k in sorted(images)]
