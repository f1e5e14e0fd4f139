"""Durable inbox: webhooks keep working while Temporal is down, and every
stored event is handled exactly once when it comes back."""

from __future__ import annotations

import asyncio

import httpx
from sqlmodel import Session, func, select
from temporalio.client import Client

from core.codec import data_converter
from core.contracts import InboundEvent
from core.db import Channel, DeadLetter, InboxEvent, Message
from sandbox import payloads

from conftest import free_port, serve, start_dev_server
from helpers import (
    RefusingTemporal,
    connect_instagram,
    contact_id_of,
    create_automation,
    create_tenant,
    new_sender,
    post_meta,
    sandbox_messages,
    send_dm,
    text_of,
    wait_for,
    wait_for_messages,
)


async def test_events_posted_while_temporal_is_down_are_handled_once_it_is_back(stack, tmp_path):
    from workers.apiserver import create_app
    from workers.main import build_worker

    tenant = await create_tenant(stack)
    channel, account_id, _ = await connect_instagram(stack, tenant)
    await create_automation(
        stack, tenant, channel["id"], {"type": "dm_keyword", "keywords": ["outage"]},
        [{"id": "a", "type": "send_message", "text": "We got your message"}],
    )
    port = free_port()
    db_file = str(tmp_path / "temporal.db")
    settings = stack.settings.model_copy(
        update={"temporal_address": f"127.0.0.1:{port}", "task_queue": f"{stack.settings.task_queue}-inbox"}
    )
    env = await start_dev_server(port, db_file)
    client = await Client.connect(settings.temporal_address, data_converter=data_converter(stack.deps.keys))
    worker = build_worker(client, settings, stack.deps)
    worker_task = asyncio.create_task(worker.run())
    api_port = free_port()
    server, server_task = await serve(create_app(settings, temporal=client), api_port)
    api = httpx.AsyncClient(base_url=f"http://127.0.0.1:{api_port}", timeout=30)
    # The session API shares the database and would relay the inbox through
    # its own (healthy) Temporal: pause it so this test sees its own outage.
    stack.api_app.state.inbox_relay = False
    try:
        # Temporal goes away (and the worker with it).
        await worker.shutdown()
        await worker_task
        await env.shutdown()

        people = [new_sender() for _ in range(100)]
        for i in range(0, 100, 10):
            items = [payloads.instagram_dm(account_id, p, "outage?") for p in people[i : i + 10]]
            body, headers = payloads.encode_and_sign(payloads.instagram_webhook({account_id: items}), "test-app-secret")
            r = await api.post("/webhooks/meta", content=body, headers=headers)
            assert r.status_code == 200, r.text
            assert r.elapsed.total_seconds() < 3, "acks must stay fast during an outage"
            # A redelivery during the outage is stored once.
            await api.post("/webhooks/meta", content=body, headers=headers)
        with Session(stack.deps.engine) as db:
            stored = db.exec(select(func.count()).select_from(InboxEvent).where(InboxEvent.channel_id == channel["id"])).one()
        assert stored == 100

        # Temporal is back (same persistence); a worker starts again.
        env = await start_dev_server(port, db_file)
        client2 = await Client.connect(settings.temporal_address, data_converter=data_converter(stack.deps.keys))
        worker = build_worker(client2, settings, stack.deps)
        worker_task = asyncio.create_task(worker.run())

        async def all_answered():
            counts = [len(await sandbox_messages(stack, p)) for p in people]
            return all(c >= 1 for c in counts) and counts

        counts = await wait_for(all_answered, timeout=90, interval=0.5)
        assert counts, "not every stored event was handled"
        await asyncio.sleep(1.0)
        assert all([len(await sandbox_messages(stack, p)) == 1 for p in people])
        with Session(stack.deps.engine) as db:
            left = db.exec(select(func.count()).select_from(InboxEvent).where(InboxEvent.channel_id == channel["id"])).one()
        assert left == 0
    finally:
        stack.api_app.state.inbox_relay = True
        await api.aclose()
        server.should_exit = True
        await server_task
        await worker.shutdown()
        await worker_task
        await env.shutdown()


