"""What the status page shows of each project, as one JSON-able view model (``GET /dashboard``).

The server-rendered page (templates/status.html) and the browser's refresh (static/status.js) both draw from
this dict, so every number is formatted once, here. It reads Redis (ProjectState) and the version store, and
reads version meta defensively: fields other parts of livetrain add later (``validation``, ``held_back``) may
be missing or shaped differently.
"""

from __future__ import annotations

import logging
import math
import time
from numbers import Real

from backend.api import plots
from backend.jobs.state import QUALITY_WINDOW, ProjectState, known_projects
from backend.jobs.stream import stream_report
from backend.model_store.stores import list_projects, version_store

log = logging.getLogger(__name__)

BUSY = ("training", "syncing", "queued")  # project states during which the page refreshes quickly
JOB_BUSY = ("queued", "running", "waiting")
JOBS = (("stream_job", "Label stream (embedding, clusters)"), ("rescore", "Re-scoring unlabeled tasks"),
        ("complete", "Complete (pre-labeling)"))


# -- formatting ---------------------------------------------------------------------------------------
def number(value) -> float | None:
    return float(value) if isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value) else None


def fmt(value, digits: int = 3, empty: str = "–") -> str:
    n = number(value)
    if n is None:
        return empty
    return str(int(round(n))) if digits == 0 else f"{n:.{digits}f}"


def fmt_time(epoch, now: float | None = None) -> str:
    """``2025-07-07 17:47:03 (3 min ago)``: the server's local time and how long ago."""
    t = number(epoch)
    if t is None:
        return "–"
    return f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(t))} ({ago(t, now)})"


def ago(epoch: float, now: float | None = None) -> str:
    seconds = max(0.0, (time.time() if now is None else now) - epoch)
    if seconds < 60:
        return f"{seconds:.0f} s ago"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 86400:
        return f"{seconds / 3600:.1f} h ago"
    return f"{seconds / 86400:.1f} days ago"


def fmt_duration(seconds) -> str:
    s = number(seconds)
    if s is None:
        return "–"
    if s < 90:
        return f"{s:.0f} s"
    return f"{s / 60:.1f} min" if s < 5400 else f"{s / 3600:.1f} h"


def fact(label: str, value: str, key: str = "") -> dict:
    return {"key": key or label.lower().replace(" ", "_"), "label": label, "value": value}


# -- version meta, read defensively ------------------------------------------------------------------------
def validation_of(meta: dict) -> dict:
    """``{"box": {"map", "map50"}, "mask": {...}, "images"}`` numbers from ``meta["validation"]`` (empty if none)."""
    raw = meta.get("validation")
    if not isinstance(raw, dict):
        return {}
    out = {}
    for kind in ("box", "mask"):
        part = raw.get(kind)
        if isinstance(part, dict) and (number(part.get("map")) is not None or number(part.get("map50")) is not None):
            out[kind] = {"map": number(part.get("map")), "map50": number(part.get("map50"))}
    if out and number(raw.get("images")) is not None:
        out["images"] = int(raw["images"])
    return out


def held_back_of(meta: dict) -> str:
    """Why the version was held back (not served), or ''."""
    raw = meta.get("held_back")
    if not raw:
        return ""
    if isinstance(raw, dict):
        return str(raw.get("reason") or "held back")
    return raw if isinstance(raw, str) else "held back"


def version_row(meta: dict, now: float) -> dict:
    validation = validation_of(meta)
    val = []
    for kind in ("box", "mask"):
        if kind in validation:
            v = validation[kind]
            val.append(f"{kind} {fmt(v['map'])} / {fmt(v['map50'])}")
    losses = meta.get("losses") if isinstance(meta.get("losses"), dict) else {}
    held = held_back_of(meta)
    cells = [
        {"key": "name", "text": str(meta.get("name", "?"))},
        {"key": "active", "text": "active" if meta.get("active") else ""},
        {"key": "images", "text": fmt(meta.get("images"), 0)},
        {"key": "new_images", "text": fmt(meta.get("new_images"), 0)},
        {"key": "mode", "text": str(meta.get("mode") or "–")},
        {"key": "steps", "text": fmt(meta.get("steps"), 0)},
        {"key": "loss", "text": fmt(losses.get("loss"))},
        {"key": "quality", "text": fmt(meta.get("quality"))},
        {"key": "validation", "text": "; ".join(val) or "–"},
        {"key": "held_back", "text": f"held back: {held}" if held else ""},
        {"key": "published", "text": fmt_time(meta.get("published_at"), now)},
    ]
    return {"name": str(meta.get("name", "?")), "active": bool(meta.get("active")), "held_back": held,
            "validation": validation, "cells": cells}


VERSION_COLUMNS = ["Version", "Active", "Images", "New images", "Mode", "Steps", "Loss", "Quality",
                   "Validation mAP (mAP / mAP50)", "Held back", "Published"]


