"""Parse platform webhooks into ``InboundEvent`` lists.

Pure functions, no I/O. One bad item never sinks a batch: it is recorded in
``ParseResult.ignored`` with a human reason and parsing goes on. Only a
malformed top level raises ``MalformedPayload``.

Meta (Instagram / Messenger): loop over every ``entry`` and every
``messaging`` and ``changes`` item (DESIGN.md §4). Echoes of our own
messages and the account's own comments are never events.

Kinds: ``message`` (``story_url`` set when it replies to a story, ``ref``
when it carries a referral), ``postback``, ``referral``, ``reaction``,
``seen``, ``story_mention`` (the CDN URL only, never the media) and
``comment`` (Instagram ``comments`` / ``live_comments``, Page ``feed``).

Telegram: one update per request; the event id is ``tg:<update_id>``.

Every text of an event is bounded (``_bounded``: the limits below), so no
event outgrows what Temporal takes in one payload. An item whose account,
sender or comment id is not of the documented shape (``core/ids.py``: those
ids go into the platforms' URLs) is ignored.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Any

from core.contracts import Attachment, InboundEvent
from core.ids import conforms

__all__ = [
    "MalformedPayload",
    "ParseResult",
    "parse_meta_webhook",
    "parse_telegram_update",
]

META_PLATFORMS = {"instagram": "instagram", "page": "messenger"}
TELEGRAM_ATTACHMENT_KEYS = ("photo", "document", "voice", "video")


class MalformedPayload(ValueError):
    """The webhook body is not shaped like the platform's webhook at all."""


@dataclass
class ParseResult:
    object: str
    events: list[InboundEvent] = field(default_factory=list)
    # (event id or "?", human reason) for each item that produced no event.
    ignored: list[tuple[str, str]] = field(default_factory=list)


class _Skip(Exception):
    """Internal: this item yields no event (id, reason)."""

    def __init__(self, event_id: str, reason: str) -> None:
        super().__init__(reason)
        self.event_id = event_id
        self.reason = reason


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


# Lone UTF-16 surrogates ("\\ud83d" alone in the JSON) cannot be encoded
# for the database: the event could not be recorded, and each retry of its
# conversation's task failed again.
SURROGATE_RE = re.compile("[\ud800-\udfff]")
# Beyond this (year 3000) a timestamp is not a time: the recording would fail.
MAX_TIMESTAMP_MS = 32_503_680_000_000


# The longest texts the platforms deliver, as (maximum, counted in bytes of
# UTF-8 rather than characters). A longer one is cut on a character boundary
# and the event marked ``truncated``: carried whole, a 2.6 MB DM outgrew
# Temporal's 2 MB payload limit and could never be handed over.
TEXT_MAX = {"instagram": (1000, True), "messenger": (2000, False), "telegram": (4096, False)}  # DMs, titles
COMMENT_MAX = {"instagram": (2200, False), "messenger": (8000, False)}
# Postback / quick-reply payloads (Meta: 1,000 characters); Telegram callback_data: 64 bytes.
PAYLOAD_MAX = {"instagram": (1000, False), "messenger": (1000, False), "telegram": (64, True)}
REF_MAX = 2083  # characters of an ig.me / m.me ``ref``
# Sane bounds where the platforms document none.
NAME_MAX = 256  # characters of a first name, last name or username (Telegram: 64, 64, 32)
URL_MAX = 4096  # characters of an attachment or story URL; a longer one is dropped (a cut URL points nowhere)
ATTACHMENTS_MAX = 50  # attachments kept per message
ID_MAX = 512  # characters of an id or attachment type; a longer value is not one


def _cut(text: str, limit: tuple[int, bool]) -> str:
    """``text`` within ``limit``, cut on a character boundary."""
    maximum, in_bytes = limit
    if not in_bytes:
        return text[:maximum]
    if len(text) * 4 <= maximum:  # no character takes more than 4 bytes
        return text
    return text.encode()[:maximum].decode(errors="ignore")  # drops only a character cut in two