async def test_overload_acks_from_the_inbox_and_keeps_each_contacts_order(stack):
    """Beyond the webhooks allowed to wait on Temporal at once, events are
    acknowledged from the inbox and relayed; while the inbox holds events, a
    webhook that could dispatch directly stores its events too, so the
    contact's later message is not handled before the earlier one."""
    tenant = await create_tenant(stack)
    channel, account_id, _ = await connect_instagram(stack, tenant)
    for word in ("alpha", "beta"):
        await create_automation(stack, tenant, channel["id"], {"type": "dm_keyword", "keywords": [word]},
                                [{"id": "r", "type": "send_message", "text": f"re {word}"}])
    state = stack.api_app.state
    settings = state.settings
    person = new_sender()
    try:
        state.inbox_relay = False  # hold the stored event in the inbox for the moment
        state.settings = settings.model_copy(update={"webhook_max_inflight_dispatches": 0})  # overload
        await send_dm(stack, account_id, person, "alpha")
        assert state.inbox.backlog
        state.settings = settings  # Temporal could take the next one directly...
        await send_dm(stack, account_id, person, "beta")
        with Session(stack.deps.engine) as db:
            stored = db.exec(select(func.count()).select_from(InboxEvent).where(InboxEvent.channel_id == channel["id"])).one()
        assert stored == 2  # ...but it waits behind the stored one
        assert await sandbox_messages(stack, person) == []
    finally:
        state.settings = settings
        state.inbox_relay = True
        state.inbox.wakeup.set()

    async def answered():
        calls = await sandbox_messages(stack, person)
        return len(calls) >= 2 and calls

    calls = await wait_for(answered, timeout=30)
    assert [c["json"]["message"]["text"] for c in calls] == ["re alpha", "re beta"]
    async def drained():
        return not state.inbox.backlog

    assert await wait_for(drained, timeout=10)  # drained: webhooks dispatch directly again


class SlowTemporal:
    """The API's Temporal client, taking ``delay`` seconds to accept each
    signal-with-start (the first ``failures`` of them then fail)."""

    def __init__(self, client: Client, delay: float, failures: int = 0) -> None:
        self._client, self.delay, self.failures = client, delay, failures
        self.calls: list[str] = []

    def __getattr__(self, name):
        return getattr(self._client, name)

    async def start_workflow(self, *args, **kwargs):
        self.calls.append(kwargs["id"])
        await asyncio.sleep(self.delay)
        if self.failures:
            self.failures -= 1
            from temporalio.service import RPCError, RPCStatusCode

            raise RPCError("unavailable", RPCStatusCode.UNAVAILABLE, b"")
        return await self._client.start_workflow(*args, **kwargs)


async def _inbox_rows(stack, channel_id: str) -> int:
    with Session(stack.deps.engine) as db:
        return db.exec(select(func.count()).select_from(InboxEvent).where(InboxEvent.channel_id == channel_id)).one()


async def _keyword_reply(stack, keyword: str, reply: str) -> tuple[str, str]:
    """A connected account whose keyword is answered with one message:
    (channel id, account id)."""
    tenant = await create_tenant(stack)
    channel, account_id, _ = await connect_instagram(stack, tenant)
    await create_automation(stack, tenant, channel["id"], {"type": "dm_keyword", "keywords": [keyword]},
                            [{"id": "r", "type": "send_message", "text": reply}])
    return channel["id"], account_id


async def _post_dm(stack, account_id: str, person: str, text: str):
    return await post_meta(stack, payloads.instagram_webhook({account_id: [payloads.instagram_dm(account_id, person, text)]}))


async def _answered_once(stack, person: str) -> bool:
    async def delivered():
        return len(await sandbox_messages(stack, person)) == 1

    return await wait_for(delivered, timeout=30)


