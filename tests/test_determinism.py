"""Static determinism check of the code that runs inside workflows.

The worker's default sandbox mode (``passthrough``) shares modules across
workflow instances, so its runtime checks do not see a module-level clock
read; the suite runs workflows under ``strict`` (which does), and this check
reads the source: workflow code imports only deterministic modules and never
calls the clock, randomness or I/O directly (``workflow.now()``,
``workflow.random()``, ``workflow.uuid4()`` and activities are the way)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Everything imported into workflow code (workflows/*.py pass core.flowrt,
# core.contracts and workflows.common through the sandbox).
WORKFLOW_CODE = sorted((ROOT / "workflows").glob("*.py")) + [ROOT / "core" / "flowrt.py", ROOT / "core" / "contracts.py"]

ALLOWED_MODULES = {
    "__future__", "asyncio", "collections", "dataclasses", "functools", "hashlib", "hmac", "json", "math", "re", "re2", "typing",
    "unicodedata", "temporalio", "core.flowrt", "core.contracts", "workflows", "workflows.common",
}
ALLOWED_FROM_DATETIME = {"timedelta"}
FORBIDDEN_CALLS = {"open", "print", "input", "exec", "eval", "compile", "__import__"}
FORBIDDEN_ATTRIBUTES = {"now", "utcnow", "today", "time", "monotonic", "perf_counter", "urandom", "getenv"}


def violations(source: str, name: str = "<source>") -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source, name)):
        where = f"{name}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            for alias in node.names:
                if not _allowed_module(alias.name):
                    found.append(f"{where}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if module == "datetime":
                bad = [a.name for a in node.names if a.name not in ALLOWED_FROM_DATETIME]
                if bad:
                    found.append(f"{where}: from datetime import {', '.join(bad)}")
            elif node.level == 0 and not _allowed_module(module):
                bad = [a.name for a in node.names if not _allowed_module(f"{module}.{a.name}")]
                if bad:
                    found.append(f"{where}: from {module} import {', '.join(bad)}")
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id in FORBIDDEN_CALLS:
                found.append(f"{where}: {func.id}()")
            if (
                isinstance(func, ast.Attribute)
                and func.attr in FORBIDDEN_ATTRIBUTES
                and not (isinstance(func.value, ast.Name) and func.value.id == "workflow")
            ):
                found.append(f"{where}: .{func.attr}()")
    return found


def _allowed_module(module: str) -> bool:
    return any(module == allowed or module.startswith(allowed + ".") for allowed in ALLOWED_MODULES)


def test_workflow_code_calls_no_clock_randomness_or_io():
    found = [v for path in WORKFLOW_CODE for v in violations(path.read_text(), str(path.relative_to(ROOT)))]
    assert found == [], "non-deterministic code in workflows:\n" + "\n".join(found)


def test_the_check_catches_what_the_passthrough_sandbox_would_not():
    bad = (
        "import time\nimport random\nfrom datetime import datetime\nimport httpx\nfrom core import db\n"
        "def f():\n    datetime.now(); time.time(); open('x'); httpx.get('u')\n"
    )
    found = violations(bad)
    assert any("import time" in v for v in found)
    assert any("import random" in v for v in found)
    assert any("from datetime import datetime" in v for v in found)
    assert any("import httpx" in v for v in found)
    assert any("from core import db" in v for v in found)
    assert any(".now()" in v for v in found) and any(".time()" in v for v in found)
    assert any("open()" in v for v in found)
    ok = "from datetime import timedelta\nfrom temporalio import workflow\ndef f():\n    return workflow.now()\n"
    assert violations(ok) == []