def _bounded(event: InboundEvent) -> InboundEvent:
    """``event`` with every text within its bound, ``truncated`` when one was cut."""
    limits: dict[str, tuple[int, bool]] = {
        "text": (COMMENT_MAX if event.kind == "comment" else TEXT_MAX)[event.platform],
        "payload": PAYLOAD_MAX[event.platform],
        "ref": (REF_MAX, False),
        "first_name": (NAME_MAX, False),
        "last_name": (NAME_MAX, False),
        "username": (NAME_MAX, False),
    }
    changes: dict[str, Any] = {}
    for name, limit in limits.items():
        value = getattr(event, name)
        cut = _cut(value, limit)
        if cut != value:
            changes[name] = cut
    attachments = [
        a if len(a.url) <= URL_MAX else Attachment(type=a.type) for a in event.attachments[:ATTACHMENTS_MAX]
    ]
    if attachments != event.attachments:
        changes["attachments"] = attachments
    if len(event.story_url) > URL_MAX:
        changes["story_url"] = ""
    return replace(event, **changes, truncated=True) if changes else event


def _clean(text: str) -> str:
    """Text the database can store: no NUL (PostgreSQL text cannot hold
    one), lone surrogates replaced by U+FFFD."""
    if "\x00" in text:
        text = text.replace("\x00", "")
    if SURROGATE_RE.search(text):
        text = SURROGATE_RE.sub("\ufffd", text)
    return text


def _id(value: Any) -> str:
    """A platform id as a string, or "" when absent / not an id (longer than ID_MAX)."""
    if value is None or isinstance(value, bool) or isinstance(value, dict | list):
        return ""
    text = str(value)
    return _clean(text) if len(text) <= ID_MAX else ""


def _shaped(value: str, kind: str, what: str, event_id: str) -> str:
    """``value``, or ``_Skip`` when it is not of the shape of ``kind``."""
    if not conforms(value, kind):
        raise _Skip(event_id, f"{what} is not a {kind}")
    return value


def _str(value: Any) -> str:
    """A string field as the database can store it (``_clean``), or "" when
    not a string."""
    return _clean(value) if isinstance(value, str) else ""


def _int(value: Any) -> int:
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if math.isfinite(value) else 0
    if isinstance(value, str) and value.strip().isdigit() and len(value.strip()) <= 20:  # int() refuses 4,300 digits
        return int(value.strip())
    return 0


def _time_ms(value: int) -> int:
    """A timestamp in ms, or 0 (the recording then uses its own clock) when
    it is not one (negative, or past the year 3000)."""
    return value if 0 < value < MAX_TIMESTAMP_MS else 0


# --------------------------------------------------------------------------- Meta


def parse_meta_webhook(payload: Any) -> ParseResult:
    """Parse a Meta webhook body (``object`` instagram or page)."""
    if not isinstance(payload, dict):
        raise MalformedPayload("webhook body is not a JSON object")
    entries = payload.get("entry", [])
    if not isinstance(entries, list):
        raise MalformedPayload("'entry' is not a list")

    obj = payload.get("object")
    obj_name = obj if isinstance(obj, str) else repr(obj)
    result = ParseResult(object=obj_name)
    platform = META_PLATFORMS.get(obj) if isinstance(obj, str) else None
    if platform is None:
        result.ignored.append(("?", f"unsupported object '{obj_name}'"))
        return result

    for entry in entries:
        if not isinstance(entry, dict):
            result.ignored.append(("?", "entry is not an object"))
            continue
        entry_id = _id(entry.get("id"))

        messaging = entry.get("messaging", [])
        if not isinstance(messaging, list):
            result.ignored.append(("?", f"entry {entry_id or '?'}: 'messaging' is not a list"))
            messaging = []
        for item in messaging:
            try:
                result.events.append(_bounded(_meta_messaging_item(item, platform, entry_id)))
            except _Skip as skip:
                result.ignored.append((skip.event_id, skip.reason))

        changes = entry.get("changes", [])
        if not isinstance(changes, list):
            result.ignored.append(("?", f"entry {entry_id or '?'}: 'changes' is not a list"))
            changes = []
        entry_time = _timestamp_ms(entry.get("time"))
        for change in changes:
            try:
                result.events.append(_bounded(_meta_change(change, platform, entry_id, entry_time)))
            except _Skip as skip:
                result.ignored.append((skip.event_id, skip.reason))

        standby = entry.get("standby", [])
        if isinstance(standby, list):
            for item in standby:
                mid = _id(_dict(_dict(item).get("message")).get("mid")) or "?"
                result.ignored.append((mid, "standby item (handover protocol) not handled"))

    return result


