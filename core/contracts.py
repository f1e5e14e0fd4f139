"""Dataclasses that cross the Temporal boundary.

One input dataclass per workflow, activity, signal and query. Rules
(DESIGN.md §3): new fields always get defaults, secrets never appear here
(activities get a channel id and load the token themselves), and no field
holds configuration.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field
from typing import Any

# Workflow and activity names (stable: they are recorded in histories).
CONVERSATION_WORKFLOW = "ConversationWorkflow"
AUTOMATION_RUN_WORKFLOW = "AutomationRun"
CONNECT_CHANNEL_WORKFLOW = "ConnectChannel"
DISCONNECT_CHANNEL_WORKFLOW = "DisconnectChannel"
ERASE_CONTACT_WORKFLOW = "EraseContact"
ERASE_CHANNELS_WORKFLOW = "EraseChannels"
ERASE_WORKSPACE_WORKFLOW = "EraseWorkspace"
RETENTION_SWEEP_WORKFLOW = "RetentionSweep"
BROADCAST_WORKFLOW = "Broadcast"
REFRESH_TOKENS_WORKFLOW = "RefreshTokens"

class ErrorType:
    """The ``ApplicationError`` types activities raise and workflows (and
    their retry policies) act on; recorded in histories, so never renamed."""

    TOKEN_INVALID = "TokenInvalid"
    OUTSIDE_WINDOW = "OutsideMessagingWindow"
    PLATFORM_REJECTED = "PlatformRejected"
    CHANNEL_UNAVAILABLE = "ChannelUnavailable"
    PLATFORM_THROTTLED = "PlatformThrottled"
    PLATFORM_UNAVAILABLE = "PlatformUnavailable"
    ACCOUNT_ALREADY_CONNECTED = "AccountAlreadyConnected"
    CONTACT_GONE = "ContactGone"
    RATE_LIMITED = "RateLimited"
    UNRECORDABLE_EVENT = "UnrecordableEvent"
    AI_THROTTLED = "AiThrottled"
    AI_ERROR = "AiError"
    AI_UNAVAILABLE = "AiUnavailable"
    AI_EMPTY = "AiEmpty"


ERASURE_WORKFLOWS = {
    "contact": ERASE_CONTACT_WORKFLOW,
    "channels": ERASE_CHANNELS_WORKFLOW,
    "workspace": ERASE_WORKSPACE_WORKFLOW,
}


def contact_id_for(channel_id: str, platform_user_id: str, *, key: str) -> str:
    """The contact's id: a stable digest of channel + platform user id.

    Webhook handlers derive it without a database read (the channel's
    ``contact_key`` comes with its routing), and it carries no personal data
    into workflow ids or the Temporal UI: keyed (HMAC-SHA256 with the
    channel's key), a short platform id (a Telegram chat id) cannot be found
    by trying every value. An empty key gives the unkeyed digest of channels
    connected before keyed ids.
    """
    message = f"{channel_id}\x00{platform_user_id}".encode()
    if key:
        digest = hmac.new(key.encode(), message, hashlib.sha256).hexdigest()
    else:
        digest = hashlib.sha256(message).hexdigest()
    return f"ct_{digest[:20]}"


def broadcast_workflow_id(workspace_id: str, broadcast_id: str) -> str:
    """Also the prefix of its messages' idempotency keys."""
    return f"{workspace_id}/broadcast/{broadcast_id}"


def conversation_workflow_id(workspace_id: str, channel_id: str, contact_id: str) -> str:
    return f"{workspace_id}/conv/{channel_id}/{contact_id}"


@dataclass
class Attachment:
    type: str
    url: str = ""


@dataclass
class InboundEvent:
    """One platform event, normalised from a Meta or Telegram webhook.

    ``kind`` is one of: message, postback, referral, reaction, seen,
    comment, story_mention. A DM that replies to a story is a ``message``
    with ``story_url`` set. ``event_id`` is the platform's own id (message
    mid, postback mid, comment id, Telegram update id): the dedupe key.
    """

    event_id: str
    platform: str  # instagram | messenger | telegram
    account_id: str  # the business account the event was sent to
    sender_id: str  # the person's platform-scoped id (IGSID / PSID / chat id)
    kind: str
    text: str = ""
    payload: str = ""  # postback / quick-reply / callback payload
    ref: str = ""  # referral ref (ig.me / m.me links)
    attachments: list[Attachment] = field(default_factory=list)
    timestamp_ms: int = 0
    first_name: str = ""
    last_name: str = ""
    username: str = ""
    callback_query_id: str = ""  # Telegram inline-button callbacks
    # Comments (Instagram `comments`, Page `feed`): the comment and its post.
    comment_id: str = ""
    media_id: str = ""
    is_top_level_comment: bool = True
    # Story replies (message.reply_to.story) and mentions: the CDN URL only.
    story_url: str = ""
    # Some text of the event was longer than the platform's maximum and was
    # cut to it (core/inbound.py); stored with the message.
    truncated: bool = False


@dataclass
class ConversationInput:
    workspace_id: str
    channel_id: str
    platform: str
    contact_id: str
    contact_external_id: str
    # Carried across continue-as-new.
    seen_event_ids: list[str] = field(default_factory=list)
    active_run: ActiveRun | None = None
    human_takeover: bool = False
    events_handled: int = 0
    # Events handed over with the start itself (an eager start: the API's
    # ingress worker, api/ingress.py), handled before any signal.
    first_events: list[InboundEvent] = field(default_factory=list)


@dataclass
class ActiveRun:
    workflow_id: str
    automation_id: str
    accepting_input: bool = False


@dataclass
class StartAutomationSignal:
    """Start an automation for this contact (API start)."""

    run_id: str
    automation: AutomationSnapshot
    context: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunStateSignal:
    """AutomationRun -> its conversation: input acceptance and completion."""

    run_workflow_id: str
    state: str  # accepting_input | not_accepting | finished | handoff | returned_input
    # returned_input: a reply that reached the run after it stopped waiting
    # (e.g. at its timeout); the conversation matches it against triggers.
    event: InboundEvent | None = None


@dataclass
class ResumeSignal:
    reason: str = "resumed through the API"


@dataclass
class StopRunsSignal:
    """Cancel the conversation's active run (processing restricted or consent
    withdrawn). Handled in event order, so a run whose start is under way
    when this arrives is cancelled too."""

    reason: str = "processing restricted"


@dataclass
class ExpireHistorySignal:
    """From the retention sweep: a conversation whose run started before the
    cutoff continues as new, so the run holding the person's older messages
    closes and the sweep can delete it. Ignored by a run that started after
    the cutoff (a redelivered or late signal)."""

    cutoff_epoch_seconds: float


@dataclass
class AutomationSnapshot:
    """An automation pinned at one version; a run interprets only this."""

    id: str
    version: int
    name: str
    definition: dict[str, Any]


@dataclass
class ContactSnapshot:
    id: str
    external_id: str
    first_name: str = ""
    last_name: str = ""
    username: str = ""
    fields: dict[str, Any] = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)
    human_takeover: bool = False
    # New, or without any name yet (a Meta contact whose lookup failed, or
    # who wrote before lookups followed messages that start nothing): its
    # profile is still to be looked up (``flowrt.needs_profile``).
    is_new: bool = False
    processing_restricted: bool = False
    consent_withdrawn: bool = False


