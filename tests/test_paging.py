"""List routes page at the database: filters are SQL (the tag filter on
the indexed ``contacttag`` rows), counts are COUNT(*), and a page loads
only its own rows, however many the workspace holds."""

from __future__ import annotations

import base64
import io
import json
import re
import secrets
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import httpx
import pytest
from sqlalchemy import delete, event, select
from sqlmodel import Session, col

from activities.crm import CrmActivities
from activities.privacy import PrivacyActivities
from api.deps import MAX_OFFSET
from api.main import create_app
from api.routes import export
from core import personal_data
from core.contracts import EraseStepInput, UpdateContactInput
from core.crypto import hash_api_key
from core.db import (
    Automation,
    AutomationVersion,
    Broadcast,
    Channel,
    Contact,
    ContactTag,
    Workspace,
    migrate,
    new_id,
    tag_key,
    utcnow,
)
from core.settings import Settings

from conftest import ADMIN_TOKEN
from helpers import connect_telegram, create_tenant

CONTACTS, CONTACT_TAGS = Contact.__table__, ContactTag.__table__


@pytest.fixture(scope="module")
def app(database_url):
    migrate(database_url)
    master = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
    settings = Settings(
        environment="test", database_url=database_url, admin_token=ADMIN_TOKEN, master_key=f"test1:{master}"
    )
    return create_app(settings)  # no Temporal: the list routes never need it


@pytest.fixture
async def api(app):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as client:
        yield client


@dataclass
class Tenant:
    id: str
    channel_id: str
    headers: dict[str, str]


@pytest.fixture
def tenants(app) -> Iterator[list[Tenant]]:
    """Workspaces with one Instagram channel each, deleted afterwards."""
    made: list[Tenant] = []

    def make() -> Tenant:
        key = f"vk_{secrets.token_hex(16)}"
        tenant = Tenant(new_id("ws"), new_id("ch"), {"Authorization": f"Bearer {key}"})
        with Session(app.state.engine) as db:
            db.add(
                Workspace(
                    id=tenant.id, name="paging", api_key_hash=hash_api_key(key), business_attested_at=utcnow()
                )
            )
            db.flush()
            db.add(
                Channel(id=tenant.channel_id, workspace_id=tenant.id, platform="instagram", status="active")
            )
            db.commit()
        made.append(tenant)
        return tenant

    yield make  # type: ignore[misc]
    with app.state.engine.begin() as conn:
        for tenant in made:
            automations = select(Automation.id).where(Automation.workspace_id == tenant.id)
            conn.execute(
                delete(AutomationVersion).where(col(AutomationVersion.automation_id).in_(automations))
            )
            for model in (ContactTag, Contact, Automation, Broadcast, Channel):
                conn.execute(delete(model).where(model.workspace_id == tenant.id))
            conn.execute(delete(Workspace).where(Workspace.id == tenant.id))


@contextmanager
def loaded(model) -> Iterator[list[int]]:
    """How many ``model`` rows the ORM builds from query results meanwhile."""
    count = [0]

    def on_load(_target, _context) -> None:
        count[0] += 1

    event.listen(model, "load", on_load)
    try:
        yield count
    finally:
        event.remove(model, "load", on_load)


@contextmanager
def statements(engine) -> Iterator[list[str]]:
    seen: list[str] = []

    def before(_conn, _cursor, statement, _parameters, _context, _executemany) -> None:
        seen.append(statement)

    event.listen(engine, "before_cursor_execute", before)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", before)


