"""``livetrain simulate --order next``: label what Label Studio's label stream serves, and how fresh it was.

Each pick is ``GET /api/projects/<id>/next/``, as the labeling UI's "Label All Tasks" does. The pick records the
project's model_version at that moment (the version whose scores ordered it), the active version, how many versions
the active one is ahead, and for how many seconds the stream's scores had been stale (since the first newer version
was published) - the lag the status page shows too.
"""

from __future__ import annotations

import statistics
import time

import requests

from backend.jobs.state import version_number
from backend.simulation.ls_api import LabelStudioAPI


def next_pick(ls: LabelStudioAPI, ml: requests.Session, ml_url: str, project: int) -> tuple[dict, dict]:
    """The task /next/ serves now, and the staleness record of the pick."""
    stream_version = ls.project(project).get("model_version")
    served = ls.next_task(project)
    reply = ml.get(ml_url + "/versions", params={"project": project}, timeout=10)
    reply.raise_for_status()
    versions = reply.json()["details"].get(str(project), [])
    ordered_by = [p for p in served.get("predictions") or () if p.get("model_version") == stream_version]
    active = next((v for v in versions if v.get("active")), None)
    behind, seconds = 0, 0.0
    if active is not None:
        mine = version_number(stream_version or "")
        newer = [v for v in versions if version_number(v["name"]) > mine and v.get("published_at")]
        behind = max(0, version_number(active["name"]) - mine)
        seconds = round(time.time() - min(v["published_at"] for v in newer), 1) if behind and newer else 0.0
    return served, {"stream_version": stream_version, "active_version": active["name"] if active else None,
                    "versions_behind": behind, "seconds_behind": seconds,
                    "stream_score": ordered_by[0].get("score") if ordered_by else None,
                    "stream_cluster": ordered_by[0].get("cluster") if ordered_by else None,
                    "served_by_stream": bool(ordered_by)}


def staleness_summary(records: list[dict]) -> dict:
    """For ``order="next"`` runs: how far behind the active version the picked tasks' predictions were."""
    picks = [r for r in records if "versions_behind" in r]
    if not picks:
        return {}
    trained = [r for r in picks if r.get("active_version")]  # before the first version nothing can be behind
    out = {"picks_by_stream": sum(1 for r in picks if r.get("served_by_stream")),
           "clusters_covered": len({r.get("stream_cluster") for r in picks if r.get("stream_cluster") is not None})}
    if trained:
        out.update(median_versions_behind=statistics.median(r["versions_behind"] for r in trained),
                   max_versions_behind=max(r["versions_behind"] for r in trained),
                   median_seconds_behind=round(statistics.median(r["seconds_behind"] for r in trained), 1),
                   max_seconds_behind=max(r["seconds_behind"] for r in trained))
    return out
