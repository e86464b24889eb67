"""Scale out: two RQ training worker processes serve three Label Studio projects on one Redis. Sessions
hand over by fair share (SESSION_SLICE) and go idle, so a project moves between the workers; at no time
may one project train in two sessions (on two workers) at once. Checked on content and order, never on
wall-clock times: the versions' parent chain, the sessions' intervals from the status hash, the lock's
holder (sampled every 50 ms) and RQ's started jobs."""

from __future__ import annotations

import pytest

from backend.model_store.versions import VersionStore
from tests.livetrain_fixtures import CONFIG, live_env, wait_until, worker_env
from tests.scale_fixtures import (Recorder, TrainingWorker, check_one_worker_per_project, idle_everywhere,
                                  queue_workers, submit)

SCALE_ENV = dict(TRAIN_THREADS=1, SESSION_SLICE=3, GUARD="false", RESCORE_ON_PUBLISH="false", KEEP_VERSIONS=1000,
                 IDLE_AFTER=2)


@pytest.fixture
def scale(tmp_path):
    fake, first, settings, app = live_env(tmp_path)
    projects = [str(first), str(fake.add_project(CONFIG, title="Second")), str(fake.add_project(CONFIG, title="Third"))]
    workers = []

    class Env:
        pass

    e = Env()
    e.fake, e.projects, e.settings, e.client, e.tmp = fake, projects, settings, app.test_client(), tmp_path
    e.redis = app.extensions["livetrain"].redis
    e.workers = workers

    def start_workers(n):
        for i in range(n):
            env = worker_env(tmp_path, settings.redis_url, fake.url, fake.token, **SCALE_ENV)
            workers.append(TrainingWorker(env, tmp_path / f"worker{i}.log"))
    e.start_workers = start_workers
    e.logs = lambda: "\n".join(f"--- {w.log_path.name}\n" + w.log_path.read_text(errors="replace")[-2500:] for w in workers)
    yield e
    for worker in workers:
        worker.stop()
    fake.close()


def test_two_workers_three_projects_never_train_one_project_twice(scale):
    e = scale
    e.start_workers(2)
    names = wait_until(lambda: len(queue_workers(e.redis)) == 2 and queue_workers(e.redis), timeout=120,
                       what="two workers listening")
    assert set(names.values()) == {w.proc.pid for w in e.workers}
    recorder = Recorder(e.redis, e.projects, interval=0.05)
    recorder.start()
    submitted = {p: [] for p in e.projects}
    seed = 0

    def round_robin(n):
        nonlocal seed
        for _ in range(n):
            for i, p in enumerate(e.projects):
                submitted[p].append(submit(e.fake, e.client, p, seed + 1000 * i))
            seed += 1

    try:
        round_robin(3)  # three projects, two workers: one project waits, fair share hands over after 3 s
        wait_until(lambda: all(VersionStore(e.settings.model_dir, p).names() for p in e.projects), timeout=150,
                   interval=0.5, what="a version of every project")
        # more submits while sessions run (and while others wait in the queue)
        round_robin(1)
        wait_until(lambda: sum(len(VersionStore(e.settings.model_dir, p).names()) for p in e.projects) >= 6,
                   timeout=120, interval=0.5, what="more versions")
        round_robin(1)
        wait_until(lambda: idle_everywhere(e.redis, e.projects), timeout=240, interval=0.5, what="all projects idle")
    except AssertionError:
        print(e.logs())
        raise
    finally:
        recorder.stop()

    report = check_one_worker_per_project(e.redis, e.settings.model_dir, recorder, e.projects)
    for p in e.projects:  # every submitted annotation is in the project's final (active) version
        store = VersionStore(e.settings.model_dir, p)
        trained = store.meta(store.active())["trained_annotations"]
        assert sorted(map(int, trained)) == sorted(submitted[p]), (p, sorted(trained), submitted[p])
    # both worker processes trained, and a project moved from one to the other between sessions
    used = {s["worker"] for sessions in report.values() for s in sessions}
    assert used == set(names), (used, names)
    moved = [p for p, sessions in report.items() if len({s["worker"] for s in sessions}) > 1]
    held = sum(1 for s in recorder.samples if s["token"])
    print(f"\n{len(recorder.samples) // len(e.projects)} samples per project, lock held in {held} project samples")
    for p, sessions in report.items():
        print(f"project {p}: {len(sessions)} sessions: " + ", ".join(
            f"{s['session'][:6]}@{names[s['worker']]}({s['end']}, {len(s['versions'])}v)" for s in sessions))
    print(f"projects that moved between workers: {moved}")
    assert moved, report


def test_a_paused_decay_tail_goes_on_in_the_next_session(tmp_path, image_server):
    """Fair share pauses sessions mid-tail when projects outnumber workers. Were the tail started afresh (after
    IDLE_AFTER, a fifth of all steps long) in each resumed session, an idle project would be paused before it
    ends, in every slice, and never end (the scale test above hung so before the fix)."""
    import torch

    from backend.labelstudio.images import ImageFetcher
    from backend.model_store.weights import resolve_starting_weights
    from backend.training.session import SessionInputs, TrainingSession
    from tests.test_training import LABELS, records_for, settings_for

    settings = settings_for(tmp_path, decay_steps=4)
    starting = resolve_starting_weights(settings.model_arch, download=False)
    fetcher = ImageFetcher(settings)
    records = records_for(image_server, range(5))

    def session():
        return TrainingSession(settings, starting, fetcher, SessionInputs("1", "p", LABELS), torch.device("cpu"))

    first = session()
    first.update(records[:4])
    first.train(2)  # every image trained on (batch 2)
    assert not first.sampler.fresh
    first.start_decay()
    first.step()
    first.checkpoint()  # a fair-share pause one step into the tail
    decay_at, decay_len = first.decay_at, first.decay_len

    paused = session()
    paused.update(records[:4])
    assert paused.resume() and (paused.decay_at, paused.decay_len) == (decay_at, decay_len)
    paused.step()
    paused.step()
    assert not paused.decay_done() and paused.lr() < first.lr()  # on down the same tail, not a new one
    while not paused.decay_done():
        paused.step()
    assert paused.steps == decay_at + decay_len

    changed = session()  # a submit while it was paused: new work, no tail
    changed.update(records[:5])
    assert changed.resume() and changed.decay_at is None
