"""The automation flow schema (core.flow) and the runtime helpers (core.flowrt)."""

from __future__ import annotations

import ast
import copy
from pathlib import Path

import pytest
from pydantic import ValidationError

from core import flowrt
from core.contracts import AutomationSnapshot, Button, ContactSnapshot, InboundEvent, QuickReply
from core.flow import (
    AutomationCreate,
    AutomationDefinition,
    AutomationUpdate,
    DelayStep,
    definition_dict,
    merge_definition,
)
from core.flowrt import (
    buttons,
    delay_seconds,
    evaluate_condition,
    keyword_matches,
    normalize,
    public_reply_text,
    quick_replies,
    ref_matches,
    render,
    resolve_target,
    select_automation,
    step_index,
    validate_reply,
)

# The DESIGN.md §6 example, verbatim.
EXAMPLE = {
    "name": "Price list",
    "channel_id": "ch_123",
    "trigger": {"type": "dm_keyword", "keywords": ["price", "cost"], "match": "contains"},
    "steps": [
        {
            "id": "ask",
            "type": "send_message",
            "text": "Hi {{contact.first_name}}! Reply with your email for our price list.",
            "quick_replies": ["Not now"],
        },
        {
            "id": "email",
            "type": "wait_for_reply",
            "timeout_seconds": 86400,
            "validate": "email",
            "save_to_field": "email",
            "retry_prompt": "That does not look like an email. Try again?",
            "on_timeout": "bye",
        },
        {"id": "tag", "type": "add_tag", "tag": "lead"},
        {
            "id": "thanks",
            "type": "send_message",
            "text": "Thanks! It is on its way to {{contact.fields.email}}.",
            "next": "end",
        },
        {"id": "bye", "type": "send_message", "text": "No worries, ask any time."},
    ],
}


def example(**changes) -> dict:
    data = copy.deepcopy(EXAMPLE)
    data.update(changes)
    return data


def flow(*steps: dict, trigger: dict | None = None) -> dict:
    return {"trigger": trigger or {"type": "api"}, "steps": list(steps)}


def errors_of(data: dict, model=AutomationDefinition) -> list[dict]:
    with pytest.raises(ValidationError) as info:
        model.model_validate(data)
    return info.value.errors()


def error_text(data: dict, model=AutomationDefinition) -> str:
    """All messages with their locations, as a 422 body would show them."""
    return " | ".join(".".join(str(p) for p in e["loc"]) + ": " + e["msg"] for e in errors_of(data, model))


def contact(**kw) -> ContactSnapshot:
    return ContactSnapshot(id="ct_1", external_id="123", **kw)


def msg(text: str = "", *, kind: str = "message", payload: str = "") -> InboundEvent:
    return InboundEvent(
        event_id="m1",
        platform="instagram",
        account_id="acc",
        sender_id="u1",
        kind=kind,
        text=text,
        payload=payload,
    )


def auto(aid: str, trigger: dict, **extra) -> AutomationSnapshot:
    definition = {"trigger": trigger, "steps": [{"id": "s", "type": "send_message", "text": aid}], **extra}
    return AutomationSnapshot(id=aid, version=1, name=aid, definition=definition)


# --- schema: valid flows ------------------------------------------------------------------------------


def test_design_example_validates_and_dumps_runtime_json():
    model = AutomationCreate.model_validate(EXAMPLE)
    assert model.name == "Price list" and model.status == "active"
    d = definition_dict(model)
    assert set(d) == {"trigger", "steps"}
    assert d["trigger"] == {"type": "dm_keyword", "keywords": ["price", "cost"], "match": "contains"}
    assert [s["id"] for s in d["steps"]] == ["ask", "email", "tag", "thanks", "bye"]
    email = d["steps"][1]
    assert email["validate"] == "email"
    assert email["on_timeout"] == "bye" and email["on_invalid"] == "end" and email["max_retries"] == 2
    assert d["steps"][0]["quick_replies"] == ["Not now"]
    assert "next" not in d["steps"][0]  # None is left out
    # The dumped JSON validates again unchanged (what the API stores is what a run reads).
    assert definition_dict(AutomationDefinition.model_validate(d)) == d


def test_condition_else_alias_round_trips():
    data = flow(
        {
            "id": "check",
            "type": "condition",
            "conditions": [{"subject": "tag", "op": "has", "value": "vip"}],
            "then": "vip",
            "else": "end",
        },
        {"id": "vip", "type": "send_message", "text": "Welcome back!"},
    )
    d = definition_dict(AutomationDefinition.model_validate(data))
    assert d["steps"][0]["else"] == "end" and "else_" not in d["steps"][0]
    assert d["steps"][0]["then"] == "vip" and d["steps"][0]["match"] == "all"


def test_every_step_type_validates():
    data = flow(
        {
            "id": "hello",
            "type": "send_message",
            "text": "Pick one",
            "buttons": [
                {"title": "Site", "url": "https://example.com"},
                {"title": "Talk", "payload": "TALK"},
            ],
        },
        {
            "id": "ask",
            "type": "wait_for_reply",
            "validate": "choice",
            "choices": ["Small", "Large"],
            "save_to_field": "size",
            "on_invalid": "human",
        },
        {
            "id": "paid",
            "type": "wait_for_event",
            "event": "order.paid",
            "timeout_seconds": 3600,
            "on_timeout": "human",
            "save_to_field": "order",
        },
        {
            "id": "branch",
            "type": "condition",
            "match": "any",
            "conditions": [
                {"subject": "field", "name": "size", "op": "equals", "value": "large"},
                {"subject": "reply", "op": "matches", "value": "^l"},
                {"subject": "field", "name": "age", "op": "gt", "value": 17},
                {"subject": "field", "name": "email", "op": "exists"},
            ],
            "then": "tag",
            "else": "human",
        },
        {"id": "tag", "type": "add_tag", "tag": "  big spender  "},
        {"id": "untag", "type": "remove_tag", "tag": "cold"},
        {"id": "set", "type": "set_field", "field": "source", "value": "{{context.campaign}}"},
        {"id": "wait", "type": "delay", "hours": 1, "minutes": 30},
        {"id": "ai", "type": "ai_reply", "instructions": "Answer questions about sizes."},
        {"id": "human", "type": "handoff", "message": "A teammate will take it from here.", "note": "size?"},
    )
    model = AutomationDefinition.model_validate(data)
    d = definition_dict(model)
    by_id = {s["id"]: s for s in d["steps"]}
    assert by_id["tag"]["tag"] == "big spender"  # stripped
    assert by_id["ai"]["fallback_text"].startswith("Thanks for your message!")
    assert by_id["ai"]["history_messages"] == 12
    assert by_id["hello"]["buttons"] == [
        {"title": "Site", "url": "https://example.com"},
        {"title": "Talk", "payload": "TALK"},
    ]
    delay = model.steps[7]
    assert isinstance(delay, DelayStep) and delay.total_seconds == 5400
    assert delay_seconds(by_id["wait"]) == 5400


def test_quick_reply_object_payload_defaults_to_title():
    data = flow(
        {
            "id": "a",
            "type": "send_message",
            "text": "Size?",
            "quick_replies": ["S", {"title": "Medium"}, {"title": "Large", "payload": "SIZE_L"}],
        }
    )
    d = definition_dict(AutomationDefinition.model_validate(data))
    assert d["steps"][0]["quick_replies"] == [
        "S",
        {"title": "Medium", "payload": "Medium"},
        {"title": "Large", "payload": "SIZE_L"},
    ]
    assert quick_replies(d["steps"][0]) == [
        QuickReply(title="S", payload="S"),
        QuickReply(title="Medium", payload="Medium"),
        QuickReply(title="Large", payload="SIZE_L"),
    ]