async def test_a_slow_temporal_does_not_delay_the_answer_and_nothing_is_signalled_twice(stack):
    """Temporal slower than webhook_ack_wait_ms: the webhook keeps the event
    in the inbox and answers; its signal lands later, delivers the event and
    deletes the row; the relay (which runs meanwhile) does not signal it again."""
    channel_id, account_id = await _keyword_reply(stack, "slow", "answered")
    state = stack.api_app.state
    client = state.temporal
    slow = SlowTemporal(client, delay=1.5)
    person = new_sender()
    state.temporal = slow
    try:
        started = asyncio.get_running_loop().time()
        r = await _post_dm(stack, account_id, person, "slow please")
        answered_in = asyncio.get_running_loop().time() - started
        assert r.status_code == 200 and r.json()["dispatched"] == 1
        assert answered_in < 1.0  # did not wait for the 1.5 s signal
        assert await _inbox_rows(stack, channel_id) == 1  # kept while the signal is on its way
        assert await _answered_once(stack, person)
        assert await wait_for(lambda: _zero(_inbox_rows(stack, channel_id)), timeout=10)
        await asyncio.sleep(1.2)  # a relay round
        assert len(slow.calls) == 1  # the relay left the held row to its signal
        assert not state.inbox.backlog
    finally:
        state.temporal = client
    assert [c["json"]["message"]["text"] for c in await sandbox_messages(stack, person)] == ["answered"]


async def test_a_held_event_whose_signal_fails_is_relayed(stack):
    channel_id, account_id = await _keyword_reply(stack, "flaky", "relayed")
    state = stack.api_app.state
    client = state.temporal
    state.temporal = SlowTemporal(client, delay=0.3, failures=1)
    person = new_sender()
    try:
        r = await _post_dm(stack, account_id, person, "flaky")
        assert r.status_code == 200
        assert await _answered_once(stack, person)
        assert await wait_for(lambda: _zero(_inbox_rows(stack, channel_id)), timeout=10)
    finally:
        state.temporal = client
        state.webhooks.temporal_down_until = 0.0
    assert [c["json"]["message"]["text"] for c in await sandbox_messages(stack, person)] == ["relayed"]


async def _zero(count) -> bool:
    return await count == 0


async def test_after_slow_signals_the_webhook_stores_at_once_instead_of_waiting(stack):
    """While Temporal's recent signals took longer than webhook_ack_wait_ms,
    waiting would only add the wait to the answer: the webhook stores the
    event and answers at once (its signal goes on). When signals are fast,
    it waits for Temporal and stores nothing."""
    channel_id, account_id = await _keyword_reply(stack, "hasty", "answered")
    state = stack.api_app.state
    client, settings = state.temporal, state.settings
    slow = SlowTemporal(client, delay=1.5)
    state.temporal = slow
    state.settings = settings.model_copy(update={"webhook_ack_wait_ms": 30_000})
    waiting, hasty = new_sender(), new_sender()
    try:
        state.webhooks.signal_seconds = 0.0  # Temporal has been fast: the webhook waits for it
        r = await _post_dm(stack, account_id, waiting, "hasty one")
        assert r.status_code == 200 and len(slow.calls) == 1
        assert await _inbox_rows(stack, channel_id) == 0  # accepted by Temporal before the answer
        assert 0.2 < state.webhooks.signal_seconds < 1.5  # the 1.5 s signal moved the average

        state.webhooks.signal_seconds = 60.0  # Temporal has been slow
        r = await _post_dm(stack, account_id, hasty, "hasty two")
        assert r.status_code == 200 and len(slow.calls) == 2
        assert await _inbox_rows(stack, channel_id) == 1  # answered from the inbox...
        assert await sandbox_messages(stack, hasty) == []  # ...while the signal is on its way
        assert await _answered_once(stack, hasty)
        assert await wait_for(lambda: _zero(_inbox_rows(stack, channel_id)), timeout=10)
        assert len(slow.calls) == 2  # delivered by its own signal, not relayed again
    finally:
        state.temporal, state.settings = client, settings
        state.webhooks.signal_seconds = 0.0
    assert await _answered_once(stack, waiting)


