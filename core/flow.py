"""The automation flow schema (DESIGN.md §6), validated at the API.

A broken flow must be rejected with a short, precise message (FastAPI turns
the ValidationError into a 422): unknown trigger or step types, dangling
targets, duplicate ids, bad regexes, typos in field names (every model
forbids unknown keys) and unknown template placeholders.

The runtime (``core.flowrt``, used in workflow code) reads the JSON that
``definition_dict`` produces.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal
from urllib.parse import urlparse

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StringConstraints,
    Tag,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from core.flowrt import STEP_DEFAULTS, parse_number, placeholders, re2_program_size, re2_refusal
from core.limits import (
    MAX_AI_INSTRUCTIONS,
    MAX_AUTOMATION_NAME,
    MAX_BUTTON_TITLE,
    MAX_BUTTONS,
    MAX_CHOICE,
    MAX_CHOICES,
    MAX_CONDITIONS,
    MAX_DEFINITION_SIZE,
    MAX_FIELD_KEY,
    MAX_FIELD_VALUE,
    MAX_HANDOFF_NOTE,
    MAX_KEYWORD,
    MAX_KEYWORDS,
    MAX_MEDIA_ID,
    MAX_MEDIA_IDS,
    MAX_PAYLOAD,
    MAX_PAYLOADS,
    MAX_PLACEHOLDERS,
    MAX_PUBLIC_REPLIES,
    MAX_PUBLIC_REPLY,
    MAX_QUICK_REPLIES,
    MAX_REF,
    MAX_REFS,
    MAX_REGEX,
    MAX_REGEX_PROGRAM,
    MAX_STEPS,
    MAX_TAG,
    MAX_TEXT,
    MAX_URL,
    json_size,
    shown,
)

__all__ = [
    "SUPPORTED_TRIGGERS",
    "STEP_TYPES",
    "AutomationCreate",
    "AutomationDefinition",
    "AutomationUpdate",
    "MessageContent",
    "definition_dict",
    "merge_definition",
]

SUPPORTED_TRIGGERS = (
    "dm_keyword",
    "any_message",
    "postback",
    "api",
    "comment",
    "story_reply",
    "story_mention",
    "ref_link",
)
PLANNED_TRIGGERS: tuple[str, ...] = ()
STEP_TYPES = (
    "send_message",
    "wait_for_reply",
    "wait_for_event",
    "condition",
    "add_tag",
    "remove_tag",
    "set_field",
    "delay",
    "ai_reply",
    "handoff",
)
PLANNED_STEPS = ("http_request",)
# A loop must pass through one of these (they pause the run, change the contact a
# condition reads, or hand the conversation over); a loop without one never ends.
LOOP_BREAKERS = ("wait_for_reply", "wait_for_event", "delay", "add_tag", "remove_tag", "set_field", "handoff")

# m.me / ig.me ref parameters: a-z A-Z 0-9 + / = - . : _ (plus our * wildcard).
# One character class over the whole ref: linear (core/flowrt.py says why that matters).
_REF_RE = re.compile(r"[A-Za-z0-9+/=\-.:_*]+")
MAX_WAIT_REPLY = 7 * 86400
MAX_WAIT_EVENT = 30 * 86400
MAX_DELAY = 30 * 86400

_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
_FIELD_PATTERN = r"^[a-z][a-z0-9_]{0,63}$"
# Anchored, and a name's characters exclude the dot between names: linear.
_PLACEHOLDER_PATH = re.compile(
    r"^(?:contact\.(?:first_name|last_name|username|fields\.[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*)"
    r"|context\.[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*)$",
    re.IGNORECASE,
)

StepId = Annotated[str, StringConstraints(pattern=_ID_PATTERN)]
Target = Annotated[str, StringConstraints(pattern=_ID_PATTERN)]  # a step id or "end"
FieldName = Annotated[str, StringConstraints(pattern=_FIELD_PATTERN)]


def _fail(message: str) -> PydanticCustomError:
    """An error whose message is shown as is (no "Value error, " prefix)."""
    return PydanticCustomError("invalid_flow", message)


def _not_blank(value: str, what: str) -> str:
    if not value.strip():
        raise _fail(f"{what} must not be blank")
    return value


def _compile(pattern: str, what: str) -> str:
    if len(pattern) > MAX_REGEX:
        raise _fail(f"{what} is {len(pattern)} characters long; the limit is {MAX_REGEX}")
    # Compiled by Python's re too: a conversation that started under matching
    # rules 1 runs it there (core/flowrt.py).
    try:
        re.compile(pattern)
    except (re.error, OverflowError, RecursionError) as exc:
        raise _fail(f"{what} {pattern!r} is not a valid regular expression: {exc}") from None
    refusal = re2_refusal(pattern)
    if refusal:
        raise _fail(
            f"{what} {pattern!r} cannot run on RE2 (linear time, so no message can stall the automations): "
            f"{refusal}"
        )
    size = re2_program_size(pattern)
    if size > MAX_REGEX_PROGRAM:
        raise _fail(
            f"{what} {pattern!r} compiles to an RE2 program of {size} instructions; the limit is "
            f"{MAX_REGEX_PROGRAM} (MAX_REGEX_PROGRAM: a large program is slow on every message): use "
            "smaller repetition counts"
        )
    return pattern


def _check_template(text: str | None, what: str) -> str | None:
    if not text:
        return text
    count = 0
    for placeholder in placeholders(text):
        if not _PLACEHOLDER_PATH.match(placeholder.path):
            raise _fail(
                f"{what}: unknown placeholder {shown(text[placeholder.start : placeholder.end])}; use "
                "contact.first_name, contact.last_name, contact.username, contact.fields.<name> or context.<key>"
            )
        count += 1
        if count > MAX_PLACEHOLDERS:
            raise _fail(f"{what} has more than {MAX_PLACEHOLDERS} placeholders; the limit is {MAX_PLACEHOLDERS} (MAX_PLACEHOLDERS)")
    return text


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- triggers -----------------------------------------------------------------------------------------


Keyword = Annotated[str, StringConstraints(min_length=1, max_length=MAX_REGEX)]
MatchMode = Literal["contains", "exact", "regex"]


def _check_keywords(keywords: list[str], match: str) -> None:
    for keyword in keywords:
        _not_blank(keyword, "a keyword")
        if match == "regex":
            _compile(keyword, "keyword")
        elif len(keyword) > MAX_KEYWORD:
            raise _fail(
                f"keyword {keyword[:20]!r}... is {len(keyword)} characters long; the limit is {MAX_KEYWORD}"
            )


class DmKeywordTrigger(_Model):
    type: Literal["dm_keyword"]
    keywords: list[Keyword] = Field(min_length=1, max_length=MAX_KEYWORDS)
    match: MatchMode = "contains"

    @model_validator(mode="after")
    def _check_keywords(self) -> DmKeywordTrigger:
        _check_keywords(self.keywords, self.match)
        return self


class AnyMessageTrigger(_Model):
    type: Literal["any_message"]
    scope: Literal["first_message", "default"] = "default"


class PostbackTrigger(_Model):
    type: Literal["postback"]
    payloads: list[Annotated[str, StringConstraints(min_length=1, max_length=MAX_PAYLOAD)]] = Field(
        min_length=1, max_length=MAX_PAYLOADS
    )

    @field_validator("payloads")
    @classmethod
    def _payloads_not_blank(cls, value: list[str]) -> list[str]:
        for payload in value:
            _not_blank(payload, "a payload")
        return value


class ApiTrigger(_Model):
    type: Literal["api"]


class CommentTrigger(_Model):
    """A comment on a post (Instagram media / Facebook Page post).

    Empty ``media_ids``: any post; empty ``keywords``: any comment. ``public_replies``:
    variants, one of which is posted as a public reply to a top-level comment.
    """

    type: Literal["comment"]
    media_ids: list[Annotated[str, StringConstraints(min_length=1, max_length=MAX_MEDIA_ID)]] = Field(
        default_factory=list, max_length=MAX_MEDIA_IDS
    )
    keywords: list[Keyword] = Field(default_factory=list, max_length=MAX_KEYWORDS)
    match: MatchMode = "contains"
    public_replies: list[Annotated[str, StringConstraints(min_length=1, max_length=MAX_PUBLIC_REPLY)]] = Field(
        default_factory=list, max_length=MAX_PUBLIC_REPLIES
    )
    only_top_level: bool = True

    @model_validator(mode="after")
    def _check(self) -> CommentTrigger:
        for media_id in self.media_ids:
            if not media_id.strip() or media_id != media_id.strip():
                raise _fail(f"media id {media_id!r} must not be blank or have surrounding spaces")
        _check_keywords(self.keywords, self.match)
        for i, reply in enumerate(self.public_replies):
            _not_blank(reply, f"public reply {i}")
            _check_template(reply, f"public reply {i}")
        return self


class StoryReplyTrigger(_Model):
    """A DM replying to one of the account's stories; empty ``keywords``: any reply."""

    type: Literal["story_reply"]
    keywords: list[Keyword] = Field(default_factory=list, max_length=MAX_KEYWORDS)
    match: MatchMode = "contains"

    @model_validator(mode="after")
    def _check(self) -> StoryReplyTrigger:
        _check_keywords(self.keywords, self.match)
        return self