@pytest.mark.parametrize(
    "trigger",
    [
        {"type": "dm_keyword", "keywords": ["hi"], "match": "exact"},
        {"type": "dm_keyword", "keywords": [r"\border\s*#?\d+"], "match": "regex"},
        {"type": "any_message"},
        {"type": "any_message", "scope": "first_message"},
        {"type": "postback", "payloads": ["GET_STARTED"]},
        {"type": "api"},
        {"type": "comment"},
        {
            "type": "comment",
            "media_ids": ["18000000000000001", "104512345678901_900000000000001"],
            "keywords": ["link", "info"],
            "match": "exact",
            "public_replies": ["Sent you a DM, {{contact.username | friend}}!", "Check your inbox"],
            "only_top_level": False,
        },
        {"type": "story_reply"},
        {"type": "story_reply", "keywords": [r"^price"], "match": "regex"},
        {"type": "story_mention"},
        {"type": "ref_link", "refs": ["summer*", "fb_ad_42", "a+b/c=d-e.f:g_h"]},
    ],
)
def test_supported_triggers_validate(trigger):
    model = AutomationDefinition.model_validate(
        flow({"id": "a", "type": "add_tag", "tag": "x"}, trigger=trigger)
    )
    assert definition_dict(model)["trigger"]["type"] == trigger["type"]


def test_a_loop_through_a_wait_is_allowed():
    data = flow(
        {"id": "ask", "type": "send_message", "text": "Ready?"},
        {"id": "wait", "type": "wait_for_reply", "on_timeout": "ask"},
        {
            "id": "again",
            "type": "condition",
            "conditions": [{"subject": "reply", "op": "equals", "value": "no"}],
            "then": "ask",
            "else": "end",
        },
    )
    AutomationDefinition.model_validate(data)


# --- schema: precise errors ---------------------------------------------------------------------------


def test_unknown_step_type_names_the_step_and_allowed_types():
    data = example()
    data["steps"][2]["type"] = "add_tags"
    text = error_text(data, AutomationCreate)
    assert "step 2 ('tag'): unknown step type 'add_tags'" in text
    assert "allowed: send_message, wait_for_reply" in text and "handoff" in text
    assert len(errors_of(data, AutomationCreate)) == 1  # not a wall of union errors


def test_missing_step_type_and_planned_step_type():
    assert "step 0 ('a'): missing 'type'" in error_text(flow({"id": "a", "text": "hi"}))
    text = error_text(flow({"id": "call", "type": "http_request", "url": "https://x"}))
    assert "step 0 ('call'): step type 'http_request' is not supported yet" in text


def test_new_trigger_defaults_in_runtime_json():
    def dumped(trigger: dict) -> dict:
        return definition_dict(AutomationDefinition.model_validate(flow({"id": "a", "type": "add_tag", "tag": "x"}, trigger=trigger)))["trigger"]

    assert dumped({"type": "comment"}) == {
        "type": "comment",
        "media_ids": [],
        "keywords": [],
        "match": "contains",
        "public_replies": [],
        "only_top_level": True,
    }
    assert dumped({"type": "story_reply"}) == {"type": "story_reply", "keywords": [], "match": "contains"}
    assert dumped({"type": "story_mention"}) == {"type": "story_mention"}
    assert dumped({"type": "ref_link", "refs": ["x"]}) == {"type": "ref_link", "refs": ["x"]}


@pytest.mark.parametrize(
    ("trigger", "message"),
    [
        ({"type": "comment", "public_replies": ["x"] * 11}, "List should have at most 10 items"),
        ({"type": "comment", "public_replies": ["x" * 501]}, "at most 500 characters"),
        ({"type": "comment", "public_replies": ["ok", "   "]}, "public reply 1 must not be blank"),
        ({"type": "comment", "public_replies": ["Hi {{user.name}}"]}, "public reply 0: unknown placeholder '{{user.name}}'"),
        ({"type": "comment", "keywords": ["(x"], "match": "regex"}, "keyword '(x' is not a valid regular expression"),
        ({"type": "comment", "keywords": [" "]}, "a keyword must not be blank"),
        ({"type": "comment", "keywords": ["k" * 101]}, "is 101 characters long; the limit is 100"),
        ({"type": "comment", "match": "fuzzy"}, "Input should be 'contains', 'exact' or 'regex'"),
        ({"type": "comment", "media_ids": [" 1"]}, "media id ' 1' must not be blank or have surrounding spaces"),
        ({"type": "comment", "only_top_level": "sometimes"}, "Input should be a valid boolean"),
        ({"type": "comment", "keyword": ["x"]}, "trigger.comment.keyword: Extra inputs are not permitted"),
        ({"type": "story_reply", "keywords": ["[a"], "match": "regex"}, "keyword '[a' is not a valid regular expression"),
        ({"type": "story_reply", "public_replies": ["x"]}, "Extra inputs are not permitted"),
        ({"type": "story_mention", "keywords": ["x"]}, "trigger.story_mention.keywords: Extra inputs are not permitted"),
        ({"type": "ref_link"}, "trigger.ref_link.refs: Field required"),
        ({"type": "ref_link", "refs": []}, "List should have at least 1 item"),
        ({"type": "ref_link", "refs": ["x"] * 51}, "List should have at most 50 items"),
        ({"type": "ref_link", "refs": ["r" * 101]}, "at most 100 characters"),
        ({"type": "ref_link", "refs": [""]}, "at least 1 character"),
        (
            {"type": "ref_link", "refs": ["summer sale"]},
            "ref 'summer sale' may only contain letters, digits, '*' (wildcard) and + / = - . : _",
        ),
    ],
)
def test_new_trigger_errors_are_precise(trigger, message):
    errors = errors_of(example(trigger=trigger), AutomationCreate)
    assert message in error_text(example(trigger=trigger), AutomationCreate)
    assert len(errors) == 1
    assert errors[0]["loc"][0] == "trigger"


def test_unknown_and_missing_trigger_type():
    assert "unknown trigger type 'keyword'" in error_text(
        example(trigger={"type": "keyword"}), AutomationCreate
    )
    assert "trigger needs a 'type'" in error_text(example(trigger={"keywords": ["x"]}), AutomationCreate)


def test_dangling_target_names_step_field_and_known_ids():
    data = {
        "trigger": {"type": "api"},
        "steps": [
            {"id": "ask", "type": "send_message", "text": "Email?"},
            {"id": "email", "type": "wait_for_reply", "validate": "email", "on_timeout": "byee"},
            {"id": "tag", "type": "add_tag", "tag": "lead"},
        ],
    }
    assert errors_of(data)[0]["msg"] == (
        "step 'email': on_timeout target 'byee' is not a step id (known ids: ask, email, tag; or 'end')"
    )


@pytest.mark.parametrize(
    ("step", "label"),
    [
        ({"id": "x", "type": "add_tag", "tag": "t", "next": "nowhere"}, "next"),
        ({"id": "x", "type": "wait_for_reply", "on_invalid": "nowhere"}, "on_invalid"),
        ({"id": "x", "type": "wait_for_event", "event": "paid", "on_timeout": "nowhere"}, "on_timeout"),
        (
            {
                "id": "x",
                "type": "condition",
                "conditions": [{"subject": "reply", "op": "exists"}],
                "then": "nowhere",
                "else": "end",
            },
            "then",
        ),
        (
            {
                "id": "x",
                "type": "condition",
                "conditions": [{"subject": "reply", "op": "exists"}],
                "then": "end",
                "else": "nowhere",
            },
            "else",
        ),
    ],
)
def test_every_target_kind_is_checked(step, label):
    assert f"step 'x': {label} target 'nowhere' is not a step id" in error_text(flow(step))