async def test_webhooks_storing_at_once_share_transactions_and_each_gets_its_own_rows(tmp_path):
    """The inbox writer batches the webhooks that store at the same time:
    each still gets the ids of its own rows, a redelivery already stored is
    not stored again (nor does it sink the others), and a database error
    reaches every webhook of the failed batch (they answer 503)."""
    from sqlmodel import SQLModel

    from api.inbox import InboxWriter
    from core.contracts import InboundEvent
    from core.db import Channel, make_engine

    engine = make_engine(f"sqlite:///{tmp_path / 'inbox.db'}")
    SQLModel.metadata.create_all(engine)
    channel = Channel(id="ch_1", workspace_id="ws_1", platform="instagram", external_id="1784")
    writer = InboxWriter(engine)

    def routed(*mids: str) -> list:
        return [(channel, InboundEvent(mid, "instagram", "1784", f"person-{mid}", "message", text=mid)) for mid in mids]

    first = await writer.store(routed("m0"))
    results = await asyncio.gather(*(writer.store(routed(f"m{i}a", f"m{i}b")) for i in range(1, 20)),
                                   writer.store(routed("m0", "m20")))
    with Session(engine) as db:
        rows = {r.id: r.event_id for r in db.exec(select(InboxEvent))}
    assert [rows[i] for i in first] == ["m0"]
    for i, ids in enumerate(results[:-1], start=1):
        assert [rows[row_id] for row_id in ids] == [f"m{i}a", f"m{i}b"]
    assert [rows[row_id] for row_id in results[-1]] == ["m20"]  # m0 was stored already
    assert len(rows) == 40

    engine.dispose()
    (tmp_path / "inbox.db").unlink()
    (tmp_path / "inbox.db").mkdir()  # the database is gone: nothing can be stored
    failures = await asyncio.gather(*(writer.store(routed(f"x{i}")) for i in range(3)), return_exceptions=True)
    assert all(isinstance(f, Exception) for f in failures)


def test_the_relay_takes_conversations_before_a_burst_of_comments_keeping_each_persons_order(tmp_path):
    """Stored behind a burst of comments, DMs are relayed first (their
    conversations' priority); a person who commented and then wrote a DM
    has both relayed, in their order."""
    from sqlmodel import SQLModel

    from api.inbox import _load, store
    from core.contracts import InboundEvent
    from core.db import Channel, make_engine

    engine = make_engine(f"sqlite:///{tmp_path / 'inbox.db'}")
    SQLModel.metadata.create_all(engine)
    channel = Channel(id="ch_1", workspace_id="ws_1", platform="instagram", external_id="1784")

    def event(mid: str, person: str, kind: str) -> list:
        return [(channel, InboundEvent(mid, "instagram", "1784", person, kind, text=mid))]

    for i in range(5):
        store(engine, event(f"c{i}", f"fan{i}", "comment"))
    store(engine, event("c-dora", "dora", "comment"))
    store(engine, event("dm-dora", "dora", "message"))
    store(engine, event("dm-eli", "eli", "message"))
    assert [row.event_id for row in _load(engine)] == ["c-dora", "dm-dora", "dm-eli", "c0", "c1", "c2", "c3", "c4"]


def test_rows_held_by_their_webhooks_signals_do_not_hide_the_rows_behind_them(tmp_path):
    """The relay skips rows whose webhook's signal is still on its way; a
    round never comes back empty while other rows wait (the webhooks would
    then dispatch directly and overtake them)."""
    from sqlmodel import SQLModel

    from api import inbox
    from core.contracts import InboundEvent
    from core.db import Channel, make_engine

    engine = make_engine(f"sqlite:///{tmp_path / 'inbox.db'}")
    SQLModel.metadata.create_all(engine)
    channel = Channel(id="ch_1", workspace_id="ws_1", platform="instagram", external_id="1784")
    held = []
    for i in range(inbox.RELAY_BATCH + 5):
        held += inbox.store(engine, [(channel, InboundEvent(f"h{i}", "instagram", "1784", f"p{i}", "message"))])
    inbox.store(engine, [(channel, InboundEvent("late", "instagram", "1784", "someone", "message"))])
    assert [row.event_id for row in inbox._load(engine, set(held))] == ["late"]