class StoryMentionTrigger(_Model):
    type: Literal["story_mention"]


class RefLinkTrigger(_Model):
    """An ig.me / m.me link with ``?ref=``; a ``*`` in a ref matches any characters."""

    type: Literal["ref_link"]
    refs: list[Annotated[str, StringConstraints(min_length=1, max_length=MAX_REF)]] = Field(
        min_length=1, max_length=MAX_REFS
    )

    @field_validator("refs")
    @classmethod
    def _refs(cls, value: list[str]) -> list[str]:
        for ref in value:
            if not _REF_RE.fullmatch(ref):
                raise _fail(
                    f"ref {ref!r} may only contain letters, digits, '*' (wildcard) and + / = - . : _"
                )
        return value


Trigger = Annotated[
    DmKeywordTrigger
    | AnyMessageTrigger
    | PostbackTrigger
    | ApiTrigger
    | CommentTrigger
    | StoryReplyTrigger
    | StoryMentionTrigger
    | RefLinkTrigger,
    Field(discriminator="type"),
]


# --- steps --------------------------------------------------------------------------------------------


class QuickReplyModel(_Model):
    title: str = Field(min_length=1, max_length=MAX_BUTTON_TITLE)
    payload: str | None = Field(default=None, max_length=MAX_PAYLOAD)

    @model_validator(mode="after")
    def _default_payload(self) -> QuickReplyModel:
        _not_blank(self.title, "a quick reply title")
        if not self.payload:
            self.payload = self.title
        return self


