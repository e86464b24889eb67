"""Read projects, tasks and annotations from Label Studio, the source of truth for training data.

Which transport does what:

* ``project()``, ``set_model_version()`` and the prediction writes go through ``label-studio-sdk``
  (``LabelStudio``: ``projects.get`` / ``projects.update``, ``projects.import_predictions``, which is
  ``POST /api/projects/{id}/import/predictions``, one request per batch, and ``predictions.delete``);
  the SDK handles the legacy token and the personal access token (PAT) exchange itself.
* Task reads (``iter_tasks``, ``task_summaries``, ``task``) use plain ``requests`` against the same
  ``GET /api/tasks/`` endpoint the SDK's ``tasks.list`` calls, with ``LabelStudioAuth`` headers,
  because with Label Studio 1.23.2 the SDK is awkward there:

  - the SDK parses tasks into a pydantic union (``RoleBasedTask``) that retypes fields
    (``created_at`` becomes a datetime in one variant, a string in another); we want LS's JSON as is;
  - ``tasks.list(only_annotated=True)`` sends a parameter the 1.23.2 server never reads (no
    ``only_annotated`` anywhere in its source), so filtering has to go through ``query`` Data Manager
    filters anyway;
  - its pager walks ``page=1,2,...`` until the server answers 404, and treats *any* 404 as the end of
    the list (a deleted project reads as "no tasks"); pages also shift when tasks are imported or
    deleted while we page. We page by key instead: ``filter:tasks:id > last id``, ``page=1``;
  - ``tasks.get(id)`` is ``GET /api/tasks/{id}/``, which makes Label Studio call the ML backend's
    ``/predict`` synchronously when the project shows predictions and the task has none
    (``TaskAPI.get`` -> ``evaluate_predictions``). ``task(id, project_id=...)`` avoids it.

Every failure is a ``LabelStudioError`` subclass (a ``LivetrainError``) whose message names the URL
and says what to check; no raw ``requests``/``httpx`` exception and never the token leaks out.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any, Iterator

import requests

from backend.errors import BadRequest, LivetrainError
from backend.labelstudio.images import LabelStudioAuth, _normalize_base

log = logging.getLogger(__name__)

_KEY_HINT = "check LABEL_STUDIO_API_KEY (Label Studio > Account & Settings > Access Token / Personal Access Token)"
_LEGACY_HINT = "; a legacy token also needs LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN=true on the Label Studio side"
_RETRY_STATUSES = (502, 503, 504)


class LabelStudioError(LivetrainError):
    """Label Studio answered something we cannot use (unexpected status, not JSON, wrong shape)."""

    status = 502


class LabelStudioUnavailable(LabelStudioError):
    """Label Studio is down, unreachable, timed out or answered 5xx."""

    status = 503


class LabelStudioAuthError(LabelStudioError):
    """Label Studio refused the credentials (401/403)."""

    status = 502


class LabelStudioNotFound(LabelStudioError):
    """The project does not exist (or the token's user cannot see it)."""

    status = 404


class _ClientAuth(LabelStudioAuth):
    """LabelStudioAuth (legacy ``Token`` or PAT -> ``Bearer`` access token) whose PAT exchange raises
    this module's errors instead of ImageError."""

    @property
    def token(self) -> str:
        return self._token

    def _exchange(self) -> str:
        url = f"{self.base_url}/api/token/refresh/"
        try:
            resp = requests.post(url, json={"refresh": self._token}, timeout=self.timeout)
        except requests.RequestException as exc:
            raise LabelStudioUnavailable(_unavailable_message(url, exc, self.timeout)) from None
        if resp.status_code in (401, 403):
            raise LabelStudioAuthError(f"Label Studio rejected the personal access token at {url} "
                                       f"(HTTP {resp.status_code}): it may be expired or revoked; {_KEY_HINT}")
        if resp.status_code >= 500:
            raise LabelStudioUnavailable(f"Label Studio at {url} answered HTTP {resp.status_code}; check its logs")
        try:
            access = resp.json()["access"] if resp.status_code == 200 else None
        except (ValueError, KeyError, TypeError):
            access = None
        if not isinstance(access, str) or not access:
            raise LabelStudioError(f"exchanging the personal access token at {url} failed (HTTP {resp.status_code}, "
                                   "no access token): check that LABEL_STUDIO_URL points at Label Studio")
        log.info("exchanged the personal access token for an access token at %s", url)
        return access


def _auth_message(url: str, status: int, is_pat: bool) -> str:
    message = f"Label Studio refused the credentials for {url} (HTTP {status}): {_KEY_HINT}"
    if status == 403:
        message += ", and that the token's user is a member of the project's organization"
    return message + ("" if is_pat else _LEGACY_HINT)


def _unavailable_message(url: str, exc: BaseException, timeout: float) -> str:
    if isinstance(exc, requests.Timeout) or "Timeout" in type(exc).__name__:
        return (f"Label Studio at {url} did not answer within {timeout:g} s: it may be overloaded or starting up; "
                "check that it is running and LABEL_STUDIO_URL")
    return (f"Label Studio at {url} is unreachable ({type(exc).__name__}): check that it is running and that "
            "LABEL_STUDIO_URL is an address this process can reach (inside Docker, localhost is the container itself)")


def project_pk(value: int | str) -> int:
    """A project id from ``12``, ``"12"`` or the ``"<id>.<created_at unix time>"`` string that Label Studio
    sends as ``project`` in /setup and /predict payloads."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    head = str(value).strip().split(".", 1)[0]
    if not head.isdigit():
        raise BadRequest(f"invalid Label Studio project id {value!r}: expected a number such as 12 or '12.1795333704'")
    return int(head)


class LabelStudioClient:
    """A thin, typed-error client for the Label Studio REST API (1.23.x)."""

    def __init__(self, url: str, api_key: str, timeout: float = 30.0, *, retries: int = 1,
                 page_size: int = 100, summary_page_size: int = 1000):
        self.url = _normalize_base(url)
        self.timeout = float(timeout)
        self.retries = max(0, int(retries))
        self.page_size = max(1, int(page_size))
        self.summary_page_size = max(1, int(summary_page_size))
        self._auth = _ClientAuth(self.url, api_key, timeout=min(self.timeout, 10.0))
        self._local = threading.local()
        self._sdk = None
        self._httpx = None
        self._sdk_lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings, fallback_url: str | None = None, fallback_key: str | None = None,
                      **kwargs) -> "LabelStudioClient":
        """LABEL_STUDIO_URL + LABEL_STUDIO_API_KEY (else the ``hostname``/``access_token`` from /setup)."""
        url = (settings.label_studio_url or "").strip() or (fallback_url or "").strip()
        key = (settings.label_studio_api_key or "").strip() or (fallback_key or "").strip()
        if not url:
            raise BadRequest("LABEL_STUDIO_URL is not set: livetrain reads annotations from Label Studio's API; "
                             "set it to Label Studio's base URL, e.g. http://localhost:8080")
        if not key:
            raise BadRequest("LABEL_STUDIO_API_KEY is not set: livetrain reads annotations from Label Studio's API; "
                             "set it to a token from Label Studio > Account & Settings (a personal access token, or "
                             "a legacy token with LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN=true on the Label Studio side)")
        return cls(url, key, **kwargs)

    # -- projects (label-studio-sdk) -----------------------------------------------------------
    def project(self, project_id: int | str) -> dict:
        """The project as a JSON dict: at least ``id``, ``title``, ``label_config``, ``model_version``."""
        pid = project_pk(project_id)
        project = self._sdk_call(f"/api/projects/{pid}/", lambda sdk: sdk.projects.get(id=pid))
        return self._project_dict(project)

    def set_model_version(self, project_id: int | str, model_version: str) -> dict:
        """``PATCH /api/projects/{id}/ {"model_version": ...}``: makes LS score/sample by our predictions."""
        pid = project_pk(project_id)
        project = self._sdk_call(f"/api/projects/{pid}/",
                                 lambda sdk: sdk.projects.update(id=pid, model_version=model_version))
        return self._project_dict(project)

    SAMPLING = {"uncertainty": "Uncertainty sampling", "sequential": "Sequential sampling",
                "random": "Uniform sampling"}

    def set_sampling(self, project_id: int | str, mode: str) -> dict:
        """``PATCH /api/projects/{id}/ {"sampling": ...}``: ``mode`` is uncertainty, sequential or random. Label
        Studio Community's settings page greys "Uncertainty sampling" out, but its server takes and honours it."""
        if mode not in self.SAMPLING:
            raise BadRequest(f"sampling must be one of {', '.join(self.SAMPLING)}, not {mode!r}")
        pid = project_pk(project_id)
        project = self._sdk_call(f"/api/projects/{pid}/",
                                 lambda sdk: sdk.projects.update(id=pid, sampling=self.SAMPLING[mode]))
        return self._project_dict(project)

    def create_predictions(self, project_id: int | str, predictions: list[dict]) -> int:
        """Write ``predictions`` (``task``, ``result``, ``score``, ``model_version``, optional ``cluster``);
        returns how many Label Studio created. Not retried by the SDK: a POST that timed out may have been
        applied, and a blind retry would write duplicates (the re-scoring job re-reads the tasks instead).

        Label Studio 1.23.2's bulk import (``/api/projects/{id}/import/predictions``, one request) stores only
        ``result``, ``score`` and ``model_version``: it drops ``cluster``. Predictions with a cluster therefore
        go one by one through ``POST /api/predictions/``, which stores every field."""
        if not predictions:
            return 0
        if any(p.get("cluster") is not None for p in predictions):
            created = 0
            for p in predictions:
                fields = {k: p[k] for k in ("score", "model_version", "cluster") if p.get(k) is not None}
                try:
                    self._sdk_call("/api/predictions/", lambda sdk: sdk.predictions.create(
                        task=int(p["task"]), result=p["result"], **fields, request_options={"max_retries": 0}))
                except LabelStudioUnavailable:
                    raise
                except LabelStudioError:
                    if self.tasks_by_id(project_id, [int(p["task"])]):
                        raise  # the task is there: a real error
                    log.info("task %s was deleted meanwhile: no prediction written", p["task"])
                    continue
                created += 1
            return created
        from label_studio_sdk import PredictionRequest

        pid = project_pk(project_id)
        request = [PredictionRequest(task=int(p["task"]), result=p["result"], score=p.get("score"),
                                     model_version=p.get("model_version")) for p in predictions]
        reply = self._sdk_call(f"/api/projects/{pid}/import/predictions",
                               lambda sdk: sdk.projects.import_predictions(pid, request=request,
                                                                           request_options={"max_retries": 0}))
        created = getattr(reply, "created", None)
        return int(created) if created is not None else len(predictions)

    def delete_prediction(self, prediction_id: int) -> bool:
        """``DELETE /api/predictions/{id}/``; False when it was already gone."""
        pk = int(prediction_id)
        try:
            self._sdk_call(f"/api/predictions/{pk}/", lambda sdk: sdk.predictions.delete(id=pk))
        except LabelStudioNotFound:
            return False
        return True

    @staticmethod
    def _project_dict(project) -> dict:
        data = project.model_dump(mode="json", warnings=False) if hasattr(project, "model_dump") else dict(project)
        for key in ("id", "title", "label_config", "model_version"):
            data.setdefault(key, getattr(project, key, None))
        return data

    def _get_sdk(self):
        with self._sdk_lock:
            if self._sdk is None:
                import httpx
                from label_studio_sdk import LabelStudio

                # Our own httpx client: a short connect timeout, and close() can close it.
                http = httpx.Client(timeout=httpx.Timeout(self.timeout, connect=min(self.timeout, 10.0)),
                                    follow_redirects=True)
                try:
                    # Trailing slash: the SDK urljoin()s "api/token/refresh/" onto it (a path prefix would go).
                    # It raises ApiError(401) here already for an expired PAT.
                    self._sdk = LabelStudio(base_url=self.url + "/", api_key=self._auth.token, httpx_client=http,
                                            max_retries=self.retries)
                except BaseException:
                    http.close()
                    raise
                self._httpx = http
            return self._sdk

    def _sdk_call(self, path: str, fn):
        import httpx
        from label_studio_sdk.core.api_error import ApiError

        url = self.url + path
        if not self._auth.has_token:
            raise LabelStudioAuthError(f"no Label Studio token for {url}: set LABEL_STUDIO_API_KEY")
        try:
            return fn(self._get_sdk())
        except ApiError as exc:
            raise self._status_error(url, exc.status_code or 0, exc.body) from None
        except httpx.HTTPError as exc:
            raise LabelStudioUnavailable(_unavailable_message(url, exc, self.timeout)) from None
        except LivetrainError:
            raise
        except Exception as exc:  # JSON/pydantic parse errors inside the SDK: never leak a raw exception
            raise LabelStudioError(f"unexpected reply from Label Studio at {url} ({type(exc).__name__}): "
                                   "check that LABEL_STUDIO_URL points at Label Studio 1.23 or newer") from None

    def _status_error(self, url: str, status: int, body: Any) -> LabelStudioError:
        if status in (401, 403):
            return LabelStudioAuthError(_auth_message(url, status, self._auth.is_pat))
        if status == 404:
            return LabelStudioNotFound(f"{url} was not found in Label Studio (HTTP 404): check the project id and "
                                       "that the token's user can see the project")
        if status >= 500 or status in (408, 429):
            return LabelStudioUnavailable(f"Label Studio at {url} answered HTTP {status}: it may be starting up, "
                                          "overloaded or failing; check its logs")
        detail = body.get("detail") if isinstance(body, dict) else None
        detail = f": {str(detail)[:300]}" if detail else ""
        return LabelStudioError(f"Label Studio rejected the request {url} (HTTP {status}){detail}")

    # -- tasks (requests + LabelStudioAuth) ----------------------------------------------------
    def iter_tasks(self, project_id: int | str, only_labeled: bool = True) -> Iterator[dict]:
        """Full tasks (``data``, ``annotations`` with ``result``, ``predictions``, ...) ordered by id.

        ``only_labeled``: tasks with at least one non-cancelled annotation (``total_annotations > 0``);
        tasks whose annotations are all cancelled/skipped are left out.
        """
        items = [self._filter("total_annotations", "greater", 0)] if only_labeled else []
        yield from self._iter_pages(project_pk(project_id), "all", items, self.page_size)

    def iter_unlabeled_tasks(self, project_id: int | str) -> Iterator[dict]:
        """Full tasks (with ``predictions``) that have no annotation (``total_annotations == 0``), by id."""
        items = [self._filter("total_annotations", "equal", 0)]
        yield from self._iter_pages(project_pk(project_id), "all", items, self.page_size)

    def task_summaries(self, project_id: int | str, only_labeled: bool = False) -> Iterator[dict]:
        """Cheap listing for change detection (``fields=task_only``: no annotations or predictions):
        ``{"id", "updated_at", "total_annotations", "cancelled_annotations"}`` per task, by id.

        In LS 1.23.2 a task's ``updated_at`` moves when one of its annotations is created, updated or
        deleted (``Annotation.save/delete -> update_task``; the Data Manager's bulk "delete annotations"
        sets it explicitly), but also when a prediction is created or deleted and when the task is
        edited, so a changed ``updated_at`` means "look again", not "the labels changed".
        """
        items = [self._filter("total_annotations", "greater", 0)] if only_labeled else []
        for task in self._iter_pages(project_pk(project_id), "task_only", items, self.summary_page_size):
            yield {
                "id": task["id"],
                "updated_at": task.get("updated_at"),
                "total_annotations": task.get("total_annotations", 0),
                "cancelled_annotations": task.get("cancelled_annotations", 0),
            }

    def task(self, task_id: int | str, project_id: int | str | None = None) -> dict | None:
        """One full task, or None when it was deleted.

        With ``project_id`` this reads the task list filtered to the one id, which has no side
        effects. Without it, it is ``GET /api/tasks/{id}/``: Label Studio then asks the connected ML
        backend for a prediction when the task has none and the project shows predictions.
        """
        tid = int(task_id)
        if project_id is not None:
            return self.tasks_by_id(project_id, [tid]).get(tid)
        try:
            task = self._get_json(f"/api/tasks/{tid}/")
        except LabelStudioNotFound:
            return None
        if not isinstance(task, dict) or "id" not in task:
            raise LabelStudioError(f"{self.url}/api/tasks/{tid}/ did not return a task")
        return task

    def tasks_by_id(self, project_id: int | str, task_ids) -> dict[int, dict]:
        """Full tasks for ``task_ids``, one request per ``page_size`` ids; deleted tasks are absent."""
        pid, ids = project_pk(project_id), sorted({int(t) for t in task_ids})
        found: dict[int, dict] = {}
        for start in range(0, len(ids), self.page_size):
            chunk = ids[start:start + self.page_size]
            query = {"selectedItems": {"all": False, "included": chunk}}
            params = {"project": pid, "fields": "all", "page": 1, "page_size": len(chunk),
                      "query": json.dumps(query, separators=(",", ":"))}
            try:
                data = self._get_json("/api/tasks/", params)
            except LabelStudioNotFound:
                return {}  # the project is gone, and its tasks with it
            found.update((t["id"], t) for t in self._tasks_of(data, "/api/tasks/") if t.get("id") in chunk)
        return found

    @staticmethod
    def _filter(column: str, operator: str, value) -> dict:
        return {"filter": f"filter:tasks:{column}", "operator": operator, "type": "Number", "value": value}

    def _iter_pages(self, project_id: int, fields: str, items: list[dict], page_size: int) -> Iterator[dict]:
        # Keyset paging: always page 1 of "id > last id", so tasks imported or deleted while we page
        # neither shift pages nor make us skip or repeat a task (Label Studio orders by id by default).
        last_id = 0
        while True:
            query = {"filters": {"conjunction": "and", "items": items + [self._filter("id", "greater", last_id)]}}
            params = {"project": project_id, "fields": fields, "page": 1, "page_size": page_size,
                      "query": json.dumps(query, separators=(",", ":"))}
            tasks = self._tasks_of(self._get_json("/api/tasks/", params), "/api/tasks/")
            ids = [t.get("id") for t in tasks]
            if any(not isinstance(i, int) for i in ids):
                raise LabelStudioError(f"{self.url}/api/tasks/ returned tasks without integer ids")
            if tasks and max(ids) <= last_id:
                raise LabelStudioError(f"{self.url}/api/tasks/ ignored the task id filter; "
                                       "livetrain needs Label Studio 1.23 or newer")
            for task in tasks:
                if task["id"] > last_id:
                    yield task
            if len(tasks) < page_size:
                return
            last_id = max(ids)

    def _tasks_of(self, data, path: str) -> list[dict]:
        tasks = data.get("tasks") if isinstance(data, dict) else None
        if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
            raise LabelStudioError(f"{self.url}{path} did not return a task list: "
                                   "check that LABEL_STUDIO_URL points at Label Studio 1.23 or newer")
        return tasks

    # -- HTTP ----------------------------------------------------------------------------------
    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        return session

    def _get_json(self, path: str, params: dict | None = None):
        url = self.url + path
        if not self.url:
            raise BadRequest("Label Studio's address is unknown: set LABEL_STUDIO_URL")
        if not self._auth.has_token:
            raise LabelStudioAuthError(f"no Label Studio token for {url}: set LABEL_STUDIO_API_KEY")
        attempt, reauthed = 0, False
        while True:
            try:
                resp = self._session().get(url, params=params, headers=self._auth.headers(),
                                           timeout=(min(self.timeout, 10.0), self.timeout))
            except requests.RequestException as exc:
                if attempt < self.retries:
                    attempt += 1
                    time.sleep(0.25 * attempt)
                    continue
                raise LabelStudioUnavailable(_unavailable_message(url, exc, self.timeout)) from None
            status = resp.status_code
            if status == 401 and self._auth.is_pat and not reauthed:
                self._auth.invalidate()  # the access token expired or was revoked early: exchange again once
                reauthed = True
                continue
            if status in _RETRY_STATUSES and attempt < self.retries:
                attempt += 1
                time.sleep(0.25 * attempt)
                continue
            if status != 200:
                try:
                    body = resp.json()
                except ValueError:
                    body = None
                raise self._status_error(url, status, body)
            try:
                return resp.json()
            except ValueError:
                raise LabelStudioError(f"{url} did not return JSON (Content-Type "
                                       f"{resp.headers.get('Content-Type', '?')}): check that LABEL_STUDIO_URL "
                                       "points at Label Studio") from None

    def close(self) -> None:
        session = getattr(self._local, "session", None)
        if session is not None:
            session.close()
            self._local.session = None
        with self._sdk_lock:
            if self._httpx is not None:
                self._httpx.close()
            self._sdk = self._httpx = None

    def __enter__(self) -> "LabelStudioClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
