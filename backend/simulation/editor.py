"""Label Studio's labeling page in a real headless browser, driven as an annotator drives it.

Used by the e2e browser test (``tests/test_e2e_label_studio.py``) and ``scripts/bench_editor.py``. The page is
Label Studio 1.23.2's data manager with a task open (``/projects/<id>/data?task=<id>``): the editor builds
the annotator's draft from the task's prediction (when the project's model version matches it), lists its
regions in the outliner, and Submit stores the draft as an annotation. Needs ``playwright`` (the [test] extra)
and a chromium binary (Debian's ``chromium``); nothing is downloaded.

How the page is read:
- the regions the editor holds: ``window.Htx`` (the editor's store, which Label Studio exposes), serialized
  as Label Studio would submit them;
- what the annotator sees: the outliner's items and a screenshot;
- where a point is on screen: the task image's box in the page (the editor draws the regions over it, in percent of it).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")  # Debian's; another build's binary via CHROMIUM_PATH
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

# the annotator's draft as Label Studio would submit it: one result per region (an RLE region carries its rle).
# Serializing re-encodes every brush region through an image-size canvas, so it is read once, not polled.
_DRAFT = "(window.Htx && window.Htx.annotationStore.selected) ? window.Htx.annotationStore.selected.serializeAnnotation() : null"
# how many regions the draft holds, cheaply (what the wait polls)
_REGIONS = "(window.Htx && window.Htx.annotationStore.selected) ? window.Htx.annotationStore.selected.regions.length : -1"
LISTED = 5  # the Regions panel is a virtual list: at the default viewport it renders the first ~7 items only
# the task image as the editor shows it: the largest decoded <img> on the page (thumbnails in the task list are small)
_IMAGE_BOX = """(() => {
  const shown = Array.from(document.querySelectorAll('img')).filter(e => e.naturalWidth > 0)
    .map(e => e.getBoundingClientRect()).sort((a, b) => b.width * b.height - a.width * a.height);
  return shown.length ? [shown[0].x, shown[0].y, shown[0].width, shown[0].height] : null;
})()"""


@dataclass
class Shown:
    seconds: float  # from the navigation's start until the editor held every region, the image was drawn and the outliner listed them
    draft: list  # the annotator's draft (Label Studio results)
    outliner: list[str]  # the label of each region the outliner lists (the first LISTED at least; it renders only what fits)


class LabelingPage:
    """One logged-in browser tab on a Label Studio."""

    def __init__(self, browser, url: str, user: str, password: str, viewport=(1400, 900)):
        self.url = url.rstrip("/")
        self.context = browser.new_context(viewport={"width": viewport[0], "height": viewport[1]})
        self.page = self.context.new_page()
        self.problems: list[str] = []  # uncaught exceptions in the page
        self.page.on("pageerror", lambda exc: self.problems.append(str(exc)))
        self.page.goto(self.url + "/user/login/")
        self.page.fill("input[name=email]", user)
        self.page.fill("input[name=password]", password)
        self.page.click("button[type=submit]")
        try:
            self.page.wait_for_url(lambda url: "/user/login" not in url, timeout=30000)
        except Exception:  # playwright's TimeoutError: still on the login page
            raise RuntimeError(f"Label Studio at {self.url} refused the login of {user}") from None
        self.page.wait_for_load_state("networkidle")

    def open(self, project: int, task: int, regions: int, timeout: float = 60.0) -> Shown:
        """Open ``task`` as an annotator does (the task in the project's data manager) and wait until the editor
        holds ``regions`` regions, has drawn the task's image and the outliner lists them (the first LISTED:
        it renders only what fits); ``seconds`` counts from the navigation's start, as the page's own clock
        (``performance.now()``) does."""
        from playwright.sync_api import TimeoutError as PlaywrightTimeout

        began = time.monotonic()
        self.page.goto(f"{self.url}/projects/{project}/data?task={task}")
        try:  # one snapshot, taken when the condition first holds: the outliner and the page's clock
            shown = self.page.wait_for_function(
                f"""(() => {{ const listed = Array.from(document.querySelectorAll('.lsf-outliner-item__title'))
                                         .map(e => e.innerText.trim()).filter(t => t);
                     const drawn = Array.from(document.querySelectorAll('img'))
                                         .some(e => e.complete && e.naturalWidth > 0 && e.getBoundingClientRect().width > 200);
                     return ({_REGIONS}) === {regions} && drawn && listed.length >= Math.min({regions}, {LISTED})
                            && {{listed: listed, now: performance.now()}}; }})()""",
                timeout=timeout * 1000, polling=50).json_value()
        except PlaywrightTimeout:
            held = self.page.evaluate(_REGIONS)
            raise TimeoutError(f"task {task} of project {project}: after {timeout:.0f} s the editor holds "
                               f"{'no annotation' if held < 0 else f'{held} regions'}, not {regions} "
                               f"({self.page.url}; page errors: {self.problems})") from None
        seconds = shown["now"] / 1000.0
        if not 0 < seconds <= time.monotonic() - began + 1.0:  # the page's clock must agree with ours
            seconds = time.monotonic() - began
        self.page.wait_for_load_state("networkidle")  # the data manager settles before anyone clicks
        return Shown(seconds, self.draft(), shown["listed"])

    def draft(self) -> list:
        return self.page.evaluate(_DRAFT) or []

    def outliner(self) -> list[str]:
        return [t.strip() for t in self.page.locator(".lsf-outliner-item__title").all_inner_texts()]

    def image_box(self) -> tuple[float, float, float, float]:
        box = self.page.evaluate(_IMAGE_BOX)
        if not box:
            raise RuntimeError("the labeling page shows no image")
        return tuple(box)

    def at(self, point: tuple[float, float]) -> tuple[float, float]:
        """Page coordinates of a point given in percent of the image, as Label Studio stores points."""
        x, y, width, height = self.image_box()
        return x + point[0] / 100 * width, y + point[1] / 100 * height

    def drag_point(self, region: int, point: tuple[float, float], by: tuple[float, float]) -> None:
        """Select the ``region``-th region in the Regions panel (listed in the draft's order), then drag its vertex
        at ``point`` (percent of the image) by ``by`` screen pixels, in small moves, as a hand does. Selecting in
        the panel, not on the canvas: overlapping predictions make a click on the image pick whichever is on top."""
        self.page.locator(".lsf-outliner-item").nth(region).click()
        self.page.wait_for_timeout(300)
        x, y = self.at(point)
        self.page.mouse.move(x, y)
        self.page.mouse.down()
        self.page.mouse.move(x + by[0] / 2, y + by[1] / 2, steps=5)
        self.page.mouse.move(x + by[0], y + by[1], steps=5)
        self.page.mouse.up()
        self.page.wait_for_timeout(300)

    def submit(self, timeout: float = 30.0) -> None:
        """Click Submit and wait for Label Studio to store the annotation (the POST's answer)."""
        with self.page.expect_response(lambda r: "/api/tasks/" in r.url and "/annotations" in r.url
                                       and r.request.method == "POST", timeout=timeout * 1000) as answer:
            self.page.click("button:has-text('Submit')")
        if not answer.value.ok:
            raise RuntimeError(f"Label Studio answered the submit with {answer.value.status}")

    def screenshot(self, path) -> None:
        self.page.screenshot(path=str(path))

    def close(self) -> None:
        self.context.close()


def best_predicted_task(ls, project: int, version: str) -> tuple[int, list] | None:
    """The unlabeled task whose prediction of ``version`` has the most regions, and those regions (None: no
    unlabeled task has one). ``ls``: a ``LabelStudioAPI``."""
    found = [(len(p["result"]), -t["id"], t["id"], p["result"]) for t in ls.tasks(project)
             if not t["total_annotations"] for p in t["predictions"] if p["model_version"] == version and p["result"]]
    if not found:
        return None
    _, _, task, result = max(found, key=lambda f: f[:2])
    return task, result


def screenshot_prediction(ls, url: str, user: str, password: str, project: int, version: str, path,
                          viewport=(1400, 900)) -> dict:
    """Open the unlabeled task with the largest prediction of ``version`` in Label Studio's labeling page and
    save a screenshot (``livetrain simulate --editor-screenshot``); what it showed, as a dict."""
    from playwright.sync_api import sync_playwright

    best = best_predicted_task(ls, project, version)
    if best is None:
        return {"skipped": f"no unlabeled task of project {project} has a prediction of {version}"}
    task, result = best
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = LabelingPage(browser, url, user, password, viewport)
            shown = page.open(project, task, len(result))
            page.page.wait_for_timeout(500)  # the canvas draws after the store holds the regions
            page.screenshot(path)
        finally:
            browser.close()
    return {"task": task, "version": version, "regions": len(result), "shown_s": round(shown.seconds, 2),
            "outliner": len(shown.outliner), "path": str(path)}
