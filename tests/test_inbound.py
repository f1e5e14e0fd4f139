"""Webhook parsing: realistic Meta and Telegram payloads into InboundEvents."""

from __future__ import annotations

import copy

import pytest

from core.contracts import Attachment
from core.inbound import MalformedPayload, ParseResult, parse_meta_webhook, parse_telegram_update

IG_ACCOUNT = "17841400000000001"
IGSID_A = "1254477718923456"
IGSID_B = "6012345678901234"

INSTAGRAM_BATCH = {
    "object": "instagram",
    "entry": [
        {
            "id": IG_ACCOUNT,
            "time": 1718000000123,
            "messaging": [
                {
                    "sender": {"id": IGSID_A},
                    "recipient": {"id": IG_ACCOUNT},
                    "timestamp": 1718000000001,
                    "message": {
                        "mid": "aWdfZAG1faXRlbToxOklHTWVzc2FnZAUlEOjE3ODQxNDAw",
                        "text": "Hi! Is the course still open?",
                    },
                },
                {
                    "sender": {"id": IGSID_A},
                    "recipient": {"id": IG_ACCOUNT},
                    "timestamp": 1718000000002,
                    "message": {
                        "mid": "aWdfZAG1faXRlbToxOklHTWVzc2FnZAUlEOjE3ODQxNDAx",
                        "text": "Yes please",
                        "quick_reply": {"payload": "WANT_LINK"},
                    },
                },
                {
                    # Our own reply coming back: never an event.
                    "sender": {"id": IG_ACCOUNT},
                    "recipient": {"id": IGSID_A},
                    "timestamp": 1718000000003,
                    "message": {
                        "mid": "aWdfZAG1faXRlbToxOklHTWVzc2FnZAUlEOjE3ODQxNDAy",
                        "text": "Here is the link",
                        "is_echo": True,
                    },
                },
            ],
        },
        {
            "id": IG_ACCOUNT,
            "time": 1718000000456,
            "messaging": [
                {
                    "sender": {"id": IGSID_B},
                    "recipient": {"id": IG_ACCOUNT},
                    "timestamp": 1718000000010,
                    "postback": {
                        "mid": "aWdfZAG1faXRlbToxOklHTWVzc2FnZAUlEOjE3ODQxNDAz",
                        "title": "Get the guide",
                        "payload": "GET_GUIDE",
                    },
                },
                {
                    "sender": {"id": IGSID_B},
                    "recipient": {"id": IG_ACCOUNT},
                    "timestamp": 1718000000011,
                    "reaction": {
                        "mid": "aWdfZAG1faXRlbToxOklHTWVzc2FnZAUlEOjE3ODQxNDAy",
                        "action": "react",
                        "reaction": "love",
                        "emoji": "\u2764\ufe0f",
                    },
                },
                {
                    "sender": {"id": IGSID_B},
                    "recipient": {"id": IG_ACCOUNT},
                    "timestamp": 1718000000012,
                    "read": {"mid": "aWdfZAG1faXRlbToxOklHTWVzc2FnZAUlEOjE3ODQxNDAy"},
                },
            ],
        },
        {
            "id": IG_ACCOUNT,
            "time": 1718000000789,
            "changes": [
                {
                    "field": "comments",
                    "value": {
                        "from": {"id": IGSID_B, "username": "jane.doe"},
                        "media": {"id": "18000000000000001", "media_product_type": "FEED"},
                        "id": "17865799348089039",
                        "text": "LINK please",
                    },
                }
            ],
        },
    ],
}


def test_instagram_batch_of_three_entries() -> None:
    result = parse_meta_webhook(copy.deepcopy(INSTAGRAM_BATCH))
    assert isinstance(result, ParseResult)
    assert result.object == "instagram"
    kinds = [e.kind for e in result.events]
    assert kinds == ["message", "message", "postback", "reaction", "seen", "comment"]
    assert all(e.platform == "instagram" and e.account_id == IG_ACCOUNT for e in result.events)

    dm, quick, postback, reaction, seen, comment = result.events
    assert dm.event_id == "aWdfZAG1faXRlbToxOklHTWVzc2FnZAUlEOjE3ODQxNDAw"
    assert dm.sender_id == IGSID_A
    assert dm.text == "Hi! Is the course still open?"
    assert dm.payload == ""
    assert dm.timestamp_ms == 1718000000001

    assert quick.payload == "WANT_LINK"
    assert quick.text == "Yes please"

    assert postback.event_id == "aWdfZAG1faXRlbToxOklHTWVzc2FnZAUlEOjE3ODQxNDAz"
    assert postback.payload == "GET_GUIDE"
    assert postback.text == "Get the guide"
    assert postback.sender_id == IGSID_B

    assert reaction.event_id == (
        f"reaction:aWdfZAG1faXRlbToxOklHTWVzc2FnZAUlEOjE3ODQxNDAy:{IGSID_B}:1718000000011"
    )
    assert reaction.text == "\u2764\ufe0f"
    assert reaction.payload == "react"

    assert seen.event_id == f"seen:{IGSID_B}:1718000000012"

    assert comment.event_id == "comment:17865799348089039"
    assert comment.comment_id == "17865799348089039"
    assert comment.media_id == "18000000000000001"
    assert comment.sender_id == IGSID_B and comment.username == "jane.doe"
    assert comment.text == "LINK please"
    assert comment.is_top_level_comment is True
    assert comment.timestamp_ms == 1718000000789  # the entry's time

    assert result.ignored == [("aWdfZAG1faXRlbToxOklHTWVzc2FnZAUlEOjE3ODQxNDAy", "echo of our own message")]


