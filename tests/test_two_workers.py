"""Two workers on one task queue (as with `--scale worker=2`): dedupe and
idempotency records hold, every event is answered exactly once."""

from __future__ import annotations

import asyncio

from temporalio.client import Client

from core.codec import data_converter
from sandbox import payloads

from helpers import (
    connect_instagram,
    create_automation,
    create_tenant,
    new_sender,
    post_meta,
    sandbox_messages,
    wait_for,
)


async def test_two_workers_answer_every_event_exactly_once(stack):
    from workers.main import build_deps, build_worker

    # A second worker as a second process would have it: its own connection,
    # engine pool, key cache and HTTP client.
    second_deps = build_deps(stack.settings)
    client = await Client.connect(
        stack.settings.temporal_address, identity="second-worker", data_converter=data_converter(second_deps.keys)
    )
    second = build_worker(client, stack.settings, second_deps)
    second_task = asyncio.create_task(second.run())
    try:
        tenant = await create_tenant(stack)
        channel, account_id, _ = await connect_instagram(stack, tenant)
        await create_automation(
            stack, tenant, channel["id"], {"type": "dm_keyword", "keywords": ["twice"]},
            [{"id": "a", "type": "send_message", "text": "once"},
             {"id": "t", "type": "add_tag", "tag": "seen"},
             {"id": "b", "type": "send_message", "text": "and again"}],
        )
        people = [new_sender() for _ in range(40)]
        items = [payloads.instagram_dm(account_id, p, "twice please") for p in people]
        body = payloads.instagram_webhook({account_id: items})
        # Every batch is delivered three times, concurrently.
        results = await asyncio.gather(*(post_meta(stack, body) for _ in range(3)))
        assert all(r.status_code == 200 for r in results)

        async def all_done():
            counts = [len(await sandbox_messages(stack, p)) for p in people]
            return all(c >= 2 for c in counts) and counts

        assert await wait_for(all_done, timeout=60, interval=0.3)
        await asyncio.sleep(1.0)
        counts = [len(await sandbox_messages(stack, p)) for p in people]
        assert counts == [2] * len(people)
        contacts = (await stack.api.get("/v1/contacts", params={"limit": 500}, headers=tenant.headers)).json()
        assert contacts["count"] == len(people)
        assert all(c["tags"] == ["seen"] for c in contacts["data"])
    finally:
        await second.shutdown()
        await second_task
        await second_deps.http.aclose()
