"""backend.labelstudio.masks: polygon / brush RLE <-> numpy masks, checked by round trips on drawn shapes."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from label_studio_sdk.converter.brush import encode_rle, mask2rle

from backend.labelstudio.masks import (
    drop_specks,
    mask_box,
    mask_iou,
    mask_to_polygons,
    mask_to_rle,
    polygon_to_mask,
    rle_to_mask,
)

SIZES = [(160, 120), (97, 143)]  # (width, height): landscape, and odd non-square portrait


def _shape(name: str, width: int, height: int) -> np.ndarray:
    """A bool (height, width) mask; coordinates scale with the image so every shape fits both sizes."""
    m = np.zeros((height, width), np.uint8)
    w, h = width, height
    if name == "ellipse":
        cv2.ellipse(m, (w // 2, h // 2), (w // 3, h // 4), 20, 0, 360, 1, -1)
    elif name == "rectangle":
        m[h // 6: h // 2, w // 5: 3 * w // 4] = 1
    elif name == "l_shape":
        m[h // 10: 4 * h // 5, w // 8: w // 3] = 1
        m[3 * h // 5: 4 * h // 5, w // 8: 4 * w // 5] = 1
    elif name == "star":
        angle = np.linspace(0, 2 * np.pi, 11)[:-1]
        radius = np.where(np.arange(10) % 2 == 0, 0.45, 0.18) * min(w, h)
        pts = np.stack([w / 2 + radius * np.cos(angle), h / 2 + radius * np.sin(angle)], 1)
        cv2.fillPoly(m, [pts.round().astype(np.int32)], 1)
    elif name == "thin_band":  # 3 px wide diagonal
        cv2.line(m, (5, 5), (w - 6, h - 6), 1, 3)
    elif name == "thin_band_4px":
        cv2.line(m, (5, h - 8), (w - 10, 10), 1, 4)
    elif name == "ring":
        r = min(w, h) // 3
        cv2.circle(m, (w // 2, h // 2), r, 1, -1)
        cv2.circle(m, (w // 2, h // 2), r // 2, 0, -1)
    elif name == "two_blobs":
        cv2.circle(m, (w // 4, h // 4), min(w, h) // 5, 1, -1)
        cv2.circle(m, (3 * w // 4, 3 * h // 4), min(w, h) // 8, 1, -1)
    elif name == "border":  # larger than the image: cut by all four edges
        cv2.ellipse(m, (w // 2, h // 2), (w // 2 + 12, h // 2 + 10), 0, 0, 360, 1, -1)
    return m.astype(bool)


SHAPES = ["ellipse", "rectangle", "l_shape", "star", "thin_band", "thin_band_4px", "ring", "two_blobs", "border"]
PARTS = {"two_blobs": 2}


def _filled(mask: np.ndarray) -> np.ndarray:
    """The mask with its holes filled: what a one-ring Label Studio polygon can represent."""
    out = np.zeros(mask.shape, np.uint8)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(out, contours, -1, 1, thickness=-1)
    return out.astype(bool)


def _union(polygons, width, height) -> np.ndarray:
    out = np.zeros((height, width), bool)
    for points in polygons:
        out |= polygon_to_mask(points, width, height)
    return out


# -- polygons ------------------------------------------------------------------------------------
@pytest.mark.parametrize("width,height", SIZES)
@pytest.mark.parametrize("name", SHAPES)
def test_polygon_round_trip(name, width, height):
    mask = _shape(name, width, height)
    polygons = mask_to_polygons(mask, width, height)
    assert len(polygons) == PARTS.get(name, 1)  # one polygon per part
    for ring in polygons:
        assert 3 <= len(ring) <= 200
        assert all(0 <= x <= 100 and 0 <= y <= 100 for x, y in ring)
    # Holes are not representable, so compare with the hole-filled mask (only "ring" has a hole).
    assert mask_iou(_union(polygons, width, height), _filled(mask)) >= 0.95
    # Without simplification the round trip is pixel-exact: no half-pixel shrink or shift.
    exact = mask_to_polygons(mask, width, height, tolerance=0, max_points=10_000)
    assert np.array_equal(_union(exact, width, height), _filled(mask))


def test_multi_part_largest_first_and_small_parts_dropped():
    mask = _shape("two_blobs", 160, 120)
    mask[2, 150] = True  # a 1-pixel speck, under min_area
    polygons = mask_to_polygons(mask, 160, 120)
    assert len(polygons) == 2
    areas = [polygon_to_mask(p, 160, 120).sum() for p in polygons]
    assert areas[0] > areas[1]
    assert len(mask_to_polygons(mask, 160, 120, min_area=1)) == 3
    assert mask_to_polygons(np.zeros((120, 160), bool), 160, 120) == []


def test_pixel_corner_convention():
    # A run of pixels x = 10..20 on rows 5..6 is the square [10, 21) x [5, 7) in corner coordinates.
    mask = np.zeros((120, 160), bool)
    mask[5:7, 10:21] = True
    (ring,) = mask_to_polygons(mask, 160, 120)
    xs = sorted({round(x / 100 * 160, 2) for x, _ in ring})  # percentages carry 4 decimals
    ys = sorted({round(y / 100 * 120, 2) for _, y in ring})
    assert xs == [10, 21] and ys == [5, 7]
    assert np.array_equal(polygon_to_mask(ring, 160, 120), mask)
    # A single pixel and a 1 px line become proper rings too.
    for m in (np.zeros_like(mask), mask.copy()):
        m[50, 40] = True
        m[60, 30:45] = True
        assert np.array_equal(_union(mask_to_polygons(m, 160, 120, min_area=1), 160, 120), m)


def test_polygon_to_mask_percent_and_clipping():
    mask = polygon_to_mask([[10, 25], [50, 25], [50, 75], [10, 75]], 160, 120)
    expected = np.zeros((120, 160), bool)
    expected[30:90, 16:80] = True
    assert np.array_equal(mask, expected)
    # Reduced working size: rasterised directly at that size.
    assert polygon_to_mask([[10, 25], [50, 25], [50, 75], [10, 75]], 80, 60)[15:45, 8:40].all()
    # Out-of-range points are clipped, non-finite ones ignored.
    full = polygon_to_mask([[-10, -10], [110, -10], [float("nan"), 3], [110, 110], [-10, 110]], 97, 143)
    assert full.all()


@pytest.mark.parametrize("points", [[], [[10, 10], [20, 20]], [[10, 10], [20, 20], [float("inf"), 5]],
                                    [[1, 2, 3], [4, 5, 6], [7, 8, 9]], "abc"])
def test_polygon_with_fewer_than_3_points_raises(points):
    with pytest.raises(ValueError):
        polygon_to_mask(points, 160, 120)


def test_max_points_on_wiggly_shape():
    width, height = 160, 120
    angle = np.linspace(0, 2 * np.pi, 301)[:-1]
    radius = np.where(np.arange(300) % 2 == 0, 55, 45)  # a 300-point star
    pts = np.stack([80 + radius * np.cos(angle), 60 + radius * np.sin(angle)], 1)  # cut by top and bottom
    mask = polygon_to_mask(pts / (width, height) * 100, width, height)
    for max_points in (200, 40, 4):
        polygons = mask_to_polygons(mask, width, height, tolerance=0, max_points=max_points)
        assert len(polygons) == 1
        (ring,) = polygons
        assert 3 <= len(ring) <= max_points
        assert all(0 <= v <= 100 for point in ring for v in point)
    assert mask_iou(polygon_to_mask(mask_to_polygons(mask, width, height, max_points=40)[0], width, height),
                    mask) > 0.85
    with pytest.raises(ValueError):
        mask_to_polygons(mask, width, height, max_points=3)


def test_offset_crop_matches_full_image():
    width, height = 160, 120
    full = _shape("star", width, height) | _shape("two_blobs", width, height)
    x0, y0, x1, y1 = (int(v) for v in mask_box(full))
    x0, y0 = x0 - 3, max(y0 - 2, 0)
    crop = full[y0:y1 + 1, x0:x1 + 4]
    expected = mask_to_polygons(full, width, height)
    got = mask_to_polygons(crop, width, height, offset=(x0, y0))
    assert len(got) == len(expected) >= 1
    for a, b in zip(got, expected):
        assert np.allclose(a, b, atol=1e-3)


# -- brush RLE -----------------------------------------------------------------------------------
@pytest.mark.parametrize("width,height", SIZES)
@pytest.mark.parametrize("name", ["ellipse", "ring", "two_blobs", "border", "thin_band"])
def test_rle_round_trip_is_exact(name, width, height):
    mask = _shape(name, width, height)
    rle = mask_to_rle(mask)
    assert all(isinstance(v, int) and 0 <= v <= 255 for v in rle)
    assert np.array_equal(rle_to_mask(rle, width, height), mask)
    assert mask_iou(rle_to_mask(rle, width, height), mask) == 1.0
    # The SDK's own encoder (what the other Label Studio tools send) decodes the same way.
    sdk_rle = mask2rle(mask.astype(np.uint8) * 255)
    assert np.array_equal(rle_to_mask(sdk_rle, width, height), mask)
    assert np.array_equal(rle_to_mask(mask_to_rle(mask.astype(np.uint8)), width, height), mask)  # 0/1 input


def test_rle_alpha_threshold_counts_antialiased_edges():
    # Editor strokes are anti-aliased: edge pixels carry intermediate alpha. Any alpha > 0 is foreground
    # (as the editor shows it and as Label Studio's COCO export reads it).
    width, height = 20, 10
    alpha = np.zeros((height, width), np.uint8)
    alpha[2:8, 5:15] = 255
    alpha[2:8, 4] = 60
    alpha[2:8, 15] = 1
    rgba = np.repeat(alpha[:, :, None], 4, axis=2)  # editor exports R = G = B = A
    rle = encode_rle(rgba.ravel())
    assert np.array_equal(rle_to_mask(rle, width, height), alpha > 0)
    # A 0/1 mask encoded without * 255 decodes at alpha 1: still foreground.
    assert rle_to_mask(mask2rle((alpha > 0).astype(np.uint8)), width, height).sum() == 6 * 12


def test_rle_of_another_size_raises_naming_sizes():
    rle = mask_to_rle(_shape("ellipse", 160, 120))
    with pytest.raises(ValueError) as info:
        rle_to_mask(rle, 100, 120)
    message = str(info.value)
    assert "100x120" in message and "48000" in message and "76800" in message and "19200 pixels" in message


@pytest.mark.parametrize("rle", ["abc", None, [], [1, 2], [0, 0, 1, 300, 5], [0.5, 1.0, 2.0, 3.0, 4.0],
                                 [[0, 1], [2, 3]], [True, False, True, False, True]])
def test_invalid_rle_raises(rle):
    with pytest.raises(ValueError):
        rle_to_mask(rle, 160, 120)


def test_truncated_rle_raises():
    rle = mask_to_rle(_shape("ellipse", 160, 120))
    with pytest.raises(ValueError, match="decoded"):
        rle_to_mask(rle[: len(rle) // 2], 160, 120)


# -- helpers -------------------------------------------------------------------------------------
def test_mask_iou_and_box():
    a = np.zeros((10, 12), bool)
    b = a.copy()
    assert mask_iou(a, b) == 0.0
    assert mask_box(a) is None
    a[5:10, 3:7] = True
    b[5:10, 5:9] = True
    assert mask_iou(a, b) == pytest.approx(10 / 30)
    assert mask_iou(a, a.astype(np.uint8)) == 1.0
    assert mask_box(a) == (3.0, 5.0, 7.0, 10.0)
    with pytest.raises(ValueError):
        mask_iou(a, a[:5])


def fragmented_object() -> np.ndarray:
    """A predicted object as Mask R-CNN leaves it: a main part, a real second part (a third of its area), and
    specks of 1-12 pixels around it, one touching a corner diagonally (8-connected: part of the main part)."""
    mask = np.zeros((80, 100), dtype=bool)
    mask[10:40, 10:50] = True  # main part: 1200 px
    mask[50:70, 60:80] = True  # second part: 400 px
    mask[5, 5] = mask[45, 20] = True
    mask[2:5, 90:94] = True  # 12 px
    mask[40, 50] = True  # diagonal to the main part's corner pixel (39, 49)
    return mask


def test_drop_specks_keeps_the_main_and_substantial_parts_only():
    mask = fragmented_object()
    kept = drop_specks(mask, 0.1)
    assert kept.dtype == bool and kept.shape == mask.shape
    assert kept[10:40, 10:50].all() and kept[50:70, 60:80].all() and kept[40, 50]
    assert not kept[5, 5] and not kept[45, 20] and not kept[2:5, 90:94].any()
    assert kept.sum() == 1200 + 400 + 1
    assert len(mask_to_polygons(mask, 100, 80)) == 3 and len(mask_to_polygons(kept, 100, 80)) == 2  # 12 px speck gone
    assert drop_specks(mask, 0.5).sum() == 1201  # the second part is a third of the main one
    assert np.array_equal(drop_specks(mask, 0.0), mask)  # 0 keeps every part
    assert not drop_specks(np.zeros((4, 4), bool), 0.1).any()
    single = np.zeros((4, 4), dtype=np.uint8)
    single[1, 1] = 1
    assert np.array_equal(drop_specks(single, 0.1), single.astype(bool))  # one part: always kept
