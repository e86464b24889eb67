"""Pieces of the scale test (tests/test_scale.py) and benchmark (scripts/bench_scale.py): several
`livetrain worker --queue training` processes on one Redis, a sampler that records who holds each
project's lock, and the checks that no project ever trained on two workers at once."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

from rq import Queue, Worker
from rq.job import Job
from rq.registry import FailedJobRegistry, StartedJobRegistry

from backend.jobs.queue import QUEUE_NAME
from backend.jobs.state import ProjectState
from backend.model_store.versions import VersionStore
from tests.livetrain_fixtures import WorkerProcess, regions, shapes_image


class TrainingWorker(WorkerProcess):
    """`livetrain worker --queue training`: the training worker without its re-scoring child."""

    def __init__(self, env: dict, log_path: Path):
        self.log_path = log_path
        self.log = open(log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "backend.cli", "worker", "--queue", "training"], env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)


def webhook(action: str, project, task: int) -> dict:
    return {"action": action, "project": {"id": int(project)},
            "task": {"id": task}, "annotation": {"id": 1, "task": task, "project": int(project)}}


def submit(fake, client, project, seed: int) -> int:
    """One annotator submit in Label Studio: a task, its annotation, the webhook. Returns the task id."""
    png, objects = shapes_image(seed)
    task = fake.add_task(int(project), png, name=f"p{project}-{seed}.png")
    fake.annotate(task, regions(fake, objects))
    reply = client.post("/webhook", json=webhook("ANNOTATION_CREATED", project, task))
    assert reply.status_code == 200, reply.get_data(as_text=True)
    return task


def queue_workers(connection) -> dict[str, int]:
    """RQ worker name -> pid of the workers listening on the training queue."""
    return {w.name: w.pid for w in Worker.all(queue=Queue(QUEUE_NAME, connection=connection))}


class Recorder(threading.Thread):
    """Samples, every ``interval`` seconds and atomically (MULTI/EXEC), each project's lock value (the id of
    the RQ job holding it), state and session; and which started jobs of the project actually train (their
    meta carries the session's progress)."""

    def __init__(self, connection, projects, interval: float = 0.05):
        super().__init__(daemon=True, name="lock-recorder")
        self.r, self.projects, self.interval = connection, [str(p) for p in projects], interval
        self.states = {p: ProjectState(connection, p) for p in self.projects}
        self.samples: list[dict] = []  # {t, project, token, state, session}
        self.sessions: dict[tuple[str, str], dict] = {}  # (project, session id) -> started_at, ended_at, end_reason
        self.training_jobs: list[tuple[float, str, list[str]]] = []  # (t, project, started jobs with progress)
        self.errors: list[str] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                self.sample()
            except Exception as exc:  # recorded, and the test fails on it
                self.errors.append(f"{type(exc).__name__}: {exc}")
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)
        self.sample()  # the final state too

    def sample(self) -> None:
        pipe = self.r.pipeline(transaction=True)
        for p in self.projects:
            state = self.states[p]
            pipe.get(state.lock_key).hmget(state.status_key, "state", "session", "last_session")
        raw = pipe.execute()
        now = time.time()
        for i, p in enumerate(self.projects):
            token, (state, session, last) = raw[2 * i], raw[2 * i + 1]
            state, session, last = (json.loads(v) if v else None for v in (state, session, last))
            self.samples.append({"t": now, "project": p, "token": token.decode() if token else None,
                                 "state": state, "session": session["id"] if session else None})
            if session:
                self.sessions.setdefault((p, session["id"]), {}).update(started_at=session["started_at"])
            if last:
                self.sessions.setdefault((p, last["id"]), {}).update(
                    started_at=last["started_at"], ended_at=last["ended_at"], end_reason=last["end_reason"])
        started = StartedJobRegistry(queue=Queue(QUEUE_NAME, connection=self.r)).get_job_ids()
        jobs = [j for j in Job.fetch_many(started, connection=self.r) if j is not None]
        for p in self.projects:
            mine = [j.id for j in jobs if j.id.startswith(f"train-{p}-") and "progress" in j.meta]
            self.training_jobs.append((now, p, mine))


