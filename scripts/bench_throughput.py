"""/predict throughput of one machine for several gunicorn WORKERS x THREADS configurations.

    python scripts/bench_throughput.py [--configs 1x1 1x4 1x8 2x2 2x4] [--clients 8] [--duration 30]
        [--projects 3] [--train-steps 6 | --version DIR] [--image PATH] [--same-url] [--env KEY=VALUE ...]
        [--out throughput.json]

What is served. Before any server starts, one small real version is trained in this process on the generated
shapes images of the test suite (tests/livetrain_fixtures.py train_version: --train-steps SGD steps plus the
decay tail, at the architecture's default MIN_SIZE, MODEL_ARCH=auto without downloads; about 30 s on a busy
2-core machine; so few steps find nothing above SCORE_THRESHOLD, so region conversion costs next to nothing:
"mean_regions" in the JSON says how many came back), or --version DIR (a version directory
``MODEL_DIR/<project>/versions/<name>``, e.g. a trained one from `livetrain simulate`) is taken instead. That version is then published
to each of --projects Label Studio projects ("1".."N"), so every project has its own active version and each
web process holds one model per project (MAX_LOADED_MODELS, default 8, caps that: more projects means
evictions and reloads, which is then part of the measurement). Nothing is trained while measuring.

Per configuration ("WxT"): a fresh MODEL_DIR with the project versions copied in, `livetrain serve
--no-worker` (WORKERS=W, THREADS=T, embedded Redis, LOG_LEVEL=WARNING; no RQ worker, no training), /health,
then a warm-up: every project once, then W-1 more concurrent rounds over all projects so that every web
process has most likely loaded every project's model (gunicorn does not let a client pick the process, so
with W > 1 a cold model load can still fall into the window; look at max latency). Then --clients client
threads (one HTTP keep-alive session each) post /predict back to back for --duration seconds; bodies rotate
over the projects (one task per body, the label config of the shapes projects). Every request asks for a
distinct image URL (``...bench.jpg?r=<n>``) unless --same-url, so every request misses the backend's image
cache: the backend fetches the image over HTTP from a local server in this process, decodes it, runs the
forward (one at a time per process: backend/inference/predictor.py _forward_lock) and converts the
regions. The image is a BCCD photo from ../shared/datasets/bccd (640x480 JPEG) when present, else a
generated 640x480 picture.

Measured per configuration: requests/s (answers that succeeded / seconds from the first request to the last
answer), p50 / p95 / max latency of those answers (client side, includes queueing in gunicorn), errors
(HTTP errors, exceptions, or a 200 whose prediction is empty because the image failed (score null) or that
served the base model instead of the project's version), the RSS of the gunicorn processes (master + web
workers, summed over /proc/<pid>/status VmRSS, peak over the window sampled every 0.5 s; PSS from
/proc/<pid>/smaps_rollup too, which does not count pages shared after fork twice), OS threads per web
process, and the torch intra-op threads of a web process: the web processes do not call
torch.set_num_threads (only the RQ workers do, backend/jobs/workers.py), so each uses torch's default,
which this script reads in a child python started with the server's environment (OMP_NUM_THREADS etc.).

The clients, the image server and the backend share the machine's cores: on a small machine the client
side takes a little CPU away from the server (the clients only wait on sockets; fetching the image is cheap).
"""

from __future__ import annotations

import argparse
import http.server
import itertools
import json
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backend.simulation.processes import LivetrainServer, _descendants, alive  # noqa: E402
from tests.livetrain_fixtures import CONFIG, shapes_image  # noqa: E402

sys.path.insert(0, str(ROOT / "scripts"))
from bench_predict import bench_image as predict_image  # noqa: E402  the same picture as the /predict benchmark

log = logging.getLogger("bench_throughput")
LABELS = ("Square", "Disc")
BCCD = ROOT.parent / "shared/datasets/bccd/images/BloodImage_00000.jpg"


# -- the image and the local http server ------------------------------------------------------------------
def bench_image(path: str | None) -> tuple[bytes, str]:
    """A 640x480 JPEG: ``path``, else a BCCD photo when present, else a generated picture; (bytes, source)."""
    source = path or (str(BCCD) if BCCD.exists() else None)
    return predict_image(source), source or "generated 640x480"