# -- charts -----------------------------------------------------------------------------------------------
def rolling_mean(values: list[float], window: int = QUALITY_WINDOW) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def quality_chart(series: list[dict]) -> dict:
    scores = [number(e.get("score")) if isinstance(e, dict) else None for e in series]
    scores = [s for s in scores if s is not None]
    xs = range(1, len(scores) + 1)
    mean = rolling_mean(scores)
    return plots.chart([  # the points drawn over the line
        {"name": f"rolling mean of {QUALITY_WINDOW}", "cls": "s-mean", "kind": "line", "points": list(zip(xs, mean))},
        {"name": "score per image", "cls": "s-raw", "kind": "points", "points": list(zip(xs, scores))},
    ], title="Live quality per newly labeled image", x_label="newly labeled image", y_label="quality",
        y_range=(0.0, 1.0), x_integer=True)


def loss_chart(series: list[dict]) -> dict:
    """Training loss against the project's cumulative training steps (every session, in order)."""
    points, steps = [], 0
    for e in series:
        if not isinstance(e, dict) or number(e.get("loss")) is None:
            continue
        steps += int(number(e.get("steps")) or 1)
        points.append((steps, number(e["loss"])))
    kind = "both" if len(points) <= 40 else "line"  # a few points: markers too (one point makes no line)
    return plots.chart([{"name": "training loss", "cls": "s-loss", "kind": kind, "points": points}],
                       title="Training loss", x_label="training steps (all sessions)", y_label="loss",
                       y_from_zero=True, x_integer=True)


def map_chart(rows: list[dict]) -> dict | None:
    """mAP on the validation split per version; None when no version has one."""
    numbered = []
    for row in rows:
        head, _, n = row["name"].rpartition("-v")
        if row["validation"] and n.isdigit():
            numbered.append((int(n), row["validation"]))
    if not numbered:
        return None
    series = []
    for kind in ("box", "mask"):
        for key, label in (("map", "mAP"), ("map50", "mAP50")):
            pts = [(n, v[kind][key]) for n, v in numbered if kind in v and v[kind][key] is not None]
            if pts:
                series.append({"name": f"{kind} {label}", "cls": f"s-{kind}-{key}", "kind": "both", "points": pts})
    return plots.chart(series, title="Validation mAP per version", x_label="version", y_label="mAP",
                       y_range=(0.0, 1.0), x_tick_labels={n: f"v{n}" for n, _ in numbered})


# -- one project ----------------------------------------------------------------------------------------------
def session_facts(session: dict, now: float, running: bool) -> list[dict]:
    step_s = session.get("step_s") if isinstance(session.get("step_s"), dict) else {}
    mode = session.get("mode")
    facts = [
        fact("Steps", fmt(session.get("steps"), 0), "session_steps"),
        fact("Total steps", fmt(session.get("total_steps"), 0), "session_total_steps"),
        fact("Mode", str(mode or "–"), "session_mode"),
        fact("Phase", str(session.get("phase") or "–"), "session_phase"),
        fact("Images", fmt(session.get("images"), 0), "session_images"),
        fact("Versions published", fmt(session.get("versions"), 0), "session_versions"),
        fact("Learning rate", f"{number(session.get('lr')):.3g}" if number(session.get("lr")) is not None else "–",
             "session_lr"),
        fact("Loss", fmt(session.get("loss"), 4), "session_loss"),
        fact("Step time", f"{fmt(step_s.get(mode))} s" if number(step_s.get(mode)) is not None else "–", "session_step_s"),
        fact("Started", fmt_time(session.get("started_at"), now), "session_started"),
    ]
    if not running:
        facts.append(fact("Ended", f"{fmt_time(session.get('ended_at'), now)}: {session.get('end_reason') or '?'}",
                          "session_ended"))
    return facts


def job_progress(kind: str, label: str, report) -> dict | None:
    if not isinstance(report, dict) or not report.get("state"):
        return None
    done, total = number(report.get("done")) or 0, number(report.get("total")) or 0
    pct = round(100 * done / total) if total else (100 if report.get("state") == "done" else 0)
    parts = [str(report["state"])]
    if total:
        parts.append(f"{int(done)}/{int(total)} tasks")
    if report.get("version"):
        parts.append(f"version {report['version']}")
    if number(report.get("failed")):
        parts.append(f"{int(report['failed'])} failed")
    if report.get("error"):
        parts.append(str(report["error"]))
    elif report.get("reason"):
        parts.append(str(report["reason"]))
    return {"kind": kind, "label": label, "state": str(report["state"]), "pct": max(0, min(100, pct)),
            "text": " · ".join(parts), "busy": report.get("state") in JOB_BUSY}