def bulk_contacts(engine, tenant: Tenant, n: int, *, tagged_every: int, tag: str) -> list[str]:
    """``n`` contacts, oldest first, every ``tagged_every``-th with ``tag``:
    Core inserts (the API would take minutes), tags rows included."""
    start = utcnow() - timedelta(days=1)
    ids = [f"ct_{tenant.id}_{i:06d}" for i in range(n)]
    rows = [
        {
            "id": contact_id,
            "workspace_id": tenant.id,
            "channel_id": tenant.channel_id,
            "external_id": str(i),
            "first_name": "",
            "last_name": "",
            "username": "",
            "tags": [tag] if i % tagged_every == 0 else [],
            "fields": {},
            "human_takeover": False,
            "processing_restricted": False,
            "consent_withdrawn": False,
            "last_inbound_at": None,
            "created_at": start + timedelta(milliseconds=i),
            "updated_at": start,
        }
        for i, contact_id in enumerate(ids)
    ]
    tags = [
        {"contact_id": r["id"], "workspace_id": tenant.id, "tag": tag_key(tag)} for r in rows if r["tags"]
    ]
    with engine.begin() as conn:
        for i in range(0, n, 10_000):
            conn.execute(CONTACTS.insert(), rows[i : i + 10_000])
        conn.execute(CONTACT_TAGS.insert(), tags)
    return ids


async def test_a_page_of_50000_contacts_loads_only_its_rows(app, api, tenants):
    tenant = tenants()
    n = 50_000
    ids = bulk_contacts(app.state.engine, tenant, n, tagged_every=10, tag="VIP")
    tagged = ids[::10]
    cases = [
        ({}, n, ids[0]),
        ({"offset": n - 1}, n, ids[-1]),
        ({"tag": "vip"}, len(tagged), tagged[0]),
        ({"tag": "VIP", "offset": 1}, len(tagged), tagged[1]),
        ({"tag": "Vip", "channel_id": tenant.channel_id, "offset": len(tagged) - 1}, len(tagged), tagged[-1]),
    ]
    for params, count, first in cases:
        with loaded(Contact) as rows, statements(app.state.engine) as sql:
            r = await api.get("/v1/contacts", params={"limit": 1, **params}, headers=tenant.headers)
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["count"], [c["id"] for c in body["data"]]) == (count, [first]), params
        assert rows[0] == 1, f"{params}: {rows[0]} contact rows loaded for a page of 1"
        reads = [s for s in sql if re.search(r"\bFROM contact\b", s)]
        assert reads and all("LIMIT" in s or "count(" in s.lower() for s in reads), reads
    r = await api.get("/v1/contacts", params={"tag": "nobody", "limit": 1}, headers=tenant.headers)
    assert r.json() == {"data": [], "count": 0}


def add_contacts(engine, tenant: Tenant, tags: list[list[str]]) -> list[str]:
    """Contacts through the ORM (as the API and the worker write them), all
    created at the same instant: only the id orders them."""
    now = utcnow()
    with Session(engine) as db:
        contacts = [
            Contact(
                id=new_id("ct"),
                workspace_id=tenant.id,
                channel_id=tenant.channel_id,
                external_id=str(i),
                tags=t,
                created_at=now,
            )
            for i, t in enumerate(tags)
        ]
        db.add_all(contacts)
        db.commit()
        return sorted(c.id for c in contacts)


async def pages(api, path: str, headers: dict, limit: int, **params) -> tuple[list[list[str]], set[int]]:
    """Every page of a list, and the counts the pages gave."""
    out, counts, offset = [], set(), 0
    while True:
        r = await api.get(path, params={"limit": limit, "offset": offset, **params}, headers=headers)
        assert r.status_code == 200, r.text
        body = r.json()
        counts.add(body["count"])
        if not body["data"]:
            return out, counts
        out.append([row["id"] for row in body["data"]])
        offset += limit


