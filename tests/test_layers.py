"""The import arrows of the project point one way (DESIGN §2): every module's imports, parsed.

Rooms of ``estimator/`` from the floor up: ``base`` imports nothing of the project; ``spec``
only ``base``; ``profile`` ``base`` and ``spec``; ``cost`` those three; ``sim`` the rooms below
it; ``interop`` (the exporters to other frameworks) only ``base`` and ``spec``; the commands on top
of the estimator any room. Nothing in ``estimator/`` imports ``search``,
``executor``, ``analysis`` or ``calibration`` — except the ``estimator.calibrate`` forwarder,
and only inside a function. The executor's runtime reads the estimator's vocabulary (``spec``
and ``base``) and nothing else of it, so a plan file is its whole contract; its command checks a
run against the profile and the memory model first. No cycle anywhere.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("estimator", "search", "executor", "analysis", "calibration")
# room → rooms of the estimator it may import (besides itself)
ROOMS = {
    "base": set(),
    "spec": {"base"},
    "profile": {"base", "spec"},
    "cost": {"base", "spec", "profile"},
    "sim": {"base", "spec", "profile", "cost"},
    "interop": {"base", "spec"},
}
FORWARDER = "estimator.calibrate"
EXECUTOR_COMMAND = "executor.run"  # python -m executor.run


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _project_imports(path: Path, here: str | None = None) -> list[tuple[str, bool]]:
    """(imported project module, whether the import runs when the module is imported) per
    import statement; ``from pkg import name`` counts ``pkg.name`` when that is a module.
    ``here``: the module's dotted name (default: from its path under the root)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = here or _module_name(path)
    out: list[tuple[str, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                out.extend((a.name, top) for a in child.names if a.name.split(".")[0] in PACKAGES)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative import
                    pkg = here.split(".")[: len(here.split(".")) - child.level + (path.name == "__init__.py")]
                    base = ".".join(pkg + ([base] if base else []))
                if base.split(".")[0] not in PACKAGES:
                    continue
                for a in child.names:
                    sub = f"{base}.{a.name}"
                    is_module = (ROOT / Path(*sub.split("."))).with_suffix(".py").exists() or \
                        (ROOT / Path(*sub.split("."))).is_dir()
                    out.append((sub if is_module else base, top))
            visit(child, inner)

    visit(tree, True)
    return out


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


GRAPH = {name: _project_imports(path) for name, path in _modules().items()}


def _room(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[0] == "estimator" and parts[1] in ROOMS else None


def test_every_room_is_a_package_with_a_docstring() -> None:
    for room in ROOMS:
        init = ROOT / "estimator" / room / "__init__.py"
        assert init.exists(), f"estimator/{room}/ has no __init__.py"
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and "import" in doc, f"estimator/{room}/__init__.py must say what lives there and what it may import"


def test_rooms_import_only_rooms_below() -> None:
    bad = []
    for module, imports in GRAPH.items():
        room = _room(module)
        if room is None:
            continue
        for target, _ in imports:
            other = _room(target)
            if target.split(".")[0] != "estimator" or (other is None and target != "estimator"):
                bad.append(f"{module} imports {target} (rooms import only rooms)")
            elif other is not None and other != room and other not in ROOMS[room]:
                bad.append(f"{module} imports {target}: {room} may import only {sorted(ROOMS[room]) or 'nothing'}")
    assert not bad, "\n".join(bad)


def test_estimator_imports_nothing_above_it() -> None:
    bad = []
    for module, imports in GRAPH.items():
        if not module.startswith("estimator"):
            continue
        for target, top in imports:
            if target.split(".")[0] == "estimator":
                continue
            if module == FORWARDER and target.startswith("calibration") and not top:
                continue  # the calibrate forwarder, lazily
            bad.append(f"{module} imports {target}" + (" at import time" if top else ""))
    assert not bad, "\n".join(bad)


def test_executor_reads_only_the_vocabulary() -> None:
    """The runtime reads ``spec`` and ``base``; its command (:data:`EXECUTOR_COMMAND`) checks a
    run before any process starts (the experiment's device profile, the host memory the plan
    needs), so it may consult ``profile`` and ``cost`` too — never the simulator."""
    bad = []
    for module, imports in GRAPH.items():
        if not module.startswith("executor"):
            continue
        allowed = {"spec", "base"} | ({"profile", "cost"} if module == EXECUTOR_COMMAND else set())
        bad += [f"{module} imports {target}" for target, _ in imports
                if target.startswith("estimator") and _room(target) not in allowed
                or target.split(".")[0] in ("search", "analysis")]
    assert not bad, "\n".join(bad)


def test_the_import_graph_has_no_cycle() -> None:
    graph = {m: sorted({t for t, _ in imps if t in GRAPH and t != m}) for m, imps in GRAPH.items()}
    state: dict[str, int] = {}  # 1 on the path, 2 done
    stack: list[str] = []

    def walk(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in graph[m]:
            if state.get(t) == 1:
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                walk(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            walk(m)


def test_the_checker_sees_a_wrong_arrow(tmp_path: Path) -> None:
    """The parser finds imports in every form the rules above judge (a test of the test)."""
    src = tmp_path / "mod.py"
    src.write_text("from estimator.sim import evaluator\nimport search.run\n"
                   "def f():\n    from calibration import pipeline\n")
    found = _project_imports(src, "estimator.probe")
    assert ("estimator.sim.evaluator", True) in found
    assert ("search.run", True) in found
    assert ("calibration.pipeline", False) in found
