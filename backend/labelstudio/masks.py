"""Conversions between Label Studio mask shapes (polygons, brush RLE) and numpy bool masks.

Formats (Label Studio 1.23, see the SEGMENTATION notes in the shared folder):

* ``polygonlabels``: ``value.points = [[x%, y%], ...]``, percent (0-100) of the image's natural width and
  height, one closed ring. No holes and no multi-part regions: a multi-part object is sent as one result
  per part.
* ``brushlabels``: ``value.rle`` is a list of bytes (0-255), the ``@thi.ng/rle-pack`` encoding of an RGBA
  buffer of the image's natural size (row-major, 4 bytes per pixel). The editor marks a pixel when its
  alpha byte is non-zero. We use label-studio-sdk's codec (``converter.brush``) rather than our own, so we
  stay byte-compatible with the editor; importing it pulls in the whole converter package (~0.4 s), hence
  the lazy, cached import.

Coordinates follow the pixel-corner convention: pixel (i, j) covers the square [i, i+1) x [j, j+1), so a
polygon at x% maps to x% / 100 * width, and a pixel belongs to a polygon when its centre (i+0.5, j+0.5) is
inside. cv2/PIL polygon fills round vertices and include boundary pixels (a half-pixel dilation), so
``polygon_to_mask`` rasterises with its own exact scanline fill. ``mask_to_polygons`` pushes the contour
(which runs through boundary pixel centres) outwards by half a pixel, so mask -> polygons -> mask gives the
same pixels back instead of a mask shrunk or shifted by half a pixel.
"""

from __future__ import annotations

import functools
import math

import cv2
import numpy as np

# Brush strokes drawn in the editor are anti-aliased canvas paths: edge pixels carry an intermediate alpha.
# Any non-zero alpha counts as foreground, as in the editor (it shows every such pixel) and in Label Studio's
# own COCO export (findContours on the alpha channel), so our training masks match what LS exports.
ALPHA_THRESHOLD = 0
# A brush RLE decodes into a full W*H*4 buffer; its header can declare up to 2**32 values (a 4 GB buffer) and
# original_width/height come from the annotation. Refuse masks larger than any image livetrain would decode
# (MAX_IMAGE_PIXELS defaults to 40 million) before allocating.
MAX_MASK_PIXELS = 100_000_000


@functools.cache
def _brush():
    from label_studio_sdk.converter import brush

    return brush


def polygon_to_mask(points, width: int, height: int) -> np.ndarray:
    """Label Studio polygon points ``[[x%, y%], ...]`` -> bool mask ``(height, width)``, filled.

    ``width``/``height`` may be a reduced working size: the polygon is rasterised directly at that size.
    Non-finite points are ignored, coordinates are clipped to 0..100; fewer than 3 valid points -> ValueError.
    Self-intersecting polygons use the non-zero winding rule, like the editor's canvas fill.
    """
    width, height = _size(width, height)
    try:
        pts = np.asarray(points, dtype=float)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"polygon points must be [[x, y], ...] numbers: {exc}") from None
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(f"polygon points must be [[x, y], ...], got an array of shape {pts.shape}")
    pts = pts[np.isfinite(pts).all(axis=1)]
    if len(pts) < 3:
        raise ValueError(f"a polygon needs at least 3 valid points, got {len(pts)}")
    pts = np.clip(pts, 0.0, 100.0) / 100.0 * (width, height)
    return _fill(pts, width, height)


