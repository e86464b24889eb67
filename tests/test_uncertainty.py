"""The task-confidence measures (UNCERTAINTY), with models whose answers are known."""

from __future__ import annotations

import math

import pytest
import torch

from backend.inference.uncertainty import (class_weights, detect_and_score, entropy_confidence, flip_stability,
                                           least_confidence, mean_confidence, unflip)
from backend.inference.predictor import LoadedModel
from backend.model_store.architectures import build_detector


class BrightBox(torch.nn.Module):
    """Finds the bounding box of the bright pixels: a detector that is flip-equivariant by construction."""

    def forward(self, images):
        out = []
        for image in images:
            ys, xs = torch.nonzero(image.mean(0) > 0.5, as_tuple=True)
            if len(xs) == 0:
                out.append({"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0)})
                continue
            box = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)
            out.append({"boxes": box, "labels": torch.tensor([1]), "scores": torch.tensor([0.9])})
        return out


class FixedBox(torch.nn.Module):
    """Always 'sees' one object in the left part of the image, mirrored or not: not flip-equivariant."""

    def __init__(self, score: float = 0.9):
        super().__init__()
        self.score = score

    def forward(self, images):
        return [{"boxes": torch.tensor([[2.0, 10.0, 22.0, 30.0]]), "labels": torch.tensor([1]),
                 "scores": torch.tensor([self.score])} for _ in images]


def image_with_square(x=5, y=8, size=12, width=64, height=40):
    image = torch.full((3, height, width), 0.2)
    image[:, y:y + size, x:x + size] = 0.9
    return image


def test_least_confidence_rule():
    assert least_confidence([]) == 1.0  # no candidate at all: a confident "empty"
    assert least_confidence([0.95, 0.02]) == pytest.approx(0.95)
    assert least_confidence([0.95, 0.5, 0.1]) == pytest.approx(0.5)  # the coin flip decides


def test_flip_stability_is_one_for_an_equivariant_model_and_lower_otherwise():
    images = [image_with_square(), image_with_square(x=30, y=2, size=20)]
    _, equivariant = detect_and_score(BrightBox(), images, "flip_stability")
    assert equivariant == pytest.approx([1.0, 1.0])
    _, fixed = detect_and_score(FixedBox(), images, "flip_stability")
    assert all(c < 0.2 for c in fixed)  # the box does not follow the mirror image: 0.9 of mismatch, twice
    _, empty = detect_and_score(BrightBox(), [torch.full((3, 40, 64), 0.1)], "flip_stability")
    assert empty == [1.0]  # two empty outputs agree


def test_flip_stability_weights_by_score_and_label():
    box = torch.tensor([[10.0, 10.0, 30.0, 30.0]])
    a = {"boxes": box, "labels": torch.tensor([1]), "scores": torch.tensor([0.8])}
    shifted = {"boxes": box + torch.tensor([5.0, 0.0, 5.0, 0.0]), "labels": torch.tensor([1]), "scores": torch.tensor([0.8])}
    iou = 15 * 20 / (25 * 20)
    assert flip_stability(a, shifted) == pytest.approx(1 - 1.6 * (1 - iou) / 1.6)
    other_label = dict(shifted, labels=torch.tensor([2]))
    assert flip_stability(a, other_label) == pytest.approx(0.0)
    lone_weak = {"boxes": box, "labels": torch.tensor([1]), "scores": torch.tensor([0.06])}
    nothing = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0)}
    assert flip_stability(lone_weak, nothing) == pytest.approx(0.94)  # a faint candidate costs only its score
    mirrored = unflip({"boxes": torch.tensor([[40.0, 1.0, 60.0, 9.0]])}, 64)
    assert mirrored["boxes"].tolist() == [[4.0, 1.0, 24.0, 9.0]]


def test_entropy_confidence_of_class_distributions():
    confident = torch.tensor([[0.02, 0.97, 0.01]])
    confused = torch.tensor([[0.1, 0.45, 0.45]])
    background = torch.tensor([[0.99, 0.006, 0.004]])  # best foreground below the 0.05 floor: not a candidate
    assert entropy_confidence(background) == 1.0
    assert entropy_confidence(torch.zeros(0, 3)) == 1.0
    assert entropy_confidence(torch.full((1, 3), 1 / 3)) == pytest.approx(0.0, abs=1e-6)
    h = -(0.1 * math.log(0.1) + 2 * 0.45 * math.log(0.45)) / math.log(3)
    assert entropy_confidence(torch.cat([confident, confused])) == pytest.approx(1 - h)  # the worst proposal
    assert entropy_confidence(confident) > 0.8 > entropy_confidence(confused)


@pytest.fixture(scope="module")
def detector():
    torch.manual_seed(0)
    model = build_detector("fasterrcnn_mobilenet_v3_large_320_fpn", 3, min_size=96, max_size=128)
    model.roi_heads.score_thresh = 0.05
    return model.eval()


