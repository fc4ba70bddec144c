"""Dependencies point one way: webui -> trainers / preprocess -> core. Every import counts,
including the lazy ones inside functions."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# package -> top-level packages it must never import
FORBIDDEN = {
    "core": {"trainers", "preprocess", "webui", "gradio", "bench"},
    "trainers": {"preprocess", "webui", "gradio", "bench"},
    "preprocess": {"trainers", "webui", "gradio", "bench"},
}


def imported_packages(source: str) -> set[tuple[str, int]]:
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {(alias.name.split(".")[0], node.lineno) for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add((node.module.split(".")[0], node.lineno))
    return found


def wrong_way(package: str) -> list[str]:
    return [f"{path.relative_to(ROOT)}:{line} imports {name}"
            for path in sorted((ROOT / package).rglob("*.py"))
            for name, line in sorted(imported_packages(path.read_text()))
            if name in FORBIDDEN[package]]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_import_points_the_wrong_way(package):
    assert wrong_way(package) == []


def test_the_scan_sees_lazy_imports_inside_functions():
    source = "def f():\n    from preprocess.pipeline import run\n    import webui.app\n"
    assert imported_packages(source) == {("preprocess", 2), ("webui", 3)}
