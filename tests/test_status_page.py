"""The status page at GET / in a real headless browser (Debian's chromium driven by Playwright), served by the
real Flask app on a real port, on a real embedded Redis, after a short simulated live-training run: two
sessions of the real TrainingSession that feed the live quality and loss series the way the worker does."""

from __future__ import annotations

import os
import re
import threading
import time
from pathlib import Path

import pytest
import requests
import torch
from werkzeug.serving import make_server

from backend.api import create_app
from backend.api import page as status_page
from backend.jobs.connection import connect
from backend.jobs.state import ProjectState
from backend.labelstudio.annotations import LabeledImage
from backend.labelstudio.images import ImageFetcher
from backend.model_store.versions import VersionStore
from backend.model_store.weights import resolve_starting_weights
from backend.settings import Settings
from backend.simulation.editor import CHROMIUM
from backend.training.session import SessionInputs, TrainingSession
from tests.conftest import ImageServer
from tests.livetrain_fixtures import shapes_image

PROJECT = "4"
TITLE = 'Shapes <img src=x onerror="window.injected=1"> & co'  # must show as text, never as HTML
ERROR = "Label Studio answered <b>502</b> & gave up"
BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8"
AUTH = ("pat", "s3cret")


def settings_for(model_dir: Path, **kw) -> Settings:
    base = dict(model_dir=model_dir, download_weights=False, label_studio_url="", min_size=128, batch_size=1,
                warmup_steps=1, decay_steps=1, checkpoint_every=1000, learning_rate=0.01, guard=False,
                image_url_allowlist="127.0.0.1")  # the image server on 127.0.0.1 stands for a third-party host
    return Settings(**(base | kw))


def records(server: ImageServer, seeds) -> list[LabeledImage]:
    out = []
    for seed in seeds:
        png, objects = shapes_image(seed)
        url = server.add(f"/s{seed}.png", png)
        boxes = tuple((100 * x1 / 160, 100 * y1 / 120, 100 * (x2 - x1) / 160, 100 * (y2 - y1) / 120)
                      for x1, y1, x2, y2, _ in objects)
        out.append(LabeledImage(seed + 1, url, seed + 1, f"2026-01-01T00:00:{seed:02d}Z", boxes, tuple(o[4] for o in objects)))
    return out


def session(settings, state: ProjectState, starting, fetcher, labeled: list[LabeledImage], steps: int) -> str:
    """One training session as the worker runs it (jobs/training.py): score the new images (live quality),
    train with a loss point after each step (the worker: every few seconds), decay, publish, report. Returns the version's name."""
    run = TrainingSession(settings, starting, fetcher, SessionInputs(PROJECT, "shapes", ("Square", "Disc")),
                          torch.device("cpu"))
    run.update(labeled)
    for entry in run.score_new(labeled):
        state.add_quality(entry)
    state.set_status(state="training", title=TITLE, labeled_images=len(labeled), session=run.status())
    for _ in range(steps):
        run.step()
        state.add_loss(run.loss_point())
    run.start_decay()
    while not run.decay_done():
        run.step()
    name = run.publish()
    state.add_loss(run.loss_point())
    state.set_status(state="idle", session=None, active_version=name, trained_images=len(labeled),
                     last_session=dict(run.status(), ended_at=time.time(), end_reason="idle"))
    return name


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two sessions (3 images, then 3 more) -> two versions; the series in Redis; a validation mAP and a held-back
    reason in the versions' meta as the validation split / guard write them."""
    torch.manual_seed(0)
    model_dir = tmp_path_factory.mktemp("status-page")
    settings = settings_for(model_dir)
    server = ImageServer()
    state = ProjectState(connect(settings), PROJECT)
    state.mark([1])
    starting = resolve_starting_weights(settings.model_arch, download=False)
    fetcher = ImageFetcher(settings)
    labeled = records(server, range(6))
    names = [session(settings, state, starting, fetcher, labeled[:3], 3),
             session(settings, state, starting, fetcher, labeled, 2)]
    server.close()
    store = VersionStore(model_dir, PROJECT)
    store.update_meta(names[0], validation={"images": 2, "box": {"map": 0.31, "map50": 0.62, "per_class": {}}},
                      held_back={"reason": "validation mAP 0.31 < 0.45 of the active version", "active": "x"})
    store.update_meta(names[1], validation={"images": 2, "box": {"map": 0.45, "map50": 0.71, "per_class": {}}})
    state.add_error("rescore", ERROR)
    return settings, names


@pytest.fixture
def serve(trained, monkeypatch):
    """Start the app on a real port: ``serve(auth=False) -> base URL``."""
    settings, names = trained
    monkeypatch.setattr(status_page, "POLL_IDLE_MS", 1000)  # the page notices changes within a second
    VersionStore(settings.model_dir, PROJECT).set_active(names[-1])
    servers = []

    def start(auth: bool = False) -> str:
        app = create_app(settings_for(settings.model_dir, **(dict(basic_auth_user=AUTH[0], basic_auth_pass=AUTH[1]) if auth else {})))
        server = make_server("127.0.0.1", 0, app, threaded=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}"

    yield start
    for server in servers:
        server.shutdown()


