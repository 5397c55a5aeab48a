"""The structure the README draws, read from the code's own imports (``ast``, every ``import``
anywhere in a module, lazy ones in functions included; ``if TYPE_CHECKING:`` blocks excluded):
no import circle, no import from a lower floor up to a higher one, no private name imported
across modules, no ``backend ==`` policy outside the engines, no private pytest API."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pytest_qmr"
TASKS = PACKAGE.parent / "tasks"  # installed as the package pytest_qmr.tasks (pyproject's package-dir)

# Floors, lowest first: a module may import its own floor or a lower one, never a higher one.
# (A module not named here is on the floor of its package, e.g. pytest_qmr.locate.judges.rule: "locate".)
FLOORS = [
    # 0: what everything may use
    {"errors", "redact", "fsutil", "versions", "registry", "arith", "answers", "steps", "taxonomy", "sampling"},
    # 1: models, task files, the engines that run them, the generation cache
    {"models", "taskfiles", "tasks", "engines", "cache"},
    # 2: the stages (records between them, lm-eval on a model, quantization, the gate, Locate)
    {"records", "measure", "splits", "calibration", "quantize", "baselines", "gate", "sampled_gate", "locate",
     "align"},
    {"restore", "compare", "report", "rundir", "suite"},
    # 3: one cell through the stages, the process that runs cells, and what runs them for a user
    {"pipeline"},
    {"session"},
    {"plugin", "hooks", "cli"},
]


def _modules() -> dict[str, Path]:
    found = {}
    for root, prefix in ((PACKAGE, ["pytest_qmr"]), (TASKS, ["pytest_qmr", "tasks"])):
        for path in root.rglob("*.py"):
            parts = prefix + list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def _imports(module: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, list[str]]]:
    """(imported module of this package, names imported from it) for every import statement."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _type_checking_lines(tree)
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)) or node.lineno in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [(a.name, []) for a in node.names]
        else:
            if node.level:
                base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            targets = []
            for alias in node.names:
                full = f"{name}.{alias.name}"
                targets.append((full, []) if full in modules else (name, [alias.name]))
        for target, names in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target.startswith("pytest_qmr") and target != module:
                out.append((target, names))
    return out


def _graph() -> dict[str, dict[str, list[str]]]:
    modules = _modules()
    graph: dict[str, dict[str, list[str]]] = {m: {} for m in modules}
    for module, path in modules.items():
        for target, names in _imports(module, path, modules):
            graph[module].setdefault(target, []).extend(names)
    return graph


def _floor(module: str) -> int:
    parts = module.split(".")[1:]
    if not parts:
        return 0  # the package's own __init__: its version, nothing else
    for depth in range(len(parts), 0, -1):
        name = ".".join(parts[:depth])
        for level, floor in enumerate(FLOORS):
            if name in floor:
                return level
    raise AssertionError(f"{module} is on no floor: add it to FLOORS")


def _cycles(graph: dict[str, dict[str, list[str]]]) -> list[list[str]]:
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle_anywhere_in_the_package():
    assert _cycles(_graph()) == []


def test_no_import_goes_up_a_floor():
    up = [f"{m} ({_floor(m)}) imports {t} ({_floor(t)})"
          for m, targets in _graph().items() for t in targets if _floor(t) > _floor(m)]
    assert up == []


def test_no_private_name_is_imported_across_modules():
    private = [f"{m} imports {t}.{n}" for m, targets in _graph().items() for t, names in targets.items()
               for n in names if n.startswith("_") and not n.startswith("__")]
    assert private == []


def test_backend_policy_lives_in_the_engines():
    pattern = re.compile(r"backend\s*(==|!=|in\s*\()")
    found = [f"{path.relative_to(PACKAGE.parent)}:{n}" for path in PACKAGE.rglob("*.py")
             if "engines" not in path.relative_to(PACKAGE).parts
             for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if pattern.search(line)]
    assert found == []


def test_no_private_pytest_api():
    found = [f"{path.relative_to(PACKAGE.parent)}:{n}" for path in PACKAGE.rglob("*.py")
             for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
             if re.search(r"\b_pytest\b|\._fillfixtures|TopRequest", line)]
    assert found == []


def test_the_graph_reader_sees_lazy_imports_and_skips_type_checking():
    """The checks above are only as good as the reader: a function-level import counts, a
    ``TYPE_CHECKING`` one does not."""
    source = (PACKAGE / "session.py").read_text(encoding="utf-8")
    assert "    from .pipeline import run_cell" in source  # inside QmrSession.run_cell
    assert "pytest_qmr.pipeline" in _graph()["pytest_qmr.session"]
    records = (PACKAGE / "records.py").read_text(encoding="utf-8")
    assert "if TYPE_CHECKING:\n    from .baselines import Baseline" in records
    assert "pytest_qmr.baselines" not in _graph()["pytest_qmr.records"]
