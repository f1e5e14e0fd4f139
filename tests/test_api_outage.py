"""The API while Temporal is unreachable: routes that need it answer 503
with Retry-After (never 500), keep nothing half done, and asking again
once it is back does the work (an erasure asked for during the outage
really erases)."""

from __future__ import annotations

from temporalio.client import Client
from temporalio.service import RetryConfig

from core.codec import data_converter

from conftest import free_port, start_dev_server
from helpers import connect_instagram, create_tenant, new_sender, send_dm, wait_for


async def test_routes_that_need_temporal_answer_503_keep_nothing_half_done_and_work_once_it_is_back(stack, tmp_path):
    tenant = await create_tenant(stack)
    channel, account_id, _ = await connect_instagram(stack, tenant)
    await send_dm(stack, account_id, new_sender(), "hello")

    async def one_contact():
        r = await stack.api.get("/v1/contacts", headers=tenant.headers)
        return r.json()["count"] == 1 and r.json()["data"][0]

    contact = await wait_for(one_contact, timeout=20)
    assert contact
    state = stack.api_app.state
    healthy = state.temporal
    # A client connected to a Temporal that then goes away (no retries, so
    # the test does not wait for the client's backoff).
    port = free_port()
    server = await start_dev_server(port, str(tmp_path / "temporal.db"))
    gone = await Client.connect(f"127.0.0.1:{port}", retry_config=RetryConfig(max_retries=0),
                                data_converter=data_converter(stack.deps.keys))
    await server.shutdown()
    state.temporal = gone
    try:
        r = await stack.api.post("/v1/channels", json={"platform": "telegram", "access_token": "123:AA" + "b" * 33},
                                 headers=tenant.headers)
        assert (r.status_code, r.headers.get("retry-after")) == (503, "5"), r.text
        assert "Temporal" in r.json()["detail"]
        # Nothing was connected, so the channel and its token are not kept.
        channels = (await stack.api.get("/v1/channels", headers=tenant.headers)).json()
        assert [c["id"] for c in channels["data"]] == [channel["id"]]

        r = await stack.api.post("/v1/broadcasts", json={"channel_id": channel["id"], "text": "Sale!"},
                                 headers=tenant.headers)
        assert r.status_code == 503, r.text
        listing = (await stack.api.get("/v1/broadcasts", headers=tenant.headers)).json()
        assert [b["status"] for b in listing["data"]] == ["failed"]  # not "queued" forever

        r = await stack.api.delete(f"/v1/contacts/{contact['id']}", headers=tenant.headers)
        assert r.status_code == 503, r.text
        # Reading the database does not need Temporal.
        assert (await stack.api.get(f"/v1/contacts/{contact['id']}", headers=tenant.headers)).status_code == 200
    finally:
        state.temporal = healthy
        state.temporal_down_until = 0.0

    # Asked again once Temporal is back, the erasure runs (its job was kept
    # pending: it is the same job, now started).
    r = await stack.api.delete(f"/v1/contacts/{contact['id']}", headers=tenant.headers)
    assert r.status_code == 202, r.text

    async def erased():
        job = (await stack.api.get(f"/v1/erasures/{r.json()['id']}", headers=tenant.headers)).json()
        return job["status"] == "completed"

    assert await wait_for(erased, timeout=30)
    assert (await stack.api.get(f"/v1/contacts/{contact['id']}", headers=tenant.headers)).status_code == 404
