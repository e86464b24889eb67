"""What a training step updates: the heads only (backbone body frozen) or the full model."""

from __future__ import annotations

import torch

from backend.settings import Settings


def choose_mode(settings: Settings, images: int) -> str:
    if settings.train_mode != "auto":
        return settings.train_mode
    return "full" if images >= settings.full_after else "heads"


def apply_mode(model: torch.nn.Module, mode: str, trainable: set[str]) -> None:
    """``heads``: the backbone body is frozen; FPN, RPN and RoI heads train. ``full``: the body trains too,
    except the layers its architecture keeps frozen (BatchNorm always; Lite0's stem and first stages).
    ``trainable`` names the body parameters the architecture lets train (``body_trainable``)."""
    for name, param in model.backbone.body.named_parameters():
        param.requires_grad_(mode == "full" and name in trainable)


def body_trainable(model: torch.nn.Module) -> set[str]:
    """The body parameters the freshly built architecture trains (call before ``apply_mode``)."""
    return {name for name, param in model.backbone.body.named_parameters() if param.requires_grad}


def working_limit(model: torch.nn.Module) -> tuple[int, int]:
    """The largest (shorter, longer) image side ``model`` uses, over all its training scales."""
    return max(model.transform.min_size), model.transform.max_size


def set_rois_per_image(model: torch.nn.Module, rois: int) -> None:
    """RoIs sampled per image for the RoI heads' losses (training only; 0 keeps the architecture's). Not saved in a
    version's weights: each session sets it."""
    if rois:
        model.roi_heads.fg_bg_sampler.batch_size_per_image = rois
