"""The worker layout: `livetrain worker` is a training worker plus a re-scoring worker child, each with its
own CPU share (niceness, torch threads, also in the forked work horses); re-scoring has its own queue
and worker, so it makes progress while training is busy or pending."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from rq import Worker

from backend.jobs.jobs import wait_for_job
from backend.jobs.queue import QUEUE_NAME, RESCORE_QUEUE_NAME, job_queue, rescore_queue
from backend.jobs.rescoring import enqueue_rescore
from backend.jobs.state import ProjectState
from backend.jobs.workers import LivetrainWorker
from backend.model_store.versions import VersionStore
from tests.livetrain_fixtures import WorkerProcess, live_env, shapes_image, wait_until, worker_env


def stat_fields(pid: int) -> list[str]:
    """/proc/<pid>/stat from field 3 (state) on: [0] state, [1] ppid, [16] nice."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()


def running(pid: int) -> bool:
    try:
        return stat_fields(pid)[0] != "Z"
    except OSError:
        return False


def niceness(pid: int) -> int:
    return int(stat_fields(pid)[16])


def parent(pid: int) -> int:
    return int(stat_fields(pid)[1])


def live_workers(redis, exclude=()) -> dict[str, int]:
    """Queue name -> pid of a registered worker that runs (a SIGKILLed one stays registered a while)."""
    return {name: w.pid for w in Worker.all(connection=redis) if w.pid not in exclude and running(w.pid)
            for name in w.queue_names()}


def run_job(queue, func: str, *args):
    job = queue.enqueue(func, *args)
    report = wait_for_job(queue.connection, job.id, timeout=60)
    assert report["status"] == "finished", report
    return report["result"]


class RescoreOnlyWorker(WorkerProcess):
    """`livetrain worker --queue rescore`, killed like WorkerProcess."""

    def __init__(self, env: dict, log_path: Path):
        self.log = open(log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "backend.cli", "worker", "--queue", "rescore"], env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture
def env(tmp_path):
    fake, project, settings, app = live_env(tmp_path)
    workers = []

    class Env:
        pass

    e = Env()
    e.fake, e.project, e.settings, e.app, e.tmp = fake, str(project), settings, app, tmp_path
    e.redis = app.extensions["livetrain"].redis
    e.log = lambda: (tmp_path / "worker.log").read_text(errors="replace")[-4000:]

    def start(cls=WorkerProcess, **extra):
        worker = cls(worker_env(tmp_path, settings.redis_url, fake.url, fake.token, **extra), tmp_path / "worker.log")
        workers.append(worker)
        return worker
    e.start = start
    yield e
    for worker in workers:
        worker.stop()
    fake.close()


def test_default_worker_runs_training_and_rescore_workers_with_their_cpu_shares(env):
    base = os.nice(0)
    worker = env.start(TRAIN_NICE=3, RESCORE_NICE=7, TRAIN_THREADS=3, RESCORE_THREADS=1)
    pids = wait_until(lambda: (w := live_workers(env.redis)).keys() >= {QUEUE_NAME, RESCORE_QUEUE_NAME} and w,
                      timeout=90, what=f"both workers\n{env.log()}")
    training, rescore = pids[QUEUE_NAME], pids[RESCORE_QUEUE_NAME]
    assert training == worker.proc.pid and parent(rescore) == training and training != rescore
    assert niceness(training) == min(base + 3, 19) and niceness(rescore) == min(base + 7, 19)
    # in the work horses RQ forks per job too
    assert run_job(job_queue(env.redis), "os.nice", 0) == min(base + 3, 19)
    assert run_job(job_queue(env.redis), "torch.get_num_threads") == 3
    assert run_job(rescore_queue(env.redis), "os.nice", 0) == min(base + 7, 19)
    assert run_job(rescore_queue(env.redis), "torch.get_num_threads") == 1

    os.kill(rescore, signal.SIGKILL)  # the re-scoring worker dies: a new one takes over
    again = wait_until(lambda: live_workers(env.redis, exclude={rescore}).get(RESCORE_QUEUE_NAME), timeout=90,
                       what=f"a new re-scoring worker\n{env.log()}")
    assert parent(again) == training and niceness(again) == min(base + 7, 19)
    assert run_job(rescore_queue(env.redis), "os.nice", 0) == min(base + 7, 19)  # it serves the queue

    os.kill(training, signal.SIGTERM)  # a stop request stops both
    assert worker.proc.wait(timeout=60) == 0
    wait_until(lambda: not running(again), timeout=30, what="the re-scoring worker to stop")


def test_rescore_worker_takes_only_rescore_jobs_and_does_not_yield_to_pending_training(env):
    unlabeled = [env.fake.add_task(int(env.project), shapes_image(seed)[0], name=f"img{seed}.png") for seed in range(4)]
    starting = env.app.extensions["livetrain"].starting
    version = VersionStore(env.settings.model_dir, env.project).publish(
        starting.build(3).state_dict(), {"arch": starting.arch, "classes": ["Square", "Disc"]}, "Shapes")
    # a training job waits (as while a session runs or is queued): re-scoring used to stop and queue itself behind it
    training_job = job_queue(env.redis).enqueue("os.getpid")
    env.redis.set(ProjectState(env.redis, env.project).pending_key, training_job.id)

    env.start(RescoreOnlyWorker, RESCORE_BATCH=1)  # a batch per task: stop() is asked between every two
    report = wait_for_job(env.redis, enqueue_rescore(env.redis, env.project), timeout=120)
    assert report["status"] == "finished", (report, env.log())
    assert report["result"]["state"] == "done" and report["result"]["written"] == 4, report
    for tid in unlabeled:
        assert [p["model_version"] for p in env.fake.task_predictions(tid)] == [version]
    assert env.fake.projects[int(env.project)]["model_version"] == version
    assert training_job.get_status(refresh=True) == "queued"  # not its queue
    assert live_workers(env.redis).keys() == {RESCORE_QUEUE_NAME}


def test_worker_command_thread_stops_within_seconds_of_unsubscribing(env):
    # RQ's pubsub thread polled every 60 s and, once unsubscribed (as teardown does first), waited that long for
    # a new subscription before it saw its stop flag: a warm shutdown hung for up to a minute.
    worker = LivetrainWorker([job_queue(env.redis)], connection=env.redis)
    worker.subscribe()
    worker.pubsub.unsubscribe()
    wait_until(lambda: not worker.pubsub.subscribed, timeout=10, what="the unsubscribe to be confirmed")
    worker.pubsub_thread.stop(timeout=10)
    assert not worker.pubsub_thread.is_alive()