def rle_to_mask(rle, width: int, height: int) -> np.ndarray:
    """Label Studio brush RLE (list of ints 0-255) -> bool mask ``(height, width)``: alpha > ALPHA_THRESHOLD.

    ``width``/``height`` must be the image's natural size (an RLE always encodes the full frame).
    ValueError when the RLE is not a non-empty list of ints in 0..255, cannot be decoded, or encodes an
    image of another size.
    """
    width, height = _size(width, height)
    if width * height > MAX_MASK_PIXELS:
        raise ValueError(f"a brush mask of {width}x{height} is over {MAX_MASK_PIXELS} pixels")
    try:
        data = np.asarray(rle) if isinstance(rle, (list, tuple, np.ndarray)) else None
    except (ValueError, TypeError):  # ragged: [1, [2, 3]]
        data = None
    if data is None or data.ndim != 1 or data.size < 4 or data.dtype.kind not in "iu":
        raise ValueError("brush RLE must be a list of ints in 0..255 (value.rle with value.format 'rle')")
    if data.min() < 0 or data.max() > 255:
        raise ValueError(f"brush RLE values must be in 0..255, got {data.min()}..{data.max()}")
    expected = width * height * 4
    # The first 32 bits hold the number of values; check it before decoding so that a foreign or corrupt
    # stream never makes the decoder allocate a huge buffer.
    declared = int.from_bytes(bytes(data[:4].tolist()), "big")
    if declared != expected:
        raise ValueError(_size_message(declared, width, height))
    try:
        flat = _brush().decode_rle(data.tolist())
    except (ValueError, IndexError) as exc:
        raise ValueError(f"brush RLE cannot be decoded ({exc}); is it truncated?") from None
    except OverflowError:  # the header asks for values wider than a byte
        raise ValueError("brush RLE cannot be decoded: it holds values over 255 (a word size over 8 bits)") from None
    if flat.size != expected:
        raise ValueError(_size_message(flat.size, width, height))
    return flat.reshape(height, width, 4)[:, :, 3] > ALPHA_THRESHOLD


def mask_to_rle(mask: np.ndarray) -> list[int]:
    """bool/0-1 ``(H, W)`` mask at the image's natural size -> Label Studio RLE with alpha 0/255.

    255, not 1: the editor draws each pixel with the decoded alpha, so a 0/1 mask would be invisible.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (height, width), got shape {mask.shape}")
    rle = _brush().mask2rle((mask > 0).astype(np.uint8) * 255)
    return [int(v) for v in rle]


def mask_to_polygons(mask: np.ndarray, width: int, height: int, offset=(0, 0), tolerance: float = 1.5,
                     max_points: int = 200, min_area: float = 4.0) -> list[list[list[float]]]:
    """Outer contours of a bool mask -> Label Studio polygons, in percent of a ``width`` x ``height`` image.

    ``mask`` may be a crop of the full image whose top-left pixel is at ``offset`` = (x0, y0) full-image pixels.
    One polygon per connected part (8-connectivity), largest first; parts under ``min_area`` pixels and rings
    under 3 points are dropped. Contours are simplified with ``cv2.approxPolyDP(tolerance)`` (pixels); the
    tolerance shrinks for parts it would distort (thin ones) and grows until a ring has at most
    ``max_points`` points (>= 4). Holes are not represented (a Label Studio polygon is one ring): a ring
    comes back as its filled outline. With ``tolerance=0`` the round trip through polygon_to_mask is exact.
    """
    width, height = _size(width, height)
    if max_points < 4:
        raise ValueError(f"max_points must be at least 4, got {max_points}")
    binary = (np.asarray(mask) > 0).astype(np.uint8)
    if binary.ndim != 2:
        raise ValueError(f"mask must be 2-D (height, width), got shape {binary.shape}")
    contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return []
    _, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    parts = []
    for contour in contours:
        x, y = contour[0, 0]
        area = int(stats[labels[y, x], cv2.CC_STAT_AREA])
        if area >= min_area:
            parts.append((area, contour))
    parts.sort(key=lambda part: -part[0])

    polygons = []
    scale = np.array([100.0 / width, 100.0 / height])
    for _, contour in parts:
        ring = _simplify(contour, float(tolerance), max_points)
        ring = (ring + 0.5 + np.asarray(offset, dtype=float)) * scale  # pixel centres -> corners -> percent
        ring = np.round(np.clip(ring, 0.0, 100.0), 4)
        keep = np.any(ring != np.roll(ring, 1, axis=0), axis=1)  # drop repeats made by rounding/clipping
        ring = ring[keep] if keep.any() else ring[:1]
        if len(ring) >= 3:
            polygons.append(ring.tolist())
    return polygons


def drop_specks(mask: np.ndarray, min_part: float) -> np.ndarray:
    """``mask`` (bool) with only the parts a person would draw: its largest connected part (8-connectivity) and
    every other part of at least ``min_part`` times the largest one's area. A predicted mask often leaves a few
    pixels here and there around the object; each would otherwise become a region of its own (a polygon per
    part) that the annotator has to delete. ``min_part`` 0 keeps every part."""
    binary = (np.asarray(mask) > 0).astype(np.uint8)
    if min_part <= 0 or not binary.any():
        return binary.astype(bool)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    if count <= 2:  # background + one part: nothing to drop
        return binary.astype(bool)
    areas = stats[1:, cv2.CC_STAT_AREA]
    keep = np.concatenate([[False], areas >= min_part * areas.max()])
    return keep[labels]


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two bool masks of equal shape (0.0 when both are empty)."""
    a, b = np.asarray(a) != 0, np.asarray(b) != 0
    if a.shape != b.shape:
        raise ValueError(f"masks differ in shape: {a.shape} vs {b.shape}")
    union = np.count_nonzero(a | b)
    return float(np.count_nonzero(a & b) / union) if union else 0.0


