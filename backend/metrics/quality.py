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
"""

from __future__ import annotations

from dataclasses import dataclass

IOU_MATCH = 0.5  # at or above: the box is in the right place
IOU_OVERLAP = 0.0  # above (and below IOU_MATCH, same class): imprecise


def iou(a, b) -> float:
    ix1, iy1, ix2, iy2 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, ix2 - ix1) * max(0.0, iy2 - iy1)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


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


def quality(predicted: list[tuple], annotated: list[tuple]) -> Quality:
    """``predicted``: (box, label, score); ``annotated``: (box, label); boxes as (x1, y1, x2, y2)."""
    result = Quality(annotated=len(annotated))
    free = set(range(len(annotated)))
    for box, label, _ in sorted(predicted, key=lambda p: -p[2]):
        best = None  # (rank, iou, index): rank 0 correct, 1 wrong class, 2 imprecise
        for j in free:
            overlap = iou(box, annotated[j][0])
            same = annotated[j][1] == label
            if overlap >= IOU_MATCH:
                rank = 0 if same else 1
            elif same and overlap > IOU_OVERLAP:
                rank = 2
            else:
                continue
            if best is None or (rank, -overlap) < (best[0], -best[1]):
                best = (rank, overlap, j)
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