def test_duplicate_step_id():
    data = example()
    data["steps"][4]["id"] = "ask"
    assert "duplicate step id 'ask'" in error_text(data, AutomationCreate)


def test_missing_text():
    data = example()
    del data["steps"][3]["text"]
    errors = errors_of(data, AutomationCreate)
    assert errors[0]["loc"] == ("steps", 3, "send_message", "text")
    assert errors[0]["msg"] == "Field required"


def test_blank_text_and_too_long_text():
    assert "step 'a': text must not be blank" in error_text(
        flow({"id": "a", "type": "send_message", "text": "  "})
    )
    text = error_text(flow({"id": "a", "type": "send_message", "text": "x" * 1001}))
    assert "steps.0.send_message.text" in text and "at most 1000 characters" in text


def test_typo_in_a_field_name_is_rejected():
    data = example()
    data["steps"][1]["on_timout"] = "bye"
    errors = errors_of(data, AutomationCreate)
    assert errors[0]["loc"] == ("steps", 1, "wait_for_reply", "on_timout")
    assert errors[0]["type"] == "extra_forbidden"
    assert "extra_forbidden" in {e["type"] for e in errors_of(example(colour="red"), AutomationCreate)}


def test_bad_regex_keyword_names_keyword_and_error():
    data = example(trigger={"type": "dm_keyword", "keywords": ["ok", "order (\\d+"], "match": "regex"})
    text = error_text(data, AutomationCreate)
    assert "keyword 'order (\\\\d+' is not a valid regular expression: missing )" in text


def test_regex_keyword_length_limits():
    long_regex = "a" * 201
    text = error_text(
        example(trigger={"type": "dm_keyword", "keywords": [long_regex], "match": "regex"}), AutomationCreate
    )
    assert "trigger.dm_keyword.keywords.0: String should have at most 200 characters" in text
    # 150 chars is fine as a regex, too long as a plain keyword.
    AutomationCreate.model_validate(
        example(trigger={"type": "dm_keyword", "keywords": ["a" * 150], "match": "regex"})
    )
    assert "the limit is 100" in error_text(
        example(trigger={"type": "dm_keyword", "keywords": ["a" * 150]}), AutomationCreate
    )


def test_keyword_list_limits():
    assert "at least 1 item" in error_text(
        example(trigger={"type": "dm_keyword", "keywords": []}), AutomationCreate
    )
    assert "a keyword must not be blank" in error_text(
        example(trigger={"type": "dm_keyword", "keywords": ["price", "   "]}), AutomationCreate
    )
    assert "at most 50 items" in error_text(
        example(trigger={"type": "dm_keyword", "keywords": [f"k{i}" for i in range(51)]}), AutomationCreate
    )


def test_wait_for_reply_regex_and_choice_rules():
    assert "step 'a': validate 'regex' needs a 'pattern'" in error_text(
        flow({"id": "a", "type": "wait_for_reply", "validate": "regex"})
    )
    assert "step 'a': pattern '[a-' is not a valid regular expression" in error_text(
        flow({"id": "a", "type": "wait_for_reply", "validate": "regex", "pattern": "[a-"})
    )
    assert "step 'a': validate 'choice' needs a non-empty 'choices' list" in error_text(
        flow({"id": "a", "type": "wait_for_reply", "validate": "choice"})
    )
    assert "step 'a': validate 'choice' needs a non-empty 'choices' list" in error_text(
        flow({"id": "a", "type": "wait_for_reply", "validate": "choice", "choices": []})
    )
    assert "'pattern' is only used with validate 'regex'" in error_text(
        flow({"id": "a", "type": "wait_for_reply", "validate": "email", "pattern": "x"})
    )
    assert "'choices' is only used with validate 'choice'" in error_text(
        flow({"id": "a", "type": "wait_for_reply", "choices": ["yes"]})
    )
    assert "steps.0.wait_for_reply.timeout_seconds" in error_text(
        flow({"id": "a", "type": "wait_for_reply", "timeout_seconds": 604801})
    )
    assert "steps.0.wait_for_reply.save_to_field" in error_text(
        flow({"id": "a", "type": "wait_for_reply", "save_to_field": "Email Address"})
    )


def test_quick_replies_and_buttons_are_exclusive():
    data = flow(
        {
            "id": "a",
            "type": "send_message",
            "text": "Hi",
            "quick_replies": ["Yes"],
            "buttons": [{"title": "Site", "url": "https://example.com"}],
        }
    )
    assert errors_of(data)[0]["msg"] == "step 'a': use either quick_replies or buttons, not both"


def test_quick_reply_and_button_limits():
    text = error_text(flow({"id": "a", "type": "send_message", "text": "Hi", "quick_replies": ["x" * 21]}))
    assert "quick_replies.0" in text and "at most 20 characters" in text
    text = error_text(
        flow({"id": "a", "type": "send_message", "text": "Hi", "quick_replies": [str(i) for i in range(14)]})
    )
    assert "at most 13 items" in text
    many_buttons = [{"title": f"b{i}", "payload": f"P{i}"} for i in range(4)]
    assert "at most 3 items" in error_text(
        flow({"id": "a", "type": "send_message", "text": "Hi", "buttons": many_buttons})
    )
    assert "button 'Both' needs exactly one of 'payload' or 'url'" in error_text(
        flow(
            {
                "id": "a",
                "type": "send_message",
                "text": "Hi",
                "buttons": [{"title": "Both", "payload": "P", "url": "https://x.com"}],
            }
        )
    )
    assert "button 'None' needs exactly one of 'payload' or 'url'" in error_text(
        flow({"id": "a", "type": "send_message", "text": "Hi", "buttons": [{"title": "None"}]})
    )
    assert "url must be an http(s) URL, got 'javascript:alert(1)'" in error_text(
        flow(
            {
                "id": "a",
                "type": "send_message",
                "text": "Hi",
                "buttons": [{"title": "X", "url": "javascript:alert(1)"}],
            }
        )
    )


def test_step_id_rules():
    assert "'end' is reserved" in error_text(flow({"id": "end", "type": "add_tag", "tag": "x"}))
    assert "steps.0.add_tag.id" in error_text(flow({"id": "has space", "type": "add_tag", "tag": "x"}))


def test_steps_count_limits():
    assert "at least 1 item" in error_text(flow())
    many = [{"id": f"s{i}", "type": "add_tag", "tag": "x"} for i in range(101)]
    assert "at most 100 items" in error_text(flow(*many))


@pytest.mark.parametrize(
    ("condition", "message"),
    [
        ({"subject": "field", "op": "equals", "value": "x"}, "a 'field' condition needs 'name'"),
        ({"subject": "reply", "op": "has", "value": "vip"}, "op 'has' only applies to subject 'tag'"),
        ({"subject": "field", "name": "plan", "op": "equals"}, "op 'equals' needs a 'value'"),
        (
            {"subject": "reply", "op": "matches", "value": "(oops"},
            "condition pattern '(oops' is not a valid regular",
        ),
        (
            {"subject": "field", "name": "age", "op": "gt", "value": "old"},
            "op 'gt' needs a number as 'value'",
        ),
        ({"subject": "tag", "op": "has"}, "a tag condition with op 'has' needs 'value' (the tag name)"),
        ({"subject": "tag", "op": "gt", "value": "vip"}, "op 'gt' does not apply to tags"),
        ({"subject": "email", "op": "exists"}, "steps.0.condition.conditions.0.subject"),
    ],
)
def test_condition_errors(condition, message):
    data = flow({"id": "c", "type": "condition", "conditions": [condition], "then": "end", "else": "end"})
    assert message in error_text(data)


def test_condition_with_next_and_empty_conditions():
    base = {"id": "c", "type": "condition", "then": "end", "else": "end"}
    assert "at least 1 item" in error_text(flow({**base, "conditions": []}))
    assert "'next' is not used" in error_text(
        flow({**base, "conditions": [{"subject": "reply", "op": "exists"}], "next": "end"})
    )