def mask_box(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    """Tight pixel box (x1, y1, x2, y2) of a bool mask, x2/y2 exclusive (last column + 1); None if empty."""
    mask = np.asarray(mask) != 0
    cols = np.flatnonzero(mask.any(axis=0))
    if cols.size == 0:
        return None
    rows = np.flatnonzero(mask.any(axis=1))
    return float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)


def _fill(pts: np.ndarray, width: int, height: int) -> np.ndarray:
    """Exact scanline fill of a ring in pixel-corner coordinates: a pixel is set when its centre is inside."""
    # Scanline fill: every edge crosses the rows whose centre line y = row + 0.5 lies in [min(y0,y1), max(y0,y1))
    # (half-open, so a vertex on a row centre counts once); each crossing carries the edge's direction.
    x0, y0 = pts[:, 0], pts[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    first = np.ceil(np.minimum(y0, y1) - 0.5).astype(np.int64)
    stop = np.ceil(np.maximum(y0, y1) - 0.5).astype(np.int64)
    counts = np.maximum(stop - first, 0)
    mask = np.zeros((height, width), dtype=bool)
    if counts.sum() == 0:
        return mask
    edge = np.repeat(np.arange(len(pts)), counts)
    rows = first[edge] + np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    t = (rows + 0.5 - y0[edge]) / (y1[edge] - y0[edge])
    xs = x0[edge] + t * (x1[edge] - x0[edge])
    keep = (rows >= 0) & (rows < height)  # whole rows only, so each row's winding still sums to zero
    rows, xs, edge = rows[keep], xs[keep], edge[keep]
    winding = np.where(y1[edge] > y0[edge], 1, -1)
    order = np.lexsort((xs, rows))
    rows, xs, winding = rows[order], xs[order], np.cumsum(winding[order])
    # Inside between crossing k and k+1 of the same row when the running winding number is non-zero
    # (each row's crossings sum to zero, so a global cumulative sum is the per-row winding).
    inside = (winding[:-1] != 0) & (rows[:-1] == rows[1:])
    cols = np.clip(np.ceil(xs - 0.5), 0, width).astype(np.int64)  # first pixel whose centre is >= x
    for row, start, end in zip(rows[:-1][inside].tolist(), cols[:-1][inside].tolist(), cols[1:][inside].tolist()):
        mask[row, start:end] = True
    return mask


def _simplify(contour: np.ndarray, tolerance: float, max_points: int) -> np.ndarray:
    """approxPolyDP + half-pixel outset of one outer contour; returns the ring in pixel-centre coordinates.

    A fixed tolerance wrecks thin parts (a 3 px wide band collapses to a 1 px sliver at 1.5 px), so the
    tolerance is halved (down to the exact contour) while the ring's IoU with the filled part is below 0.97.
    Then, if the ring has too many points, the tolerance grows until it fits: max_points wins, since huge
    polygons make the editor unresponsive.
    """
    pad = int(math.ceil(tolerance)) + 2
    x0, y0, w, h = cv2.boundingRect(contour)
    origin = np.array([x0 - pad, y0 - pad])
    part = np.zeros((h + 2 * pad, w + 2 * pad), dtype=np.uint8)
    cv2.drawContours(part, [contour - origin.astype(np.int32)], -1, 1, thickness=-1)  # filled, holes too
    part = part.astype(bool)

    def ring_for(tol: float) -> np.ndarray:
        simple = cv2.approxPolyDP(contour, tol, True) if tol > 0 else contour
        return _outset(simple.reshape(-1, 2).astype(float))

    def covers(ring: np.ndarray) -> bool:
        return len(ring) < 3 or mask_iou(_fill(ring + 0.5 - origin, part.shape[1], part.shape[0]), part) >= 0.97

    tol = tolerance
    ring = ring_for(tol)
    while tol > 0 and not covers(ring):
        tol = tol / 2 if tol > 0.2 else 0.0
        ring = ring_for(tol)
    for _ in range(100):
        if len(ring) <= max_points:
            break
        tol = max(tol * 1.25, 0.2)
        ring = ring_for(tol)
    return ring


def _size(width, height) -> tuple[int, int]:
    try:
        usable = int(width) == width and int(height) == height and width > 0 and height > 0
    except (TypeError, ValueError, OverflowError):  # None, "12", inf, nan
        usable = False
    if not usable:
        raise ValueError(f"image size must be positive integers, got {width!r}x{height!r}")
    return int(width), int(height)


def _size_message(values: int, width: int, height: int) -> str:
    got = f"{values // 4} pixels" if values % 4 == 0 else "not whole RGBA pixels"
    return (f"brush RLE holds {values} values ({got}) but a {width}x{height} image needs "
            f"{width * height * 4} (width*height*4); the RLE belongs to an image of another size")


def _outset(points: np.ndarray) -> np.ndarray:
    """Push a closed contour through boundary pixel centres out by half a pixel, onto the pixel edges.

    Straight and gently turning vertices move along the miter; sharp outward turns (> 90 degrees, such as the
    tip of a one-pixel-wide line) get a square cap of two points, which also turns a 1- or 2-point contour
    (a single pixel, a straight line) into a proper ring.
    """
    keep = np.any(points != np.roll(points, 1, axis=0), axis=1)
    points = points[keep] if keep.any() else points[:1]
    if len(points) == 1:
        return points + np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]])
    x, y = points[:, 0], points[:, 1]
    orient = 1.0 if float(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y)) >= 0 else -1.0
    step = np.roll(points, -1, axis=0) - points  # edge i runs from point i to point i+1
    step /= np.linalg.norm(step, axis=1, keepdims=True)
    normal = orient * np.stack([step[:, 1], -step[:, 0]], axis=1)  # outward, for either orientation
    out = []
    for i, p in enumerate(points):
        d_in, d_out, n_in, n_out = step[i - 1], step[i], normal[i - 1], normal[i]
        cross = d_in[0] * d_out[1] - d_in[1] * d_out[0]
        cos = float(n_in @ n_out)
        convex = cross * orient > 1e-9 or (abs(cross) <= 1e-9 and cos < 0)
        if convex and cos < 0:
            out.append(p + 0.5 * (n_in + d_in))
            out.append(p + 0.5 * (n_out - d_out))
        else:
            miter = n_in + n_out
            norm = float(np.linalg.norm(miter))
            length = min(0.5 * math.sqrt(2.0 / max(1.0 + cos, 1e-9)), 1.0)
            out.append(p + (miter / norm * length if norm > 1e-9 else 0.5 * n_in))
    ring = np.array(out)
    return ring[np.any(np.abs(ring - np.roll(ring, 1, axis=0)) > 1e-9, axis=1)]
