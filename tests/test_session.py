"""The training session's pieces in process: the sampler, the learning-rate schedule, versions, checkpoints."""

from __future__ import annotations

import torch

from backend.labelstudio.annotations import LabeledImage
from backend.labelstudio.images import ImageFetcher
from backend.model_store.versions import VersionStore
from backend.model_store.weights import resolve_starting_weights
from backend.training.ema import ModelEma
from backend.training.sampler import LiveSampler
from backend.training.session import DECAY_FLOOR, WARMUP_START, SessionInputs, TrainingSession, lr_factor
from tests.test_training import LABELS, records_for, settings_for


def record(task_id: int, updated: str = "a") -> LabeledImage:
    return LabeledImage(task_id, f"/{task_id}.png", task_id, updated, ((1, 1, 10, 10),), ("Square",))


def test_new_and_changed_images_are_drawn_first_then_replay_covers_everything():
    sampler = LiveSampler(new_fraction=0.0, min_passes=2, seed=1)
    assert sampler.update({t: record(t) for t in (1, 2, 3, 4)}) == [1, 2, 3, 4]
    for _ in range(20):
        sampler.draw(2)
    assert sampler.settled() and min(sampler.passes.values()) >= 2
    # a correction of 3 and a new image 5: both in the very next batch
    assert sorted(sampler.update({1: record(1), 2: record(2), 3: record(3, "b"), 4: record(4), 5: record(5)})) == [3, 5]
    assert sorted(sampler.draw(2)) == [3, 5] and not sampler.settled()
    # deleted images leave; a batch never holds one image twice
    sampler.update({1: record(1), 5: record(5)})
    assert set(sampler.passes) == {1, 5}
    for _ in range(10):
        batch = sampler.draw(2)
        assert sorted(batch) == [1, 5]
    assert sampler.draw(3) in ([1, 5], [5, 1])  # fewer images than the batch size


def test_new_fraction_favours_images_with_few_passes():
    sampler = LiveSampler(new_fraction=0.9, min_passes=50, seed=0)
    sampler.update({t: record(t) for t in range(10)})
    for _ in range(200):
        sampler.draw(1)
    sampler.update({t: record(t) for t in range(11)})  # image 10 arrives; everything else has passes
    sampler.passes = {t: 50 for t in range(10)} | {10: 0}
    sampler.fresh = []
    draws = [sampler.draw(1)[0] for _ in range(40)]
    assert draws.count(10) > 20  # ~90% of draws until it has its passes


def test_learning_rate_warms_up_holds_then_decays():
    assert lr_factor(0, warmup=10) == WARMUP_START
    assert lr_factor(5, warmup=10) < lr_factor(9, warmup=10) < 1.0
    assert lr_factor(10, warmup=10) == lr_factor(5000, warmup=10) == 1.0  # constant while annotations come
    assert lr_factor(5000, 10, decay_at=5000, decay_steps=100) == 1.0
    assert 0.4 < lr_factor(5050, 10, decay_at=5000, decay_steps=100) < 0.6
    assert abs(lr_factor(5100, 10, decay_at=5000, decay_steps=100) - DECAY_FLOOR) < 1e-9


def test_the_moving_average_ramps_in_then_averages_and_leaves_integer_tensors_alone():
    model = torch.nn.BatchNorm1d(2)  # weight, bias (float), running stats (float), num_batches_tracked (int)
    ema = ModelEma(model, decay=0.9)
    assert ema.current_decay() == 0.1  # ramped in: a young average follows the model closely
    with torch.no_grad():
        model.weight.fill_(2.0)  # from 1.0
        model.num_batches_tracked.fill_(7)
    ema.update(model)
    assert torch.allclose(ema.module.weight, torch.full((2,), 0.1 * 1.0 + 0.9 * 2.0))
    assert int(ema.module.num_batches_tracked) == 7 and not ema.module.weight.requires_grad
    for _ in range(200):
        ema.update(model)
    assert ema.current_decay() == 0.9 and torch.allclose(ema.module.weight, torch.full((2,), 2.0))
    # a settled average moves a tenth of the way per step (1 / (1 - 0.9) steps of memory)
    with torch.no_grad():
        model.weight.fill_(12.0)
    ema.update(model)
    assert torch.allclose(ema.module.weight, torch.full((2,), 3.0))
    ema.reset(model)
    assert ema.updates == 0 and torch.equal(ema.module.weight, model.weight)
    ema.update(model)
    again = ModelEma(torch.nn.BatchNorm1d(2), decay=0.9)
    again.load_state_dict(ema.state_dict())
    assert again.updates == 1 and torch.equal(again.module.weight, ema.module.weight)


def new_session(model_dir, **settings) -> TrainingSession:
    """A fresh box session on the offline starting weights, with ``settings`` over the test defaults."""
    settings = settings_for(model_dir, **settings)
    starting = resolve_starting_weights(settings.model_arch, download=False)
    return TrainingSession(settings, starting, ImageFetcher(settings), SessionInputs("1", "p", LABELS),
                           torch.device("cpu"))