def test_delay_limits():
    assert "step 'd': a delay needs at least 1 second" in error_text(flow({"id": "d", "type": "delay"}))
    assert "longer than 30 days" in error_text(flow({"id": "d", "type": "delay", "days": 30, "seconds": 1}))
    assert "greater than or equal to 0" in error_text(flow({"id": "d", "type": "delay", "minutes": -5}))
    AutomationDefinition.model_validate(flow({"id": "d", "type": "delay", "days": 30}))


def test_unknown_placeholder_is_rejected():
    text = error_text(flow({"id": "a", "type": "send_message", "text": "Hi {{contact.fist_name}}!"}))
    assert "step 'a': text: unknown placeholder '{{contact.fist_name}}'" in text
    # Fallbacks, whitespace and context keys are fine.
    AutomationDefinition.model_validate(
        flow(
            {
                "id": "a",
                "type": "send_message",
                "text": "Hi {{ contact.first_name | there }}, {{context.code}}",
            }
        )
    )


def test_a_loop_that_never_waits_is_rejected():
    data = flow(
        {"id": "hello", "type": "send_message", "text": "Hi"},
        {
            "id": "again",
            "type": "condition",
            "conditions": [{"subject": "reply", "op": "exists"}],
            "then": "end",
            "else": "hello",
        },
    )
    assert "steps 'hello' -> 'again' -> 'hello' form a loop" in error_text(data)


def test_other_field_limits():
    assert "steps.0.ai_reply.history_messages" in error_text(
        flow({"id": "a", "type": "ai_reply", "instructions": "x", "history_messages": 51})
    )
    assert "step 'a': instructions must not be blank" in error_text(
        flow({"id": "a", "type": "ai_reply", "instructions": " "})
    )
    assert "steps.0.wait_for_event.event" in error_text(
        flow({"id": "a", "type": "wait_for_event", "event": "a b"})
    )
    assert "steps.0.set_field.field" in error_text(flow({"id": "a", "type": "set_field", "field": "1st"}))
    assert "steps.0.add_tag.tag" in error_text(flow({"id": "a", "type": "add_tag", "tag": "   "}))
    assert "steps.0.handoff.message" in error_text(flow({"id": "a", "type": "handoff", "message": ""}))


def test_create_fields():
    assert "name" in error_text(example(name=""), AutomationCreate)
    assert "status" in error_text(example(status="deleted"), AutomationCreate)
    assert AutomationCreate.model_validate(example(status="paused")).status == "paused"


# --- updates ------------------------------------------------------------------------------------------


def current_definition() -> dict:
    return definition_dict(AutomationCreate.model_validate(EXAMPLE))


def test_merge_keeps_steps_when_only_trigger_changes():
    update = AutomationUpdate.model_validate({"trigger": {"type": "postback", "payloads": ["PRICES"]}})
    merged = merge_definition(current_definition(), update)
    assert merged["trigger"] == {"type": "postback", "payloads": ["PRICES"]}
    assert merged["steps"] == current_definition()["steps"]


def test_merge_replaces_steps():
    update = AutomationUpdate.model_validate(
        {"steps": [{"id": "only", "type": "send_message", "text": "Hi"}]}
    )
    merged = merge_definition(current_definition(), update)
    assert merged["trigger"]["keywords"] == ["price", "cost"]
    assert [s["id"] for s in merged["steps"]] == ["only"]


def test_update_with_name_only_keeps_definition():
    update = AutomationUpdate.model_validate({"name": "Renamed", "status": "paused"})
    assert update.trigger is None and update.steps is None
    assert merge_definition(current_definition(), update) == current_definition()


def test_update_validates_its_parts_precisely():
    text = error_text({"steps": [{"id": "a", "type": "sendmessage", "text": "x"}]}, AutomationUpdate)
    assert "step 0 ('a'): unknown step type 'sendmessage'" in text
    text = error_text({"trigger": {"type": "ref_link", "refs": []}}, AutomationUpdate)
    assert "trigger.ref_link.refs: List should have at least 1 item" in text
    assert AutomationUpdate.model_validate({"trigger": {"type": "story_reply"}}).trigger is not None
    assert "nmae: Extra inputs are not permitted" in error_text({"nmae": "x"}, AutomationUpdate)
    assert "at least 1 item" in error_text({"steps": []}, AutomationUpdate)


def test_merge_with_a_broken_current_definition_raises():
    update = AutomationUpdate.model_validate({"trigger": {"type": "api"}})
    with pytest.raises(ValueError, match="no trigger or steps"):
        merge_definition({"trigger": {"type": "api"}}, update)
    with pytest.raises(ValidationError, match="unknown step type 'gone'"):
        merge_definition({"trigger": {"type": "api"}, "steps": [{"id": "a", "type": "gone"}]}, update)


# --- runtime: text and keywords ----------------------------------------------------------------------


def test_normalize():
    assert normalize("  Préçio   ÀÉÎ\tStraße ") == "precio aei strasse"
    assert normalize("ＰＲＩＣＥ") == "price"  # NFKD folds full-width letters
    assert normalize("") == ""


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("What's the PRICE?", True),
        ("price", True),
        ("prices please", False),
        ("priceless", False),
        ("how much does it COST", True),
        ("costume", False),
        ("", False),
    ],
)
def test_contains_matches_whole_words_case_insensitively(text, expected):
    trigger = {"type": "dm_keyword", "keywords": ["price", "cost"], "match": "contains"}
    assert keyword_matches(trigger, text) == ((True, 2) if expected else (False, 0))


def test_contains_is_accent_insensitive_both_ways_and_supports_phrases():
    assert keyword_matches({"keywords": ["precio"]}, "¿Cuál es el précio?") == (True, 2)
    assert keyword_matches({"keywords": ["Café"]}, "one cafe please") == (True, 2)
    assert keyword_matches({"keywords": ["how much"]}, "Hi, how   much is it") == (True, 2)
    assert keyword_matches({"keywords": ["how much"]}, "how muchness") == (False, 0)
    assert keyword_matches({"keywords": ["c++"]}, "do you teach C++?") == (True, 2)


def test_exact_match():
    trigger = {"type": "dm_keyword", "keywords": ["Get started"], "match": "exact"}
    assert keyword_matches(trigger, "get STARTED!") == (True, 3)
    assert keyword_matches(trigger, "  ¡Get started! ") == (True, 3)
    assert keyword_matches(trigger, "get started now") == (False, 0)


def test_regex_match():
    trigger = {"type": "dm_keyword", "keywords": [r"order\s*#?\d{4}"], "match": "regex"}
    assert keyword_matches(trigger, "Where is ORDER #1234?") == (True, 2)
    assert keyword_matches(trigger, "where is my order") == (False, 0)
    # Matched against the normalized text too (accents removed).
    assert keyword_matches({"keywords": ["^precio"], "match": "regex"}, "Précio?") == (True, 2)
    # A broken regex never raises and never matches; the next keyword still counts.
    assert keyword_matches({"keywords": ["(broken", "ok"], "match": "regex"}, "ok") == (True, 2)
    assert keyword_matches({"keywords": ["(broken"], "match": "regex"}, "(broken") == (False, 0)


# --- runtime: choosing the automation ----------------------------------------------------------------

CONTAINS = {"type": "dm_keyword", "keywords": ["price"], "match": "contains"}
EXACT = {"type": "dm_keyword", "keywords": ["price"], "match": "exact"}
POSTBACK = {"type": "postback", "payloads": ["PRICE_LIST"]}
FIRST = {"type": "any_message", "scope": "first_message"}
DEFAULT = {"type": "any_message", "scope": "default"}
API = {"type": "api"}