async def test_tag_filter_pages_and_counts_follow_every_write_of_tags(app, api, tenants):
    tenant, other = tenants(), tenants()
    long_tag = "Ü" * 300  # stored before tags had a length limit: a digest key, still found
    ids = add_contacts(app.state.engine, tenant, [["VIP"], ["vip", "Sale"], ["sale"], [], [long_tag]] * 3)
    add_contacts(app.state.engine, other, [["vip"]] * 4)
    by_tags = {}
    with Session(app.state.engine) as db:
        for contact in db.exec(select(Contact).where(Contact.workspace_id == tenant.id)).scalars():
            by_tags.setdefault(tuple(t.lower() for t in contact.tags), []).append(contact.id)

    def having(tag: str) -> list[str]:
        return sorted(c for tags, cs in by_tags.items() if tag.lower() in tags for c in cs)

    for tag in ("vip", "SALE", long_tag.lower()):
        got, counts = await pages(api, "/v1/contacts", tenant.headers, 2, tag=tag)
        flat = [c for page in got for c in page]
        assert counts == {len(having(tag))}, tag
        assert flat == having(tag), f"{tag}: pages overlap, skip or leave the order"
    everyone, counts = await pages(api, "/v1/contacts", tenant.headers, 4)
    assert [c for page in everyone for c in page] == ids and counts == {len(ids)}

    # The worker's tag steps and the ORM's writes keep the filter in step.
    crm = CrmActivities(app.state.engine)
    untagged = next(c for c in ids if c not in having("vip") + having("sale") + having(long_tag))
    crm.update_contact(UpdateContactInput(contact_id=untagged, add_tags=["VIP"]))
    crm.update_contact(UpdateContactInput(contact_id=having("sale")[0], remove_tags=["SALE"]))
    assert crm.update_contact(UpdateContactInput(contact_id=untagged, set_fields={"a": "b"})).tags == ["VIP"]
    r = (await api.get("/v1/contacts", params={"tag": "vip", "limit": 500}, headers=tenant.headers)).json()
    assert {c["id"] for c in r["data"]} == {*having("vip"), untagged} and r["count"] == len(having("vip")) + 1
    r = (await api.get("/v1/contacts", params={"tag": "sale", "limit": 500}, headers=tenant.headers)).json()
    assert [c["id"] for c in r["data"]] == having("sale")[1:] and r["count"] == len(having("sale")) - 1

    # Erasure deletes a contact's tag rows with it (a contact tagged only "VIP": one row).
    gone = by_tags[("vip",)][0]
    counts = PrivacyActivities(app.state.engine, keys=None).purge_subject(  # type: ignore[arg-type]
        EraseStepInput(job_id="test", workspace_id=tenant.id, scope="contact", contact_id=gone)
    )
    assert counts["contact_tags"] == 1 and counts["contacts"] == 1
    r = (await api.get("/v1/contacts", params={"tag": "vip", "limit": 500}, headers=tenant.headers)).json()
    assert gone not in {c["id"] for c in r["data"]} and r["count"] == len(having("vip"))


async def test_the_workspace_export_pages_through_contact_tags(app, tenants, monkeypatch):
    tenant = tenants()
    add_contacts(app.state.engine, tenant, [["a", "b"], ["b"], ["c", "a", "d"]])
    monkeypatch.setattr(personal_data, "BATCH_SIZE", 2)  # keyset paging over the (contact, tag) key
    content = b"".join(export.stream_workspace_zip(app.state.engine, tenant.id))
    with zipfile.ZipFile(io.BytesIO(content)) as zf:
        rows = [json.loads(line) for line in zf.read("contacttag.jsonl").splitlines()]
    assert sorted(r["tag"] for r in rows) == ["a", "a", "b", "b", "c", "d"]
    assert len({(r["contact_id"], r["tag"]) for r in rows}) == 6


def seed(engine, tenant: Tenant, resource: str, n: int) -> list[str]:
    """``n`` rows of a resource, created a second apart from a day ago."""
    start = utcnow() - timedelta(days=1)
    rows: list = []
    for i in range(n):
        at = start + timedelta(seconds=i)
        if resource == "channels":
            rows.append(Channel(id=new_id("ch"), workspace_id=tenant.id, platform="telegram", created_at=at))
        elif resource == "automations":
            rows.append(
                Automation(
                    id=new_id("au"),
                    workspace_id=tenant.id,
                    channel_id=tenant.channel_id,
                    name=str(i),
                    definition={"trigger": {"type": "api"}, "steps": []},
                    created_at=at,
                )
            )
        else:
            rows.append(
                Broadcast(
                    id=new_id("bc"),
                    workspace_id=tenant.id,
                    channel_id=tenant.channel_id,
                    text="hi",
                    status="completed",
                    created_at=at,
                )
            )
    with Session(engine) as db:
        db.add_all(rows)
        db.commit()
        return [r.id for r in rows]


