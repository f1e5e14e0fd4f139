"""Metrics, readiness and structured logs.

The Prometheus registry is process-wide (the API and the worker share this
process in tests), so every assertion compares a value before and after.
"""

from __future__ import annotations

import io
import json
import logging
import sys

from prometheus_client.parser import text_string_to_metric_families

from core.contracts import conversation_workflow_id
from core.observability import JsonFormatter, configure_logging, redact
from sandbox import payloads

from helpers import (
    connect_instagram,
    contact_id_of,
    create_automation,
    create_tenant,
    new_sender,
    post_meta,
    wait_for,
    wait_for_messages,
)

HELLO_FLOW = {
    "trigger": {"type": "dm_keyword", "keywords": ["hello"], "match": "contains"},
    "steps": [{"id": "hi", "type": "send_message", "text": "Hi there!"}],
}


async def metric(stack, name: str, **labels: str) -> float:
    r = await stack.api.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    total = 0.0
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


async def test_webhook_histogram_counts_ok_and_forged(stack):
    tenant = await create_tenant(stack)
    channel, account_id, _ = await connect_instagram(stack, tenant)
    ok_before = await metric(stack, "vectory_webhook_seconds_count", source="meta", outcome="ok")
    forged_before = await metric(stack, "vectory_webhook_seconds_count", source="meta", outcome="forged")
    dispatched_before = await metric(stack, "vectory_webhook_events_total", source="meta", result="dispatched")

    webhook = payloads.instagram_webhook({account_id: [payloads.instagram_dm(account_id, new_sender(), "hey")]})
    assert (await post_meta(stack, webhook)).status_code == 200
    assert (await post_meta(stack, webhook, secret="not-the-app-secret")).status_code == 401

    assert await metric(stack, "vectory_webhook_seconds_count", source="meta", outcome="ok") == ok_before + 1
    assert await metric(stack, "vectory_webhook_seconds_count", source="meta", outcome="forged") == forged_before + 1
    assert (
        await metric(stack, "vectory_webhook_events_total", source="meta", result="dispatched")
        == dispatched_before + 1
    )
    # Millisecond buckets are exposed.
    assert await metric(stack, "vectory_webhook_seconds_bucket", source="meta", outcome="ok", le="0.001") >= 0


async def test_readyz_reports_database_and_temporal(stack):
    r = await stack.api.get("/readyz")
    assert r.status_code == 200, r.text
    assert r.json() == {"ok": True, "checks": {"database": "ok", "temporal": "ok"}}
    assert (await stack.api.get("/healthz")).status_code == 200


async def test_redelivery_caught_by_the_message_log_is_counted(stack):
    tenant = await create_tenant(stack)
    channel, account_id, _ = await connect_instagram(stack, tenant)
    await create_automation(stack, tenant, channel["id"], HELLO_FLOW["trigger"], HELLO_FLOW["steps"])
    person = new_sender()
    webhook = payloads.instagram_webhook({account_id: [payloads.instagram_dm(account_id, person, "hello!")]})
    before = await metric(stack, "vectory_events_deduplicated_total")

    assert (await post_meta(stack, webhook)).status_code == 200
    assert len(await wait_for_messages(stack, person, 1)) == 1
    # A redelivery the live conversation remembers is dropped in the workflow
    # (not counted: workflow code never touches metrics). Lose that memory by
    # terminating the conversation, so the redelivery reaches record_inbound
    # and the unique message row catches it.
    conversation = conversation_workflow_id(tenant.workspace_id, channel["id"], contact_id_of(stack, channel["id"], person))
    await stack.client.get_workflow_handle(conversation).terminate("test: lose the in-memory dedupe set")
    assert (await post_meta(stack, webhook)).status_code == 200

    async def counted():
        return await metric(stack, "vectory_events_deduplicated_total") >= before + 1

    assert await wait_for(counted, timeout=10)
    assert len(await wait_for_messages(stack, person, 2, timeout=1.5)) == 1


async def test_run_counters_are_exposed(stack):
    text = (await stack.api.get("/metrics")).text
    names = {family.name for family in text_string_to_metric_families(text)}
    assert {"vectory_webhook_seconds", "vectory_webhook_events", "vectory_events_deduplicated",
            "vectory_runs_started"} <= names


def _record(msg: str, *args, exc_info=None, **attrs) -> logging.LogRecord:
    record = logging.LogRecord("vectory.test", logging.WARNING, __file__, 1, msg, args, exc_info)
    record.__dict__.update(attrs)
    return record


