"""A training session's feed of annotations from Label Studio: the first sync, then the tasks webhooks marked,
between steps. Label Studio down: the marks are put back, the session trains on what it synced before, and the
next sync waits a pause that grows with each failure in a row (``retry_delay``)."""

from __future__ import annotations

import logging
import time

import redis

from backend.jobs import counters
from backend.jobs.state import ProjectState, ls_credentials
from backend.jobs.sync import sync_marked, sync_project
from backend.labelstudio.client import LabelStudioClient, LabelStudioUnavailable
from backend.labelstudio.images import ImageFetcher
from backend.labelstudio.label_config import parse_label_config
from backend.settings import Settings
from backend.training.dataset import TrainingSet

log = logging.getLogger(__name__)

RETRY_FIRST = 2.0  # after Label Studio failed a sync: the first pause before the next try, doubled after each failure
RETRY_CAP = 300.0  # ... up to this


def retry_delay(failures: int, first: float = RETRY_FIRST, cap: float = RETRY_CAP) -> float:
    """The pause after ``failures`` failures in a row (1, 2, ...): ``first``, doubling, at most ``cap``."""
    return min(cap, first * 2 ** max(0, failures - 1))


class Feed:
    """The session's view of Label Studio: the first sync, then the marked tasks between steps."""

    def __init__(self, settings: Settings, connection: redis.Redis, state: ProjectState, project: str):
        self.settings, self.state, self.project = settings, state, project
        self.training_set = TrainingSet(settings.model_dir, project)
        self.fetcher = ImageFetcher(settings)
        self.fetcher.on_failure = counters.fetch_failure_hook(connection, "training")
        self.connection = connection
        self.client = None
        self.control = None
        self.title = state.status().get("title") or f"project-{project}"
        self.retry_at = 0.0
        self.failures = 0  # syncs in a row that Label Studio failed (the pause before the next one grows)
        self.unavailable = False  # Label Studio failed the last sync (its marks were put back)

    def _failed(self, exc: LabelStudioUnavailable) -> float:
        self.unavailable = True
        self.failures += 1
        delay = retry_delay(self.failures)
        self.retry_at = time.monotonic() + delay
        self.state.add_error("training", f"{exc.message} (sync tried again in {delay:.0f} s)")
        return delay

    def first_sync(self) -> None:
        dirty, deleted, full = self.state.pop_marks()
        try:
            url, key = ls_credentials(self.settings, self.connection)
            self.fetcher.set_fallback(url, key)
            self.client = LabelStudioClient(url, key)
            info = self.client.project(self.project)
            self.control = parse_label_config(info["label_config"]).primary
            self.title = info.get("title") or self.title
            sync_project(self.client, self.project, self.control, self.training_set, dirty, deleted, full)
            self.unavailable, self.failures = False, 0
        except LabelStudioUnavailable as exc:
            # Label Studio down: keep the marks for later and train on what was synced before, if anything
            self.state.restore_marks(dirty, deleted, full)
            if self.training_set.synced_at is None:
                self.unavailable = True
                raise
            delay = self._failed(exc)
            log.warning("project %s: %s; training on the last synced data, syncing again in %.0f s", self.project,
                        exc.message, delay)

    def poll(self) -> bool:
        """Take in what webhooks marked since the last look; True when the training set may have changed."""
        if time.monotonic() < self.retry_at or not self.state.has_marks():
            return False
        dirty, deleted, full = self.state.pop_marks()
        try:
            if self.client is None or self.control is None:
                self.state.restore_marks(dirty, deleted, full)
                self.first_sync()  # handles Label Studio being down itself (the session has synced data)
                return not self.unavailable
            elif full:
                sync_project(self.client, self.project, self.control, self.training_set, dirty, deleted, True)
            else:
                sync_marked(self.client, self.project, self.control, self.training_set, dirty, deleted)
            self.unavailable, self.failures = False, 0
        except LabelStudioUnavailable as exc:
            self.state.restore_marks(dirty, deleted, full)
            delay = self._failed(exc)
            log.warning("project %s: %s; trying again in %.0f s", self.project, exc.message, delay)
            return False
        return True
