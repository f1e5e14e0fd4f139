"""Pure runtime helpers for interpreting an automation flow.

Used inside Temporal workflow code, so this module must stay deterministic:
standard library (re, json, unicodedata, math, dataclasses, typing), RE2
and ``core.contracts`` only. No pydantic, I/O, clocks, randomness or
environment reads. Definitions arrive as plain dicts (the JSON that
``core.flow.definition_dict`` produces).

No text a user controls meets a backtracking regular expression, here or
anywhere else in Vectory (templates, messages, refs, replies, field values,
log lines): on a crafted input Python's ``re`` takes polynomial or
exponential time (``{{`` and 1,000 spaces against a cubic placeholder
pattern: 8 s), and the API or worker process, with every tenant on it,
waits that long. Customers' patterns run on RE2. Our own parsing is a
scanner with its bound stated, or a Python pattern that cannot backtrack
(one character class, or anchored with parts that cannot overlap), each
saying why. tests/test_linear_time.py times them on 100,000 adversarial
characters.

Matching rules are versioned (``matching``): a workflow that started under
version 1 or 2 keeps it until it continues as new, so its replay takes the
same branches. Since version 2:

- customers' patterns (regex keywords, ``validate: regex``, ``matches``
  conditions) run on RE2, in linear time: under Python's backtracking ``re``
  a pattern like ``^(a+)+$`` and 30 characters of text held a worker, and
  every tenant's conversations on it, for minutes. A pattern RE2 cannot run
  (refused when saved) matches nothing since version 3; versions 1 and 2
  ran it on ``re``;
- a keyword in a script written without spaces between words (Chinese,
  Japanese, Thai, Lao, Khmer, Burmese) matches anywhere in the text: the
  whole-word rule never matched it inside a sentence.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
import unicodedata
from collections.abc import Iterator
from typing import Any, NamedTuple

import re2

from core.contracts import (
    AutomationSnapshot,
    Button,
    ContactSnapshot,
    InboundEvent,
    QuickReply,
    RecordRunInput,
    SendMessageInput,
    TrailEntry,
)

# A placeholder that rendered empty; removed again (with its spacing) before returning.
_EMPTY = "\ue000"
_PUNCT_AFTER = ".,!?;:…)]}"
# Anchored (``match``), the local part's runs and dots cannot overlap, and it
# only sees addresses of at most MAX_EMAIL characters: bounded work.
_EMAIL_RE = re.compile(
    r"^(?P<local>[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*)"
    r"@(?P<domain>(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63})$"
)
MAX_EMAIL = 254
# Anchored, one digit run per branch, each followed by what a digit is not: linear.
_NUMBER_RE = re.compile(r"^[+-]?(?:\d+(?:[.,]\d+)?|[.,]\d+)$")
# One character class each: nothing to backtrack.
_WORD_RE = re.compile(r"\w")
_BLANKS_RE = re.compile(r"[ \t]*")

MATCHING = 3  # the matching rules new workflows use (module docstring)
# Scripts written without spaces between words (Hangul is written with them).
_UNSPACED_SCRIPT_RE = re.compile("[\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


def _re2_options():
    options = re2.Options()
    options.case_sensitive = False
    options.log_errors = False
    return options


@functools.lru_cache(maxsize=512)
def _re2_pattern(pattern: str):
    """The pattern compiled by RE2, case-insensitive, or None when RE2
    cannot run it."""
    try:
        return re2.compile(pattern, _re2_options())
    except re2.error:
        return None


# The start of RE2's refusals, and what they mean to someone writing a pattern.
_BACKREFERENCE = "backreferences are not supported"
_RE2_HINTS = (
    ("invalid perl operator: (?=", "lookahead is not supported"),
    ("invalid perl operator: (?!", "lookahead is not supported"),
    ("invalid perl operator: (?<=", "lookbehind is not supported"),
    ("invalid perl operator: (?<!", "lookbehind is not supported"),
    ("invalid perl operator: (?P", "named backreferences such as (?P=name) are not supported"),
    ("invalid escape sequence: \\k", _BACKREFERENCE),
    *((f"invalid escape sequence: \\{digit}", _BACKREFERENCE) for digit in "123456789"),
    ("bad repetition operator", "a quantifier after a quantifier, such as the possessive a++, is not supported"),
    ("invalid repetition size", "the repetition is too large: at most 1000, nested repetitions multiplied"),
    ("pattern too large", "the pattern is too large once compiled"),
)


def re2_refusal(pattern: str) -> str:
    """Why RE2 cannot run ``pattern`` (``""``: it can), in RE2's words and
    what they mean."""
    try:
        re2.compile(pattern, _re2_options())
    except re2.error as err:
        reason = err.args[0] if err.args else ""
        reason = reason.decode(errors="replace") if isinstance(reason, bytes) else str(reason)
    else:
        return ""
    for start, hint in _RE2_HINTS:
        if reason.startswith(start):
            return f"{reason} ({hint})"
    return f"{reason} (RE2 does not support this syntax)"


def re2_program_size(pattern: str) -> int:
    """The size of RE2's program for ``pattern`` as it runs (0: RE2 cannot
    run it); its time per character of text grows with it."""
    compiled = _re2_pattern(pattern)
    return compiled.programsize if compiled is not None else 0


def pattern_search(pattern: str, text: str, matching: int = MATCHING) -> bool:
    """Does a customer's pattern occur in ``text`` (case-insensitive)? A
    pattern that does not compile matches nothing (under RE2 since
    version 3; versions 1 and 2 ran it on ``re``)."""
    if matching >= 2:
        compiled = _re2_pattern(pattern)
        if compiled is not None:
            return compiled.search(text) is not None
        if matching >= 3:
            return False
    try:
        return re.search(pattern, text, re.IGNORECASE) is not None
    except re.error:
        return False


# One character class: nothing to backtrack.
_PHONE_STRIP_RE = re.compile(r"[\s\-.()]")


# --- text ---------------------------------------------------------------------------------------------


def normalize(text: str) -> str:
    """NFKD, drop combining marks, casefold, collapse whitespace, strip."""
    decomposed = unicodedata.normalize("NFKD", text or "")
    stripped = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    return " ".join(stripped.casefold().split())


def _strip_punct(text: str) -> str:
    """Strip leading/trailing punctuation, symbols and whitespace."""
    start, end = 0, len(text)
    while start < end and (text[start].isspace() or unicodedata.category(text[start])[0] in "PS"):
        start += 1
    while end > start and (text[end - 1].isspace() or unicodedata.category(text[end - 1])[0] in "PS"):
        end -= 1
    return text[start:end]


def _loose(text: str) -> str:
    """Normalized, with surrounding punctuation removed ("Yes!" -> "yes")."""
    norm = normalize(text)
    return _strip_punct(norm) or norm


# --- triggers -----------------------------------------------------------------------------------------


def keyword_matches(trigger: dict, text: str, matching: int = MATCHING) -> tuple[bool, int]:
    """Does a dm_keyword trigger match ``text``? Returns (matched, specificity).

    Specificity: exact = 3, contains / regex = 2, no match = 0.
    """
    keywords = [k for k in (trigger.get("keywords") or []) if isinstance(k, str) and k.strip()]
    match = trigger.get("match") or "contains"
    if not text or not text.strip() or not keywords:
        return False, 0
    norm_text = normalize(text)
    if match == "exact":
        target = _loose(text)
        for keyword in keywords:
            if _loose(keyword) == target:
                return True, 3
        return False, 0
    if match == "regex":
        for keyword in keywords:
            if pattern_search(keyword, text, matching) or pattern_search(keyword, norm_text, matching):
                return True, 2
        return False, 0
    # contains: the keyword as whole word(s) inside the text (anywhere in it
    # for a script written without spaces).
    for keyword in keywords:
        norm_kw = normalize(keyword)
        if not norm_kw:
            continue
        if matching >= 2 and _UNSPACED_SCRIPT_RE.search(norm_kw):
            if norm_kw in norm_text:
                return True, 2
        elif _whole_words_in(norm_kw, norm_text):
            return True, 2
    return False, 0


def _whole_words_in(words: str, text: str) -> bool:
    """Does ``words`` occur in ``text`` with no word character (``\\w``)
    right before or after it? Linear: ``find`` for the usual case, then,
    when that occurrence is inside a longer word, Knuth-Morris-Pratt over
    the rest of the text (O(len(text) + len(words)), however many times
    ``words`` overlaps itself)."""
    size, end = len(words), len(text)

    def bounded(at: int) -> bool:
        return (at == 0 or not _WORD_RE.match(text, at - 1)) and (
            at + size == end or not _WORD_RE.match(text, at + size)
        )

    at = text.find(words)
    if at < 0 or bounded(at):
        return at >= 0
    # fallback[i]: the length of the longest proper prefix of words[:i + 1] that is also its suffix.
    fallback = [0] * size
    k = 0
    for i in range(1, size):
        while k and words[i] != words[k]:
            k = fallback[k - 1]
        if words[i] == words[k]:
            k += 1
        fallback[i] = k
    k = 0
    for i in range(at + 1, end):
        while k and text[i] != words[k]:
            k = fallback[k - 1]
        if text[i] == words[k]:
            k += 1
            if k == size:
                if bounded(i + 1 - size):
                    return True
                k = fallback[k - 1]
    return False


def _trigger(automation: AutomationSnapshot) -> dict | None:
    definition = automation.definition if isinstance(automation.definition, dict) else {}
    if definition.get("status") == "paused":
        return None
    trigger = definition.get("trigger")
    return trigger if isinstance(trigger, dict) else None


def _keyword_score(trigger: dict, text: str, matching: int) -> int:
    """Keyword filter of comment / story_reply triggers: no keywords = 1 (any text), else as dm_keyword."""
    keywords = [k for k in (trigger.get("keywords") or []) if isinstance(k, str) and k.strip()]
    if not keywords:
        return 1
    matched, score = keyword_matches(trigger, text, matching)
    return score if matched else 0


def _best(scored: list[tuple[AutomationSnapshot, int]]) -> AutomationSnapshot | None:
    """The highest score (> 0); ties go to the first in list order."""
    best: AutomationSnapshot | None = None
    best_score = 0
    for automation, score in scored:
        if score > best_score:
            best, best_score = automation, score
    return best


def ref_matches(pattern: str, ref: str) -> bool:
    """Does a ref_link pattern match a referral ref? Case-insensitive; ``*`` matches any characters."""
    if not isinstance(pattern, str) or not isinstance(ref, str) or not pattern.strip() or not ref.strip():
        return False
    parts = [normalize(part) for part in pattern.split("*")]
    text = normalize(ref)
    if len(parts) == 1:
        return text == parts[0]
    # The first and last parts are anchored; each part between them is
    # found leftmost after the one before (a later place never helps the
    # rest match). Each ``find`` starts where the last one ended: at most
    # O(len(ref) * len(part)) in all, and a pattern is at most
    # core.flow.MAX_REF (100) characters, checked when saved.
    head, *middle, tail = parts
    end = len(text) - len(tail)
    if end < len(head) or not text.startswith(head) or not text.endswith(tail):
        return False
    pos = len(head)
    for part in middle:
        found = text.find(part, pos, end)
        if found < 0:
            return False
        pos = found + len(part)
    return True


def _ref_score(trigger: dict, ref: str) -> int:
    """2 for a ref listed exactly, 1 for a wildcard match, 0 for none."""
    score = 0
    for pattern in trigger.get("refs") or []:
        if ref_matches(pattern, ref):
            score = max(score, 1 if "*" in pattern else 2)
    return score


def _media_score(trigger: dict, media_id: str) -> int:
    """1 for any post (no media_ids), 2 for a listed post, 0 for another post."""
    wanted = [m for m in (trigger.get("media_ids") or []) if isinstance(m, str) and m.strip()]
    if not wanted:
        return 1
    # A Page post id is "<page id>_<post id>"; either form may be listed.
    if media_id and any(media_id == m or media_id.endswith("_" + m) for m in wanted):
        return 2
    return 0


def select_automation(
    automations: list[AutomationSnapshot], event: InboundEvent, *, is_first_message: bool, matching: int = MATCHING
) -> AutomationSnapshot | None:
    """The automation an inbound event starts, or None (``matching``: the
    rules' version, module docstring).

    - ``comment``: comment triggers only (post filter, only_top_level, keywords;
      exact beats contains/regex beats no keywords, then a trigger naming the post
      beats an any-post one, then the first in list order).
    - ``story_mention``: the first story_mention trigger.
    - ``referral``, and messages / postbacks carrying a ``ref``: ref_link first
      (a listed ref beats a wildcard match); a bare referral matches nothing else.
    - messages and postbacks: postback payload, then story_reply (a message with
      ``story_url``), then DM keyword (exact beats contains/regex), then
      any_message/first_message (on a contact's first message), then
      any_message/default (messages only). Ties go to the first in list order.
    """
    candidates = [(a, t) for a in automations if (t := _trigger(a)) is not None]

    def of_type(kind: str) -> list[tuple[AutomationSnapshot, dict]]:
        return [(a, t) for a, t in candidates if t.get("type") == kind]

    if event.kind == "comment":
        scored = []
        for automation, trigger in of_type("comment"):
            media = _media_score(trigger, event.media_id or "")
            keyword = _keyword_score(trigger, event.text, matching)
            if not media or not keyword:
                continue
            if trigger.get("only_top_level", True) and not event.is_top_level_comment:
                continue
            # Keyword specificity first, then a trigger naming the post beats an any-post one.
            scored.append((automation, keyword * 2 + media))
        return _best(scored)

    if event.kind == "story_mention":
        mentions = of_type("story_mention")
        return mentions[0][0] if mentions else None

    if event.kind not in ("message", "postback", "referral"):
        return None

    if event.ref and event.ref.strip():
        found = _best([(a, _ref_score(t, event.ref)) for a, t in of_type("ref_link")])
        if found is not None:
            return found
    if event.kind == "referral":
        return None

    if event.payload:
        for automation, trigger in candidates:
            if trigger.get("type") == "postback" and event.payload in (trigger.get("payloads") or []):
                return automation

    if event.kind == "message" and event.story_url:
        found = _best([(a, _keyword_score(t, event.text, matching)) for a, t in of_type("story_reply")])
        if found is not None:
            return found

    if event.kind == "message" and event.text and event.text.strip():
        best: AutomationSnapshot | None = None
        best_score = 0
        for automation, trigger in candidates:
            if trigger.get("type") != "dm_keyword":
                continue
            matched, score = keyword_matches(trigger, event.text, matching)
            if matched and score > best_score:
                best, best_score = automation, score
        if best is not None:
            return best

    if is_first_message:
        for automation, trigger in candidates:
            if trigger.get("type") == "any_message" and trigger.get("scope") == "first_message":
                return automation

    if event.kind == "message":
        for automation, trigger in candidates:
            if trigger.get("type") == "any_message" and (trigger.get("scope") or "default") == "default":
                return automation
    return None


def public_reply_text(trigger: dict, comment_id: str) -> str:
    """The public reply variant for a comment: stable for a comment id (replays), varying across comments.

    "" when the trigger has no variants. The text is returned as written (render it if it has placeholders).
    """
    variants = [v for v in (trigger.get("public_replies") or []) if isinstance(v, str) and v.strip()]
    if not variants:
        return ""
    digest = 0x811C9DC5  # FNV-1a, 32 bit: deterministic across processes (unlike hash())
    for byte in (comment_id or "").encode():
        digest = ((digest ^ byte) * 0x01000193) & 0xFFFFFFFF
    return variants[digest % len(variants)]


# --- templates ----------------------------------------------------------------------------------------


class Placeholder(NamedTuple):
    """``{{ path }}`` or ``{{ path | fallback }}`` in a template."""

    start: int
    end: int
    path: str  # stripped
    fallback: str | None  # stripped; None without a "|"


def placeholders(template: str) -> Iterator[Placeholder]:
    """The placeholders of ``template``, left to right: ``{{``, then
    anything but braces up to ``}}``; the path is what comes before the
    first ``|``. Anything else (a lone brace, ``{{`` without its ``}}``) is
    text. Linear: each ``find`` starts past where the one before it stopped
    (the next brace of each kind is looked up only once the scan has passed
    it), and each placeholder's inside is split once."""
    n = len(template)
    open_at = close_at = -1  # the first "{" / "}" at or after the current inside (n: none)
    pos = 0
    while (start := template.find("{{", pos)) >= 0:
        inside = start + 2
        if open_at < inside:
            open_at = template.find("{", inside)
            open_at = n if open_at < 0 else open_at
        if close_at < inside:
            close_at = template.find("}", inside)
            close_at = n if close_at < 0 else close_at
        if close_at < open_at and template.startswith("}", close_at + 1):
            path, bar, fallback = template[inside:close_at].partition("|")
            yield Placeholder(start, close_at + 2, path.strip(), fallback.strip() if bar else None)
            pos = close_at + 2
        else:
            pos = start + 1


def _template_text(value: Any) -> str:
    """A value as a template shows it: a list as its items separated by
    commas, an object as JSON, ``true`` / ``false``, a whole float without
    ``.0``. Conditions compare ``_as_text``: how a value is shown changes
    no branch a workflow takes."""
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False, default=str)
    if isinstance(value, list | tuple):
        return ", ".join(text for v in value if (text := _template_text(v)))
    return _as_text(value)


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return str(int(value))
    if isinstance(value, list | tuple):
        return ", ".join(_as_text(v) for v in value if _as_text(v))
    return str(value)


def _lookup(mapping: Any, key: str) -> Any:
    if not isinstance(mapping, dict):
        return None
    if key in mapping:
        return mapping[key]
    lowered = key.lower()
    for k, v in mapping.items():
        if isinstance(k, str) and k.lower() == lowered:
            return v
    return None


def _resolve(path: str, contact: ContactSnapshot, context: dict) -> Any:
    parts = [p.strip() for p in path.split(".")]
    if len(parts) < 2 or any(not p for p in parts):
        return None
    root = parts[0].lower()
    if root == "contact":
        attr = parts[1].lower()
        if attr in ("first_name", "last_name", "username") and len(parts) == 2:
            return getattr(contact, attr, "")
        if attr == "fields" and len(parts) >= 3:
            value: Any = contact.fields or {}
            for part in parts[2:]:
                value = _lookup(value, part)
            return value
        return None
    if root == "context":
        value = context
        for part in parts[1:]:
            value = _lookup(value, part)
        return value
    return None


def _fallback(raw: str | None) -> str:
    text = (raw or "").strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1]
    return text


