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

    def load(self) -> torch.Tensor:
        array = np.array(Image.open(self.path).convert("RGB"), dtype=np.uint8)
        return torch.from_numpy(array).permute(2, 0, 1).float().div_(255.0)

    def target(self) -> dict:
        return {"boxes": torch.tensor(self.boxes, dtype=torch.float32).reshape(-1, 4),
                "labels": torch.tensor(self.labels, dtype=torch.int64)}


def load_coco(root: str | Path, annotations: str = "annotations.json") -> tuple[list[str], list[CocoImage]]:
    """Classes (in category-id order) and images (in id order) with their boxes."""
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
    return [c["name"] for c in categories], [images[k] for k in sorted(images)]
