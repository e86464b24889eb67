"""``livetrain simulate --kind polygons`` / ``--kind brush``: COCO polygons as Label Studio ground truth, mask-IoU quality,
and the polygon segmentations ``load_coco`` keeps. Synthetic data only (no network, no shared datasets)."""

import json

import pytest

from backend.labelstudio.annotations import labeled_image
from backend.labelstudio.masks import mask_to_rle, rle_to_mask
from backend.simulation.truth import (_control, ground_truth_result, label_config, predicted_masks,
                                        score_prediction, truth_masks)
from backend.training.coco import CocoImage, load_coco

CLASSES = ["window", "car"]
W, H = 200, 100


def square(x, y, size):
    return [[x, y], [x + size, y], [x + size, y + size], [x, y + size]]


def image():
    """A window of two parts (two 20x20 squares) and a car (one 40x40 square), plus a box-only object."""
    return CocoImage(1, None, W, H, "train",
                     boxes=[[10, 10, 80, 30], [100, 40, 140, 80], [0, 0, 5, 5]], labels=[1, 2, 2],
                     polygons=[[square(10, 10, 20), square(60, 10, 20)], [square(100, 40, 40)], []])


def prediction(points_px, label, score=0.9):
    return {"type": "polygonlabels", "score": score,
            "value": {"points": [[x / W * 100, y / H * 100] for x, y in points_px], "closed": True,
                      "polygonlabels": [label]}}


def test_ground_truth_is_one_closed_polygon_per_ring_in_percent():
    result = ground_truth_result(image(), CLASSES, kind="polygons")
    assert [r["value"]["polygonlabels"] for r in result] == [["window"], ["window"], ["car"]]
    assert len({r["id"] for r in result}) == 3
    first = result[0]
    assert first["type"] == "polygonlabels" and first["value"]["closed"] is True
    assert (first["original_width"], first["original_height"]) == (W, H)
    assert first["value"]["points"] == [[5.0, 10.0], [15.0, 10.0], [15.0, 30.0], [5.0, 30.0]]
    assert "score" not in first
    # what livetrain's annotation parser makes of it: one training instance per ring, none dropped
    control = _control(tuple(CLASSES), "polygons")
    assert control.tag_type == "PolygonLabels" and "<PolygonLabels" in label_config(CLASSES, "polygons")
    task = {"id": 7, "data": {"image": "/data/upload/1/a.jpg"},
            "annotations": [{"id": 1, "result": result, "updated_at": "2026-01-01T00:00:00Z"}]}
    example = labeled_image(task, control)
    assert example.labels == ("window", "window", "car") and len(example.masks) == 3


def test_brush_ground_truth_is_one_rle_per_object_that_livetrain_reads_as_one_instance():
    result = ground_truth_result(image(), CLASSES, kind="brush")
    assert [r["value"]["brushlabels"] for r in result] == [["window"], ["car"]]  # the box-only object: not painted
    window = rle_to_mask(result[0]["value"]["rle"], W, H)
    assert window.sum() == 800 and (window == image().mask(0)).all()  # both parts in one region
    assert result[0]["type"] == "brushlabels" and result[0]["value"]["format"] == "rle" and "score" not in result[0]
    control = _control(tuple(CLASSES), "brush")
    assert control.tag_type == "BrushLabels" and "<BrushLabels" in label_config(CLASSES, "brush")
    task = {"id": 7, "data": {"image": "/data/upload/1/a.jpg"},
            "annotations": [{"id": 1, "result": result, "updated_at": "2026-01-01T00:00:00Z"}]}
    example = labeled_image(task, control)
    assert example.labels == ("window", "car") and len(example.masks) == 2


def test_brush_predictions_are_scored_with_mask_iou():
    truth = ground_truth_result(image(), CLASSES, kind="brush")
    q = score_prediction([dict(r, score=0.8) for r in truth], image(), CLASSES, kind="brush")
    assert (q.correct, q.missed, q.extra, q.score) == (2, 0, 0, 1.0)
    half = image().mask(1).copy()
    half[:, 120:] = False  # the car's left half: IoU 0.5
    wrong_size = {"type": "brushlabels", "score": 0.5,
                  "value": {"format": "rle", "rle": mask_to_rle(half[:50]), "brushlabels": ["car"]}}
    (crop, label, score), = predicted_masks([{"type": "brushlabels", "score": 0.7, "value": {
        "format": "rle", "rle": mask_to_rle(half), "brushlabels": ["car"]}}, wrong_size], W, H)
    assert (crop.area, label, score) == (800, "car", 0.7)  # the RLE of another size is no shape


def test_boxes_kind_is_unchanged():
    result = ground_truth_result(image(), CLASSES)
    assert [r["type"] for r in result] == ["rectanglelabels"] * 3
    assert "<RectangleLabels" in label_config(CLASSES)
    for r in result:
        r["score"] = 0.8
    q = score_prediction(result, image(), CLASSES)  # box IoU: every object, the box-only one too
    assert (q.correct, q.annotated) == (3, 3) and q.score == pytest.approx(1.0)


def test_truth_masks_join_the_rings_of_an_object():
    truth = truth_masks(image(), CLASSES)
    assert [label for _, label in truth] == ["window", "car"]  # the box-only object is not scored
    window, car = truth[0][0], truth[1][0]
    assert window.area == 2 * 400 and (window.x0, window.y0, window.mask.shape) == (10, 10, (20, 70))
    assert car.area == 1600