def render(template: str, contact: ContactSnapshot, context: dict | None = None) -> str:
    """Fill ``{{contact.*}}`` / ``{{context.*}}`` placeholders. Never raises.

    ``{{contact.first_name | there}}`` uses "there" when the value is empty.
    Unknown or empty placeholders render empty, and the spacing they leave
    behind is tidied ("Hi {{contact.first_name}}!" -> "Hi!").
    """
    if not isinstance(template, str):
        return ""
    ctx = context if isinstance(context, dict) else {}
    source = template.replace(_EMPTY, "")
    pieces: list[str] = []
    pos = 0
    for placeholder in placeholders(source):
        try:
            value = _template_text(_resolve(placeholder.path, contact, ctx)).replace(_EMPTY, "")
        except Exception:  # defensive: a template must never break a run
            value = ""
        if not value.strip():
            value = _fallback(placeholder.fallback)
        pieces += (source[pos : placeholder.start], value if value.strip() else _EMPTY)
        pos = placeholder.end
    pieces.append(source[pos:])
    out = "".join(pieces)
    if _EMPTY not in out:
        return out
    return _tidy(out)


def _tidy(text: str) -> str:
    """Remove the empty placeholders (``_EMPTY``) from a rendered text with
    the gaps they leave. Empties with only spaces or tabs between them count
    as one; with the spaces and tabs around it, an empty goes when a
    punctuation mark follows, at the start or end of a line, and between
    two words the gap becomes one space; else only the empty goes. Linear:
    one pass, each character read by one ``find``, blank match or
    ``rstrip``."""
    n = len(text)
    pieces: list[str] = []
    done = 0  # text[:done] is settled
    while (first := text.find(_EMPTY, done)) >= 0:
        last = first  # the last empty of a run separated by blanks only
        after = _BLANKS_RE.match(text, first + 1).end()
        while after < n and text[after] == _EMPTY:
            last = after
            after = _BLANKS_RE.match(text, after + 1).end()
        before = text[done:first]
        kept = before.rstrip(" \t")
        start = done + len(kept)  # the blanks before the run begin here
        pieces.append(kept)
        followed_by = text[after] if after < n else ""
        punctuation_follows = followed_by != "" and followed_by in _PUNCT_AFTER
        line_edge = start == 0 or text[start - 1] == "\n" or followed_by in ("", "\n")
        if not (punctuation_follows or line_edge):  # else the blanks around go too
            if start < first and last + 1 < after:
                pieces.append(" ")  # between two words
            else:
                pieces += (text[start:first], text[last + 1 : after])
        done = after
    pieces.append(text[done:])
    return "".join(pieces)