def test_versions_publish_the_average_of_the_weights_and_ema_decay_0_the_raw_ones(tmp_path, image_server):
    records = records_for(image_server, range(4))
    published = {}
    for decay in (0.95, 0.0):
        session = new_session(tmp_path / str(decay), ema_decay=decay)
        session.update(records)
        session.train(3)
        state, meta = session.store.load(session.publish())
        assert meta["settings"]["ema_decay"] == decay
        source = session.ema.module if decay else session.model
        assert session.published_model() is source
        for name, value in source.state_dict().items():
            assert torch.equal(value, state[name]), name
        published[decay] = (state, session)
    state, session = published[0.95]
    head = "roi_heads.box_predictor.cls_score.weight"
    assert not torch.equal(state[head], session.model.state_dict()[head])  # the average, not the last step


def test_rois_per_image_reaches_the_training_model_and_0_keeps_the_architectures(tmp_path):
    sampled = {}
    for rois in (0, 256):
        session = new_session(tmp_path / str(rois), rois_per_image=rois)
        sampled[rois] = session.model.roi_heads.fg_bg_sampler.batch_size_per_image
    assert sampled == {0: 128, 256: 256}  # Lite0's own 128, or the setting


def test_session_publishes_what_it_trained_on_and_a_checkpoint_resumes_it(tmp_path, image_server):
    settings = settings_for(tmp_path, full_after=5)
    starting = resolve_starting_weights(settings.model_arch, download=False)
    fetcher = ImageFetcher(settings)
    records = records_for(image_server, range(6))
    session = TrainingSession(settings, starting, fetcher, SessionInputs("1", "p", LABELS), torch.device("cpu"))
    session.update(records[:4])
    assert session.mode == "heads" and not session.has_new()
    entries = session.score_new(records[:4])  # no version yet: the empty pre-label of livetrain-base
    assert [e["version"] for e in entries] == ["livetrain-base"] * 4 and all(e["score"] == 0.0 for e in entries)
    session.step()
    assert session.has_new() and len(session.trained) == 2  # the first batch: two of the four new images
    session.train(2)
    v1 = session.publish()
    meta = session.store.meta(v1)
    assert meta["images"] == 4 and meta["total_steps"] == 3 and meta["session"] == session.id and meta["parent"] is None
    # labeled objects per class (UNCERTAINTY=class_weighted), counted over the trained images only
    assert set(meta["class_objects"]) == set(LABELS) and sum(meta["class_objects"].values()) == meta["annotations"]
    assert meta["class_objects"] == {c: sum(r.labels.count(c) for r in records[:4]) for c in LABELS}
    assert not session.has_new()
    # a fifth image arrives mid-session: scored by v1 before training on it, the backbone joins (FULL_AFTER=5)
    changed = session.update(records[:5])
    assert [r.task_id for r in changed] == [records[4].task_id] and session.mode == "full"
    (entry,) = session.score_new(changed)
    assert entry["version"] == v1 and isinstance(VersionStore(tmp_path, "1").meta(v1)["quality"], float)
    session.step()
    assert str(records[4].task_id) in session.trained  # drawn first
    session.checkpoint()
    steps = session.steps

    # a killed session: the next one continues from the checkpoint (same session lineage as the active v1)
    again = TrainingSession(settings, starting, fetcher, SessionInputs("1", "p", LABELS), torch.device("cpu"))
    again.update(records[:5])
    assert again.resume() and again.steps == steps and again.mode == "full" and again.total_steps == 4
    assert str(records[4].task_id) in again.trained and again.has_new()
    for name, value in again.model.state_dict().items():
        assert torch.equal(value, session.model.state_dict()[name]), name
    # ... and the average of the weights that versions publish (EMA_DECAY, on by default)
    assert again.ema.updates == session.ema.updates == session.steps
    for name, value in again.ema.module.state_dict().items():
        assert torch.equal(value, session.ema.module.state_dict()[name]), name
    # a checkpoint written before EMA_DECAY existed (no "ema"): the average starts at the resumed weights
    saved = torch.load(session.checkpoint_path, weights_only=True)
    del saved["ema"]
    torch.save(saved, session.checkpoint_path)
    older = TrainingSession(settings, starting, fetcher, SessionInputs("1", "p", LABELS), torch.device("cpu"))
    older.update(records[:5])
    assert older.resume() and older.ema.updates == 0
    for name, value in older.ema.module.state_dict().items():
        assert torch.equal(value, session.model.state_dict()[name]), name
    again.start_decay()
    while not again.decay_done():
        again.step()
    v2 = again.publish()
    assert again.store.meta(v2)["parent"] == v1 and again.store.meta(v2)["final"]
    # after a rollback the checkpoint does not continue the active version
    again.checkpoint()
    VersionStore(tmp_path, "1").set_active(v1)
    third = TrainingSession(settings, starting, fetcher, SessionInputs("1", "p", LABELS), torch.device("cpu"))
    third.update(records[:5])
    assert not third.resume()
