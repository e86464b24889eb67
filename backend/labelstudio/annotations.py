"""Turn a Label Studio task (with its annotations) into one training example.

A task can carry several annotations (several annotators, updates, skips). We train on one per task:
the newest usable one, preferring ground truth. Boxes stay in Label Studio's percent units
(x, y, width, height of the image, top-left origin); ``box_to_pixels`` converts them once the image
size is known.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from datetime import datetime, timezone

log = logging.getLogger(__name__)

Box = tuple[float, float, float, float]

_EPOCH = datetime.min.replace(tzinfo=timezone.utc)


@dataclass(frozen=True)
class LabeledImage:
    task_id: int
    image_url: str  # the task's data[control.value_key]
    annotation_id: int
    updated_at: str  # the chosen annotation's updated_at (ISO string, as Label Studio sent it)
    boxes: tuple[Box, ...]  # percent units: (x, y, width, height); rotation ignored
    labels: tuple[str, ...]  # the Label Studio label of each box

    @property
    def is_negative(self) -> bool:
        """An annotation with no regions: "nothing to find here" is a valid training example."""
        return not self.boxes

    def to_json(self) -> dict:
        return {
            "task_id": self.task_id,
            "image_url": self.image_url,
            "annotation_id": self.annotation_id,
            "updated_at": self.updated_at,
            "boxes": [list(box) for box in self.boxes],
            "labels": list(self.labels),
        }

    @classmethod
    def from_json(cls, d: dict) -> "LabeledImage":
        boxes = tuple(tuple(float(v) for v in box) for box in d.get("boxes", ()))
        labels = tuple(str(label) for label in d.get("labels", ()))
        if len(boxes) != len(labels) or any(len(box) != 4 for box in boxes):
            raise ValueError("a LabeledImage needs one label per box and 4 numbers per box")
        return cls(
            task_id=int(d["task_id"]),
            image_url=str(d["image_url"]),
            annotation_id=int(d["annotation_id"]),
            updated_at=str(d.get("updated_at") or ""),
            boxes=boxes,  # type: ignore[arg-type]
            labels=labels,
        )


def _parse_time(value) -> datetime:
    if not isinstance(value, str) or not value:
        return _EPOCH
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return _EPOCH
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def _annotation_key(annotation: dict) -> tuple[datetime, int]:
    stamp = annotation.get("updated_at") or annotation.get("created_at")
    ident = annotation.get("id")
    return _parse_time(stamp), ident if isinstance(ident, int) else -1


def choose_annotation(annotations) -> dict | None:
    """The newest (updated_at, then id) annotation that is not cancelled/skipped; ground truth first."""
    usable = [a for a in annotations or () if isinstance(a, dict) and not a.get("was_cancelled")]
    ground_truth = [a for a in usable if a.get("ground_truth")]
    pool = ground_truth or usable
    return max(pool, key=_annotation_key) if pool else None


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _region_box(value: dict) -> Box | None:
    """(x, y, w, h) in percent, clipped to the image; None for bad numbers or zero area."""
    x, y, w, h = (_number(value.get(k)) for k in ("x", "y", "width", "height"))
    if x is None or y is None or w is None or h is None:
        return None
    x1, y1 = max(0.0, min(100.0, x)), max(0.0, min(100.0, y))
    x2, y2 = max(0.0, min(100.0, x + w)), max(0.0, min(100.0, y + h))
    if x2 <= x1 or y2 <= y1:
        return None
    return (x1, y1, x2 - x1, y2 - y1)


def labeled_image(task: dict, control) -> LabeledImage | None:
    """The training example for ``task`` under ``control`` (a RectangleLabels ControlTag), or None
    when the task has no usable annotation (none, or all cancelled) or no image URL."""
    task_id = task.get("id")
    data = task.get("data") if isinstance(task.get("data"), dict) else {}
    image_url = data.get(control.value_key)
    if not isinstance(image_url, str) or not image_url.strip() or not isinstance(task_id, int):
        if task.get("annotations"):
            log.info("task %s has no image URL in data[%r]; skipped", task_id, control.value_key)
        return None
    annotation = choose_annotation(task.get("annotations"))
    if annotation is None or not isinstance(annotation.get("id"), int):
        return None

    boxes: list[Box] = []
    labels: list[str] = []
    for region in annotation.get("result") or ():
        if not isinstance(region, dict) or region.get("from_name") != control.from_name:
            continue
        if region.get("type") != "rectanglelabels":
            continue
        value = region.get("value") if isinstance(region.get("value"), dict) else {}
        names = value.get("rectanglelabels") or value.get("labels") or []
        known = [name for name in names if name in control.labels] if isinstance(names, list) else []
        if not known:
            log.info("task %s annotation %s: region label %s is not in the label config %s; dropped",
                     task_id, annotation["id"], names, list(control.labels))
            continue
        box = _region_box(value)
        if box is None:
            log.info("task %s annotation %s: region %s has zero area or invalid coordinates; dropped",
                     task_id, annotation["id"], region.get("id"))
            continue
        boxes.append(box)
        labels.append(known[0])
    return LabeledImage(
        task_id=task_id,
        image_url=image_url.strip(),
        annotation_id=annotation["id"],
        updated_at=str(annotation.get("updated_at") or annotation.get("created_at") or ""),
        boxes=tuple(boxes),
        labels=tuple(labels),
    )


def box_to_pixels(box: Box, width: float, height: float) -> tuple[float, float, float, float]:
    """Percent (x, y, w, h) -> pixel (x1, y1, x2, y2), clipped to a ``width`` x ``height`` image."""
    x, y, w, h = box
    x1 = min(max(x * width / 100.0, 0.0), width)
    y1 = min(max(y * height / 100.0, 0.0), height)
    x2 = min(max((x + w) * width / 100.0, 0.0), width)
    y2 = min(max((y + h) * height / 100.0, 0.0), height)
    return (x1, y1, x2, y2)
