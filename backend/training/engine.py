"""A plain training loop in the style of torchvision's references/detection, with detectron2-style hooks
(``before_train`` / ``before_step`` / ``after_step`` / ``after_train``) for checkpoints, metrics, progress.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

log = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or inf: the session ends and nothing more is published."""


class Hook:
    def before_train(self, state: "TrainState") -> None: ...
    def before_step(self, state: "TrainState") -> None: ...
    def after_step(self, state: "TrainState") -> None: ...
    def after_train(self, state: "TrainState") -> None: ...


@dataclass
class TrainState:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    total_steps: int
    step: int = 0  # steps done so far
    images_seen: int = 0
    last_losses: dict = field(default_factory=dict)
    loss_sum: dict = field(default_factory=dict)

    def mean_losses(self) -> dict:
        n = max(self.step, 1)
        return {k: v / n for k, v in self.loss_sum.items()}


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, floor: float = 0.01):
    """Linear warm-up, then cosine decay to ``floor`` x the base learning rate."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def sgd(model: torch.nn.Module, lr: float, momentum: float = 0.9, weight_decay: float = 1e-4) -> torch.optim.SGD:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def amp_scaler(device: torch.device, enabled: bool = True) -> torch.amp.GradScaler:
    """The gradient scaler of a mixed-precision session: enabled only on CUDA with AMP on (float16 autocast
    there); on CPU, or with AMP=false, a disabled one, and ``train_step`` runs in plain float32."""
    return torch.amp.GradScaler("cuda", enabled=enabled and torch.device(device).type == "cuda")


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, images: list, targets: list,
               device: torch.device, clip_grad: float = 10.0, scaler: torch.amp.GradScaler | None = None) -> dict:
    """One SGD step on one batch (model in train mode); returns the losses as floats (``loss`` = their sum).
    With an enabled ``scaler`` (``amp_scaler``: CUDA only) the forward runs under float16 autocast and the
    loss is scaled; gradients are unscaled before clipping, and a step with inf/NaN gradients is skipped."""
    images = [image.to(device, non_blocking=True) for image in images]
    targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
    amp = scaler is not None and scaler.is_enabled()
    with torch.autocast(device_type="cuda", dtype=torch.float16, enabled=amp):
        loss_dict = model(images, targets)
    loss_dict = {k: v.float() for k, v in loss_dict.items()}
    loss = sum(loss_dict.values())
    if not torch.isfinite(loss):
        raise NonFiniteLoss(f"loss is {loss.item()} ({ {k: v.item() for k, v in loss_dict.items()} })")
    optimizer.zero_grad(set_to_none=True)
    params = [p for p in model.parameters() if p.requires_grad]
    if amp:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)  # clip the true gradients
        torch.nn.utils.clip_grad_norm_(params, clip_grad)
        scaler.step(optimizer)  # skipped when the scaled gradients overflowed; the scale then shrinks
        scaler.update()
    else:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip_grad)
        optimizer.step()
    return {k: v.item() for k, v in loss_dict.items()} | {"loss": loss.item()}


def train_steps(state: TrainState, batches: Iterator[tuple[list, list]], device: torch.device,
                hooks: list[Hook] = (), clip_grad: float = 10.0,
                scaler: torch.amp.GradScaler | None = None) -> TrainState:
    """Run ``state.total_steps - state.step`` steps, taking one (images, targets) batch per step."""
    model = state.model
    model.train()
    for hook in hooks:
        hook.before_train(state)
    while state.step < state.total_steps:
        images, targets = next(batches)
        for hook in hooks:
            hook.before_step(state)
        try:
            state.last_losses = train_step(model, state.optimizer, images, targets, device, clip_grad, scaler)
        except NonFiniteLoss as exc:
            raise NonFiniteLoss(f"{exc} at step {state.step}") from None
        state.scheduler.step()
        state.step += 1
        state.images_seen += len(images)
        for k, v in state.last_losses.items():
            state.loss_sum[k] = state.loss_sum.get(k, 0.0) + v
        for hook in hooks:
            hook.after_step(state)
    for hook in hooks:
        hook.after_train(state)
    return state


class CallbackHook(Hook):
    """Call ``fn(state)`` after every ``every`` steps (progress reports, periodic checkpoints)."""

    def __init__(self, fn: Callable[[TrainState], None], every: int = 1):
        self.fn, self.every = fn, max(1, every)

    def after_step(self, state: TrainState) -> None:
        if state.step % self.every == 0 or state.step == state.total_steps:
            self.fn(state)
