"""Async clients for the Graph API and the Telegram Bot API.

Used by Temporal activities. Every failure becomes a ``PlatformError`` with a
``kind`` that tells the caller what to do:

- ``throttled``: back off (``retry_after`` seconds when the platform said so) and retry;
- ``unavailable``: network error, timeout or 5xx; retry;
- ``token_invalid``: do not retry; the channel needs reconnecting;
- ``outside_window``: the messaging window is closed; do not retry;
- ``rejected``: any other clean refusal; do not retry.

Access tokens never appear in errors or logs. Graph tokens travel in the
``Authorization`` header. Telegram tokens are part of the URL path; the HTTP
client (``core/http.py``) never puts the URL in its ``HttpFailure``, and that
is replaced by a ``PlatformError`` raised outside the ``except`` block: no
``__cause__`` and no ``__context__``.

Every stored value in a URL's path (a bot token, an account, user or comment
id) goes through ``segment``: one of another shape (``core/ids.py``) raises
``UnsafeValue`` before any request, so no stored value can change the path.
Logs and errors name the path by its kinds (``graph DELETE {Meta id}/permissions``),
never by the ids in it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any, NamedTuple
from urllib.parse import quote

from core import ids
from core.contracts import Button, QuickReply
from core.http import HttpClient, HttpFailure, HttpResponse

__all__ = [
    "GraphClient",
    "PlatformError",
    "TelegramClient",
    "UnsafeValue",
    "build_meta_message",
    "build_telegram_message",
    "classify_meta_error",
    "classify_telegram_error",
]

log = logging.getLogger(__name__)

KINDS = ("throttled", "token_invalid", "outside_window", "rejected", "unavailable")
RETRYABLE_KINDS = ("throttled", "unavailable")

META_THROTTLE_CODES = frozenset({4, 17, 32, 613, *range(80000, 80015)})
META_TOKEN_CODES = frozenset({190, 102})
# Subcodes meaning "outside the messaging window" (code 10 on Instagram,
# 10 or 100 on Messenger).
META_WINDOW_SUBCODES = frozenset({2534022, 2018278})

_TELEGRAM_METHOD = re.compile(r"[A-Za-z]+")


class PlatformError(Exception):
    """A classified failure of a platform API call. Never holds a token."""

    def __init__(
        self,
        kind: str,
        message: str,
        *,
        status: int | None = None,
        code: int | None = None,
        subcode: int | None = None,
        retry_after: float | None = None,
        platform: str = "meta",
        trace_id: str = "",
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown PlatformError kind {kind!r}")
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.status = status
        self.code = code
        self.subcode = subcode
        self.retry_after = retry_after
        self.platform = platform
        self.trace_id = trace_id

    @property
    def retryable(self) -> bool:
        return self.kind in RETRYABLE_KINDS

    def __str__(self) -> str:
        if self.code is not None:
            head = f"{self.platform} error {self.code}"
        elif self.status is not None:
            head = f"{self.platform} HTTP {self.status}"
        else:
            head = f"{self.platform} error"
        return f"{head} ({self.kind}): {self.message}"

    def __repr__(self) -> str:
        return (
            f"PlatformError(kind={self.kind!r}, status={self.status!r}, code={self.code!r}, "
            f"subcode={self.subcode!r}, retry_after={self.retry_after!r}, message={self.message!r})"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_error, (self.kind, self.message, self._fields()))

    def _fields(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "code": self.code,
            "subcode": self.subcode,
            "retry_after": self.retry_after,
            "platform": self.platform,
            "trace_id": self.trace_id,
        }


def _rebuild_error(kind: str, message: str, fields: dict[str, Any]) -> PlatformError:
    return PlatformError(kind, message, **fields)


class UnsafeValue(PlatformError):
    """A stored value that cannot be put into a URL's path: no request was
    made. A token is ``token_invalid`` (the channel needs reconnecting), an id
    ``rejected``; neither is retried. Never holds the value."""

    def __init__(self, what: str, platform: str) -> None:
        kind = "token_invalid" if what.endswith("token") else "rejected"
        super().__init__(
            kind, f"the stored {what} is malformed ({ids.SHAPES[what]}); nothing was sent", platform=platform
        )


# ------------------------------------------------------------------ helpers


def _scrub(text: str, token: str) -> str:
    """Remove the token from platform-provided text (defence in depth)."""
    if token and token in text:
        text = text.replace(token, "[redacted]")
    return text


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    return None


def _as_seconds(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return None  # e.g. an HTTP-date Retry-After; let the caller's backoff decide
    return seconds if seconds >= 0 else None


def _json(response: HttpResponse) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _check_graph_token(token: str) -> None:
    # A header, not a path, but one of another shape (a newline, non-ASCII)
    # could make the HTTP client raise while building the request, with the
    # token in the exception's args.
    if not ids.conforms(token, "Meta token"):
        raise UnsafeValue("Meta token", "meta")


def segment(value: str, kind: str, platform: str = "meta") -> str:
    """``value`` as one path segment of a platform URL, percent-encoded.
    ``UnsafeValue`` when it is not of the shape of ``kind`` (``core/ids.py``)."""
    if not ids.conforms(value, kind):
        raise UnsafeValue(kind, platform)
    # ':' stays: a path character (RFC 3986), and the one a bot token has.
    return quote(value, safe=":")


class _Path(NamedTuple):
    path: str  # each value checked and encoded
    label: str  # what logs and errors show: values named by their kind
    values: tuple[str, ...]  # scrubbed from the platform's error messages too


def _path(*parts: str | tuple[str, str]) -> _Path:
    """A Graph path from literal parts and (value, kind) parts (``segment``)."""
    path, label, values = [], [], []
    for part in parts:
        if isinstance(part, tuple):
            value, kind = part
            path.append(segment(value, kind))
            label.append(f"{{{kind}}}")
            values.append(value)
        else:
            path.append(part)
            label.append(part)
    return _Path("/".join(path), "/".join(label), tuple(values))


def _network_error(platform: str, action: str, exc: HttpFailure) -> PlatformError:
    return PlatformError("unavailable", f"{action} {exc}", platform=platform)


def _header(headers: Mapping[str, str] | None, name: str) -> str | None:
    """Case-insensitive lookup in any mapping (aiohttp's headers are already)."""
    if not headers:
        return None
    value = headers.get(name)
    if value is None:
        value = next((v for k, v in headers.items() if k.lower() == name), None)
    return value


# ------------------------------------------------------------ classification


def classify_meta_error(status: int, body: Any, headers: Mapping[str, str] | None = None) -> PlatformError:
    """Turn a failed Graph API response into a ``PlatformError``."""
    retry_after = _as_seconds(_header(headers, "retry-after"))
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        if status == 429:
            return PlatformError("throttled", "HTTP 429", status=status, retry_after=retry_after)
        kind = "unavailable" if status >= 500 else "rejected"
        return PlatformError(kind, f"HTTP {status} without a Graph error body", status=status)

    code = _as_int(error.get("code"))
    subcode = _as_int(error.get("error_subcode"))
    message = str(error.get("message") or error.get("type") or f"HTTP {status}")
    trace_id = str(error.get("fbtrace_id") or "")
    if code in META_THROTTLE_CODES or status == 429:
        kind = "throttled"
    elif code in META_TOKEN_CODES:
        kind = "token_invalid"
    elif code in (10, 100) and subcode in META_WINDOW_SUBCODES:
        kind = "outside_window"
    elif status >= 500 or code == 2 or error.get("is_transient") is True:
        kind = "unavailable"
    else:
        kind = "rejected"
    return PlatformError(
        kind,
        message,
        status=status,
        code=code,
        subcode=subcode,
        retry_after=retry_after if kind == "throttled" else None,
        trace_id=trace_id,
    )


def classify_telegram_error(status: int, body: Any, headers: Mapping[str, str] | None = None) -> PlatformError:
    """Turn a failed Bot API response into a ``PlatformError``."""
    body = body if isinstance(body, dict) else {}
    code = _as_int(body.get("error_code"))
    effective = code if code is not None and code >= 400 else status
    description = str(body.get("description") or f"HTTP {status}")
    params = body.get("parameters") if isinstance(body.get("parameters"), dict) else {}
    retry_after = None
    if effective == 429:
        kind = "throttled"
        retry_after = _as_seconds(params.get("retry_after"))
        if retry_after is None:
            retry_after = _as_seconds(_header(headers, "retry-after"))
    elif effective in (401, 404):
        kind = "token_invalid"
    elif effective >= 500:
        kind = "unavailable"
    else:  # 403 (bot blocked by the user) and any other 4xx
        kind = "rejected"
    return PlatformError(
        kind,
        description,
        status=status,
        code=code,
        retry_after=retry_after,
        platform="telegram",
    )


# ------------------------------------------------------------------ Graph API


class GraphClient:
    """Graph API client for graph.facebook.com or graph.instagram.com."""

    def __init__(self, http: HttpClient, base_url: str, version: str) -> None:
        self._http = http
        self._base = base_url.rstrip("/")
        self._version = version.strip("/")

    async def _call(
        self,
        method: str,
        path: _Path,
        token: str,
        *,
        params: dict[str, str] | None = None,
        json: dict[str, Any] | None = None,
        versioned: bool = True,
    ) -> Any:
        _check_graph_token(token)
        url = f"{self._base}/{self._version}/{path.path}" if versioned else f"{self._base}/{path.path}"
        action = f"graph {method} {path.label}"
        failure: PlatformError | None = None
        try:
            response = await self._http.request(
                method,
                url,
                params=params,
                json=json,
                headers={"Authorization": f"Bearer {token}"},
            )
        except HttpFailure as exc:
            failure = _network_error("meta", action, exc)
        if failure is not None:
            raise failure  # outside the except block: no exception context
        body = _json(response)
        if response.status >= 400 or (isinstance(body, dict) and "error" in body):
            error = classify_meta_error(response.status, body, response.headers)
            error.message = _scrub(error.message, token)
            for value in path.values:  # "(#100) Object with ID '1254...' does not exist"
                if len(value) >= 6:  # a shorter one would cut into error codes, and names nobody
                    error.message = error.message.replace(value, "[id]")
            error.args = (error.message,)
            log.warning("%s failed: %s", action, error)
            raise error
        if body is None:
            raise PlatformError("rejected", f"{action}: response is not JSON", status=response.status)
        return body

    async def get_me(self, token: str) -> dict[str, Any]:
        body = await self._call("GET", _path("me"), token, params={"fields": "id,name,username"})
        return _expect_dict(body, "me", "meta")

    async def get_profile(
        self, user_id: str, token: str, fields: str = "name,first_name,last_name,username"
    ) -> dict[str, Any]:
        body = await self._call("GET", _path((user_id, "Meta id")), token, params={"fields": fields})
        return _expect_dict(body, "profile", "meta")

    async def subscribe_app(self, account_id: str, token: str, fields: list[str]) -> None:
        body = await self._call(
            "POST",
            _path((account_id, "Meta id"), "subscribed_apps"),
            token,
            params={"subscribed_fields": ",".join(fields)},
        )
        if not (isinstance(body, dict) and body.get("success") is True):
            raise PlatformError("rejected", "subscribed_apps did not report success")

    async def revoke(self, user_id: str, token: str) -> None:
        """Revoke the grant of ``user_id`` (empty: of the token's own user, ``me``)."""
        user = (user_id, "Meta id") if user_id else "me"
        body = await self._call("DELETE", _path(user, "permissions"), token)
        if not (body is True or (isinstance(body, dict) and body.get("success") is True)):
            raise PlatformError("rejected", "permission revoke did not report success")

    async def send_message(self, account_id: str, token: str, body: dict[str, Any]) -> str:
        result = await self._call("POST", _path((account_id, "Meta id"), "messages"), token, json=body)
        message_id = result.get("message_id") if isinstance(result, dict) else None
        if not message_id:
            # Not retryable: the message may well have been delivered.
            raise PlatformError("rejected", "send API response without message_id")
        return str(message_id)

    async def refresh_long_lived_token(self, token: str) -> tuple[str, int]:
        """Instagram Login: exchange a long-lived token (older than 24 h) for a
        fresh 60-day one. Returns (token, expires_in seconds)."""
        body = await self._call(
            "GET", _path("refresh_access_token"), token, params={"grant_type": "ig_refresh_token"}, versioned=False
        )
        new_token = body.get("access_token") if isinstance(body, dict) else None
        if not new_token:
            raise PlatformError("rejected", "token refresh response without access_token")
        if not ids.conforms(new_token, "Meta token"):
            # Stored, it would fail every later call: keep the one that works.
            raise PlatformError("rejected", "token refresh answered a malformed access_token")
        return str(new_token), int(body.get("expires_in") or 0)

    async def reply_to_comment(self, comment_id: str, token: str, text: str) -> str:
        """Public reply under a comment (top-level comments only)."""
        result = await self._call(
            "POST", _path((comment_id, "Meta comment id"), "replies"), token, json={"message": text}
        )
        reply_id = result.get("id") if isinstance(result, dict) else None
        if not reply_id:
            raise PlatformError("rejected", "comment reply response without id")
        return str(reply_id)


def _expect_dict(body: Any, what: str, platform: str) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise PlatformError("rejected", f"unexpected {what} response", platform=platform)
    return body


# --------------------------------------------------------------- Telegram API


class TelegramClient:
    """Telegram Bot API client. The token is in the URL path: see module doc."""

    def __init__(self, http: HttpClient, base_url: str = "https://api.telegram.org") -> None:
        self._http = http
        self._base = base_url.rstrip("/")

    async def _call(self, token: str, method: str, payload: dict[str, Any]) -> Any:
        bot = "bot" + segment(token, "telegram token", "telegram")
        if not _TELEGRAM_METHOD.fullmatch(method):
            raise PlatformError("rejected", "invalid Bot API method", platform="telegram")
        failure: PlatformError | None = None
        try:
            response = await self._http.request("POST", f"{self._base}/{bot}/{method}", json=payload)
        except HttpFailure as exc:
            failure = _network_error("telegram", f"telegram {method}", exc)
        if failure is not None:
            raise failure  # outside the except block: no exception context
        body = _json(response)
        if response.status >= 400 or not (isinstance(body, dict) and body.get("ok") is True):
            if response.status < 400 and not isinstance(body, dict):
                raise PlatformError(
                    "rejected",
                    f"telegram {method}: response is not JSON",
                    status=response.status,
                    platform="telegram",
                )
            error = classify_telegram_error(response.status, body, response.headers)
            error.message = _scrub(error.message, token)
            error.args = (error.message,)
            log.warning("telegram call failed: %s: %s", method, error)
            raise error
        return body.get("result")

    async def get_me(self, token: str) -> dict[str, Any]:
        return _expect_dict(await self._call(token, "getMe", {}), "getMe", "telegram")

    async def set_webhook(self, token: str, url: str, secret_token: str, allowed_updates: list[str]) -> None:
        await self._call(
            token,
            "setWebhook",
            {"url": url, "secret_token": secret_token, "allowed_updates": list(allowed_updates)},
        )

    async def delete_webhook(self, token: str) -> None:
        await self._call(token, "deleteWebhook", {})

    async def send_message(self, token: str, body: dict[str, Any]) -> str:
        result = await self._call(token, "sendMessage", body)
        message_id = result.get("message_id") if isinstance(result, dict) else None
        if message_id is None:
            raise PlatformError("rejected", "sendMessage response without message_id", platform="telegram")
        return str(message_id)

    async def answer_callback_query(self, token: str, callback_query_id: str) -> None:
        await self._call(token, "answerCallbackQuery", {"callback_query_id": callback_query_id})


# ------------------------------------------------------------------ builders


def build_meta_message(
    recipient_id: str,
    text: str,
    quick_replies: list[QuickReply],
    buttons: list[Button],
    *,
    human_agent: bool = False,
) -> dict[str, Any]:
    """A Send API body. Buttons make a button template; quick replies ride along."""
    body: dict[str, Any] = {"recipient": {"id": recipient_id}}
    if human_agent:
        body["messaging_type"] = "MESSAGE_TAG"
        body["tag"] = "HUMAN_AGENT"
    else:
        body["messaging_type"] = "RESPONSE"

    message: dict[str, Any]
    if buttons:
        message = {
            "attachment": {
                "type": "template",
                "payload": {
                    "template_type": "button",
                    "text": text,
                    "buttons": [_meta_button(b) for b in buttons],
                },
            }
        }
    else:
        message = {"text": text}
    if quick_replies:
        message["quick_replies"] = [
            {"content_type": "text", "title": qr.title, "payload": qr.payload or qr.title}
            for qr in quick_replies
        ]
    body["message"] = message
    return body


def _meta_button(button: Button) -> dict[str, str]:
    if button.url:
        return {"type": "web_url", "title": button.title, "url": button.url}
    return {"type": "postback", "title": button.title, "payload": button.payload or button.title}


def build_telegram_message(
    chat_id: str,
    text: str,
    quick_replies: list[QuickReply],
    buttons: list[Button],
) -> dict[str, Any]:
    """A sendMessage body. Buttons win over quick replies (one reply_markup only).

    Telegram quick replies come back as plain text: their payload is the title.
    """
    body: dict[str, Any] = {"chat_id": chat_id, "text": text}
    if buttons:
        rows = []
        for b in buttons:
            if b.url:
                rows.append([{"text": b.title, "url": b.url}])
            else:
                rows.append([{"text": b.title, "callback_data": b.payload or b.title}])
        body["reply_markup"] = {"inline_keyboard": rows}
    elif quick_replies:
        body["reply_markup"] = {
            "keyboard": [[{"text": qr.title}] for qr in quick_replies],
            "one_time_keyboard": True,
            "resize_keyboard": True,
        }
    return body