def test_json_formatter_redacts_credentials_and_adds_no_extras():
    telegram_token = "5123456789:AAH" + "x" * 32
    record = _record(
        "calling %s with Authorization: Bearer vk_secret123 and %s",
        f"https://api.telegram.org/bot{telegram_token}/sendMessage",
        "https://graph.facebook.com/v21.0/me?fields=id&access_token=IGAAsecret456&x=1",
        body={"text": "my phone is 555"},
    )
    line = JsonFormatter("api").format(record)
    assert "\n" not in line
    out = json.loads(line)
    assert out["service"] == "api" and out["level"] == "WARNING" and out["logger"] == "vectory.test"
    assert out["ts"].endswith("+00:00")
    for secret in ("vk_secret123", "IGAAsecret456", telegram_token):
        assert secret not in line
    assert "Bearer [redacted]" in out["message"]
    assert "access_token=[redacted]&x=1" in out["message"]
    assert "/bot[redacted]/sendMessage" in out["message"]
    assert "555" not in line and "body" not in out
    # uvicorn's access line for the Temporal UI's codec calls (the token decodes every history).
    access = JsonFormatter("api").format(_record('%s - "%s" %d', "127.0.0.1:5000",
                                                 "POST /codec/t/codec-secret-9/decode HTTP/1.1", 200))
    assert "codec-secret-9" not in access and "/codec/t/[redacted]/decode" in access


def test_json_formatter_redacts_tracebacks_and_carries_temporal_context():
    try:
        raise RuntimeError("Authorization: Bearer vk_secret123")
    except RuntimeError:
        exc_info = sys.exc_info()
    record = _record(
        "send failed",
        exc_info=exc_info,
        temporal_activity={"workflow_id": "ws/run/1", "workflow_run_id": "r1", "activity_type": "send_message"},
    )
    out = json.loads(JsonFormatter("worker").format(record))
    assert "vk_secret123" not in out["exc"] and "RuntimeError" in out["exc"]
    assert (out["workflow_id"], out["run_id"], out["activity"]) == ("ws/run/1", "r1", "send_message")
    workflow_record = _record("step done", temporal_workflow={"workflow_id": "ws/conv/1", "run_id": "r2"})
    out = json.loads(JsonFormatter("worker").format(workflow_record))
    assert (out["workflow_id"], out["run_id"]) == ("ws/conv/1", "r2") and "activity" not in out
    assert redact("no secrets here: 2024-01-01T10:00:00Z") == "no secrets here: 2024-01-01T10:00:00Z"


def test_configure_logging_writes_json_lines(monkeypatch):
    root = logging.getLogger()
    saved = [(logging.getLogger(n), logging.getLogger(n).handlers[:], logging.getLogger(n).propagate)
             for n in ("uvicorn", "uvicorn.error", "uvicorn.access")]
    saved_root = (root.handlers[:], root.level)
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stdout", stream)
    try:
        configure_logging("api", "INFO")
        logging.getLogger("vectory.test").info("token access_token=abc123 used")
    finally:
        root.handlers, level = saved_root
        root.setLevel(level)
        for logger, handlers, propagate in saved:
            logger.handlers, logger.propagate = handlers, propagate
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert lines[-1]["message"] == "token access_token=[redacted] used"
    assert lines[-1]["service"] == "api"


async def test_a_failed_profile_lookup_logs_no_person_id_and_a_refused_token_is_not_echoed(stack, caplog):
    tenant = await create_tenant(stack)
    channel, account_id, _ = await connect_instagram(stack, tenant)
    await create_automation(stack, tenant, channel["id"], {"type": "dm_keyword", "keywords": ["hello"]},
                            [{"id": "hi", "type": "send_message", "text": "Hi {{contact.first_name | there}}!"}])
    person = new_sender()
    await stack.sandbox.post("/_sandbox/faults", json={
        "service": "instagram", "method": "GET", "path_contains": person, "kind": "custom", "times": 5,
        "status": 400, "body": {"error": {"message": "(#230) Requires pages_messaging permission", "code": 230,
                                          "type": "OAuthException", "fbtrace_id": "Ab"}},
    })
    try:
        with caplog.at_level(logging.INFO):
            await post_meta(stack, payloads.instagram_webhook({account_id: [payloads.instagram_dm(account_id, person,
                                                                                                 "hello")]}))
            [reply] = await wait_for_messages(stack, person, 1)
    finally:
        await stack.sandbox.delete("/_sandbox/faults")
    assert reply["json"]["message"]["text"] == "Hi there!"
    assert "profile" in caplog.text and person not in caplog.text
    # A 422 names what is wrong without echoing the token it refused.
    for body in ({"access_token": "IGAAsecret-echo-1"}, {"platform": "instagram", "access_token": "x" * 5000}):
        r = await stack.api.post("/v1/channels", json=body, headers=tenant.headers)
        assert r.status_code == 422 and r.json()["detail"]
        assert "IGAAsecret-echo-1" not in r.text and "x" * 100 not in r.text
