"""The model quality score (issue 4's definition) and the simulator's conversions and summary."""

import pytest

from backend.metrics.quality import quality
from backend.simulation.session import summarize
from backend.simulation.truth import ground_truth_result, predicted_boxes
from backend.training.coco import CocoImage

GT = [((10, 10, 50, 50), "A"), ((100, 100, 140, 140), "B")]


def test_perfect_prediction_scores_one():
    q = quality([((10, 10, 50, 50), "A", 0.9), ((100, 100, 140, 140), "B", 0.8)], GT)
    assert (q.correct, q.missed, q.extra) == (2, 0, 0) and q.score == pytest.approx(1.0)


def test_each_outcome_has_its_weight():
    predicted = [((10, 10, 50, 50), "B", 0.9),  # IoU 1, other class -> wrong class (0.7)
                 ((100, 100, 120, 120), "B", 0.8),  # IoU 0.25, same class -> imprecise (0.5)
                 ((300, 300, 320, 320), "A", 0.7)]  # nothing there -> extra (-0.1)
    q = quality(predicted, GT)
    assert (q.correct, q.wrong_class, q.imprecise, q.extra, q.missed) == (0, 1, 1, 1, 0)
    assert q.score == pytest.approx((0.7 + 0.5 - 0.1) / 2)


def test_iou_threshold_is_inclusive_and_each_object_matches_once():
    half = quality([((10, 10, 50, 50), "A", 0.9)], [((10, 10, 50, 90), "A")])  # IoU = 1600 / 3200 = 0.5
    assert half.correct == 1
    twice = quality([((10, 10, 50, 50), "A", 0.9), ((10, 10, 50, 50), "A", 0.5)], GT[:1])
    assert (twice.correct, twice.extra) == (1, 1) and twice.score == pytest.approx(0.9)


def test_floor_at_zero_and_empty_images():
    assert quality([((300, 300, 320, 320), "A", 0.5)] * 20, GT).score == 0.0  # only extras
    assert quality([], GT).missed == 2 and quality([], GT).score == 0.0
    assert quality([], []).score == 1.0  # nothing there, nothing predicted
    assert quality([((1, 1, 5, 5), "A", 0.5)], []).score == pytest.approx(0.9)


def test_ground_truth_round_trips_through_label_studio_percent():
    image = CocoImage(1, None, 640, 480, "train", boxes=[[64, 48, 192, 240]], labels=[2])
    result = ground_truth_result(image, ["WBC", "RBC"])
    assert result[0]["value"]["rectanglelabels"] == ["RBC"] and result[0]["value"]["x"] == pytest.approx(10.0)
    (box, label, _), = predicted_boxes(result, 640, 480)
    assert label == "RBC" and box == pytest.approx((64, 48, 192, 240))


def test_summary_finds_first_prediction_and_rolling_thresholds():
    records = [{"n": n, "quality": q, "regions": int(q > 0), "model_version": f"v{n // 5}", "latency_s": 0.1}
               for n, q in enumerate([0.0] * 5 + [0.6] * 10 + [0.9] * 50 + [0.8] * 35, start=1)]
    s = summarize(records, wall_s=200.0)
    assert s["first_prediction_at"] == 6
    assert s["rolling_0.5_at"] == 14  # window 4..13 holds two zeros: 0.48; window 5..14 one: 0.54
    assert s["rolling_0.7_at"] == 19  # window 10..19: six 0.6 and four 0.9 = 0.72 (0.69 the image before)
    assert s["quality_51_100"] == pytest.approx((15 * 0.9 + 35 * 0.8) / 50)
    assert s["wall_s_per_image"] == 2.0