QuickReplyTitle = Annotated[str, StringConstraints(min_length=1, max_length=MAX_BUTTON_TITLE)]
QuickReplyItem = Annotated[
    Annotated[QuickReplyTitle, Tag("title")] | Annotated[QuickReplyModel, Tag("object")],
    Discriminator(lambda v: "title" if isinstance(v, str) else "object"),
]


class ButtonModel(_Model):
    title: str = Field(min_length=1, max_length=MAX_BUTTON_TITLE)
    payload: str | None = Field(default=None, min_length=1, max_length=MAX_PAYLOAD)
    url: str | None = Field(default=None, max_length=MAX_URL)

    @model_validator(mode="after")
    def _payload_or_url(self) -> ButtonModel:
        _not_blank(self.title, "a button title")
        if (self.payload is None) == (self.url is None):
            raise _fail(f"button {self.title!r} needs exactly one of 'payload' or 'url'")
        if self.url is not None:
            parsed = urlparse(self.url)
            if parsed.scheme not in ("http", "https") or not parsed.netloc:
                raise _fail(f"button {self.title!r}: url must be an http(s) URL, got {self.url!r}")
        return self


class _Step(_Model):
    id: StepId
    next: Target | None = None

    @field_validator("id")
    @classmethod
    def _id_not_end(cls, value: str) -> str:
        if value == "end":
            raise _fail("'end' is reserved and cannot be a step id")
        return value

    def targets(self) -> list[tuple[str, str]]:
        """(label, target) pairs this step can jump to."""
        return [("next", self.next)] if self.next else []


class SendMessageStep(_Step):
    type: Literal["send_message"]
    text: str = Field(min_length=1, max_length=MAX_TEXT)
    quick_replies: list[QuickReplyItem] = Field(default_factory=list, max_length=MAX_QUICK_REPLIES)
    buttons: list[ButtonModel] = Field(default_factory=list, max_length=MAX_BUTTONS)

    @model_validator(mode="after")
    def _check(self) -> SendMessageStep:
        _check_message(self.text, self.quick_replies, self.buttons, f"step {self.id!r}: ")
        return self


