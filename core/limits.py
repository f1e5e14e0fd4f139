"""Every size a user supplies has its limit here, and only here (docs/limits.md
is the table users read; tests/test_limits.py proves the bound they buy).

Why they exist: a workspace's automations and its contacts' records are
carried into workflow histories, and Temporal refuses a payload over 2 MB
(the conversation then fails its task in a loop). The limits are set so the
largest workspace they allow keeps every payload of the inbound path under
half of that, with every character at its most expensive (an emoji is 12
bytes of JSON once escaped), and so that a demanding user never meets them:
they sit above the platforms' own maximums wherever one exists.

Sizes called "JSON size" are measured by ``json_size``: the compact JSON
Vectory carries into workflows, a character outside ASCII counted as its
``\\u`` escape (6 bytes, 12 for an emoji).

The API refuses a value over its limit (422 naming the limit and the field;
413 for a whole body). Rows stored before a limit existed stay readable and
exportable; the runtime carries a bounded projection of them
(activities/crm.py ``snapshot``).
"""

from __future__ import annotations

import json
import re
from typing import Any

# --- requests -------------------------------------------------------------------------------------

MAX_BODY_BYTES = 1024 * 1024  # any /v1 request body (413)

# --- automations ----------------------------------------------------------------------------------

MAX_AUTOMATIONS_PER_WORKSPACE = 500
MAX_AUTOMATIONS_PER_CHANNEL = 200
MAX_DEFINITION_SIZE = 256 * 1024  # JSON size of {"trigger": ..., "steps": [...]}
# A definition stored before MAX_DEFINITION_SIZE and over this cannot start:
# with the event and the contact it would not fit a 2 MB workflow payload.
MAX_CARRIED_DEFINITION = 1024 * 1024
MAX_STEPS = 100
MAX_AUTOMATION_NAME = 200
MAX_TEXT = 1000  # a message's text (send_message, retry prompts, fallbacks, handoff, broadcasts): Instagram's
MAX_PLACEHOLDERS = 10  # {{...}} per text: each may render a field of MAX_FIELD_VALUE characters
MAX_AI_INSTRUCTIONS = 4000
MAX_HANDOFF_NOTE = 2000
MAX_KEYWORDS = 50  # per trigger
MAX_KEYWORD = 100  # a contains/exact keyword
MAX_REGEX = 200  # a customer's regular expression, as written
# RE2's compiled program (``re2.compile(p).programsize``, case-insensitive as
# it runs): RE2 is linear in the text, but its time per character grows with
# the program; (?:\w\W?){999}z (36,000) took 2 to 11 s on 100,000 characters.
MAX_REGEX_PROGRAM = 5000
MAX_PAYLOADS = 50  # postback payloads per trigger
MAX_PAYLOAD = 1000  # a postback / quick reply / button payload
MAX_MEDIA_IDS = 100
MAX_MEDIA_ID = 100
MAX_PUBLIC_REPLIES = 10
MAX_PUBLIC_REPLY = 500
MAX_REFS = 50
MAX_REF = 100  # a ref_link ref, wildcards included
MAX_CHOICES = 50
MAX_CHOICE = 1000
MAX_CONDITIONS = 20
MAX_QUICK_REPLIES = 13  # Meta's maximum
MAX_BUTTONS = 3  # Meta's maximum
MAX_BUTTON_TITLE = 20  # Meta's maximum
MAX_URL = 2000

# --- contacts -------------------------------------------------------------------------------------

MAX_NAME = 200  # first / last name, username
MAX_TAGS = 100  # per contact
MAX_TAG = 64  # characters of a tag
MAX_FIELDS = 100  # per contact
MAX_FIELD_KEY = 64
# A field's key: what a template can name ({{contact.fields.<key>}}).
FIELD_KEY_RE = re.compile(rf"[A-Za-z0-9_-]{{1,{MAX_FIELD_KEY}}}")
FIELD_KEY_ALPHABET = "letters, digits, '_' and '-'"
MAX_FIELD_VALUE = 2000  # characters of a string value (or of another value's JSON); also set_field's value
MAX_FIELDS_SIZE = 64 * 1024  # JSON size of all of a contact's fields together

# --- runs and broadcasts --------------------------------------------------------------------------

MAX_RUN_CONTEXT_SIZE = 16 * 1024  # JSON size of an API start's context / a signal's payload
MAX_SEGMENT_TAGS = 50  # per tag filter of a broadcast's segment


def json_size(value: Any) -> int:
    """The size of ``value`` as a workflow payload carries it (compact JSON,
    non-ASCII escaped)."""
    return len(json.dumps(value, separators=(",", ":"), default=str))


def value_length(value: Any) -> int:
    """A field value's length as its limit counts it: a string's characters,
    another value's JSON text."""
    return len(value) if isinstance(value, str) else len(json.dumps(value, ensure_ascii=False, default=str))


def fields_refused(before: dict, after: dict) -> str | None:
    """Why a contact's fields may not go from ``before`` to ``after`` (None:
    they may): over MAX_FIELDS fields or MAX_FIELDS_SIZE bytes, unless no
    larger than before, so a contact stored over them can still shrink."""
    if len(after) > MAX_FIELDS and len(after) > len(before):
        return f"the contact would have {len(after)} fields; the limit is {MAX_FIELDS} (MAX_FIELDS)"
    size = json_size(after)
    if size > MAX_FIELDS_SIZE and size > json_size(before):
        return f"the contact's fields would be {size} bytes of JSON; the limit is {MAX_FIELDS_SIZE} (MAX_FIELDS_SIZE)"
    return None


def shown(value: Any, limit: int = 40) -> str:
    """A refused value as an error message quotes it: its start, never all of it."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} characters)"
