"""Builders of inbound webhook payloads in the platforms' real formats (Meta and Telegram).

Used by tests and by ``python -m sandbox.simulate``.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterable, Mapping
from typing import Any

from core.crypto import meta_signature


def _now_ms() -> int:
    return int(time.time() * 1000)


def _mid() -> str:
    return "aWdf" + secrets.token_hex(16)


def _attachment(item: Any) -> dict[str, Any]:
    if isinstance(item, Mapping):
        return dict(item)
    type_, url = item
    return {"type": type_, "payload": {"url": url}}


def instagram_dm(
    account_id: str,
    sender_id: str,
    text: str = "",
    *,
    mid: str | None = None,
    quick_reply_payload: str | None = None,
    timestamp_ms: int | None = None,
    attachments: Iterable[Mapping[str, Any] | tuple[str, str]] | None = None,
    is_echo: bool = False,
) -> dict[str, Any]:
    """One ``messaging`` item carrying a message (Instagram or Messenger: the format is the same).

    ``attachments`` items are either full attachment dicts or ``(type, url)`` pairs. For an echo
    (a message the account sent), the sender is the account and the recipient the person.
    """
    message: dict[str, Any] = {"mid": mid or _mid()}
    attachment_list = [_attachment(a) for a in attachments] if attachments else []
    if text or not attachment_list:
        message["text"] = text
    if quick_reply_payload is not None:
        message["quick_reply"] = {"payload": quick_reply_payload}
    if attachment_list:
        message["attachments"] = attachment_list
    if is_echo:
        message["is_echo"] = True
    sender, recipient = (account_id, sender_id) if is_echo else (sender_id, account_id)
    return {
        "sender": {"id": sender},
        "recipient": {"id": recipient},
        "timestamp": timestamp_ms if timestamp_ms is not None else _now_ms(),
        "message": message,
    }


def postback(
    account_id: str,
    sender_id: str,
    payload: str,
    title: str = "",
    *,
    mid: str | None = None,
    timestamp_ms: int | None = None,
) -> dict[str, Any]:
    """One ``messaging`` item for a button tap (``messaging_postbacks``)."""
    return {
        "sender": {"id": sender_id},
        "recipient": {"id": account_id},
        "timestamp": timestamp_ms if timestamp_ms is not None else _now_ms(),
        "postback": {"mid": mid or _mid(), "title": title, "payload": payload},
    }


def referral(account_id: str, sender_id: str, ref: str, *, timestamp_ms: int | None = None) -> dict[str, Any]:
    """One ``messaging`` item for an ig.me / m.me link opened (``messaging_referral``)."""
    return {
        "sender": {"id": sender_id},
        "recipient": {"id": account_id},
        "timestamp": timestamp_ms if timestamp_ms is not None else _now_ms(),
        "referral": {"ref": ref, "source": "SHORTLINKS", "type": "OPEN_THREAD"},
    }


def story_reply(
    account_id: str,
    sender_id: str,
    text: str,
    story_url: str,
    *,
    story_id: str | None = None,
    mid: str | None = None,
    timestamp_ms: int | None = None,
) -> dict[str, Any]:
    """One ``messaging`` item: a DM replying to one of the account's stories (``message.reply_to.story``)."""
    item = instagram_dm(account_id, sender_id, text, mid=mid, timestamp_ms=timestamp_ms)
    item["message"]["reply_to"] = {"story": {"url": story_url, "id": story_id or _numeric_id()}}
    return item


def story_mention(
    account_id: str,
    sender_id: str,
    story_url: str,
    *,
    mid: str | None = None,
    timestamp_ms: int | None = None,
) -> dict[str, Any]:
    """One ``messaging`` item: the person mentioned the account in their story (a ``story_mention`` attachment)."""
    return instagram_dm(
        account_id, sender_id, mid=mid, timestamp_ms=timestamp_ms, attachments=[("story_mention", story_url)]
    )


def _numeric_id() -> str:
    return str(17_800_000_000_000_000 + secrets.randbelow(100_000_000_000_000))


def instagram_comment(
    account_id: str,
    commenter_id: str,
    text: str,
    *,
    media_id: str,
    comment_id: str | None = None,
    parent_id: str | None = None,
    username: str = "",
    media_product_type: str = "FEED",
    field: str = "comments",
    timestamp_ms: int | None = None,
) -> dict[str, Any]:
    """A full Instagram webhook body for a comment (``changes`` field ``comments``; ``live_comments`` too).

    ``parent_id`` makes it a reply to another comment (not top level).
    """
    value: dict[str, Any] = {
        "from": {"id": commenter_id, "username": username or f"user{commenter_id[-4:]}"},
        "media": {"id": media_id, "media_product_type": media_product_type},
        "id": comment_id or _numeric_id(),
        "text": text,
    }
    if parent_id:
        value["parent_id"] = parent_id
    return {
        "object": "instagram",
        "entry": [
            {
                "id": account_id,
                "time": timestamp_ms if timestamp_ms is not None else _now_ms(),
                "changes": [{"field": field, "value": value}],
            }
        ],
    }


