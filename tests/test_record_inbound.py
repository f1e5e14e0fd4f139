"""Recording an inbound event (``activities.crm.record_inbound_event``): a
platform redelivery is a duplicate, but the same conversation run recording
the same event again is its own retry (the worker stopped after the commit,
before Temporal had the result) and gets the answer it would have had, so
a crash never drops the reply. On the suite's database (SQLite, or
PostgreSQL with ``VECTORY_DATABASE_URL``)."""

from __future__ import annotations

import secrets

import pytest
from sqlalchemy import func, select
from sqlmodel import Session

from activities.crm import CONTACTS, MESSAGES, record_inbound_event
from core.contracts import InboundEvent, RecordInboundInput
from core.db import Automation, Channel, Workspace, make_engine, migrate


@pytest.fixture
def engine(database_url):
    migrate(database_url)
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


def seed(engine) -> tuple[str, str]:
    ws, ch = f"ws_{secrets.token_hex(6)}", f"ch_{secrets.token_hex(6)}"
    with Session(engine) as db:
        db.add(Workspace(id=ws, name="Acme", api_key_hash=secrets.token_hex(16)))
        db.flush()
        db.add(Channel(id=ch, workspace_id=ws, platform="instagram", external_id="1784", status="active"))
        db.flush()
        db.add(Automation(
            id=f"au_{secrets.token_hex(6)}", workspace_id=ws, channel_id=ch, name="menu",
            definition={"trigger": {"type": "dm_keyword", "keywords": ["menu"]},
                        "steps": [{"id": "m", "type": "send_message", "text": "Here is the menu"}]},
        ))
        db.commit()
    return ws, ch


def record(engine, ws: str, ch: str, mid: str, recorder: str, contact: str = "ct_1"):
    event = InboundEvent(mid, "instagram", "1784", "person-1", "message", text="menu please")
    return record_inbound_event(
        engine, RecordInboundInput(workspace_id=ws, channel_id=ch, contact_id=f"{ch}_{contact}", event=event,
                                   recorder=recorder)
    )


def rows(engine, ch: str) -> int:
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(MESSAGES).where(MESSAGES.c.channel_id == ch)).scalar()


def test_a_retry_by_the_same_run_is_answered_as_before_and_a_redelivery_is_a_duplicate(engine):
    ws, ch = seed(engine)
    first = record(engine, ws, ch, "mid.1", "run-a/0")
    assert not first.duplicate and first.contact.is_new and not first.has_previous_inbound
    assert [a.name for a in first.automations] == ["menu"]

    # The worker stopped after the commit: the run records the event again.
    retried = record(engine, ws, ch, "mid.1", "run-a/0")
    assert not retried.duplicate
    assert (retried.contact.is_new, retried.has_previous_inbound) == (True, False)
    assert retried.contact == first.contact
    assert retried.automations == first.automations

    # The platform delivered the event again, to another conversation run
    # (or to the same run as another event): a duplicate, nothing runs.
    assert record(engine, ws, ch, "mid.1", "run-b/0").duplicate
    assert record(engine, ws, ch, "mid.1", "run-a/7").duplicate
    assert rows(engine, ch) == 1

    # The person writes again: has written before, and (still without a
    # name: never looked up) still to be looked up; a retry of that one
    # says the same.
    second = record(engine, ws, ch, "mid.2", "run-a/1")
    assert (second.duplicate, second.contact.is_new, second.has_previous_inbound) == (False, True, True)
    again = record(engine, ws, ch, "mid.2", "run-a/1")
    assert (again.duplicate, again.contact.is_new, again.has_previous_inbound) == (False, True, True)
    assert rows(engine, ch) == 2

    # Once named, the person is not new any more (nothing to look up).
    with engine.begin() as conn:
        conn.execute(CONTACTS.update().where(CONTACTS.c.id == f"{ch}_ct_1").values(first_name="Ana"))
    third = record(engine, ws, ch, "mid.3", "run-a/2")
    assert (third.contact.is_new, third.contact.first_name) == (False, "Ana")
    assert (record(engine, ws, ch, "mid.3", "run-a/2").contact.is_new) is False


def test_an_event_recorded_without_a_recorder_stays_a_duplicate(engine):
    """Rows written before recorders existed (or by a caller without one)
    are never taken for a retry."""
    ws, ch = seed(engine)
    assert not record(engine, ws, ch, "mid.x", "").duplicate
    assert record(engine, ws, ch, "mid.x", "").duplicate
    assert record(engine, ws, ch, "mid.x", "run-a/0").duplicate