def _timestamp_ms(value: Any) -> int:
    """A Meta time in milliseconds (``entry.time`` comes in ms or s, ``created_time`` in s)."""
    number = _int(value)
    if 0 < number < 100_000_000_000:  # seconds (ms values are 13 digits since 1973)
        return number * 1000
    return _time_ms(number)


def _meta_change(change: Any, platform: str, entry_id: str, entry_time: int) -> InboundEvent:
    if not isinstance(change, dict):
        raise _Skip("?", "changes item is not an object")
    field_name = _str(change.get("field")) or "?"
    value = _dict(change.get("value"))
    if platform == "instagram" and field_name in ("comments", "live_comments"):
        return _instagram_comment(value, entry_id, entry_time)
    if platform == "messenger" and field_name == "feed":
        return _page_feed_comment(value, entry_id, entry_time)
    change_id = _id(value.get("comment_id")) or _id(value.get("id")) or "?"
    if field_name == "mentions":
        raise _Skip(change_id, "mention in comment/caption not handled")
    raise _Skip(change_id, f"changes field '{field_name}' not handled yet")


def _instagram_comment(value: dict[str, Any], entry_id: str, entry_time: int) -> InboundEvent:
    comment_id = _id(value.get("id"))
    if not comment_id:
        raise _Skip("?", "comment without id")
    sender = _dict(value.get("from"))
    sender_id = _id(sender.get("id"))
    if not sender_id:
        raise _Skip(comment_id, "comment without from.id")
    if not entry_id:
        raise _Skip(comment_id, "comment without entry id")
    _ids_shaped(comment_id, sender_id, entry_id)
    if sender_id == entry_id:
        raise _Skip(comment_id, "own comment")
    return InboundEvent(
        event_id=f"comment:{comment_id}",
        platform="instagram",
        account_id=entry_id,
        sender_id=sender_id,
        kind="comment",
        text=_str(value.get("text")),
        timestamp_ms=entry_time,
        username=_str(sender.get("username")),
        comment_id=comment_id,
        media_id=_id(_dict(value.get("media")).get("id")),
        is_top_level_comment=not _id(value.get("parent_id")),
    )


def _ids_shaped(comment_id: str, sender_id: str, entry_id: str) -> None:
    _shaped(comment_id, "Meta comment id", "comment id", comment_id)
    _shaped(sender_id, "Meta id", "from.id", comment_id)
    _shaped(entry_id, "Meta id", "entry id", comment_id)


def _page_feed_comment(value: dict[str, Any], entry_id: str, entry_time: int) -> InboundEvent:
    comment_id = _id(value.get("comment_id"))
    item = _str(value.get("item")) or "?"
    if item != "comment":
        raise _Skip(_id(value.get("post_id")) or "?", f"feed item '{item}' not handled")
    if not comment_id:
        raise _Skip(_id(value.get("post_id")) or "?", "feed comment without comment_id")
    verb = _str(value.get("verb")) or "?"
    if verb == "edited":
        raise _Skip(comment_id, "comment edited")
    if verb == "remove":
        raise _Skip(comment_id, "comment deleted")
    if verb != "add":
        raise _Skip(comment_id, f"comment verb '{verb}' not handled")
    sender = _dict(value.get("from"))
    sender_id = _id(sender.get("id"))
    if not sender_id:
        raise _Skip(comment_id, "comment without from.id")
    if not entry_id:
        raise _Skip(comment_id, "comment without entry id")
    _ids_shaped(comment_id, sender_id, entry_id)
    if sender_id == entry_id:
        raise _Skip(comment_id, "own comment")
    post_id = _id(value.get("post_id"))
    parent_id = _id(value.get("parent_id"))
    first_name, _, last_name = " ".join(_str(sender.get("name")).split()).partition(" ")
    return InboundEvent(
        event_id=f"comment:{comment_id}",
        platform="messenger",
        account_id=entry_id,
        sender_id=sender_id,
        kind="comment",
        text=_str(value.get("message")),
        timestamp_ms=_timestamp_ms(value.get("created_time")) or entry_time,
        first_name=first_name,
        last_name=last_name,
        comment_id=comment_id,
        media_id=post_id,
        is_top_level_comment=not parent_id or parent_id == post_id,
    )