def page_comment(
    page_id: str,
    commenter_id: str,
    message: str,
    *,
    post_id: str,
    comment_id: str | None = None,
    parent_id: str | None = None,
    verb: str = "add",
    name: str = "",
    created_time: int | None = None,
) -> dict[str, Any]:
    """A full Page webhook body for a comment on a post (``changes`` field ``feed``, item ``comment``).

    A top-level comment's ``parent_id`` is the post id; pass another comment id for a reply.
    """
    created = created_time if created_time is not None else int(time.time())
    value: dict[str, Any] = {
        "from": {"id": commenter_id, "name": name or f"User {commenter_id[-4:]}"},
        "post": {"status_type": "added_photos", "is_published": True, "id": post_id},
        "message": message,
        "post_id": post_id,
        "comment_id": comment_id or f"{post_id.rsplit('_', 1)[-1]}_{_numeric_id()}",
        "created_time": created,
        "item": "comment",
        "parent_id": parent_id or post_id,
        "verb": verb,
    }
    if verb == "remove":
        value.pop("message")
    return {
        "object": "page",
        "entry": [{"id": page_id, "time": created, "changes": [{"field": "feed", "value": value}]}],
    }


def meta_webhook(object_: str, items_by_account: Mapping[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """A full Meta webhook body: one ``entry`` per account, its items under ``messaging``."""
    now = _now_ms()
    return {
        "object": object_,
        "entry": [
            {"id": account_id, "time": now, "messaging": list(items)}
            for account_id, items in items_by_account.items()
        ],
    }


def instagram_webhook(items_by_account: Mapping[str, list[dict[str, Any]]]) -> dict[str, Any]:
    return meta_webhook("instagram", items_by_account)


def page_webhook(items_by_account: Mapping[str, list[dict[str, Any]]]) -> dict[str, Any]:
    return meta_webhook("page", items_by_account)


def encode_and_sign(payload: dict[str, Any], app_secret: str) -> tuple[bytes, dict[str, str]]:
    """The raw body and the headers Meta sends with it (``X-Hub-Signature-256`` over the raw bytes)."""
    body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
    return body, {
        "Content-Type": "application/json",
        "X-Hub-Signature-256": meta_signature(app_secret, body),
    }


def _chat_id(chat_id: int | str) -> int | str:
    if isinstance(chat_id, str) and chat_id.lstrip("-").isdigit():
        return int(chat_id)
    return chat_id


def _telegram_user(chat_id: int | str, first_name: str, last_name: str, username: str) -> dict[str, Any]:
    user: dict[str, Any] = {"id": _chat_id(chat_id), "is_bot": False, "first_name": first_name}
    if last_name:
        user["last_name"] = last_name
    if username:
        user["username"] = username
    user["language_code"] = "en"
    return user


def _telegram_chat(chat_id: int | str, first_name: str, last_name: str, username: str) -> dict[str, Any]:
    chat: dict[str, Any] = {"id": _chat_id(chat_id), "first_name": first_name}
    if last_name:
        chat["last_name"] = last_name
    if username:
        chat["username"] = username
    chat["type"] = "private"
    return chat


def telegram_message_update(
    update_id: int,
    chat_id: int | str,
    text: str,
    *,
    first_name: str = "Test",
    last_name: str = "",
    username: str = "",
    message_id: int | None = None,
) -> dict[str, Any]:
    """A Bot API ``Update`` carrying a private text message."""
    return {
        "update_id": update_id,
        "message": {
            "message_id": message_id if message_id is not None else update_id % 2_000_000_000,
            "from": _telegram_user(chat_id, first_name, last_name, username),
            "chat": _telegram_chat(chat_id, first_name, last_name, username),
            "date": int(time.time()),
            "text": text,
        },
    }


def telegram_callback_update(
    update_id: int,
    chat_id: int | str,
    data: str,
    *,
    first_name: str = "Test",
    callback_id: str | None = None,
    bot_id: int | None = None,
    message_id: int | None = None,
    message_text: str = "",
) -> dict[str, Any]:
    """A Bot API ``Update`` carrying an inline-keyboard button tap (``callback_query``)."""
    bot = {"id": bot_id if bot_id is not None else 0, "is_bot": True, "first_name": "Bot"}
    return {
        "update_id": update_id,
        "callback_query": {
            "id": callback_id or str(secrets.randbits(63)),
            "from": _telegram_user(chat_id, first_name, "", ""),
            "message": {
                "message_id": message_id if message_id is not None else 1,
                "from": bot,
                "chat": _telegram_chat(chat_id, first_name, "", ""),
                "date": int(time.time()),
                "text": message_text,
            },
            "chat_instance": str(secrets.randbits(62)),
            "data": data,
        },
    }
