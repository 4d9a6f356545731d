"""Imports point down (architecture.md): each module imports only raydino modules of a lower or
equal layer, pure math and models never import Ray or MLflow, only tracking imports MLflow."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "raydino"

# lowest first; a module may import its own layer and those below
LAYERS = [
    {"registry", "storage", "schedules", "tables"},
    {"config"},
    {"objectives", "plan"},
    {"models"},
    {"eval"},
    {"step", "data", "tracking"},
    {"train", "export", "compare", "local_run"},
    {"pretrain"},
    {"sweep", "sweep_report"},
    {"cli"},
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py"))


def _unit(path: Path) -> str:
    """The layer unit of a file: its top-level module or package under raydino/."""
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize(
    "path", [p for p in _modules() if _unit(p) != "__init__"], ids=lambda p: str(p.relative_to(PACKAGE))
)
def test_imports_point_down(path: Path) -> None:
    unit = _unit(path)
    assert unit in RANK, f"{unit} has no layer in tests/test_layering.py"
    for name in _imports(path):
        if name.startswith("raydino."):
            target = name.split(".")[1]
            assert RANK[target] <= RANK[unit], f"{path.name} ({unit}) imports {name}, a higher layer"
        top = name.split(".")[0]
        if unit in ("objectives", "models", "schedules", "config", "registry", "step", "plan"):
            assert top not in ("ray", "mlflow"), f"{path.name} imports {name}"
        if top == "mlflow":
            assert unit == "tracking", f"only tracking.py imports MLflow; {path.name} does"
