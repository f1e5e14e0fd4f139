"""The shapes of the platform tokens and ids that go into a URL's path.

A Telegram bot token is a path segment (``/bot<token>/<method>``) and a Meta
id is one (``/<user id>/permissions``): a stored ``..`` or ``x/../../me?``
would send the call to another path on the platform's host. So each value
has its documented shape checked where it comes in (the API answers 422
naming the field; a webhook event with an id of another shape is ignored)
and again where a URL is built (``core/platforms.py``), which also encodes it.

Plain character-set checks, no regular expression: linear in the value
(they see what users and platforms send).
"""

from __future__ import annotations

import string

__all__ = ["KINDS", "SHAPES", "conforms"]

_DIGITS = frozenset(string.digits)
_TOKEN_CHARS = frozenset(string.ascii_letters + string.digits + "_-")


def _made_of(value: str, chars: frozenset[str], shortest: int, longest: int) -> bool:
    return shortest <= len(value) <= longest and chars.issuperset(value)


def _telegram_token(value: str) -> bool:
    # "123456789:AAH..." (Bot API docs: the bot's id, a colon, then the secret).
    bot_id, colon, secret = value.partition(":")
    return bool(colon) and _made_of(bot_id, _DIGITS, 1, 20) and _made_of(secret, _TOKEN_CHARS, 30, 64)


def _meta_token(value: str) -> bool:
    # Page, Instagram and user access tokens ("EAA...", "IGAA..."): letters and digits.
    return _made_of(value, _TOKEN_CHARS, 1, 4096)


def _meta_id(value: str) -> bool:
    # Graph object ids: accounts, Pages, users, Instagram/Page-scoped ids.
    return _made_of(value, _DIGITS, 1, 64)


def _meta_comment_id(value: str) -> bool:
    # Instagram comment ids are digits; Page comments are "<post id>_<comment id>".
    parts = value.split("_", 2)
    return len(parts) <= 2 and all(_meta_id(part) for part in parts)


def _telegram_chat_id(value: str) -> bool:
    # An integer of at most 52 bits (Bot API docs); groups' are negative.
    return _made_of(value[1:] if value.startswith("-") else value, _DIGITS, 1, 20)


KINDS = {
    "telegram token": _telegram_token,
    "Meta token": _meta_token,
    "Meta id": _meta_id,
    "Meta comment id": _meta_comment_id,
    "Telegram chat id": _telegram_chat_id,
}

# What each kind looks like, for error messages.
SHAPES = {
    "telegram token": "the bot's id (digits), a colon, then 30 to 64 letters, digits, '_' or '-'",
    "Meta token": "letters, digits, '_' or '-' only",
    "Meta id": "digits only",
    "Meta comment id": "digits, or two runs of digits joined by '_'",
    "Telegram chat id": "an integer",
}


def conforms(value: object, kind: str) -> bool:
    """Whether ``value`` is a string of the shape of ``kind`` (a key of ``KINDS``)."""
    return isinstance(value, str) and KINDS[kind](value)