# --- replies and conditions ---------------------------------------------------------------------------


def parse_number(value: Any) -> int | float | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if not isinstance(value, str):
        return None
    text = value.strip()
    if not _NUMBER_RE.match(text):
        return None
    text = text.replace(",", ".")
    if "." in text:
        return float(text)
    return int(text)


def validate_reply(step: dict, text: str, matching: int = MATCHING) -> tuple[bool, object]:
    """Validate a reply for a wait_for_reply step: (True, value) or (False, None)."""
    stripped = (text or "").strip()
    if not stripped:
        return False, None
    kind = step.get("validate") or "none"
    if kind == "email":
        m = _EMAIL_RE.match(stripped) if len(stripped) <= MAX_EMAIL else None
        if not m:
            return False, None
        return True, f"{m.group('local')}@{m.group('domain').lower()}"
    if kind == "phone":
        compact = _PHONE_STRIP_RE.sub("", stripped)
        plus = compact.startswith("+")
        digits = compact[1:] if plus else compact
        if not (digits.isascii() and digits.isdigit() and 7 <= len(digits) <= 15):
            return False, None
        return True, ("+" + digits) if plus else digits
    if kind == "number":
        number = parse_number(stripped)
        return (True, number) if number is not None else (False, None)
    if kind == "regex":
        ok = pattern_search(step.get("pattern") or "", stripped, matching)
        return (True, stripped) if ok else (False, None)
    if kind == "choice":
        wanted = _loose(stripped)
        for choice in step.get("choices") or []:
            if isinstance(choice, str) and _loose(choice) == wanted:
                return True, choice
        return False, None
    return True, stripped


