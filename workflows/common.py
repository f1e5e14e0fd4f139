"""Deterministic helpers shared by workflows: search attributes, retry policies, matching rules."""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import (
    Priority,
    RetryPolicy,
    SearchAttributeKey,
    SearchAttributePair,
    TypedSearchAttributes,
)
from temporalio.exceptions import ActivityError, ApplicationError, TimeoutError

from core.contracts import ErrorType

WORKSPACE_ID = SearchAttributeKey.for_keyword("WorkspaceId")
CHANNEL_ID = SearchAttributeKey.for_keyword("ChannelId")
CONTACT_ID = SearchAttributeKey.for_keyword("ContactId")
AUTOMATION_ID = SearchAttributeKey.for_keyword("AutomationId")
PLATFORM = SearchAttributeKey.for_keyword("Platform")


def search_attributes(
    workspace_id: str, channel_id: str = "", contact_id: str = "", automation_id: str = "", platform: str = ""
) -> TypedSearchAttributes:
    pairs = [SearchAttributePair(WORKSPACE_ID, workspace_id)]
    for key, value in (
        (CHANNEL_ID, channel_id),
        (CONTACT_ID, contact_id),
        (AUTOMATION_ID, automation_id),
        (PLATFORM, platform),
    ):
        if value:
            pairs.append(SearchAttributePair(key, value))
    return TypedSearchAttributes(pairs)


# Task priorities (Temporal task queue priority, 1 first .. 5 last; 3 when
# unset): when tasks back up, a person's conversation goes ahead of bulk
# work. A conversation takes the priority of the event that starts it: a
# DM, postback, referral or story reply 2; a comment 4 (a post that draws
# thousands of comments in a minute must not hold up other people's DMs).
# Broadcasts 4. Child runs and activities inherit their workflow's.
CONVERSATION_PRIORITY = Priority(priority_key=2)
BULK_PRIORITY = Priority(priority_key=4)

# Database writes: fast, retried a few times, then the workflow task fails
# and Temporal retries it.
DB_TIMEOUT = timedelta(seconds=15)
DB_RETRY = RetryPolicy(initial_interval=timedelta(milliseconds=200), maximum_interval=timedelta(seconds=5), maximum_attempts=5)

# Sends: throttling advice (next_retry_delay: the platform's, or our own
# rate limits' ErrorType.RATE_LIMITED with the wait until the next slot) overrides the
# backoff; clean 4xx, invalid tokens and window errors are non-retryable at
# the source. Attempts are unlimited (0): an hourly budget can hold a send
# for longer than any fixed count of attempts would cover, and nothing may
# be dropped; the non-retryable types above are what end the loop (a send
# delayed past the messaging window fails the window check on its retry).
SEND_TIMEOUT = timedelta(seconds=30)
SEND_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(minutes=5),
    maximum_attempts=0,
    non_retryable_error_types=[ErrorType.TOKEN_INVALID, ErrorType.OUTSIDE_WINDOW, ErrorType.PLATFORM_REJECTED, ErrorType.CHANNEL_UNAVAILABLE],
)

# Best-effort or interactive sends (Telegram button acknowledgements, a
# teammate waiting for the API answer): a few attempts, then report.
INTERACTIVE_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    maximum_interval=timedelta(seconds=10),
    maximum_attempts=5,
    non_retryable_error_types=[ErrorType.TOKEN_INVALID, ErrorType.OUTSIDE_WINDOW, ErrorType.PLATFORM_REJECTED, ErrorType.CHANNEL_UNAVAILABLE],
)

# AI: bounded attempts, then the step's fallback text is sent.
AI_TIMEOUT = timedelta(seconds=60)
AI_RETRY = RetryPolicy(initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=10), maximum_attempts=3)

# Profile lookups delay a new contact's first reply: short and few.
# The conversation's early first send: one try, the run does the durable rest.
SINGLE_ATTEMPT = RetryPolicy(maximum_attempts=1)

PROFILE_TIMEOUT = timedelta(seconds=5)
PROFILE_RETRY = RetryPolicy(initial_interval=timedelta(milliseconds=300), maximum_attempts=2)
# A lookup nobody waits on (after an event that started nothing): 4 attempts
# within about half a minute, then the contact stays nameless. A person the
# platform will not show (who blocked the account) and a dead token are not
# retried.
PROFILE_LATER_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=3.0,
    maximum_interval=timedelta(seconds=30),
    maximum_attempts=4,
    non_retryable_error_types=[ErrorType.TOKEN_INVALID, ErrorType.PLATFORM_REJECTED, ErrorType.CHANNEL_UNAVAILABLE],
)

# Platform lifecycle calls (verify, subscribe, revoke).
PLATFORM_TIMEOUT = timedelta(seconds=30)
PLATFORM_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    maximum_interval=timedelta(seconds=30),
    maximum_attempts=6,
    non_retryable_error_types=[ErrorType.TOKEN_INVALID, ErrorType.PLATFORM_REJECTED, ErrorType.CHANNEL_UNAVAILABLE, ErrorType.ACCOUNT_ALREADY_CONNECTED],
)


# What a failed activity raises in the workflow: ActivityError (its cause the
# activity's error) for a regular activity; a local activity's own error
# (ApplicationError, or TimeoutError), unwrapped, for a local one.
ACTIVITY_FAILURES = (ActivityError, ApplicationError, TimeoutError)


def root_message(err: BaseException) -> str:
    """The message of the innermost cause (ActivityError -> ApplicationError),
    truncated to stay well under payload limits."""
    cause: BaseException = err
    while cause.__cause__ is not None:
        cause = cause.__cause__
    message = getattr(cause, "message", None) or str(cause)
    return message[:300]


def root_type(err: BaseException) -> str:
    """The ApplicationError type of the innermost cause ("" if none)."""
    cause: BaseException = err
    while cause.__cause__ is not None:
        cause = cause.__cause__
    return getattr(cause, "type", "") or ""


def send_skipped(err: BaseException) -> bool:
    """A send that failed because the platform's messaging window is closed:
    the step is skipped (with its reason), not failed, and nothing retries it."""
    return root_type(err) == ErrorType.OUTSIDE_WINDOW


# The patch of each matching rules version after 1 (core/flowrt.py), newest
# first: 2 put customers' patterns on RE2 and matched keywords of unspaced
# scripts anywhere; 3 never runs a pattern on Python's re.
MATCHING_PATCHES = ((3, "matching-3"), (2, "matching-2"))


def matching_rules() -> int:
    """The matching rules of a conversation or run, decided when it starts:
    the newest for one starting now, the version it started with on replay
    (kept until it continues as new)."""
    for version, patch in MATCHING_PATCHES:
        if workflow.patched(patch):
            return version
    return 1