def chosen(automations, event, *, first=False) -> str | None:
    found = select_automation(automations, event, is_first_message=first)
    return found.id if found else None


def test_exact_keyword_beats_contains_regardless_of_order():
    autos = [auto("contains", CONTAINS), auto("exact", EXACT)]
    assert chosen(autos, msg("Price!")) == "exact"
    assert chosen(autos, msg("what is the price")) == "contains"


def test_ties_go_to_the_first_in_list_order():
    autos = [auto("a", CONTAINS), auto("b", CONTAINS)]
    assert chosen(autos, msg("price?")) == "a"
    assert chosen(list(reversed(autos)), msg("price?")) == "b"


def test_postback_payload_comes_first():
    autos = [auto("exact", EXACT), auto("default", DEFAULT), auto("postback", POSTBACK)]
    assert chosen(autos, msg(kind="postback", payload="PRICE_LIST")) == "postback"
    # A quick-reply tap arrives as a message whose payload is set.
    assert chosen(autos, msg("price", payload="PRICE_LIST")) == "postback"
    # A payload nobody listens for falls back to the text.
    assert chosen(autos, msg("price", payload="OTHER")) == "exact"


def test_postback_event_does_not_match_keywords_or_default():
    autos = [auto("exact", EXACT), auto("default", DEFAULT)]
    assert chosen(autos, msg("price", kind="postback", payload="NOPE")) is None


def test_first_message_then_default():
    autos = [auto("default", DEFAULT), auto("first", FIRST), auto("kw", CONTAINS)]
    assert chosen(autos, msg("hello"), first=True) == "first"
    assert chosen(autos, msg("hello"), first=False) == "default"
    # A keyword still wins on a first message.
    assert chosen(autos, msg("price please"), first=True) == "kw"
    # A first interaction that is a postback (Messenger "Get Started") gets the welcome flow.
    assert chosen(autos, msg(kind="postback", payload="GET_STARTED"), first=True) == "first"
    assert chosen(autos, msg(kind="postback", payload="GET_STARTED"), first=False) is None


def test_api_triggers_paused_automations_and_other_kinds_never_match():
    autos = [auto("api", API), auto("paused", DEFAULT, status="paused")]
    assert chosen(autos, msg("anything"), first=True) is None
    live = [auto("paused", EXACT, status="paused"), auto("live", CONTAINS)]
    assert chosen(live, msg("price")) == "live"
    assert chosen([auto("default", DEFAULT)], msg("hi", kind="reaction")) is None
    assert chosen([auto("default", DEFAULT)], msg("hi", kind="referral")) is None
    assert chosen([], msg("hi")) is None


def comment(text: str = "", *, media_id: str = "m1", top: bool = True, comment_id: str = "c1") -> InboundEvent:
    return InboundEvent(
        event_id=f"comment:{comment_id}",
        platform="instagram",
        account_id="acc",
        sender_id="u1",
        kind="comment",
        text=text,
        comment_id=comment_id,
        media_id=media_id,
        is_top_level_comment=top,
    )


def event(kind: str = "message", text: str = "", **kw) -> InboundEvent:
    return InboundEvent(event_id="e1", platform="instagram", account_id="acc", sender_id="u1", kind=kind, text=text, **kw)


ANY_COMMENT = {"type": "comment"}
COMMENT_LINK = {"type": "comment", "keywords": ["link"], "match": "contains"}
COMMENT_LINK_EXACT = {"type": "comment", "keywords": ["link"], "match": "exact"}
COMMENT_ON_M2 = {"type": "comment", "media_ids": ["m2"]}
STORY_ANY = {"type": "story_reply"}
STORY_PRICE = {"type": "story_reply", "keywords": ["price"]}
MENTION = {"type": "story_mention"}
REF_SUMMER = {"type": "ref_link", "refs": ["summer*"]}
REF_EXACT = {"type": "ref_link", "refs": ["summer_sale"]}


def test_comments_match_only_comment_triggers():
    autos = [auto("default", DEFAULT), auto("kw", CONTAINS), auto("first", FIRST), auto("comment", ANY_COMMENT)]
    assert chosen(autos, comment("price please"), first=True) == "comment"
    assert chosen(autos[:3], comment("price please"), first=True) is None
    # And comment triggers never fire for DMs.
    assert chosen([auto("comment", ANY_COMMENT)], msg("hello"), first=True) is None


def test_comment_media_and_keyword_filters():
    autos = [auto("m2", COMMENT_ON_M2), auto("link", COMMENT_LINK)]
    assert chosen(autos, comment("nice post", media_id="m2")) == "m2"
    assert chosen(autos, comment("", media_id="m2")) == "m2"
    assert chosen(autos, comment("send the LINK", media_id="m1")) == "link"
    assert chosen(autos, comment("nice post", media_id="m1")) is None
    # A keyword match beats "any comment", even on the named post.
    assert chosen(autos, comment("send the LINK", media_id="m2")) == "link"
    # Same keyword level: the trigger naming the post beats the any-post one, whatever the order.
    on_post = auto("link_m2", {"type": "comment", "media_ids": ["m2"], "keywords": ["link"]})
    assert chosen([auto("link", COMMENT_LINK), on_post], comment("link?", media_id="m2")) == "link_m2"
    assert chosen([auto("link", COMMENT_LINK), on_post], comment("link?", media_id="m1")) == "link"
    # Ties go to the first in list order.
    assert chosen([auto("a", ANY_COMMENT), auto("b", ANY_COMMENT)], comment("hi")) == "a"
    # Keyword specificity as for DMs: exact beats contains beats "any comment", whatever the order.
    ranked = [auto("any", ANY_COMMENT), auto("contains", COMMENT_LINK), auto("exact", COMMENT_LINK_EXACT)]
    assert chosen(ranked, comment("Link!")) == "exact"
    assert chosen(ranked, comment("the link please")) == "contains"
    assert chosen(ranked, comment("wow")) == "any"
    # A Page post id "<page>_<post>" matches either form.
    page_post = auto("page", {"type": "comment", "media_ids": ["900"]})
    assert chosen([page_post], comment("hi", media_id="104_900")) == "page"
    assert chosen([page_post], comment("hi", media_id="104_9000")) is None


def test_comment_only_top_level():
    autos = [auto("top", ANY_COMMENT)]
    assert chosen(autos, comment("link", top=False)) is None
    threads = auto("threads", {"type": "comment", "only_top_level": False})
    assert chosen([*autos, threads], comment("link", top=False)) == "threads"
    assert chosen([*autos, threads], comment("link", top=True)) == "top"


def test_story_mentions():
    autos = [auto("default", DEFAULT), auto("mention", MENTION), auto("mention2", MENTION)]
    assert chosen(autos, event("story_mention", story_url="https://cdn/x"), first=True) == "mention"
    assert chosen(autos[:1], event("story_mention", story_url="https://cdn/x"), first=True) is None
    assert chosen([auto("mention", MENTION)], msg("hi")) is None


def test_story_reply_comes_before_keywords_then_normal_rules():
    autos = [auto("kw", EXACT), auto("default", DEFAULT), auto("story_price", STORY_PRICE), auto("story", STORY_ANY)]
    story = "https://cdn/story"
    assert chosen(autos, event(text="price", story_url=story)) == "story_price"
    assert chosen(autos, event(text="so cute", story_url=story)) == "story"
    assert chosen(autos, event(text="", story_url=story)) == "story"  # a sticker / emoji-only reply
    # Without a story reply trigger: the normal DM rules.
    dm_only = [auto("kw", EXACT), auto("default", DEFAULT), auto("story_price", STORY_PRICE)]
    assert chosen(dm_only, event(text="price", story_url=story)) == "story_price"
    assert chosen(dm_only, event(text="so cute", story_url=story)) == "default"
    # A plain DM never matches a story reply trigger.
    assert chosen(autos, msg("price")) == "kw"
    assert chosen([auto("story", STORY_ANY)], msg("hi")) is None


