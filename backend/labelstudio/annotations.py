"""Turn a Label Studio task (with its annotations) into one training example.

A task can carry several annotations (several annotators, updates, skips). We train on one per task:
the newest usable one, preferring ground truth. Boxes stay in Label Studio's percent units
(x, y, width, height of the image, top-left origin); ``box_to_pixels`` converts them once the image
size is known.

Mask projects (PolygonLabels / BrushLabels) keep each region's shape as Label Studio sent it, in ``masks``
(``{"points": [[x%, y%], ...]}`` or ``{"rle": [...], "width": W, "height": H}``), rasterised only when a
training step needs it and at the size it needs (see ``convert.region_mask``); ``boxes`` then hold each
shape's bounding box, also in percent. Every result is one instance: several polygons or brush regions
of one label in one annotation stay separate objects (Label Studio makes a separate region of each
detached brush stroke; paint one region per object).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from datetime import datetime, timezone

log = logging.getLogger(__name__)

Box = tuple[float, float, float, float]

_EPOCH = datetime.min.replace(tzinfo=timezone.utc)
# Label Studio result types that mark something *in* the image (SEGMENTATION.md, section 5)
SPATIAL_TYPES = {f"{kind}{suffix}" for kind in ("rectangle", "polygon", "brush", "ellipse", "keypoint", "bitmask", "vector")
                 for suffix in ("", "labels")}


@dataclass(frozen=True)
class LabeledImage:
    task_id: int
    image_url: str  # the task's data[control.value_key]
    annotation_id: int
    updated_at: str  # the chosen annotation's updated_at (ISO string, as Label Studio sent it)
    boxes: tuple[Box, ...]  # percent units: (x, y, width, height); rotation ignored
    labels: tuple[str, ...]  # the Label Studio label of each box
    masks: tuple[dict, ...] = ()  # mask projects: one shape per box (see the module doc); empty for boxes

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
            **({"masks": list(self.masks)} if self.masks else {}),
        }

    @classmethod
    def from_json(cls, d: dict) -> "LabeledImage":
        boxes = tuple(tuple(float(v) for v in box) for box in d.get("boxes", ()))
        labels = tuple(str(label) for label in d.get("labels", ()))
        masks = tuple(dict(m) for m in d.get("masks", ()))
        if len(boxes) != len(labels) or any(len(box) != 4 for box in boxes):
            raise ValueError("a LabeledImage needs one label per box and 4 numbers per box")
        if masks and len(masks) != len(boxes):
            raise ValueError("a LabeledImage of a mask project needs one shape per box")
        return cls(
            task_id=int(d["task_id"]),
            image_url=str(d["image_url"]),
            annotation_id=int(d["annotation_id"]),
            updated_at=str(d.get("updated_at") or ""),
            boxes=boxes,  # type: ignore[arg-type]
            labels=labels,
            masks=masks,
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
    if not isinstance(annotations, (list, tuple)):
        return None
    usable = [a for a in annotations if isinstance(a, dict) and not a.get("was_cancelled")]
    ground_truth = [a for a in usable if a.get("ground_truth")]
    pool = ground_truth or usable
    return max(pool, key=_annotation_key) if pool else None


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _region_box(value: dict) -> tuple[Box | None, str]:
    """(x, y, w, h) in percent, clipped to the image, and why it is unusable when the box is None."""
    numbers = {k: _number(value.get(k)) for k in ("x", "y", "width", "height")}
    bad = [f"{k}={value.get(k)!r}"[:40] for k, v in numbers.items() if v is None]
    if bad:
        return None, f"has coordinates that are not finite numbers ({', '.join(bad)})"
    x, y, w, h = numbers.values()
    if w <= 0 or h <= 0:
        return None, f"has zero or negative size (width={w}, height={h})"
    x1, y1 = max(0.0, min(100.0, x)), max(0.0, min(100.0, y))
    x2, y2 = max(0.0, min(100.0, x + w)), max(0.0, min(100.0, y + h))
    if x2 <= x1 or y2 <= y1:
        return None, f"lies outside the image (x={x}, y={y}, width={w}, height={h}, in percent)"
    return (x1, y1, x2 - x1, y2 - y1), ""


def labeled_image(task: dict, control) -> LabeledImage | None:
    """The training example for ``task`` under ``control`` (a supported ControlTag), or None
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
    masks: list[dict] = []
    result = annotation.get("result") if isinstance(annotation.get("result"), list) else []
    for region in result:
        if not isinstance(region, dict) or region.get("from_name") != control.from_name:
            continue
        if region.get("type") != control.result_type:
            continue
        value = region.get("value") if isinstance(region.get("value"), dict) else {}
        names = value.get(control.result_type) or value.get("labels") or []
        known = [name for name in names if name in control.labels] if isinstance(names, list) else []
        if not known:
            log.info("task %s annotation %s: region label %s is not in the label config %s; dropped",
                     task_id, annotation["id"], names, list(control.labels))
            continue
        if control.task == "masks":
            shape, box, why = _region_shape(region, value)
        else:
            shape, (box, why) = None, _region_box(value)
        if box is None:
            log.info("task %s annotation %s: region %s %s; dropped", task_id, annotation["id"], region.get("id"), why)
            continue
        boxes.append(box)
        labels.append(known[0])
        if shape is not None:
            masks.append(shape)
    if not boxes and any(isinstance(r, dict) and isinstance(r.get("type"), str) and r["type"] in SPATIAL_TYPES for r in result):
        # Objects were marked, just none livetrain can learn (another control, dropped regions): as a negative
        # this image would teach that those objects are background. Leave it out instead.
        log.info("task %s annotation %s marks regions, none usable for %s; not used for training", task_id,
                 annotation["id"], control.from_name)
        return None
    return LabeledImage(
        task_id=task_id,
        image_url=image_url.strip(),
        annotation_id=annotation["id"],
        updated_at=str(annotation.get("updated_at") or annotation.get("created_at") or ""),
        boxes=tuple(boxes),
        labels=tuple(labels),
        masks=tuple(masks),
    )