def _is_empty(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, list | tuple | dict | set):
        return len(value) == 0
    return False


def _equals(actual: Any, expected: Any) -> bool:
    if isinstance(actual, list | tuple):
        return any(_equals(item, expected) for item in actual)
    a_num, e_num = parse_number(actual), parse_number(expected)
    if a_num is not None and e_num is not None:
        return a_num == e_num
    return normalize(_as_text(actual)) == normalize(_as_text(expected))


def _contains(actual: Any, expected: Any) -> bool:
    if isinstance(actual, list | tuple):
        return any(_equals(item, expected) for item in actual)
    if _is_empty(actual):
        return False
    return normalize(_as_text(expected)) in normalize(_as_text(actual))


def _check(condition: dict, contact: ContactSnapshot, last_reply: str, matching: int) -> bool:
    subject = condition.get("subject")
    op = condition.get("op")
    expected = condition.get("value")
    if subject == "tag":
        tags = {normalize(t) for t in (contact.tags or []) if isinstance(t, str)}
        if op in ("exists", "not_exists"):
            return bool(tags) == (op == "exists")
        present = normalize(_as_text(expected)) in tags
        if op in ("has", "equals", "contains"):
            return present
        if op in ("not_has", "not_equals"):
            return not present
        return False
    if subject == "field":
        actual = (contact.fields or {}).get(condition.get("name") or "")
    elif subject == "reply":
        actual = last_reply or ""
    else:
        return False
    if op == "equals":
        return _equals(actual, expected)
    if op == "not_equals":
        return not _equals(actual, expected)
    if op in ("contains", "has"):
        return _contains(actual, expected)
    if op == "not_has":
        return not _contains(actual, expected)
    if op == "exists":
        return not _is_empty(actual)
    if op == "not_exists":
        return _is_empty(actual)
    if op == "matches":
        if _is_empty(actual):
            return False
        return pattern_search(_as_text(expected), _as_text(actual), matching)
    if op in ("gt", "lt"):
        a_num, e_num = parse_number(actual), parse_number(expected)
        if a_num is None or e_num is None:
            return False
        return a_num > e_num if op == "gt" else a_num < e_num
    return False