def test_ref_matches():
    assert ref_matches("summer*", "summer_sale") and ref_matches("summer*", "SUMMER")
    assert ref_matches("*sale", "summer_sale") and ref_matches("s*r_*e", "summer_sale")
    assert ref_matches("*", "anything")
    assert ref_matches("fb_ad_42", "FB_AD_42")
    assert not ref_matches("summer*", "big_summer")
    assert not ref_matches("fb_ad_4", "fb_ad_42")
    assert not ref_matches("a.c", "abc")  # dots are literal
    assert not ref_matches("summer*", "") and not ref_matches("", "x")
    assert ref_matches("a**b", "ab") and ref_matches("*a*", "a") and not ref_matches("ab*ba", "aba")


def test_a_ref_with_a_line_break_is_refused():
    assert "may only contain" in error_text(flow(SEND, trigger={"type": "ref_link", "refs": ["summer\n"]}))


def test_ref_link_beats_other_triggers():
    autos = [auto("pb", {"type": "postback", "payloads": ["GET_STARTED"]}), auto("first", FIRST), auto("kw", CONTAINS), auto("ref", REF_SUMMER)]
    assert chosen(autos, event("referral", ref="summer_2024"), first=True) == "ref"
    assert chosen(autos, event("referral", ref="winter"), first=True) is None  # a bare referral starts nothing else
    assert chosen(autos, event("postback", payload="GET_STARTED", ref="Summer1"), first=True) == "ref"
    assert chosen(autos, event("postback", payload="GET_STARTED", ref="winter"), first=True) == "pb"
    assert chosen(autos, event(text="price", ref="summer"), first=True) == "ref"
    assert chosen(autos, event(text="price", ref="winter"), first=True) == "kw"
    # A ref listed exactly beats a wildcard, whatever the order.
    both = [auto("wild", REF_SUMMER), auto("exact", REF_EXACT)]
    assert chosen(both, event("referral", ref="summer_sale")) == "exact"
    assert chosen(both, event("referral", ref="summer_fun")) == "wild"
    assert chosen([auto("paused", REF_SUMMER, status="paused")], event("referral", ref="summer")) is None


def test_public_reply_text_is_stable_and_varies():
    trigger = {"type": "comment", "public_replies": ["A", "B", "C"]}
    ids = [f"1780000000000{i:04d}" for i in range(60)]
    picks = [public_reply_text(trigger, cid) for cid in ids]
    assert picks == [public_reply_text(trigger, cid) for cid in ids]  # replay-stable
    assert set(picks) == {"A", "B", "C"}
    assert public_reply_text({"type": "comment"}, "c1") == ""
    assert public_reply_text({"type": "comment", "public_replies": []}, "c1") == ""
    assert public_reply_text({"type": "comment", "public_replies": ["only"]}, "") == "only"
    # Pinned values: changing the choice function would change replies on replay.
    assert [public_reply_text(trigger, cid) for cid in ("17865799348089039", "c1", "")] == ["A", "C", "B"]
    # Blank variants are skipped.
    assert public_reply_text({"public_replies": ["  ", "X"]}, "17865799348089039") == "X"


def test_select_works_on_a_validated_definition():
    snapshot = AutomationSnapshot(id="price", version=3, name="Price list", definition=current_definition())
    assert chosen([snapshot], msg("What's the PRICE?")) == "price"
    assert chosen([snapshot], msg("priceless")) is None


# --- runtime: templates ------------------------------------------------------------------------------


def test_render_contact_fields_and_context():
    c = contact(
        first_name="Ana", last_name="Lima", username="ana.l", fields={"email": "ana@x.com", "score": 7}
    )
    assert render("Hi {{contact.first_name}}!", c) == "Hi Ana!"
    assert (
        render("{{ contact.first_name }} {{contact.last_name}} (@{{contact.username}})", c)
        == "Ana Lima (@ana.l)"
    )
    assert render("Sent to {{contact.fields.email}}, score {{ contact.fields.score }}.", c) == (
        "Sent to ana@x.com, score 7."
    )
    assert render("Code: {{context.code}}", c, {"code": "SAVE10"}) == "Code: SAVE10"


def test_render_fallbacks():
    assert render("Hi {{contact.first_name | there}}!", contact()) == "Hi there!"
    assert render("Hi {{contact.first_name|there}}!", contact(first_name="Bo")) == "Hi Bo!"
    assert render('Hi {{ contact.first_name | "friend" }}!', contact(first_name="  ")) == "Hi friend!"
    assert render("Your plan: {{contact.fields.plan | free}}", contact()) == "Your plan: free"


def test_render_removes_gaps_left_by_empty_placeholders():
    assert render("Hi {{contact.first_name}}!", contact()) == "Hi!"
    assert render("Hi {{contact.first_name}}, welcome.", contact()) == "Hi, welcome."
    assert render("Hi {{contact.first_name}} {{contact.last_name}}!", contact()) == "Hi!"
    assert render("Thanks {{contact.first_name}} for writing", contact()) == "Thanks for writing"
    assert render("{{contact.first_name}} welcome", contact()) == "welcome"
    assert render("Hello {{context.missing}}", contact()) == "Hello"
    # Spacing the author wrote elsewhere is left alone.
    assert render("Bonjour ! {{contact.first_name}}", contact(first_name="Zoé")) == "Bonjour ! Zoé"


def test_render_unknown_and_malformed_placeholders_never_raise():
    c = contact(first_name="Ana")
    assert render("Hi {{contact.age}}.", c) == "Hi."
    assert render("Hi {{first_name}}.", c) == "Hi."
    assert render("Hi {{contact.first_name", c) == "Hi {{contact.first_name"
    assert render("a {{ }} b }} {{{", c) == "a b }} {{{"
    assert render("{{contact.fields.x.y}}", contact(fields={"x": "flat"})) == ""
    assert render("{{context.a.b}}", c, {"a": {"b": "deep"}}) == "deep"
    assert render("no placeholders, just {braces}", c) == "no placeholders, just {braces}"


def test_render_shows_lists_as_text_and_objects_as_json():
    c = contact(fields={"sizes": ["S", "M", 42, 1.0, True, None, ""], "address": {"city": "Porto", "zip": 4000}})
    assert render("Sizes: {{contact.fields.sizes}}.", c) == "Sizes: S, M, 42, 1, true."
    assert render("Ship to {{contact.fields.address}}", c) == 'Ship to {"city": "Porto", "zip": 4000}'
    order = {"items": [{"sku": "A1", "qty": 2}, "gift wrap"], "notes": [], "meta": {}}
    assert render("Items: {{context.items}}", c, order) == 'Items: {"sku": "A1", "qty": 2}, gift wrap'
    assert render("Notes: {{context.notes | none}}", c, order) == "Notes: none"
    assert render("Meta: {{context.meta}}", c, order) == "Meta: {}"


# --- runtime: reply validation -----------------------------------------------------------------------


