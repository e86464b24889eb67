"""Dependencies point one way: no import circle between backend's packages, none inside model_store, jobs
or training."""

from __future__ import annotations

import ast
from pathlib import Path

BACKEND = Path(__file__).resolve().parents[1] / "backend"


def imports_of(path: Path) -> set[str]:
    """Every ``backend.*`` module ``path`` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("backend"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("backend")}
    return found


def graph(of) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for path in BACKEND.rglob("*.py"):
        module = ".".join(path.relative_to(BACKEND.parent).with_suffix("").parts)
        source = of(module)
        if source is None:
            continue
        targets = {t for m in imports_of(path) if (t := of(m)) is not None and t != source}
        edges.setdefault(source, set()).update(targets)
    return edges


def cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path + [node, nxt]
            if state.get(nxt) is None and (found := visit(nxt, path + [node])):
                return found
        state[node] = 2
        return None

    for node in sorted(edges):
        if state.get(node) is None and (found := visit(node, [])):
            return found
    return None


def test_no_circle_between_packages():
    """e.g. api -> jobs -> training/inference -> model_store/labelstudio, never back."""
    package = lambda m: m.split(".")[1] if m.count(".") >= 2 else None  # noqa: E731  backend.<package>.<module>
    assert cycle(graph(package)) is None


def test_no_circle_inside_model_store():
    module = lambda m: m if m.startswith("backend.model_store.") else None  # noqa: E731
    edges = graph(module)
    assert cycle(edges) is None
    assert "backend.model_store.architectures" not in edges.get("backend.model_store.lite0", set())


def test_no_circle_inside_jobs_or_training():
    """e.g. the training job queues re-scoring, so re-scoring must not import the training job."""
    for package in ("jobs", "training"):
        module = lambda m, p=package: m if m.startswith(f"backend.{p}.") else None  # noqa: E731
        assert cycle(graph(module)) is None, package