LISTS = {"channels": Channel, "automations": Automation, "broadcasts": Broadcast}


@pytest.mark.parametrize("resource", LISTS)
async def test_automations_channels_and_broadcasts_page_at_the_database(app, api, tenants, resource):
    tenant = tenants()
    ids = seed(app.state.engine, tenant, resource, 120)
    if resource == "channels":
        ids = [*ids, tenant.channel_id]  # made now: the newest
    expected = ids[::-1] if resource == "broadcasts" else ids  # broadcasts: newest first
    path = f"/v1/{resource}"

    with loaded(LISTS[resource]) as rows:
        r = await api.get(path, params={"limit": 1}, headers=tenant.headers)
    assert r.status_code == 200, r.text
    assert ([x["id"] for x in r.json()["data"]], r.json()["count"]) == (expected[:1], len(ids))
    assert rows[0] == 1, f"{rows[0]} {resource} loaded for a page of 1"

    got, counts = await pages(api, path, tenant.headers, 50)
    assert [len(page) for page in got] == [50, 50, len(ids) - 100]
    assert [x for page in got for x in page] == expected and counts == {len(ids)}
    default = (await api.get(path, headers=tenant.headers)).json()
    assert [x["id"] for x in default["data"]] == expected[:50] and default["count"] == len(ids)
    for params in ({"limit": 501}, {"limit": 0}, {"offset": -1}, {"offset": MAX_OFFSET + 1}):
        r = await api.get(path, params=params, headers=tenant.headers)
        assert r.status_code == 422, (params, r.text)
        assert r.json()["detail"][0]["loc"] == ["query", next(iter(params))]
    if resource == "automations":
        other_channel = seed(app.state.engine, tenant, "channels", 1)[0]
        r = await api.get(path, params={"channel_id": other_channel}, headers=tenant.headers)
        assert r.json() == {"data": [], "count": 0}


async def test_patching_tags_through_the_api_moves_the_contact_between_filters(stack):
    tenant = await create_tenant(stack, "Tags")
    channel, _, _ = await connect_telegram(stack, tenant)
    with Session(stack.deps.engine) as db:
        db.add(
            Contact(
                id=new_id("ct"), workspace_id=tenant.workspace_id, channel_id=channel["id"], external_id="1"
            )
        )
        db.commit()
    contact = (await stack.api.get("/v1/contacts", headers=tenant.headers)).json()["data"][0]

    async def tagged(tag: str) -> list[str]:
        r = await stack.api.get("/v1/contacts", params={"tag": tag}, headers=tenant.headers)
        assert r.json()["count"] == len(r.json()["data"])
        return [c["id"] for c in r.json()["data"]]

    r = await stack.api.patch(
        f"/v1/contacts/{contact['id']}", json={"tags": ["Lead", "Sale"]}, headers=tenant.headers
    )
    assert r.status_code == 200, r.text
    assert await tagged("lead") == [contact["id"]] and await tagged("SALE") == [contact["id"]]
    r = await stack.api.patch(
        f"/v1/contacts/{contact['id']}", json={"tags": ["Customer"]}, headers=tenant.headers
    )
    assert r.status_code == 200, r.text
    assert (await tagged("lead"), await tagged("customer")) == ([], [contact["id"]])
    doc = (await stack.api.get(f"/v1/contacts/{contact['id']}/export", headers=tenant.headers)).json()
    assert [row["tag"] for row in doc["tag_keys"]] == ["customer"]
