"""Training examples from Label Studio annotations, and the in-memory cache a session keeps of them."""

from __future__ import annotations

import logging
import numpy as np
import torch

from backend.errors import LivetrainError
from backend.labelstudio.convert import image_to_tensor, region_mask, shrink
from backend.labelstudio.annotations import LabeledImage, box_to_pixels
from backend.labelstudio.images import ImageFetcher
from backend.training.transforms import drop_degenerate

log = logging.getLogger(__name__)


def load_example(record: LabeledImage, fetcher: ImageFetcher, classes: tuple[str, ...], task: str = "boxes",
                 limit: tuple[int, int] | None = None) -> tuple[torch.Tensor, dict]:
    """Image tensor and torchvision target (pixel boxes, 1-based labels, and for ``task="masks"`` uint8
    instance masks with the boxes derived from them), at most ``limit`` in size (``convert.working_scale``).
    An image with no region is a negative example."""
    image, _ = shrink(fetcher.fetch(record.image_url), limit)
    width, height = image.size
    labels = [classes.index(label) + 1 for label in record.labels]
    if task == "masks":
        target = mask_target(record, labels, width, height)
    else:
        boxes = [box_to_pixels(box, width, height) for box in record.boxes]
        target = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                  "labels": torch.tensor(labels, dtype=torch.int64)}
    return image_to_tensor(image), drop_degenerate(target)


def class_objects(records: dict, trained: dict, classes: tuple[str, ...]) -> dict[str, int]:
    """Labeled objects per class among the trained ``records`` (a version's meta; UNCERTAINTY=class_weighted
    weighs doubt about a rare class more)."""
    counts = dict.fromkeys(classes, 0)
    for record in records.values():
        if str(record.task_id) in trained:
            for label in record.labels:
                if label in counts:
                    counts[label] += 1
    return counts


def mask_target(record: LabeledImage, labels: list[int], width: int, height: int) -> dict:
    """Masks rasterised at the working size; each box is its mask's tight box (what Mask R-CNN learns)."""
    from backend.labelstudio.masks import mask_box

    if len(record.masks) != len(record.boxes):
        # a record synced for a box control: teaching a mask model that its objects are background is worse
        raise LivetrainError(f"task {record.task_id} has {len(record.boxes)} region(s) but {len(record.masks)} "
                             "mask(s): it was synced for another control; the next full sync fixes it")
    masks, boxes, kept = [], [], []
    for shape, label in zip(record.masks, labels):
        try:
            mask = region_mask(shape, width, height)
        except ValueError as exc:
            log.info("task %s: a region left out of training: %s", record.task_id, exc)
            continue
        box = mask_box(mask)
        if box is None:  # a sliver that vanished at the working size
            continue
        masks.append(mask)
        boxes.append(box)
        kept.append(label)
    stacked = torch.from_numpy(np.stack(masks).astype(np.uint8)) if masks else torch.zeros((0, height, width), dtype=torch.uint8)
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(kept, dtype=torch.int64), "masks": stacked}


class ExampleCache:
    """Decoded, shrunk training examples kept in memory for a session: each image is fetched and decoded
    once, not at every draw. Images are kept as uint8 (4x smaller than float); the key holds the annotation's
    ``updated_at`` and the classes, so a correction or a new label is loaded afresh."""

    def __init__(self, fetcher: ImageFetcher, task: str, limit: tuple[int, int] | None, max_images: int = 2000):
        self.fetcher, self.task, self.limit, self.max_images = fetcher, task, limit, max_images
        self._examples: dict[tuple, tuple[torch.Tensor, dict]] = {}

    def load(self, record: LabeledImage, classes: tuple[str, ...]) -> tuple[torch.Tensor, dict]:
        key = (record.task_id, record.updated_at, classes)
        cached = self._examples.get(key)
        if cached is None:
            image, target = load_example(record, self.fetcher, classes, self.task, self.limit)
            cached = (image.mul(255.0).round_().to(torch.uint8), target)
            if len(self._examples) >= self.max_images:
                self._examples.pop(next(iter(self._examples)))  # oldest first
            self._examples[key] = cached
        image, target = cached
        return image.float().div_(255.0), target

    def forget(self, task_id: int) -> None:
        for key in [k for k in self._examples if k[0] == task_id]:
            del self._examples[key]
