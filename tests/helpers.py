"""Helpers for end-to-end tests: tenants, channels, signed webhooks, and
waiting for what the sandbox received."""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass

from sqlmodel import Session

from core.contracts import contact_id_for
from core.db import Channel
from sandbox import payloads

from conftest import ADMIN_TOKEN, APP_SECRET, Stack


@dataclass
class Tenant:
    workspace_id: str
    api_key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}


async def create_tenant(stack: Stack, name: str = "Acme") -> Tenant:
    r = await stack.api.post(
        "/v1/workspaces", json={"name": name, "business_use_attestation": True}, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
    )
    assert r.status_code == 201, r.text
    body = r.json()
    return Tenant(body["id"], body["api_key"])


async def connect_instagram(stack: Stack, tenant: Tenant, account_id: str | None = None) -> tuple[dict, str, str]:
    """Register an IG account in the sandbox and connect it. Returns
    (channel json, account id, token)."""
    account_id = account_id or str(17841400000000000 + secrets.randbelow(10**9))
    token = f"IGAA{secrets.token_hex(24)}"
    r = await stack.sandbox.post(
        "/_sandbox/accounts",
        json={"platform": "instagram", "account_id": account_id, "token": token, "username": "acme.shop"},
    )
    assert r.status_code < 300, r.text
    r = await stack.api.post(
        "/v1/channels", json={"platform": "instagram", "access_token": token}, headers=tenant.headers
    )
    assert r.status_code == 201, r.text
    assert r.json()["status"] == "active"
    return r.json(), account_id, token


async def connect_telegram(stack: Stack, tenant: Tenant) -> tuple[dict, str, str]:
    bot_id = str(5000000000 + secrets.randbelow(10**8))
    token = f"{bot_id}:AA{secrets.token_urlsafe(24)}"
    r = await stack.sandbox.post(
        "/_sandbox/accounts", json={"platform": "telegram", "token": token, "username": "acme_bot", "name": "Acme"}
    )
    assert r.status_code < 300, r.text
    r = await stack.api.post("/v1/channels", json={"platform": "telegram", "access_token": token}, headers=tenant.headers)
    assert r.status_code == 201, r.text
    return r.json(), bot_id, token


async def create_automation(stack: Stack, tenant: Tenant, channel_id: str, trigger: dict, steps: list[dict], name="flow"):
    r = await stack.api.post(
        "/v1/automations",
        json={"name": name, "channel_id": channel_id, "trigger": trigger, "steps": steps},
        headers=tenant.headers,
    )
    assert r.status_code == 201, r.text
    return r.json()


async def post_meta(stack: Stack, payload: dict, *, secret: str = APP_SECRET):
    body, headers = payloads.encode_and_sign(payload, secret)
    return await stack.api.post("/webhooks/meta", content=body, headers=headers)


async def send_dm(stack: Stack, account_id: str, sender_id: str, text: str, **kw):
    item = payloads.instagram_dm(account_id, sender_id, text, **kw)
    r = await post_meta(stack, payloads.instagram_webhook({account_id: [item]}))
    assert r.status_code == 200, r.text
    return item


async def sandbox_messages(stack: Stack, recipient_id: str) -> list[dict]:
    """Successful sends the sandbox received for one recipient, in order."""
    r = await stack.sandbox.get("/_sandbox/calls")
    out = []
    for call in r.json()["calls"]:
        body = call.get("json") or {}
        if call["status"] >= 400:
            continue
        if call["path"].endswith("/messages") and (body.get("recipient") or {}).get("id") == recipient_id:
            out.append(call)
        elif call["path"] == "/sendMessage" and str(body.get("chat_id")) == recipient_id:
            out.append(call)
    return out


def text_of(call: dict) -> str:
    body = call["json"]
    if "message" in body:
        message = body["message"]
        if "text" in message:
            return message["text"]
        return message["attachment"]["payload"]["text"]
    return body["text"]


async def wait_for_messages(stack: Stack, recipient_id: str, count: int, timeout: float = 15.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        calls = await sandbox_messages(stack, recipient_id)
        if len(calls) >= count or time.monotonic() > deadline:
            return calls
        await asyncio.sleep(0.05)


async def wait_for(predicate, timeout: float = 15.0, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        result = await predicate()
        if result or time.monotonic() > deadline:
            return result
        await asyncio.sleep(interval)


def new_sender() -> str:
    return str(10**15 + secrets.randbelow(10**15))


def contact_id_of(stack: Stack, channel_id: str, platform_user_id: str) -> str:
    """The id the API gives a person who writes to a connected channel (keyed
    with the channel's ``contact_key``, which only the database holds)."""
    with Session(stack.deps.engine) as db:
        channel = db.get(Channel, channel_id)
        assert channel is not None
        return contact_id_for(channel_id, platform_user_id, key=channel.contact_key)


class RefusingTemporal:
    """The API's Temporal client, recording the event id of each event handed
    over (signal-with-start or eager start) and refusing those in ``refuse``
    for good (INVALID_ARGUMENT, as Temporal answers a payload over its limit)."""

    def __init__(self, client, refuse: set[str] | None = None) -> None:
        self._client, self.refuse = client, refuse if refuse is not None else set()
        self.handed: list[str] = []

    def __getattr__(self, name):
        return getattr(self._client, name)

    async def start_workflow(self, *args, **kwargs):
        from temporalio.service import RPCError, RPCStatusCode

        events = kwargs.get("start_signal_args") or getattr(args[1], "first_events", [])
        ids = [e.event_id for e in events if hasattr(e, "event_id")]
        self.handed += ids
        if self.refuse & set(ids):
            raise RPCError("Blob data size exceeds limit.", RPCStatusCode.INVALID_ARGUMENT, b"")
        return await self._client.start_workflow(*args, **kwargs)
