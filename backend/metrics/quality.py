"""Model quality score: how useful a pre-label is to the person who corrects it.

Each predicted box is matched (greedily, highest score first) to at most one annotated box:

- correct:     same class and IoU >= 0.5                       -> +1.0
- wrong class: other class and IoU >= 0.5                      -> +0.7 (the box is right, one click fixes it)
- imprecise:   same class and 0 < IoU < 0.5 (overlapping)      -> +0.5 (needs dragging)
- extra:       matches nothing                                  -> -0.1 (must be deleted)

Annotated boxes that nothing matched are *missed* (count 0). The score is

    quality = max(0, (1.0 correct + 0.5 imprecise + 0.7 wrong_class - 0.1 extra) / annotated objects)

For an image with no annotated object the score is 1.0 if nothing was predicted, else
``max(0, 1 - 0.1 extra)``. Matching prefers, for each prediction, a correct match over a wrong-class one
over an imprecise one, and among equals the highest IoU.

Mask projects use the same categories and weights with **mask IoU** in place of box IoU (``mask_iou`` on
``MaskCrop`` shapes): a polygon that covers the right object but only half of it is "imprecise".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

IOU_MATCH = 0.5  # at or above: the box is in the right place
IOU_OVERLAP = 0.0  # above (and below IOU_MATCH, same class): imprecise


def iou(a, b) -> float:
    ix1, iy1, ix2, iy2 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, ix2 - ix1) * max(0.0, iy2 - iy1)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


@dataclass(frozen=True)
class MaskCrop:
    """An instance mask as the bool crop of its bounding box and the crop's top-left pixel: comparing two
    costs only their overlap, never a full-image array."""

    mask: np.ndarray
    x0: int = 0
    y0: int = 0
    area: int = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "area", int(self.mask.sum()))

    @classmethod
    def from_full(cls, mask: np.ndarray) -> "MaskCrop":
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        if len(rows) == 0:
            return cls(np.zeros((0, 0), dtype=bool))
        y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        return cls(mask[y0:y1, x0:x1].astype(bool), int(x0), int(y0))


def mask_iou(a: MaskCrop, b: MaskCrop) -> float:
    union_area = a.area + b.area
    if union_area == 0:
        return 0.0
    x0, y0 = max(a.x0, b.x0), max(a.y0, b.y0)
    x1 = min(a.x0 + a.mask.shape[1], b.x0 + b.mask.shape[1])
    y1 = min(a.y0 + a.mask.shape[0], b.y0 + b.mask.shape[0])
    if x1 <= x0 or y1 <= y0:
        return 0.0
    inter = int((a.mask[y0 - a.y0 : y1 - a.y0, x0 - a.x0 : x1 - a.x0] &
                 b.mask[y0 - b.y0 : y1 - b.y0, x0 - b.x0 : x1 - b.x0]).sum())
    return inter / (union_area - inter)


@dataclass
class Quality:
    correct: int = 0
    imprecise: int = 0
    wrong_class: int = 0
    extra: int = 0
    missed: int = 0
    annotated: int = 0

    @property
    def score(self) -> float:
        gain = 1.0 * self.correct + 0.5 * self.imprecise + 0.7 * self.wrong_class - 0.1 * self.extra
        if self.annotated == 0:
            return 1.0 if self.extra == 0 else max(0.0, 1.0 - 0.1 * self.extra)
        return max(0.0, gain / self.annotated)


def quality(predicted: list[tuple], annotated: list[tuple], overlap: Callable = iou) -> Quality:
    """``predicted``: (shape, label, score); ``annotated``: (shape, label). Shapes are boxes (x1, y1, x2, y2)
    with the default ``overlap``, or ``MaskCrop`` with ``overlap=mask_iou``."""
    result = Quality(annotated=len(annotated))
    free = set(range(len(annotated)))
    for box, label, _ in sorted(predicted, key=lambda p: -p[2]):
        best = None  # (rank, iou, index): rank 0 correct, 1 wrong class, 2 imprecise
        for j in free:
            overlap_ij = overlap(box, annotated[j][0])
            same = annotated[j][1] == label
            if overlap_ij >= IOU_MATCH:
                rank = 0 if same else 1
            elif same and overlap_ij > IOU_OVERLAP:
                rank = 2
            else:
                continue
            if best is None or (rank, -overlap_ij) < (best[0], -best[1]):
                best = (rank, overlap_ij, j)
        if best is None:
            result.extra += 1
            continue
        free.discard(best[2])
        if best[0] == 0:
            result.correct += 1
        elif best[0] == 1:
            result.wrong_class += 1
        else:
            result.imprecise += 1
    result.missed = len(free)
    return result