def test_story_mention_attachment_keeps_url_only() -> None:
    payload = {
        "object": "instagram",
        "entry": [
            {
                "id": IG_ACCOUNT,
                "time": 1718000001000,
                "messaging": [
                    {
                        "sender": {"id": IGSID_A},
                        "recipient": {"id": IG_ACCOUNT},
                        "timestamp": 1718000001000,
                        "message": {
                            "mid": "mid.story.1",
                            "attachments": [
                                {
                                    "type": "story_mention",
                                    "payload": {
                                        "url": "https://lookaside.fbsbx.com/ig_messaging_cdn/?asset_id=1"
                                    },
                                },
                                {"type": "image", "payload": {"url": "https://cdn.example/image.jpg"}},
                                {"payload": {"url": "https://cdn.example/no-type"}},
                            ],
                        },
                    }
                ],
            }
        ],
    }
    [event] = parse_meta_webhook(payload).events
    assert event.kind == "story_mention"
    assert event.event_id == "mid.story.1"
    assert event.story_url == "https://lookaside.fbsbx.com/ig_messaging_cdn/?asset_id=1"
    assert event.text == ""
    assert event.attachments == [
        Attachment(type="story_mention", url="https://lookaside.fbsbx.com/ig_messaging_cdn/?asset_id=1"),
        Attachment(type="image", url="https://cdn.example/image.jpg"),
    ]


def test_instagram_referral_from_ig_me_link() -> None:
    payload = {
        "object": "instagram",
        "entry": [
            {
                "id": IG_ACCOUNT,
                "time": 1718000002000,
                "messaging": [
                    {
                        "sender": {"id": IGSID_A},
                        "recipient": {"id": IG_ACCOUNT},
                        "timestamp": 1718000002000,
                        "referral": {"ref": "spring_promo", "source": "SHORTLINKS", "type": "OPEN_THREAD"},
                    }
                ],
            }
        ],
    }
    [event] = parse_meta_webhook(payload).events
    assert event.kind == "referral"
    assert event.ref == "spring_promo"
    assert event.event_id == f"referral:{IGSID_A}:1718000002000"


def _ig_comment(value: dict, *, field: str = "comments", entry_id: str = IG_ACCOUNT, time: int = 1718000007000):
    return {"object": "instagram", "entry": [{"id": entry_id, "time": time, "changes": [{"field": field, "value": value}]}]}


COMMENT_VALUE = {
    "from": {"id": IGSID_A, "username": "ana.l"},
    "media": {"id": "18000000000000002", "media_product_type": "REELS"},
    "id": "17800000000000010",
    "text": "Send me the LINK",
}


def test_instagram_comment_event() -> None:
    [event] = parse_meta_webhook(_ig_comment(copy.deepcopy(COMMENT_VALUE))).events
    assert event.kind == "comment"
    assert event.platform == "instagram" and event.account_id == IG_ACCOUNT
    assert event.event_id == "comment:17800000000000010"
    assert (event.sender_id, event.username, event.text) == (IGSID_A, "ana.l", "Send me the LINK")
    assert (event.comment_id, event.media_id) == ("17800000000000010", "18000000000000002")
    assert event.is_top_level_comment is True
    assert event.timestamp_ms == 1718000007000
    assert event.story_url == "" and event.ref == "" and event.payload == ""


def test_instagram_entry_time_in_seconds_is_normalised_and_live_comments_count() -> None:
    [event] = parse_meta_webhook(_ig_comment(copy.deepcopy(COMMENT_VALUE), time=1718000007)).events
    assert event.timestamp_ms == 1718000007000
    [live] = parse_meta_webhook(_ig_comment(copy.deepcopy(COMMENT_VALUE), field="live_comments")).events
    assert live.kind == "comment" and live.comment_id == "17800000000000010"


def test_reply_to_a_comment_is_not_top_level() -> None:
    value = dict(copy.deepcopy(COMMENT_VALUE), parent_id="17800000000000001")
    [event] = parse_meta_webhook(_ig_comment(value)).events
    assert event.kind == "comment" and event.is_top_level_comment is False


