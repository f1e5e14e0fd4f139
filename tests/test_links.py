"""Every link the API hands out resolves: the erasures' ``status_url`` (a
contact, a workspace) and the Meta data-deletion callback's ``url``, before
and after the erasure completes, and after a workspace erasure, when the API
key is dead but the link must still answer."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import text
from sqlmodel import Session
from test_privacy_callbacks import connect_meta_channel, meta_payload, meta_user, post_callback, sign

from helpers import (
    connect_instagram,
    contact_id_of,
    create_tenant,
    new_sender,
    send_dm,
    wait_for,
)

# Every response field named like a link, by operation: ours to resolve
# (followed by the test below), or someone else's URL carried as given.
OUR_LINKS = {
    ("erase_contact", ".status_url"),
    ("erase_workspace", ".status_url"),
    ("get_erasure", ".status_url"),
    ("meta_data_deletion_callback", ".url"),
}
FOREIGN_LINKS = {  # a broadcast's URL buttons: the business's own pages
    ("create_broadcast", ".buttons[].url"),
    ("get_broadcast", ".buttons[].url"),
    ("cancel_broadcast", ".buttons[].url"),
    ("list_broadcasts", ".data[].buttons[].url"),
}


def link_fields(spec: dict) -> set[tuple[str, str]]:
    """(operation id, field path) of every property of a 2xx JSON response
    whose name ends in "url" or whose format is a URI."""
    schemas = spec.get("components", {}).get("schemas", {})
    found: set[tuple[str, str]] = set()

    def walk(schema: dict, path: str, operation: str, seen: frozenset[str]) -> None:
        if "$ref" in schema:
            name = schema["$ref"].rsplit("/", 1)[-1]
            if name not in seen:
                walk(schemas[name], path, operation, seen | {name})
            return
        for key in ("anyOf", "oneOf", "allOf"):
            for sub in schema.get(key, []):
                walk(sub, path, operation, seen)
        if isinstance(schema.get("items"), dict):
            walk(schema["items"], f"{path}[]", operation, seen)
        if isinstance(schema.get("additionalProperties"), dict):
            walk(schema["additionalProperties"], f"{path}{{}}", operation, seen)
        for name, sub in schema.get("properties", {}).items():
            if name.lower().endswith("url") or sub.get("format") in ("uri", "url"):
                found.add((operation, f"{path}.{name}"))
            walk(sub, f"{path}.{name}", operation, seen)

    for operations in spec["paths"].values():
        for operation in operations.values():
            for code, response in operation.get("responses", {}).items():
                if code.startswith("2"):
                    for content in response.get("content", {}).values():
                        walk(content.get("schema", {}), "", operation["operationId"], frozenset())
    return found


async def test_every_link_field_the_api_documents_is_known_to_this_test(stack):
    """A new link in a response fails here until the test below follows it
    (or it is listed as someone else's URL)."""
    spec = (await stack.api.get("/openapi.json")).json()
    assert link_fields(spec) == OUR_LINKS | FOREIGN_LINKS


def our_links(body: Any, base: str) -> list[str]:
    """Every string in a JSON body that points at this API."""
    if isinstance(body, dict):
        return [link for value in body.values() for link in our_links(value, base)]
    if isinstance(body, list):
        return [link for value in body for link in our_links(value, base)]
    return [body] if isinstance(body, str) and body.startswith(base) else []


async def erase_everything(stack, tenant, contact_id: str, meta_user_id: str) -> list[str]:
    """Erase a contact, a Meta user with a channel, a Meta user we hold
    nothing about and the workspace, with no worker running: the links of
    their answers, each checked while its erasure waits."""
    base = stack.settings.public_url
    responses: list[dict] = []
    await stack.stop_worker()
    try:
        r = await stack.api.delete(f"/v1/contacts/{contact_id}", headers=tenant.headers)
        assert r.status_code == 202, r.text
        responses.append(r.json())
        r = await stack.api.get(f"/v1/erasures/{r.json()['id']}", headers=tenant.headers)
        assert r.status_code == 200, r.text
        responses.append(r.json())
        for user_id in (meta_user_id, meta_user()):
            r = await post_callback(stack, "/webhooks/meta/data-deletion", sign(meta_payload(user_id)))
            assert r.status_code == 200, r.text
            responses.append(r.json())
        r = await stack.api.delete("/v1/workspace", headers=tenant.headers)
        assert r.status_code == 202, r.text
        responses.append(r.json())

        links = sorted({link for body in responses for link in our_links(body, base)})
        assert len(links) == 4  # the contact's, the two Meta requests', the workspace's
        statuses = []
        for link in links:
            page = await stack.api.get(link.removeprefix(base))  # no API key
            assert page.status_code == 200, (link, page.text)
            assert "Deletion request" in page.text
            statuses.append(
                (await stack.api.get(link.removeprefix(base), params={"format": "json"})).json()["status"]
            )
        # Nothing held about the second Meta user: complete at once; the others wait for the worker.
        assert sorted(statuses) == ["completed", "pending", "pending", "pending"]
    finally:
        await stack.start_worker()
    return links


async def test_every_erasure_link_resolves_before_and_after_completion_and_after_the_workspace_is_gone(stack):
    base = stack.settings.public_url
    tenant = await create_tenant(stack, name="Linkshop")
    channel, account_id, token = await connect_instagram(stack, tenant)
    erased, other = new_sender(), new_sender()
    for person, name in ((erased, "Xavier Linkfollower"), (other, "Yolanda Linkfollower")):
        await stack.sandbox.post("/_sandbox/profiles", json={"user_id": person, "name": name})
        await send_dm(stack, account_id, person, "hello")

    async def contacts_recorded():
        for person in (erased, other):
            contact = contact_id_of(stack, channel["id"], person)
            if (await stack.api.get(f"/v1/contacts/{contact}", headers=tenant.headers)).status_code != 200:
                return False
        return True

    assert await wait_for(contacts_recorded)
    meta_tenant = await create_tenant(stack, name="Metashop")
    meta_user_id = meta_user()
    await connect_meta_channel(stack, meta_tenant, meta_user_id)
    # Its revoke fails with a message that names the user, as Graph's do.
    await stack.sandbox.post(
        "/_sandbox/faults",
        json={
            "service": "instagram",
            "method": "DELETE",
            "path_contains": f"/{meta_user_id}/permissions",
            "kind": "custom",
            "times": -1,
            "status": 400,
            "body": {
                "error": {
                    "message": f"Unsupported delete request. Object with ID '{meta_user_id}' does not exist",
                    "code": 100,
                    "type": "GraphMethodException",
                    "fbtrace_id": "Ab",
                }
            },
        },
    )
    try:
        links = await erase_everything(
            stack, tenant, contact_id_of(stack, channel["id"], erased), meta_user_id
        )

        async def all_completed():
            for link in links:
                r = await stack.api.get(link.removeprefix(base), params={"format": "json"})
                if r.status_code != 200 or r.json()["status"] != "completed":
                    return False
            return True

        assert await wait_for(all_completed, timeout=60, interval=0.3)
    finally:
        await stack.sandbox.delete("/_sandbox/faults")
    # The workspace is gone and its key with it; its links still answer.
    assert (await stack.api.get("/v1/workspace", headers=tenant.headers)).status_code == 401
    for link in links:
        page = await stack.api.get(link.removeprefix(base))
        assert page.status_code == 200 and "completed" in page.text
        body = (await stack.api.get(link.removeprefix(base), headers={"Accept": "application/json"})).json()
        assert body["status"] == "completed" and body["completed_at"]
    # What survives of the jobs names nobody: no platform id (not even in a
    # failed revoke's note), name, token or account; only ids, kinds,
    # statuses, times and counts.
    codes = {link.rsplit("/", 1)[-1] for link in links}
    with Session(stack.deps.engine) as db:
        rows = [row for row in db.exec(text("select * from erasurejob")).all() if row.id in codes]
    assert sorted(row.scope for row in rows) == ["channels", "contact", "platform_user", "workspace"]
    assert "revoke failed (PlatformRejected)" in next(row.detail for row in rows if row.scope == "channels")
    dumped = json.dumps([[str(v) for v in row] for row in rows])
    for secret in (
        erased,
        other,
        "Linkfollower",
        "Xavier",
        "Yolanda",
        account_id,
        token,
        "hello",
        meta_user_id,
    ):
        assert secret not in dumped
