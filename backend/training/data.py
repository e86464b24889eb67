"""Training examples from Label Studio annotations, and the replay sampler of a round."""

from __future__ import annotations

import logging
import random
from typing import Iterator

import numpy as np
import torch

from backend.errors import LivetrainError
from backend.labelstudio.convert import image_to_tensor, region_mask, shrink
from backend.labelstudio.annotations import LabeledImage, box_to_pixels
from backend.labelstudio.images import ImageFetcher
from backend.training.transforms import augment, drop_degenerate

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


def replay_batches(records: list[LabeledImage], new_ids: set[int], fetcher: ImageFetcher, classes: tuple[str, ...],
                   batch_size: int, new_fraction: float, seed: int = 0, task: str = "boxes",
                   limit: tuple[int, int] | None = None) -> Iterator[tuple[list, list]]:
    """Endless augmented batches. Each sample comes from the images added since the last version with
    probability ``new_fraction`` (so new corrections are learned quickly), otherwise from all images
    (replay, so earlier images and classes are not forgotten). Images that fail to load are skipped."""
    rng = random.Random(seed)
    new = [r for r in records if r.task_id in new_ids]
    broken: set[int] = set()
    while True:
        images, targets = [], []
        while len(images) < batch_size:
            usable = [r for r in records if r.task_id not in broken]
            if not usable:
                raise LivetrainError("no training image could be loaded (see the worker log for each reason)")
            fresh = [r for r in new if r.task_id not in broken]
            pool = fresh if fresh and rng.random() < new_fraction else usable
            record = rng.choice(pool)
            try:
                image, target = load_example(record, fetcher, classes, task, limit)
            except LivetrainError as exc:
                log.warning("task %s left out of training: %s", record.task_id, exc.message)
                broken.add(record.task_id)
                continue
            image, target = augment(image, target)
            images.append(image)
            targets.append(target)
        yield images, targets