class FileServer:
    """Serves ``files[path]`` (query strings ignored) on 127.0.0.1 and counts GETs."""

    def __init__(self):
        self.files: dict[str, tuple[bytes, str]] = {}
        self.gets = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                outer.gets += 1
                entry = outer.files.get(self.path.split("?", 1)[0])
                if entry is None:
                    self.send_error(404)
                    return
                body, kind = entry
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, name="file-server", daemon=True).start()

    def add(self, path: str, body: bytes, kind: str) -> str:
        self.files[path] = (body, kind)
        return self.url + path

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# -- the version each project serves --------------------------------------------------------------------
def train_seed_version(files: FileServer, seed_dir: Path, steps: int) -> Path:
    """Train one small version on generated shapes (in process, as a session does) and return its directory."""
    import torch

    from backend.labelstudio.annotations import LabeledImage
    from backend.labelstudio.images import ImageFetcher
    from backend.model_store.weights import resolve_starting_weights
    from backend.settings import Settings
    from backend.training.session import SessionInputs
    from tests.livetrain_fixtures import train_version

    torch.manual_seed(0)
    settings = Settings(model_dir=seed_dir, download_weights=False, batch_size=2, warmup_steps=1, decay_steps=2,
                        checkpoint_every=1000, learning_rate=0.01, image_url_allowlist="127.0.0.1")
    records = []
    for seed in range(6):
        png, objects = shapes_image(seed)
        url = files.add(f"/shapes{seed}.png", png, "image/png")
        boxes = tuple((100 * x1 / 160, 100 * y1 / 120, 100 * (x2 - x1) / 160, 100 * (y2 - y1) / 120)
                      for x1, y1, x2, y2, _ in objects)
        records.append(LabeledImage(seed + 1, url, seed + 1, f"2026-01-01T00:00:{seed:02d}Z", boxes,
                                    tuple(o[4] for o in objects)))
    starting = resolve_starting_weights(settings.model_arch, download=False)
    meta = train_version(settings, starting, ImageFetcher(settings), SessionInputs("1", "shapes", LABELS), records, steps)
    return seed_dir / "1" / "versions" / meta["name"]


def publish_to_projects(version_dir: Path, model_dir: Path, projects: list[str]) -> dict:
    """Copy one version directory into every project of ``model_dir`` and make it active; project -> name."""
    from backend.model_store.versions import VersionStore

    names = {}
    for project in projects:
        store = VersionStore(model_dir, project)
        store.versions_dir.mkdir(parents=True, exist_ok=True)
        shutil.copytree(version_dir, store.versions_dir / version_dir.name)
        store.set_active(version_dir.name)
        names[project] = version_dir.name
    return names


# -- process facts from /proc ----------------------------------------------------------------------------
def _status_field(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _pss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def gunicorn_pids(server: LivetrainServer) -> tuple[int, list[int]]:
    """(master, web workers): `livetrain serve --no-worker` is the gunicorn master; its children the workers."""
    return server.proc.pid, [p for p in _descendants(server.proc.pid) if alive(p)]


class MemorySampler(threading.Thread):
    def __init__(self, server: LivetrainServer, interval: float = 0.5):
        super().__init__(name="rss-sampler", daemon=True)
        self.server, self.interval = server, interval
        self.stop_event = threading.Event()
        self.peak_rss_kb = self.peak_pss_kb = 0

    def sample(self) -> tuple[int, int]:
        master, workers = gunicorn_pids(self.server)
        pids = [master, *workers]
        return sum(_status_field(p, "VmRSS") for p in pids), sum(_pss_kb(p) for p in pids)

    def run(self) -> None:
        while not self.stop_event.is_set():
            rss, pss = self.sample()
            self.peak_rss_kb, self.peak_pss_kb = max(self.peak_rss_kb, rss), max(self.peak_pss_kb, pss)
            self.stop_event.wait(self.interval)


def default_torch_threads(env: dict) -> int | None:
    """torch.get_num_threads() of a fresh python with ``env``: what a web process uses (it sets none)."""
    try:
        out = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], env=env,
                             capture_output=True, text=True, timeout=120, check=True).stdout
        return int(out.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError, OSError):
        return None


