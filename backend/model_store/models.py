"""Build the detector a project trains or serves: from its newest version, or from the starting weights."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor

from backend.model_store.architectures import build_detector, fresh_mask_predictor, task_of
from backend.model_store.layers import freeze_batchnorm
from backend.model_store.weights import StartingWeights, load_detector_state


def pick_device(setting: str) -> torch.device:
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def for_inference(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in eval mode on ``device``, as /predict, re-scoring and a session's served copy run it. On a CPU
    its weights move to the channels-last memory layout (same values): oneDNN's convolutions skip a layout
    conversion per layer, 0.87-0.98x the forward time (scripts/bench_arch.py, bench_predict.py)."""
    model = model.to(device).eval()
    if device.type == "cpu":
        model.to(memory_format=torch.channels_last)
    return model


def size_kwargs(min_size: int) -> dict:
    """Detector input size; 0 keeps the architecture's own default."""
    return {"min_size": min_size, "max_size": 2 * min_size} if min_size else {}


def model_from_version(state: dict, meta: dict, min_size: int = 0) -> nn.Module:
    model = build_detector(meta["arch"], len(meta["classes"]) + 1, **size_kwargs(min_size))
    load_detector_state(model, state)
    freeze_batchnorm(model.backbone.body)  # as it was trained: BatchNorm statistics stay fixed
    return model


def version_task(meta: dict) -> str:
    """``boxes`` or ``masks``: what a published version predicts (from its architecture)."""
    return meta.get("task") or task_of(meta["arch"])


def extend_classes(model: nn.Module, old: int, new: int) -> None:
    """Grow the box (and mask) predictor from ``old`` to ``new`` classes (incl. background), keeping what it
    learned: rows of known classes are copied, rows of new classes start fresh."""
    if new == old:
        return
    predictor = model.roi_heads.box_predictor
    grown = FastRCNNPredictor(predictor.cls_score.in_features, new)
    with torch.no_grad():
        grown.cls_score.weight[:old] = predictor.cls_score.weight
        grown.cls_score.bias[:old] = predictor.cls_score.bias
        grown.bbox_pred.weight[: 4 * old] = predictor.bbox_pred.weight
        grown.bbox_pred.bias[: 4 * old] = predictor.bbox_pred.bias
    model.roi_heads.box_predictor = grown.to(predictor.cls_score.weight.device)
    masks = getattr(model.roi_heads, "mask_predictor", None)
    if masks is not None:
        grown = fresh_mask_predictor(masks, new)
        with torch.no_grad():
            grown.conv5_mask.load_state_dict(masks.conv5_mask.state_dict())
            grown.mask_fcn_logits.weight[:old] = masks.mask_fcn_logits.weight
            grown.mask_fcn_logits.bias[:old] = masks.mask_fcn_logits.bias
        model.roi_heads.mask_predictor = grown.to(masks.mask_fcn_logits.weight.device)


def model_for_round(starting: StartingWeights, parent: tuple[dict, dict] | None, classes: tuple[str, ...],
                    min_size: int = 0) -> nn.Module:
    """The model a session starts from: the parent version (its head grown to ``classes``), else the
    starting weights with a new head. ``classes`` must begin with the parent's classes, in order."""
    if parent is None:
        return starting.build(len(classes) + 1, **size_kwargs(min_size))
    state, meta = parent
    model = model_from_version(state, meta, min_size)
    extend_classes(model, len(meta["classes"]) + 1, len(classes) + 1)
    return model