def open_page(browser, url: str, auth: bool = False):
    """A page at ``url`` that records console errors and uncaught exceptions, and accepts confirm() dialogs."""
    context = browser.new_context(viewport={"width": 1366, "height": 768},
                                  http_credentials=dict(username=AUTH[0], password=AUTH[1]) if auth else None)
    page = context.new_page()
    page.problems = []
    page.on("console", lambda m: page.problems.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda exc: page.problems.append(f"page error: {exc}"))
    page.on("dialog", lambda dialog: dialog.accept())
    page.goto(url, wait_until="load")
    page.wait_for_function("document.getElementById('refresh').textContent.startsWith('updated')")
    return page


def path_points(d: str) -> int:
    return len(re.findall(r"[ML]", d or ""))


def chart_counts(page, chart: str) -> dict:
    """Per series of a chart: circles and path points drawn."""
    return page.eval_on_selector_all(
        f'section.project[data-project="{PROJECT}"] figure[data-chart="{chart}"] g.series',
        "gs => Object.fromEntries(gs.map(g => [g.dataset.name, {circles: g.querySelectorAll('circle').length,"
        " path: (g.querySelector('path') || {getAttribute: () => ''}).getAttribute('d')}]))")


def test_json_clients_get_json_at_root_and_health(trained, serve):
    base = serve()
    for accept in (None, "*/*", "application/json", "application/json, text/plain, */*"):
        reply = requests.get(base + "/", headers={"Accept": accept} if accept else {}, timeout=10)
        assert reply.headers["Content-Type"] == "application/json" and reply.json()["status"] == "UP", accept
        assert "Accept" in reply.headers.get("Vary", "")
    reply = requests.get(base + "/health", headers={"Accept": BROWSER_ACCEPT}, timeout=10)
    assert reply.headers["Content-Type"] == "application/json" and reply.json()["status"] == "UP"
    html = requests.get(base + "/", headers={"Accept": BROWSER_ACCEPT}, timeout=10)
    assert html.headers["Content-Type"].startswith("text/html")
    # server-rendered (no JavaScript): escaped title and error, the charts drawn, both versions listed
    text = html.text
    assert "&lt;img src=x" in text and "<img src=x" not in text and "&lt;b&gt;502&lt;/b&gt;" in text
    _, names = trained
    assert all(f'data-version="{name}"' in text for name in names)
    losses = len(ProjectState(connect(trained[0]), PROJECT).loss_series())
    # 6 quality points, the loss points (few: with markers), box mAP and mAP50 of 2 versions
    assert text.count('<circle class="pt"') == 6 + losses + 2 + 2
    view = requests.get(f"{base}/projects/{PROJECT}/dashboard", timeout=10).json()
    assert view["counts"]["quality"] == 6 and [v["name"] for v in view["versions"]] == names
    assert requests.get(base + "/dashboard", timeout=10).json()["projects"][0]["id"] == PROJECT


def test_page_shows_session_plots_versions_and_errors(trained, serve, browser):
    settings, names = trained
    state = ProjectState(connect(settings), PROJECT)
    quality, loss = state.quality_series(), state.loss_series()
    assert len(quality) == 6 and len(loss) >= 4
    page = open_page(browser, serve())
    card = page.locator(f'section.project[data-project="{PROJECT}"]')
    assert card.locator('[data-role="title"]').text_content() == TITLE
    assert page.evaluate("window.injected") is None
    assert card.locator('dd[data-key="active_version"]').text_content() == names[-1]
    assert card.locator('dd[data-key="labeled_images"]').text_content() == "6"
    assert card.locator('[data-role="session-title"]').text_content() == "Last session"
    # the live quality per image: one circle per point, the rolling mean as a line through all of them
    counts = chart_counts(page, "quality")
    assert counts["score per image"]["circles"] == len(quality)
    assert path_points(counts["rolling mean of 10"]["path"]) == len(quality)
    assert path_points(chart_counts(page, "loss")["training loss"]["path"]) == len(loss)
    assert chart_counts(page, "map")["box mAP"]["circles"] == 2
    assert card.locator('figure[data-chart="quality"] text.tick').count() >= 4  # axes have ticks and labels
    # the versions table, newest last, with the held-back reason
    rows = card.locator("tbody[data-role=versions] tr")
    assert [rows.nth(i).get_attribute("data-version") for i in range(rows.count())] == names
    assert "held back: validation mAP 0.31" in rows.nth(0).locator("td.c-held_back").text_content()
    assert rows.nth(1).locator("td.c-validation").text_content() == "box 0.450 / 0.710"
    assert card.locator("ul[data-role=errors] .message").first.text_content() == ERROR
    # a session starts: the page follows by itself (polling /dashboard), re-drawing the plots
    state.set_status(state="training", session={"steps": 7, "mode": "heads", "phase": "constant", "started_at": time.time()})
    for k in range(3):
        state.add_quality({"task": 100 + k, "time": time.time(), "version": names[-1], "score": 0.5, "counts": {}})
    page.wait_for_function(
        f"document.querySelectorAll('section.project figure[data-chart=quality] circle').length === {len(quality) + 3}",
        timeout=15000)
    assert card.locator('[data-role="state"]').text_content() == "training"
    assert card.locator('dd[data-key="session_steps"]').text_content() == "7"
    page.screenshot(path=str(settings.model_dir / "status.png"), full_page=True)
    assert page.problems == []
    page.context.close()
    for extra in range(3):  # leave the series as the other tests expect them
        state.r.rpop(state.quality_key)
    state.set_status(state="idle", session=None)