@dataclass
class RecordInboundInput:
    workspace_id: str
    channel_id: str
    contact_id: str
    event: InboundEvent
    # Who records the event (the conversation's run and the event's place in
    # it): an attempt that finds the event recorded by the same recorder is
    # a retry of its own (a worker crash after the commit), not a redelivery.
    recorder: str = ""
    # The conversation leaves the reply to this activity (nothing in the
    # workflow's state stops one): it matches the triggers and, when the
    # flow opens with a message, sends it (``RecordInboundResult.first_send``).
    first_reply: bool = False
    platform: str = ""
    # The conversation's trigger-matching rules (core/flowrt.py ``MATCHING``):
    # this activity's matching must pick the automation the workflow picks.
    matching: int = 1


@dataclass
class FirstSend:
    """The opening message of the matched flow, sent by ``record_inbound``
    under the idempotency key of the run's own first send."""

    run_id: str
    step_id: str
    result: SendMessageResult | None = None
    error_type: str = ""  # the send failed: the run sends it durably


@dataclass
class RecordInboundResult:
    duplicate: bool
    # The contact with only the fields the matched automation reads, and that
    # automation (none: the event starts nothing), not the channel's every one.
    contact: ContactSnapshot | None = None
    automations: list[AutomationSnapshot] = field(default_factory=list)
    channel_active: bool = True
    has_previous_inbound: bool = False
    first_send: FirstSend | None = None