def _dead_letters(stack, channel_id: str) -> list[DeadLetter]:
    with Session(stack.deps.engine) as db:
        return list(db.exec(select(DeadLetter).where(DeadLetter.channel_id == channel_id)).all())


async def _answering_tenant(stack, keyword: str, reply: str):
    """A tenant whose connected account answers ``keyword``: (tenant, channel id, account id)."""
    tenant = await create_tenant(stack)
    channel, account_id, _ = await connect_instagram(stack, tenant)
    await create_automation(stack, tenant, channel["id"], {"type": "dm_keyword", "keywords": [keyword]},
                            [{"id": "r", "type": "send_message", "text": reply}])
    return tenant, channel["id"], account_id


async def test_a_huge_dm_is_acknowledged_stored_truncated_and_answered(stack):
    """Webhook bodies may be 4 MB, a Temporal payload only 2 MB: a signed
    DM with a 2.6 MB text was retried by the relay forever. It is cut to
    Instagram's 1,000 bytes, recorded as truncated and answered."""
    tenant, channel_id, account_id = await _answering_tenant(stack, "price", "answered")
    state = stack.api_app.state
    person = new_sender()
    text = "price? " + "é" * 1_300_000  # 2.6 MB of UTF-8
    r = await _post_dm(stack, account_id, person, text)
    assert r.status_code == 200 and r.json()["dispatched"] == 1, r.text
    assert [text_of(c) for c in await wait_for_messages(stack, person, 1)] == ["answered"]
    contact_id = contact_id_of(stack, channel_id, person)
    with Session(stack.deps.engine) as db:
        [stored] = db.exec(select(Message).where(Message.contact_id == contact_id, Message.direction == "in")).all()
    assert stored.truncated
    assert stored.text == "price? " + "é" * 496  # 7 + 2 × 496 = 999 bytes: the next "é" does not fit
    r = await stack.api.get(f"/v1/contacts/{contact_id}/messages", headers=tenant.headers)
    [logged] = [m for m in r.json()["data"] if m["direction"] == "in"]
    assert logged["truncated"] is True
    assert await _inbox_rows(stack, channel_id) == 0 and _dead_letters(stack, channel_id) == []

    async def drained():
        return not state.inbox.backlog

    assert await wait_for(drained, timeout=10)


async def test_an_event_temporal_refuses_for_good_is_set_aside_and_the_contact_goes_on(stack):
    """An event over Temporal's payload limit (stored bypassing the parser's
    bounds) is refused with INVALID_ARGUMENT: after one attempt the relay
    moves it to the dead letters with that reason, the inbox leaves backlog
    mode and the same person's next message is answered. The dead letter is
    theirs: it is in their export."""
    from api.inbox import store
    from core.observability import INBOX_DEAD_LETTERS

    tenant, channel_id, account_id = await _answering_tenant(stack, "price", "answered")
    state = stack.api_app.state
    person = new_sender()
    await send_dm(stack, account_id, person, "price?")
    assert len(await wait_for_messages(stack, person, 1)) == 1
    client = state.temporal
    counting = RefusingTemporal(client)
    before = INBOX_DEAD_LETTERS._value.get()
    huge = InboundEvent("m-huge-" + person, "instagram", account_id, person, "message", text="price " + "x" * 2_600_000)
    with Session(stack.deps.engine, expire_on_commit=False) as db:
        channel = db.get(Channel, channel_id)
    state.temporal = counting
    try:
        store(stack.deps.engine, [(channel, huge)])
        state.inbox.stored_one()

        async def set_aside():
            return _dead_letters(stack, channel_id)

        [dead] = await wait_for(set_aside, timeout=15)
        assert dead.event_id == huge.event_id and dead.workspace_id == tenant.workspace_id
        assert dead.reason == "INVALID_ARGUMENT: Blob data size exceeds limit."
        assert dead.contact_id == contact_id_of(stack, channel_id, person)
        assert await _inbox_rows(stack, channel_id) == 0

        async def drained():
            return not state.inbox.backlog

        assert await wait_for(drained, timeout=10)  # webhooks dispatch directly again
        await send_dm(stack, account_id, person, "price again")
        assert [text_of(c) for c in await wait_for_messages(stack, person, 2)] == ["answered", "answered"]
        await asyncio.sleep(1.2)  # a relay round: the event is not tried again
        assert counting.handed.count(huge.event_id) == 1
    finally:
        state.temporal = client
    assert INBOX_DEAD_LETTERS._value.get() == before + 1
    assert "vectory_inbox_dead_letters_total" in (await stack.api.get("/metrics")).text
    export = (await stack.api.get(f"/v1/contacts/{dead.contact_id}/export", headers=tenant.headers)).json()
    assert [d["event_id"] for d in export["dead_letters"]] == [huge.event_id]
    assert export["dead_letters"][0]["reason"].startswith("INVALID_ARGUMENT")