def test_own_and_broken_instagram_comments_are_ignored() -> None:
    own = dict(copy.deepcopy(COMMENT_VALUE), **{"from": {"id": IG_ACCOUNT, "username": "acme"}})
    result = parse_meta_webhook(_ig_comment(own))
    assert result.events == []
    assert result.ignored == [("17800000000000010", "own comment")]

    no_from = {k: v for k, v in COMMENT_VALUE.items() if k != "from"}
    assert parse_meta_webhook(_ig_comment(no_from)).ignored == [("17800000000000010", "comment without from.id")]
    no_id = {k: v for k, v in COMMENT_VALUE.items() if k != "id"}
    assert parse_meta_webhook(_ig_comment(no_id)).ignored == [("?", "comment without id")]


def test_mentions_and_other_change_fields_are_ignored_with_a_reason() -> None:
    mention = _ig_comment({"media_id": "18000000000000003", "comment_id": "17800000000000099"}, field="mentions")
    result = parse_meta_webhook(mention)
    assert result.events == []
    assert result.ignored == [("17800000000000099", "mention in comment/caption not handled")]
    other = parse_meta_webhook(_ig_comment({"id": "1"}, field="story_insights"))
    assert other.ignored == [("1", "changes field 'story_insights' not handled yet")]
    bad = parse_meta_webhook({"object": "instagram", "entry": [{"id": IG_ACCOUNT, "changes": ["x"]}]})
    assert bad.ignored == [("?", "changes item is not an object")]


def test_story_reply_is_a_message_with_the_story_url() -> None:
    payload = {
        "object": "instagram",
        "entry": [
            {
                "id": IG_ACCOUNT,
                "time": 1718000008000,
                "messaging": [
                    {
                        "sender": {"id": IGSID_A},
                        "recipient": {"id": IG_ACCOUNT},
                        "timestamp": 1718000008000,
                        "message": {
                            "mid": "mid.storyreply.1",
                            "text": "Love this! price?",
                            "reply_to": {
                                "story": {
                                    "url": "https://lookaside.fbsbx.com/ig_messaging_cdn/?asset_id=2",
                                    "id": "17900000000000001",
                                }
                            },
                        },
                    },
                    {
                        # A reply to an earlier message is not a story reply.
                        "sender": {"id": IGSID_A},
                        "recipient": {"id": IG_ACCOUNT},
                        "timestamp": 1718000008001,
                        "message": {"mid": "mid.reply.2", "text": "this one", "reply_to": {"mid": "mid.old"}},
                    },
                ],
            }
        ],
    }
    story, reply = parse_meta_webhook(payload).events
    assert story.kind == "message" and story.event_id == "mid.storyreply.1"
    assert story.text == "Love this! price?"
    assert story.story_url == "https://lookaside.fbsbx.com/ig_messaging_cdn/?asset_id=2"
    assert reply.kind == "message" and reply.story_url == ""


def test_referral_inside_a_message_keeps_the_message_kind() -> None:
    payload = {
        "object": "page",
        "entry": [
            {
                "id": "104512345678901",
                "time": 1718000009000,
                "messaging": [
                    {
                        "sender": {"id": "5432109876543210"},
                        "recipient": {"id": "104512345678901"},
                        "timestamp": 1718000009000,
                        "message": {
                            "mid": "m_ref1",
                            "text": "hi",
                            "referral": {"ref": "summer_sale", "source": "SHORTLINKS", "type": "OPEN_THREAD"},
                        },
                    },
                    {
                        "sender": {"id": "5432109876543210"},
                        "recipient": {"id": "104512345678901"},
                        "timestamp": 1718000009001,
                        "referral": {"ref": "winter", "source": "SHORTLINKS", "type": "OPEN_THREAD"},
                        "postback": {"mid": "m_pb1", "title": "Get Started", "payload": "GET_STARTED"},
                    },
                ],
            }
        ],
    }
    message, postback = parse_meta_webhook(payload).events
    assert (message.kind, message.ref, message.text) == ("message", "summer_sale", "hi")
    assert (postback.kind, postback.ref, postback.payload) == ("postback", "winter", "GET_STARTED")


PAGE_ID = "104512345678901"
PSID = "5432109876543210"
POST_ID = f"{PAGE_ID}_900000000000001"


def _page_feed(value: dict, *, time: int = 1718000010) -> dict:
    return {"object": "page", "entry": [{"id": PAGE_ID, "time": time, "changes": [{"field": "feed", "value": value}]}]}


