"""An exponential moving average (Polyak average) of a session's weights: what versions publish.

A session trains at a constant learning rate for as long as annotations arrive (``training.session``), so
the raw weights jitter from step to step and the boxes of any one snapshot are looser than those of a model
whose rate was decayed. Averaging the recent steps' weights removes most of that noise for free, the way
the rounds' short cosine decays did, but the session keeps its full rate for what comes next. The average
is ramped in: at the n-th update since a reset its decay is ``min(decay, (1 + n) / (10 + n))``, so a young
average follows the model closely (the first versions, after 3 images, are not held back by the starting
weights) and a settled one averages over about ``1 / (1 - decay)`` steps.

Only floating-point tensors are averaged; the rest (counters, frozen BatchNorm statistics stay equal
anyway) are copied.
"""

from __future__ import annotations

import copy

import torch


class ModelEma:
    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for param in self.module.parameters():
            param.requires_grad_(False)
        self.updates = 0

    def _pairs(self, model: torch.nn.Module) -> tuple[list, list, list, list]:
        ours, theirs = self.module.state_dict(), model.state_dict()
        floats = [k for k, v in ours.items() if v.is_floating_point()]
        others = [k for k, v in ours.items() if not v.is_floating_point()]
        return ([ours[k] for k in floats], [theirs[k].detach() for k in floats],
                [ours[k] for k in others], [theirs[k] for k in others])

    def current_decay(self) -> float:
        return min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """After an optimizer step: move the average towards ``model``'s weights."""
        decay = self.current_decay()
        ours, theirs, our_others, their_others = self._pairs(model)
        torch._foreach_lerp_(ours, theirs, 1.0 - decay)
        for mine, other in zip(our_others, their_others):
            mine.copy_(other)
        self.updates += 1

    @torch.no_grad()
    def reset(self, model: torch.nn.Module) -> None:
        """Start the average afresh at ``model``'s weights (a version was reloaded: the old average is stale)."""
        self.module.load_state_dict(model.state_dict())
        self.updates = 0

    def state_dict(self) -> dict:
        """For a checkpoint: the averaged weights and how many updates made them."""
        return {"model": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, saved: dict) -> None:
        self.module.load_state_dict(saved["model"])
        self.updates = int(saved["updates"])