@pytest.mark.parametrize("auth", [False, True], ids=["open", "basic-auth"])
def test_rollback_button_serves_an_older_version(trained, serve, browser, auth):
    settings, names = trained
    base = serve(auth)
    if auth:
        assert requests.get(base + "/dashboard", timeout=10).status_code == 401
        assert requests.get(base + "/", headers={"Accept": BROWSER_ACCEPT}, timeout=10).status_code == 401
    page = open_page(browser, base + "/", auth)
    card = page.locator(f'section.project[data-project="{PROJECT}"]')
    assert card.locator("tr.active").get_attribute("data-version") == names[-1]
    assert card.locator(f'tr[data-version="{names[-1]}"] button.rollback').is_disabled()
    card.locator(f'tr[data-version="{names[0]}"] button.rollback').click()
    page.wait_for_function(
        f"document.querySelector('tr.active') && document.querySelector('tr.active').dataset.version === '{names[0]}'",
        timeout=15000)
    assert VersionStore(settings.model_dir, PROJECT).active() == names[0]
    assert card.locator('dd[data-key="active_version"]').text_content() == names[0]
    assert card.locator('[data-role="message"]').text_content() == f"Now serving {names[0]}."
    assert card.locator(f'tr[data-version="{names[0]}"] button.rollback').is_disabled()
    # re-scoring follows the served version (RESCORE_ON_PUBLISH): its progress shows up
    page.wait_for_function("document.querySelector('[data-role=jobs] .job-label')")
    assert page.problems == []
    page.context.close()


def test_screenshot_script(trained, serve, tmp_path):
    if not Path(CHROMIUM).exists() and not os.environ.get("CI"):
        pytest.skip(f"{CHROMIUM} is not installed")
    import subprocess
    import sys

    out = tmp_path / "page.png"
    done = subprocess.run([sys.executable, "scripts/screenshot_status.py", serve() + "/", str(out)],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_page_shows_the_label_stream(trained, serve, browser):
    """The label stream block: sampling mode, clusters, the next tasks Label Studio serves, how far behind the
    active version the stream's scores are; refreshed by the page like the rest."""
    settings, names = trained
    state = ProjectState(connect(settings), PROJECT)
    stream = {"label_stream": "uncertainty", "sampling": "Uncertainty sampling", "model_version": names[0],
              "switched": {"from": "Sequential sampling", "to": "Uncertainty sampling", "at": time.time()},
              "clusters": 2, "embedded": 9, "updated_at": time.time(),
              "per_cluster": [{"cluster": 0, "tasks": 5, "labeled": 2}, {"cluster": 1, "tasks": 4, "labeled": 0}],
              "next": [{"task": 31, "score": 0.1234, "cluster": 1}, {"task": 35, "score": 0.2, "cluster": 0}]}
    state.set_status(stream=stream)
    state.r.set(state.moved_version_key, 0)  # the stream's scores are of no trained version yet
    try:
        page = open_page(browser, serve())
        card = page.locator(f'section.project[data-project="{PROJECT}"]')
        assert card.locator('[data-role="stream"]').is_visible()
        assert card.locator('dd[data-key="stream_sampling"]').text_content() == \
            "Uncertainty sampling (set by livetrain; was Sequential sampling)"
        assert card.locator('dd[data-key="stream_covered"]').text_content() == "1"
        behind = card.locator('dd[data-key="stream_behind"]').text_content()
        assert behind.startswith(f"{int(names[-1].rsplit('-v', 1)[1])} version(s)"), behind
        rows = card.locator("tbody[data-role=stream-next] tr")
        assert [rows.nth(i).locator("td").all_text_contents() for i in range(rows.count())] == \
            [["31", "0.1234", "1"], ["35", "0.2000", "0"]]
        assert card.locator("tbody[data-role=stream-clusters] tr").count() == 2
        # re-scoring caught up: the page follows by itself
        state.set_status(state="training", stream=dict(stream, next=[{"task": 40, "score": 0.05, "cluster": 1}]))
        state.r.set(state.moved_version_key, int(names[-1].rsplit("-v", 1)[1]))
        page.wait_for_function("document.querySelectorAll('tbody[data-role=stream-next] tr').length === 1",
                               timeout=15000)
        assert card.locator('dd[data-key="stream_behind"]').text_content() == "up to date"
        card.screenshot(path=str(settings.model_dir / "status-stream.png"))
        assert page.problems == []
        page.context.close()
    finally:
        state.r.hdel(state.status_key, "stream")
        state.r.delete(state.moved_version_key)
        state.set_status(state="idle")