# -- the load ----------------------------------------------------------------------------------------------
class Load:
    """Builds /predict bodies: projects in rotation, a distinct image URL per request unless ``same_url``."""

    def __init__(self, image_url: str, projects: list[str], same_url: bool):
        self.image_url, self.projects, self.same_url = image_url, projects, same_url
        self._counter = itertools.count(1)
        self._lock = threading.Lock()

    def body(self, project: str | None = None) -> tuple[str, dict]:
        with self._lock:
            n = next(self._counter)
        project = project or self.projects[n % len(self.projects)]
        url = self.image_url if self.same_url else f"{self.image_url}?r={n}"
        return project, {"tasks": [{"id": n, "data": {"image": url}}], "project": f"{project}.1700000000",
                         "label_config": CONFIG}


def post(session: requests.Session, url: str, project: str, body: dict, versions: dict) -> dict:
    """One /predict; {'latency', 'status', 'error', 'project', 'regions'}."""
    start = time.perf_counter()
    status, error, regions = 0, None, 0
    try:
        reply = session.post(url, json=body, timeout=300)
        status = reply.status_code
        if reply.ok:
            prediction = reply.json()["results"][0]
            regions = len(prediction.get("result") or [])
            if prediction.get("score") is None:
                error = "empty prediction (image failed)"
            elif prediction.get("model_version") != versions[project]:
                error = f"served {prediction.get('model_version')!r}, not {versions[project]!r}"
        else:
            error = f"HTTP {status}"
    except (requests.RequestException, ValueError, KeyError, IndexError) as exc:
        error = f"{type(exc).__name__}: {exc}"[:200]
    return {"latency": time.perf_counter() - start, "status": status, "error": error, "project": project,
            "regions": regions, "end": time.perf_counter()}


