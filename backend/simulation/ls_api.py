"""What a Label Studio user does, through Label Studio's REST API (the calls the UI makes): create a
project, import images, connect the ML backend, open tasks, submit / update / delete annotations.

The backend itself talks to Label Studio through ``backend.labelstudio.client``; this is the person's side.
"""

from __future__ import annotations

import json
import time

import requests


class LabelStudioError(RuntimeError):
    pass


class LabelStudioAPI:
    def __init__(self, url: str, token: str | None = None, pat: str | None = None, timeout: float = 120.0):
        self.url, self.timeout = url.rstrip("/"), timeout
        self.session = requests.Session()
        if pat:  # a PAT is a JWT refresh token: exchange it for an access token first
            reply = requests.post(f"{self.url}/api/token/refresh/", json={"refresh": pat}, timeout=10)
            reply.raise_for_status()
            self.session.headers["Authorization"] = "Bearer " + reply.json()["access"]
        else:
            self.session.headers["Authorization"] = f"Token {token}"

    def request(self, method: str, path: str, expect=(200, 201, 204), **kw):
        kw.setdefault("timeout", self.timeout)
        reply = self.session.request(method, self.url + path, **kw)
        if expect and reply.status_code not in expect:
            raise LabelStudioError(f"{method} {path} -> {reply.status_code}: {reply.text[:500]}")
        try:
            return reply.json()
        except ValueError:
            return reply.text

    # projects and tasks -------------------------------------------------------------------------------
    def create_project(self, title: str, label_config: str, **extra) -> dict:
        body = {"title": title, "label_config": label_config, "sampling": "Uncertainty sampling",
                "show_collab_predictions": True, **extra}
        return self.request("POST", "/api/projects/", json=body)

    def project(self, project: int) -> dict:
        return self.request("GET", f"/api/projects/{project}/")

    def update_project(self, project: int, **fields) -> dict:
        return self.request("PATCH", f"/api/projects/{project}/", json=fields)

    def import_images(self, project: int, files: list[tuple[str, bytes]], batch: int = 20) -> list[dict]:
        """Upload image files as tasks (one multipart field per file: LS keeps one file per field name);
        returns the project's tasks in id order."""
        for start in range(0, len(files), batch):
            chunk = files[start:start + batch]
            fields = [(f"file{i}", (name, data, "application/octet-stream")) for i, (name, data) in enumerate(chunk)]
            self.request("POST", f"/api/projects/{project}/import", files=fields)
        deadline = time.monotonic() + 60
        while True:
            tasks = self.tasks(project)
            if len(tasks) >= len(files):
                return tasks
            if time.monotonic() > deadline:
                raise LabelStudioError(f"project {project} has {len(tasks)} tasks after importing {len(files)} images")
            time.sleep(0.5)

    def tasks(self, project: int, fields: str = "all", query: dict | None = None) -> list[dict]:
        out, page = [], 1
        while True:
            params = {"project": project, "fields": fields, "page": page, "page_size": 100}
            if query:
                params["query"] = json.dumps(query)
            reply = self.request("GET", "/api/tasks/", params=params, expect=(200, 404))
            batch = reply.get("tasks", []) if isinstance(reply, dict) else []
            out += batch
            if len(batch) < 100:
                return sorted(out, key=lambda t: t["id"]) if not query else out
            page += 1

    def open_task(self, task: int) -> dict:
        """What the labeling UI does when a task is opened: Label Studio asks the ML backend for a
        prediction if the task has none of the project's model version, and stores it."""
        return self.request("GET", f"/api/tasks/{task}/")

    def next_task(self, project: int) -> dict:
        return self.request("GET", f"/api/projects/{project}/next/")

    # annotations --------------------------------------------------------------------------------------
    def annotate(self, task: int, result: list[dict], **extra) -> dict:
        return self.request("POST", f"/api/tasks/{task}/annotations/", json={"result": result, **extra})

    def update_annotation(self, annotation: int, **fields) -> dict:
        return self.request("PATCH", f"/api/annotations/{annotation}/", json=fields)

    def delete_annotation(self, annotation: int) -> None:
        self.request("DELETE", f"/api/annotations/{annotation}/")

    # the ML backend connection --------------------------------------------------------------------------
    def connect_ml(self, project: int, url: str, title: str = "livetrain", **extra) -> dict:
        return self.request("POST", "/api/ml/", json={"url": url, "project": project, "title": title,
                                                      "is_interactive": False, **extra})

    def update_ml(self, ml: int, project: int, url: str, **fields) -> dict:
        # LS 1.23.2 re-validates the connection with the submitted fields only: url and project are required
        return self.request("PATCH", f"/api/ml/{ml}", json={"url": url, "project": project, **fields})

    def ml(self, ml: int) -> dict:
        return self.request("GET", f"/api/ml/{ml}")

    def ml_versions(self, ml: int) -> dict:
        return self.request("GET", f"/api/ml/{ml}/versions")

    def train(self, ml: int) -> None:
        self.request("POST", f"/api/ml/{ml}/train")