def _check_message(text: str, quick_replies: list, buttons: list, where: str) -> None:
    _not_blank(text, f"{where}text")
    _check_template(text, f"{where}text")
    for title in quick_replies:
        if isinstance(title, str):
            _not_blank(title, f"{where}a quick reply title")
    if quick_replies and buttons:
        raise _fail(f"{where}use either quick_replies or buttons, not both")


class MessageContent(_Model):
    """A message sent outside a flow (a broadcast), with a flow step's
    limits: its text may greet each recipient with ``{{contact.*}}``
    placeholders (no ``context``: there is no run), and it carries quick
    replies or buttons."""

    text: str = Field(min_length=1, max_length=MAX_TEXT)
    quick_replies: list[QuickReplyItem] = Field(default_factory=list, max_length=MAX_QUICK_REPLIES)
    buttons: list[ButtonModel] = Field(default_factory=list, max_length=MAX_BUTTONS)

    @model_validator(mode="after")
    def _check(self) -> MessageContent:
        _check_message(self.text, self.quick_replies, self.buttons, "")
        for placeholder in placeholders(self.text):
            if not placeholder.path.lower().startswith("contact."):
                raise _fail(
                    f"text: {self.text[placeholder.start : placeholder.end]!r} has nothing to read here; a "
                    "broadcast knows contact.first_name, contact.last_name, contact.username and "
                    "contact.fields.<name>"
                )
        return self


class WaitForReplyStep(_Step):
    type: Literal["wait_for_reply"]
    timeout_seconds: int = Field(default=STEP_DEFAULTS["timeout_seconds"], ge=1, le=MAX_WAIT_REPLY)
    validate_: Literal["none", "email", "phone", "number", "regex", "choice"] = Field(
        default="none", alias="validate"
    )
    pattern: str | None = None
    choices: list[Annotated[str, StringConstraints(min_length=1, max_length=MAX_CHOICE)]] | None = Field(
        default=None, max_length=MAX_CHOICES
    )
    save_to_field: FieldName | None = None
    retry_prompt: str | None = Field(default=None, min_length=1, max_length=MAX_TEXT)
    max_retries: int = Field(default=STEP_DEFAULTS["max_retries"], ge=0, le=10)
    on_timeout: Target = STEP_DEFAULTS["on_timeout"]
    on_invalid: Target = STEP_DEFAULTS["on_invalid"]

    model_config = ConfigDict(validate_by_name=True, validate_by_alias=True, serialize_by_alias=True)

    @model_validator(mode="after")
    def _check(self) -> WaitForReplyStep:
        where = f"step {self.id!r}"
        if self.validate_ == "regex":
            if not self.pattern:
                raise _fail(f"{where}: validate 'regex' needs a 'pattern'")
            _compile(self.pattern, f"{where}: pattern")
        elif self.pattern is not None:
            raise _fail(
                f"{where}: 'pattern' is only used with validate 'regex' (validate is {self.validate_!r})"
            )
        if self.validate_ == "choice":
            if not self.choices:
                raise _fail(f"{where}: validate 'choice' needs a non-empty 'choices' list")
            for choice in self.choices:
                _not_blank(choice, f"{where}: a choice")
        elif self.choices:
            raise _fail(
                f"{where}: 'choices' is only used with validate 'choice' (validate is {self.validate_!r})"
            )
        if self.retry_prompt is not None:
            _not_blank(self.retry_prompt, f"{where}: retry_prompt")
            _check_template(self.retry_prompt, f"{where}: retry_prompt")
        return self

    def targets(self) -> list[tuple[str, str]]:
        return [*super().targets(), ("on_timeout", self.on_timeout), ("on_invalid", self.on_invalid)]


class WaitForEventStep(_Step):
    type: Literal["wait_for_event"]
    event: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    timeout_seconds: int = Field(default=STEP_DEFAULTS["timeout_seconds"], ge=1, le=MAX_WAIT_EVENT)
    on_timeout: Target = STEP_DEFAULTS["on_timeout"]
    save_to_field: FieldName | None = None

    def targets(self) -> list[tuple[str, str]]:
        return [*super().targets(), ("on_timeout", self.on_timeout)]


