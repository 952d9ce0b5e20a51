"""The rooms of reco/ and their one direction of imports (DESIGN.md's layout), read from the
source with the ast module: no cycle between modules, and no room imports a room above it."""

from __future__ import annotations

import ast
import pathlib

import pytest

import reco

PACKAGE = pathlib.Path(reco.__file__).parent

# Floors, from the top: cli -> serve/demo -> train/eval -> models -> index/ingest/distributed ->
# encoders -> memory -> ops -> backends -> reference/config/datasets (and reco._C). A room may
# import its own modules and rooms on lower floors only. `reco` itself (the package's face) is
# the public API: it imports ops and backends, so it stands between ops and memory. Rooms on one
# floor may import each other (no cycles, below).
FLOORS = {
    "__main__": 11,  # `python -m reco`: runs cli
    "cli": 10,
    "serve": 9,
    "demo": 9,
    "experiments": 9,  # the old name of demo/, a shim
    "train": 8,
    "eval": 8,
    "models": 7,
    "distributed": 6,
    "index": 6,
    "ingest": 6,
    "encoders": 5,
    "memory": 4,
    "": 3,  # reco/__init__.py
    "ops": 2,
    "backends": 1,
    "reference": 0,
    "config": 0,
    "datasets": 0,
    "_version": 0,
    "_C": -1,
    "_C_emu": -1,
}


# Old import paths kept for a while after a move: thin re-exports that warn DeprecationWarning.
# They alone may point up (to where their names went); nothing in reco imports them.
SHIMS = {
    "reco.memory.builders",
    "reco.train.experiment",
    *(f"reco.experiments.{m}" for m in ("data", "demo", "longtail", "report", "zeroshot")),
    "reco.experiments",
}


def _modules() -> dict[str, pathlib.Path | None]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(["reco", *parts])] = path
    for compiled in ("_C", "_C_emu"):  # extension modules: they import nothing of reco
        out[f"reco.{compiled}"] = None
    return out


def _imports(name: str, path: pathlib.Path, modules: dict) -> set[str]:
    """The reco modules that module `name` imports (at any depth of its code), resolved to files."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")
                up = up[: len(up) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            # A name is a submodule where one exists, else an attribute of the module `base`.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                       for a in node.names]  # fmt: skip
        for t in targets:
            while t and t not in modules and t.startswith("reco"):
                t = t.rpartition(".")[0]  # an imported name: its module
            if t in modules and t != name:
                found.add(t)
    return found


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {
        name: set() if path is None else _imports(name, path, modules)
        for name, path in modules.items()
    }


def test_every_room_has_a_floor():
    rooms = {_room(m) for m in _graph()}
    assert rooms <= set(FLOORS), f"rooms without a floor: {sorted(rooms - set(FLOORS))}"


def test_no_room_imports_a_room_above_it():
    upward = [
        f"{m} (floor {FLOORS[_room(m)]}) imports {t} (floor {FLOORS[_room(t)]})"
        for m, targets in _graph().items()
        for t in sorted(targets)
        if _room(t) != _room(m) and FLOORS[_room(t)] > FLOORS[_room(m)] and m not in SHIMS
    ]
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycle = [*stack[stack.index(t) :], t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_the_scan_sees_imports():
    """The scan itself: known arrows are found (a scan that finds nothing would pass the rest)."""
    graph = _graph()
    assert "reco.ops" in graph["reco.index"] and "reco.backends.cpu" in graph["reco.backends"]
    assert "reco.memory.files" in graph["reco.memory.store"]


def test_the_old_import_paths_are_thin_warning_shims():
    graph = _graph()
    for shim in sorted(SHIMS):
        path = _modules()[shim]
        assert "DeprecationWarning" in path.read_text(), f"{shim} must warn DeprecationWarning"
        importers = sorted(m for m, targets in graph.items() if shim in targets and m not in SHIMS)
        assert not importers, f"{shim} is imported by {importers}: import the new path"