def test_ground_truth_replayed_as_prediction():
    result = ground_truth_result(image(), CLASSES, kind="polygons")
    for r in result:
        r["score"] = 0.8
    # the car (one part) alone: it matches, the window is missed
    q = score_prediction(result[2:], image(), CLASSES, kind="polygons")
    assert (q.correct, q.missed, q.extra) == (1, 1, 0)
    # every predicted result is one region: of the window's two parts one matches the whole object
    # (mask IoU 400 / 800 = 0.5), the other is left over, as a person would have to delete it
    q = score_prediction(result, image(), CLASSES, kind="polygons")
    assert (q.correct, q.missed, q.extra) == (2, 0, 1) and q.score == pytest.approx((2 - 0.1) / 2)


def test_single_object_perfect_half_and_wrong_label():
    car_only = CocoImage(2, None, W, H, "train", boxes=[[100, 40, 140, 80]], labels=[2],
                         polygons=[[square(100, 40, 40)]])
    perfect = score_prediction([prediction(square(100, 40, 40), "car")], car_only, CLASSES, kind="polygons")
    assert perfect.correct == 1 and perfect.score == pytest.approx(1.0)
    # the left half of the car, then a thinner strip: mask IoU 0.5 is still a match, below it imprecise
    half = [prediction([[100, 40], [120, 40], [120, 80], [100, 80]], "car")]
    assert score_prediction(half, car_only, CLASSES, kind="polygons").correct == 1
    strip = [prediction([[100, 40], [110, 40], [110, 80], [100, 80]], "car")]  # IoU 0.25
    q = score_prediction(strip, car_only, CLASSES, kind="polygons")
    assert (q.imprecise, q.correct) == (1, 0) and q.score == pytest.approx(0.5)
    wrong = score_prediction([prediction(square(100, 40, 40), "window")], car_only, CLASSES, kind="polygons")
    assert (wrong.wrong_class, wrong.correct) == (1, 0) and wrong.score == pytest.approx(0.7)
    extra = score_prediction([prediction(square(0, 0, 10), "car")], car_only, CLASSES, kind="polygons")
    assert (extra.extra, extra.missed, extra.score) == (1, 1, 0.0)


def test_predicted_masks_skip_non_polygons_and_degenerate_points():
    result = [prediction(square(0, 0, 10), "car"),
              {"type": "rectanglelabels", "value": {"x": 1, "y": 1, "width": 5, "height": 5, "rectanglelabels": ["car"]}},
              {"type": "polygonlabels", "value": {"points": [[1, 1], [2, 2]], "polygonlabels": ["car"]}}]
    (crop, label, score), = predicted_masks(result, W, H)
    assert (crop.area, label, score) == (100, "car", 0.9)


def test_load_coco_keeps_polygon_rings_and_skips_rle(tmp_path):
    data = {"images": [{"id": 1, "file_name": "a.jpg", "width": W, "height": H}],
            "categories": [{"id": 3, "name": "window"}, {"id": 5, "name": "car"}],
            "annotations": [
                {"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 10, 70, 20], "iscrowd": 0,
                 "segmentation": [[10, 10, 30, 10, 30, 30, 10, 30], [60, 10, 80, 10, 80, 30, 60, 30], [1, 1, 2]]},
                {"id": 2, "image_id": 1, "category_id": 5, "bbox": [0, 0, 5, 5], "iscrowd": 1,
                 "segmentation": {"counts": "abc", "size": [H, W]}},
                {"id": 3, "image_id": 1, "category_id": 5, "bbox": [0, 0, 0, 5], "segmentation": [[0, 0, 0, 5, 1, 5]]}]}
    (tmp_path / "annotations.json").write_text(json.dumps(data))
    classes, (im,) = load_coco(tmp_path)
    assert classes == ["window", "car"] and im.labels == [1, 2] and len(im.boxes) == len(im.polygons) == 2
    assert im.polygons[0] == [square(10, 10, 20), square(60, 10, 20)]  # the 2-point ring is dropped
    assert im.polygons[1] == [] and im.has_polygons
    assert im.mask(0).sum() == 800 and im.mask(1).sum() == 0
    assert im.mask(0, W // 2, H // 2).sum() == 200  # rasterised at half size
    assert im.target()["boxes"].shape == (2, 4)


def test_the_editor_screenshot_opens_the_unlabeled_task_with_the_largest_prediction_of_the_version():
    from backend.simulation.editor import best_predicted_task

    class Tasks:
        def tasks(self, project):
            assert project == 3
            region = {"type": "polygonlabels"}
            return [{"id": 1, "total_annotations": 1, "predictions": [{"model_version": "v2", "result": [region] * 9}]},
                    {"id": 2, "total_annotations": 0, "predictions": [{"model_version": "v1", "result": [region] * 7}]},
                    {"id": 3, "total_annotations": 0, "predictions": [{"model_version": "v2", "result": [region] * 2}]},
                    {"id": 4, "total_annotations": 0, "predictions": [{"model_version": "v2", "result": [region] * 2}]},
                    {"id": 5, "total_annotations": 0, "predictions": [{"model_version": "v2", "result": []}]}]

    task, result = best_predicted_task(Tasks(), 3, "v2")  # not labeled, of this version, most regions, lowest id
    assert task == 3 and len(result) == 2
    assert best_predicted_task(Tasks(), 3, "v9") is None
