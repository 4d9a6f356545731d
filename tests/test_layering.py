"""Imports point down (docs/architecture.md): each module imports only raydino modules of a lower or
equal layer, only the modules listed here import Ray, only tracking imports MLflow, and no
import cycle exists. Every import form counts: ``import raydino.x``, ``from raydino.x import y``,
``from raydino import x`` and relative imports, at module level or inside functions. The checker is
itself tested on a planted tree with one violation of each kind."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "raydino"

# lowest first; a module may import its own layer and those below
LAYERS = [
    {"stores"},
    {"config"},
    {"objectives", "launch"},
    {"models"},
    {"eval"},
    {"step", "data", "tracking"},
    {"train"},
    {"pretrain"},
    {"sweep"},
    {"commands", "cli"},
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}

# the only modules that import Ray: the Ray Data stage, the Ray Train driver and loop, the Tune sweep
RAY_MODULES = {
    "raydino.data.catalog", "raydino.data.clock", "raydino.data.eval_data", "raydino.data.pipeline", "raydino.data.shards", "raydino.data.sources",
    "raydino.train.driver", "raydino.train.loop", "raydino.train.preemption", "raydino.train.rung_report", "raydino.train.stream",
    "raydino.sweep.bookkeeping", "raydino.sweep.run", "raydino.sweep.spec", "raydino.sweep.trial",
    "raydino.commands.rehearsal",
}
MLFLOW_MODULES = {"raydino.tracking"}


def module_name(path: Path, root: Path) -> str:
    """raydino/data/clock.py -> raydino.data.clock; a package's __init__ is the package."""
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, root: Path) -> set[str]:
    """Absolute names of everything ``path`` imports (relative imports resolved; ``from pkg import x``
    gives ``pkg.x`` when x is a submodule of the package)."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            out.add(module)
            for alias in node.names:  # from raydino import pretrain: the submodule raydino.pretrain
                candidate = root.parent / Path(*f"{module}.{alias.name}".split("."))
                if candidate.with_suffix(".py").is_file() or (candidate / "__init__.py").is_file():
                    out.add(f"{module}.{alias.name}")
    return out


def _unit(module: str) -> str | None:
    """The layer unit of raydino.<unit>[...]; None for the package itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def violations(root: Path) -> list[str]:
    """Every import that points up, reaches Ray or MLflow from elsewhere, or names a unit with no layer."""
    found = []
    for path in sorted(root.rglob("*.py")):
        name = module_name(path, root)
        unit = _unit(name)
        if unit is None:
            continue
        if unit not in RANK:
            found.append(f"{name}: {unit} has no layer in tests/test_layering.py")
            continue
        for target in sorted(imports(path, root)):
            top = target.split(".")[0]
            if top == "raydino" and _unit(target) in RANK and RANK[_unit(target)] > RANK[unit]:
                found.append(f"{name} imports {target}, a higher layer")
            if top == "ray" and name not in RAY_MODULES:
                found.append(f"{name} imports {target}; only {sorted(RAY_MODULES)} import Ray")
            if top == "mlflow" and name not in MLFLOW_MODULES:
                found.append(f"{name} imports {target}; only raydino.tracking imports MLflow")
    return found


def cycles(root: Path) -> list[list[str]]:
    """Import cycles between raydino modules (depth-first search over the import graph)."""
    modules = {module_name(p, root): p for p in root.rglob("*.py")}
    graph = {m: sorted(t for t in imports(p, root) if t in modules and t != m) for m, p in modules.items()}
    found, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in graph[node]:
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return found


def test_imports_point_down_and_only_the_listed_modules_import_ray_or_mlflow() -> None:
    assert violations(PACKAGE) == []


def test_no_import_cycles() -> None:
    assert cycles(PACKAGE) == []


def test_the_ray_list_names_real_modules() -> None:
    modules = {module_name(p, PACKAGE) for p in PACKAGE.rglob("*.py")}
    assert RAY_MODULES <= modules and MLFLOW_MODULES <= modules


def test_the_checker_finds_each_kind_of_planted_violation(tmp_path: Path) -> None:
    root = tmp_path / "raydino"
    files = {
        "__init__.py": "",
        "config.py": "",
        "pretrain.py": "",
        "train/__init__.py": "",
        "train/loop.py": "import ray\n",  # allowed: listed
        "objectives/__init__.py": "",
        "objectives/a.py": "from raydino import pretrain\n",  # up, through the package
        "objectives/b.py": "from ..train import loop\n",  # up, relative
        "objectives/c.py": "def f():\n    from ray import train\n",  # Ray, lazily
        "objectives/d.py": "from . import e\n",  # a cycle d -> e -> d
        "objectives/e.py": "from raydino.objectives import d\n",
        "models/__init__.py": "import mlflow\n",  # MLflow outside tracking
        "newunit.py": "",
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    found = violations(root)
    assert "raydino.objectives.a imports raydino.pretrain, a higher layer" in found
    assert "raydino.objectives.b imports raydino.train.loop, a higher layer" in found
    assert any(v.startswith("raydino.objectives.c imports ray;") for v in found)
    assert any(v.startswith("raydino.models imports mlflow;") for v in found)
    assert "raydino.newunit: newunit has no layer in tests/test_layering.py" in found
    assert not any(v.startswith("raydino.train.loop") for v in found)
    assert cycles(root) == [["raydino.objectives.d", "raydino.objectives.e", "raydino.objectives.d"]]


def test_the_package_root_keeps_at_most_six_modules() -> None:
    """Everything beyond the few modules a reader meets first lives in a package named for its layer."""
    root_modules = sorted(p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    assert len(root_modules) <= 6, root_modules
    assert all(p.stem in RANK for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
