"""Save workflow histories for the replay test (tests/test_replay.py).

Used by tests/test_workflows.py when ``VECTORY_RECORD_HISTORIES=1``::

    VECTORY_RECORD_HISTORIES=1 .venv/bin/python -m pytest tests/test_workflows.py

Each file is ``tests/histories/<name>.json`` (``WorkflowHistory.to_json()``);
the replay test uses the file name as the workflow id.
"""

from __future__ import annotations

import os
from pathlib import Path

from temporalio.client import Client

from fingerprints import check_fingerprint

HISTORIES = Path(__file__).parent / "histories"


def recording() -> bool:
    return os.environ.get("VECTORY_RECORD_HISTORIES") == "1"


async def save_history(client: Client, workflow_id: str, name: str, run_id: str | None = None) -> Path:
    history = await client.get_workflow_handle(workflow_id, run_id=run_id).fetch_history()
    HISTORIES.mkdir(parents=True, exist_ok=True)
    path = HISTORIES / f"{name}.json"
    path.write_text(history.to_json())
    return path


async def maybe_save_history(client: Client, workflow_id: str, name: str, run_id: str | None = None) -> Path | None:
    """Check the run's fingerprint (tests/fingerprints.py); save its history
    only when ``VECTORY_RECORD_HISTORIES=1`` (the latest run, or ``run_id``)."""
    history = await client.get_workflow_handle(workflow_id, run_id=run_id).fetch_history()
    check_fingerprint(history, name)
    if not recording():
        return None
    return await save_history(client, workflow_id, name, run_id)
