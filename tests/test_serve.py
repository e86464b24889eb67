"""`livetrain serve` as the README runs it: gunicorn + RQ workers + embedded Redis, over real HTTP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import redis
import requests
from rq import Worker

from backend.simulation.processes import free_port
from tests.conftest import BOX_CONFIG, png_bytes


def wait_for(url: str, seconds: float = 90.0, **kwargs) -> requests.Response:
    deadline = time.monotonic() + seconds
    while True:
        try:
            return requests.get(url, timeout=2, **kwargs)
        except (requests.ConnectionError, requests.Timeout):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def test_serve_runs_gunicorn_worker_and_embedded_redis(tmp_path, image_server):
    port = free_port()
    env = dict(os.environ, MODEL_DIR=str(tmp_path), DOWNLOAD_WEIGHTS="false", TORCH_HOME=str(tmp_path / "torch"),
               IMAGE_URL_ALLOWLIST="127.0.0.1")  # the image server on 127.0.0.1 stands for a third-party host
    env.pop("REDIS_URL", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "backend.cli", "serve", "--port", str(port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        health = wait_for(f"http://127.0.0.1:{port}/health").json()
        assert health["status"] == "UP" and health["redis"] == "ok"
        url = image_server.add("/a.png", png_bytes(320, 240))
        payload = {"tasks": [{"id": 1, "data": {"image": url}}], "project": "1.1", "label_config": BOX_CONFIG}
        reply = requests.post(f"http://127.0.0.1:{port}/predict", json=payload, timeout=60)
        assert reply.status_code == 200 and len(reply.json()["results"]) == 1
        # the embedded Redis lives under MODEL_DIR and both RQ workers registered with it: training, and
        # re-scoring (a child of the training worker)
        registry = json.loads((tmp_path / "redis" / "livetrain.db.settings").read_text())
        conn = redis.Redis(unix_socket_path=registry["unixsocket"])
        deadline = time.monotonic() + 60
        while len(Worker.all(connection=conn)) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        workers = {q: w.pid for w in Worker.all(connection=conn) for q in w.queue_names()}
        assert sorted(workers) == ["livetrain", "livetrain-rescore"], workers
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out.decode()[-2000:]
    # nothing of ours is left running in that process group, nor in the re-scoring worker's (a session of its own)
    time.sleep(0.5)
    leftovers = [pid for group in (proc.pid, workers["livetrain-rescore"]) for pid in
                 subprocess.run(["pgrep", "-g", str(group)], capture_output=True, text=True).stdout.split()]
    assert leftovers == [], [(pid, subprocess.run(["ps", "-o", "stat=,args=", "-p", pid], capture_output=True,
                                                  text=True).stdout) for pid in leftovers] + [out.decode()[-3000:]]
