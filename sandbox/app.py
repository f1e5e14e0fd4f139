"""The local sandbox: Meta Graph, Instagram Graph, Telegram Bot API and OpenAI, in their wire formats.

Point the product at it::

    VECTORY_GRAPH_API_URL=http://127.0.0.1:8100/graph
    VECTORY_INSTAGRAM_API_URL=http://127.0.0.1:8100/instagram
    VECTORY_TELEGRAM_API_URL=http://127.0.0.1:8100/telegram
    OPENAI_BASE_URL=http://127.0.0.1:8100/openai/v1

Every request to an emulated service is recorded (``GET /_sandbox/calls``),
faults can be injected (``POST /_sandbox/faults``) and accounts registered
(``POST /_sandbox/accounts``). State is in memory, one state per
``create_app()`` call.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any
from urllib.parse import parse_qsl

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

SERVICES = ("graph", "instagram", "telegram", "openai")
META_PLATFORMS = ("instagram", "messenger")
FAULT_KINDS = (
    "meta_throttle",
    "meta_token_invalid",
    "meta_outside_window",
    "telegram_429",
    "server_error",
    "timeout",
    "custom",
)
TEXT_LIMITS = {"instagram": 1000, "messenger": 2000}
MAX_QUICK_REPLIES = 13
MAX_TEMPLATE_BUTTONS = 3
TELEGRAM_TEXT_LIMIT = 4096
DEFAULT_TIMEOUT_SECONDS = 30.0


# --------------------------------------------------------------------------- state


@dataclass
class Account:
    platform: str
    account_id: str
    token: str
    name: str = ""
    username: str = ""
    user_id: str = ""
    revoked: bool = False

    @property
    def bot_id(self) -> str:
        return self.token.split(":", 1)[0]


@dataclass
class Fault:
    id: str
    kind: str
    service: str | None = None
    method: str | None = None
    path_contains: str | None = None
    times: int = 1
    retry_after: int = 1
    status: int | None = None
    body: dict[str, Any] | None = None
    delay_seconds: float = 0.0

    def matches(self, service: str, http_method: str, path: str) -> bool:
        if self.service and self.service != service:
            return False
        if self.method:
            wanted = self.method.lower()
            # The HTTP method, or (for Telegram) the Bot API method name.
            if wanted != http_method.lower() and "/" + wanted != path.lower():
                return False
        return not (self.path_contains and self.path_contains not in path)

    def public(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Outcome:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)
    stream: list[dict[str, Any]] | None = None  # OpenAI server-sent event chunks


class SandboxState:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seq = 0
        self.clear()

    def clear(self) -> None:
        self.accounts: dict[str, Account] = {}  # by token
        self.profiles: dict[str, dict[str, str]] = {}
        self.calls: list[dict[str, Any]] = []
        self.faults: list[Fault] = []
        self.webhooks: dict[str, dict[str, Any]] = {}  # by bot id
        self.subscriptions: dict[str, list[str]] = {}  # by account id
        self.comment_replies: list[dict[str, Any]] = []  # public replies
        self.refreshes: list[dict[str, Any]] = []  # long-lived token refreshes
        self.private_replies: dict[str, dict[str, Any]] = {}  # by comment id: one each
        self.telegram_message_ids: dict[str, int] = {}

    def take_fault(self, service: str, http_method: str, path: str) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if fault.matches(service, http_method, path):
                    if fault.times > 0:
                        fault.times -= 1
                        if fault.times == 0:
                            self.faults.remove(fault)
                    return fault
        return None

    def record(self, call: dict[str, Any]) -> None:
        with self.lock:
            self.seq += 1
            call["seq"] = self.seq
            self.calls.append(call)


# --------------------------------------------------------------------------- helpers


def _fbtrace_id() -> str:
    return secrets.token_urlsafe(9)


def meta_error(
    status: int, code: int, message: str, *, type_: str = "OAuthException", subcode: int | None = None
) -> Outcome:
    error: dict[str, Any] = {"message": message, "type": type_, "code": code}
    if subcode is not None:
        error["error_subcode"] = subcode
    error["fbtrace_id"] = _fbtrace_id()
    return Outcome(status, {"error": error})


def _invalid_token() -> Outcome:
    return meta_error(400, 190, "Invalid OAuth access token - Cannot parse access token")


def _param_error(message: str) -> Outcome:
    return meta_error(400, 100, message)


def _unsupported(method: str, object_id: str) -> Outcome:
    return meta_error(
        400,
        100,
        f"Unsupported {method.lower()} request. Object with ID '{object_id}' does not exist, cannot be "
        "loaded due to missing permissions, or does not support this operation. Please read the Graph "
        "API documentation at https://developers.facebook.com/docs/graph-api",
        type_="GraphMethodException",
        subcode=33,
    )


def telegram_error(status: int, description: str, parameters: dict[str, Any] | None = None) -> Outcome:
    body: dict[str, Any] = {"ok": False, "error_code": status, "description": description}
    if parameters:
        body["parameters"] = parameters
    return Outcome(status, body)


def openai_error(status: int, message: str, type_: str, code: str | None, param: str | None = None) -> Outcome:
    return Outcome(status, {"error": {"message": message, "type": type_, "param": param, "code": code}})


def _fault_outcome(fault: Fault, service: str) -> Outcome:
    kind = fault.kind
    if kind == "meta_throttle":
        outcome = meta_error(400, 4, "(#4) Application request limit reached")
        outcome.headers["Retry-After"] = str(fault.retry_after)
        return outcome
    if kind == "meta_token_invalid":
        return _invalid_token()
    if kind == "meta_outside_window":
        return meta_error(400, 10, "This message is sent outside of allowed window.", subcode=2534022)
    if kind == "telegram_429":
        outcome = telegram_error(
            429,
            f"Too Many Requests: retry after {fault.retry_after}",
            {"retry_after": fault.retry_after},
        )
        outcome.headers["Retry-After"] = str(fault.retry_after)
        return outcome
    if kind == "server_error":
        if service == "telegram":
            return telegram_error(500, "Internal Server Error")
        if service == "openai":
            return openai_error(
                500, "The server had an error while processing your request. Sorry about that!", "server_error", None
            )
        return meta_error(500, 1, "An unknown error has occurred.")
    # custom
    return Outcome(fault.status or 400, fault.body if fault.body is not None else {})


def _maybe_json(value: Any) -> Any:
    """Graph and Bot API accept JSON-encoded values in form/query parameters."""
    if isinstance(value, str) and value[:1] in ("{", "["):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _parse_multipart(raw: bytes, content_type: str) -> dict[str, Any]:
    message = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + raw)
    out: dict[str, Any] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name:
            continue
        if part.get_filename():
            out[name] = f"<file {part.get_filename()}>"
        else:
            payload = part.get_payload(decode=True) or b""
            out[name] = payload.decode(errors="replace")
    return out


def _parse_body(raw: bytes, content_type: str) -> Any:
    if not raw:
        return None
    ctype = content_type.split(";", 1)[0].strip().lower()
    if ctype == "application/x-www-form-urlencoded":
        return dict(parse_qsl(raw.decode(errors="replace"), keep_blank_values=True))
    if ctype == "multipart/form-data":
        try:
            return _parse_multipart(raw, content_type)
        except Exception:  # noqa: BLE001 - a sandbox records what it can
            return None
    try:
        return json.loads(raw)
    except ValueError:
        try:
            return dict(parse_qsl(raw.decode(), keep_blank_values=True, strict_parsing=True))
        except ValueError:
            return None


def _bearer(request: Request) -> str:
    auth = request.headers.get("authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer":
        return value.strip()
    if scheme.lower() == "oauth":  # the Graph API accepts this form as well
        return value.strip()
    return ""


def _chat_id(value: Any) -> Any:
    if isinstance(value, str):
        stripped = value.strip()
        if stripped.lstrip("-").isdigit():
            return int(stripped)
        return stripped
    return value


def _strip_token(data: Any) -> Any:
    if isinstance(data, dict) and "access_token" in data:
        return {k: v for k, v in data.items() if k != "access_token"}
    return data


def _words(content: Any) -> int:
    if isinstance(content, str):
        return len(content.split())
    if isinstance(content, list):
        return sum(_words(part.get("text", "")) for part in content if isinstance(part, dict))
    return 0


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            str(part.get("text", "")) for part in content if isinstance(part, dict) and part.get("type") == "text"
        )
    return ""


# --------------------------------------------------------------------------- the app


def create_app() -> FastAPI:
    """A sandbox app with fresh in-memory state."""
    state = SandboxState()
    app = FastAPI(title="Vectory sandbox", docs_url="/_sandbox/docs", openapi_url="/_sandbox/openapi.json")
    app.state.sandbox = state

    async def serve(request: Request, service: str, path: str, token_present: bool, handler) -> Response:
        raw = await request.body()
        body = _parse_body(raw, request.headers.get("content-type", ""))
        query = dict(request.query_params)
        fault = state.take_fault(service, request.method, path)
        outcome: Outcome | None = None
        if fault is not None:
            delay = fault.delay_seconds
            if fault.kind == "timeout" and delay <= 0:
                delay = DEFAULT_TIMEOUT_SECONDS
            if delay > 0:
                await asyncio.sleep(delay)
            if fault.kind != "timeout":
                outcome = _fault_outcome(fault, service)
        if outcome is None:
            params: dict[str, Any] = dict(query)
            if isinstance(body, dict):
                params.update(body)
            try:
                with state.lock:
                    outcome = handler(request.method, params)
            except Exception as exc:  # noqa: BLE001 - report as the service would
                outcome = _fault_outcome(Fault(id="", kind="server_error"), service)
                outcome.body["sandbox_exception"] = repr(exc)
        state.record(
            {
                "seq": 0,
                "service": service,
                "method": request.method,
                "path": path,
                "query": _strip_token(query),
                "json": _strip_token(body),
                "token_present": token_present,
                "status": outcome.status,
                "response": outcome.body,
                "at": time.time(),
            }
        )
        if outcome.stream is not None:
            chunks = outcome.stream

            async def events():
                for chunk in chunks:
                    yield f"data: {json.dumps(chunk)}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream", headers=outcome.headers)
        return JSONResponse(outcome.body, status_code=outcome.status, headers=outcome.headers)

    # ----------------------------------------------------------------- Graph / Instagram

    def meta_handler(service: str, rest: str, token: str):
        def handle(method: str, params: dict[str, Any]) -> Outcome:
            if not token:
                return meta_error(400, 2500, "An active access token must be used to query information about the current user.")
            account = state.accounts.get(token)
            if account is None or account.revoked or account.platform not in META_PLATFORMS:
                return _invalid_token()
            segments = [s for s in rest.split("/") if s]
            if segments == ["refresh_access_token"] and service == "instagram":
                # Instagram Login long-lived tokens: a fresh 60-day token, the old one stays valid.
                if params.get("grant_type") != "ig_refresh_token":
                    return _param_error("(#100) grant_type must be ig_refresh_token")
                new_token = f"IGAA{secrets.token_hex(24)}"
                state.accounts[new_token] = account
                state.refreshes.append({"account_id": account.account_id, "at": time.time()})
                return Outcome(200, {"access_token": new_token, "token_type": "bearer", "expires_in": 5184000})
            if len(segments) < 2:
                return _unsupported(method, segments[0] if segments else "")
            parts = segments[1:]
            object_id = parts[0]
            owns = object_id in ("me", account.account_id) or (account.user_id and object_id == account.user_id)

            if len(parts) == 1:
                if method != "GET":
                    return _unsupported(method, object_id)
                if object_id == "me" or owns:
                    me = {"id": account.account_id, "name": account.name, "username": account.username}
                    if service == "instagram":
                        me["user_id"] = account.user_id or account.account_id
                    return Outcome(200, me)
                return Outcome(200, profile(object_id))

            edge = parts[1] if len(parts) == 2 else ""
            if edge == "subscribed_apps":
                if not owns:
                    return _unsupported(method, object_id)
                if method == "POST":
                    fields = params.get("subscribed_fields", "")
                    if isinstance(fields, list):
                        fields = ",".join(str(f) for f in fields)
                    names = [f.strip() for f in str(fields).split(",") if f.strip()]
                    if not names:
                        return _param_error("(#100) The parameter subscribed_fields is required")
                    state.subscriptions[account.account_id] = names
                    return Outcome(200, {"success": True})
                if method == "GET":
                    names = state.subscriptions.get(account.account_id)
                    data = [{"name": account.name, "id": "sandbox-app", "subscribed_fields": names}] if names else []
                    return Outcome(200, {"data": data})
                state.subscriptions.pop(account.account_id, None)
                return Outcome(200, {"success": True})
            if edge == "permissions":
                if method == "DELETE":
                    account.revoked = True
                    return Outcome(200, {"success": True})
                if method == "GET":
                    return Outcome(200, {"data": [{"permission": "public_profile", "status": "granted"}]})
                return _unsupported(method, object_id)
            if edge == "messages" and method == "POST":
                if not owns:
                    return _unsupported(method, object_id)
                return send_message(account, params)
            # Public reply: Instagram `POST /{comment-id}/replies`, Pages `POST /{comment-id}/comments`.
            if edge in ("replies", "comments") and method == "POST":
                text = params.get("message")
                if not isinstance(text, str) or not text.strip():
                    return _param_error("(#100) The parameter message is required")
                reply_id = str(17_800_000_000_000_000 + secrets.randbelow(100_000_000_000_000))
                state.comment_replies.append(
                    {
                        "id": reply_id,
                        "comment_id": object_id,
                        "message": text,
                        "account_id": account.account_id,
                        "platform": account.platform,
                        "at": time.time(),
                    }
                )
                return Outcome(200, {"id": reply_id})
            return _unsupported(method, object_id)

        return handle

    def profile(user_id: str) -> dict[str, str]:
        known = state.profiles.get(user_id)
        if known is not None:
            return dict(known)
        tail = user_id[-4:]
        return {
            "id": user_id,
            "name": f"User {tail}",
            "first_name": "User",
            "last_name": tail,
            "username": f"user{tail}",
        }

    def send_message(account: Account, params: dict[str, Any]) -> Outcome:
        recipient = _maybe_json(params.get("recipient"))
        if not isinstance(recipient, dict) or not (recipient.get("id") or recipient.get("comment_id")):
            return _param_error("(#100) The parameter recipient is required")
        comment_id = "" if recipient.get("id") else str(recipient.get("comment_id"))
        recipient_id = str(recipient.get("id") or recipient.get("comment_id"))
        if comment_id and comment_id in state.private_replies:
            # A private reply is one message per comment (DESIGN.md §4).
            return meta_error(400, 10900, "(#10900) Activity already replied to")
        message = _maybe_json(params.get("message"))
        if message is None and params.get("sender_action"):
            return Outcome(200, {"recipient_id": recipient_id})
        if not isinstance(message, dict):
            return _param_error("(#100) The parameter message is required")
        text = message.get("text")
        attachment = message.get("attachment") or message.get("attachments")
        if not text and not attachment:
            return _param_error("(#100) Message cannot be empty, must provide valid attachment or text")
        limit = TEXT_LIMITS.get(account.platform, 2000)
        if isinstance(text, str) and len(text) > limit:
            return _param_error(f"(#100) Length of param message[text] must be less than or equal to {limit}")
        quick_replies = message.get("quick_replies")
        if quick_replies is not None:
            if not isinstance(quick_replies, list):
                return _param_error("(#100) param message[quick_replies] must be an array")
            if len(quick_replies) > MAX_QUICK_REPLIES:
                return _param_error(
                    f"(#100) param message[quick_replies] must have at most {MAX_QUICK_REPLIES} elements"
                )
        if isinstance(attachment, dict) and attachment.get("type") == "template":
            payload = attachment.get("payload") or {}
            if payload.get("template_type") == "button":
                buttons = payload.get("buttons") or []
                if not payload.get("text"):
                    return _param_error("(#100) param message[attachment][payload][text] is required")
                if not isinstance(buttons, list) or not buttons:
                    return _param_error("(#100) param message[attachment][payload][buttons] is required")
                if len(buttons) > MAX_TEMPLATE_BUTTONS:
                    return _param_error(
                        "(#100) param message[attachment][payload][buttons] must have at most "
                        f"{MAX_TEMPLATE_BUTTONS} elements"
                    )
        message_id = "m_" + secrets.token_urlsafe(24)
        if comment_id:
            state.private_replies[comment_id] = {
                "comment_id": comment_id,
                "account_id": account.account_id,
                "platform": account.platform,
                "message": message,
                "message_id": message_id,
                "at": time.time(),
            }
        return Outcome(200, {"recipient_id": recipient_id, "message_id": message_id})

    def graph_token(request: Request, raw_body: bytes) -> str:
        token = request.query_params.get("access_token", "")
        if not token:
            body = _parse_body(raw_body, request.headers.get("content-type", ""))
            if isinstance(body, dict) and isinstance(body.get("access_token"), str):
                token = body["access_token"]
        return token or _bearer(request)

    async def meta_route(request: Request, rest: str, service: str) -> Response:
        token = graph_token(request, await request.body())
        path = "/" + rest.strip("/")
        return await serve(request, service, path, bool(token), meta_handler(service, rest, token))

    @app.api_route("/graph/{rest:path}", methods=["GET", "POST", "DELETE"], include_in_schema=False)
    async def graph(request: Request, rest: str) -> Response:
        return await meta_route(request, rest, "graph")

    @app.api_route("/instagram/{rest:path}", methods=["GET", "POST", "DELETE"], include_in_schema=False)
    async def instagram(request: Request, rest: str) -> Response:
        return await meta_route(request, rest, "instagram")

    # ----------------------------------------------------------------- Telegram

    def bot_user(account: Account) -> dict[str, Any]:
        return {
            "id": int(account.bot_id) if account.bot_id.isdigit() else account.bot_id,
            "is_bot": True,
            "first_name": account.name,
            "username": account.username,
        }

    def telegram_handler(token: str | None, tg_method: str):
        def handle(method: str, params: dict[str, Any]) -> Outcome:
            if token is None:
                return telegram_error(404, "Not Found")
            account = state.accounts.get(token)
            if account is None or account.revoked or account.platform != "telegram":
                return telegram_error(401, "Unauthorized")
            name = tg_method.lower()
            bot_id = account.bot_id
            if name == "getme":
                return Outcome(200, {"ok": True, "result": bot_user(account)})
            if name == "setwebhook":
                url = str(params.get("url") or "")
                if not url:
                    state.webhooks.pop(bot_id, None)
                    return Outcome(200, {"ok": True, "result": True, "description": "Webhook was deleted"})
                state.webhooks[bot_id] = {
                    "url": url,
                    "secret_token": str(params.get("secret_token") or ""),
                    "allowed_updates": _maybe_json(params.get("allowed_updates")),
                }
                return Outcome(200, {"ok": True, "result": True, "description": "Webhook was set"})
            if name == "deletewebhook":
                existed = state.webhooks.pop(bot_id, None) is not None
                description = "Webhook was deleted" if existed else "Webhook is already deleted"
                return Outcome(200, {"ok": True, "result": True, "description": description})
            if name == "getwebhookinfo":
                hook = state.webhooks.get(bot_id)
                info: dict[str, Any] = {
                    "url": hook["url"] if hook else "",
                    "has_custom_certificate": False,
                    "pending_update_count": 0,
                }
                if hook and hook.get("allowed_updates"):
                    info["allowed_updates"] = hook["allowed_updates"]
                return Outcome(200, {"ok": True, "result": info})
            if name == "sendmessage":
                chat_id = _chat_id(params.get("chat_id"))
                text = params.get("text")
                if chat_id in (None, "") or not isinstance(text, str) or not text.strip():
                    return telegram_error(400, "Bad Request: message text is empty")
                if len(text) > TELEGRAM_TEXT_LIMIT:
                    return telegram_error(400, "Bad Request: message is too long")
                message_id = state.telegram_message_ids.get(bot_id, 0) + 1
                state.telegram_message_ids[bot_id] = message_id
                chat_type = "group" if isinstance(chat_id, int) and chat_id < 0 else "private"
                result: dict[str, Any] = {
                    "message_id": message_id,
                    "from": bot_user(account),
                    "chat": {"id": chat_id, "type": chat_type},
                    "date": int(time.time()),
                    "text": text,
                }
                markup = _maybe_json(params.get("reply_markup"))
                if isinstance(markup, dict) and "inline_keyboard" in markup:
                    result["reply_markup"] = {"inline_keyboard": markup["inline_keyboard"]}
                return Outcome(200, {"ok": True, "result": result})
            if name == "answercallbackquery":
                if not params.get("callback_query_id"):
                    return telegram_error(400, "Bad Request: query is too old and response timeout expired or query ID is invalid")
                return Outcome(200, {"ok": True, "result": True})
            if name == "sendchataction":
                return Outcome(200, {"ok": True, "result": True})
            return telegram_error(404, "Not Found")

        return handle

    @app.api_route("/telegram/{rest:path}", methods=["GET", "POST"], include_in_schema=False)
    async def telegram(request: Request, rest: str) -> Response:
        token: str | None = None
        tg_method = ""
        if rest.startswith("bot") and "/" in rest:
            token, _, tg_method = rest[3:].partition("/")
            tg_method = tg_method.strip("/")
            if not token or not tg_method or "/" in tg_method:
                token = None
        path = "/" + (tg_method if token is not None else "")
        return await serve(request, "telegram", path, bool(token), telegram_handler(token, tg_method))

    # ----------------------------------------------------------------- OpenAI

    def openai_handler(rest: str, api_key: str):
        def handle(method: str, params: dict[str, Any]) -> Outcome:
            if not api_key:
                return openai_error(
                    401,
                    "You didn't provide an API key. You need to provide your API key in an Authorization header "
                    "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                    "invalid_request_error",
                    "invalid_api_key",
                )
            route = rest.strip("/")
            if route == "v1/models" and method == "GET":
                return Outcome(
                    200,
                    {"object": "list", "data": [{"id": "sandbox-model", "object": "model", "created": 0, "owned_by": "sandbox"}]},
                )
            if route != "v1/chat/completions" or method != "POST":
                return openai_error(404, f"Invalid URL ({method} /{route})", "invalid_request_error", None)
            messages = params.get("messages")
            if not isinstance(messages, list) or not messages:
                return openai_error(
                    400,
                    "Missing required parameter: 'messages'.",
                    "invalid_request_error",
                    "missing_required_parameter",
                    "messages",
                )
            model = str(params.get("model") or "")
            if not model:
                return openai_error(
                    400, "you must provide a model parameter", "invalid_request_error", None, "model"
                )
            last_user = ""
            for message in reversed(messages):
                if isinstance(message, dict) and message.get("role") == "user":
                    last_user = _text_of(message.get("content"))
                    break
            content = "[sandbox-ai] " + last_user[:200]
            prompt_tokens = sum(_words(m.get("content")) for m in messages if isinstance(m, dict))
            completion_tokens = _words(content)
            completion_id = "chatcmpl-" + secrets.token_hex(12)
            created = int(time.time())
            body = {
                "id": completion_id,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": content, "refusal": None},
                        "finish_reason": "stop",
                        "logprobs": None,
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
                "system_fingerprint": "fp_sandbox",
            }
            outcome = Outcome(200, body)
            if params.get("stream"):
                base = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model}
                outcome.stream = [
                    {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]},
                    {**base, "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}]},
                    {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
                ]
            return outcome

        return handle

    @app.api_route("/openai/{rest:path}", methods=["GET", "POST"], include_in_schema=False)
    async def openai(request: Request, rest: str) -> Response:
        api_key = _bearer(request)
        path = "/" + rest.strip("/")
        return await serve(request, "openai", path, bool(api_key), openai_handler(rest, api_key))

    # ----------------------------------------------------------------- control API

    async def json_body(request: Request) -> dict[str, Any]:
        raw = await request.body()
        if not raw:
            return {}
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("expected a JSON object")
        return data

    def bad_request(message: str) -> JSONResponse:
        return JSONResponse({"detail": message}, status_code=400)

    @app.get("/_sandbox/health")
    async def health() -> dict[str, Any]:
        return {"ok": True}

    @app.post("/_sandbox/accounts")
    async def register_account(request: Request) -> Response:
        try:
            data = await json_body(request)
        except ValueError as exc:
            return bad_request(str(exc))
        platform = data.get("platform")
        token = data.get("token")
        if platform not in ("instagram", "messenger", "telegram"):
            return bad_request("platform must be instagram, messenger or telegram")
        if not isinstance(token, str) or not token:
            return bad_request("token is required")
        account_id = str(data.get("account_id") or "")
        if platform == "telegram":
            bot_id = token.split(":", 1)[0]
            if ":" not in token or not bot_id.isdigit():
                return bad_request("a telegram token looks like '123456:ABC-xyz'")
            account_id = account_id or bot_id
        elif not account_id:
            return bad_request("account_id is required")
        account = Account(
            platform=platform,
            account_id=account_id,
            token=token,
            name=str(data.get("name") or ""),
            username=str(data.get("username") or ""),
            user_id=str(data.get("user_id") or ""),
        )
        with state.lock:
            state.accounts[token] = account
        out = {k: v for k, v in account.__dict__.items() if k != "token"}
        if platform == "telegram":
            out["bot_id"] = account.bot_id
        return JSONResponse(out)

    @app.get("/_sandbox/accounts")
    async def list_accounts() -> dict[str, Any]:
        with state.lock:
            return {"accounts": [dict(a.__dict__) for a in state.accounts.values()]}

    @app.post("/_sandbox/profiles")
    async def register_profile(request: Request) -> Response:
        try:
            data = await json_body(request)
        except ValueError as exc:
            return bad_request(str(exc))
        user_id = str(data.get("user_id") or "")
        if not user_id:
            return bad_request("user_id is required")
        first = str(data.get("first_name") or "")
        last = str(data.get("last_name") or "")
        entry = {
            "id": user_id,
            "name": str(data.get("name") or " ".join(p for p in (first, last) if p)),
            "first_name": first,
            "last_name": last,
            "username": str(data.get("username") or ""),
        }
        with state.lock:
            state.profiles[user_id] = entry
        return JSONResponse(entry)

    @app.get("/_sandbox/calls")
    async def list_calls(
        service: str | None = None,
        path_contains: str | None = None,
        method: str | None = None,
        after_seq: int | None = None,
    ) -> dict[str, Any]:
        with state.lock:
            calls = [
                c
                for c in state.calls
                if (not service or c["service"] == service)
                and (not path_contains or path_contains in c["path"])
                and (not method or c["method"].upper() == method.upper())
                and (after_seq is None or c["seq"] > after_seq)
            ]
            return {"calls": calls, "last_seq": state.seq}

    @app.delete("/_sandbox/calls")
    async def clear_calls() -> dict[str, Any]:
        with state.lock:
            state.calls.clear()
        return {"ok": True}

    @app.post("/_sandbox/reset")
    async def reset() -> dict[str, Any]:
        with state.lock:
            state.clear()
        return {"ok": True}

    @app.post("/_sandbox/faults")
    async def add_fault(request: Request) -> Response:
        try:
            data = await json_body(request)
            kind = data.get("kind")
            if kind not in FAULT_KINDS:
                raise ValueError(f"kind must be one of {', '.join(FAULT_KINDS)}")
            service = data.get("service") or None
            if service is not None and service not in SERVICES:
                raise ValueError(f"service must be one of {', '.join(SERVICES)}")
            times = int(data.get("times", 1))
            if times == 0 or times < -1:
                raise ValueError("times must be a positive count or -1 (forever)")
            body = data.get("body")
            if body is not None and not isinstance(body, dict):
                raise ValueError("body must be a JSON object")
            fault = Fault(
                id="flt_" + secrets.token_hex(6),
                kind=kind,
                service=service,
                method=data.get("method") or None,
                path_contains=data.get("path_contains") or None,
                times=times,
                retry_after=int(data.get("retry_after", 1)),
                status=int(data["status"]) if data.get("status") is not None else None,
                body=body,
                delay_seconds=float(data.get("delay_seconds") or 0),
            )
        except (ValueError, TypeError) as exc:
            return bad_request(str(exc))
        with state.lock:
            state.faults.append(fault)
        return JSONResponse({"id": fault.id})

    @app.get("/_sandbox/faults")
    async def list_faults() -> dict[str, Any]:
        with state.lock:
            return {"faults": [f.public() for f in state.faults]}

    @app.delete("/_sandbox/faults")
    async def clear_faults() -> dict[str, Any]:
        with state.lock:
            state.faults.clear()
        return {"ok": True}

    @app.get("/_sandbox/telegram/webhooks")
    async def telegram_webhooks() -> dict[str, Any]:
        with state.lock:
            return {bot: {"url": h["url"], "secret_token": h["secret_token"]} for bot, h in state.webhooks.items()}

    @app.get("/_sandbox/subscriptions")
    async def subscriptions() -> dict[str, Any]:
        with state.lock:
            return {k: list(v) for k, v in state.subscriptions.items()}

    @app.get("/_sandbox/comment_replies")
    async def comment_replies() -> dict[str, Any]:
        """Public replies to comments, in order."""
        with state.lock:
            return {"replies": list(state.comment_replies)}

    @app.get("/_sandbox/private_replies")
    async def private_replies() -> dict[str, Any]:
        """Private replies (``recipient.comment_id``), at most one per comment."""
        with state.lock:
            return {"replies": list(state.private_replies.values())}

    return app


app = create_app()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the Vectory platform sandbox.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)

    import uvicorn

    uvicorn.run(create_app(), host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()