def run_clients(n_clients: int, duration: float, predict_url: str, load: Load, versions: dict,
                stop: threading.Event) -> tuple[list[dict], float, float]:
    """``n_clients`` threads posting back to back until ``duration`` s have passed (a request started before
    the end is waited for). Returns (records, first request start, last answer)."""
    records: list[dict] = []
    lock = threading.Lock()
    t0 = time.perf_counter()
    deadline = t0 + duration

    def client():
        session = requests.Session()
        mine = []
        try:
            while time.perf_counter() < deadline and not stop.is_set():
                project, body = load.body()
                mine.append(post(session, predict_url, project, body, versions))
        finally:
            session.close()
            with lock:
                records.extend(mine)

    threads = [threading.Thread(target=client, name=f"client-{i}", daemon=True) for i in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    t1 = max((r["end"] for r in records), default=time.perf_counter())
    return records, t0, t1


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def measure(config: str, args, version_dir: Path, load_args: tuple, stop: threading.Event) -> dict:
    workers, threads = (int(x) for x in config.lower().split("x"))
    image_url, projects = load_args
    env = {"WORKERS": workers, "THREADS": threads, "LOG_LEVEL": "WARNING",
           "DOWNLOAD_WEIGHTS": os.environ.get("DOWNLOAD_WEIGHTS", "false"),
           "IMAGE_URL_ALLOWLIST": "127.0.0.1"}  # the image server is on 127.0.0.1
    env.update(dict(kv.split("=", 1) for kv in args.env))
    with tempfile.TemporaryDirectory(prefix=f"bench-throughput-{config}-") as tmp:
        model_dir = Path(tmp) / "models"
        versions = publish_to_projects(version_dir, model_dir, projects)
        log_path = Path(tmp) / "serve.log"
        torch_threads = default_torch_threads({**os.environ, **server_env(model_dir, env)})
        server = LivetrainServer(model_dir, env=env, worker=False, cwd=ROOT, log_path=log_path)
        sampler = None
        try:
            server.wait_ready(timeout=180)
            predict_url = server.url + "/predict"
            load = Load(image_url, projects, args.same_url)
            session = requests.Session()
            warm = []
            for project in projects:  # every project once ...
                warm.append(post(session, predict_url, *load.body(project), versions))
            session.close()
            for _ in range(workers - 1):  # ... then concurrent rounds, to reach the other web processes
                batch: list[dict] = []

                def warm_one(project: str) -> None:
                    with requests.Session() as s:
                        batch.append(post(s, predict_url, *load.body(project), versions))

                ts = [threading.Thread(target=warm_one, args=(p,), daemon=True) for p in projects for _ in range(workers)]
                for t in ts:
                    t.start()
                for t in ts:
                    t.join()
                warm.extend(batch)
            failed = [w for w in warm if w["error"]]
            if failed:
                log.warning("%s: %d warm-up request(s) failed, e.g. %s", config, len(failed), failed[0]["error"])
            sampler = MemorySampler(server)
            sampler.start()
            log.info("%s: %d client(s) for %.0f s over %d project(s)", config, args.clients, args.duration, len(projects))
            records, t0, t1 = run_clients(args.clients, args.duration, predict_url, load, versions, stop)
            sampler.stop_event.set()
            sampler.join()
            rss_end, pss_end = sampler.sample()
            master, web = gunicorn_pids(server)
            os_threads = [_status_field(p, "Threads") for p in web]
        finally:
            if sampler is not None:
                sampler.stop_event.set()
            server.stop()
            leftovers = [p for p in server.stopped_pids if alive(p)]
            if leftovers:
                log.warning("%s: processes still running after stop: %s", config, leftovers)
        if stop.is_set():
            raise KeyboardInterrupt
        ok = [r for r in records if not r["error"]]
        lat = [r["latency"] for r in ok]
        errors: dict[str, int] = {}
        for r in records:
            if r["error"]:
                errors[r["error"]] = errors.get(r["error"], 0) + 1
        tail = log_path.read_text(errors="replace")[-2000:] if errors else ""
    elapsed = t1 - t0
    return {
        "config": config, "workers": workers, "threads": threads, "clients": args.clients,
        "projects": len(projects), "duration_s": round(elapsed, 2), "requests": len(records), "ok": len(ok),
        "errors": len(records) - len(ok), "error_kinds": errors,
        "requests_per_s": round(len(ok) / elapsed, 3) if elapsed > 0 else None,
        "p50_ms": _ms(percentile(lat, 50)), "p95_ms": _ms(percentile(lat, 95)), "max_ms": _ms(max(lat, default=None)),
        "mean_regions": round(statistics.mean(r["regions"] for r in ok), 2) if ok else None,
        "per_project_ok": {p: sum(1 for r in ok if r["project"] == p) for p in projects},
        "warmup_requests": len(warm), "warmup_errors": len(failed),
        "gunicorn_rss_mb_peak": round(sampler.peak_rss_kb / 1024, 1), "gunicorn_rss_mb_end": round(rss_end / 1024, 1),
        "gunicorn_pss_mb_peak": round(sampler.peak_pss_kb / 1024, 1), "gunicorn_pss_mb_end": round(pss_end / 1024, 1),
        "web_processes": len(web), "os_threads_per_web_process": os_threads,
        "torch_threads_per_web_process": torch_threads, "same_url": args.same_url, "serve_log_tail": tail,
    }


def server_env(model_dir: Path, env: dict) -> dict:
    """The environment variables LivetrainServer sets that could change torch's defaults (plus ``env``)."""
    return {"MODEL_DIR": str(model_dir), **{k: str(v) for k, v in env.items()}}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(1000 * seconds, 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["1x1", "1x4", "1x8", "2x2", "2x4"],
                        help="WORKERSxTHREADS configurations, measured in turn (1x8 is the shipped default)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent client threads")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds measured per configuration")
    parser.add_argument("--projects", type=int, default=3, help="Label Studio projects the bodies rotate over")
    parser.add_argument("--train-steps", type=int, default=6, help="SGD steps of the version trained beforehand")
    parser.add_argument("--version", type=Path, help="serve this version directory instead of training one")
    parser.add_argument("--image", help="image to serve (default: a BCCD photo, else a generated picture)")
    parser.add_argument("--same-url", action="store_true",
                        help="every request asks for the same URL (the backend's image cache answers repeats)")
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the server (repeatable)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for config in args.configs:
        w, _, t = config.lower().partition("x")
        if not (w.isdigit() and t.isdigit() and int(w) > 0 and int(t) > 0):
            parser.error(f"bad configuration {config!r}: expected WORKERSxTHREADS, e.g. 2x4")

    stop = threading.Event()

    def on_signal(signum, frame):  # SIGTERM: stop like Ctrl-C, through the finally blocks (servers stopped)
        stop.set()
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    files = FileServer()
    image, image_source = bench_image(args.image)
    image_url = files.add("/bench.jpg", image, "image/jpeg")
    projects = [str(i + 1) for i in range(args.projects)]
    results: list[dict] = []
    failures: dict[str, str] = {}
    version_dir: Path | None = None
    served = None
    try:
        with tempfile.TemporaryDirectory(prefix="bench-throughput-seed-") as seed:
            if args.version:
                version_dir, served = args.version.resolve(), f"version directory {args.version}"
            else:
                started = time.perf_counter()
                version_dir = train_seed_version(files, Path(seed), args.train_steps)
                served = f"trained here on generated shapes ({args.train_steps} steps + decay tail)"
                log.info("trained %s in %.1f s", version_dir.name, time.perf_counter() - started)
            meta = json.loads((version_dir / "meta.json").read_text())
            log.info("serving %s (%s, arch %s, classes %s) in %d project(s); image %s, %s",
                     version_dir.name, served, meta.get("arch"), meta.get("classes"), len(projects), image_source,
                     "same URL every request" if args.same_url else "a distinct URL per request")
            for config in args.configs:
                try:
                    results.append(measure(config, args, version_dir, (image_url, projects), stop))
                except Exception as exc:  # a server that did not start: note it, measure the next one
                    log.exception("%s: failed", config)
                    failures[config] = f"{type(exc).__name__}: {exc}"
                    continue
                r = results[-1]
                log.info("%s: %.2f req/s, p50 %s ms, p95 %s ms, %d error(s)", config, r["requests_per_s"] or 0,
                         r["p50_ms"], r["p95_ms"], r["errors"])
    except KeyboardInterrupt:
        log.warning("interrupted; %d configuration(s) done", len(results))
    finally:
        files.close()

    print(f"\nimage: {image_source} ({'same URL' if args.same_url else 'distinct URL per request: no image-cache hits'}); "
          f"version: {version_dir.name if version_dir else '-'} in {args.projects} project(s); {args.clients} client(s); "
          f"{os.cpu_count()} CPU(s)")
    print(f"{'config':>6} {'req/s':>7} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8} {'ok':>6} {'errors':>6} "
          f"{'RSS MB':>7} {'PSS MB':>7} {'procs':>5} {'torch thr':>9} {'OS thr/proc':>11}")
    for r in results:
        print(f"{r['config']:>6} {r['requests_per_s'] or 0:>7.2f} {r['p50_ms'] or 0:>8.1f} {r['p95_ms'] or 0:>8.1f} "
              f"{r['max_ms'] or 0:>8.1f} {r['ok']:>6} {r['errors']:>6} {r['gunicorn_rss_mb_peak']:>7.1f} "
              f"{r['gunicorn_pss_mb_peak']:>7.1f} {r['web_processes']:>5} {str(r['torch_threads_per_web_process']):>9} "
              f"{','.join(map(str, r['os_threads_per_web_process'])):>11}")
        if r["error_kinds"]:
            print(f"       errors: {r['error_kinds']}")
    for config, why in failures.items():
        print(f"{config:>6} FAILED: {why}")
    print("RSS/PSS: gunicorn master + web processes, peak over the window; torch thr: torch.get_num_threads() "
          "default in a web process (the web processes set none)")
    if args.out:
        args.out.write_text(json.dumps({"image": image_source, "same_url": args.same_url, "projects": args.projects,
                                        "clients": args.clients, "cpus": os.cpu_count(),
                                        "version": version_dir.name if version_dir else None, "served": served,
                                        "results": results,
                                        "failed": failures}, indent=1))
    return 0 if results and len(results) == len(args.configs) else 1


if __name__ == "__main__":
    sys.exit(main())