@dataclass
class RunInput:
    run_id: str  # also the workflow id
    workspace_id: str
    channel_id: str
    platform: str
    contact: ContactSnapshot
    automation: AutomationSnapshot
    conversation_workflow_id: str = ""
    trigger: InboundEvent | None = None
    context: dict[str, Any] = field(default_factory=dict)
    # The conversation sent the first message already and forwards answers to
    # this run from its start (the prompt may be answered before it runs).
    accepting_from_start: bool = False


@dataclass
class ReplySignal:
    event: InboundEvent


@dataclass
class ExternalEventSignal:
    name: str
    payload: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrailEntry:
    step_id: str
    type: str
    status: str  # started | done | skipped | failed | waiting | timed_out | invalid
    at: str
    detail: str = ""


@dataclass
class RunStatus:
    run_id: str
    automation_id: str
    version: int
    status: str  # running | waiting | completed | failed | cancelled
    current_step: str = ""
    trail: list[TrailEntry] = field(default_factory=list)


@dataclass
class RunResult:
    status: str
    trail: list[TrailEntry] = field(default_factory=list)


@dataclass
class RecordRunInput:
    run_id: str
    workspace_id: str
    channel_id: str
    contact_id: str
    automation_id: str
    version: int
    status: str
    trail: list[TrailEntry] = field(default_factory=list)


@dataclass
class QuickReply:
    title: str
    payload: str = ""


@dataclass
class Button:
    title: str
    payload: str = ""
    url: str = ""


@dataclass
class SendMessageInput:
    channel_id: str
    contact_id: str
    recipient_id: str
    idempotency_key: str
    text: str
    quick_replies: list[QuickReply] = field(default_factory=list)
    buttons: list[Button] = field(default_factory=list)
    run_id: str = ""
    # A private reply to this comment instead of a DM (allowed within 7 days
    # of the comment, once per comment; it opens no messaging window).
    comment_id: str = ""
    # A human-written reply (API): Meta's HUMAN_AGENT tag, 7-day window.
    human_agent: bool = False
    # The run this message completes (a one-message flow sent from its
    # conversation): recorded as soon as the message is sent or found sent.
    completes_run: RecordRunInput | None = None
    # A new Meta contact: once the message is sent (or found sent), look up
    # their profile and fill in their name (best effort, never fails the
    # send; the result's ``contact``).
    then_fetch_profile: bool = False
    # A new Meta contact and a message that uses their name: look the
    # profile up first, then send this template rendered for them (``text``,
    # rendered without the profile, is sent when the lookup gives nothing).
    profile_first_template: str = ""


@dataclass
class PublicReplyInput:
    channel_id: str
    comment_id: str
    text: str
    idempotency_key: str


@dataclass
class HumanMessageInput:
    """Update input: a human-written message sent through the API
    (``POST /v1/contacts/{id}/messages``)."""

    request_id: str
    text: str


@dataclass
class HumanMessageResult:
    status: str  # sent | skipped | failed
    platform_message_id: str = ""
    detail: str = ""


@dataclass
class SendMessageResult:
    platform_message_id: str
    deduplicated: bool = False
    # ``then_fetch_profile`` / ``profile_first_template``: the lookup was
    # made (``contact`` is None when the platform gave no profile).
    profile_looked_up: bool = False
    contact: ContactSnapshot | None = None
    # The text sent, when the activity rendered it (``profile_first_template``).
    text: str = ""


@dataclass
class UpdateContactInput:
    contact_id: str
    add_tags: list[str] = field(default_factory=list)
    remove_tags: list[str] = field(default_factory=list)
    set_fields: dict[str, Any] = field(default_factory=dict)
    human_takeover: bool | None = None


@dataclass
class GenerateReplyInput:
    workspace_id: str
    contact_id: str
    instructions: str
    run_id: str = ""
    max_history: int = 0  # 0: the configured default


@dataclass
class GenerateReplyResult:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class ChannelRef:
    channel_id: str


@dataclass
class ConnectChannelInput:
    workspace_id: str
    channel_id: str
    platform: str


@dataclass
class ChannelVerified:
    external_id: str
    name: str = ""


@dataclass
class RevokeResult:
    revoked: bool
    detail: str = ""


@dataclass
class DisconnectResult:
    revoked: bool
    stopped_workflows: int = 0
    detail: str = ""


@dataclass
class PurgeDataInput:
    """What to purge. ``scope``: channel_tokens (for now)."""

    scope: str
    channel_id: str = ""