ConditionOp = Literal[
    "equals", "not_equals", "contains", "exists", "not_exists", "matches", "gt", "lt", "has", "not_has"
]
_TAG_OPS = ("has", "not_has", "equals", "not_equals")


class Condition(_Model):
    subject: Literal["field", "tag", "reply"]
    name: str | None = Field(default=None, min_length=1, max_length=MAX_FIELD_KEY)
    op: ConditionOp
    value: str | bool | int | float | None = None

    @model_validator(mode="after")
    def _check(self) -> Condition:
        if self.subject == "field" and not self.name:
            raise _fail("a 'field' condition needs 'name' (the field name)")
        if self.subject == "tag":
            if self.op not in _TAG_OPS:
                raise _fail(f"op {self.op!r} does not apply to tags; use one of: {', '.join(_TAG_OPS)}")
            if not isinstance(self.value, str) or not self.value.strip():
                raise _fail(f"a tag condition with op {self.op!r} needs 'value' (the tag name)")
            return self
        if self.op in ("has", "not_has"):
            raise _fail(f"op {self.op!r} only applies to subject 'tag'")
        if self.op in ("exists", "not_exists"):
            return self
        if self.value is None:
            raise _fail(f"op {self.op!r} needs a 'value'")
        if self.op == "matches":
            if not isinstance(self.value, str):
                raise _fail("op 'matches' needs a regular expression string as 'value'")
            _compile(self.value, "condition pattern")
        if self.op in ("gt", "lt"):
            number = parse_number(self.value)
            if isinstance(self.value, bool) or number is None:
                raise _fail(f"op {self.op!r} needs a number as 'value', got {self.value!r}")
        return self


class ConditionStep(_Step):
    type: Literal["condition"]
    conditions: list[Condition] = Field(min_length=1, max_length=MAX_CONDITIONS)
    match: Literal["all", "any"] = "all"
    then: Target
    else_: Target = Field(alias="else")

    model_config = ConfigDict(validate_by_name=True, validate_by_alias=True, serialize_by_alias=True)

    @model_validator(mode="after")
    def _no_next(self) -> ConditionStep:
        if self.next is not None:
            raise _fail(f"step {self.id!r}: a condition branches with 'then' and 'else'; 'next' is not used")
        return self

    def targets(self) -> list[tuple[str, str]]:
        return [("then", self.then), ("else", self.else_)]


TagName = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_TAG)]


class AddTagStep(_Step):
    type: Literal["add_tag"]
    tag: TagName


class RemoveTagStep(_Step):
    type: Literal["remove_tag"]
    tag: TagName


class SetFieldStep(_Step):
    type: Literal["set_field"]
    field: FieldName
    value: str | bool | int | float | None = None

    @model_validator(mode="after")
    def _check(self) -> SetFieldStep:
        if isinstance(self.value, str):
            if len(self.value) > MAX_FIELD_VALUE:
                raise _fail(
                    f"step {self.id!r}: value is {len(self.value)} characters long; the limit is "
                    f"{MAX_FIELD_VALUE} (MAX_FIELD_VALUE)"
                )
            _check_template(self.value, f"step {self.id!r}: value")
        return self


class DelayStep(_Step):
    type: Literal["delay"]
    seconds: int = Field(default=0, ge=0)
    minutes: int = Field(default=0, ge=0)
    hours: int = Field(default=0, ge=0)
    days: int = Field(default=0, ge=0)

    @property
    def total_seconds(self) -> int:
        return self.seconds + 60 * self.minutes + 3600 * self.hours + 86400 * self.days

    @model_validator(mode="after")
    def _check(self) -> DelayStep:
        total = self.total_seconds
        if total < 1:
            raise _fail(f"step {self.id!r}: a delay needs at least 1 second (set seconds/minutes/hours/days)")
        if total > MAX_DELAY:
            raise _fail(f"step {self.id!r}: a delay of {total} seconds is longer than 30 days")
        return self


