"""Every size a user supplies has a limit (core/limits.py, docs/limits.md).

- The largest workspace the limits allow keeps every activity result and
  workflow input of the inbound path under half of Temporal's 2 MB payload
  limit, for each kind of event, with every character at its most
  expensive (an emoji: 12 bytes of escaped JSON); rows stored before the
  limits are carried as a bounded projection.
- The API refuses each limit with a 422 naming it (413 for a whole body),
  and one below it passes; privacy flags are strict booleans; a 422 never
  echoes a large refused input; renaming or pausing an automation stored
  over a limit still works.
"""

from __future__ import annotations

import secrets
from dataclasses import replace

import pytest
from sqlmodel import Session

from activities.crm import CrmActivities, record_inbound_event, snapshot
from activities.messaging import first_reply_plan
from api.routes.contacts import ContactUpdate, _merged_fields
from core import flowrt
from core.codec import PayloadConverter
from core.contracts import (
    ContactRef,
    ConversationInput,
    FirstSend,
    InboundEvent,
    RecordInboundInput,
    RunInput,
    SendMessageResult,
    UpdateContactInput,
)
from core.db import Automation, Channel, Contact, Workspace, make_engine, migrate
from core.flow import AutomationCreate, definition_dict
from core.limits import (
    MAX_AUTOMATIONS_PER_CHANNEL,
    MAX_AUTOMATIONS_PER_WORKSPACE,
    MAX_CARRIED_DEFINITION,
    MAX_DEFINITION_SIZE,
    MAX_FIELD_KEY,
    MAX_FIELD_VALUE,
    MAX_FIELDS,
    MAX_FIELDS_SIZE,
    MAX_KEYWORD,
    MAX_KEYWORDS,
    MAX_NAME,
    MAX_PLACEHOLDERS,
    MAX_PUBLIC_REPLIES,
    MAX_PUBLIC_REPLY,
    MAX_REF,
    MAX_REFS,
    MAX_RUN_CONTEXT_SIZE,
    MAX_STEPS,
    MAX_TAG,
    MAX_TAGS,
    MAX_TEXT,
    json_size,
)

from helpers import (
    connect_instagram,
    create_automation,
    create_tenant,
    new_sender,
    send_dm,
    wait_for_messages,
)

EMOJI = "\U0001f600"  # one character, 12 bytes of JSON once escaped
HALF_OF_TEMPORALS_LIMIT = 1024 * 1024
INBOUND_TEXT = 4096  # Telegram's maximum, the longest an inbound text gets (core/inbound.py)
_converter = PayloadConverter()


def payload_size(value) -> int:
    """The bytes of ``value`` as the project's data converter puts it in a history."""
    return _converter.to_payloads([value])[0].ByteSize()


def field_key(i: int) -> str:
    return f"f{i:02d}_".ljust(MAX_FIELD_KEY, "x")


def largest_fields() -> dict:
    """MAX_FIELDS fields with the longest keys; two values of the longest
    emoji text (what a template renders largest), the rest sharing what is
    left of MAX_FIELDS_SIZE."""
    fields = {field_key(0): EMOJI * MAX_FIELD_VALUE, field_key(1): EMOJI * MAX_FIELD_VALUE}
    entry = len(f'"{field_key(2)}":"",')
    share = (MAX_FIELDS_SIZE - json_size(fields)) // (MAX_FIELDS - 2) - entry
    fields |= {field_key(i): "v" * share for i in range(2, MAX_FIELDS)}
    return fields


def padded_steps(pad: int) -> list[dict]:
    """MAX_STEPS steps reading every field: the first renders the longest
    field MAX_PLACEHOLDERS times, then texts of MAX_PLACEHOLDERS fields each
    padded with ``pad`` emoji, and a condition on a field."""
    first = "{{contact.fields." + field_key(0) + "}}"
    steps = [{"id": "s0", "type": "send_message", "text": first * MAX_PLACEHOLDERS + EMOJI * pad}]
    for i in range(1, MAX_STEPS - 1):
        names = "".join(
            "{{contact.fields." + field_key((i * MAX_PLACEHOLDERS + j) % MAX_FIELDS) + "}}"
            for j in range(MAX_PLACEHOLDERS)
        )
        steps.append({"id": f"s{i}", "type": "send_message", "text": names + EMOJI * pad})
    steps.append({
        "id": "last", "type": "condition", "then": "end", "else": "end",
        "conditions": [{"subject": "field", "name": field_key(MAX_FIELDS - 1), "op": "exists"}],
    })
    return steps