def evaluate_condition(step: dict, contact: ContactSnapshot, last_reply: str, matching: int = MATCHING) -> bool:
    """Evaluate a condition step's conditions (match "all" or "any")."""
    conditions = [c for c in (step.get("conditions") or []) if isinstance(c, dict)]
    results = (_check(c, contact, last_reply, matching) for c in conditions)
    if step.get("match") == "any":
        return any(results)
    return all(results)


# --- navigation ---------------------------------------------------------------------------------------


def step_index(steps: list[dict]) -> dict[str, int]:
    """Step id -> position (the first occurrence wins)."""
    index: dict[str, int] = {}
    for i, step in enumerate(steps):
        step_id = step.get("id")
        if isinstance(step_id, str) and step_id not in index:
            index[step_id] = i
    return index


def resolve_target(steps: list[dict], current_index: int, target: str | None) -> int | None:
    """Index of the next step: None/"" -> the following step, "end" -> None, else the id's index."""
    if not target:
        nxt = current_index + 1
        return nxt if 0 <= nxt < len(steps) else None
    if target == "end":
        return None
    return step_index(steps).get(target)


# What a step's option means when its definition leaves it out: the one
# place for the API's schema (core/flow.py) and for the runs.
STEP_DEFAULTS: dict[str, Any] = {
    "timeout_seconds": 86400,  # wait_for_reply, wait_for_event
    "max_retries": 2,  # wait_for_reply: invalid answers before on_invalid
    "on_timeout": "end",
    "on_invalid": "end",
    "history_messages": 12,  # ai_reply: the conversation's last messages the model sees
    "fallback_text": "Thanks for your message! A teammate will get back to you shortly.",
}