def wait(validate: str, **kw) -> dict:
    return {"id": "w", "type": "wait_for_reply", "validate": validate, **kw}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("  Ana@Example.COM ", (True, "Ana@example.com")),
        ("first.last+tag@sub.example.co.uk", (True, "first.last+tag@sub.example.co.uk")),
        ("not an email", (False, None)),
        ("ana@example", (False, None)),
        ("ana@@example.com", (False, None)),
        ("ana..b@example.com", (False, None)),
        ("my email is ana@example.com", (False, None)),
        ("", (False, None)),
    ],
)
def test_validate_email(text, expected):
    assert validate_reply(wait("email"), text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("+44 (20) 7946-0958", (True, "+442079460958")),
        ("555.123.4567", (True, "5551234567")),
        ("1234567", (True, "1234567")),
        ("123456", (False, None)),
        ("+1234567890123456", (False, None)),
        ("call me", (False, None)),
        ("12+34567", (False, None)),
    ],
)
def test_validate_phone(text, expected):
    assert validate_reply(wait("phone"), text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("12", (True, 12)),
        (" -3.5 ", (True, -3.5)),
        ("1,5", (True, 1.5)),
        ("+7", (True, 7)),
        ("twelve", (False, None)),
        ("1.2.3", (False, None)),
        ("", (False, None)),
    ],
)
def test_validate_number(text, expected):
    ok, value = validate_reply(wait("number"), text)
    assert (ok, value) == expected
    assert type(value) is type(expected[1])


def test_validate_regex_choice_and_none():
    step = wait("regex", pattern=r"^[A-Z]{2}\d{4}$")
    assert validate_reply(step, " ab1234 ") == (True, "ab1234")
    assert validate_reply(step, "abc") == (False, None)
    assert validate_reply(wait("regex", pattern="(broken"), "x") == (False, None)
    choice = wait("choice", choices=["Small", "Extra Large"])
    assert validate_reply(choice, "  extra   LARGE! ") == (True, "Extra Large")
    assert validate_reply(choice, "small") == (True, "Small")
    assert validate_reply(choice, "medium") == (False, None)
    assert validate_reply(wait("none"), "  whatever ") == (True, "whatever")
    assert validate_reply({"id": "w", "type": "wait_for_reply"}, "x") == (True, "x")
    for kind in ("none", "email", "phone", "number", "choice"):
        assert validate_reply(wait(kind, choices=["a"]), "   ") == (False, None)


# --- runtime: conditions -----------------------------------------------------------------------------


def cond(*conditions: dict, match: str = "all") -> dict:
    return {
        "id": "c",
        "type": "condition",
        "conditions": list(conditions),
        "match": match,
        "then": "end",
        "else": "end",
    }


def field(name: str, op: str, value=None) -> dict:
    return {"subject": "field", "name": name, "op": op, "value": value}


def test_field_conditions():
    c = contact(fields={"plan": "Pró", "age": "21", "score": 7.0, "empty": "  ", "langs": ["en", "pt"]})
    assert evaluate_condition(cond(field("plan", "equals", "pro")), c, "")
    assert not evaluate_condition(cond(field("plan", "not_equals", "PRO")), c, "")
    assert evaluate_condition(cond(field("age", "equals", 21)), c, "")  # numbers compared as numbers
    assert evaluate_condition(cond(field("score", "equals", "7")), c, "")
    assert evaluate_condition(cond(field("plan", "contains", "r")), c, "")
    assert evaluate_condition(cond(field("langs", "contains", "PT")), c, "")
    assert evaluate_condition(cond(field("plan", "exists")), c, "")
    assert not evaluate_condition(cond(field("empty", "exists")), c, "")
    assert evaluate_condition(cond(field("missing", "not_exists")), c, "")
    assert evaluate_condition(cond(field("plan", "matches", "^pr")), c, "")
    assert not evaluate_condition(cond(field("plan", "matches", "(bad")), c, "")
    assert evaluate_condition(cond(field("age", "gt", 18)), c, "")
    assert not evaluate_condition(cond(field("age", "lt", "18")), c, "")
    assert not evaluate_condition(cond(field("plan", "gt", 1)), c, "")  # not numeric
    assert not evaluate_condition(cond(field("missing", "lt", 1)), c, "")
    assert not evaluate_condition(cond(field("missing", "equals", "x")), c, "")
    assert evaluate_condition(cond(field("missing", "not_equals", "x")), c, "")


def test_tag_conditions():
    c = contact(tags=["VIP", "lead"])
    assert evaluate_condition(cond({"subject": "tag", "op": "has", "value": "vip"}), c, "")
    assert evaluate_condition(cond({"subject": "tag", "op": "equals", "value": "Lead"}), c, "")
    assert not evaluate_condition(cond({"subject": "tag", "op": "has", "value": "customer"}), c, "")
    assert evaluate_condition(cond({"subject": "tag", "op": "not_has", "value": "customer"}), c, "")
    assert not evaluate_condition(cond({"subject": "tag", "op": "not_has", "value": "vip"}), c, "")


def test_reply_conditions():
    c = contact()
    assert evaluate_condition(cond({"subject": "reply", "op": "equals", "value": "yes"}), c, "YES")
    assert evaluate_condition(
        cond({"subject": "reply", "op": "contains", "value": "refund"}), c, "I want a Refund"
    )
    assert evaluate_condition(cond({"subject": "reply", "op": "gt", "value": 3}), c, "4,5")
    assert evaluate_condition(cond({"subject": "reply", "op": "not_exists"}), c, "")
    assert not evaluate_condition(cond({"subject": "reply", "op": "exists"}), c, "  ")


def test_all_and_any():
    c = contact(tags=["vip"], fields={"plan": "free"})
    is_vip = {"subject": "tag", "op": "has", "value": "vip"}
    is_pro = field("plan", "equals", "pro")
    assert not evaluate_condition(cond(is_vip, is_pro), c, "")
    assert evaluate_condition(cond(is_vip, is_pro, match="any"), c, "")
    assert not evaluate_condition(cond(is_pro, match="any"), c, "")


# --- runtime: navigation and step payloads -----------------------------------------------------------


def test_step_index_and_resolve_target():
    steps = current_definition()["steps"]
    assert step_index(steps) == {"ask": 0, "email": 1, "tag": 2, "thanks": 3, "bye": 4}
    assert resolve_target(steps, 0, None) == 1
    assert resolve_target(steps, 4, None) is None  # past the end
    assert resolve_target(steps, 1, "bye") == 4
    assert resolve_target(steps, 3, "end") is None
    assert resolve_target(steps, 0, "ghost") is None


def test_walk_the_design_example():
    """Follow the example as a run would: the happy path and the timeout path."""
    steps = current_definition()["steps"]
    c = contact(first_name="Ana")
    ask = steps[0]
    assert render(ask["text"], c) == "Hi Ana! Reply with your email for our price list."
    assert quick_replies(ask) == [QuickReply(title="Not now", payload="Not now")]
    email = steps[1]
    assert validate_reply(email, "nope") == (False, None)
    ok, value = validate_reply(email, "Ana@Mail.com")
    assert ok and value == "Ana@mail.com"
    c.fields[email["save_to_field"]] = value
    i = resolve_target(steps, 1, email.get("next"))
    assert steps[i]["id"] == "tag"
    i = resolve_target(steps, i, steps[i].get("next"))
    assert render(steps[i]["text"], c) == "Thanks! It is on its way to Ana@mail.com."
    assert resolve_target(steps, i, steps[i].get("next")) is None
    # Timeout path.
    i = resolve_target(steps, 1, email["on_timeout"])
    assert steps[i]["text"] == "No worries, ask any time."
    assert resolve_target(steps, i, steps[i].get("next")) is None


def test_delay_seconds():
    assert delay_seconds({"seconds": 5, "minutes": 2, "hours": 1, "days": 1}) == 5 + 120 + 3600 + 86400
    assert delay_seconds({"minutes": 10}) == 600
    assert delay_seconds({}) == 0


def test_buttons_and_quick_replies_from_json():
    step = {
        "buttons": [{"title": "Site", "url": "https://example.com"}, {"title": "Talk", "payload": "TALK"}]
    }
    assert buttons(step) == [
        Button(title="Site", payload="", url="https://example.com"),
        Button(title="Talk", payload="TALK", url=""),
    ]
    assert buttons({}) == [] and quick_replies({}) == []