def largest_definition(trigger: dict) -> dict:
    """A definition as large as the API accepts (validated as it does), its
    texts padded until MAX_DEFINITION_SIZE."""
    lo, hi = 0, MAX_TEXT
    best = None
    while lo <= hi:
        pad = (lo + hi) // 2
        body = {"name": "N" * 200, "channel_id": "ch", "trigger": trigger, "steps": padded_steps(pad)}
        try:
            definition = definition_dict(AutomationCreate.model_validate(body))
        except ValueError:  # over MAX_DEFINITION_SIZE or MAX_TEXT
            hi = pad - 1
            continue
        best, lo = definition, pad + 1
    assert best is not None and json_size(best) > 0.97 * MAX_DEFINITION_SIZE
    return best


KEYWORD = "k" * MAX_KEYWORD


def triggers() -> list[dict]:
    """One trigger of each kind an event can start, at its limits."""
    keywords = [f"{i:02d}".ljust(MAX_KEYWORD, "k") for i in range(MAX_KEYWORDS - 1)] + [KEYWORD]
    return [
        {"type": "dm_keyword", "keywords": keywords},
        {"type": "comment", "keywords": keywords,
         "public_replies": [EMOJI * MAX_PUBLIC_REPLY] * MAX_PUBLIC_REPLIES},
        {"type": "story_reply", "keywords": keywords},
        {"type": "postback", "payloads": [f"P{i}" for i in range(50)]},
        {"type": "ref_link", "refs": [f"r{i}-*".ljust(MAX_REF, "x") for i in range(MAX_REFS)]},
        {"type": "story_mention"},
        {"type": "any_message", "scope": "first_message"},
        {"type": "any_message"},
    ]


@pytest.fixture(scope="module")
def largest_workspace(database_url):
    """MAX_AUTOMATIONS_PER_CHANNEL automations on the channel, each as large
    as allowed, the rest of the workspace's MAX_AUTOMATIONS_PER_WORKSPACE on
    another channel, and a contact at every limit."""
    migrate(database_url)
    engine = make_engine(database_url)
    ws, ch, other = (f"{p}_{secrets.token_hex(6)}" for p in ("ws", "ch", "ch"))
    definitions = [largest_definition(t) for t in triggers()]
    fields = largest_fields()
    update = ContactUpdate.model_validate({
        "first_name": EMOJI * MAX_NAME, "last_name": EMOJI * MAX_NAME,
        "tags": [f"{i:02d}".ljust(MAX_TAG, EMOJI) for i in range(MAX_TAGS)], "fields": fields,
    })
    assert _merged_fields({}, update.fields) == fields  # within every limit
    with Session(engine) as db:
        db.add(Workspace(id=ws, name="Big", api_key_hash=secrets.token_hex(16)))
        db.flush()
        for channel in (ch, other):
            db.add(Channel(id=channel, workspace_id=ws, platform="telegram", external_id=channel, status="active"))
        db.flush()
        for i in range(MAX_AUTOMATIONS_PER_CHANNEL):
            db.add(Automation(id=f"au_{ch}_{i:03d}", workspace_id=ws, channel_id=ch, name="N" * 200,
                              definition=definitions[i % len(definitions)]))
        for i in range(MAX_AUTOMATIONS_PER_WORKSPACE - MAX_AUTOMATIONS_PER_CHANNEL):
            db.add(Automation(id=f"au_{other}_{i:03d}", workspace_id=ws, channel_id=other, name="small",
                              definition={"trigger": {"type": "any_message"},
                                          "steps": [{"id": "a", "type": "send_message", "text": "hi"}]}))
        db.add(Contact(id=f"{ch}_person", workspace_id=ws, channel_id=ch, external_id="person",
                       first_name=update.first_name, last_name=update.last_name, username=EMOJI * MAX_NAME,
                       tags=update.tags, fields=fields))
        db.commit()
    yield engine, ws, ch
    engine.dispose()