def _region_shape(region: dict, value: dict) -> tuple[dict | None, Box | None, str]:
    """A polygon or brush region's shape (as stored in ``LabeledImage.masks``), its percent bounding box,
    and why it is unusable when the box is None."""
    from backend.labelstudio.masks import mask_box, rle_to_mask  # numpy/cv2 work: only mask projects need it

    if "points" in value:
        points = value.get("points")
        if not isinstance(points, list):
            return None, None, "has no point list"
        pts = [(float(p[0]), float(p[1])) for p in points
               if isinstance(p, (list, tuple)) and len(p) >= 2 and _number(p[0]) is not None and _number(p[1]) is not None]
        if len(pts) < 3:
            return None, None, f"is a polygon with {len(pts)} valid point(s), fewer than 3"
        xs = [max(0.0, min(100.0, x)) for x, _ in pts]
        ys = [max(0.0, min(100.0, y)) for _, y in pts]
        if max(xs) <= min(xs) or max(ys) <= min(ys) or _collinear(xs, ys):
            return None, None, "is a polygon with no area"
        box = (min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys))
        return {"points": [[round(x, 4), round(y, 4)] for x, y in pts]}, box, ""
    rle = value.get("rle")
    if rle is None:
        # drafts may hold only stroke polylines ("touches"); a submitted annotation always has rle
        return None, None, "has no rle (only brush strokes that were never encoded)"
    width, height = region.get("original_width"), region.get("original_height")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (width, height)):
        return None, None, "is a brush region without original_width/original_height"
    try:
        mask = rle_to_mask(rle, width, height)
    except ValueError as exc:
        return None, None, f"has an unusable brush RLE ({exc})"
    pixels = mask_box(mask)
    if pixels is None:
        return None, None, "is an empty brush mask"
    x1, y1, x2, y2 = pixels
    box = (x1 / width * 100.0, y1 / height * 100.0, (x2 - x1) / width * 100.0, (y2 - y1) / height * 100.0)
    return {"rle": list(rle), "width": width, "height": height}, box, ""


def _collinear(xs: list[float], ys: list[float]) -> bool:
    """Whether all points lie on one line (a polygon with no area; a bow tie's signed area is 0 too, so not that)."""
    far = max(range(len(xs)), key=lambda i: (xs[i] - xs[0]) ** 2 + (ys[i] - ys[0]) ** 2)
    dx, dy = xs[far] - xs[0], ys[far] - ys[0]
    return all(abs((x - xs[0]) * dy - (y - ys[0]) * dx) < 1e-9 for x, y in zip(xs, ys))


def box_to_pixels(box: Box, width: float, height: float) -> tuple[float, float, float, float]:
    """Percent (x, y, w, h) -> pixel (x1, y1, x2, y2), clipped to a ``width`` x ``height`` image."""
    x, y, w, h = box
    x1 = min(max(x * width / 100.0, 0.0), width)
    y1 = min(max(y * height / 100.0, 0.0), height)
    x2 = min(max((x + w) * width / 100.0, 0.0), width)
    y2 = min(max((y + h) * height / 100.0, 0.0), height)
    return (x1, y1, x2, y2)
