"""Workflow fingerprints: the commands a workflow gave for fixed inputs.

The replay test (tests/test_replay.py) proves that today's code can go on
with histories recorded earlier; it says nothing about a path no saved
history covers. A fingerprint covers those: every scenario of
tests/test_workflows.py that names its history compares the commands of
the run it just made (activities with their input, options and retry
policy, timers, children, signals, markers, search attributes, the close)
with the baseline committed in ``tests/fingerprints/<name>.json``. A change
of workflow behaviour then fails CI until the baseline is updated on
purpose, and the diff of the baseline shows what changed::

    VECTORY_UPDATE_FINGERPRINTS=1 .venv/bin/python -m pytest tests/test_workflows.py

Values that differ from run to run (ids the workflow draws, times, the
server's ids) are replaced by placeholders; the order of what a workflow
did is kept.
"""

from __future__ import annotations

import base64
import json
import os
import re
from pathlib import Path
from typing import Any

from google.protobuf.json_format import MessageToDict
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowHistory

FINGERPRINTS = Path(__file__).parent / "fingerprints"

# The history events a workflow's commands write, and the attributes kept of each.
COMMAND_EVENTS = {
    EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED: "activity_task_scheduled_event_attributes",
    EventType.EVENT_TYPE_TIMER_STARTED: "timer_started_event_attributes",
    EventType.EVENT_TYPE_TIMER_CANCELED: "timer_canceled_event_attributes",
    EventType.EVENT_TYPE_MARKER_RECORDED: "marker_recorded_event_attributes",
    EventType.EVENT_TYPE_START_CHILD_WORKFLOW_EXECUTION_INITIATED: (
        "start_child_workflow_execution_initiated_event_attributes"
    ),
    EventType.EVENT_TYPE_SIGNAL_EXTERNAL_WORKFLOW_EXECUTION_INITIATED: (
        "signal_external_workflow_execution_initiated_event_attributes"
    ),
    EventType.EVENT_TYPE_REQUEST_CANCEL_EXTERNAL_WORKFLOW_EXECUTION_INITIATED: (
        "request_cancel_external_workflow_execution_initiated_event_attributes"
    ),
    EventType.EVENT_TYPE_UPSERT_WORKFLOW_SEARCH_ATTRIBUTES: "upsert_workflow_search_attributes_event_attributes",
    EventType.EVENT_TYPE_WORKFLOW_PROPERTIES_MODIFIED: "workflow_properties_modified_event_attributes",
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED: "workflow_execution_completed_event_attributes",
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_FAILED: "workflow_execution_failed_event_attributes",
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW: "workflow_execution_continued_as_new_event_attributes",
}
# Attributes that name the run, the task or the server, not what the workflow asked for.
DROPPED = {
    "workflowTaskCompletedEventId", "workflowTaskCompletedEventID", "activityId", "timerId", "namespace",
    "namespaceId", "taskQueue", "header", "workflowId", "runId", "newExecutionRunId", "control",
    "initiatedEventId", "startedEventId", "lastCompletionResult", "userMetadata", "useCompatibleVersion",
    "stackTrace", "failure", "complete_time", "original_schedule_time", "activation_index",
}
VOLATILE = [
    (re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})?"), "<time>"),
    (re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b"), "<uuid>"),
    (re.compile(r"\bws_[0-9a-f]{12}\b"), "<workspace>"),  # each test's own workspace
    (re.compile(r"(/run/[\w-]+/)[0-9a-f]{8}\b"), r"\1<test run>"),  # a run id a test drew
]


def updating() -> bool:
    return os.environ.get("VECTORY_UPDATE_FINGERPRINTS") == "1"


def _payload(value: dict) -> Any:
    """A JSON payload's data, decoded; anything else as its encoding."""
    data = base64.b64decode(value.get("data", ""))
    encoding = base64.b64decode(value.get("metadata", {}).get("encoding", "")).decode()
    if encoding == "json/plain":
        return json.loads(data)
    return f"<{encoding}: {len(data)} bytes>"


def _clean(node: Any) -> Any:
    if isinstance(node, dict):
        if set(node) >= {"metadata"} and "encoding" in node.get("metadata", {}):
            return _clean(_payload(node))
        return {k: _clean(v) for k, v in sorted(node.items()) if k not in DROPPED}
    if isinstance(node, list):
        return [_clean(v) for v in node]
    if isinstance(node, str):
        for pattern, placeholder in VOLATILE:
            node = pattern.sub(placeholder, node)
    return node


def fingerprint(history: WorkflowHistory) -> list[dict[str, Any]]:
    commands = []
    for event in history.events:
        field = COMMAND_EVENTS.get(event.event_type)
        if field is None:
            continue
        attributes = MessageToDict(getattr(event, field))
        commands.append({"event": EventType.Name(event.event_type).removeprefix("EVENT_TYPE_"), **_clean(attributes)})
    return commands


def check_fingerprint(history: WorkflowHistory, name: str) -> None:
    """Compare with the committed baseline (write it with VECTORY_UPDATE_FINGERPRINTS=1)."""
    path = FINGERPRINTS / f"{name}.json"
    got = fingerprint(history)
    text = json.dumps(got, indent=1, sort_keys=True) + "\n"
    if updating():
        FINGERPRINTS.mkdir(exist_ok=True)
        path.write_text(text)
        return
    assert path.exists(), f"no fingerprint for {name}: record it with VECTORY_UPDATE_FINGERPRINTS=1"
    expected = json.loads(path.read_text())
    if got != expected:
        for i, (a, b) in enumerate(zip(expected, got, strict=False)):
            assert a == b, f"{name}: workflow command {i} changed (baseline {path.name}):\n{a}\n!=\n{b}"
        assert len(got) == len(expected), f"{name}: {len(expected)} commands in the baseline, {len(got)} now"
