"""The platform sandbox speaks the real wire formats, records calls and injects faults."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from sandbox import payloads, simulate
from sandbox.app import create_app

IG_ACCOUNT = "17841400000000001"
IG_TOKEN = "IGAAsandbox-token-1"
PAGE_ID = "100000000000002"
PAGE_TOKEN = "EAAsandbox-page-token"
BOT_TOKEN = "123456:ABC-xyz"


@pytest.fixture
def client() -> TestClient:
    c = TestClient(create_app())
    assert c.post(
        "/_sandbox/accounts",
        json={
            "platform": "instagram",
            "account_id": IG_ACCOUNT,
            "token": IG_TOKEN,
            "name": "Acme",
            "username": "acme",
        },
    ).status_code == 200
    assert c.post(
        "/_sandbox/accounts",
        json={"platform": "messenger", "account_id": PAGE_ID, "token": PAGE_TOKEN, "name": "Acme Page"},
    ).status_code == 200
    assert c.post(
        "/_sandbox/accounts",
        json={"platform": "telegram", "token": BOT_TOKEN, "name": "Acme Bot", "username": "acme_bot"},
    ).status_code == 200
    return c


def _send(client: TestClient, text: str = "hello", token: str = IG_TOKEN, account: str = IG_ACCOUNT, **extra):
    body = {"recipient": {"id": "555"}, "message": {"text": text}, **extra}
    return client.post(
        f"/instagram/v21.0/{account}/messages", json=body, headers={"Authorization": f"Bearer {token}"}
    )


def _calls(client: TestClient, **params) -> list[dict]:
    return client.get("/_sandbox/calls", params=params).json()["calls"]


# ------------------------------------------------------------------ Graph / Instagram


def test_instagram_send_is_answered_and_recorded_without_token(client: TestClient) -> None:
    resp = _send(client, "hi there")
    assert resp.status_code == 200
    data = resp.json()
    assert data["recipient_id"] == "555"
    assert data["message_id"].startswith("m_") and len(data["message_id"]) > 10
    # Two sends get two distinct message ids.
    assert _send(client).json()["message_id"] != data["message_id"]

    calls = _calls(client, service="instagram", path_contains="/messages")
    assert len(calls) == 2
    first = calls[0]
    assert first["path"] == f"/v21.0/{IG_ACCOUNT}/messages"
    assert first["method"] == "POST"
    assert first["json"] == {"recipient": {"id": "555"}, "message": {"text": "hi there"}}
    assert first["token_present"] is True
    assert first["status"] == 200
    assert first["response"] == data
    assert calls[1]["seq"] > first["seq"]
    assert IG_TOKEN not in json.dumps(calls)


def test_access_token_query_param_is_accepted_and_not_recorded(client: TestClient) -> None:
    resp = client.post(
        "/graph/v21.0/me/messages",
        params={"access_token": PAGE_TOKEN},
        json={"recipient": {"id": "777"}, "message": {"text": "x" * 1500}},
    )
    assert resp.status_code == 200, resp.text  # Messenger allows 2000 characters
    call = _calls(client, service="graph")[-1]
    assert "access_token" not in call["query"]
    assert PAGE_TOKEN not in json.dumps(call)


def test_unknown_token_gets_oauth_190(client: TestClient) -> None:
    resp = _send(client, token="nope")
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["code"] == 190
    assert error["type"] == "OAuthException"
    assert error["message"] == "Invalid OAuth access token - Cannot parse access token"
    assert error["fbtrace_id"]
    # Failed calls are recorded too.
    assert _calls(client)[-1]["status"] == 400


def test_revoked_token_gets_190(client: TestClient) -> None:
    assert _send(client).status_code == 200
    resp = client.delete("/instagram/v21.0/me/permissions", params={"access_token": IG_TOKEN})
    assert resp.json() == {"success": True}
    resp = _send(client)
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == 190


def test_graph_validation_errors(client: TestClient) -> None:
    headers = {"Authorization": f"Bearer {IG_TOKEN}"}
    url = f"/instagram/v21.0/{IG_ACCOUNT}/messages"

    resp = client.post(url, json={"message": {"text": "hi"}}, headers=headers)
    assert resp.json()["error"]["message"] == "(#100) The parameter recipient is required"

    resp = client.post(url, json={"recipient": {"id": "1"}, "message": {}}, headers=headers)
    assert resp.status_code == 400 and resp.json()["error"]["code"] == 100

    resp = _send(client, "x" * 1001)
    assert resp.json()["error"]["message"] == (
        "(#100) Length of param message[text] must be less than or equal to 1000"
    )
    assert _send(client, "x" * 1000).status_code == 200

    qr = [{"content_type": "text", "title": str(i), "payload": str(i)} for i in range(14)]
    resp = client.post(url, json={"recipient": {"id": "1"}, "message": {"text": "q", "quick_replies": qr}}, headers=headers)
    assert resp.json()["error"]["code"] == 100

    # Another account's id in the path.
    resp = _send(client, account="999")
    assert resp.status_code == 400 and resp.json()["error"]["code"] == 100

    buttons = [{"type": "postback", "title": f"b{i}", "payload": f"p{i}"} for i in range(3)]
    template = {"type": "template", "payload": {"template_type": "button", "text": "Pick", "buttons": buttons}}
    ok = client.post(url, json={"recipient": {"id": "1"}, "message": {"attachment": template}}, headers=headers)
    assert ok.status_code == 200 and ok.json()["recipient_id"] == "1"
    template["payload"]["buttons"] = buttons + buttons[:1]
    bad = client.post(url, json={"recipient": {"id": "1"}, "message": {"attachment": template}}, headers=headers)
    assert bad.status_code == 400


def test_me_profile_subscribe_and_comment_reply(client: TestClient) -> None:
    auth = {"access_token": IG_TOKEN}
    me = client.get("/instagram/v21.0/me", params={**auth, "fields": "user_id,username"}).json()
    assert me == {"id": IG_ACCOUNT, "name": "Acme", "username": "acme", "user_id": IG_ACCOUNT}

    client.post(
        "/_sandbox/profiles",
        json={"user_id": "42", "name": "Ada L", "first_name": "Ada", "last_name": "L", "username": "ada"},
    )
    assert client.get("/instagram/v21.0/42", params=auth).json()["username"] == "ada"
    generated = client.get("/instagram/v21.0/1234567", params=auth).json()
    assert generated["first_name"] == "User" and generated["username"] == "user4567"

    resp = client.post(
        f"/instagram/v21.0/{IG_ACCOUNT}/subscribed_apps",
        params={**auth, "subscribed_fields": "messages,comments"},
    )
    assert resp.json() == {"success": True}
    assert client.get("/_sandbox/subscriptions").json() == {IG_ACCOUNT: ["messages", "comments"]}
    other = client.post("/instagram/v21.0/999/subscribed_apps", params={**auth, "subscribed_fields": "messages"})
    assert other.status_code == 400 and other.json()["error"]["code"] == 100

    reply = client.post("/instagram/v21.0/178000111/replies", params=auth, json={"message": "Thanks!"})
    assert reply.status_code == 200 and reply.json()["id"]
    assert client.get("/_sandbox/comment_replies").json()["replies"][0]["comment_id"] == "178000111"


def test_meta_throttle_fault_then_success(client: TestClient) -> None:
    fault = client.post(
        "/_sandbox/faults",
        json={"service": "instagram", "path_contains": "/messages", "kind": "meta_throttle", "retry_after": 7},
    )
    assert fault.json()["id"]

    resp = _send(client)
    assert resp.status_code == 400
    assert resp.headers["Retry-After"] == "7"
    error = resp.json()["error"]
    assert error["code"] == 4 and error["message"] == "(#4) Application request limit reached"
    assert "message_id" not in resp.json()

    resp = _send(client)
    assert resp.status_code == 200 and resp.json()["message_id"].startswith("m_")
    statuses = [c["status"] for c in _calls(client, path_contains="/messages")]
    assert statuses == [400, 200]


def test_outside_window_fault_and_times_forever(client: TestClient) -> None:
    client.post("/_sandbox/faults", json={"kind": "meta_outside_window", "times": -1, "method": "POST"})
    for _ in range(3):
        error = _send(client).json()["error"]
        assert (error["code"], error["error_subcode"]) == (10, 2534022)
    client.delete("/_sandbox/faults")
    assert _send(client).status_code == 200


def test_custom_and_server_error_faults(client: TestClient) -> None:
    client.post("/_sandbox/faults", json={"kind": "custom", "status": 418, "body": {"teapot": True}})
    resp = _send(client)
    assert (resp.status_code, resp.json()) == (418, {"teapot": True})
    client.post("/_sandbox/faults", json={"kind": "server_error", "service": "instagram"})
    resp = _send(client)
    assert resp.status_code == 500 and resp.json()["error"]["code"] == 1


def test_reset_forgets_accounts(client: TestClient) -> None:
    assert _send(client).status_code == 200
    client.post("/_sandbox/reset")
    assert _calls(client) == []
    assert _send(client).json()["error"]["code"] == 190


# ------------------------------------------------------------------ Telegram


def test_telegram_methods(client: TestClient) -> None:
    base = f"/telegram/bot{BOT_TOKEN}"
    me = client.get(f"{base}/getMe").json()
    assert me == {
        "ok": True,
        "result": {"id": 123456, "is_bot": True, "first_name": "Acme Bot", "username": "acme_bot"},
    }

    resp = client.post(
        f"{base}/setWebhook",
        json={"url": "http://127.0.0.1:8000/webhooks/telegram/ch1", "secret_token": "s3cret"},
    )
    assert resp.json() == {"ok": True, "result": True, "description": "Webhook was set"}
    assert client.get("/_sandbox/telegram/webhooks").json() == {
        "123456": {"url": "http://127.0.0.1:8000/webhooks/telegram/ch1", "secret_token": "s3cret"}
    }
    assert client.get(f"{base}/getWebhookInfo").json()["result"]["url"].endswith("/ch1")

    first = client.post(f"{base}/sendMessage", json={"chat_id": 777, "text": "hi"}).json()
    assert first["ok"] is True
    result = first["result"]
    assert result["chat"] == {"id": 777, "type": "private"}
    assert result["from"]["id"] == 123456 and result["from"]["is_bot"] is True
    assert result["text"] == "hi" and abs(result["date"] - time.time()) < 5
    # Form-encoded bodies work too, and message ids increase per bot.
    second = client.post(f"{base}/sendMessage", data={"chat_id": "777", "text": "again"}).json()
    assert second["result"]["message_id"] == result["message_id"] + 1

    empty = client.post(f"{base}/sendMessage", json={"chat_id": 777})
    assert empty.status_code == 400
    assert empty.json() == {"ok": False, "error_code": 400, "description": "Bad Request: message text is empty"}

    assert client.post(f"{base}/answerCallbackQuery", json={"callback_query_id": "1"}).json() == {
        "ok": True,
        "result": True,
    }
    unknown = client.post(f"{base}/noSuchMethod")
    assert unknown.status_code == 404 and unknown.json()["description"] == "Not Found"

    resp = client.post(f"{base}/deleteWebhook")
    assert resp.json() == {"ok": True, "result": True, "description": "Webhook was deleted"}
    assert client.get("/_sandbox/telegram/webhooks").json() == {}

    calls = _calls(client, service="telegram")
    assert [c["path"] for c in calls][:3] == ["/getMe", "/setWebhook", "/getWebhookInfo"]
    assert BOT_TOKEN not in json.dumps(calls)
    assert calls[3]["json"] == {"chat_id": 777, "text": "hi"}


def test_telegram_bad_token_is_401(client: TestClient) -> None:
    resp = client.post("/telegram/bot999:WRONG/getMe")
    assert resp.status_code == 401
    assert resp.json() == {"ok": False, "error_code": 401, "description": "Unauthorized"}
    assert "WRONG" not in json.dumps(_calls(client))


def test_telegram_429_fault(client: TestClient) -> None:
    client.post("/_sandbox/faults", json={"service": "telegram", "kind": "telegram_429", "retry_after": 3})
    resp = client.post(f"/telegram/bot{BOT_TOKEN}/sendMessage", json={"chat_id": 1, "text": "x"})
    assert resp.status_code == 429
    assert resp.json() == {
        "ok": False,
        "error_code": 429,
        "description": "Too Many Requests: retry after 3",
        "parameters": {"retry_after": 3},
    }
    ok = client.post(f"/telegram/bot{BOT_TOKEN}/sendMessage", json={"chat_id": 1, "text": "x"}).json()
    assert ok["result"]["message_id"] == 1  # the faulted call issued no message id


def test_timeout_fault_delays(client: TestClient) -> None:
    client.post("/_sandbox/faults", json={"service": "telegram", "kind": "timeout", "delay_seconds": 0.3})
    started = time.monotonic()
    resp = client.get(f"/telegram/bot{BOT_TOKEN}/getMe")
    assert time.monotonic() - started >= 0.3
    assert resp.json()["ok"] is True


# ------------------------------------------------------------------ OpenAI


async def test_openai_endpoint_with_official_client() -> None:
    app = create_app()
    http_client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app))
    ai = openai.AsyncOpenAI(
        base_url="http://sandbox/openai/v1", api_key="sk-test", max_retries=0, http_client=http_client
    )
    completion = await ai.chat.completions.create(
        model="gpt-4o-mini",
        messages=[
            {"role": "system", "content": "You are helpful."},
            {"role": "user", "content": "What does the plan cost?"},
        ],
    )
    assert completion.object == "chat.completion"
    assert completion.model == "gpt-4o-mini"
    assert completion.choices[0].message.content == "[sandbox-ai] What does the plan cost?"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.prompt_tokens == 8
    assert completion.usage.completion_tokens == 6
    assert completion.usage.total_tokens == 14

    stream = await ai.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream])
    assert text == "[sandbox-ai] hi"

    # No key: a 401 the official client maps to AuthenticationError.
    resp = await http_client.post(
        "http://sandbox/openai/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "x"}]}
    )
    assert resp.status_code == 401
    assert resp.json()["error"]["code"] == "invalid_api_key"
    assert resp.json()["error"]["type"] == "invalid_request_error"
    calls = (await http_client.get("http://sandbox/_sandbox/calls", params={"service": "openai"})).json()["calls"]
    assert [(c["path"], c["status"], c["token_present"]) for c in calls] == [
        ("/v1/chat/completions", 200, True),
        ("/v1/chat/completions", 200, True),
        ("/v1/chat/completions", 401, False),
    ]
    await http_client.aclose()


# ------------------------------------------------------------------ payloads


def test_meta_payloads_are_signed_and_well_formed() -> None:
    item = payloads.instagram_dm(IG_ACCOUNT, "555", "hello", quick_reply_payload="QR1")
    assert item["sender"] == {"id": "555"} and item["recipient"] == {"id": IG_ACCOUNT}
    assert item["message"]["mid"].startswith("aWdf")
    assert item["message"]["quick_reply"] == {"payload": "QR1"}

    echo = payloads.instagram_dm(IG_ACCOUNT, "555", "we said", is_echo=True)
    assert echo["sender"] == {"id": IG_ACCOUNT} and echo["message"]["is_echo"] is True

    media = payloads.instagram_dm(IG_ACCOUNT, "555", attachments=[("image", "https://cdn/x.jpg")])
    assert media["message"]["attachments"] == [{"type": "image", "payload": {"url": "https://cdn/x.jpg"}}]

    pb = payloads.postback(IG_ACCOUNT, "555", "BUY", "Buy now")
    assert pb["postback"]["payload"] == "BUY" and pb["postback"]["title"] == "Buy now"
    ref = payloads.referral(IG_ACCOUNT, "555", "promo")
    assert ref["referral"] == {"ref": "promo", "source": "SHORTLINKS", "type": "OPEN_THREAD"}

    hook = payloads.instagram_webhook({IG_ACCOUNT: [item, pb]})
    assert hook["object"] == "instagram"
    assert hook["entry"][0]["id"] == IG_ACCOUNT and hook["entry"][0]["messaging"] == [item, pb]
    assert payloads.page_webhook({PAGE_ID: [ref]})["object"] == "page"

    body, headers = payloads.encode_and_sign(hook, "app-secret")
    expected = "sha256=" + hmac.new(b"app-secret", body, hashlib.sha256).hexdigest()
    assert headers["X-Hub-Signature-256"] == expected
    assert headers["Content-Type"] == "application/json"
    assert json.loads(body) == hook


def test_telegram_update_payloads() -> None:
    update = payloads.telegram_message_update(10, "777", "hi", first_name="Ann", username="ann")
    message = update["message"]
    assert update["update_id"] == 10
    assert message["from"]["id"] == 777 and message["from"]["is_bot"] is False
    assert message["chat"]["type"] == "private" and message["chat"]["username"] == "ann"
    assert message["text"] == "hi"

    cb = payloads.telegram_callback_update(11, 777, "BTN", callback_id="cb1")
    query = cb["callback_query"]
    assert (query["id"], query["data"], query["from"]["id"]) == ("cb1", "BTN", 777)
    assert query["message"]["chat"]["id"] == 777 and query["chat_instance"]


# ------------------------------------------------------------------ simulate CLI


def test_simulate_dm_waits_for_the_reply(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """The CLI signs the webhook, and sees the product's reply in the sandbox log."""
    sandbox = TestClient(create_app())
    sandbox.post("/_sandbox/accounts", json={"platform": "instagram", "account_id": "A1", "token": "T"})
    received: dict = {}

    def fake_product(request: httpx.Request) -> httpx.Response:
        if request.url.host == "sandbox":
            resp = sandbox.request(request.method, request.url.raw_path.decode(), content=request.content)
            return httpx.Response(resp.status_code, content=resp.content, headers=resp.headers)
        received["signature"] = request.headers["X-Hub-Signature-256"]
        received["body"] = request.content
        event = json.loads(request.content)["entry"][0]["messaging"][0]

        def reply() -> None:
            time.sleep(0.1)
            sandbox.post(
                "/instagram/v21.0/me/messages",
                params={"access_token": "T"},
                json={"recipient": {"id": event["sender"]["id"]}, "message": {"text": "pong"}},
            )

        threading.Thread(target=reply).start()
        return httpx.Response(200, json={"ok": True})

    real_client = httpx.Client
    monkeypatch.setattr(
        simulate.httpx, "Client", lambda **kw: real_client(transport=httpx.MockTransport(fake_product), **kw)
    )
    code = simulate.main(
        ["dm", "--text", "ping", "--account", "A1", "--sender", "42", "--api", "http://api",
         "--sandbox", "http://sandbox", "--app-secret", "shh", "--wait", "3"]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "reply received after" in out and out.strip().endswith("pong")
    assert received["signature"] == "sha256=" + hmac.new(b"shh", received["body"], hashlib.sha256).hexdigest()


def test_simulate_without_account_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.delenv("VECTORY_DEMO_ACCOUNT", raising=False)
    assert simulate.main(["dm", "--text", "x", "--wait", "0"]) == 2
    assert "VECTORY_DEMO_ACCOUNT" in capsys.readouterr().err


def test_private_reply_once_per_comment_and_public_replies_are_recorded(client: TestClient) -> None:
    auth = {"Authorization": f"Bearer {IG_TOKEN}"}
    url = f"/instagram/v21.0/{IG_ACCOUNT}/messages"
    body = {"recipient": {"comment_id": "17800000000000010"}, "message": {"text": "Here is your link"}}

    first = client.post(url, json=body, headers=auth)
    assert first.status_code == 200
    assert first.json()["recipient_id"] == "17800000000000010" and first.json()["message_id"].startswith("m_")

    again = client.post(url, json={**body, "message": {"text": "And again"}}, headers=auth)
    assert again.status_code == 400
    error = again.json()["error"]
    assert error["code"] == 10900 and error["message"] == "(#10900) Activity already replied to"
    assert error["type"] == "OAuthException" and error["fbtrace_id"]

    # Another comment gets its own private reply; a normal DM to the person is not limited.
    other = {"recipient": {"comment_id": "17800000000000011"}, "message": {"text": "Link"}}
    assert client.post(url, json=other, headers=auth).status_code == 200
    assert _send(client, "follow-up").status_code == 200

    replies = client.get("/_sandbox/private_replies").json()["replies"]
    assert [(r["comment_id"], r["message"]["text"]) for r in replies] == [
        ("17800000000000010", "Here is your link"),
        ("17800000000000011", "Link"),
    ]
    assert replies[0]["account_id"] == IG_ACCOUNT
    # A failed send (invalid body) does not use up the comment's private reply.
    bad = client.post(url, json={"recipient": {"comment_id": "17800000000000012"}, "message": {}}, headers=auth)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == 100
    third = {"recipient": {"comment_id": "17800000000000012"}, "message": {"text": "ok"}}
    assert client.post(url, json=third, headers=auth).status_code == 200

    # Messenger (Page) private replies follow the same rule.
    page_url = f"/graph/v21.0/{PAGE_ID}/messages"
    page_body = {"recipient": {"comment_id": "900_700"}, "message": {"text": "Hi"}}
    page_auth = {"Authorization": f"Bearer {PAGE_TOKEN}"}
    assert client.post(page_url, json=page_body, headers=page_auth).status_code == 200
    assert client.post(page_url, json=page_body, headers=page_auth).json()["error"]["code"] == 10900

    # Public replies: Instagram /replies and Page /comments record the text.
    ig = client.post("/instagram/v21.0/17800000000000010/replies", headers=auth, json={"message": "Check your DMs!"})
    fb = client.post("/graph/v21.0/900_700/comments", headers=page_auth, json={"message": "Sent!"})
    assert ig.status_code == 200 and fb.status_code == 200 and ig.json()["id"] != fb.json()["id"]
    public = client.get("/_sandbox/comment_replies").json()["replies"]
    assert [(r["comment_id"], r["message"], r["platform"]) for r in public] == [
        ("17800000000000010", "Check your DMs!", "instagram"),
        ("900_700", "Sent!", "messenger"),
    ]
    empty = client.post("/instagram/v21.0/17800000000000010/replies", headers=auth, json={"message": " "})
    assert empty.status_code == 400

    client.post("/_sandbox/reset")
    assert client.get("/_sandbox/private_replies").json() == {"replies": []}


def test_comment_and_story_payload_builders() -> None:
    hook = payloads.instagram_comment(IG_ACCOUNT, "555", "link?", media_id="m1", username="ann")
    [entry] = hook["entry"]
    assert hook["object"] == "instagram" and entry["id"] == IG_ACCOUNT and entry["time"] > 0
    [change] = entry["changes"]
    assert change["field"] == "comments"
    value = change["value"]
    assert value["from"] == {"id": "555", "username": "ann"} and value["media"]["id"] == "m1"
    assert value["id"] and value["text"] == "link?" and "parent_id" not in value
    reply = payloads.instagram_comment(IG_ACCOUNT, "555", "x", media_id="m1", comment_id="c9", parent_id="c1")
    assert reply["entry"][0]["changes"][0]["value"]["parent_id"] == "c1"
    assert reply["entry"][0]["changes"][0]["value"]["id"] == "c9"

    page = payloads.page_comment(PAGE_ID, "777", "info", post_id=f"{PAGE_ID}_1", name="Ana Lima")
    assert page["object"] == "page"
    [change] = page["entry"][0]["changes"]
    assert change["field"] == "feed"
    value = change["value"]
    assert (value["item"], value["verb"], value["parent_id"]) == ("comment", "add", f"{PAGE_ID}_1")
    assert value["from"] == {"id": "777", "name": "Ana Lima"} and value["comment_id"].startswith("1_")

    story = payloads.story_reply(IG_ACCOUNT, "555", "wow", "https://cdn/s.mp4")
    assert story["message"]["text"] == "wow" and story["message"]["reply_to"]["story"]["url"] == "https://cdn/s.mp4"
    mention = payloads.story_mention(IG_ACCOUNT, "555", "https://cdn/m.jpg")
    assert mention["message"]["attachments"] == [{"type": "story_mention", "payload": {"url": "https://cdn/m.jpg"}}]
    assert "text" not in mention["message"]