class AiReplyStep(_Step):
    type: Literal["ai_reply"]
    instructions: str = Field(min_length=1, max_length=MAX_AI_INSTRUCTIONS)
    fallback_text: str = Field(
        default=STEP_DEFAULTS["fallback_text"],
        min_length=1,
        max_length=MAX_TEXT,
    )
    history_messages: int = Field(default=STEP_DEFAULTS["history_messages"], ge=0, le=50)

    @model_validator(mode="after")
    def _check(self) -> AiReplyStep:
        _not_blank(self.instructions, f"step {self.id!r}: instructions")
        _not_blank(self.fallback_text, f"step {self.id!r}: fallback_text")
        _check_template(self.fallback_text, f"step {self.id!r}: fallback_text")
        return self


class HandoffStep(_Step):
    type: Literal["handoff"]
    message: str | None = Field(default=None, min_length=1, max_length=MAX_TEXT)
    note: str | None = Field(default=None, max_length=MAX_HANDOFF_NOTE)

    @model_validator(mode="after")
    def _check(self) -> HandoffStep:
        if self.message is not None:
            _not_blank(self.message, f"step {self.id!r}: message")
            _check_template(self.message, f"step {self.id!r}: message")
        return self


Step = Annotated[
    SendMessageStep
    | WaitForReplyStep
    | WaitForEventStep
    | ConditionStep
    | AddTagStep
    | RemoveTagStep
    | SetFieldStep
    | DelayStep
    | AiReplyStep
    | HandoffStep,
    Field(discriminator="type"),
]


# --- cross checks -------------------------------------------------------------------------------------


def _precheck_trigger(value: Any) -> Any:
    """Name unknown / unsupported trigger types before pydantic's union error."""
    if not isinstance(value, dict):
        return value
    supported = ", ".join(SUPPORTED_TRIGGERS)
    kind = value.get("type")
    if kind is None:
        raise _fail(f"trigger needs a 'type'; supported: {supported}")
    if kind in SUPPORTED_TRIGGERS:
        return value
    if kind in PLANNED_TRIGGERS:
        raise _fail(f"trigger type {kind!r} is not supported yet; supported: {supported}")
    raise _fail(f"unknown trigger type {kind!r}; supported: {supported}")


def _precheck_steps(value: Any) -> Any:
    """Name the step (index and id) with an unknown or missing type."""
    if not isinstance(value, list):
        return value
    allowed = ", ".join(STEP_TYPES)
    for i, step in enumerate(value):
        if not isinstance(step, dict):
            continue
        label = f"step {i}" + (f" ({step['id']!r})" if isinstance(step.get("id"), str) else "")
        kind = step.get("type")
        if kind is None:
            raise _fail(f"{label}: missing 'type'; allowed: {allowed}")
        if kind in STEP_TYPES:
            continue
        if kind in PLANNED_STEPS:
            raise _fail(f"{label}: step type {kind!r} is not supported yet; allowed: {allowed}")
        raise _fail(f"{label}: unknown step type {kind!r}; allowed: {allowed}")
    return value


def _successors(steps: list[_Step], i: int, index: dict[str, int]) -> list[int]:
    step = steps[i]
    out: list[int] = []
    if not step.next and not isinstance(step, ConditionStep) and i + 1 < len(steps):
        out.append(i + 1)
    for _, target in step.targets():
        if target != "end" and target in index:
            out.append(index[target])
    return out


def _find_busy_loop(steps: list[_Step], index: dict[str, int]) -> list[str] | None:
    """A cycle that neither waits nor changes the contact (it would run forever), as a list of ids."""
    state: dict[int, int] = {}  # 1: on the stack, 2: done

    def visit(i: int, path: list[int]) -> list[int] | None:
        state[i] = 1
        path.append(i)
        for j in _successors(steps, i, index):
            if steps[j].type in LOOP_BREAKERS:
                continue
            if state.get(j) == 1:
                return path[path.index(j) :] + [j]
            if j not in state:
                found = visit(j, path)
                if found:
                    return found
        path.pop()
        state[i] = 2
        return None

    for start, step in enumerate(steps):
        if start not in state and step.type not in LOOP_BREAKERS:
            cycle = visit(start, [])
            if cycle:
                return [steps[k].id for k in cycle]
    return None