def _meta_messaging_item(item: Any, platform: str, entry_id: str) -> InboundEvent:
    if not isinstance(item, dict):
        raise _Skip("?", "messaging item is not an object")

    message = item.get("message")
    postback = item.get("postback")
    guess_id = _id(_dict(message).get("mid")) or _id(_dict(postback).get("mid")) or "?"

    sender_id = _id(_dict(item.get("sender")).get("id"))
    if not sender_id:
        raise _Skip(guess_id, "messaging item without sender.id")
    account_id = entry_id or _id(_dict(item.get("recipient")).get("id"))
    if not account_id:
        raise _Skip(guess_id, "messaging item without entry id or recipient.id")
    _shaped(sender_id, "Meta id", "sender.id", guess_id)
    _shaped(account_id, "Meta id", "entry id" if entry_id else "recipient.id", guess_id)
    timestamp = _time_ms(_int(item.get("timestamp")))

    def event(event_id: str, kind: str, **kwargs: Any) -> InboundEvent:
        return InboundEvent(
            event_id=event_id,
            platform=platform,
            account_id=account_id,
            sender_id=sender_id,
            kind=kind,
            timestamp_ms=timestamp,
            **kwargs,
        )

    if isinstance(message, dict):
        mid = _id(message.get("mid"))
        if message.get("is_echo"):
            raise _Skip(mid or "?", "echo of our own message")
        if message.get("is_deleted"):
            raise _Skip(mid or "?", "deleted message")
        if message.get("is_unsupported"):
            raise _Skip(mid or "?", "unsupported message type")
        if not mid:
            raise _Skip("?", "message without mid")
        attachments = []
        raw_attachments = message.get("attachments")
        for att in raw_attachments if isinstance(raw_attachments, list) else []:
            att = _dict(att)
            att_type = _id(att.get("type")) if isinstance(att.get("type"), str) else ""
            if not att_type:
                continue
            # Store the CDN URL only, never the media (DESIGN.md §4).
            attachments.append(Attachment(type=att_type, url=_str(_dict(att.get("payload")).get("url"))))
        ref = _str(_dict(message.get("referral")).get("ref")) or _str(_dict(item.get("referral")).get("ref"))
        mention = next((a for a in attachments if a.type == "story_mention"), None)
        if mention is not None:
            return event(
                mid,
                "story_mention",
                text=_str(message.get("text")),
                attachments=attachments,
                story_url=mention.url,
                ref=ref,
            )
        return event(
            mid,
            "message",
            text=_str(message.get("text")),
            payload=_str(_dict(message.get("quick_reply")).get("payload")),
            attachments=attachments,
            ref=ref,
            story_url=_str(_dict(_dict(message.get("reply_to")).get("story")).get("url")),
        )

    if isinstance(postback, dict):
        mid = _id(postback.get("mid"))
        return event(
            mid or f"postback:{sender_id}:{timestamp}",
            "postback",
            payload=_str(postback.get("payload")),
            text=_str(postback.get("title")),
            ref=_str(_dict(postback.get("referral")).get("ref")) or _str(_dict(item.get("referral")).get("ref")),
        )

    referral = item.get("referral")
    if isinstance(referral, dict):
        return event(f"referral:{sender_id}:{timestamp}", "referral", ref=_str(referral.get("ref")))

    reaction = item.get("reaction")
    if isinstance(reaction, dict):
        return event(
            f"reaction:{_id(reaction.get('mid'))}:{sender_id}:{timestamp}",
            "reaction",
            text=_str(reaction.get("emoji")) or _str(reaction.get("reaction")),
            payload=_str(reaction.get("action")),
        )

    if isinstance(item.get("read"), dict):
        return event(f"seen:{sender_id}:{timestamp}", "seen")

    keys = sorted(k for k in item if k not in ("sender", "recipient", "timestamp"))
    raise _Skip(guess_id, f"unhandled messaging item with keys {', '.join(keys) or '(none)'}")