def test_flowrt_imports_only_stdlib_re2_and_contracts():
    """flowrt runs inside Temporal workflows: it must stay deterministic and sandbox-safe."""
    tree = ast.parse(Path(flowrt.__file__).read_text())
    allowed = {
        "__future__", "re", "re2", "json", "unicodedata", "math", "hashlib", "functools", "dataclasses", "typing",
        "collections.abc", "core.contracts",
    }
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
    assert imported <= allowed, imported - allowed


def test_customer_patterns_run_in_linear_time_and_unspaced_scripts_match_inside_sentences():
    # Python's backtracking re takes exponential time here (minutes for 30
    # characters, and the worker's GIL with it); RE2 answers at once.
    assert flowrt.pattern_search("^(a+)+$", "a" * 64 + "!") is False
    assert flowrt.pattern_search("^(a+)+$", "a" * 64) is True
    trigger = {"type": "dm_keyword", "match": "regex", "keywords": ["^(a+)+$"]}
    assert flowrt.keyword_matches(trigger, "a" * 64 + "!") == (False, 0)
    assert flowrt.validate_reply({"validate": "regex", "pattern": "^(a|aa)+$"}, "a" * 64 + "b") == (False, None)
    assert flowrt.pattern_search("PRICE", "what is the price?") is True  # case-insensitive, as before
    # A keyword in a script without spaces matches inside a sentence (version 2);
    # a workflow that started under version 1 keeps its rules.
    chinese = {"type": "dm_keyword", "keywords": ["价格"]}
    assert flowrt.keyword_matches(chinese, "请问价格多少") == (True, 2)
    assert flowrt.keyword_matches(chinese, "请问价格多少", matching=1) == (False, 0)
    thai = {"type": "dm_keyword", "keywords": ["ราคา"]}
    assert flowrt.keyword_matches(thai, "สินค้านี้ราคาเท่าไหร่") == (True, 2)
    english = {"type": "dm_keyword", "keywords": ["price"]}
    assert flowrt.keyword_matches(english, "priceless") == (False, 0)  # whole words where words have spaces


def test_patterns_re2_cannot_run_are_refused_when_saved():
    for trigger in (
        {"type": "dm_keyword", "match": "regex", "keywords": ["(?<!not )interested"]},
        {"type": "dm_keyword", "match": "regex", "keywords": [r"(\w)\1"]},
    ):
        with pytest.raises(ValidationError, match="RE2"):
            AutomationCreate(name="x", channel_id="ch_1", trigger=trigger,
                             steps=[{"id": "a", "type": "send_message", "text": "hi"}])


SEND = {"id": "a", "type": "send_message", "text": "hi"}


@pytest.mark.parametrize("pattern", ["(?<!not )interested", r"(\w)\1", "a++", "(x{1000}){1000}"])
@pytest.mark.parametrize(
    "where",
    ["dm_keyword", "comment", "story_reply", "wait_for_reply", "condition"],
)
def test_no_field_saves_a_pattern_re2_cannot_run(pattern, where):
    """Every place a pattern is saved refuses one RE2 cannot run, so matching
    rules 3 (nothing on Python's re) never meet one in a new automation."""
    if where in ("dm_keyword", "comment", "story_reply"):
        data = flow(SEND, trigger={"type": where, "match": "regex", "keywords": [pattern]})
    elif where == "wait_for_reply":
        data = flow({"id": "w", "type": "wait_for_reply", "validate": "regex", "pattern": pattern})
    else:
        data = flow({"id": "c", "type": "condition", "then": "end", "else": "end",
                     "conditions": [{"subject": "reply", "op": "matches", "value": pattern}]})
    assert "cannot run on RE2" in error_text(data)


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        ("(x{1000}){1000}", "invalid repetition size: {1000} (the repetition is too large: at most 1000, nested "
                            "repetitions multiplied)"),
        ("a++", "bad repetition operator: ++ (a quantifier after a quantifier, such as the possessive a++, is not "
                "supported)"),
        ("(?<!not )interested", "invalid perl operator: (?<! (lookbehind is not supported)"),
        ("(?=a)", "invalid perl operator: (?= (lookahead is not supported)"),
        (r"(\w)\1", "invalid escape sequence: \\1 (backreferences are not supported)"),
        (r"\Z", "invalid escape sequence: \\Z (RE2 does not support this syntax)"),
    ],
)
def test_a_refused_pattern_is_told_the_reason_re2_gives(pattern, reason):
    text = error_text(flow(SEND, trigger={"type": "dm_keyword", "match": "regex", "keywords": [pattern]}))
    assert text == (
        f"trigger.dm_keyword: keyword {pattern!r} cannot run on RE2 (linear time, so no message can stall the "
        f"automations): {reason}"
    )


def test_a_repetition_python_cannot_count_is_a_bad_pattern_not_a_crash():
    text = error_text(flow(SEND, trigger={"type": "dm_keyword", "match": "regex", "keywords": ["a{9999999999}"]}))
    assert "keyword 'a{9999999999}' is not a valid regular expression: the repetition number is too large" in text


def test_a_pattern_re2_cannot_run_matches_nothing_since_matching_rules_3():
    """Saved before such patterns were refused: under rules 3 it never runs on
    Python's backtracking re; a workflow that started under 1 or 2 keeps its
    answer (replay)."""
    trigger = {"type": "dm_keyword", "match": "regex", "keywords": ["(?<!not )interested"]}
    assert keyword_matches(trigger, "I am interested") == (False, 0)
    assert keyword_matches(trigger, "I am interested", matching=2) == (True, 2)
    assert keyword_matches(trigger, "I am interested", matching=1) == (True, 2)
    assert validate_reply({"validate": "regex", "pattern": r"(\d)\1"}, "11") == (False, None)
    assert validate_reply({"validate": "regex", "pattern": r"(\d)\1"}, "11", matching=2) == (True, "11")


def test_new_workflows_take_the_newest_matching_rules():
    from workflows.common import MATCHING_PATCHES

    assert MATCHING_PATCHES[0][0] == flowrt.MATCHING == 3


def test_a_number_condition_takes_only_numbers_the_runtime_can_compare():
    def condition(value):
        return AutomationCreate(name="x", channel_id="ch_1", trigger={"type": "api"}, steps=[
            {"id": "c", "type": "condition", "conditions": [{"subject": "field", "name": "age", "op": "lt", "value": value}],
             "then": "a", "else": "a"},
            {"id": "a", "type": "send_message", "text": "hi"},
        ])

    for value in ("18", "3,5", 18, 2.5):
        condition(value)
    for value in ("1e3", "inf", "nan", "1_000", "ten"):  # float() took these; the runtime never compares them
        with pytest.raises(ValidationError, match="needs a number"):
            condition(value)


def test_a_contact_is_looked_up_after_routing_only_when_they_wrote_and_are_still_nameless():
    new = ContactSnapshot(id="ct_1", external_id="1", is_new=True)
    due = flowrt.profile_due_after_routing
    assert due("message", new, "instagram") and due("postback", new, "messenger")
    assert due("referral", new, "instagram") and due("story_mention", new, "instagram")
    assert not due("comment", new, "instagram")  # a commenter who never wrote
    assert not due("reaction", new, "instagram") and not due("read", new, "messenger")
    assert not due("message", new, "telegram")  # the update carries the names
    assert not due("message", ContactSnapshot(id="ct_1", external_id="1"), "instagram")  # looked up already
    assert not due("message", ContactSnapshot(id="ct_1", external_id="1", is_new=True, first_name="Ana"), "instagram")
    for restricted in ({"processing_restricted": True}, {"consent_withdrawn": True}):
        assert not due("message", ContactSnapshot(id="ct_1", external_id="1", is_new=True, **restricted), "instagram")
