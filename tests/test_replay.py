"""Replay every recorded history against today's workflow code.

A NondeterminismError here means a change to workflow code would break
workflows already running in production: version it (``workflow.patched``)
instead. Histories are recorded by tests/test_workflows.py::

    VECTORY_RECORD_HISTORIES=1 .venv/bin/python -m pytest tests/test_workflows.py
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path

from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer, WorkflowReplayResult

from workers.main import WORKFLOWS, workflow_runner

HISTORIES = Path(__file__).parent / "histories"

# The paths a refactor is most likely to break; each must have a recorded history.
REQUIRED = {
    "conversation_price_reply",  # signal-with-start, child run, reply forwarded to it
    "run_price_reply",  # wait_for_reply answered through the conversation
    "run_wait_for_reply_timed_out",  # wait_for_reply timeout branch
    "connect_token_invalid",
    "disconnect_revoke_failed",
    "conversation_one_message_inline",  # one-message flow, run recorded by record_run (before send-completes-run)
    "conversation_one_message_send_completes_run",  # the same, run recorded with the send
    "conversation_send_fetches_profile",  # a new contact's profile looked up by the first send
    "conversation_send_looks_up_profile_first",  # ... before it, the reply rendered with the name
    "conversation_current_one_message",  # inbound-records-and-replies: the reply sent by record_inbound
    "conversation_current_price_reply",  # ... and a run started, the answer forwarded to it
    "conversation_current_price_reply_matching2",  # the same under matching rules 2 (RE2, unspaced scripts)
    "run_price_reply_matching2",  # a run under matching rules 2
    "conversation_current_price_reply_matching3",  # ... 3 (a pattern RE2 cannot run matches nothing)
    "run_price_reply_matching3",
    "conversation_waiting_run_kept",  # a story mention while a run waits: the run keeps waiting
    "run_attachment_reply",  # a photo answers a wait_for_reply
    "conversation_unrecordable_skipped",  # an event the database refuses is skipped
    "conversation_first_events",  # started with its first message in its input (the API's eager start)
    "conversation_expired_history",  # the retention sweep's signal: continued as new with a run waiting
    "conversation_profile_after_routing",  # a DM that starts nothing: the profile looked up after it
}

# The sandbox with its full runtime checks (workers/main.py workflow_runner).
RUNNER = workflow_runner("strict")

SECRET_PATTERNS = [
    re.compile(r"access_token", re.IGNORECASE),
    re.compile(r"\bBearer\s+\S"),
    re.compile(r"\bIGAA[A-Za-z0-9]{16,}"),  # Instagram user tokens
    re.compile(r"\bEAA[A-Za-z0-9]{20,}"),  # Meta page / user tokens
    re.compile(r"\b\d{6,12}:[A-Za-z0-9_-]{30,}"),  # Telegram bot tokens
]


def history_files() -> list[Path]:
    return sorted(HISTORIES.glob("*.json"))


async def test_recorded_histories_replay_on_current_workflow_code():
    files = history_files()
    assert len(files) >= 3, f"no recorded histories in {HISTORIES} (lost directory?)"
    missing = REQUIRED - {f.stem for f in files}
    assert not missing, f"histories missing: {sorted(missing)}"

    histories = [WorkflowHistory.from_json(f.stem, f.read_text()) for f in files]
    replayer = Replayer(workflows=WORKFLOWS, workflow_runner=RUNNER)
    results: list[WorkflowReplayResult] = []
    async def each() -> AsyncIterator[WorkflowHistory]:
        for history in histories:
            yield history

    async with replayer.workflow_replay_iterator(each()) as replays:
        async for result in replays:
            results.append(result)

    assert len(results) == len(files)  # every file really replayed
    assert sorted(r.history.workflow_id for r in results) == sorted(f.stem for f in files)
    failures = {r.history.workflow_id: repr(r.replay_failure) for r in results if r.replay_failure}
    assert not failures, failures


def _decoded_payloads(node: object) -> list[str]:
    """Payload data is base64 in the JSON history; decode it to search the contents."""
    found: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "data" and isinstance(value, str):
                try:
                    found.append(base64.b64decode(value).decode("utf-8", "replace"))
                except ValueError:
                    found.append(value)
            else:
                found.extend(_decoded_payloads(value))
    elif isinstance(node, list):
        for item in node:
            found.extend(_decoded_payloads(item))
    return found


def test_recorded_histories_hold_no_tokens():
    files = history_files()
    assert files
    for path in files:
        text = path.read_text()
        for content in [text, *_decoded_payloads(json.loads(text))]:
            for pattern in SECRET_PATTERNS:
                assert not pattern.search(content), f"{path.name}: matches {pattern.pattern}"