def option(step: dict, name: str) -> Any:
    """A step's option, or its default (``STEP_DEFAULTS``)."""
    return step.get(name, STEP_DEFAULTS[name])


def delay_seconds(step: dict) -> int:
    def part(key: str) -> int:
        try:
            return int(step.get(key) or 0)
        except (TypeError, ValueError):
            return 0

    return part("seconds") + 60 * part("minutes") + 3600 * part("hours") + 86400 * part("days")


def quick_replies(step: dict) -> list[QuickReply]:
    out: list[QuickReply] = []
    for item in step.get("quick_replies") or []:
        if isinstance(item, str):
            out.append(QuickReply(title=item, payload=item))
        elif isinstance(item, dict) and item.get("title"):
            out.append(QuickReply(title=item["title"], payload=item.get("payload") or item["title"]))
    return out


def buttons(step: dict) -> list[Button]:
    out: list[Button] = []
    for item in step.get("buttons") or []:
        if isinstance(item, dict) and item.get("title"):
            out.append(
                Button(title=item["title"], payload=item.get("payload") or "", url=item.get("url") or "")
            )
    return out


def leading_send(steps: list[dict]) -> tuple[dict | None, bool, bool]:
    """The flow's first step when it is a ``send_message`` (else None);
    whether a ``wait_for_reply`` follows it (the run must accept the answer
    from its first moment); and whether it is the whole flow (nothing runs
    after it)."""
    if not steps or steps[0].get("type") != "send_message" or not isinstance(steps[0].get("text"), str):
        return None, False, False
    nxt = resolve_target(steps, 0, steps[0].get("next"))
    if nxt is None:
        return steps[0], False, True
    return steps[0], steps[nxt].get("type") == "wait_for_reply", False