def _feed_comment(**changes) -> dict:
    value = {
        "from": {"id": PSID, "name": "Ana Maria Lima"},
        "post": {"status_type": "added_photos", "is_published": True, "id": POST_ID},
        "message": "Interested! info please",
        "post_id": POST_ID,
        "comment_id": "900000000000001_700000000000001",
        "created_time": 1718000010,
        "item": "comment",
        "parent_id": POST_ID,
        "verb": "add",
    }
    value.update(changes)
    return value


def test_page_feed_comment_add() -> None:
    [event] = parse_meta_webhook(_page_feed(_feed_comment())).events
    assert event.kind == "comment" and event.platform == "messenger" and event.account_id == PAGE_ID
    assert event.event_id == "comment:900000000000001_700000000000001"
    assert event.comment_id == "900000000000001_700000000000001"
    assert event.media_id == POST_ID
    assert event.sender_id == PSID
    assert (event.first_name, event.last_name) == ("Ana", "Maria Lima")
    assert event.text == "Interested! info please"
    assert event.is_top_level_comment is True
    assert event.timestamp_ms == 1718000010000  # created_time is in seconds

    # No parent_id at all: top level too. A reply to another comment: not top level.
    no_parent = {k: v for k, v in _feed_comment().items() if k != "parent_id"}
    assert parse_meta_webhook(_page_feed(no_parent)).events[0].is_top_level_comment is True
    reply = _feed_comment(parent_id="900000000000001_700000000000000")
    assert parse_meta_webhook(_page_feed(reply)).events[0].is_top_level_comment is False


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"verb": "edited"}, "comment edited"),
        ({"verb": "remove"}, "comment deleted"),
        ({"verb": "hide"}, "comment verb 'hide' not handled"),
        ({"from": {"id": PAGE_ID, "name": "Acme"}}, "own comment"),
        ({"from": {}}, "comment without from.id"),
    ],
)
def test_page_feed_comment_edits_removals_and_own_comments_are_ignored(changes: dict, reason: str) -> None:
    result = parse_meta_webhook(_page_feed(_feed_comment(**changes)))
    assert result.events == []
    assert result.ignored == [("900000000000001_700000000000001", reason)]


def test_page_feed_other_items_are_ignored() -> None:
    reaction = {"item": "reaction", "verb": "add", "post_id": POST_ID, "reaction_type": "like", "from": {"id": PSID}}
    result = parse_meta_webhook(_page_feed(reaction))
    assert result.events == [] and result.ignored == [(POST_ID, "feed item 'reaction' not handled")]


def test_sandbox_payload_builders_parse() -> None:
    from sandbox import payloads

    [ig] = parse_meta_webhook(
        payloads.instagram_comment(IG_ACCOUNT, IGSID_A, "link?", media_id="m1", comment_id="17800000000000001",
                                   username="ana")
    ).events
    assert (ig.kind, ig.comment_id, ig.media_id, ig.username, ig.is_top_level_comment) == (
        "comment", "17800000000000001", "m1", "ana", True
    )
    [ig_reply] = parse_meta_webhook(
        payloads.instagram_comment(IG_ACCOUNT, IGSID_A, "me too", media_id="m1", parent_id="17800000000000001")
    ).events
    assert ig_reply.is_top_level_comment is False and ig_reply.comment_id

    [fb] = parse_meta_webhook(
        payloads.page_comment(PAGE_ID, PSID, "info", post_id=POST_ID, comment_id="900000000000001_700000000000002", name="Ana Lima")
    ).events
    assert (fb.kind, fb.comment_id, fb.media_id, fb.first_name, fb.is_top_level_comment) == (
        "comment", "900000000000001_700000000000002", POST_ID, "Ana", True
    )
    removed = parse_meta_webhook(payloads.page_comment(PAGE_ID, PSID, "", post_id=POST_ID, verb="remove"))
    assert removed.events == [] and removed.ignored[0][1] == "comment deleted"

    url = "https://lookaside.fbsbx.com/ig_messaging_cdn/?asset_id=3"
    hook = payloads.instagram_webhook(
        {IG_ACCOUNT: [payloads.story_reply(IG_ACCOUNT, IGSID_A, "wow", url), payloads.story_mention(IG_ACCOUNT, IGSID_A, url)]}
    )
    reply, mention = parse_meta_webhook(hook).events
    assert (reply.kind, reply.text, reply.story_url) == ("message", "wow", url)
    assert (mention.kind, mention.story_url, mention.text) == ("story_mention", url, "")