def events() -> dict[str, InboundEvent]:
    long_text = (KEYWORD + " ").ljust(INBOUND_TEXT, EMOJI)
    base = {"platform": "telegram", "account_id": "bot", "sender_id": "person", "first_name": EMOJI * MAX_NAME}
    return {
        "dm": InboundEvent(secrets.token_hex(8), kind="message", text=long_text, **base),
        "reply to a waiting run": InboundEvent(secrets.token_hex(8), kind="message", text=EMOJI * INBOUND_TEXT, **base),
        "postback": InboundEvent(secrets.token_hex(8), kind="postback", payload="P7", text=EMOJI * 20, **base),
        "referral": InboundEvent(secrets.token_hex(8), kind="referral", ref="r3-".ljust(MAX_REF, "x"), **base),
        "story reply": InboundEvent(secrets.token_hex(8), kind="message", text=long_text, story_url="https://x/s",
                                    **base),
        "story mention": InboundEvent(secrets.token_hex(8), kind="story_mention", story_url="https://x/s", **base),
        "comment": InboundEvent(secrets.token_hex(8), kind="comment", text=long_text, comment_id="c1", media_id="m1",
                                **base),
        "reaction": InboundEvent(secrets.token_hex(8), kind="reaction", payload=EMOJI, **base),
        "read receipt": InboundEvent(secrets.token_hex(8), kind="seen", **base),
    }


def test_the_largest_workspace_keeps_every_payload_of_the_inbound_path_under_half_the_limit(largest_workspace):
    engine, ws, ch = largest_workspace
    contact_id = f"{ch}_person"
    crm = CrmActivities(engine)
    checked: dict[str, int] = {}

    def check(label: str, value) -> None:
        checked[label] = payload_size(value)
        assert checked[label] < HALF_OF_TEMPORALS_LIMIT, (label, checked[label])

    started = 0
    for name, event in events().items():
        input = RecordInboundInput(workspace_id=ws, channel_id=ch, contact_id=contact_id, event=event,
                                   recorder=f"run/{name}", platform="telegram", matching=flowrt.MATCHING)
        check(f"{name}: conversation input", ConversationInput(
            workspace_id=ws, channel_id=ch, platform="telegram", contact_id=contact_id,
            contact_external_id="person", seen_event_ids=[secrets.token_hex(16)] * 1000, first_events=[event],
        ))
        record = record_inbound_event(engine, input)
        assert len(record.automations) <= 1
        check(f"{name}: record_inbound", record)
        check(f"{name}: load_match_context", crm.load_match_context(input))
        if event.kind in ("reaction", "seen"):
            assert record.automations == [] and record.contact.fields == {}
            continue
        assert record.automations, name  # each kind starts its largest automation
        started += 1
        automation = record.automations[0]
        check(f"{name}: run input", RunInput(
            run_id="r" * 200, workspace_id=ws, channel_id=ch, platform="telegram", contact=record.contact,
            automation=automation, conversation_workflow_id="c" * 200, trigger=event,
            context={"k": "v" * (MAX_RUN_CONTEXT_SIZE - 20)},
        ))
        if event.kind == "comment":
            continue
        # The opening message, rendered (the longest a template renders),
        # sent by record_inbound itself, its result in the record.
        opening = first_reply_plan(replace(input, first_reply=True), record)
        assert opening is not None
        check(f"{name}: opening send", opening.send)
        full_contact = crm.load_contact(ContactRef(contact_id))  # a contact as the send's lookup returns it
        record.first_send = FirstSend(opening.run_id, opening.step_id, result=SendMessageResult(
            platform_message_id="m" * 100, profile_looked_up=True, contact=full_contact, text=opening.send.text,
        ))
        check(f"{name}: record_inbound with its reply", record)
    assert started == 7
    # The run's own activities: the contact after a write, and as loaded.
    updated = crm.update_contact(UpdateContactInput(
        contact_id=contact_id, add_tags=["one more"], set_fields={field_key(5): EMOJI * (3 * MAX_FIELD_VALUE)},
    ))
    check("update_contact", updated)
    assert len(updated.tags) == MAX_TAGS and len(updated.fields[field_key(5)]) <= MAX_FIELD_VALUE


