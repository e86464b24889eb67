"""Task-level confidence for Label Studio's ``score`` (low = uncertain, served first by uncertainty sampling).

Every candidate detection is a yes/no decision "is there an object here?". A detection with score ``s``
is right with probability ``s`` if we show it and ``1 - s`` if we drop it, so the confidence in that
decision is ``max(s, 1 - s)``. The task's confidence is that of its least certain decision:

    confidence = min over candidates of max(s_i, 1 - s_i),   and 1.0 when there is no candidate at all.

Candidates are the model's raw detections (above its internal floor of 0.05), not only the regions shown,
so an image with a near-threshold detection that was filtered out still counts as uncertain, and an image
where the model sees nothing anywhere counts as a confident "empty".
"""

from __future__ import annotations

from typing import Iterable


def least_confidence(scores: Iterable[float]) -> float:
    scores = [float(s) for s in scores]
    if not scores:
        return 1.0
    return min(max(s, 1.0 - s) for s in scores)
