"""The live model quality score of one newly labeled image: how good the pre-label was that the version
active when the image arrived would have given, scored before the model trains on it (prequential, so
the number is honest: the model never saw the image)."""

from __future__ import annotations

import torch

from backend.labelstudio.annotations import LabeledImage
from backend.labelstudio.images import ImageFetcher
from backend.labelstudio.masks import drop_specks
from backend.metrics.quality import MaskCrop, Quality, iou, mask_iou, quality
from backend.model_store.detect import forward, paste_in_box, serving_limit
from backend.training.data import load_example


def score_image(model: torch.nn.Module | None, model_classes: tuple[str, ...], record: LabeledImage,
                fetcher: ImageFetcher, threshold: float, device: torch.device, task: str = "boxes",
                all_classes: tuple[str, ...] = (), limit: tuple[int, int] | None = None,
                min_part: float = 0.0) -> Quality:
    """Quality of ``model``'s pre-label (regions at or above ``threshold``) against the record's annotation.
    ``model`` None scores the empty pre-label of a project with no version yet. ``all_classes`` (a superset
    of ``model_classes``, the head's classes) must name every label the record uses. Mask projects compare
    masks (mask IoU), each predicted mask without its specks as /predict serves it (``min_part``: MASK_MIN_PART).
    Raises LivetrainError when the image cannot be loaded."""
    names = all_classes or model_classes
    if model is not None:
        limit = serving_limit(model)
    image, target = load_example(record, fetcher, names, task, limit)
    annotated_names = [names[label - 1] for label in target["labels"].tolist()]
    if task == "masks":
        annotated = [(MaskCrop.from_full(m.numpy().astype(bool)), n) for m, n in zip(target["masks"], annotated_names)]
    else:
        annotated = list(zip(target["boxes"].tolist(), annotated_names))
    if model is None:
        return quality([], annotated, overlap=mask_iou if task == "masks" else iou)
    model.eval()
    with torch.inference_mode():
        out = forward(model, [image.to(device)])[0]
    labels, scores = out["labels"].tolist(), out["scores"].tolist()
    keep = [i for i, s in enumerate(scores) if s >= threshold]
    if task == "masks" and "masks" in out:
        height, width = image.shape[-2:]
        predicted = []
        for i in keep:
            crop, (x0, y0) = paste_in_box(out["masks"][i], out["boxes"][i], width, height)
            crop = drop_specks(crop, min_part) if crop.size else crop
            predicted.append((MaskCrop(crop, x0, y0), model_classes[labels[i] - 1], scores[i]))
        return quality(predicted, annotated, overlap=mask_iou)
    boxes = out["boxes"].tolist()
    predicted = [(boxes[i], model_classes[labels[i] - 1], scores[i]) for i in keep]
    return quality(predicted, annotated, overlap=iou)