def test_an_event_carries_only_the_fields_its_automation_reads(largest_workspace, database_url):
    engine, ws, _ = largest_workspace
    ch = f"ch_{secrets.token_hex(6)}"
    with Session(engine) as db:
        db.add(Channel(id=ch, workspace_id=ws, platform="telegram", external_id=ch, status="active"))
        db.flush()
        db.add(Automation(id=f"au_{ch}", workspace_id=ws, channel_id=ch, name="city", definition={
            "trigger": {"type": "dm_keyword", "keywords": ["city"]},
            "steps": [{"id": "a", "type": "send_message", "text": "You live in {{ contact.fields.City | ? }}"}],
        }))
        db.add(Contact(id=f"{ch}_p", workspace_id=ws, channel_id=ch, external_id="p", tags=["vip"],
                       fields={"city": "Porto", "notes": "x" * 1000, "plan": "gold"}))
        db.commit()
    base = {"platform": "telegram", "account_id": "bot", "sender_id": "p"}

    def record(kind: str, text: str = ""):
        event = InboundEvent(secrets.token_hex(8), kind=kind, text=text, **base)
        return record_inbound_event(engine, RecordInboundInput(ws, ch, f"{ch}_p", event, matching=flowrt.MATCHING))

    matched = record("message", "which city?")
    assert [a.id for a in matched.automations] == [f"au_{ch}"]
    assert matched.contact.fields == {"city": "Porto"} and matched.contact.tags == ["vip"]
    assert flowrt.render(matched.automations[0].definition["steps"][0]["text"], matched.contact) == "You live in Porto"
    nothing = record("message", "hello")
    assert nothing.automations == [] and nothing.contact.fields == {}


def test_rows_stored_before_the_limits_are_carried_bounded(database_url):
    """A contact with 3 MB of fields, keys of 5,000 characters and empty,
    a tag of 100,000 characters, and more automations than a channel may
    have now (stored before the limits): readable, and carried bounded."""
    migrate(database_url)
    engine = make_engine(database_url)
    ws, ch = f"ws_{secrets.token_hex(6)}", f"ch_{secrets.token_hex(6)}"
    legacy_fields = {f"k{i}": EMOJI * 10_000 for i in range(300)} | {"k" * 5000: "x", "": "empty key"}
    with Session(engine) as db:
        db.add(Workspace(id=ws, name="Old", api_key_hash=secrets.token_hex(16)))
        db.flush()
        db.add(Channel(id=ch, workspace_id=ws, platform="telegram", external_id=ch, status="active"))
        db.flush()
        for i in range(MAX_AUTOMATIONS_PER_CHANNEL + 50):
            db.add(Automation(id=f"au_{ch}_{i}", workspace_id=ws, channel_id=ch, name="old", definition={
                "trigger": {"type": "any_message"},
                "steps": [{"id": "a", "type": "send_message", "text": "{{contact.fields.k1}}" + "y" * 20_000}],
            }))
        db.add(Contact(id=f"{ch}_p", workspace_id=ws, channel_id=ch, external_id="p",
                       tags=["t" * 100_000, *(f"tag{i}" for i in range(500))], fields=legacy_fields))
        db.commit()
    event = InboundEvent(secrets.token_hex(8), "telegram", "bot", "p", "message", text="hi")
    record = record_inbound_event(engine, RecordInboundInput(ws, ch, f"{ch}_p", event, matching=flowrt.MATCHING))
    assert len(record.automations) == 1
    assert payload_size(record) < HALF_OF_TEMPORALS_LIMIT
    assert record.contact.fields == {"k1": EMOJI * MAX_FIELD_VALUE}
    with Session(engine) as db:
        whole = snapshot(db.get(Contact, f"{ch}_p"))
    assert len(whole.tags) == MAX_TAGS and whole.tags[0] == "t" * MAX_TAG
    assert len(whole.fields) <= MAX_FIELDS and json_size(whole.fields) <= MAX_FIELDS_SIZE
    assert all(0 < len(k) <= MAX_FIELD_KEY for k in whole.fields)
    with Session(engine) as db:  # nothing stored is lost
        assert db.get(Contact, f"{ch}_p").fields == legacy_fields
    engine.dispose()


# --- the API ----------------------------------------------------------------------------------------


def _problem(r) -> str:
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, list) and all({"loc", "msg", "type"} <= set(d) for d in detail), detail
    return " | ".join(f"{'.'.join(map(str, d['loc']))}: {d['msg']}" for d in detail)


def _flow(text: str = "hi", **step) -> list[dict]:
    return [{"id": "a", "type": "send_message", "text": text, **step}]


