"""The layers point one way: api -> (workflows, contracts) <- activities -> core.

Workflows import only pure code (the flow runtime and the contracts), so
their code replays the same anywhere; the API never imports the worker's
build or the activities' internals (the API's own worker is handed to it by
workers/apiserver.py).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("api", "core", "activities", "workflows", "workers", "sandbox")

# Packages a package may not import.
FORBIDDEN = {
    "api": {"workers", "activities", "sandbox"},
    "activities": {"api", "workers", "workflows", "sandbox"},
    "workflows": {"api", "workers", "activities", "sandbox"},
    "core": {"api", "workers", "activities", "workflows", "sandbox"},
    "sandbox": {"api", "workers", "activities", "workflows"},
}
# The only project modules workflow code may import: pure, no I/O.
WORKFLOW_SAFE_CORE = {"core.contracts", "core.flowrt"}


def project_imports(path: Path) -> set[str]:
    """The project modules a file imports, anywhere in it (deferred imports too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(n for n in names if n.split(".")[0] in PACKAGES)
    return found


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def closure(module: str) -> set[str]:
    """``module`` and every project module it imports, transitively."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        path = ROOT / (name.replace(".", "/") + ".py")
        if name in seen or not path.exists():
            continue
        seen.add(name)
        todo.extend(project_imports(path))
    return seen


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_package_imports_a_layer_above_or_beside_it(package):
    wrong = sorted(
        f"{path.relative_to(ROOT)} imports {name}"
        for path in modules(package)
        for name in project_imports(path)
        if name.split(".")[0] in FORBIDDEN[package]
    )
    assert not wrong, "\n".join(wrong)


def test_workflows_import_only_pure_code():
    wrong = set()
    for path in modules("workflows"):
        for name in project_imports(path):
            if name.startswith("core"):
                module = name if (ROOT / (name.replace(".", "/") + ".py")).exists() else name.rsplit(".", 1)[0]
                wrong |= {f"{path.relative_to(ROOT)} -> {m}" for m in closure(module) - WORKFLOW_SAFE_CORE - {"core"}}
    assert not wrong, "\n".join(sorted(wrong))
