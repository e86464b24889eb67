"""Task-level confidence for Label Studio's ``score`` (low = uncertain, served first by uncertainty sampling).

Label Studio's uncertainty sampling serves the unlabeled task with the *lowest* prediction score, so every
measure here is a confidence in [0, 1]: 1.0 = the model is sure about this image, 0.0 = it is lost.
``UNCERTAINTY`` picks one:

``mean_confidence`` (the default; costs nothing beyond the forward)
    The same yes/no decisions as ``least_confidence``, but the image's uncertainty is the *score-weighted mean*
    of its candidates' uncertainties ``u_i = 1 - |2 s_i - 1|`` (1 at s = 0.5, 0 at s = 0 or 1), not the
    worst one:

        confidence = 1 - sum_i s_i u_i / sum_i s_i,   1.0 when there is no candidate at all.

    ``least_confidence`` saturates on images with many objects: one of twenty candidates is nearly always
    near 0.5, so most tasks score 0.50-0.51 and the stream's order is noise. The mean separates an image with
    one doubtful object among twenty sure ones from one where half are doubtful. The weights ``s_i`` keep the
    many 0.05-0.1 background candidates from drowning the objects.

``class_weighted`` (costs nothing beyond the forward; class-aware ``mean_confidence``)
    As ``mean_confidence``, but each candidate's weight is ``s_i w_c`` where ``w_c`` grows as its class is
    rarer among the objects the version was trained on (``class_weights``): ``w_c = sqrt(mean_n / n_c)``
    clipped to [0.5, 3], ``n_c`` the labeled objects of class ``c`` (a class with none weighs 3). An image whose
    doubtful candidates belong to a rare class (BCCD's platelets among hundreds of red cells) is served before one
    whose doubt is about the common class. Without counts (a version published before they were recorded) it is
    ``mean_confidence``.

``least_confidence`` (costs nothing beyond the forward)
    Every candidate detection is a yes/no decision "is there an object here?". A detection with score
    ``s`` is right with probability ``s`` if we show it and ``1 - s`` if we drop it, so the confidence
    in that decision is ``max(s, 1 - s)``. The task's confidence is that of its least certain decision:

        confidence = min over candidates of max(s_i, 1 - s_i),   1.0 when there is no candidate at all.

    Candidates are the model's raw detections (above its internal floor of 0.05), not only the regions
    shown, so an image with a near-threshold detection that was filtered out still counts as uncertain,
    and an image where the model sees nothing anywhere counts as a confident "empty".

``entropy`` (same forward, plus a softmax over the RoI head's logits)
    torchvision's detector returns one score per box, but its RoI head computes a full distribution over
    the classes (background included) for every proposal before it keeps the best class. We read that
    distribution (a hook on the box predictor) and take its entropy, normalised by ``log(C)`` (C classes
    with background) so it lies in [0, 1]. Candidates are the proposals whose best foreground class
    reaches the same 0.05 floor the detector uses; the image's confidence is one minus the largest
    normalised entropy among them (NMS is not applied: duplicate proposals of one object have about the
    same distribution, so they do not change a maximum), and 1.0 when there is no candidate.
    It differs from least_confidence where classes are confused: 0.45 "cat" / 0.45 "dog" / 0.1
    background is a high entropy, while each box alone (one class, score 0.45) looks only mildly unsure.

``flip_stability`` (two forwards: the image and its mirror image, in one batch)
    Localisation stability: a model that knows where the objects are finds the same boxes in the
    horizontally flipped image. Boxes found on the mirror image are flipped back; every detection ``d``
    (score ``s_d``) of either view is matched to the same-label detection of the other view with the
    highest IoU (``m_d``, 0 when there is none). Disagreement is the score-weighted mismatch:

        confidence = 1 - sum_d s_d (1 - m_d) / max(sum_d s_d, 1)

    1.0 when both views agree exactly or both are empty. For a Mask R-CNN the boxes stand for the masks
    (each mask lies inside its box, and a mask that moves moves its box). The denominator is at least one detection's
    worth, so a lone 0.06 candidate that the other view misses costs 0.06, while a 0.9 detection that
    vanishes under the flip costs 0.9.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterable

import torch
from torch import nn
from torchvision.ops import box_iou

from backend.errors import LivetrainError
from backend.model_store.detect import forward

MEASURES = ("least_confidence", "mean_confidence", "class_weighted", "entropy", "flip_stability")
WEIGHT_RANGE = (0.5, 3.0)  # class_weighted: a class never counts less than half or more than three times
CANDIDATE_FLOOR = 0.05  # proposals whose best foreground probability is below this are not candidates


def least_confidence(scores: Iterable[float]) -> float:
    scores = [float(s) for s in scores]
    if not scores:
        return 1.0
    return min(max(s, 1.0 - s) for s in scores)


def mean_confidence(scores: Iterable[float]) -> float:
    """1 - the score-weighted mean of the candidates' uncertainties ``1 - |2s - 1|`` (see the module doc)."""
    scores = list(scores)
    return weighted_confidence(scores, [1.0] * len(scores))


def weighted_confidence(scores: Iterable[float], weights: Iterable[float]) -> float:
    """``mean_confidence`` with each candidate's score mass multiplied by its weight (its class's, for
    ``class_weighted``; all 1 for ``mean_confidence`` itself)."""
    pairs = [(float(s), float(w)) for s, w in zip(scores, weights)]
    mass = sum(s * w for s, w in pairs)
    if not pairs or mass <= 0:
        return 1.0
    return 1.0 - sum(s * w * (1.0 - abs(2.0 * s - 1.0)) for s, w in pairs) / mass