def fields_read(definition: Any) -> set[str]:
    """The contact fields a flow can read, lowercased (``_resolve`` looks a
    template's field up case-insensitively; a condition by its exact name):
    the first name after ``contact.fields.`` in any placeholder of any of its
    texts, and the names of its field conditions. A run needs no other field
    of the contact."""
    names: set[str] = set()
    stack = [definition]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            if value.get("subject") == "field" and isinstance(value.get("name"), str):
                names.add(value["name"].lower())
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, str) and "{{" in value:
            for placeholder in placeholders(value):
                parts = [p.strip() for p in placeholder.path.split(".")]
                if len(parts) >= 3 and parts[0].lower() == "contact" and parts[1].lower() == "fields":
                    names.add(parts[2].lower())
    return names


def uses_contact(template: str) -> bool:
    """True when the template reads the contact (name, fields)."""
    return any(p.path.lower().startswith("contact.") for p in placeholders(template))


# Events that can start an automation; of those, the ones that answer a run
# waiting for input (a comment is not an answer to a DM question).
TRIGGERING_KINDS = ("message", "postback", "comment", "story_mention", "referral")
REPLY_KINDS = ("message", "postback")


def held_from_triggers(kind: str, contact: ContactSnapshot) -> str:
    """Why a recorded event of ``kind`` from ``contact`` starts nothing, in
    the order the conversation checks (``""``: it is matched against the
    triggers): ``"not_triggering"`` (a reaction, a read receipt),
    ``"restricted"`` (the person restricted processing or withdrew consent:
    logged as required, never processed further) or ``"human"`` (a teammate
    owns the conversation). The conversation routes by it, and
    ``record_inbound`` sends a first reply only when it is empty."""
    if kind not in TRIGGERING_KINDS:
        return "not_triggering"
    if contact.processing_restricted or contact.consent_withdrawn:
        return "restricted"
    return "human" if contact.human_takeover else ""