def _check_steps(steps: list[_Step]) -> list[_Step]:
    index: dict[str, int] = {}
    for i, step in enumerate(steps):
        if step.id in index:
            raise _fail(f"duplicate step id {step.id!r} (steps {index[step.id]} and {i})")
        index[step.id] = i
    known = ", ".join(index)
    for step in steps:
        for label, target in step.targets():
            if target != "end" and target not in index:
                raise _fail(
                    f"step {step.id!r}: {label} target {target!r} is not a step id (known ids: {known}; or 'end')"
                )
    loop = _find_busy_loop(steps, index)
    if loop:
        raise _fail(
            "steps " + " -> ".join(repr(s) for s in loop) + " form a loop that never waits for the "
            "contact or changes it, so it would repeat forever"
        )
    return steps


# --- API models ---------------------------------------------------------------------------------------


class AutomationDefinition(_Model):
    """The part of an automation a run interprets: trigger + steps."""

    trigger: Trigger
    steps: list[Step] = Field(min_length=1, max_length=MAX_STEPS)

    @field_validator("trigger", mode="before")
    @classmethod
    def _trigger_type(cls, value: Any) -> Any:
        return _precheck_trigger(value)

    @field_validator("steps", mode="before")
    @classmethod
    def _step_types(cls, value: Any) -> Any:
        return _precheck_steps(value)

    @field_validator("steps")
    @classmethod
    def _cross_check(cls, value: list[_Step]) -> list[_Step]:
        return _check_steps(value)

    @model_validator(mode="after")
    def _size(self) -> AutomationDefinition:
        size = json_size(definition_dict(self))
        if size > MAX_DEFINITION_SIZE:
            raise _fail(
                f"the definition (trigger and steps) is {size} bytes of JSON; the limit is "
                f"{MAX_DEFINITION_SIZE} (MAX_DEFINITION_SIZE)"
            )
        return self


class AutomationCreate(AutomationDefinition):
    name: str = Field(min_length=1, max_length=MAX_AUTOMATION_NAME)
    channel_id: str = Field(min_length=1)
    status: Literal["active", "paused"] = "active"

    @field_validator("name")
    @classmethod
    def _name_not_blank(cls, value: str) -> str:
        return _not_blank(value, "name").strip()


class AutomationUpdate(_Model):
    """A partial update; ``merge_definition`` validates the combined flow."""

    name: str | None = Field(default=None, min_length=1, max_length=MAX_AUTOMATION_NAME)
    trigger: Trigger | None = None
    steps: list[Step] | None = Field(default=None, min_length=1, max_length=MAX_STEPS)
    status: Literal["active", "paused"] | None = None

    @field_validator("name")
    @classmethod
    def _name_not_blank(cls, value: str | None) -> str | None:
        return None if value is None else _not_blank(value, "name").strip()

    @field_validator("trigger", mode="before")
    @classmethod
    def _trigger_type(cls, value: Any) -> Any:
        return _precheck_trigger(value)

    @field_validator("steps", mode="before")
    @classmethod
    def _step_types(cls, value: Any) -> Any:
        return _precheck_steps(value)

    @field_validator("steps")
    @classmethod
    def _cross_check(cls, value: list[_Step] | None) -> list[_Step] | None:
        return None if value is None else _check_steps(value)


def definition_dict(model: BaseModel) -> dict:
    """The stored/runtime JSON of a model's definition: {"trigger": ..., "steps": [...]}."""
    return model.model_dump(mode="json", exclude_none=True, by_alias=True, include={"trigger", "steps"})


def merge_definition(current: dict, update: AutomationUpdate) -> dict:
    """Apply an update's trigger/steps to the current definition and validate the result.

    An update of neither keeps ``current`` as stored, unchecked: renaming or
    pausing an automation saved before a limit existed must not be refused
    for the limit.

    Raises pydantic.ValidationError (or ValueError when ``current`` is not a definition).
    """
    if update.trigger is None and update.steps is None:
        return current
    if not isinstance(current, dict):
        raise ValueError("the current definition is not an object")
    new_definition = {
        "trigger": definition_dict(update)["trigger"]
        if update.trigger is not None
        else current.get("trigger"),
        "steps": definition_dict(update)["steps"] if update.steps is not None else current.get("steps"),
    }
    if new_definition["trigger"] is None or new_definition["steps"] is None:
        raise ValueError("the current definition has no trigger or steps; send both")
    model = AutomationDefinition.model_validate(new_definition)
    return definition_dict(model)