def idle_everywhere(connection, projects) -> bool:
    """No job queued or running and every project idle with nothing marked or pending."""
    queue = Queue(QUEUE_NAME, connection=connection)
    if queue.count or StartedJobRegistry(queue=queue).get_job_ids():
        return False
    for p in projects:
        state = ProjectState(connection, p)
        if state.status()["state"] != "idle" or state.has_marks() or connection.exists(state.pending_key, state.lock_key):
            return False
    return True


def contiguous(sequence) -> bool:
    """Whether each value occurs in one unbroken run (a, a, b, b, c: yes; a, b, a: no)."""
    seen, previous = set(), object()
    for value in sequence:
        if value != previous:
            if value in seen:
                return False
            seen.add(value)
            previous = value
    return True


def check_one_worker_per_project(connection, model_dir: Path, recorder: Recorder, projects) -> dict:
    """All the checks that no project trained on two workers (or in two sessions) at once. Returns, per
    project, the sessions in order with the RQ job, worker and versions of each (for the report)."""
    assert not recorder.errors, recorder.errors[:5]
    report = {}
    for p in map(str, projects):
        versions = VersionStore(model_dir, p).list()
        names = [v["name"] for v in versions]
        assert versions, f"project {p} published no version"
        # the parent chain is linear: each version continues the one active before it (GUARD=false: every
        # version is accepted, KEEP_VERSIONS high: none pruned). A second session running at the same time
        # would have started from an older version: two versions with the same parent.
        assert [v["parent"] for v in versions] == [None, *names[:-1]], [(v["name"], v["parent"], v["session"]) for v in versions]
        assert versions[-1]["active"]
        assert contiguous(v["session"] for v in versions), [(v["name"], v["session"]) for v in versions]
        assert [v["published_at"] for v in versions] == sorted(v["published_at"] for v in versions)

        # sessions (from the status hash) never overlap, and each published its versions inside its interval
        sessions = sorted(((sid, info) for (proj, sid), info in recorder.sessions.items() if proj == p),
                          key=lambda item: item[1]["started_at"])
        for (sid, a), (_, b) in zip(sessions, sessions[1:]):
            assert "ended_at" in a, f"project {p}: session {sid} never ended"
            assert a["ended_at"] <= b["started_at"], f"project {p}: sessions overlap: {a} and {b}"
        known = dict(sessions)
        for v in versions:
            info = known.get(v["session"])
            assert info is not None, f"project {p}: version {v['name']} of an unrecorded session {v['session']}"
            assert info["started_at"] <= v["published_at"] <= info.get("ended_at", float("inf"))

        # the lock: each RQ job held it in one unbroken stretch; a session only ever trained under one job's lock
        samples = [s for s in recorder.samples if s["project"] == p]
        tokens = [s["token"] for s in samples if s["token"]]
        assert contiguous(tokens), f"project {p}: the lock went back to an earlier holder"
        holder: dict[str, set] = {}
        for s in samples:
            if s["state"] == "training" and s["session"]:
                assert s["token"], f"project {p}: session {s['session']} trained without holding the lock"
                holder.setdefault(s["session"], set()).add(s["token"])
        assert all(len(t) == 1 for t in holder.values()), holder
        assert len(set().union(*holder.values()) if holder else set()) == len(holder), "one lock holder, two sessions"
        # RQ's view: never two started jobs of the project that both train
        assert max((len(jobs) for _, proj, jobs in recorder.training_jobs if proj == p), default=0) <= 1

        # which job (and so which worker) published each version: the job's result lists them
        jobs = {j.id: j for j in Job.fetch_many(sorted(set(tokens)), connection=connection) if j is not None}
        by_version = {}
        for job in jobs.values():
            result = job.return_value() or {}
            for name in result.get("versions") or ():
                assert name not in by_version, f"version {name} claimed by two jobs"
                by_version[name] = job
        missing = [n for n in names if n not in by_version]
        assert not missing, f"project {p}: versions {missing} of no lock-holding job"
        report[p] = [{"session": sid, "job": by_version[v["name"]].id, "worker": by_version[v["name"]].worker_name,
                      "end": info.get("end_reason"), "versions": [x["name"] for x in versions if x["session"] == sid]}
                     for sid, info in sessions
                     for v in [next((x for x in versions if x["session"] == sid), None)] if v is not None]
        # each session's versions came from one job
        for entry in report[p]:
            assert {by_version[n].id for n in entry["versions"]} == {entry["job"]}
    assert not FailedJobRegistry(queue=Queue(QUEUE_NAME, connection=connection)).get_job_ids()
    return report
