"""The version guard (GUARD, GUARD_MARGIN): a new version becomes active only if it is not worse than the
active one by more than GUARD_MARGIN. Every version is written; one that fails is kept but not activated,
marked ``held_back`` in its meta (reason, signal, value, active_value), and the session trains on from the
active version's weights (reloaded into its model, fresh optimizer and warm-up, the sampler kept; the
images only the held-back weights had learned count as untrained again).

**Signal 1: the validation split** (VALIDATION_FRACTION > 0, once it holds VALIDATION_MIN_IMAGES scored
images: ``training.validation``; a smaller split's mAP is recorded but the live signal decides).
At publish the candidate's validation mAP (segm mAP for mask projects, else box mAP) is compared with
the active version's on the *same* images: the active's meta is reused when it was scored on a split with
the same digest, else the served (active) model is scored on the current split (in memory, once per split).

**Signal 2: live quality, paired** (no usable split). A version has not trained on the images annotated
after it was published, so they test it honestly; but each version serves only the few images that arrive
in its ~10 s, and different images differ in difficulty. So the guard keeps a *baseline*: the last version
it confirmed (at a session start, the active version, or the baseline the active's meta names while it
is on probation; in a project's first session, its first version). Versions published after it are activated *provisionally*. Every new image is scored
before training by the served version (the live quality score) and also by the baseline, neither having
seen it: a pair. Once LIVE_WINDOW pairs are in, the next publish decides: if the served versions' mean is
below the baseline's by more than GUARD_MARGIN, the candidate is held back, ACTIVE reverts to the
baseline, the reverted version is marked ``held_back`` too ("reverted") and training continues from the
baseline's weights; otherwise the candidate is accepted, the version measured becomes the baseline and a
new window starts. The pairs live in the active version's meta (``guard.live``), so a new session goes on
with the window. Until a window is full a provisional version is served; the guard cannot know better.

Meta of every version: ``guard`` = {"signal": "validation" | "live" | "none", "verdict": "accepted" |
"provisional" | "held_back", "metric", "value", "active", "active_value", "margin", ...}; with GUARD off
{"enabled": false}.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from backend.labelstudio.annotations import LabeledImage
from backend.model_store.models import model_for_round, model_from_version, version_task
from backend.training.engine import sgd
from backend.training.scoring import score_image
from backend.training.validation import headline

log = logging.getLogger(__name__)

# Paired new images (served version vs baseline) before the live signal decides. One image's score varies by
# ~0.1 between versions of equal skill; the mean of 10 pairs by ~0.03, so a revert at GUARD_MARGIN 0.05 is
# rarely noise (each revert throws away the training since the baseline).
LIVE_WINDOW = 10
# Validation images before their mAP decides (it is recorded from 3): one image more or less found moves a
# 3-image mAP by far more than GUARD_MARGIN.
VALIDATION_MIN_IMAGES = 10


@dataclass
class Verdict:
    accept: bool
    info: dict
    held_back: dict | None = None
    revert_to: str | None = None  # live signal: ACTIVE goes back to this baseline
    reverted: str | None = None  # ... from this (provisional) version


class Guard:
    def __init__(self, session):
        settings = session.settings
        self.enabled, self.margin = settings.guard, settings.guard_margin
        self.store, self.task = session.store, session.inputs.task
        self.values: dict[tuple[str, str], float] = {}  # (version, split digest) -> its validation headline
        self.uses_validation = False  # the last decision had a validation signal: no live pairs needed
        self.baseline, self.baseline_model, self.baseline_classes = session.parent, session.served, session.served_classes
        self.pairs: list[list[float]] = []
        live = (session.parent_meta.get("guard") or {}).get("live") or {}
        name = live.get("baseline")
        if self.enabled and session.parent and name and name != session.parent and name in self.store.names():
            try:
                state, meta = self.store.load(name)
            except Exception as exc:  # its files were damaged: the active version is the baseline
                log.error("guard baseline %s cannot be loaded (%s); using %s", name, exc, session.parent)
                state, meta = None, {}
            if state is not None and version_task(meta) == self.task:  # the active one is on probation: go on with its window
                self.baseline, self.baseline_classes = name, tuple(meta["classes"])
                self.baseline_model = session._eval_copy(model_from_version(state, meta, settings.min_size))
                self.pairs = [list(p) for p in live.get("pairs", [])]

    def adopt_first(self, session) -> None:
        """After a project's first version went live: it is the baseline later versions are paired with."""
        if self.enabled and self.baseline is None and session.active_name:
            self.baseline, self.baseline_model = session.active_name, session.served
            self.baseline_classes = session.served_classes
            self.pairs = []

    def protected(self) -> set[str]:
        return {self.baseline} if self.baseline else set()

    # -- live signal -----------------------------------------------------------------------------
    def pair(self, session, record: LabeledImage, version: str, score: float) -> None:
        """``record`` (new, unseen by both) was scored ``score`` by the served ``version``: score it by the
        baseline too, while the served version is provisional."""
        if not self.enabled or self.uses_validation or self.baseline_model is None or version == self.baseline:
            return
        baseline = score_image(self.baseline_model, self.baseline_classes, record, session.fetcher,
                               session.settings.score_threshold, session.device, self.task, session.classes,
                               min_part=session.settings.mask_min_part)
        self.pairs.append([round(score, 4), round(baseline.score, 4)])
        if version in self.store.names():
            try:  # kept in the meta so that the next session goes on with the window; the pairs are in memory anyway
                guard = dict(self.store.meta(version).get("guard") or {})
                self.store.update_meta(version, guard=dict(guard, live={"baseline": self.baseline, "pairs": self.pairs}))
            except (OSError, ValueError) as exc:  # a full disk, a damaged meta.json: the session goes on
                log.warning("version %s: guard pairs not recorded in its meta: %s", version, exc)

    # -- decisions -------------------------------------------------------------------------------
    def decide(self, session, validation: dict | None) -> Verdict:
        active = session.active_name
        if not self.enabled:
            return Verdict(True, {"enabled": False})
        if active is None:
            return Verdict(True, {"signal": "none", "verdict": "accepted", "reason": "no active version to compare with"})
        head = headline(validation, self.task)
        if head is not None and validation["images"] < VALIDATION_MIN_IMAGES:
            head = None  # a few images' mAP is noise: the live signal decides until the split has grown
        self.uses_validation = head is not None
        if head is not None:
            self.pairs = []  # the live window, if any, is stale once validation decides
            metric, value = head
            active_value = self._active_value(session, validation)
            info = {"signal": "validation", "metric": metric, "value": value, "active": active,
                    "active_value": active_value, "margin": self.margin, "images": validation["images"]}
            if value < active_value - self.margin:
                reason = f"validation {metric} {value:.3f} is below the active {active}'s {active_value:.3f} by more than {self.margin}"
                return Verdict(False, dict(info, verdict="held_back"), self._held(reason, info))
            return Verdict(True, dict(info, verdict="accepted"))
        if active == self.baseline or len(self.pairs) < LIVE_WINDOW:
            return Verdict(True, {"signal": "live", "verdict": "provisional", "baseline": self.baseline,
                                  "images": len(self.pairs), "margin": self.margin,
                                  "live": {"baseline": self.baseline, "pairs": self.pairs},
                                  "reason": f"{len(self.pairs)}/{LIVE_WINDOW} new images paired with the baseline"})
        value = round(sum(p[0] for p in self.pairs) / len(self.pairs), 4)
        baseline_value = round(sum(p[1] for p in self.pairs) / len(self.pairs), 4)
        info = {"signal": "live", "metric": "live quality", "value": value, "active": self.baseline,
                "active_value": baseline_value, "margin": self.margin, "images": len(self.pairs), "measured": active}
        if value < baseline_value - self.margin:
            reason = (f"live quality {value:.3f} of the versions served since {self.baseline} is below its "
                      f"{baseline_value:.3f} on the same {len(self.pairs)} new images by more than {self.margin}")
            return Verdict(False, dict(info, verdict="held_back"), self._held(reason, info), revert_to=self.baseline,
                           reverted=active)
        return Verdict(True, dict(info, verdict="accepted"))

    def _held(self, reason: str, info: dict) -> dict:
        return {"reason": reason, "signal": info["signal"], "metric": info["metric"], "value": info["value"],
                "active": info["active"], "active_value": info["active_value"]}

    def _active_value(self, session, validation: dict) -> float:
        active, digest = session.active_name, validation["digest"]
        if (active, digest) not in self.values:
            known = session.store.meta(active).get("validation") or {}
            if known.get("digest") != digest or headline(known, self.task) is None:
                known = session.validator.evaluate(session.served, session.classes, session.base_size, session.device) or {}
            found = headline(known, self.task)
            self.values[(active, digest)] = found[1] if found else 0.0
        return self.values[(active, digest)]

    def settle(self, session, name: str, verdict: Verdict, validation: dict | None) -> None:
        """After ``name`` was written: move the baseline on (accepted) or go back to better weights."""
        if verdict.accept:
            if verdict.info.get("verdict") == "accepted":
                # measured and not worse: the version measured (live) or the new one (validation) is the baseline
                if verdict.info.get("signal") == "live":
                    self.baseline, self.baseline_model = session.active_name, session.served
                    self.baseline_classes = session.served_classes
                self.pairs = []
            head = headline(validation, self.task)
            if head is not None and validation:
                self.values[(name, validation["digest"])] = head[1]
            return
        log.warning("project %s: %s held back: %s", session.inputs.project, name, verdict.held_back["reason"])
        if verdict.revert_to:
            self.store.update_meta(verdict.reverted, held_back=dict(verdict.held_back, reason="reverted: " + verdict.held_back["reason"]))
            self.store.set_active(verdict.revert_to)
            session.active_name = verdict.revert_to
            session.served, session.served_classes = self.baseline_model, self.baseline_classes
            self.pairs = []
        reload_weights(session, session.active_name)


def reload_weights(session, name: str) -> None:
    """Train on from version ``name``: its weights (head grown to the session's classes), a fresh optimizer
    and warm-up; what it had not trained on counts as new again (passes from 0). The sampler stays."""
    state, meta = session.store.load(name)
    rebuilt = model_for_round(None, (state, meta), session.classes, session.settings.min_size)
    session.model.load_state_dict(rebuilt.state_dict())
    if session.ema is not None:  # the average of the weights left behind would publish them again
        session.ema.reset(session.model)
    session.optimizer = sgd(session.model, session.settings.learning_rate)
    session.warm_from = session.steps
    records = session.sampler.records
    session.trained = {k: v for k, v in meta.get("trained_annotations", {}).items() if int(k) in records}
    session.published_trained = dict(session.trained)
    for task_id, record in records.items():
        if session.trained.get(str(task_id)) != record.updated_at:
            session.sampler.passes[task_id] = 0