async def _automation(stack, tenant, channel_id, steps, trigger=None):
    return await stack.api.post("/v1/automations", headers=tenant.headers, json={
        "name": "f", "channel_id": channel_id, "trigger": trigger or {"type": "api"}, "steps": steps,
    })


async def test_automation_limits_are_422_naming_the_limit(stack):
    tenant = await create_tenant(stack)
    channel, _, _ = await connect_instagram(stack, tenant)
    cid = channel["id"]

    big = largest_definition({"type": "api"})
    assert (await _automation(stack, tenant, cid, big["steps"])).status_code == 201
    replies = [f"{i:02d}".ljust(20, EMOJI) for i in range(13)]
    over = big["steps"][:1] + [{**big["steps"][1], "quick_replies": replies}] + big["steps"][2:]
    assert "MAX_DEFINITION_SIZE" in _problem(await _automation(stack, tenant, cid, over))

    steps = [{"id": f"s{i}", "type": "add_tag", "tag": "t"} for i in range(MAX_STEPS)]
    assert (await _automation(stack, tenant, cid, steps)).status_code == 201
    many = [{"id": f"s{i}", "type": "add_tag", "tag": "t"} for i in range(10_000)]
    r = await _automation(stack, tenant, cid, many)
    assert f"at most {MAX_STEPS} items" in _problem(r)
    assert len(r.content) < 2000  # the 10,000 refused steps are not echoed

    ten = "{{contact.first_name}}" * MAX_PLACEHOLDERS
    assert (await _automation(stack, tenant, cid, _flow(ten))).status_code == 201
    assert "MAX_PLACEHOLDERS" in _problem(await _automation(stack, tenant, cid, _flow(ten + "{{contact.username}}")))

    value = [{"id": "a", "type": "set_field", "field": "note", "value": "v" * MAX_FIELD_VALUE}]
    assert (await _automation(stack, tenant, cid, value)).status_code == 201
    value[0]["value"] += "v"
    assert "MAX_FIELD_VALUE" in _problem(await _automation(stack, tenant, cid, value))
    # An unknown placeholder is quoted by its start only.
    value[0]["value"] = "{{" + "a b" * 600 + "}}"
    problem = _problem(await _automation(stack, tenant, cid, value))
    assert "unknown placeholder" in problem and len(problem) < 400

    regex = {"type": "dm_keyword", "match": "regex", "keywords": [r"(?:\w\W?){100}z"]}
    assert (await _automation(stack, tenant, cid, _flow(), regex)).status_code == 201
    regex["keywords"] = [r"(?:\w\W?){999}z"]
    assert "MAX_REGEX_PROGRAM" in _problem(await _automation(stack, tenant, cid, _flow(), regex))

    assert (await _automation(stack, tenant, cid, _flow("x" * MAX_TEXT))).status_code == 201
    assert f"at most {MAX_TEXT} characters" in _problem(await _automation(stack, tenant, cid, _flow("x" * 1001)))

    r = await stack.api.post("/v1/automations", headers=tenant.headers,
                             content=b'{"name": "' + b"x" * (1024 * 1024) + b'"}')
    assert r.status_code == 413


async def test_automations_per_channel_and_per_workspace(stack):
    tenant = await create_tenant(stack)
    channels = [(await connect_instagram(stack, tenant))[0]["id"] for _ in range(3)]
    definition = {"trigger": {"type": "api"}, "steps": _flow()}

    def store(channel_id: str, count: int) -> None:
        with Session(stack.deps.engine) as db:
            for i in range(count):
                db.add(Automation(id=f"au_{secrets.token_hex(8)}", workspace_id=tenant.workspace_id,
                                  channel_id=channel_id, name=f"n{i}", definition=definition))
            db.commit()

    store(channels[0], MAX_AUTOMATIONS_PER_CHANNEL - 1)
    assert (await _automation(stack, tenant, channels[0], _flow())).status_code == 201
    problem = _problem(await _automation(stack, tenant, channels[0], _flow()))
    assert "MAX_AUTOMATIONS_PER_CHANNEL" in problem and "channel_id" in problem
    store(channels[1], MAX_AUTOMATIONS_PER_CHANNEL)
    store(channels[2], MAX_AUTOMATIONS_PER_WORKSPACE - 2 * MAX_AUTOMATIONS_PER_CHANNEL - 1)
    assert (await _automation(stack, tenant, channels[2], _flow())).status_code == 201
    assert "MAX_AUTOMATIONS_PER_WORKSPACE" in _problem(await _automation(stack, tenant, channels[2], _flow()))


