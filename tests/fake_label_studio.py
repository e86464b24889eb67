"""A small, real HTTP imitation of the Label Studio 1.23.2 REST API on 127.0.0.1, for tests.

Shapes follow the real server (see /work/shared/label-studio/captured/ and LS's data_manager/api.py):
``GET /api/tasks/`` answers ``{"total_annotations", "total_predictions", "total", "tasks"}``, pages
with ``page``/``page_size`` (404 past the last page, which the SDK's pager expects), honours
``fields=all|task_only``, ``query={"filters", "selectedItems"}`` (Number filters on task columns) and
orders by id. Auth: ``Token <legacy>`` or ``Bearer <access>`` after ``POST /api/token/refresh/``.
Predictions: ``POST /api/projects/{id}/import/predictions`` (a list; 201 ``{"created": n}``, 400 for a task
outside the project, like ``ImportPredictionsAPI``), ``DELETE /api/predictions/{id}/`` (204); tasks list
them under ``predictions`` (``fields=all``) with ``total_predictions`` and ``predictions_score`` (the mean
score of the predictions whose ``model_version`` equals the project's), and a prediction write or delete
moves the task's ``updated_at``, as in LS 1.23.2.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import json
import mimetypes
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

_OPS = {"greater": lambda a, b: a > b, "greater_or_equal": lambda a, b: a >= b, "less": lambda a, b: a < b,
        "less_or_equal": lambda a, b: a <= b, "equal": lambda a, b: a == b, "not_equal": lambda a, b: a != b}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class FakeLabelStudio:
    def __init__(self, token: str = "a" * 40, access_ttl: float = 300.0):
        self.token = token
        self.legacy_enabled = True  # False: like LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN unset -> 401
        self.access_ttl = access_ttl
        self.fail_status: int | None = None  # set to e.g. 500 to make every /api/ call fail
        self.requests: list[tuple[str, str]] = []
        self.projects: dict[int, dict] = {}
        self.tasks: dict[int, dict] = {}
        self.annotations: dict[int, dict] = {}
        self.predictions: dict[int, dict] = {}
        self.delay = 0.0  # seconds every /api/ call waits first (a slow Label Studio)
        self.files: dict[str, bytes] = {}
        self._access: set[str] = set()
        self._ids = itertools.count(1)
        self._last = datetime(2000, 1, 1, tzinfo=timezone.utc)
        self._lock = threading.RLock()
        self.pat = self._jwt("refresh", time.time() + 86400)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    # -- test API ---------------------------------------------------------------------------
    def add_project(self, label_config: str, title: str = "P") -> int:
        with self._lock:
            pid, now = next(self._ids), self._now()
            self.projects[pid] = {"id": pid, "title": title, "description": "", "label_config": label_config,
                                  "model_version": "", "created_at": now, "updated_at": now,
                                  "created_by": {"id": 1, "email": "harness@example.com", "first_name": "",
                                                 "last_name": "", "avatar": None},
                                  "organization": 1, "maximum_annotations": 1, "show_collab_predictions": True,
                                  "evaluate_predictions_automatically": False, "sampling": "Sequential sampling",
                                  "task_number": 0, "total_annotations_number": 0}
            return pid

    def add_task(self, project_id: int, image_bytes: bytes, name: str = "img.png") -> int:
        with self._lock:
            tid, now = next(self._ids), self._now()
            path = f"/data/upload/{project_id}/{uuid.uuid4().hex[:8]}-{name}"
            self.files[path] = image_bytes
            self.tasks[tid] = {"id": tid, "data": {"image": path}, "meta": {}, "created_at": now, "updated_at": now,
                               "is_labeled": False, "overlap": 1, "inner_id": tid, "total_annotations": 0,
                               "cancelled_annotations": 0, "total_predictions": 0, "comment_count": 0,
                               "unresolved_comment_count": 0, "last_comment_updated_at": None,
                               "project": project_id, "updated_by": None, "file_upload": name,
                               "comment_authors": [], "predictions": [], "drafts": []}
            return tid

    def annotate(self, task_id: int, regions: list[dict], was_cancelled: bool = False,
                 ground_truth: bool = False) -> int:
        with self._lock:
            aid, now = next(self._ids), self._now()
            task = self.tasks[task_id]
            self.annotations[aid] = {"id": aid, "result": list(regions), "was_cancelled": was_cancelled,
                                     "ground_truth": ground_truth, "created_at": now, "updated_at": now,
                                     "completed_by": 1, "updated_by": 1, "lead_time": 1.5, "draft_created_at": None,
                                     "task": task_id, "project": task["project"], "import_id": None,
                                     "last_action": None, "bulk_created": False, "parent_prediction": None,
                                     "parent_annotation": None, "last_created_by": None, "created_ago": "0 minutes",
                                     "created_username": " harness@example.com, 1"}
            self._touch(task)
            return aid

    def update_annotation(self, annotation_id: int, regions: list[dict]) -> None:
        with self._lock:
            annotation = self.annotations[annotation_id]
            annotation["result"], annotation["updated_at"] = list(regions), self._now()
            self._touch(self.tasks[annotation["task"]])

    def delete_annotation(self, annotation_id: int) -> None:
        with self._lock:
            self._touch(self.tasks[self.annotations.pop(annotation_id)["task"]])

    def add_prediction(self, task_id: int, result: list, score, model_version: str, cluster: int | None = None) -> int:
        with self._lock:
            pid, now = next(self._ids), self._now()
            task = self.tasks[task_id]
            self.predictions[pid] = {"id": pid, "result": list(result), "score": score, "model_version": model_version,
                                     "cluster": cluster, "neighbors": None, "mislabeling": 0.0, "created_ago": "0 minutes",
                                     "created_at": now, "updated_at": now, "model": None, "model_run": None,
                                     "task": task_id, "project": task["project"]}
            task["updated_at"] = self._now()
            return pid

    def task_predictions(self, task_id: int) -> list[dict]:
        with self._lock:
            return sorted((p for p in self.predictions.values() if p["task"] == task_id), key=lambda p: p["id"])

    def predictions_score(self, task_id: int) -> float | None:
        version = self.projects[self.tasks[task_id]["project"]]["model_version"]
        scores = [p["score"] for p in self.task_predictions(task_id) if p["model_version"] == version and p["score"] is not None]
        return sum(scores) / len(scores) if scores else None

    def delete_task(self, task_id: int) -> None:
        with self._lock:
            del self.tasks[task_id]
            for aid in [a for a, ann in self.annotations.items() if ann["task"] == task_id]:
                del self.annotations[aid]

    @staticmethod
    def rect(x, y, w, h, label, from_name="label", to_name="image", ow=64, oh=48) -> dict:
        return {"id": uuid.uuid4().hex[:10], "from_name": from_name, "to_name": to_name, "type": "rectanglelabels",
                "original_width": ow, "original_height": oh, "image_rotation": 0, "origin": "manual",
                "value": {"x": x, "y": y, "width": w, "height": h, "rotation": 0, "rectanglelabels": [label]}}

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # -- state helpers ----------------------------------------------------------------------
    def _now(self) -> str:  # strictly increasing, in DRF's format
        self._last = max(datetime.now(timezone.utc), self._last + timedelta(microseconds=1))
        return self._last.strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    def _touch(self, task: dict) -> None:  # like Annotation.save/delete -> Task.update_task + counters
        annotations = [a for a in self.annotations.values() if a["task"] == task["id"]]
        task["updated_at"] = self._now()
        task["total_annotations"] = sum(not a["was_cancelled"] for a in annotations)
        task["cancelled_annotations"] = sum(bool(a["was_cancelled"]) for a in annotations)
        task["is_labeled"] = task["total_annotations"] >= task["overlap"]

    def _jwt(self, kind: str, exp: float) -> str:
        head = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        body = _b64(json.dumps({"token_type": kind, "exp": int(exp), "jti": uuid.uuid4().hex, "user_id": 1}).encode())
        return f"{head}.{body}.{_b64(hmac.new(b'fake', f'{head}.{body}'.encode(), hashlib.sha256).digest())}"

    def _authorized(self, header: str) -> bool:
        kind, _, value = (header or "").partition(" ")
        if kind == "Token":
            return self.legacy_enabled and value == self.token
        if kind == "Bearer" and value in self._access:
            payload = json.loads(base64.urlsafe_b64decode(value.split(".")[1] + "=="))
            return payload["exp"] > time.time()
        return False

    def _task_json(self, task: dict, full: bool, expand_user: bool = False) -> dict:
        out = {k: v for k, v in task.items() if full or k not in ("predictions", "drafts")}
        out["total_predictions"] = len(self.task_predictions(task["id"]))
        out["predictions_score"] = self.predictions_score(task["id"])
        if full:
            out["predictions"] = [dict(p) for p in self.task_predictions(task["id"])]
            anns = sorted((dict(a) for a in self.annotations.values() if a["task"] == task["id"]),
                          key=lambda a: a["id"])
            if expand_user:  # GET /api/tasks/{id}/ expands annotations.completed_by into the user
                for a in anns:
                    a["completed_by"] = {"id": 1, "email": "harness@example.com", "first_name": "", "last_name": ""}
            out["annotations"] = anns
        return out

    def _list(self, qs: dict) -> tuple[int, dict]:
        pid = int(qs.get("project", ["0"])[0] or 0)
        if pid not in self.projects:
            return 404, {"detail": "Not found."} if pid else {"detail": "Neither project nor view id specified"}
        query = json.loads(unquote(qs["query"][0])) if "query" in qs else {}
        tasks = sorted((t for t in self.tasks.values() if t["project"] == pid), key=lambda t: t["id"])
        filters = query.get("filters") or {}
        tests = [(f["filter"].removeprefix("filter:tasks:"), _OPS[f["operator"]], f["value"])
                 for f in filters.get("items", ()) if f["filter"].startswith("filter:tasks:")]
        combine = any if filters.get("conjunction") == "or" else all
        if tests:
            tasks = [t for t in tasks if combine(op(t[col], float(v)) for col, op, v in tests)]
        selected = query.get("selectedItems") or {"all": True, "excluded": []}
        if not selected.get("all") and selected.get("included"):
            tasks = [t for t in tasks if t["id"] in selected["included"]]
        elif selected.get("all") and selected.get("excluded"):
            tasks = [t for t in tasks if t["id"] not in selected["excluded"]]
        page, size = int(qs.get("page", ["1"])[0]), int(qs.get("page_size", ["100"])[0])
        if page < 1 or (page > 1 and (page - 1) * size >= len(tasks)):
            return 404, {"detail": "Invalid page."}
        full = qs.get("fields", [""])[0] == "all"
        chunk = [self._task_json(t, full) for t in tasks[(page - 1) * size: page * size]]
        ids = {t["id"] for t in tasks}
        total_ann = sum(1 for a in self.annotations.values() if not a["was_cancelled"] and a["task"] in ids)
        return 200, {"total_annotations": total_ann, "total_predictions": 0, "total": len(tasks), "tasks": chunk}

    def _route(self, method: str, path: str, qs: dict, body: dict, auth: str) -> tuple[int, object]:
        if method == "POST" and path == "/api/token/refresh/":
            if body.get("refresh") != self.pat:
                return 401, {"detail": "Token is invalid or expired", "code": "token_not_valid"}
            access = self._jwt("access", time.time() + self.access_ttl)
            self._access.add(access)
            return 200, {"access": access}
        if not self._authorized(auth):
            return 401, {"detail": "Authentication credentials were not provided."}
        if path.startswith("/data/upload/"):
            return (200, self.files[path]) if path in self.files else (404, {"detail": "Not found."})
        if self.fail_status:
            return self.fail_status, {"detail": "fake failure"}
        parts = [p for p in path.split("/") if p]
        if parts[:2] == ["api", "projects"] and parts[3:] == ["import", "predictions"] and method == "POST":
            pid = int(parts[2])
            if pid not in self.projects:
                return 404, {"detail": "Not found."}
            if not isinstance(body, list):
                return 400, {"detail": "expected a list of predictions"}
            for item in body:
                if self.tasks.get(item.get("task"), {}).get("project") != pid:
                    return 400, {"detail": f'{item} contains invalid "task" field'}
            for item in body:
                self.add_prediction(item["task"], item.get("result") or [], item.get("score"),
                                    item.get("model_version", "undefined"))
            return 201, {"created": len(body)}
        if parts == ["api", "predictions"] and method == "POST":  # one prediction, every field (cluster too)
            if not isinstance(body, dict) or body.get("task") not in self.tasks:
                return 400, {"task": ["Invalid pk - object does not exist."]}
            pid = self.add_prediction(body["task"], body.get("result") or [], body.get("score"),
                                      body.get("model_version", "undefined"), body.get("cluster"))
            return 201, dict(self.predictions[pid])
        if parts[:2] == ["api", "predictions"] and len(parts) == 3 and parts[2].isdigit() and method == "DELETE":
            prediction = self.predictions.pop(int(parts[2]), None)
            if prediction is None:
                return 404, {"detail": "No Prediction matches the given query."}
            self.tasks[prediction["task"]]["updated_at"] = self._now()
            return 204, None
        if parts[:2] == ["api", "projects"] and len(parts) == 3 and parts[2].isdigit():
            project = self.projects.get(int(parts[2]))
            if project is None:
                return 404, {"detail": "Not found."}
            if method == "PATCH":
                project.update(body)
                project["updated_at"] = self._now()
            return 200, dict(project, task_number=sum(t["project"] == project["id"] for t in self.tasks.values()))
        if parts == ["api", "tasks"] and method == "GET":
            return self._list(qs)
        if parts[:2] == ["api", "tasks"] and len(parts) == 3 and parts[2].isdigit() and method == "GET":
            task = self.tasks.get(int(parts[2]))
            if task is None:
                return 404, {"detail": "No Task matches the given query."}
            return 200, self._task_json(task, True, True)
        return 404, {"detail": "Not found."}

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                split = urlsplit(self.path)
                if fake.delay and split.path.startswith("/api/"):
                    time.sleep(fake.delay)
                with fake._lock:
                    fake.requests.append((self.command, self.path))
                    try:
                        body = json.loads(raw) if raw else {}
                        status, payload = fake._route(self.command, split.path, parse_qs(split.query), body,
                                                      self.headers.get("Authorization", ""))
                    except (ValueError, KeyError, TypeError) as exc:
                        status, payload = 400, {"detail": f"bad request: {exc!r}"}
                if payload is None:
                    data, ctype = b"", "application/json"
                elif isinstance(payload, bytes):
                    data, ctype = payload, mimetypes.guess_type(split.path)[0] or "application/octet-stream"
                else:
                    data, ctype = json.dumps(payload).encode(), "application/json"
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = do_DELETE = _serve

            def log_message(self, *args):
                pass

        return Handler
