"""What one web process holds: settings, starting weights, the model pool and the predictor."""

from __future__ import annotations

from dataclasses import dataclass

from flask import current_app

from backend.jobs.connection import connect

from backend.inference.predictor import ModelPool, Predictor
from backend.model_store.models import pick_device
from backend.labelstudio.images import ImageFetcher
from backend.model_store.weights import StartingWeights, resolve_starting_weights
from backend.settings import Settings


@dataclass
class AppState:
    settings: Settings
    starting: StartingWeights
    fetcher: ImageFetcher
    predictor: Predictor
    redis: redis.Redis

    @classmethod
    def build(cls, settings: Settings) -> "AppState":
        starting = resolve_starting_weights(
            settings.model_arch, settings.weights_path, settings.weights_sha256, settings.download_weights
        )
        fetcher = ImageFetcher(settings)
        pool = ModelPool(starting, settings.model_dir, pick_device(settings.device), settings.min_size)
        predictor = Predictor(pool, fetcher, settings.score_threshold, settings.max_detections, settings.uncertainty,
                              settings.predict_skip_annotated)
        return cls(settings, starting, fetcher, predictor, connect(settings))


def state() -> AppState:
    return current_app.extensions["livetrain"]
