"""The API answers what its OpenAPI document says (issue 16, defect 8).

Walks the document and the app's routes: a 405 lists in ``Allow`` exactly
the methods documented for the path; every documented 422 is the
validation error array, and the 422s routes raise themselves are too; bad
input to the webhooks, the codec and the privacy pages (non-UTF-8 bodies
among them) gets a status documented for that operation, never a 500.
"""

from __future__ import annotations

import hashlib
import hmac
import re

from sandbox import payloads

from conftest import APP_SECRET, CODEC_TOKEN, VERIFY_TOKEN
from helpers import connect_instagram, create_automation, create_tenant, new_sender, send_dm, wait_for

METHODS = ("get", "post", "put", "patch", "delete")
NOT_UTF8 = b"\xff\xfe{\x80}"


def _template(path: str) -> re.Pattern[str]:
    # Run ids hold '/' (they are workflow ids): /v1/runs/{run_id}/signals/{name}
    # is also the URL of a run whose id ends in /signals/<name>.
    pattern = re.sub(r"\{(\w+)\}", lambda m: ".+" if m.group(1) == "run_id" else "[^/]+", path)
    return re.compile(pattern)


async def test_every_405_allows_exactly_the_methods_documented_for_its_path(stack):
    spec = (await stack.api.get("/openapi.json")).json()
    templates = [(_template(path), set(ops)) for path, ops in spec["paths"].items()]
    checked = 0
    for path in spec["paths"]:
        url = re.sub(r"\{\w+\}", "x1", path)
        documented = set().union(*(methods for pattern, methods in templates if pattern.fullmatch(url)))
        for method in METHODS:
            if method in documented:
                continue
            r = await stack.api.request(method, url)
            assert r.status_code == 405, (method, url, r.status_code)
            allowed = {m.strip().lower() for m in r.headers["allow"].split(",")}
            assert allowed == documented, (method, url, r.headers["allow"])
            checked += 1
    assert checked > 50


def _resolve(spec: dict, schema: dict) -> dict:
    while "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


async def test_every_documented_422_is_the_validation_error_array(stack):
    spec = (await stack.api.get("/openapi.json")).json()
    documented = 0
    for path, operations in spec["paths"].items():
        for method, op in operations.items():
            answer = op["responses"].get("422")
            if answer is None:
                continue
            documented += 1
            body = _resolve(spec, answer["content"]["application/json"]["schema"])
            detail = _resolve(spec, body["properties"]["detail"])
            assert detail["type"] == "array", (method, path, detail)
            item = _resolve(spec, detail["items"])
            assert {"loc", "msg", "type"} <= set(item["required"]), (method, path, item)
    assert documented > 30


async def test_the_422s_routes_find_themselves_have_the_array_detail(stack):
    tenant = await create_tenant(stack)
    channel, account_id, _ = await connect_instagram(stack, tenant)
    other, other_account, _ = await connect_instagram(stack, tenant)
    automation = await create_automation(stack, tenant, channel["id"], {"type": "api"}, [
        {"id": "paid", "type": "wait_for_event", "event": "paid", "timeout_seconds": 3600}])
    await send_dm(stack, account_id, new_sender(), "hi")
    await send_dm(stack, other_account, new_sender(), "hi")

    async def contacts():
        data = (await stack.api.get("/v1/contacts", headers=tenant.headers)).json()["data"]
        return len(data) == 2 and {c["channel_id"]: c["id"] for c in data}

    by_channel = await wait_for(contacts)
    started = await stack.api.post(f"/v1/automations/{automation['id']}/runs",
                                   json={"contact_id": by_channel[channel["id"]]}, headers=tenant.headers)
    assert started.status_code == 202, started.text
    run_url = f"/v1/runs/{started.json()['id']}"

    async def recorded():
        return (await stack.api.get(run_url, headers=tenant.headers)).status_code == 200

    assert await wait_for(recorded)
    refused = [
        ("post", "/v1/broadcasts", {"channel_id": "ch_nope", "text": "Sale!"}, ["body", "channel_id"]),
        ("post", f"/v1/automations/{automation['id']}/runs", {"contact_id": by_channel[other["id"]]},
         ["body", "contact_id"]),
        ("post", f"{run_url}/signals/{'e' * 65}", {"payload": {}}, ["path", "name"]),
    ]
    for method, url, body, loc in refused:
        r = await stack.api.request(method, url, json=body, headers=tenant.headers)
        assert r.status_code == 422, (url, r.text)
        [error] = r.json()["detail"]
        assert error["loc"] == loc and error["msg"] and error["type"], (url, error)


