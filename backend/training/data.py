"""Training examples from Label Studio annotations, and the replay sampler of a round."""

from __future__ import annotations

import logging
import random
from typing import Iterator

import torch

from backend.errors import LivetrainError
from backend.labelstudio.convert import image_to_tensor
from backend.labelstudio.annotations import LabeledImage, box_to_pixels
from backend.labelstudio.images import ImageFetcher
from backend.training.transforms import augment, drop_degenerate

log = logging.getLogger(__name__)


def load_example(record: LabeledImage, fetcher: ImageFetcher, classes: tuple[str, ...]) -> tuple[torch.Tensor, dict]:
    """Image tensor and torchvision target (pixel boxes, 1-based labels); an empty image is a negative."""
    image = fetcher.fetch(record.image_url)
    width, height = image.size
    boxes = [box_to_pixels(box, width, height) for box in record.boxes]
    labels = [classes.index(label) + 1 for label in record.labels]
    target = {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
    }
    return image_to_tensor(image), drop_degenerate(target)


def replay_batches(records: list[LabeledImage], new_ids: set[int], fetcher: ImageFetcher, classes: tuple[str, ...],
                   batch_size: int, new_fraction: float, seed: int = 0) -> Iterator[tuple[list, list]]:
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
                image, target = load_example(record, fetcher, classes)
            except LivetrainError as exc:
                log.warning("task %s left out of training: %s", record.task_id, exc.message)
                broken.add(record.task_id)
                continue
            image, target = augment(image, target)
            images.append(image)
            targets.append(target)
        yield images, targets