MESSENGER_WEBHOOK = {
    "object": "page",
    "entry": [
        {
            "id": PAGE_ID,
            "time": 1718000003000,
            "messaging": [
                {
                    "sender": {"id": PSID},
                    "recipient": {"id": PAGE_ID},
                    "timestamp": 1718000003000,
                    "message": {"mid": "m_AbCdEf123", "text": "hello"},
                },
                {
                    # Get Started button opened from an m.me link: referral inside the postback.
                    "sender": {"id": PSID},
                    "recipient": {"id": PAGE_ID},
                    "timestamp": 1718000003100,
                    "postback": {
                        "title": "Get Started",
                        "payload": "GET_STARTED",
                        "referral": {"ref": "fb_ad_42", "source": "SHORTLINKS", "type": "OPEN_THREAD"},
                    },
                },
                {
                    "sender": {"id": PSID},
                    "recipient": {"id": PAGE_ID},
                    "timestamp": 1718000003200,
                    "read": {"watermark": 1718000003150},
                },
                {
                    "sender": {"id": PSID},
                    "recipient": {"id": PAGE_ID},
                    "timestamp": 1718000003300,
                    "delivery": {"mids": ["m_AbCdEf123"], "watermark": 1718000003250},
                },
            ],
        }
    ],
}


def test_messenger_page_webhook() -> None:
    result = parse_meta_webhook(copy.deepcopy(MESSENGER_WEBHOOK))
    assert result.object == "page"
    assert [e.kind for e in result.events] == ["message", "postback", "seen"]
    assert all(e.platform == "messenger" and e.account_id == PAGE_ID for e in result.events)
    message, postback, seen = result.events
    assert message.event_id == "m_AbCdEf123" and message.text == "hello"
    # No mid on this postback: a synthesized, stable id.
    assert postback.event_id == f"postback:{PSID}:1718000003100"
    assert postback.payload == "GET_STARTED"
    assert postback.ref == "fb_ad_42"
    assert seen.event_id == f"seen:{PSID}:1718000003200"
    [(ignored_id, reason)] = result.ignored
    assert ignored_id == "?"
    assert reason.startswith("unhandled messaging item with keys") and "delivery" in reason


def test_thousand_entries_give_thousand_events() -> None:
    payload = {
        "object": "instagram",
        "entry": [
            {
                "id": IG_ACCOUNT,
                "time": 1718000000000 + i,
                "messaging": [
                    {
                        "sender": {"id": str(9000000000000000 + i)},
                        "recipient": {"id": IG_ACCOUNT},
                        "timestamp": 1718000000000 + i,
                        "message": {"mid": f"mid.{i}", "text": f"message {i}"},
                    }
                ],
            }
            for i in range(1000)
        ],
    }
    result = parse_meta_webhook(payload)
    assert len(result.events) == 1000
    assert result.ignored == []
    assert len({e.event_id for e in result.events}) == 1000
    assert result.events[-1].text == "message 999"


@pytest.mark.parametrize(
    "payload",
    [
        None,
        [],
        "object=instagram",
        42,
        {"object": "instagram", "entry": {"id": "1"}},
        {"object": "page", "entry": "nope"},
    ],
)
def test_malformed_meta_top_level_raises(payload: object) -> None:
    with pytest.raises(MalformedPayload):
        parse_meta_webhook(payload)


def test_malformed_payload_is_a_value_error() -> None:
    assert issubclass(MalformedPayload, ValueError)


def test_unsupported_object_is_ignored() -> None:
    result = parse_meta_webhook(
        {"object": "whatsapp_business_account", "entry": [{"id": "1", "changes": []}]}
    )
    assert result.events == []
    assert result.ignored == [("?", "unsupported object 'whatsapp_business_account'")]


def test_bad_items_among_good_ones_are_ignored_not_fatal() -> None:
    good = {
        "sender": {"id": IGSID_A},
        "recipient": {"id": IG_ACCOUNT},
        "timestamp": 1718000004000,
        "message": {"mid": "mid.good", "text": "ok"},
    }
    payload = {
        "object": "instagram",
        "entry": [
            "not an entry",
            {
                "id": IG_ACCOUNT,
                "time": 1718000004000,
                "messaging": [
                    "garbage",
                    {"recipient": {"id": IG_ACCOUNT}, "timestamp": 1, "message": {"mid": "mid.nosender"}},
                    {"sender": {"id": IGSID_A}, "timestamp": 2, "message": {"text": "no mid"}},
                    {
                        "sender": {"id": IGSID_A},
                        "timestamp": 3,
                        "message": {"mid": "mid.del", "is_deleted": True},
                    },
                    {
                        "sender": {"id": IGSID_A},
                        "timestamp": 4,
                        "message": {"mid": "mid.u", "is_unsupported": True},
                    },
                    good,
                ],
            },
            {"id": IG_ACCOUNT, "messaging": {"not": "a list"}},
            {"id": IG_ACCOUNT, "messaging": [dict(good, message={"mid": "mid.good2", "text": "ok 2"})]},
        ],
    }
    result = parse_meta_webhook(payload)
    assert [e.event_id for e in result.events] == ["mid.good", "mid.good2"]
    reasons = dict(result.ignored)
    assert reasons["mid.nosender"] == "messaging item without sender.id"
    assert reasons["mid.del"] == "deleted message"
    assert reasons["mid.u"] == "unsupported message type"
    all_reasons = [reason for _, reason in result.ignored]
    assert "message without mid" in all_reasons
    assert "entry is not an object" in all_reasons
    assert "messaging item is not an object" in all_reasons
    assert any("'messaging' is not a list" in r for r in all_reasons)
    assert len(result.ignored) == 7


