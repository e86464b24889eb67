"""Which images the next batch of a training session holds.

An image that is new or changed (a fresh annotation or a correction) goes to the front: it is in the very
next batch, so the next version has learned from it. Then replay: shuffled passes over every image, like
epochs, so earlier images and classes are not forgotten, with ``new_fraction`` of the draws spent on
images that have had fewer than ``min_passes`` passes yet (recent ones), so they are learned quickly.
"""

from __future__ import annotations

import random

from backend.labelstudio.annotations import LabeledImage


class LiveSampler:
    def __init__(self, new_fraction: float, min_passes: int, seed: int = 0):
        self.new_fraction, self.min_passes = new_fraction, min_passes
        self.rng = random.Random(seed)
        self.records: dict[int, LabeledImage] = {}
        self.passes: dict[int, int] = {}  # draws since the image's current annotation entered (or the mode changed)
        self.fresh: list[int] = []  # drawn before anything else
        self._epoch: list[int] = []

    def update(self, records: dict[int, LabeledImage]) -> list[int]:
        """Take the training set as it is now; returns the task ids that are new or changed."""
        changed = [t for t, r in records.items() if t not in self.records or self.records[t].updated_at != r.updated_at]
        self.records = dict(records)
        for task_id in list(self.passes):
            if task_id not in records:
                del self.passes[task_id]
        self.fresh = [t for t in self.fresh if t in records and t not in changed] + changed
        for task_id in changed:
            self.passes[task_id] = 0
        return changed

    def drop(self, task_id: int) -> None:
        """Leave an image out (it failed to load) until its annotation changes."""
        self.records.pop(task_id, None)
        self.passes.pop(task_id, None)
        self.fresh = [t for t in self.fresh if t != task_id]

    def reset_passes(self) -> None:
        """Count passes afresh (the backbone joined training: full-model passes are what count now)."""
        self.passes = dict.fromkeys(self.records, 0)

    def settled(self) -> bool:
        """Every image has had ``min_passes`` passes."""
        return all(n >= self.min_passes for n in self.passes.values())

    def draw(self, size: int) -> list[int]:
        """Task ids for one batch (distinct unless there are fewer images than ``size``)."""
        if not self.records:
            return []
        size = min(size, len(self.records))
        batch: list[int] = []
        while len(batch) < size:
            task_id = self._next(batch)
            if task_id not in batch:
                batch.append(task_id)
        for task_id in batch:
            self.passes[task_id] = self.passes.get(task_id, 0) + 1
        return batch

    def _next(self, taken: list[int]) -> int:
        while self.fresh:
            task_id = self.fresh.pop(0)
            if task_id in self.records and task_id not in taken:
                return task_id
        if self.rng.random() < self.new_fraction:
            recent = [t for t, n in self.passes.items() if n < self.min_passes and t not in taken]
            if recent:
                return self.rng.choice(recent)
        for _ in range(2):
            while self._epoch:
                task_id = self._epoch.pop()
                if task_id in self.records and task_id not in taken:
                    return task_id
            self._epoch = list(self.records)
            self.rng.shuffle(self._epoch)
        return self.rng.choice(list(self.records))
