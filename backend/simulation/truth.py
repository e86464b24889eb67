"""The simulator's ground truth and yardstick: a COCO image's objects as the Label Studio results a person
submits (rectangles, polygons, brush RLEs), and the model quality score of a pre-label against them (box IoU,
or mask IoU for the mask kinds). See ``backend.simulation.session`` for the kinds."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image

from backend.labelstudio.annotations import box_to_pixels
from backend.labelstudio.convert import box_to_region, mask_to_regions, region_id
from backend.labelstudio.label_config import parse_label_config
from backend.labelstudio.masks import polygon_to_mask, rle_to_mask
from backend.metrics.quality import MaskCrop, Quality, mask_iou, quality
from backend.training.coco import CocoImage, ring_to_percent

KINDS = {"boxes": "RectangleLabels", "polygons": "PolygonLabels", "brush": "BrushLabels"}  # --kind -> control tag
MASK_KINDS = ("polygons", "brush")  # the kinds a Mask R-CNN learns
MASK_MAX_SIDE = 1024  # mask kinds: masks are compared at the image size, scaled down to at most this


def label_config(classes: list[str], kind: str = "boxes") -> str:
    tag = KINDS[kind]
    labels = "\n".join(f'    <Label value="{c}"/>' for c in classes)
    return (f'<View>\n  <Image name="image" value="$image"/>\n  <{tag} name="label" toName="image">\n'
            f'{labels}\n  </{tag}>\n</View>')


@lru_cache(maxsize=8)
def _control(classes: tuple[str, ...], kind: str = "boxes"):
    return parse_label_config(label_config(list(classes), kind)).primary


def ground_truth_result(image: CocoImage, classes: list[str], kind: str = "boxes") -> list[dict]:
    """The image's objects as Label Studio results (percent of the image), as a person draws them:
    rectangles, for ``kind="polygons"`` one closed polygon per ring of each object's segmentation, for
    ``kind="brush"`` one brush RLE per object."""
    control = _control(tuple(classes), kind)
    if kind == "polygons":
        return _polygon_results(image, classes, control)
    if kind == "brush":
        return _brush_results(image, classes, control)
    out = []
    for box, label in zip(image.boxes, image.labels):
        region = box_to_region(box, classes[label - 1], 1.0, image.width, image.height, control)
        if region:
            region.pop("score")  # an annotation, not a prediction
            out.append(region)
    return out


def _polygon_results(image: CocoImage, classes: list[str], control) -> list[dict]:
    out = []
    for rings, label in zip(image.polygons, image.labels):
        for ring in rings:
            points = [[round(x, 4), round(y, 4)] for x, y in ring_to_percent(ring, image.width, image.height)]
            xs, ys = [x for x, _ in points], [y for _, y in points]
            if max(xs) <= min(xs) or max(ys) <= min(ys):
                continue  # no area: nobody draws that (and livetrain would drop it)
            out.append({"id": region_id(), "from_name": control.from_name, "to_name": control.to_name,
                        "type": "polygonlabels", "original_width": int(image.width),
                        "original_height": int(image.height), "image_rotation": 0,
                        "value": {"points": points, "closed": True, "polygonlabels": [classes[label - 1]]}})
    return out


def _brush_results(image: CocoImage, classes: list[str], control) -> list[dict]:
    """One full-frame RLE per object with a polygon, as /predict writes brush regions, without a score."""
    out = []
    for i, label in enumerate(image.labels):
        if i < len(image.polygons) and image.polygons[i]:  # a mask covering no pixel centre yields no region
            out += mask_to_regions(image.mask(i), (0, 0), classes[label - 1], None, image.width, image.height, control)
    return out


def mask_size(width: int, height: int) -> tuple[int, int]:
    """The size masks are compared at: the image's, scaled down so that its longer side is MASK_MAX_SIDE at most."""
    scale = min(1.0, MASK_MAX_SIDE / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def truth_masks(image: CocoImage, classes: list[str]) -> list[tuple]:
    """(MaskCrop, label) of each object with a polygon (all its rings together), at ``mask_size``; objects
    whose polygons cover no pixel centre are left out (nothing could ever match them)."""
    w, h = mask_size(image.width, image.height)
    out = []
    for i, label in enumerate(image.labels):
        if i < len(image.polygons) and image.polygons[i]:
            crop = MaskCrop.from_full(image.mask(i, w, h))
            if crop.area:
                out.append((crop, classes[label - 1]))
    return out


def predicted_masks(result: list[dict], width: int, height: int) -> list[tuple]:
    """(MaskCrop at ``mask_size``, label, score) for each polygon or brush region of a Label Studio prediction
    result: each result is one region (the parts of a multi-part prediction count separately, as a person
    edits them)."""
    w, h = mask_size(width, height)
    out = []
    for region in result or []:
        value = region.get("value") or {}
        labels = value.get("polygonlabels") or value.get("brushlabels") or []
        if not labels:
            continue
        try:
            if "polygonlabels" in value:
                crop = MaskCrop.from_full(polygon_to_mask(value.get("points"), w, h))
            else:  # an RLE of the image's size, compared at mask_size
                mask = rle_to_mask(value.get("rle"), width, height)
                if (w, h) != (width, height):
                    mask = np.asarray(Image.fromarray(mask).resize((w, h), Image.NEAREST))
                crop = MaskCrop.from_full(mask)
        except ValueError:  # fewer than 3 usable points, or an RLE of another size: not a shape
            continue
        out.append((crop, labels[0], float(region.get("score", 0.0) or 0.0)))
    return out


def score_prediction(result: list[dict], image: CocoImage, classes: list[str], kind: str = "boxes") -> Quality:
    """The model quality score of a pre-label against the image's ground truth: box IoU, or mask IoU for
    the mask kinds."""
    if kind in MASK_KINDS:
        return quality(predicted_masks(result, image.width, image.height), truth_masks(image, classes),
                       overlap=mask_iou)
    truth = [(tuple(b), classes[label - 1]) for b, label in zip(image.boxes, image.labels)]
    return quality(predicted_boxes(result, image.width, image.height), truth)


def predicted_boxes(result: list[dict], width: int, height: int) -> list[tuple]:
    """(box in pixels, label, score) for each rectangle of a Label Studio prediction result."""
    out = []
    for region in result or []:
        value = region.get("value") or {}
        labels = value.get("rectanglelabels") or []
        if not labels:
            continue
        box = box_to_pixels((value["x"], value["y"], value["width"], value["height"]), width, height)
        out.append((box, labels[0], float(region.get("score", 0.0) or 0.0)))
    return out
