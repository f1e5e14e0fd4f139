"""Comment → DM, story mentions and replies, ig.me ref links, end to end."""

from __future__ import annotations

import asyncio

from sandbox import payloads

from helpers import (
    connect_instagram,
    contact_id_of,
    create_automation,
    create_tenant,
    new_sender,
    post_meta,
    sandbox_messages,
    send_dm,
    text_of,
    wait_for,
    wait_for_messages,
)

# Comment ids are digits (core/ids.py); new ones each session (the sandbox keeps one private reply per id).
C_1, C_2, C_3, C_P1 = (new_sender() for _ in range(4))


async def private_replies(stack, comment_id=None):
    calls = (await stack.sandbox.get("/_sandbox/calls", params={"path_contains": "/messages"})).json()["calls"]
    return [c for c in calls if c["status"] < 400 and "comment_id" in (c["json"] or {}).get("recipient", {})
            and (comment_id is None or c["json"]["recipient"]["comment_id"] == comment_id)]


async def test_comment_keyword_gets_one_private_reply_a_public_reply_and_the_flow_waits_for_the_person(stack):
    tenant = await create_tenant(stack)
    channel, account_id, _ = await connect_instagram(stack, tenant)
    await create_automation(
        stack, tenant, channel["id"],
        {"type": "comment", "media_ids": ["media_1"], "keywords": ["guide"],
         "public_replies": ["Sent you a DM!", "Check your inbox!"]},
        [{"id": "dm", "type": "send_message", "text": "Here is the guide: https://example.com/guide"},
         {"id": "more", "type": "send_message", "text": "Want the advanced version too?"}],
    )
    person = new_sender()
    r = await post_meta(stack, payloads.instagram_comment(account_id, person, "GUIDE please", media_id="media_1",
                                                          comment_id=C_1))
    assert r.status_code == 200 and r.json()["dispatched"] == 1

    async def replied():
        return await private_replies(stack, C_1)

    calls = await wait_for(replied)
    assert calls and text_of(calls[0]) == "Here is the guide: https://example.com/guide"
    async def public_replies():
        return [p for p in (await stack.sandbox.get("/_sandbox/comment_replies")).json()["replies"]
                if p["comment_id"] == C_1]

    public = await wait_for(public_replies)
    assert len(public) == 1 and public[0]["message"] in ("Sent you a DM!", "Check your inbox!")

    # Same person, same post, same automation: no second private reply.
    await post_meta(stack, payloads.instagram_comment(account_id, person, "guide again", media_id="media_1",
                                                      comment_id=C_2))
    # The account's own comment never triggers.
    await post_meta(stack, payloads.instagram_comment(account_id, account_id, "guide", media_id="media_1",
                                                      comment_id=C_3))
    await asyncio.sleep(1.5)
    assert len(await private_replies(stack, C_1)) == 1
    assert await private_replies(stack, C_2) == [] and await private_replies(stack, C_3) == []
    # The second step waits: a private reply opens no window until the person writes.
    assert await sandbox_messages(stack, person) == []
    await send_dm(stack, account_id, person, "thanks!")
    calls = await wait_for_messages(stack, person, 1)
    assert text_of(calls[0]) == "Want the advanced version too?"


async def test_story_mention_and_ref_link_trigger_their_automations(stack):
    tenant = await create_tenant(stack)
    channel, account_id, _ = await connect_instagram(stack, tenant)
    await create_automation(stack, tenant, channel["id"], {"type": "story_mention"},
                            [{"id": "s", "type": "send_message", "text": "Thanks for the mention!"}])
    await create_automation(stack, tenant, channel["id"], {"type": "ref_link", "refs": ["summer*"]},
                            [{"id": "r", "type": "send_message", "text": "Summer sale: 20% off"}])
    await create_automation(stack, tenant, channel["id"], {"type": "story_reply"},
                            [{"id": "sr", "type": "send_message", "text": "Glad you liked the story"}])
    fan, visitor, replier = new_sender(), new_sender(), new_sender()
    mention = payloads.story_mention(account_id, fan, "https://cdn.example/story/1.jpg")
    await post_meta(stack, payloads.instagram_webhook({account_id: [mention]}))
    link = payloads.referral(account_id, visitor, "SUMMER_2026")
    await post_meta(stack, payloads.instagram_webhook({account_id: [link]}))
    reply = payloads.story_reply(account_id, replier, "love it", "https://cdn.example/story/2.jpg")
    await post_meta(stack, payloads.instagram_webhook({account_id: [reply]}))
    assert text_of((await wait_for_messages(stack, fan, 1))[0]) == "Thanks for the mention!"
    assert text_of((await wait_for_messages(stack, visitor, 1))[0]) == "Summer sale: 20% off"
    assert text_of((await wait_for_messages(stack, replier, 1))[0]) == "Glad you liked the story"
    # The mention is logged with its CDN URL, never the media.
    contacts = (await stack.api.get("/v1/contacts", headers=tenant.headers)).json()["data"]
    fan_contact = next(c for c in contacts if c["external_id"] == fan)
    log = (await stack.api.get(f"/v1/contacts/{fan_contact['id']}/messages", headers=tenant.headers)).json()
    assert log["data"][-1]["kind"] == "story_mention"


