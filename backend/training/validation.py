"""The held-out validation split of a live project (VALIDATION_FRACTION), and the COCO mAP of a model on it.

**Which tasks.** A labeled task is a validation task when ``sha1(f"{project}:{task_id}")`` (its first 8
bytes as a fraction of 2**64) is below VALIDATION_FRACTION. The choice depends on nothing else: it never
changes as tasks are added, deleted or corrected, and another process (the API, a test) computes the same.

**From the first annotation.** A validation task is held out from the moment it is labeled, also while
the project is small: a rule like "no split until N tasks" would move tasks the model already trained on
into the split later, and their mAP would flatter it. Validation tasks never reach the sampler, are never
in ``trained_annotations`` and do not count towards MIN_ANNOTATIONS: a project needs MIN_ANNOTATIONS
*training* images before its first version (so at least one training image remains; with a large fraction
the first versions simply wait for more labels). Turning the split on in a project that already trained
takes its tasks out of training from then on, but the weights have seen them: the first numbers flatter.

**When it is scored.** Once the split holds MIN_IMAGES images with at least one object, each published
version's box mAP and mAP@0.5 (and segm mAP for mask projects), overall and per class, are computed with
pycocotools (``backend.metrics.coco_map``) and stored in its meta under ``validation``; before that the
meta says only how many validation images there are. The model is scored in eval mode at its base size
(no training scale jitter) on images shrunk as /predict shrinks them; decoded images stay in memory
(``ExampleCache``), so a publish costs one forward per validation image.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging

import torch

from backend.errors import LivetrainError
from backend.labelstudio.annotations import LabeledImage
from backend.labelstudio.images import ImageFetcher
from backend.metrics.coco_map import Detections, GroundTruth, coco_map
from backend.model_store.detect import forward, full_mask, paste_in_box
from backend.training.data import ExampleCache

log = logging.getLogger(__name__)

MIN_IMAGES = 3  # validation images (with at least one object among them) before versions are scored on them


def in_validation(project: str, task_id: int, fraction: float) -> bool:
    """Whether ``task_id`` of ``project`` belongs to the validation split (stable: a hash of the two)."""
    if fraction <= 0.0:
        return False
    digest = hashlib.sha1(f"{project}:{int(task_id)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < fraction


def split_records(records: list[LabeledImage], project: str, fraction: float) -> tuple[list, list]:
    """(training records, validation records), each in the given order."""
    train, validation = [], []
    for record in records:
        (validation if in_validation(project, record.task_id, fraction) else train).append(record)
    return train, validation


@contextlib.contextmanager
def at_base_size(model: torch.nn.Module, base_size: int):
    """``model`` in eval mode at its base size for a while (a training model's transform jitters the scale)."""
    sizes, was_training = model.transform.min_size, model.training
    model.transform.min_size = (base_size,)
    model.eval()
    try:
        yield model
    finally:
        model.transform.min_size = sizes
        model.train(was_training)


def detections_of(output: dict, image_id: int, width: int, height: int, with_masks: bool) -> Detections:
    """One image's ``model_store.detect.forward`` output (Mask R-CNN masks as M x M probabilities in box
    frames, pasted here as /predict pastes them) as ``Detections``."""
    masks = None
    if with_masks:
        masks = []
        for mask, box in zip(output["masks"], output["boxes"]):
            crop, offset = paste_in_box(mask, box, width, height)
            masks.append(full_mask(crop, offset, width, height))
    return Detections(image_id, output["boxes"].tolist(), output["labels"].tolist(), output["scores"].tolist(), masks)


def ground_truth(image_id: int, image: torch.Tensor, target: dict, with_masks: bool) -> GroundTruth:
    height, width = image.shape[-2:]
    masks = [m.numpy().astype(bool) for m in target["masks"]] if with_masks else None
    return GroundTruth(image_id, width, height, target["boxes"].tolist(), target["labels"].tolist(), masks)


@torch.inference_mode()
def evaluate_model(model: torch.nn.Module, examples, class_names: tuple[str, ...], masks: bool,
                   device: torch.device | str = "cpu") -> dict:
    """``coco_map`` of ``model`` (in eval mode: see ``at_base_size``) on ``examples``: (image id, image CxHxW in
    [0, 1], target with pixel boxes, 1-based labels and for mask projects uint8 masks N x H x W)."""
    truth, found = [], []
    for image_id, image, target in examples:
        height, width = image.shape[-2:]
        truth.append(ground_truth(image_id, image, target, masks))
        found.append(detections_of(forward(model, [image.to(device)])[0], image_id, width, height, masks))
    return coco_map(truth, found, class_names, ("box", "mask") if masks else ("box",))


class ValidationSplit:
    """A session's validation records and their decoded images (at ``limit``, the serving size)."""

    def __init__(self, project: str, fraction: float, fetcher: ImageFetcher, task: str, limit: tuple[int, int]):
        self.project, self.fraction, self.task = project, fraction, task
        self.records: dict[int, LabeledImage] = {}
        self.cache = ExampleCache(fetcher, task, limit)

    def split(self, records: list[LabeledImage]) -> list[LabeledImage]:
        """Keep the validation records of ``records``; returns the training ones."""
        train, validation = split_records(records, self.project, self.fraction)
        current = {r.task_id: r for r in validation}
        for task_id, old in self.records.items():
            if current.get(task_id) != old:  # deleted or corrected: its decoded image goes
                self.cache.forget(task_id)
        self.records = current
        return train

    def digest(self, scored: set[int] | None = None) -> str:
        """Names the split's content (tasks and annotation times; only ``scored`` ones when given): equal
        digests, comparable numbers."""
        text = ";".join(f"{t}:{r.updated_at}" for t, r in sorted(self.records.items()) if scored is None or t in scored)
        return hashlib.sha1(text.encode()).hexdigest()[:16]

    def examples(self, classes: tuple[str, ...]) -> list[tuple[int, torch.Tensor, dict]]:
        out = []
        for task_id, record in sorted(self.records.items()):
            try:
                image, target = self.cache.load(record, classes)
            except (LivetrainError, ValueError) as exc:
                log.info("validation task %s left out: %s", task_id, getattr(exc, "message", exc))
                continue
            out.append((task_id, image, target))
        return out

    def evaluate(self, model: torch.nn.Module, classes: tuple[str, ...], base_size: int,
                 device: torch.device | str = "cpu") -> dict | None:
        """The ``validation`` meta of ``model`` (labels index ``classes``): None without a split; only the
        image count while it is smaller than MIN_IMAGES or holds no object."""
        if self.fraction <= 0.0:
            return None
        examples = self.examples(classes)
        objects = sum(len(target["labels"]) for _, _, target in examples)
        # the digest names the images actually scored (one that failed to load is not among them)
        info = {"images": len(examples), "objects": objects,
                "digest": self.digest({task_id for task_id, _, _ in examples})}
        if len(examples) < MIN_IMAGES or not objects:
            return dict(info, note=f"scored from {MIN_IMAGES} validation images with at least one object")
        with at_base_size(model, base_size):
            info.update(evaluate_model(model, examples, classes, self.task == "masks", device))
        return info


def headline(validation: dict | None, task: str) -> tuple[str, float] | None:
    """(metric name, value) the guard compares: segm mAP for mask projects, else box mAP; None unscored."""
    kind = "mask" if task == "masks" else "box"
    if not validation or kind not in validation:
        return None
    return f"{kind} map", float(validation[kind]["map"])
