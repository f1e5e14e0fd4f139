"""Meta's Deauthorize and Data Deletion Request callbacks (signed_request),
and the deletion status page."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from datetime import UTC, datetime

import pytest
from sqlmodel import Session, col, select

from api.routes.privacy_callbacks import SignedRequestError, aggregate_status, parse_signed_request
from core.db import AuditEntry, Channel, ErasureJob

from conftest import APP_SECRET
from helpers import Tenant, create_tenant, wait_for

NOW = 1_760_000_000.0


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign(payload: dict | bytes, secret: str = APP_SECRET) -> str:
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    payload_part = b64url(raw)
    sig = hmac.new(secret.encode(), payload_part.encode(), hashlib.sha256).digest()
    return f"{b64url(sig)}.{payload_part}"


def meta_payload(user_id: str, **extra) -> dict:
    return {"algorithm": "HMAC-SHA256", "issued_at": int(time.time()), "user_id": user_id, **extra}


# --------------------------------------------------------------- parse_signed_request


def test_valid_signed_request_returns_payload():
    payload = {"algorithm": "HMAC-SHA256", "issued_at": int(NOW) - 60, "user_id": "1234567890"}
    assert parse_signed_request(sign(payload), APP_SECRET, now=NOW) == payload


def test_algorithm_is_case_insensitive_and_issued_at_optional():
    payload = {"algorithm": "hmac-sha256", "user_id": "42"}
    assert parse_signed_request(sign(payload), APP_SECRET, now=NOW)["user_id"] == "42"


def test_bad_signature_is_refused():
    payload = {"algorithm": "HMAC-SHA256", "user_id": "42"}
    with pytest.raises(SignedRequestError, match="invalid signature"):
        parse_signed_request(sign(payload, "another-secret"), APP_SECRET, now=NOW)
    # A payload swapped under a valid signature is refused too.
    sig_part = sign(payload).split(".")[0]
    forged = f"{sig_part}.{b64url(json.dumps({**payload, 'user_id': '43'}).encode())}"
    with pytest.raises(SignedRequestError, match="invalid signature"):
        parse_signed_request(forged, APP_SECRET, now=NOW)


def test_signature_is_over_the_payload_part_as_received():
    payload_part = b64url(json.dumps({"algorithm": "HMAC-SHA256", "user_id": "7"}).encode())
    # Signed over the decoded JSON instead of the base64url text: refused.
    wrong = hmac.new(APP_SECRET.encode(), base64.urlsafe_b64decode(payload_part + "=" * (-len(payload_part) % 4)),
                     hashlib.sha256).digest()
    with pytest.raises(SignedRequestError, match="invalid signature"):
        parse_signed_request(f"{b64url(wrong)}.{payload_part}", APP_SECRET, now=NOW)
    right = hmac.new(APP_SECRET.encode(), payload_part.encode(), hashlib.sha256).digest()
    assert parse_signed_request(f"{b64url(right)}.{payload_part}", APP_SECRET, now=NOW)["user_id"] == "7"


def test_wrong_algorithm_is_refused():
    for algorithm in ("HMAC-SHA1", "none", None, 5):
        payload = {"algorithm": algorithm, "user_id": "42"}
        with pytest.raises(SignedRequestError, match="algorithm"):
            parse_signed_request(sign(payload), APP_SECRET, now=NOW)


def test_missing_padding_is_handled_and_padding_accepted():
    # Lengths that need one and two padding characters.
    for user_id in ("1", "12", "123", "1234"):
        signed = sign({"algorithm": "HMAC-SHA256", "user_id": user_id})
        assert "=" not in signed
        assert parse_signed_request(signed, APP_SECRET, now=NOW)["user_id"] == user_id
    sig_part, payload_part = sign({"algorithm": "HMAC-SHA256", "user_id": "12"}).split(".")
    padded_sig = sig_part + "=" * (-len(sig_part) % 4)
    assert parse_signed_request(f"{padded_sig}.{payload_part}", APP_SECRET, now=NOW)["user_id"] == "12"


def test_expired_and_future_issued_at_are_refused():
    old = {"algorithm": "HMAC-SHA256", "user_id": "42", "issued_at": int(NOW) - 86400 - 1}
    with pytest.raises(SignedRequestError, match="expired"):
        parse_signed_request(sign(old), APP_SECRET, now=NOW)
    assert parse_signed_request(sign(old), APP_SECRET, now=NOW, max_age_seconds=90000)["user_id"] == "42"
    future = {"algorithm": "HMAC-SHA256", "user_id": "42", "issued_at": int(NOW) + 301}
    with pytest.raises(SignedRequestError, match="future"):
        parse_signed_request(sign(future), APP_SECRET, now=NOW)
    skewed = {"algorithm": "HMAC-SHA256", "user_id": "42", "issued_at": int(NOW) + 120}
    assert parse_signed_request(sign(skewed), APP_SECRET, now=NOW)["user_id"] == "42"
    for bad in ("yesterday", True, None):
        with pytest.raises(SignedRequestError, match="issued_at"):
            parse_signed_request(sign({**old, "issued_at": bad}), APP_SECRET, now=NOW)


def test_missing_or_non_string_user_id_is_refused():
    for payload in ({"algorithm": "HMAC-SHA256"}, {"algorithm": "HMAC-SHA256", "user_id": 42},
                    {"algorithm": "HMAC-SHA256", "user_id": ""}):
        with pytest.raises(SignedRequestError, match="user_id"):
            parse_signed_request(sign(payload), APP_SECRET, now=NOW)


@pytest.mark.parametrize(
    "garbage",
    ["", "   ", "nodot", ".", "a.", ".b", "a.b.c", "!!!.???", "abc.def", "a" * 5 + "." + "b" * 5,
     "ééé.ààà", f"{b64url(b'x' * 32)}.{b64url(b'not json')}"],
)
def test_garbage_is_refused_with_signed_request_error(garbage):
    with pytest.raises(SignedRequestError):
        parse_signed_request(garbage, APP_SECRET, now=NOW)


def test_validly_signed_non_object_or_non_json_payload_is_refused():
    with pytest.raises(SignedRequestError, match="not JSON"):
        parse_signed_request(sign(b"\xff\xfenot json"), APP_SECRET, now=NOW)
    with pytest.raises(SignedRequestError, match="JSON object"):
        parse_signed_request(sign(b"[1, 2]"), APP_SECRET, now=NOW)
    assert issubclass(SignedRequestError, ValueError)


def test_aggregate_status_over_a_requests_jobs():
    def job(status, done=None):
        return ErasureJob(id="er_x", workspace_id="w", scope="channels", target="t", status=status, completed_at=done)

    t1, t2 = datetime(2025, 1, 1, tzinfo=UTC), datetime(2025, 1, 2, tzinfo=UTC)
    assert aggregate_status([job("pending")]) == ("pending", None)
    assert aggregate_status([job("completed", t1), job("pending")]) == ("running", None)
    assert aggregate_status([job("running"), job("pending")]) == ("running", None)
    assert aggregate_status([job("completed", t1), job("failed")]) == ("failed", None)
    assert aggregate_status([job("completed", t2), job("completed", t1)]) == ("completed", t2)


# --------------------------------------------------------------- end to end


def meta_user() -> str:
    return str(10**16 + secrets.randbelow(10**16))


async def connect_meta_channel(stack, tenant: Tenant, user_id: str, platform: str = "instagram") -> tuple[dict, str]:
    """A sandbox Instagram/Page account granted by Meta user ``user_id``,
    connected with ``platform_user_id``. Returns (channel json, account id)."""
    account_id = str(17841400000000000 + secrets.randbelow(10**9))
    token = f"IGAA{secrets.token_hex(24)}" if platform == "instagram" else f"EAAB{secrets.token_hex(20)}"
    r = await stack.sandbox.post(
        "/_sandbox/accounts",
        json={"platform": platform, "account_id": account_id, "token": token, "user_id": user_id, "name": "Shop"},
    )
    assert r.status_code < 300, r.text
    r = await stack.api.post(
        "/v1/channels",
        json={"platform": platform, "access_token": token, "platform_user_id": user_id},
        headers=tenant.headers,
    )
    assert r.status_code == 201, r.text
    assert r.json()["status"] == "active"
    return r.json(), account_id


async def post_callback(stack, path: str, signed_request: str | None):
    data = {} if signed_request is None else {"signed_request": signed_request}
    return await stack.api.post(path, data=data)


def erasure_jobs(stack, target_prefix: str) -> list[ErasureJob]:
    with Session(stack.deps.engine) as db:
        return list(db.exec(select(ErasureJob).where(col(ErasureJob.target).startswith(target_prefix))).all())


def target_prefix(user_id: str) -> str:
    return f"meta-user:{hmac.new(APP_SECRET.encode(), f'meta-user:{user_id}'.encode(), hashlib.sha256).hexdigest()[:16]}"


async def test_deauthorize_disconnects_the_users_channels(stack):
    tenant = await create_tenant(stack)
    user_id = meta_user()
    channel, _ = await connect_meta_channel(stack, tenant, user_id)
    bystander, _ = await connect_meta_channel(stack, tenant, meta_user())
    url = "/webhooks/meta/deauthorize"

    # Forged, expired, malformed: 400 and nothing changes.
    assert (await post_callback(stack, url, sign(meta_payload(user_id), "not-the-secret"))).status_code == 400
    expired = meta_payload(user_id, issued_at=int(time.time()) - 2 * 86400)
    r = await post_callback(stack, url, sign(expired))
    assert r.status_code == 400 and "expired" in r.json()["detail"]
    assert (await post_callback(stack, url, "garbage")).status_code == 400
    r = await post_callback(stack, url, None)
    assert r.status_code == 400 and "signed_request" in r.json()["detail"]
    r = await stack.api.post(url, json={"signed_request": sign(meta_payload(user_id))})
    assert r.status_code in (400, 415)
    got = (await stack.api.get(f"/v1/channels/{channel['id']}", headers=tenant.headers)).json()
    assert got["status"] == "active"

    # Valid: the user's channel is disconnected, the bystander's is not.
    r = await post_callback(stack, url, sign(meta_payload(user_id)))
    assert r.status_code == 200, r.text
    assert r.json() == {"status": "ok", "channels": 1}

    async def disconnected():
        body = (await stack.api.get(f"/v1/channels/{channel['id']}", headers=tenant.headers)).json()
        return body["status"] == "disconnected"

    assert await wait_for(disconnected, timeout=15)
    revokes = (await stack.sandbox.get("/_sandbox/calls", params={"path_contains": "/permissions"})).json()["calls"]
    assert any(c["method"] == "DELETE" and f"/{user_id}/permissions" in c["path"] for c in revokes)
    with Session(stack.deps.engine) as db:
        row = db.get(Channel, channel["id"])
        assert row.status == "disconnected" and row.token_ciphertext is None
        entries = db.exec(
            select(AuditEntry).where(AuditEntry.action == "channel.deauthorized", AuditEntry.target == channel["id"])
        ).all()
        assert len(entries) == 1
        assert entries[0].actor == "platform:meta" and entries[0].workspace_id == tenant.workspace_id
        assert user_id not in entries[0].target + entries[0].detail
    other = (await stack.api.get(f"/v1/channels/{bystander['id']}", headers=tenant.headers)).json()
    assert other["status"] == "active"

    # Again (Meta retries): nothing left to disconnect. Unknown user: 200, 0.
    r = await post_callback(stack, url, sign(meta_payload(user_id)))
    assert r.status_code == 200 and r.json()["channels"] == 0
    r = await post_callback(stack, url, sign(meta_payload(meta_user())))
    assert r.status_code == 200 and r.json() == {"status": "ok", "channels": 0}


async def test_data_deletion_starts_erasure_and_gives_a_status_page(stack):
    tenant = await create_tenant(stack, name="Secret Shop Name")
    user_id = meta_user()
    channel, _ = await connect_meta_channel(stack, tenant, user_id)
    url = "/webhooks/meta/data-deletion"
    prefix = target_prefix(user_id)

    # Forged: 400 and no job.
    r = await post_callback(stack, url, sign(meta_payload(user_id), "not-the-secret"))
    assert r.status_code == 400
    assert erasure_jobs(stack, prefix) == []

    r = await post_callback(stack, url, sign(meta_payload(user_id)))
    assert r.status_code == 200, r.text
    body = r.json()
    code = body["confirmation_code"]
    assert code.startswith("er_") and len(code) == 23
    assert body["url"] == f"{stack.settings.public_url}/privacy/deletions/{code}"
    with Session(stack.deps.engine) as db:
        job = db.get(ErasureJob, code)
        assert job is not None
        assert job.scope == "channels" and job.source == "meta_data_deletion"
        assert job.workspace_id == tenant.workspace_id and job.target.startswith(prefix)
        assert user_id not in job.target
        # Keyed: a plain hash of the id (matchable against a list of known ids) is not kept either.
        assert hashlib.sha256(user_id.encode()).hexdigest()[:16] not in job.target

    # The status page: HTML for the person, JSON on request; no personal data.
    path = body["url"].removeprefix(stack.settings.public_url)
    page = await stack.api.get(path)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert f"Deletion request {code}" in page.text
    for secret in (user_id, tenant.workspace_id, "Secret Shop Name", channel["id"], channel["external_id"]):
        assert secret not in page.text
    status = (await stack.api.get(path, params={"format": "json"})).json()
    assert set(status) == {"confirmation_code", "status", "created_at", "completed_at"}
    assert status["confirmation_code"] == code
    assert status["status"] in ("pending", "running", "completed")
    by_accept = await stack.api.get(path, headers={"Accept": "application/json"})
    assert by_accept.json()["confirmation_code"] == code

    # Meta retries: the same code, no second job.
    again = await post_callback(stack, url, sign(meta_payload(user_id)))
    assert again.status_code == 200 and again.json()["confirmation_code"] == code
    assert len(erasure_jobs(stack, prefix)) == 1

    # Unknown and malformed codes: 404.
    assert (await stack.api.get(f"/privacy/deletions/er_{secrets.token_hex(10)}")).status_code == 404
    assert (await stack.api.get("/privacy/deletions/not-a-code")).status_code == 404


async def test_data_deletion_covers_every_workspace_and_disconnected_channels(stack):
    user_id = meta_user()
    first, second = await create_tenant(stack, name="A"), await create_tenant(stack, name="B")
    channel_a, _ = await connect_meta_channel(stack, first, user_id)
    channel_b, _ = await connect_meta_channel(stack, second, user_id, platform="messenger")
    r = await stack.api.delete(f"/v1/channels/{channel_a['id']}", headers=first.headers)
    assert r.status_code == 200 and r.json()["status"] == "disconnected"

    r = await post_callback(stack, "/webhooks/meta/data-deletion", sign(meta_payload(user_id)))
    assert r.status_code == 200, r.text
    code = r.json()["confirmation_code"]
    jobs = erasure_jobs(stack, target_prefix(user_id))
    assert {j.workspace_id for j in jobs} == {first.workspace_id, second.workspace_id}
    assert all(j.scope == "channels" and j.source == "meta_data_deletion" for j in jobs)
    assert code in {j.id for j in jobs}
    again = await post_callback(stack, "/webhooks/meta/data-deletion", sign(meta_payload(user_id)))
    assert again.json()["confirmation_code"] == code
    assert len(erasure_jobs(stack, target_prefix(user_id))) == 2


async def test_data_deletion_for_an_unknown_user_is_completed_at_once(stack):
    user_id = meta_user()
    r = await post_callback(stack, "/webhooks/meta/data-deletion", sign(meta_payload(user_id)))
    assert r.status_code == 200, r.text
    code = r.json()["confirmation_code"]
    path = r.json()["url"].removeprefix(stack.settings.public_url)
    status = (await stack.api.get(path, params={"format": "json"})).json()
    assert status["status"] == "completed" and status["completed_at"]
    page = await stack.api.get(path)
    assert page.status_code == 200 and "completed" in page.text and code in page.text and user_id not in page.text
    again = await post_callback(stack, "/webhooks/meta/data-deletion", sign(meta_payload(user_id)))
    assert again.json()["confirmation_code"] == code
    jobs = erasure_jobs(stack, target_prefix(user_id))
    assert len(jobs) == 1 and jobs[0].scope == "platform_user" and jobs[0].workspace_id == ""