def run_workflow_id(workspace_id: str, automation_id: str, contact_id: str, event_id: str) -> str:
    """The run's workflow id: one run per automation, contact and event."""
    digest = hashlib.sha256(event_id.encode()).hexdigest()[:16]
    return f"{workspace_id}/run/{automation_id}/{contact_id}/{digest}"


def needs_profile(contact: ContactSnapshot, platform: str) -> bool:
    """A Meta contact whose profile is still to be looked up: new, or
    without any name (``ContactSnapshot.is_new``; Telegram gives the name
    with every update)."""
    return contact.is_new and not contact.first_name and platform != "telegram"


def profile_due_after_routing(kind: str, contact: ContactSnapshot, platform: str) -> bool:
    """Whether the conversation looks the contact's profile up once it has
    routed their event, the reply path having not (their event started
    nothing): a Meta contact still to be looked up who wrote to the account
    (a DM, button, referral or story mention: the platforms give the profile
    of people who write; a commenter who never did is not looked up) and has
    not restricted processing. The CRM then shows their name, and a later
    broadcast greets them by it."""
    return (
        kind in TRIGGERING_KINDS
        and kind != "comment"
        and needs_profile(contact, platform)
        and not (contact.processing_restricted or contact.consent_withdrawn)
    )


def opening_send(
    *,
    workspace_id: str,
    channel_id: str,
    platform: str,
    run_id: str,
    automation: AutomationSnapshot,
    contact: ContactSnapshot,
    step: dict,
    whole_flow: bool,
    now_iso: str,
) -> SendMessageInput:
    """The send of a flow's opening message (``leading_send``), made before
    the run starts, under the idempotency key of the run's own first send
    (the run finds it sent). A new Meta contact's profile is looked up by the
    send: first, with the message rendered for them, when it uses the
    contact; else once it is out. A flow that is this one message is
    recorded as completed with the send (``completes_run``)."""
    profile_pending = needs_profile(contact, platform)
    profile_template = step["text"] if profile_pending and uses_contact(step["text"]) else ""
    text = render(step["text"], contact, {})
    completes_run = None
    if whole_flow:
        completes_run = RecordRunInput(
            run_id=run_id,
            workspace_id=workspace_id,
            channel_id=channel_id,
            contact_id=contact.id,
            automation_id=automation.id,
            version=automation.version,
            status="completed",
            trail=[TrailEntry(step_id=step["id"], type="send_message", status="done", at=now_iso, detail=text[:200])],
        )
    return SendMessageInput(
        channel_id=channel_id,
        contact_id=contact.id,
        recipient_id=contact.external_id,
        idempotency_key=f"{run_id}/{step['id']}/1",
        text=text,
        quick_replies=quick_replies(step),
        buttons=buttons(step),
        run_id=run_id,
        completes_run=completes_run,
        then_fetch_profile=profile_pending and not profile_template,
        profile_first_template=profile_template,
    )