async def test_an_automation_stored_over_a_limit_can_be_renamed_and_paused(stack):
    tenant = await create_tenant(stack)
    channel, _, _ = await connect_instagram(stack, tenant)
    created = await create_automation(stack, tenant, channel["id"], {"type": "api"}, _flow())
    legacy = {"trigger": {"type": "api"},
              "steps": [{"id": f"s{i}", "type": "add_tag", "tag": "t" * 100} for i in range(150)]}
    with Session(stack.deps.engine) as db:
        row = db.get(Automation, created["id"])
        row.definition = legacy
        db.add(row)
        db.commit()
    url = f"/v1/automations/{created['id']}"
    r = await stack.api.patch(url, headers=tenant.headers, json={"name": "renamed", "status": "paused"})
    assert r.status_code == 200, r.text
    assert (r.json()["name"], r.json()["status"], len(r.json()["steps"])) == ("renamed", "paused", 150)
    # A change of its steps is checked against today's limits.
    r = await stack.api.patch(url, headers=tenant.headers, json={"trigger": {"type": "api"}})
    assert "at most 100 items" in _problem(r) and len(r.content) < 2000


async def test_an_automation_stored_too_large_to_carry_starts_nothing_and_the_contact_goes_on(stack):
    """A definition of 2.4 MB of JSON (stored before the limits) would fail
    the conversation's task in a loop: it starts nothing, with a log line,
    the person's next message is answered, and the API refuses to start it."""
    tenant = await create_tenant(stack)
    channel, account_id, _ = await connect_instagram(stack, tenant)
    huge = await create_automation(stack, tenant, channel["id"], {"type": "dm_keyword", "keywords": ["hugeflow"]},
                                   _flow())
    await create_automation(stack, tenant, channel["id"], {"type": "dm_keyword", "keywords": ["smallflow"]},
                            _flow("the small flow answers"))
    definition = {"trigger": {"type": "dm_keyword", "keywords": ["hugeflow"]}, "steps": _flow(EMOJI * 200_000)}
    assert json_size(definition) > MAX_CARRIED_DEFINITION
    with Session(stack.deps.engine) as db:
        row = db.get(Automation, huge["id"])
        row.definition = definition
        db.add(row)
        db.commit()
    person = new_sender()
    await send_dm(stack, account_id, person, "hugeflow please")
    await send_dm(stack, account_id, person, "smallflow please")
    messages = await wait_for_messages(stack, person, 1)
    assert [m["json"]["message"]["text"] for m in messages] == ["the small flow answers"]
    contact = (await stack.api.get("/v1/contacts", headers=tenant.headers)).json()["data"][0]
    r = await stack.api.post(f"/v1/automations/{huge['id']}/runs", headers=tenant.headers,
                             json={"contact_id": contact["id"]})
    assert r.status_code == 409 and "MAX_CARRIED_DEFINITION" in r.text, r.text


async def _contact(stack, tenant, channel_id, **values) -> str:
    contact_id = f"ct_{secrets.token_hex(8)}"
    with Session(stack.deps.engine) as db:
        db.add(Contact(id=contact_id, workspace_id=tenant.workspace_id, channel_id=channel_id,
                       external_id=secrets.token_hex(8), **values))
        db.commit()
    return contact_id


