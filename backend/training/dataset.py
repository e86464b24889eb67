"""The project's training set as last synced from Label Studio: ``MODEL_DIR/<project>/dataset.json``.

Label Studio stays the source of truth; this file only remembers what the last sync saw, so a sync can be
incremental and a session can start while Label Studio is briefly unreachable.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from backend.labelstudio.annotations import LabeledImage
from backend.model_store.versions import write_atomic


class TrainingSet:
    def __init__(self, model_dir: Path, project: str):
        self.path = Path(model_dir) / str(project) / "dataset.json"
        data = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.records: dict[int, LabeledImage] = {int(k): LabeledImage.from_json(v) for k, v in data.get("records", {}).items()}
        self.summaries: dict[int, str] = {int(k): v for k, v in data.get("summaries", {}).items()}
        self.synced_at: float | None = data.get("synced_at")
        # what the records were read for: a different control or kind (boxes/masks) needs a full sync
        self.control: str = data.get("control", "")
        self.task: str = data.get("task", "boxes")

    def put(self, task_id: int, record: LabeledImage | None) -> None:
        """Set the task's example; None removes it (no usable annotation any more, or task deleted)."""
        if record is None:
            self.records.pop(task_id, None)
        else:
            self.records[task_id] = record

    def task_of_annotation(self, annotation_id: int) -> int | None:
        return next((t for t, r in self.records.items() if r.annotation_id == annotation_id), None)

    def save(self) -> None:
        self.synced_at = time.time()
        data = {"synced_at": self.synced_at, "control": self.control, "task": self.task,
                "records": {str(k): r.to_json() for k, r in sorted(self.records.items())},
                "summaries": {str(k): v for k, v in sorted(self.summaries.items())}}
        write_atomic(self.path, json.dumps(data).encode())

    def ordered(self) -> list[LabeledImage]:
        return [self.records[k] for k in sorted(self.records)]