def class_weights(objects: dict[str, int] | None, classes: Iterable[str]) -> tuple[float, ...] | None:
    """Per head index (1 = ``classes[0]``; index 0, the background, weighs 1): ``sqrt(mean_n / n_c)`` clipped to
    ``WEIGHT_RANGE``, from ``objects`` = labeled objects per class name. None without counts."""
    classes = list(classes)
    if not objects or not classes:
        return None
    counts = [max(int(objects.get(name, 0)), 0) for name in classes]
    mean = sum(counts) / len(counts)
    if mean <= 0:
        return None
    low, high = WEIGHT_RANGE
    return (1.0,) + tuple(high if n == 0 else min(max(math.sqrt(mean / n), low), high) for n in counts)


def entropy_confidence(probs: torch.Tensor, floor: float = CANDIDATE_FLOOR) -> float:
    """``probs``: N proposals x C classes (column 0 = background), rows summing to 1."""
    if probs.numel() == 0 or probs.shape[1] < 2:
        return 1.0
    candidates = probs[probs[:, 1:].max(dim=1).values >= floor]
    if len(candidates) == 0:
        return 1.0
    entropy = -(candidates * candidates.clamp_min(1e-12).log()).sum(dim=1) / math.log(probs.shape[1])
    return float(1.0 - entropy.max().clamp(0.0, 1.0))


def flip_stability(a: dict, b: dict) -> float:
    """Agreement of two detection sets of one image (``boxes``, ``labels``, ``scores``); ``b`` is the
    mirror image's output already flipped back (see ``unflip``)."""
    if len(a["boxes"]) == 0 and len(b["boxes"]) == 0:
        return 1.0
    mismatch, mass = 0.0, 0.0
    for one, other in ((a, b), (b, a)):
        if len(one["boxes"]) == 0:
            continue
        if len(other["boxes"]) == 0:
            best = torch.zeros(len(one["boxes"]))
        else:
            iou = box_iou(one["boxes"].float(), other["boxes"].float())
            same = one["labels"][:, None] == other["labels"][None, :]
            best = (iou * same).max(dim=1).values
        scores = one["scores"].float().cpu()
        mismatch += float((scores * (1.0 - best.cpu())).sum())
        mass += float(scores.sum())
    return max(0.0, 1.0 - mismatch / max(mass, 1.0))


def unflip(det: dict, width: int) -> dict:
    """Boxes found on a horizontally flipped image, in the original image's coordinates."""
    boxes = det["boxes"].clone()
    boxes[:, 0], boxes[:, 2] = width - det["boxes"][:, 2], width - det["boxes"][:, 0]
    return dict(det, boxes=boxes)


@contextmanager
def class_distributions(model: nn.Module):
    """While active, ``probs`` collects each image's proposals x classes softmax from the RoI head."""
    heads = getattr(model, "roi_heads", None)
    predictor = getattr(heads, "box_predictor", None)
    if predictor is None:
        raise LivetrainError(f"UNCERTAINTY=entropy needs a Faster R-CNN-style model with roi_heads.box_predictor; "
                             f"{type(model).__name__} has none (use least_confidence)")
    sizes: list[list[int]] = []
    probs: list[torch.Tensor] = []

    def before_heads(_module, args):
        sizes.append([len(p) for p in args[1]])  # RoIHeads.forward(features, proposals, image_shapes, ...)

    def after_predictor(_module, _args, output):
        logits = output[0]
        probs.extend(torch.softmax(logits.float(), dim=-1).split(sizes.pop(0)))

    handles = [heads.register_forward_pre_hook(before_heads), predictor.register_forward_hook(after_predictor)]
    try:
        yield probs
    finally:
        for handle in handles:
            handle.remove()


def detect_and_score(model: nn.Module, tensors: list[torch.Tensor], measure: str,
                     weights: tuple[float, ...] | None = None) -> tuple[list[dict], list[float]]:
    """Run ``model`` on ``tensors`` (CxHxW in [0, 1]); return its detections (``detect.forward``: a Mask R-CNN's
    masks stay at RoI resolution) and each image's confidence. Every measure works for boxes and masks alike:
    all read the box head, which a Mask R-CNN shares with a Faster R-CNN. ``weights``: ``class_weights`` of the
    model's classes, for ``class_weighted``."""
    if measure not in MEASURES:
        raise LivetrainError(f"unknown UNCERTAINTY={measure!r}; choose one of {', '.join(MEASURES)}")
    with torch.inference_mode():
        if measure == "entropy":
            with class_distributions(model) as probs:
                detections = forward(model, tensors)
            return detections, [entropy_confidence(p) for p in probs]
        if measure == "flip_stability":
            outputs = forward(model, tensors + [t.flip(-1) for t in tensors])
            detections, mirrored = outputs[: len(tensors)], outputs[len(tensors):]
            return detections, [flip_stability(d, unflip(m, t.shape[-1]))
                                for d, m, t in zip(detections, mirrored, tensors)]
        detections = forward(model, tensors)
        if measure == "class_weighted" and weights is not None:
            return detections, [weighted_confidence(d["scores"].tolist(),
                                                    [weights[i] if 0 <= i < len(weights) else 1.0
                                                     for i in d["labels"].tolist()]) for d in detections]
        measure_fn = least_confidence if measure == "least_confidence" else mean_confidence
        return detections, [measure_fn(d["scores"].tolist()) for d in detections]