def test_ids_are_always_strings() -> None:
    payload = {
        "object": "page",
        "entry": [
            {
                "id": 104512345678901,
                "messaging": [
                    {
                        "sender": {"id": 5432109876543210},
                        "recipient": {"id": 104512345678901},
                        "timestamp": 1718000005000,
                        "message": {"mid": "m_1", "text": "hi"},
                    }
                ],
            }
        ],
    }
    [event] = parse_meta_webhook(payload).events
    assert event.account_id == "104512345678901"
    assert event.sender_id == "5432109876543210"


def test_missing_entry_is_an_empty_result() -> None:
    result = parse_meta_webhook({"object": "instagram"})
    assert result.events == [] and result.ignored == []


# ------------------------------------------------------------------- Telegram

BOT_ID = "7000000001"

TG_PRIVATE_MESSAGE = {
    "update_id": 912345678,
    "message": {
        "message_id": 52,
        "from": {
            "id": 123456789,
            "is_bot": False,
            "first_name": "Ada",
            "last_name": "Lovelace",
            "username": "ada_l",
            "language_code": "en",
        },
        "chat": {
            "id": 123456789,
            "first_name": "Ada",
            "last_name": "Lovelace",
            "username": "ada_l",
            "type": "private",
        },
        "date": 1718000006,
        "text": "/start promo",
        "entities": [{"offset": 0, "length": 6, "type": "bot_command"}],
    },
}


def test_telegram_private_message() -> None:
    result = parse_telegram_update(copy.deepcopy(TG_PRIVATE_MESSAGE), BOT_ID)
    assert result.object == "telegram"
    assert result.ignored == []
    [event] = result.events
    assert event.event_id == "tg:912345678"
    assert event.platform == "telegram"
    assert event.account_id == BOT_ID
    assert event.sender_id == "123456789"
    assert event.kind == "message"
    assert event.text == "/start promo"
    assert (event.first_name, event.last_name, event.username) == ("Ada", "Lovelace", "ada_l")
    assert event.timestamp_ms == 1718000006000
    assert event.attachments == []


def test_telegram_photo_with_caption() -> None:
    update = {
        "update_id": 912345679,
        "message": {
            "message_id": 53,
            "from": {"id": 123456789, "is_bot": False, "first_name": "Ada"},
            "chat": {"id": 123456789, "first_name": "Ada", "type": "private"},
            "date": 1718000007,
            "photo": [
                {
                    "file_id": "AgACAgIAAxkBAAIB",
                    "file_unique_id": "AQADs",
                    "file_size": 1234,
                    "width": 90,
                    "height": 90,
                },
                {
                    "file_id": "AgACAgIAAxkBAAIC",
                    "file_unique_id": "AQADt",
                    "file_size": 9999,
                    "width": 800,
                    "height": 800,
                },
            ],
            "caption": "my receipt",
        },
    }
    [event] = parse_telegram_update(update, BOT_ID).events
    assert event.text == "my receipt"
    assert event.attachments == [Attachment(type="photo", url="")]
    assert event.last_name == "" and event.username == ""


def test_telegram_callback_query() -> None:
    update = {
        "update_id": 912345680,
        "callback_query": {
            "id": "4382bfdwdsb323b2d9",
            "from": {"id": 123456789, "is_bot": False, "first_name": "Ada", "username": "ada_l"},
            "message": {
                "message_id": 54,
                "from": {
                    "id": 7000000001,
                    "is_bot": True,
                    "first_name": "Vectory",
                    "username": "vectory_bot",
                },
                "chat": {"id": 123456789, "first_name": "Ada", "type": "private"},
                "date": 1718000008,
                "text": "Pick one",
                "reply_markup": {"inline_keyboard": [[{"text": "Guide", "callback_data": "GET_GUIDE"}]]},
            },
            "chat_instance": "-7365412365478965",
            "data": "GET_GUIDE",
        },
    }
    [event] = parse_telegram_update(update, BOT_ID).events
    assert event.event_id == "tg:912345680"
    assert event.kind == "postback"
    assert event.payload == "GET_GUIDE"
    assert event.callback_query_id == "4382bfdwdsb323b2d9"
    assert event.sender_id == "123456789"
    assert event.first_name == "Ada" and event.username == "ada_l"


