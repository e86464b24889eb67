"""What one web process holds: settings, starting weights, the model pool and the predictor."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from flask import current_app

from backend.jobs.connection import connect

from backend.inference.predictor import ModelPool, Predictor
from backend.labelstudio.images import ImageFetcher
from backend.model_store.stores import version_store
from backend.model_store.weights import StartingWeights, StartingWeightsByTask
from backend.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class AppState:
    settings: Settings
    starting_for: StartingWeightsByTask  # task kind -> starting weights

    @property
    def starting(self) -> StartingWeights:
        """The box detector's starting weights (what /health reports first)."""
        return self.starting_for("boxes")
    fetcher: ImageFetcher
    predictor: Predictor
    redis: redis.Redis

    @classmethod
    def build(cls, settings: Settings) -> "AppState":
        if settings.label_studio_api_key and not settings.label_studio_url:
            log.warning("LABEL_STUDIO_API_KEY is not used without LABEL_STUDIO_URL (the key is only ever sent there); "
                        "set LABEL_STUDIO_URL too")
        starting_for = StartingWeightsByTask(settings)
        starting_for("boxes"), starting_for("masks")  # resolved now: /health reports both, requests never wait
        fetcher = ImageFetcher(settings)
        # the device setting, not pick_device(): CUDA must not be asked anything before gunicorn forks (ModelPool.device)
        pool = ModelPool(starting_for, settings.model_dir, settings.serving_device, settings.min_size,
                         capacity=settings.max_loaded_models, store=lambda project: version_store(settings, project))
        predictor = Predictor.from_settings(pool, fetcher, settings)
        return cls(settings, starting_for, fetcher, predictor, connect(settings, web=True))


def state() -> AppState:
    return current_app.extensions["livetrain"]
