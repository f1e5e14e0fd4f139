"""Graph API / Bot API clients: requests sent, error classification, no token leaks."""

from __future__ import annotations

import json
import logging
import pickle
import traceback
from collections.abc import Callable

import httpx
import pytest

from core.contracts import Button, QuickReply
from core.http import HttpFailure, HttpResponse
from core.platforms import (
    GraphClient,
    PlatformError,
    TelegramClient,
    UnsafeValue,
    build_meta_message,
    build_telegram_message,
)

GRAPH_TOKEN = "IGAAKsecretTOKENvalue1234567890"
TG_TOKEN = "7000000001:AAH-secretTelegramToken_xyz0123456789"

Handler = Callable[[httpx.Request], httpx.Response]


class Recorder:
    """A MockTransport handler that records requests and replays a response."""

    def __init__(self, response: httpx.Response | Handler) -> None:
        self.requests: list[httpx.Request] = []
        self._response = response

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if callable(self._response):
            return self._response(request)
        return self._response

    @property
    def last(self) -> httpx.Request:
        return self.requests[-1]


class MockHttp:
    """The worker's ``HttpClient`` interface over a recorder: requests are
    built as httpx builds them (URL, query, JSON body), so tests read them
    as ``httpx.Request``. The real client, on a socket: tests/test_http.py."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    async def request(self, method, url, *, params=None, json=None, headers=None) -> HttpResponse:
        request = httpx.Request(method, url, params=params, json=json, headers=headers)
        try:
            response = self.recorder(request)
        except httpx.TimeoutException:
            raise HttpFailure(True, "TimeoutError") from None
        except httpx.HTTPError as exc:
            raise HttpFailure(False, type(exc).__name__) from None
        return HttpResponse(response.status_code, response.headers, response.content)

    async def aclose(self) -> None:
        pass


def graph(recorder: Recorder, base: str = "https://graph.instagram.com") -> GraphClient:
    return GraphClient(MockHttp(recorder), base, "v21.0")


def telegram(recorder: Recorder) -> TelegramClient:
    return TelegramClient(MockHttp(recorder), "https://api.telegram.org")


def meta_error(
    status: int, code: int, message: str, subcode: int | None = None, headers: dict[str, str] | None = None
) -> httpx.Response:
    error = {"message": message, "type": "OAuthException", "code": code, "fbtrace_id": "AbCdEfGh123"}
    if subcode is not None:
        error["error_subcode"] = subcode
    return httpx.Response(status, json={"error": error}, headers=headers)


def assert_graph_auth(request: httpx.Request) -> None:
    assert request.headers["authorization"] == f"Bearer {GRAPH_TOKEN}"
    assert GRAPH_TOKEN not in str(request.url)


# ------------------------------------------------------------------ Graph calls


async def test_graph_get_me() -> None:
    rec = Recorder(httpx.Response(200, json={"id": "17841400000000001", "name": "Shop", "username": "shop"}))
    me = await graph(rec).get_me(GRAPH_TOKEN)
    assert me == {"id": "17841400000000001", "name": "Shop", "username": "shop"}
    req = rec.last
    assert req.method == "GET"
    assert str(req.url) == "https://graph.instagram.com/v21.0/me?fields=id%2Cname%2Cusername"
    assert_graph_auth(req)


async def test_graph_get_profile() -> None:
    rec = Recorder(
        httpx.Response(200, json={"name": "Jane Doe", "username": "jane.doe", "id": "1254477718923456"})
    )
    profile = await graph(rec, "https://graph.facebook.com/").get_profile("1254477718923456", GRAPH_TOKEN)
    assert profile["username"] == "jane.doe"
    req = rec.last
    assert req.method == "GET"
    assert req.url.host == "graph.facebook.com"
    assert req.url.path == "/v21.0/1254477718923456"
    assert req.url.params["fields"] == "name,first_name,last_name,username"
    assert_graph_auth(req)


async def test_graph_subscribe_app() -> None:
    rec = Recorder(httpx.Response(200, json={"success": True}))
    await graph(rec).subscribe_app(
        "17841400000000001", GRAPH_TOKEN, ["messages", "messaging_postbacks", "comments"]
    )
    req = rec.last
    assert req.method == "POST"
    assert req.url.path == "/v21.0/17841400000000001/subscribed_apps"
    assert req.url.params["subscribed_fields"] == "messages,messaging_postbacks,comments"
    assert_graph_auth(req)


async def test_graph_subscribe_app_requires_success() -> None:
    rec = Recorder(httpx.Response(200, json={"success": False}))
    with pytest.raises(PlatformError) as info:
        await graph(rec).subscribe_app("1", GRAPH_TOKEN, ["messages"])
    assert info.value.kind == "rejected"


@pytest.mark.parametrize("body", [True, {"success": True}])
async def test_graph_revoke(body: object) -> None:
    rec = Recorder(httpx.Response(200, content=json.dumps(body)))
    await graph(rec, "https://graph.facebook.com").revoke("5432109876543210", GRAPH_TOKEN)
    req = rec.last
    assert req.method == "DELETE"
    assert str(req.url) == "https://graph.facebook.com/v21.0/5432109876543210/permissions"
    assert_graph_auth(req)


async def test_graph_revoke_false_is_rejected() -> None:
    rec = Recorder(httpx.Response(200, content=b"false"))
    with pytest.raises(PlatformError) as info:
        await graph(rec).revoke("1", GRAPH_TOKEN)
    assert info.value.kind == "rejected"


async def test_graph_send_message() -> None:
    rec = Recorder(
        httpx.Response(200, json={"recipient_id": "1254477718923456", "message_id": "aWdfZAG1fmid"})
    )
    body = build_meta_message("1254477718923456", "Hello!", [QuickReply("Yes", "YES")], [])
    message_id = await graph(rec).send_message("17841400000000001", GRAPH_TOKEN, body)
    assert message_id == "aWdfZAG1fmid"
    req = rec.last
    assert req.method == "POST"
    assert str(req.url) == "https://graph.instagram.com/v21.0/17841400000000001/messages"
    assert req.headers["content-type"] == "application/json"
    assert json.loads(req.content) == body
    assert_graph_auth(req)


UNSAFE_IDS = ["123/../../me", "..", "%2e%2e", "1?fields=x", "1#x", " 1", "1\n", "me", "", "1.5"]


@pytest.mark.parametrize("unsafe", UNSAFE_IDS)
async def test_graph_never_puts_an_id_of_another_shape_into_a_path(unsafe: str) -> None:
    rec = Recorder(httpx.Response(200, json={"success": True, "message_id": "m", "id": "1"}))
    client = graph(rec)
    calls = [
        lambda: client.get_profile(unsafe, GRAPH_TOKEN),
        lambda: client.subscribe_app(unsafe, GRAPH_TOKEN, ["messages"]),
        lambda: client.send_message(unsafe, GRAPH_TOKEN, {}),
        lambda: client.reply_to_comment(unsafe, GRAPH_TOKEN, "hi"),
    ]
    if unsafe:  # empty: the token's own user (me)
        calls.append(lambda: client.revoke(unsafe, GRAPH_TOKEN))
    for call in calls:
        with pytest.raises(UnsafeValue) as info:
            await call()
        assert info.value.kind == "rejected" and not info.value.retryable
    assert rec.requests == []


async def test_graph_revoke_without_a_user_revokes_the_tokens_own() -> None:
    rec = Recorder(httpx.Response(200, json={"success": True}))
    await graph(rec).revoke("", GRAPH_TOKEN)
    assert rec.last.url.path == "/v21.0/me/permissions"


async def test_page_comment_ids_keep_their_underscore() -> None:
    rec = Recorder(httpx.Response(200, json={"id": "r1"}))
    await graph(rec).reply_to_comment("900000000000001_700000000000001", GRAPH_TOKEN, "hi")
    assert rec.last.url.path == "/v21.0/900000000000001_700000000000001/replies"


@pytest.mark.parametrize(
    "token",
    [
        "7000000999:x/../../graph/v21.0/me?",
        "7000000999:%2e%2e%2f%2e%2e%2fgraph%2fv21.0%2fme",
        "7000000999:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA/../me",
        "7000000999:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA?x",
        "../7000000999:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "7000000999:short",
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
    ],
)
async def test_telegram_never_puts_a_token_of_another_shape_into_a_path(token: str) -> None:
    rec = Recorder(httpx.Response(200, json={"ok": True, "result": {"message_id": 1}}))
    for call in (lambda: telegram(rec).get_me(token),
                 lambda: telegram(rec).send_message(token, {"chat_id": 1, "text": "x"})):
        with pytest.raises(UnsafeValue) as info:
            await call()
        assert info.value.kind == "token_invalid" and not info.value.retryable
        assert token not in str(info.value) and token not in repr(info.value)
    assert rec.requests == []


async def test_graph_token_of_another_shape_is_never_sent() -> None:
    rec = Recorder(httpx.Response(200, json={}))
    for token in ("IGAA/../x", "IGAA\r\nX-Evil: 1", "IGAA%2e", ""):
        with pytest.raises(UnsafeValue):
            await graph(rec).get_me(token)
    assert rec.requests == []


async def test_a_failed_graph_call_logs_the_paths_kinds_not_its_ids(caplog: pytest.LogCaptureFixture) -> None:
    person = "1254477718923456"
    rec = Recorder(meta_error(400, 100, f"(#100) Object with ID '{person}' does not exist"))
    caplog.set_level(logging.DEBUG)
    with pytest.raises(PlatformError) as info:
        await graph(rec).revoke(person, GRAPH_TOKEN)
    assert "graph DELETE {Meta id}/permissions failed" in caplog.text
    for text in (caplog.text, str(info.value), repr(info.value)):
        assert person not in text and GRAPH_TOKEN not in text


# -------------------------------------------------------- Graph classification


async def test_meta_throttled_with_retry_after() -> None:
    rec = Recorder(meta_error(400, 4, "(#4) Application request limit reached", headers={"Retry-After": "2"}))
    with pytest.raises(PlatformError) as info:
        await graph(rec).send_message("1", GRAPH_TOKEN, {})
    err = info.value
    assert err.kind == "throttled"
    assert err.retryable
    assert err.retry_after == 2.0
    assert (err.status, err.code, err.subcode) == (400, 4, None)
    assert str(err) == "meta error 4 (throttled): (#4) Application request limit reached"


@pytest.mark.parametrize("code", [17, 32, 613, 80000, 80006, 80014])
async def test_meta_other_throttle_codes(code: int) -> None:
    rec = Recorder(meta_error(400, code, f"(#{code}) rate limited"))
    with pytest.raises(PlatformError) as info:
        await graph(rec).send_message("1", GRAPH_TOKEN, {})
    assert info.value.kind == "throttled"
    assert info.value.retry_after is None


async def test_meta_http_429_is_throttled() -> None:
    rec = Recorder(httpx.Response(429, text="slow down", headers={"Retry-After": "7"}))
    with pytest.raises(PlatformError) as info:
        await graph(rec).get_me(GRAPH_TOKEN)
    assert info.value.kind == "throttled"
    assert info.value.retry_after == 7.0


@pytest.mark.parametrize("code", [190, 102])
async def test_meta_token_invalid(code: int) -> None:
    rec = Recorder(
        meta_error(401 if code == 190 else 400, code, "Error validating access token", subcode=463)
    )
    with pytest.raises(PlatformError) as info:
        await graph(rec).get_me(GRAPH_TOKEN)
    assert info.value.kind == "token_invalid"
    assert not info.value.retryable


@pytest.mark.parametrize(("code", "subcode"), [(10, 2534022), (100, 2018278), (10, 2018278)])
async def test_meta_outside_window(code: int, subcode: int) -> None:
    rec = Recorder(meta_error(400, code, "This message is sent outside of allowed window.", subcode=subcode))
    with pytest.raises(PlatformError) as info:
        await graph(rec).send_message("1", GRAPH_TOKEN, {})
    err = info.value
    assert err.kind == "outside_window"
    assert (err.code, err.subcode) == (code, subcode)
    assert not err.retryable


async def test_meta_other_4xx_is_rejected() -> None:
    rec = Recorder(meta_error(400, 100, "(#100) The parameter recipient is required"))
    with pytest.raises(PlatformError) as info:
        await graph(rec).send_message("1", GRAPH_TOKEN, {})
    err = info.value
    assert err.kind == "rejected"
    assert not err.retryable
    assert err.trace_id == "AbCdEfGh123"
    assert str(err) == "meta error 100 (rejected): (#100) The parameter recipient is required"


async def test_meta_5xx_is_unavailable() -> None:
    rec = Recorder(httpx.Response(500, text="<html>Internal Server Error</html>"))
    with pytest.raises(PlatformError) as info:
        await graph(rec).send_message("1", GRAPH_TOKEN, {})
    err = info.value
    assert err.kind == "unavailable"
    assert err.retryable
    assert err.status == 500
    assert str(err).startswith("meta HTTP 500 (unavailable)")


async def test_meta_5xx_with_error_body_is_unavailable() -> None:
    rec = Recorder(meta_error(503, 2, "An unexpected error has occurred. Please retry your request later."))
    with pytest.raises(PlatformError) as info:
        await graph(rec).send_message("1", GRAPH_TOKEN, {})
    assert info.value.kind == "unavailable"


@pytest.mark.parametrize(
    "exc",
    [
        httpx.ConnectError("connection refused"),
        httpx.ReadTimeout("timed out"),
        httpx.RemoteProtocolError("eof"),
    ],
)
async def test_meta_network_errors_are_unavailable(exc: Exception) -> None:
    def boom(request: httpx.Request) -> httpx.Response:
        raise exc

    with pytest.raises(PlatformError) as info:
        await graph(Recorder(boom)).get_me(GRAPH_TOKEN)
    err = info.value
    assert err.kind == "unavailable"
    assert err.retryable
    assert err.__cause__ is None and err.__context__ is None


async def test_meta_error_message_never_echoes_the_token() -> None:
    rec = Recorder(meta_error(400, 190, f"Malformed access token {GRAPH_TOKEN}"))
    with pytest.raises(PlatformError) as info:
        await graph(rec).get_me(GRAPH_TOKEN)
    err = info.value
    assert GRAPH_TOKEN not in str(err) and GRAPH_TOKEN not in repr(err) and GRAPH_TOKEN not in str(err.args)


async def test_malformed_token_never_reaches_the_http_client() -> None:
    rec = Recorder(httpx.Response(200, json={}))
    with pytest.raises(PlatformError) as info:
        await graph(rec).get_me("tok\u00e9n secret")
    assert info.value.kind == "token_invalid"
    assert "secret" not in str(info.value)
    assert rec.requests == []


# ---------------------------------------------------------------- Telegram calls


async def test_telegram_get_me() -> None:
    result = {"id": 7000000001, "is_bot": True, "first_name": "Vectory", "username": "vectory_bot"}
    rec = Recorder(httpx.Response(200, json={"ok": True, "result": result}))
    assert await telegram(rec).get_me(TG_TOKEN) == result
    req = rec.last
    assert req.method == "POST"
    assert str(req.url) == f"https://api.telegram.org/bot{TG_TOKEN}/getMe"
    assert json.loads(req.content) == {}


async def test_telegram_set_and_delete_webhook() -> None:
    rec = Recorder(httpx.Response(200, json={"ok": True, "result": True, "description": "Webhook was set"}))
    client = telegram(rec)
    await client.set_webhook(
        TG_TOKEN, "https://vectory.example/webhooks/telegram/ch_1", "s3cr3t", ["message", "callback_query"]
    )
    req = rec.last
    assert str(req.url) == f"https://api.telegram.org/bot{TG_TOKEN}/setWebhook"
    assert json.loads(req.content) == {
        "url": "https://vectory.example/webhooks/telegram/ch_1",
        "secret_token": "s3cr3t",
        "allowed_updates": ["message", "callback_query"],
    }
    await client.delete_webhook(TG_TOKEN)
    assert str(rec.last.url) == f"https://api.telegram.org/bot{TG_TOKEN}/deleteWebhook"
    assert rec.last.method == "POST"


async def test_telegram_send_message_and_answer_callback() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/sendMessage"):
            return httpx.Response(
                200,
                json={
                    "ok": True,
                    "result": {"message_id": 321, "chat": {"id": 123}, "date": 1, "text": "hi"},
                },
            )
        return httpx.Response(200, json={"ok": True, "result": True})

    rec = Recorder(handler)
    client = telegram(rec)
    body = build_telegram_message("123456789", "hi", [], [Button("Guide", "GET_GUIDE")])
    assert await client.send_message(TG_TOKEN, body) == "321"
    assert str(rec.last.url) == f"https://api.telegram.org/bot{TG_TOKEN}/sendMessage"
    assert json.loads(rec.last.content) == body

    await client.answer_callback_query(TG_TOKEN, "4382bfdwdsb323b2d9")
    assert str(rec.last.url) == f"https://api.telegram.org/bot{TG_TOKEN}/answerCallbackQuery"
    assert json.loads(rec.last.content) == {"callback_query_id": "4382bfdwdsb323b2d9"}


# ------------------------------------------------------- Telegram classification


async def test_telegram_429_uses_parameters_retry_after() -> None:
    rec = Recorder(
        httpx.Response(
            429,
            json={
                "ok": False,
                "error_code": 429,
                "description": "Too Many Requests: retry after 35",
                "parameters": {"retry_after": 35},
            },
        )
    )
    with pytest.raises(PlatformError) as info:
        await telegram(rec).send_message(TG_TOKEN, {"chat_id": "1", "text": "x"})
    err = info.value
    assert err.kind == "throttled"
    assert err.retry_after == 35.0
    assert err.code == 429
    assert str(err) == "telegram error 429 (throttled): Too Many Requests: retry after 35"


@pytest.mark.parametrize(
    ("status", "description", "kind"),
    [
        (401, "Unauthorized", "token_invalid"),
        (404, "Not Found", "token_invalid"),
        (403, "Forbidden: bot was blocked by the user", "rejected"),
        (400, "Bad Request: chat not found", "rejected"),
        (502, "Bad Gateway", "unavailable"),
    ],
)
async def test_telegram_classification(status: int, description: str, kind: str) -> None:
    rec = Recorder(
        httpx.Response(status, json={"ok": False, "error_code": status, "description": description})
    )
    with pytest.raises(PlatformError) as info:
        await telegram(rec).send_message(TG_TOKEN, {"chat_id": "1", "text": "x"})
    assert info.value.kind == kind
    assert info.value.message == description


async def test_telegram_5xx_without_json_is_unavailable() -> None:
    rec = Recorder(httpx.Response(504, text="<html>Gateway Timeout</html>"))
    with pytest.raises(PlatformError) as info:
        await telegram(rec).get_me(TG_TOKEN)
    assert info.value.kind == "unavailable"


@pytest.mark.parametrize("exc_type", [httpx.ConnectError, httpx.ConnectTimeout, httpx.ReadError])
async def test_telegram_network_error_never_leaks_the_token(
    exc_type: type[httpx.TransportError], caplog: pytest.LogCaptureFixture
) -> None:
    def boom(request: httpx.Request) -> httpx.Response:
        # httpx errors carry the request, whose URL holds the token.
        raise exc_type(f"[Errno 111] Connection refused: {request.url}", request=request)

    caplog.set_level(logging.DEBUG)
    with pytest.raises(PlatformError) as info:
        await telegram(Recorder(boom)).send_message(TG_TOKEN, {"chat_id": "1", "text": "x"})
    err = info.value
    assert err.kind == "unavailable"
    assert err.retryable
    assert err.platform == "telegram"
    assert err.__cause__ is None
    assert err.__context__ is None
    texts = [
        str(err),
        repr(err),
        repr(err.args),
        err.message,
        "".join(traceback.format_exception(err)),
        "".join(traceback.format_exception(type(err), err, err.__traceback__)),
        caplog.text,
    ]
    for text in texts:
        assert TG_TOKEN not in text
        assert "AAH-secret" not in text
    assert "sendMessage" in str(err)


async def test_httpx_request_logging_is_quiet() -> None:
    assert logging.getLogger("httpx").getEffectiveLevel() >= logging.WARNING
    assert logging.getLogger("httpcore").getEffectiveLevel() >= logging.WARNING


def test_platform_error_pickles() -> None:
    err = PlatformError("throttled", "(#4) limit", status=400, code=4, retry_after=2.0)
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.kind, copy.code, copy.retry_after, str(copy)) == ("throttled", 4, 2.0, str(err))


# ------------------------------------------------------------------- builders


def test_build_meta_text_with_quick_replies() -> None:
    body = build_meta_message(
        "1254477718923456", "Want the link?", [QuickReply("Yes", "YES"), QuickReply("No")], []
    )
    assert body == {
        "recipient": {"id": "1254477718923456"},
        "messaging_type": "RESPONSE",
        "message": {
            "text": "Want the link?",
            "quick_replies": [
                {"content_type": "text", "title": "Yes", "payload": "YES"},
                {"content_type": "text", "title": "No", "payload": "No"},
            ],
        },
    }


def test_build_meta_buttons_and_human_agent() -> None:
    body = build_meta_message(
        "5432109876543210",
        "Pick one",
        [],
        [Button("Guide", "GET_GUIDE"), Button("Website", url="https://shop.example")],
        human_agent=True,
    )
    assert body == {
        "recipient": {"id": "5432109876543210"},
        "messaging_type": "MESSAGE_TAG",
        "tag": "HUMAN_AGENT",
        "message": {
            "attachment": {
                "type": "template",
                "payload": {
                    "template_type": "button",
                    "text": "Pick one",
                    "buttons": [
                        {"type": "postback", "title": "Guide", "payload": "GET_GUIDE"},
                        {"type": "web_url", "title": "Website", "url": "https://shop.example"},
                    ],
                },
            }
        },
    }


def test_build_telegram_messages() -> None:
    assert build_telegram_message("123", "plain", [], []) == {"chat_id": "123", "text": "plain"}
    assert build_telegram_message("123", "q", [QuickReply("Yes", "YES"), QuickReply("No")], []) == {
        "chat_id": "123",
        "text": "q",
        "reply_markup": {
            "keyboard": [[{"text": "Yes"}], [{"text": "No"}]],
            "one_time_keyboard": True,
            "resize_keyboard": True,
        },
    }
    assert build_telegram_message(
        "123", "b", [], [Button("Guide", "GET_GUIDE"), Button("Site", url="https://shop.example")]
    ) == {
        "chat_id": "123",
        "text": "b",
        "reply_markup": {
            "inline_keyboard": [
                [{"text": "Guide", "callback_data": "GET_GUIDE"}],
                [{"text": "Site", "url": "https://shop.example"}],
            ]
        },
    }
