"""Bring the local training set up to date with Label Studio (the source of truth).

Full sync: list every labeled task. Incremental sync (at the start of a session): re-read the tasks that
webhooks marked, the tasks of deleted annotations, and every task whose ``updated_at`` differs from the last
sync's cheap summary listing, so a webhook that never arrived still gets picked up. Marked sync (between a
session's steps): only the marked tasks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from backend.labelstudio.annotations import labeled_image
from backend.labelstudio.client import LabelStudioClient
from backend.labelstudio.label_config import ControlTag
from backend.training.dataset import TrainingSet

log = logging.getLogger(__name__)


@dataclass
class SyncReport:
    full: bool
    fetched: int
    labeled: int


def sync_marked(client: LabelStudioClient, project: str, control: ControlTag, training_set: TrainingSet,
                dirty: set[int], deleted: set[int]) -> SyncReport:
    """Re-read only the tasks webhooks marked (and those of deleted annotations): what a running session does
    between steps, so a submit enters training within seconds. No listing of the project's tasks."""
    wanted = set(dirty) | {t for a in deleted if (t := training_set.task_of_annotation(a)) is not None}
    found = client.tasks_by_id(project, sorted(wanted)) if wanted else {}
    for task_id in wanted:
        task = found.get(task_id)
        training_set.put(task_id, labeled_image(task, control) if task else None)
        if task is None:
            training_set.summaries.pop(task_id, None)
        elif task.get("updated_at"):
            training_set.summaries[task_id] = task["updated_at"]
    training_set.save()
    log.info("project %s: read %d marked task(s); %d labeled image(s)", project, len(wanted), len(training_set.records))
    return SyncReport(False, len(wanted), len(training_set.records))


def sync_project(client: LabelStudioClient, project: str, control: ControlTag, training_set: TrainingSet,
                 dirty: set[int], deleted: set[int], full: bool) -> SyncReport:
    # a different control (the label config changed) makes every stored record stale
    full = full or training_set.synced_at is None or (training_set.control, training_set.task) != (control.from_name, control.task)
    if full:
        # summaries first: a change made while we list the tasks then shows up as a difference next time
        summaries = {int(s["id"]): s["updated_at"] for s in client.task_summaries(project)}
        records = {}
        for task in client.iter_tasks(project, only_labeled=True):
            record = labeled_image(task, control)
            if record is not None:
                records[int(task["id"])] = record
        training_set.records, training_set.summaries = records, summaries
        fetched = len(records)
    else:
        wanted = set(dirty)
        wanted |= {t for a in deleted if (t := training_set.task_of_annotation(a)) is not None}
        summaries = {int(s["id"]): s for s in client.task_summaries(project)}
        for task_id, summary in summaries.items():
            changed = training_set.summaries.get(task_id) != summary["updated_at"]
            if changed and (summary.get("total_annotations") or task_id in training_set.records):
                wanted.add(task_id)
        for task_id in set(training_set.records) - set(summaries):  # the task was deleted
            training_set.put(task_id, None)
        # by id within the project: a plain GET /api/tasks/<id>/ would make Label Studio call /predict
        found = client.tasks_by_id(project, sorted(wanted)) if wanted else {}
        for task_id in wanted:
            task = found.get(task_id)
            training_set.put(task_id, labeled_image(task, control) if task else None)
        training_set.summaries = {t: s["updated_at"] for t, s in summaries.items()}
        fetched = len(wanted)
    # only now: a sync that Label Studio broke off leaves the records *and* their kind as they were
    training_set.control, training_set.task = control.from_name, control.task
    training_set.save()
    log.info("project %s: %s sync read %d task(s); %d labeled image(s)", project, "full" if full else "incremental",
             fetched, len(training_set.records))
    return SyncReport(full, fetched, len(training_set.records))