def test_only_answers_about_the_request_itself_set_an_event_aside():
    """Temporal down, busy or misconfigured (every event would meet it):
    the events wait in the inbox. Refused for what they are: set aside."""
    from temporalio.service import RPCError, RPCStatusCode

    from api.dispatch import refusal

    def err(status: RPCStatusCode, message: str = "no") -> RPCError:
        return RPCError(message, status, b"")

    for status in (RPCStatusCode.UNAVAILABLE, RPCStatusCode.DEADLINE_EXCEEDED, RPCStatusCode.RESOURCE_EXHAUSTED,
                   RPCStatusCode.INTERNAL, RPCStatusCode.CANCELLED, RPCStatusCode.PERMISSION_DENIED,
                   RPCStatusCode.UNAUTHENTICATED, RPCStatusCode.NOT_FOUND, RPCStatusCode.FAILED_PRECONDITION):
        assert refusal(err(status)) is None, status
    assert refusal(TimeoutError()) is None
    assert refusal(err(RPCStatusCode.INVALID_ARGUMENT, "Blob data size exceeds limit.")) == (
        "INVALID_ARGUMENT: Blob data size exceeds limit."
    )
    too_large = err(RPCStatusCode.RESOURCE_EXHAUSTED, "grpc: received message after decompression larger than max 4194304")
    assert refusal(too_large).startswith("RESOURCE_EXHAUSTED: grpc: received message")


async def test_a_stored_event_this_code_cannot_read_is_set_aside_not_retried(tmp_path):
    """A row written by another version of the code (a field this one does
    not know) failed the relay's every round, and the rows behind it waited."""
    from sqlmodel import SQLModel

    from api import inbox
    from core.db import Workspace, make_engine

    engine = make_engine(f"sqlite:///{tmp_path / 'inbox.db'}")
    SQLModel.metadata.create_all(engine)
    channel = Channel(id="ch_1", workspace_id="ws_1", platform="instagram", external_id="1784", status="active")
    with Session(engine, expire_on_commit=False) as db:
        db.add(Workspace(id="ws_1", name="w", api_key_hash="h"))
        db.commit()
        db.add(channel)
        db.commit()
    [row_id] = inbox.store(engine, [(channel, InboundEvent("m1", "instagram", "1784", "p1", "message", text="hi"))])
    with engine.begin() as conn:
        conn.execute(inbox.INBOX.update().where(inbox.INBOX.c.id == row_id).values(
            event={"event_id": "m1", "platform": "instagram", "account_id": "1784", "sender_id": "p1",
                   "kind": "message", "text": "hi", "from_the_future": 1}
        ))
    assert await inbox.relay_once(engine, client=None, task_queue="q") == 1
    with Session(engine) as db:
        [dead] = db.exec(select(DeadLetter)).all()
        assert db.exec(select(func.count()).select_from(InboxEvent)).one() == 0
    assert dead.event_id == "m1" and dead.workspace_id == "ws_1"
    assert dead.reason.startswith("stored event unreadable: ") and "from_the_future" in dead.reason
    assert "hi" not in dead.reason.replace("from_the_future", "")