# ----------------------------------------------------------------------- Telegram


def parse_telegram_update(update: Any, bot_id: str) -> ParseResult:
    """Parse one Telegram ``Update`` sent to the bot ``bot_id``."""
    if not isinstance(update, dict):
        raise MalformedPayload("update is not a JSON object")
    update_id = update.get("update_id")
    if not isinstance(update_id, int) or isinstance(update_id, bool):
        raise MalformedPayload("update without an integer 'update_id'")

    result = ParseResult(object="telegram")
    event_id = f"tg:{update_id}"
    try:
        if "message" in update:
            result.events.append(_bounded(_telegram_message(update["message"], event_id, bot_id)))
        elif "callback_query" in update:
            result.events.append(_bounded(_telegram_callback(update["callback_query"], event_id, bot_id)))
        elif "edited_message" in update:
            raise _Skip(event_id, "edited message")
        else:
            kinds = [k for k in update if k != "update_id"]
            raise _Skip(event_id, f"update type '{kinds[0] if kinds else '(none)'}' not handled")
    except _Skip as skip:
        result.ignored.append((skip.event_id, skip.reason))
    return result


def _telegram_names(user: dict[str, Any]) -> dict[str, str]:
    return {
        "first_name": _str(user.get("first_name")),
        "last_name": _str(user.get("last_name")),
        "username": _str(user.get("username")),
    }


def _private_chat_id(chat: Any, event_id: str) -> str:
    chat = _dict(chat)
    chat_type = _str(chat.get("type")) or "?"
    if chat_type != "private":
        raise _Skip(event_id, f"chat type '{chat_type}' not handled")
    chat_id = _id(chat.get("id"))
    if not chat_id:
        raise _Skip(event_id, "chat without id")
    return _shaped(chat_id, "Telegram chat id", "chat.id", event_id)


def _telegram_message(message: Any, event_id: str, bot_id: str) -> InboundEvent:
    if not isinstance(message, dict):
        raise _Skip(event_id, "message is not an object")
    sender = _dict(message.get("from"))
    if sender.get("is_bot"):
        raise _Skip(event_id, "message from a bot")
    chat_id = _private_chat_id(message.get("chat"), event_id)
    attachments = [Attachment(type=key) for key in TELEGRAM_ATTACHMENT_KEYS if message.get(key)]
    return InboundEvent(
        event_id=event_id,
        platform="telegram",
        account_id=str(bot_id),
        sender_id=chat_id,
        kind="message",
        text=_str(message.get("text")) or _str(message.get("caption")),
        attachments=attachments,
        timestamp_ms=_time_ms(_int(message.get("date")) * 1000),
        **_telegram_names(sender),
    )


def _telegram_callback(callback: Any, event_id: str, bot_id: str) -> InboundEvent:
    if not isinstance(callback, dict):
        raise _Skip(event_id, "callback_query is not an object")
    sender = _dict(callback.get("from"))
    if sender.get("is_bot"):
        raise _Skip(event_id, "callback from a bot")
    message = callback.get("message")
    if isinstance(message, dict) and isinstance(message.get("chat"), dict):
        sender_id = _private_chat_id(message["chat"], event_id)
    else:
        sender_id = _id(sender.get("id"))
    if not sender_id:
        raise _Skip(event_id, "callback_query without a chat or sender id")
    _shaped(sender_id, "Telegram chat id", "from.id", event_id)
    callback_id = _id(callback.get("id"))
    if not callback_id:
        raise _Skip(event_id, "callback_query without id")
    if "data" not in callback:
        raise _Skip(event_id, "callback_query without data (game callbacks are not handled)")
    return InboundEvent(
        event_id=event_id,
        platform="telegram",
        account_id=str(bot_id),
        sender_id=sender_id,
        kind="postback",
        payload=_str(callback.get("data")),
        callback_query_id=callback_id,
        **_telegram_names(sender),
    )