def _signed(body: bytes) -> dict[str, str]:
    return {"X-Hub-Signature-256": "sha256=" + hmac.new(APP_SECRET.encode(), body, hashlib.sha256).hexdigest()}


async def test_bad_input_to_webhooks_codec_and_privacy_pages_gets_a_documented_status(stack):
    spec = (await stack.api.get("/openapi.json")).json()
    codec = {"Authorization": f"Bearer {CODEC_TOKEN}"}
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    big = b"x" * (stack.settings.max_webhook_body_bytes + 1)
    cases = [
        ("get", "/webhooks/meta", {"params": {"hub.mode": "subscribe", "hub.verify_token": "guess"}}),
        ("get", "/webhooks/meta", {"params": {"hub.mode": "x", "hub.verify_token": VERIFY_TOKEN}}),
        ("post", "/webhooks/meta", {"content": b'{"object": "instagram"}'}),
        ("post", "/webhooks/meta", {"content": NOT_UTF8}),
        ("post", "/webhooks/meta", {"content": NOT_UTF8, "headers": _signed(NOT_UTF8)}),
        ("post", "/webhooks/meta", {"content": b"[]", "headers": _signed(b"[]")}),
        ("post", "/webhooks/meta", {"content": b'{"entry": 1}', "headers": _signed(b'{"entry": 1}')}),
        ("post", "/webhooks/meta", {"content": big, "headers": _signed(big)}),
        ("post", "/webhooks/telegram/ch_nope", {"content": NOT_UTF8}),
        ("post", "/webhooks/telegram/ch_nope", {"json": payloads.telegram_message_update(1, 5, "hi")}),
        ("post", "/codec/decode", {"json": {"payloads": []}}),
        ("post", "/codec/encode", {"json": {"payloads": []}, "headers": {"Authorization": "Bearer guess"}}),
        ("post", "/codec/decode", {"content": NOT_UTF8, "headers": codec}),
        ("post", "/codec/decode", {"content": NOT_UTF8, "headers": {**codec, "Content-Type": "application/json"}}),
        ("post", "/codec/encode", {"content": NOT_UTF8, "headers": {**codec, "Content-Type": "text/plain"}}),
        ("post", "/codec/decode", {"json": {"payloads": "x"}, "headers": codec}),
        ("post", "/codec/decode", {"json": {"payloads": [{"data": "A"}]}, "headers": codec}),
        ("post", "/codec/decode", {"json": {"payloads": [{"metadata": {"encoding": "YmluYXJ5L2VuY3J5cHRlZA==",
                                                                       "encryption-key-id": "bm9wZQ=="},
                                                          "data": "AAAA"}]}, "headers": codec}),
        ("post", "/webhooks/meta/deauthorize", {"content": NOT_UTF8, "headers": form}),
        ("post", "/webhooks/meta/deauthorize", {"content": b"signed_request=x", "headers": {"Content-Type": "text/plain"}}),
        ("post", "/webhooks/meta/deauthorize", {"content": b"other=1", "headers": form}),
        ("post", "/webhooks/meta/data-deletion", {"content": b"signed_request=a.b", "headers": form}),
        ("post", "/webhooks/meta/data-deletion", {"content": NOT_UTF8, "headers": form}),
        ("post", "/webhooks/meta/data-deletion", {"content": b"x" * 70_000, "headers": form}),
        ("get", "/privacy/deletions/%FF%FE", {}),
        ("get", "/privacy/deletions/nope", {"params": {"format": "json"}}),
    ]
    for method, url, kwargs in cases:
        r = await stack.api.request(method, url, **kwargs)
        template = next(p for p in spec["paths"] if _template(p).fullmatch(url.split("?")[0]))
        documented = spec["paths"][template][method]["responses"]
        assert str(r.status_code) in documented and r.status_code >= 400, (
            method, url, r.status_code, r.text[:200], sorted(documented))
        detail = r.json()["detail"]
        assert isinstance(detail, list) if r.status_code == 422 else isinstance(detail, str), (url, detail)