def test_telegram_callback_without_message_uses_from_id() -> None:
    update = {
        "update_id": 912345681,
        "callback_query": {
            "id": "99",
            "from": {"id": 555, "is_bot": False, "first_name": "Bo"},
            "inline_message_id": "BAAAAGxxx",
            "chat_instance": "1",
            "data": "X",
        },
    }
    [event] = parse_telegram_update(update, BOT_ID).events
    assert event.sender_id == "555"


def test_telegram_group_chat_is_ignored() -> None:
    update = {
        "update_id": 912345682,
        "message": {
            "message_id": 7,
            "from": {"id": 123456789, "is_bot": False, "first_name": "Ada"},
            "chat": {"id": -1001234567890, "title": "Fans", "type": "group"},
            "date": 1718000009,
            "text": "hello group",
        },
    }
    result = parse_telegram_update(update, BOT_ID)
    assert result.events == []
    assert result.ignored == [("tg:912345682", "chat type 'group' not handled")]


def test_telegram_edited_message_is_ignored() -> None:
    update = {
        "update_id": 912345683,
        "edited_message": {
            "message_id": 52,
            "from": {"id": 123456789, "is_bot": False, "first_name": "Ada"},
            "chat": {"id": 123456789, "type": "private"},
            "date": 1718000006,
            "edit_date": 1718000010,
            "text": "/start promo2",
        },
    }
    result = parse_telegram_update(update, BOT_ID)
    assert result.events == []
    assert result.ignored == [("tg:912345683", "edited message")]


def test_telegram_other_update_types_and_bots_are_ignored() -> None:
    member = {
        "update_id": 912345684,
        "my_chat_member": {
            "chat": {"id": 123456789, "type": "private"},
            "from": {"id": 123456789, "is_bot": False, "first_name": "Ada"},
            "date": 1718000011,
            "old_chat_member": {"status": "member"},
            "new_chat_member": {"status": "kicked"},
        },
    }
    result = parse_telegram_update(member, BOT_ID)
    assert result.events == []
    [(event_id, reason)] = result.ignored
    assert event_id == "tg:912345684" and "my_chat_member" in reason

    from_bot = copy.deepcopy(TG_PRIVATE_MESSAGE)
    from_bot["message"]["from"]["is_bot"] = True
    result = parse_telegram_update(from_bot, BOT_ID)
    assert result.events == []
    assert result.ignored == [("tg:912345678", "message from a bot")]


@pytest.mark.parametrize(
    "update",
    [None, [], "x", {}, {"update_id": "12"}, {"update_id": None, "message": {}}, {"update_id": True}],
)
def test_malformed_telegram_update_raises(update: object) -> None:
    with pytest.raises(MalformedPayload):
        parse_telegram_update(update, BOT_ID)


# ------------------------------------------------------------------- bounded texts


def _one(payload: dict, bot_id: str = BOT_ID):
    result = parse_telegram_update(payload, bot_id) if "update_id" in payload else parse_meta_webhook(payload)
    assert result.ignored == [], result.ignored
    [event] = result.events
    return event


def test_dm_texts_are_cut_to_the_platforms_maximums_on_a_character_boundary() -> None:
    from sandbox import payloads

    # Instagram counts 1,000 bytes of UTF-8: "é" (2 bytes) at bytes 999-1000 does not fit.
    text = "a" * 999 + "é" + "rest"
    event = _one(payloads.instagram_webhook({IG_ACCOUNT: [payloads.instagram_dm(IG_ACCOUNT, IGSID_A, text)]}))
    assert event.text == "a" * 999 and event.truncated
    emoji = "😀" * 300  # 1,200 bytes: 250 emoji fit
    event = _one(payloads.instagram_webhook({IG_ACCOUNT: [payloads.instagram_dm(IG_ACCOUNT, IGSID_A, emoji)]}))
    assert event.text == "😀" * 250 and len(event.text.encode()) == 1000 and event.truncated
    # Messenger counts 2,000 characters, Telegram 4,096 (a caption too).
    event = _one(payloads.page_webhook({"1": [payloads.instagram_dm("1", IGSID_A, "é" * 2500)]}))
    assert event.text == "é" * 2000 and event.truncated
    event = _one(payloads.telegram_message_update(1, 42, "ж" * 5000))
    assert event.text == "ж" * 4096 and event.truncated
    # Texts at the maximum are untouched.
    for payload in (
        payloads.instagram_webhook({IG_ACCOUNT: [payloads.instagram_dm(IG_ACCOUNT, IGSID_A, "é" * 500)]}),
        payloads.page_webhook({"1": [payloads.instagram_dm("1", IGSID_A, "é" * 2000)]}),
        payloads.telegram_message_update(2, 42, "ж" * 4096),
    ):
        event = _one(payload)
        assert not event.truncated and len(event.text) in (500, 2000, 4096)