async def test_contact_limits_are_422_naming_the_limit(stack):
    tenant = await create_tenant(stack)
    channel, _, _ = await connect_instagram(stack, tenant)
    url = f"/v1/contacts/{await _contact(stack, tenant, channel['id'])}"

    async def patch(body):
        return await stack.api.patch(url, headers=tenant.headers, json=body)

    tags = [f"{i:03d}".ljust(MAX_TAG, "t") for i in range(MAX_TAGS)]
    assert (await patch({"tags": tags})).status_code == 200
    assert f"at most {MAX_TAGS} items" in _problem(await patch({"tags": [*tags, "one more"]}))
    assert f"at most {MAX_TAG} characters" in _problem(await patch({"tags": ["t" * (MAX_TAG + 1)]}))

    for key in ("", "k" * (MAX_FIELD_KEY + 1), "with space", "a.b"):
        problem = _problem(await patch({"fields": {key: "v"}}))
        assert "MAX_FIELD_KEY" in problem and "fields" in problem
    assert (await patch({"fields": {"k" * MAX_FIELD_KEY: "v" * MAX_FIELD_VALUE, "Order-ID_2": 7}})).status_code == 200
    assert "MAX_FIELD_VALUE" in _problem(await patch({"fields": {"note": "v" * (MAX_FIELD_VALUE + 1)}}))
    assert "MAX_FIELD_VALUE" in _problem(await patch({"fields": {"list": ["v" * 1000, "w" * 1000]}}))

    many = {f"f{i}": i for i in range(MAX_FIELDS - 2)}
    assert (await patch({"fields": many})).status_code == 200
    problem = _problem(await patch({"fields": {"one": 1}}))
    assert "(MAX_FIELDS)" in problem and "101 fields" in problem
    big = {f"f{i}": EMOJI * 500 for i in range(20)}
    assert "MAX_FIELDS_SIZE" in _problem(await patch({"fields": big}))
    r = await stack.api.get(url, headers=tenant.headers)
    assert len(r.json()["fields"]) == MAX_FIELDS and r.json()["tags"] == tags  # nothing refused was stored


async def test_privacy_flags_are_strict_booleans(stack):
    tenant = await create_tenant(stack)
    channel, _, _ = await connect_instagram(stack, tenant)
    url = f"/v1/contacts/{await _contact(stack, tenant, channel['id'])}"
    for flag in ("consent_withdrawn", "processing_restricted"):
        for loose in ("yes", 0, 1, "true", "0"):
            problem = _problem(await stack.api.patch(url, headers=tenant.headers, json={flag: loose}))
            assert flag in problem and "valid boolean" in problem
    r = await stack.api.get(url, headers=tenant.headers)
    assert not r.json()["consent_withdrawn"] and not r.json()["processing_restricted"]
    r = await stack.api.patch(url, headers=tenant.headers, json={"processing_restricted": False})
    assert r.status_code == 200


async def test_a_contact_stored_over_the_limits_stays_readable_and_can_shrink(stack):
    tenant = await create_tenant(stack)
    channel, _, _ = await connect_instagram(stack, tenant)
    legacy = {f"k{i}": "v" * 3000 for i in range(150)} | {"bad key": "x"}
    url = f"/v1/contacts/{await _contact(stack, tenant, channel['id'], fields=legacy, tags=['t' * 500])}"
    r = await stack.api.get(url, headers=tenant.headers)
    assert r.json()["fields"] == legacy and r.json()["tags"] == ["t" * 500]
    # Changes that do not grow it pass; deleting a key any alphabet could make does too.
    r = await stack.api.patch(url, headers=tenant.headers, json={"first_name": "Ana", "fields": {"bad key": None}})
    assert r.status_code == 200, r.text
    assert "bad key" not in r.json()["fields"] and len(r.json()["fields"]) == 150
    assert "MAX_FIELDS" in _problem(await stack.api.patch(url, headers=tenant.headers, json={"fields": {"new": 1}}))


async def test_broadcast_and_run_sizes_are_422(stack):
    tenant = await create_tenant(stack)
    channel, _, _ = await connect_instagram(stack, tenant)
    r = await stack.api.post("/v1/broadcasts", headers=tenant.headers, json={
        "channel_id": channel["id"], "text": "hi", "segment": {"tags_any": ["t" * (MAX_TAG + 1)]},
    })
    assert f"at most {MAX_TAG} characters" in _problem(r)
    r = await stack.api.post("/v1/broadcasts", headers=tenant.headers, json={
        "channel_id": channel["id"], "text": "{{contact.first_name}}" * (MAX_PLACEHOLDERS + 1),
    })
    assert "MAX_PLACEHOLDERS" in _problem(r)
    automation = await create_automation(stack, tenant, channel["id"], {"type": "api"}, _flow())
    contact_id = await _contact(stack, tenant, channel["id"])
    r = await stack.api.post(f"/v1/automations/{automation['id']}/runs", headers=tenant.headers, json={
        "contact_id": contact_id, "context": {"k": "v" * MAX_RUN_CONTEXT_SIZE},
    })
    assert "MAX_RUN_CONTEXT_SIZE" in _problem(r)