@dataclass
class StopWorkflowsResult:
    stopped: int = 0  # terminated
    histories_deleted: int = 0  # a contact's or channel's executions deleted from Temporal


@dataclass
class ContactRef:
    contact_id: str


@dataclass
class ProfileInput:
    channel_id: str
    contact_id: str
    external_id: str


@dataclass
class ChannelStatusInput:
    channel_id: str
    status: str
    detail: str = ""


@dataclass
class ConnectResult:
    status: str  # active | failed
    detail: str = ""
    external_id: str = ""


@dataclass
class AckCallbackInput:
    channel_id: str
    callback_query_id: str



@dataclass
class EraseInput:
    """Erase a contact, some channels (a Meta user's deletion request) or a
    whole workspace. Erasure workflows run in the system key scope (their
    ids do not start with the workspace id) so that destroying the
    workspace's data keys never locks them out of their own history."""

    job_id: str
    workspace_id: str
    scope: str  # contact | channels | workspace
    contact_id: str = ""
    channel_ids: list[str] = field(default_factory=list)


@dataclass
class EraseStepInput:
    job_id: str
    workspace_id: str
    scope: str
    contact_id: str = ""
    channel_ids: list[str] = field(default_factory=list)


@dataclass
class JobStatusInput:
    job_id: str
    status: str
    detail: str = ""


@dataclass
class RetentionSweepInput:
    """Input of the daily RetentionSweep workflow (fields may be added)."""

    now_iso: str = ""  # empty: the workflow's clock (tests and operators set a time)


@dataclass
class RetentionInput:
    now_iso: str  # the workflow's clock, so tests can inject time


@dataclass
class RetentionResult:
    messages_deleted: int = 0
    runs_deleted: int = 0
    # Temporal: conversations asked to continue as new, closed executions
    # deleted, and other executions still running that started before the
    # cutoff (their history keeps their input until they end).
    conversations_rotated: int = 0
    histories_deleted: int = 0
    running_past_period: int = 0
    # Inbox events set aside as undeliverable (api/inbox.py), past the period.
    dead_letters_deleted: int = 0


@dataclass
class BroadcastInput:
    """Carried across continue-as-new: the cursor and the counts so far."""

    broadcast_id: str
    workspace_id: str
    channel_id: str
    text: str  # may hold {{contact.*}} placeholders, rendered per recipient by the batch
    segment: dict[str, Any] = field(default_factory=dict)
    after_contact_id: str = ""
    sent: int = 0
    failed: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    quick_replies: list[QuickReply] = field(default_factory=list)
    buttons: list[Button] = field(default_factory=list)


@dataclass
class BroadcastPageInput:
    broadcast_id: str
    workspace_id: str
    channel_id: str
    segment: dict[str, Any] = field(default_factory=dict)
    after_contact_id: str = ""
    limit: int = 200
    now_iso: str = ""


@dataclass
class Recipient:
    contact_id: str
    external_id: str


@dataclass
class BroadcastPage:
    recipients: list[Recipient] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count (restricted, outside_window, ...)
    next_after: str = ""  # "" when this was the last page


@dataclass
class BroadcastBatchInput:
    """One page of a broadcast, sent in order by one activity. Each message's
    idempotency key is ``<key_prefix>/<contact id>``; ``text`` is rendered
    for each recipient (``{{contact.*}}``) by the activity, from the
    database, so names never enter the workflow's history."""

    channel_id: str
    text: str
    key_prefix: str
    recipients: list[Recipient] = field(default_factory=list)
    quick_replies: list[QuickReply] = field(default_factory=list)
    buttons: list[Button] = field(default_factory=list)


@dataclass
class BroadcastBatchResult:
    sent: int = 0
    failed: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    # Why the channel cannot send any more (token invalid, disconnected): the
    # batch stopped there and the broadcast fails.
    stopped: str = ""


@dataclass
class BroadcastProgress:
    broadcast_id: str
    status: str
    sent: int = 0
    failed: int = 0
    skipped: dict[str, int] = field(default_factory=dict)


@dataclass
class RefreshTokensInput:
    """Refresh tokens expiring before now + ``within_days`` (the daily schedule)."""

    within_days: int = 10
    now_iso: str = ""


@dataclass
class RefreshTokensResult:
    refreshed: int = 0
    failed: list[str] = field(default_factory=list)  # channel ids (reason in the channel's status detail)