def test_every_other_text_of_an_event_is_bounded_too() -> None:
    from core import inbound
    from sandbox import payloads

    def ig(item: dict):
        return _one(payloads.instagram_webhook({IG_ACCOUNT: [item]}))

    event = ig(payloads.instagram_dm(IG_ACCOUNT, IGSID_A, "hi", quick_reply_payload="P" * 5000))
    assert event.payload == "P" * 1000 and event.truncated
    event = ig(payloads.postback(IG_ACCOUNT, IGSID_A, "Q" * 5000, title="T" * 5000))
    assert (event.payload, event.text, event.truncated) == ("Q" * 1000, "T" * 1000, True)
    event = ig(payloads.referral(IG_ACCOUNT, IGSID_A, "r" * 10_000))
    assert event.ref == "r" * 2083 and event.truncated
    long_url = "https://cdn.example/" + "x" * 10_000
    event = ig(payloads.instagram_dm(IG_ACCOUNT, IGSID_A, attachments=[("image", long_url)] + [("image", "u")] * 99))
    assert len(event.attachments) == inbound.ATTACHMENTS_MAX and event.truncated
    assert event.attachments[0] == Attachment(type="image")  # a cut URL would point nowhere: dropped
    event = ig(payloads.story_reply(IG_ACCOUNT, IGSID_A, "nice", long_url))
    assert event.story_url == "" and event.truncated
    event = _one(payloads.instagram_comment(IG_ACCOUNT, IGSID_B, "c" * 9000, media_id="1"))
    assert event.text == "c" * 2200 and event.truncated
    event = _one(payloads.page_comment("1", IGSID_B, "c" * 9000, post_id="1_2"))
    assert event.text == "c" * 8000 and event.truncated
    event = _one(payloads.telegram_callback_update(3, 42, "d" * 100))
    assert event.payload == "d" * 64 and event.truncated
    event = _one(payloads.telegram_message_update(4, 42, "hi", first_name="F" * 1000, username="u" * 1000))
    assert (event.first_name, event.username) == ("F" * 256, "u" * 256) and event.truncated
    assert not ig(payloads.instagram_dm(IG_ACCOUNT, IGSID_A, "hi", quick_reply_payload="OK")).truncated


def test_an_id_longer_than_any_platform_id_is_not_one_and_a_huge_timestamp_is_no_time() -> None:
    from sandbox import payloads

    result = parse_meta_webhook(payloads.instagram_webhook(
        {IG_ACCOUNT: [payloads.instagram_dm(IG_ACCOUNT, IGSID_A, "hi", mid="m" * 600)]}
    ))
    assert result.events == [] and result.ignored == [("?", "message without mid")]
    item = payloads.instagram_dm(IG_ACCOUNT, IGSID_A, "hi")
    item["timestamp"] = "9" * 5000  # int() refuses it: the parse must not fail
    assert _one(payloads.instagram_webhook({IG_ACCOUNT: [item]})).timestamp_ms == 0


@pytest.mark.parametrize("bad", ["..", "%2e%2e", "1/../me", "1?x", "me", "-1", "1 "])
def test_items_whose_ids_could_change_a_platform_path_are_ignored(bad: str) -> None:
    """Those ids go into the platforms' URLs (core/ids.py): such an item is
    ignored with its reason, and the batch's other items are still parsed."""
    from sandbox import payloads

    good = payloads.instagram_dm(IG_ACCOUNT, IGSID_A, "hi")
    by_sender = {"object": "instagram", "entry": [{"id": IG_ACCOUNT, "messaging": [
        payloads.instagram_dm(IG_ACCOUNT, bad, "hi"), good]}]}
    by_account = {"object": "instagram", "entry": [{"id": bad, "messaging": [good]}, {"id": IG_ACCOUNT,
                                                                                     "messaging": [good]}]}
    for hook in (by_sender, by_account):
        result = parse_meta_webhook(hook)
        assert [(e.account_id, e.sender_id) for e in result.events] == [(IG_ACCOUNT, IGSID_A)]
        assert len(result.ignored) == 1 and "is not a Meta id" in result.ignored[0][1]
    for comment in (payloads.instagram_comment(IG_ACCOUNT, IGSID_A, "x", media_id="1", comment_id=bad),
                    payloads.instagram_comment(IG_ACCOUNT, bad, "x", media_id="1"),
                    _page_feed(_feed_comment(comment_id=bad)),
                    _page_feed(_feed_comment(**{"from": {"id": bad, "name": "Ana"}}))):
        result = parse_meta_webhook(comment)
        assert result.events == [] and "is not a Meta" in result.ignored[0][1], result.ignored
    if bad != "-1":  # a group's chat id (refused for its chat type)
        update = payloads.telegram_message_update(1, 42, "hi")
        update["message"]["chat"]["id"] = bad
        result = parse_telegram_update(update, BOT_ID)
        assert result.events == [] and result.ignored == [("tg:1", "chat.id is not a Telegram chat id")]
