"""Simulate inbound platform events against a running Vectory API, and wait for the reply.

Examples::

    python -m sandbox.simulate dm --text "price?" --account 17841400000000
    python -m sandbox.simulate postback --payload BUY --account 17841400000000
    python -m sandbox.simulate telegram --text hi --bot-id 123456

Meta events are signed with the app secret and POSTed to ``{api}/webhooks/meta``; Telegram
updates go to the webhook URL the bot registered with the sandbox (``setWebhook``), with the
secret token header, as Telegram would. The reply is then awaited in the sandbox's call log.

Exit codes: 0 delivered (and reply seen, when waiting), 1 webhook rejected or no reply in time,
2 usage/configuration/connection error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import httpx

from sandbox import payloads

DEFAULT_API = "http://127.0.0.1:8000"
DEFAULT_SANDBOX = "http://127.0.0.1:8100"
DEFAULT_SENDER = "990000000000001"
DEFAULT_CHAT = "5550001"
POLL_INTERVAL = 0.05

EXIT_OK = 0
EXIT_NO_REPLY = 1
EXIT_ERROR = 2


class SimulateError(Exception):
    pass


def _err(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


def _last_seq(client: httpx.Client, sandbox: str) -> int:
    try:
        resp = client.get(f"{sandbox}/_sandbox/calls", params={"after_seq": 2**62})
        resp.raise_for_status()
    except httpx.HTTPError as exc:
        raise SimulateError(f"cannot reach the sandbox at {sandbox} ({exc}); start it or pass --wait 0") from exc
    return int(resp.json().get("last_seq", 0))


def _is_reply(call: dict[str, Any], recipient: str) -> bool:
    if call.get("status", 500) >= 400:
        return False
    body = call.get("json")
    if not isinstance(body, dict):
        return False
    path = call.get("path", "")
    if call.get("service") == "telegram":
        return path.lower() == "/sendmessage" and str(body.get("chat_id")) == recipient
    if not path.endswith("/messages"):
        return False
    target = body.get("recipient")
    if isinstance(target, str):
        try:
            target = json.loads(target)
        except ValueError:
            return False
    return isinstance(target, dict) and str(target.get("id")) == recipient


def _describe(call: dict[str, Any]) -> str:
    body = call["json"]
    if call.get("service") == "telegram":
        return str(body.get("text"))
    message = body.get("message")
    if isinstance(message, str):
        try:
            message = json.loads(message)
        except ValueError:
            return message
    if isinstance(message, dict) and set(message) == {"text"}:
        return str(message["text"])
    return json.dumps(message, ensure_ascii=False)


def _wait_for_reply(client: httpx.Client, sandbox: str, after_seq: int, recipient: str, wait: float) -> int:
    started = time.monotonic()
    deadline = started + wait
    while True:
        try:
            resp = client.get(f"{sandbox}/_sandbox/calls", params={"after_seq": after_seq})
            resp.raise_for_status()
            calls = resp.json().get("calls", [])
        except httpx.HTTPError as exc:
            _err(f"polling the sandbox failed: {exc}")
            return EXIT_ERROR
        for call in calls:
            if _is_reply(call, recipient):
                elapsed_ms = int((time.monotonic() - started) * 1000)
                print(f"reply received after {elapsed_ms} ms: {_describe(call)}")
                return EXIT_OK
        if time.monotonic() >= deadline:
            print(f"no reply within {wait:g} s")
            return EXIT_NO_REPLY
        time.sleep(POLL_INTERVAL)


def _post(client: httpx.Client, url: str, body: bytes, headers: dict[str, str]) -> int:
    try:
        resp = client.post(url, content=body, headers=headers)
    except httpx.HTTPError as exc:
        raise SimulateError(f"cannot reach {url} ({exc})") from exc
    print(f"POST {url} -> {resp.status_code} {resp.text}")
    return resp.status_code


def _meta(args: argparse.Namespace, item_for) -> int:
    account = args.account or os.environ.get("VECTORY_DEMO_ACCOUNT", "")
    if not account:
        raise SimulateError("no account: pass --account ACCOUNT_ID or set VECTORY_DEMO_ACCOUNT")
    item = item_for(account)
    items = {account: [item]}
    payload = payloads.instagram_webhook(items) if args.platform == "instagram" else payloads.page_webhook(items)
    body, headers = payloads.encode_and_sign(payload, args.app_secret)
    with httpx.Client(timeout=10.0) as client:
        after = _last_seq(client, args.sandbox) if args.wait > 0 else 0
        status = _post(client, f"{args.api.rstrip('/')}/webhooks/meta", body, headers)
        if status >= 400:
            return EXIT_NO_REPLY
        if args.wait <= 0:
            return EXIT_OK
        return _wait_for_reply(client, args.sandbox, after, args.sender, args.wait)


def cmd_dm(args: argparse.Namespace) -> int:
    return _meta(
        args,
        lambda account: payloads.instagram_dm(
            account, args.sender, args.text, mid=args.mid, quick_reply_payload=args.quick_reply
        ),
    )


def cmd_postback(args: argparse.Namespace) -> int:
    return _meta(
        args, lambda account: payloads.postback(account, args.sender, args.payload, args.title, mid=args.mid)
    )


def cmd_telegram(args: argparse.Namespace) -> int:
    update_id = args.update_id if args.update_id is not None else int(time.time() * 1000)
    if args.callback is not None:
        update = payloads.telegram_callback_update(
            update_id, args.chat, args.callback, first_name=args.first_name, bot_id=int(args.bot_id) if str(args.bot_id).isdigit() else None
        )
    else:
        update = payloads.telegram_message_update(
            update_id, args.chat, args.text, first_name=args.first_name, username=args.username
        )
    with httpx.Client(timeout=10.0) as client:
        try:
            resp = client.get(f"{args.sandbox}/_sandbox/telegram/webhooks")
            resp.raise_for_status()
        except httpx.HTTPError as exc:
            raise SimulateError(f"cannot reach the sandbox at {args.sandbox} ({exc})") from exc
        hook = resp.json().get(str(args.bot_id))
        if not hook or not hook.get("url"):
            raise SimulateError(
                f"bot {args.bot_id} has no webhook in the sandbox (was the Telegram channel connected?)"
            )
        after = _last_seq(client, args.sandbox) if args.wait > 0 else 0
        headers = {"Content-Type": "application/json"}
        if hook.get("secret_token"):
            headers["X-Telegram-Bot-Api-Secret-Token"] = hook["secret_token"]
        status = _post(client, hook["url"], json.dumps(update).encode(), headers)
        if status >= 400:
            return EXIT_NO_REPLY
        if args.wait <= 0:
            return EXIT_OK
        return _wait_for_reply(client, args.sandbox, after, str(args.chat), args.wait)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sandbox", default=os.environ.get("VECTORY_SANDBOX_URL", DEFAULT_SANDBOX))
    parser.add_argument(
        "--wait", type=float, default=10.0, help="seconds to wait for the reply (0 = don't wait)"
    )


def _meta_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--platform", choices=("instagram", "messenger"), default="instagram")
    parser.add_argument("--account", default=None, help="business account id (default: $VECTORY_DEMO_ACCOUNT)")
    parser.add_argument("--sender", default=DEFAULT_SENDER, help="the person's IGSID / PSID")
    parser.add_argument("--mid", default=None)
    parser.add_argument("--api", default=os.environ.get("VECTORY_PUBLIC_URL", DEFAULT_API))
    parser.add_argument(
        "--app-secret", default=os.environ.get("VECTORY_META_APP_SECRET", "dev-meta-app-secret")
    )
    _common(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sandbox.simulate", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    dm = sub.add_parser("dm", help="a direct message (Instagram or Messenger)")
    dm.add_argument("--text", required=True)
    dm.add_argument("--quick-reply", default=None, help="quick-reply payload attached to the message")
    _meta_common(dm)
    dm.set_defaults(func=cmd_dm)

    pb = sub.add_parser("postback", help="a button tap (Instagram or Messenger)")
    pb.add_argument("--payload", required=True)
    pb.add_argument("--title", default="")
    _meta_common(pb)
    pb.set_defaults(func=cmd_postback)

    tg = sub.add_parser("telegram", help="a Telegram update delivered to the bot's webhook")
    tg.add_argument("--text", default="")
    tg.add_argument("--callback", default=None, help="send a callback_query with this data instead of a message")
    tg.add_argument("--bot-id", required=True)
    tg.add_argument("--chat", default=DEFAULT_CHAT)
    tg.add_argument("--update-id", type=int, default=None)
    tg.add_argument("--first-name", default="Test")
    tg.add_argument("--username", default="")
    _common(tg)
    tg.set_defaults(func=cmd_telegram)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "telegram" and args.callback is None and not args.text:
        parser.error("telegram: --text or --callback is required")
    try:
        return args.func(args)
    except SimulateError as exc:
        _err(str(exc))
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