async def test_a_commenters_conversation_yields_to_a_dm_senders_when_tasks_back_up(stack):
    """Task queue priority: a conversation a comment starts (and its runs and
    activities, which inherit it) runs at bulk priority, one a DM starts at
    the conversational one, so a post drawing thousands of comments does not
    hold up other people's DMs in Temporal's queues."""
    from core.contracts import conversation_workflow_id
    from workflows.common import BULK_PRIORITY, CONVERSATION_PRIORITY

    tenant = await create_tenant(stack)
    channel, account_id, _ = await connect_instagram(stack, tenant)
    await create_automation(
        stack, tenant, channel["id"], {"type": "comment", "media_ids": ["media_p"]},
        [{"id": "dm", "type": "send_message", "text": "Here is the link"}],
    )
    commenter, writer = new_sender(), new_sender()
    await post_meta(stack, payloads.instagram_comment(account_id, commenter, "link?", media_id="media_p",
                                                      comment_id=C_P1))
    await send_dm(stack, account_id, writer, "hello")

    async def priority_of(person: str) -> int:
        contact = contact_id_of(stack, channel["id"], person)
        handle = stack.client.get_workflow_handle(conversation_workflow_id(tenant.workspace_id, channel["id"], contact))
        return (await handle.describe()).raw_description.workflow_execution_info.priority.priority_key

    assert await wait_for(lambda: private_replies(stack, C_P1))  # the comment's run answered
    assert await priority_of(commenter) == BULK_PRIORITY.priority_key == 4
    assert await priority_of(writer) == CONVERSATION_PRIORITY.priority_key == 2
    run = [wf async for wf in stack.client.list_workflows(f"ContactId = '{contact_id_of(stack, channel['id'], commenter)}'"
                                                           " AND WorkflowType = 'AutomationRun'")]
    assert run and (await stack.client.get_workflow_handle(run[0].id).describe()
                    ).raw_description.workflow_execution_info.priority.priority_key == 4  # inherited


async def test_each_events_history_carries_only_the_automation_it_starts(stack):
    """What the conversation's history keeps of the channel's automations,
    per event: only the one the event starts (none when it starts nothing),
    not every active automation, so a channel with many flows does not grow
    each conversation's history (and the Temporal store) by all of them."""
    from temporalio.api.enums.v1 import EventType

    from core.contracts import conversation_workflow_id

    tenant = await create_tenant(stack)
    channel, account_id, _ = await connect_instagram(stack, tenant)
    flows = {}
    for keyword in ("menu", "price", "hours"):
        flows[keyword] = await create_automation(
            stack, tenant, channel["id"], {"type": "dm_keyword", "keywords": [keyword]},
            [{"id": "a", "type": "send_message", "text": f"About {keyword}"}],
        )
    person = new_sender()
    await send_dm(stack, account_id, person, "the price please")
    assert text_of((await wait_for_messages(stack, person, 1))[0]) == "About price"
    await send_dm(stack, account_id, person, "thanks, bye")
    handle = stack.client.get_workflow_handle(
        conversation_workflow_id(tenant.workspace_id, channel["id"], contact_id_of(stack, channel["id"], person))
    )

    async def recorded():
        results = []
        async for event in handle.fetch_history_events():
            if event.event_type != EventType.EVENT_TYPE_MARKER_RECORDED:
                continue
            details = event.marker_recorded_event_attributes.details
            if "result" not in details or b"record_inbound" not in details["data"].payloads[0].data:
                continue
            [result] = await stack.client.data_converter.decode(details["result"].payloads)  # decrypted
            results.append(result)
        return len(results) == 2 and results

    results = await wait_for(recorded)
    assert results, "the two events were not recorded"
    assert [[a["id"] for a in r["automations"]] for r in results] == [[flows["price"]["id"]], []]
    assert len(await sandbox_messages(stack, person)) == 1