@pytest.mark.parametrize("bias, expected", [
    ([0.0, 0.0, 0.0], 0.0),       # uniform over background + 2 classes: maximal entropy
    ([-12.0, 12.0, -12.0], 1.0),  # every proposal is surely class 1
    ([12.0, -12.0, -12.0], 1.0),  # every proposal is surely background: no candidate
])
def test_entropy_reads_the_real_roi_head(detector, bias, expected):
    # the RoI head's class logits are set to a constant distribution, so the answer is known exactly
    with torch.no_grad():
        detector.roi_heads.box_predictor.cls_score.weight.zero_()
        detector.roi_heads.box_predictor.cls_score.bias.copy_(torch.tensor(bias))
    images = [image_with_square(), torch.rand(3, 50, 70)]
    detections, confidences = detect_and_score(detector, images, "entropy")
    assert len(detections) == 2 and confidences == pytest.approx([expected, expected], abs=1e-3)
    # the hooks are gone afterwards
    assert not detector.roi_heads._forward_pre_hooks and not detector.roi_heads.box_predictor._forward_hooks


def test_every_measure_runs_on_a_real_detector(detector):
    torch.manual_seed(1)
    with torch.no_grad():
        detector.roi_heads.box_predictor.cls_score.weight.normal_(0, 0.01)
        detector.roi_heads.box_predictor.cls_score.bias.copy_(torch.tensor([0.0, 0.5, -0.5]))
    images = [torch.rand(3, 48, 64) for _ in range(3)]
    for measure in ("least_confidence", "mean_confidence", "class_weighted", "entropy", "flip_stability"):
        detections, confidences = detect_and_score(detector, images, measure, (1.0, 3.0, 0.5))
        assert len(detections) == len(confidences) == 3
        assert all(0.0 <= c <= 1.0 for c in confidences), (measure, confidences)
    with pytest.raises(Exception, match="UNCERTAINTY"):
        detect_and_score(FixedBox(), images, "entropy")


class TwoClasses(torch.nn.Module):
    """A sure object of the other class and a doubtful object of class ``doubt`` (1 or 2)."""

    def __init__(self, doubt: int):
        super().__init__()
        self.doubt = doubt

    def forward(self, images):
        return [{"boxes": torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]]), "labels": torch.tensor([3 - self.doubt, self.doubt]),
                 "scores": torch.tensor([0.95, 0.5])} for _ in images]


def test_class_weights_favour_rare_classes():
    weights = class_weights({"RBC": 900, "WBC": 60, "Platelets": 40}, ("RBC", "WBC", "Platelets"))
    assert weights[0] == 1.0  # background
    assert weights[1] == pytest.approx(math.sqrt(1000 / 3 / 900))  # the common class weighs less than 1
    clipped = class_weights({"a": 10000, "b": 1, "c": 1, "d": 1, "e": 1}, "abcde")
    assert clipped[1] == 0.5 and clipped[2:] == (3.0,) * 4  # within WEIGHT_RANGE
    assert weights[2] == pytest.approx(math.sqrt(1000 / 3 / 60)) and weights[3] == pytest.approx(math.sqrt(1000 / 3 / 40))
    assert class_weights({"a": 10, "b": 0}, ("a", "b"))[2] == 3.0  # a class nobody labeled yet weighs the most
    assert class_weights(None, ("a",)) is None and class_weights({"a": 0}, ("a",)) is None
    # a served version carries the weights of its meta's counts (session.publish records them)
    meta = {"classes": ["RBC", "WBC", "Platelets"], "class_objects": {"RBC": 900, "WBC": 60, "Platelets": 40}}
    assert LoadedModel.from_version(FixedBox(), "v1", meta).weights == weights
    assert LoadedModel.from_version(FixedBox(), "v0", {"classes": ["RBC"]}).weights is None  # older meta


def test_class_weighted_serves_doubt_about_a_rare_class_first():
    images = [torch.rand(3, 40, 40)]
    weights = (1.0, 0.5, 3.0)  # class 1 common, class 2 rare
    _, [rare_doubt] = detect_and_score(TwoClasses(doubt=2), images, "class_weighted", weights)
    _, [common_doubt] = detect_and_score(TwoClasses(doubt=1), images, "class_weighted", weights)
    _, [unweighted] = detect_and_score(TwoClasses(doubt=2), images, "mean_confidence")
    # unweighted, both images are alike; weighted, doubt about the rare class is served first (lower confidence)
    assert rare_doubt < unweighted < common_doubt
    assert detect_and_score(TwoClasses(doubt=1), images, "mean_confidence")[1] == pytest.approx([unweighted])
    assert unweighted == pytest.approx(mean_confidence([0.95, 0.5]))
    # without weights (a version published before counts were recorded) it is mean_confidence
    assert detect_and_score(TwoClasses(doubt=2), images, "class_weighted", None)[1] == pytest.approx([unweighted])