def stream_view(report: dict | None, now: float) -> dict | None:
    """The label stream: how Label Studio picks the next task, the clusters, the next tasks it will serve."""
    if not isinstance(report, dict):
        return None
    behind = report.get("behind") if isinstance(report.get("behind"), dict) else {}
    versions = number(behind.get("versions"))
    lag = "–" if versions is None else ("up to date" if not versions else
                                         f"{int(versions)} version(s), {fmt_duration(behind.get('seconds'))}")
    switched = report.get("switched") if isinstance(report.get("switched"), dict) else None
    mode = str(report.get("sampling") or "–")
    if switched and switched.get("to") and switched.get("from") != switched.get("to"):
        mode += f" (set by {switched.get('by') or 'livetrain'}; was {switched.get('from') or '–'})"
    per_cluster = [c for c in report.get("per_cluster") or () if isinstance(c, dict)]
    facts = [
        fact("Sampling in Label Studio", mode, "stream_sampling"),
        fact("LABEL_STREAM", str(report.get("label_stream") or "–"), "stream_setting"),
        fact("Clusters", fmt(report.get("clusters"), 0), "stream_clusters"),
        fact("Clusters with a label", str(sum(1 for c in per_cluster if number(c.get("labeled")))), "stream_covered"),
        fact("Tasks clustered", fmt(report.get("embedded"), 0), "stream_embedded"),
        fact("Scores of version", str(report.get("model_version") or "–"), "stream_version"),
        fact("Behind the active version", lag, "stream_behind"),
        fact("Updated", fmt_time(report.get("updated_at"), now), "stream_updated"),
    ]
    upcoming = [[str(n.get("task")), fmt(n.get("score"), 4), fmt(n.get("cluster"), 0)]
                for n in report.get("next") or () if isinstance(n, dict)]
    clusters = [[fmt(c.get("cluster"), 0), fmt(c.get("tasks"), 0), fmt(c.get("labeled"), 0)] for c in per_cluster]
    return {"facts": facts, "next": upcoming, "clusters": clusters}


def project_view(settings, connection, project: str, now: float | None = None) -> dict:
    """Everything the page shows of one project."""
    now = time.time() if now is None else now
    state = ProjectState(connection, project)
    status = state.status()
    quality = state.quality_series()
    loss = state.loss_series()
    errors = state.recent_errors()
    store = version_store(settings, project)
    try:
        metas = store.list()
    except (OSError, ValueError) as exc:  # a version directory vanishing mid-read (pruned): the next refresh sees it
        log.warning("project %s: cannot list versions: %s", project, exc)
        metas = []
    rows = [version_row(m, now) for m in metas]
    # from the listing: no second read of ACTIVE, and an unreachable object store shows as no versions, not a 500
    active = next((m["name"] for m in metas if m.get("active")), None)
    window = status.get("quality") if isinstance(status.get("quality"), dict) else {}
    running = status.get("session") if isinstance(status.get("session"), dict) else None
    last = status.get("last_session") if isinstance(status.get("last_session"), dict) else None
    session = running or last
    facts = [
        fact("Active version", active or "none yet (starting weights)", "active_version"),
        fact("Labeled images", fmt(status.get("labeled_images"), 0), "labeled_images"),
        fact("Trained images", fmt(status.get("trained_images"), 0), "trained_images"),
        fact(f"Quality (mean of last {QUALITY_WINDOW})", fmt(window.get("rolling_mean")), "quality"),
        fact("Versions kept", str(len(rows)), "versions"),
        fact("Updated", fmt_time(status.get("updated_at"), now), "updated"),
    ]
    jobs = [j for kind, label in JOBS if (j := job_progress(kind, label, status.get(kind)))]
    stream = stream_view(stream_report(settings, connection, project, status), now)
    state_name = str(status.get("state") or "idle")
    return {
        "id": project,
        "title": str(status.get("title") or f"Project {project}"),
        "state": state_name,
        "busy": state_name in BUSY or any(j["busy"] for j in jobs),
        "waiting": str(status.get("waiting") or ""),
        "last_error": str(status.get("last_error") or ""),
        "active_version": active,
        "facts": facts,
        "session": {"title": "Session running" if running else "Last session",
                    "facts": session_facts(session, now, bool(running))} if session else None,
        "jobs": jobs,
        "stream": stream,
        "charts": {"quality": quality_chart(quality), "loss": loss_chart(loss), "map": map_chart(rows)},
        "counts": {"quality": len(quality), "loss": len(loss), "versions": len(rows)},
        "versions": rows,
        "errors": [{"time": fmt_time(e.get("time"), now), "source": str(e.get("source", "")),
                    "message": str(e.get("message", ""))} for e in reversed(errors) if isinstance(e, dict)],
    }


def projects(settings, connection) -> list[str]:
    """Projects Redis knows, and those with versions in the store (e.g. after Redis lost its data)."""
    known = set(known_projects(connection))
    try:
        known |= set(list_projects(settings))
    except OSError as exc:  # the object store unreachable: show what Redis knows
        log.warning("cannot list the projects in the version store: %s", exc)
    return sorted(known, key=lambda p: (0, int(p), p) if p.isdigit() else (1, 0, p))


def dashboard(settings, connection, health: dict | None = None) -> dict:
    now = time.time()
    views = [project_view(settings, connection, p, now) for p in projects(settings, connection)]
    return {"generated_at": now, "generated": fmt_time(now, now), "busy": any(v["busy"] for v in views),
            "health": health or {}, "columns": VERSION_COLUMNS, "projects": views}