async def test_a_crafted_message_against_a_customers_regex_does_not_stall_other_conversations(stack):
    """``^(a+)+$`` against 40 characters: Python's backtracking re held the
    worker (and every tenant's conversations on it) for hours; on RE2 it is
    a non-match at once and the next person is answered as usual."""
    tenant = await create_tenant(stack)
    channel, account_id, _ = await connect_instagram(stack, tenant)
    await create_automation(stack, tenant, channel["id"], {"type": "dm_keyword", "match": "regex",
                                                           "keywords": ["^(a+)+$"]},
                            [{"id": "a", "type": "send_message", "text": "all a"}])
    await create_automation(stack, tenant, channel["id"], {"type": "dm_keyword", "keywords": ["hello"]},
                            [{"id": "a", "type": "send_message", "text": "Hi"}])
    attacker, other = new_sender(), new_sender()
    await send_dm(stack, account_id, attacker, "a" * 40 + "!")
    await send_dm(stack, account_id, other, "hello")
    assert [text_of(c) for c in await wait_for_messages(stack, other, 1, timeout=20)] == ["Hi"]
    await send_dm(stack, account_id, attacker, "a" * 40)
    assert [text_of(c) for c in await wait_for_messages(stack, attacker, 1, timeout=20)] == ["all a"]


async def test_a_comment_does_not_cancel_a_run_waiting_for_the_persons_reply_and_a_photo_answers_one(stack):
    tenant = await create_tenant(stack)
    channel, account_id, _ = await connect_instagram(stack, tenant)
    await create_automation(stack, tenant, channel["id"], {"type": "dm_keyword", "keywords": ["email"]}, [
        {"id": "ask", "type": "send_message", "text": "Email?"},
        {"id": "w", "type": "wait_for_reply", "validate": "email", "save_to_field": "email"},
        {"id": "ok", "type": "send_message", "text": "Thanks {{contact.fields.email}}"},
    ])
    await create_automation(stack, tenant, channel["id"], {"type": "comment"},
                            [{"id": "c", "type": "send_message", "text": "Thx for the comment"}])
    await create_automation(stack, tenant, channel["id"], {"type": "dm_keyword", "keywords": ["receipt"]}, [
        {"id": "ask", "type": "send_message", "text": "Send a photo of it"},
        {"id": "w", "type": "wait_for_reply", "max_retries": 0, "save_to_field": "receipt", "on_invalid": "bad"},
        {"id": "ok", "type": "send_message", "text": "Got it", "next": "end"},
        {"id": "bad", "type": "send_message", "text": "Invalid reply"},
    ])
    person = new_sender()
    await send_dm(stack, account_id, person, "email")
    await wait_for_messages(stack, person, 1)
    # A comment while the run waits for the email: not their answer, and the run keeps waiting.
    r = await post_meta(stack, payloads.instagram_comment(account_id, person, "nice", media_id="m1"))
    assert r.status_code == 200
    await asyncio.sleep(1.5)
    await send_dm(stack, account_id, person, "me@example.com")
    calls = await wait_for_messages(stack, person, 2, timeout=15)
    assert [text_of(c) for c in calls] == ["Email?", "Thanks me@example.com"]
    # A photo answers a reply that asks for no particular format.
    await send_dm(stack, account_id, person, "receipt")
    await wait_for_messages(stack, person, 3)
    item = payloads.instagram_dm(account_id, person, attachments=[("image", "https://cdn.example/r.jpg")])
    assert (await post_meta(stack, payloads.instagram_webhook({account_id: [item]}))).status_code == 200
    calls = await wait_for_messages(stack, person, 4, timeout=15)
    assert text_of(calls[3]) == "Got it"
    contact = (await stack.api.get("/v1/contacts", headers=tenant.headers)).json()["data"][0]
    assert contact["fields"]["receipt"] == "https://cdn.example/r.jpg"
