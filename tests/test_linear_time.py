"""No user-controlled text meets a backtracking regular expression (core/flowrt.py).

Each function that parses what a user or a platform sends (templates,
messages, refs, replies, log lines, webhook bodies) is timed on crafted
inputs of 100,000 characters, the kind that took Python's ``re`` seconds to
hours: a linear function answers in milliseconds. Best of 3 runs against an
absolute bound, so a noisy machine does not fail it.

The placeholder scanner, the tidying of empty placeholders, the ref wildcards,
whole-word keywords and the log redaction replaced regular expressions;
workflows replay, so each must answer exactly as the expression did. The
expressions are kept here as the reference, compared on templates as people
write them and on random inputs small enough for them.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable

import pytest
from pydantic_core import PydanticCustomError

from api.guard import body_problem
from api.routes.privacy_callbacks import SignedRequestError, parse_signed_request
from core import flow, flowrt
from core.contracts import ContactSnapshot
from core.ids import KINDS, conforms
from core.inbound import parse_meta_webhook, parse_telegram_update
from core.limits import MAX_REGEX_PROGRAM
from core.observability import _SECRET_PATTERNS, REDACTED, redact

N = 100_000
BOUND_SECONDS = 0.1
LARGEST_PROGRAM = r"(?:\w\W?){138}z"
assert 0.99 * MAX_REGEX_PROGRAM < flowrt.re2_program_size(LARGEST_PROGRAM) <= MAX_REGEX_PROGRAM


def contact(**kw) -> ContactSnapshot:
    return ContactSnapshot(id="ct_1", external_id="u1", **kw)


ANA = contact(first_name="Ana", fields={"plan": "pro", "tags": ["a", "b"]})
NOBODY = contact()


def _telegram(text: str) -> dict:
    return {
        "update_id": 1,
        "message": {
            "message_id": 1,
            "date": 1,
            "chat": {"id": 5, "type": "private"},
            "from": {"id": 5, "first_name": "Bo"},
            "text": text,
        },
    }


def _meta(text: str) -> dict:
    return {
        "object": "instagram",
        "entry": [
            {
                "id": "17841400000000000",
                "time": 1,
                "messaging": [
                    {
                        "sender": {"id": "u1"},
                        "recipient": {"id": "17841400000000000"},
                        "timestamp": 1,
                        "message": {"mid": "m1", "text": text},
                    }
                ],
            }
        ],
    }


def _signed(part: str) -> None:
    try:
        parse_signed_request(part + "." + part, "secret")
    except SignedRequestError:
        pass


def _check_template(text: str) -> None:
    try:
        flow._check_template(text, "value")
    except PydanticCustomError:  # an unknown placeholder: refused, in as little time
        pass


def _keyword(keyword: str, text: str, match: str = "contains") -> None:
    flowrt.keyword_matches({"type": "dm_keyword", "keywords": [keyword], "match": match}, text)


spaces, a_s = " " * N, "a" * N
CASES: list[tuple[str, Callable[[], object]]] = [
    ("render: {{ and spaces", lambda: flowrt.render("{{" + spaces, ANA)),
    ("render: {{ and letters", lambda: flowrt.render("{{" + a_s, ANA)),
    ("render: {{ spaces |", lambda: flowrt.render("{{" + spaces + "|" + spaces, ANA)),
    ("render: nested braces", lambda: flowrt.render("{{" * (N // 4) + "}}" * (N // 4), ANA)),
    ("render: {{{ runs", lambda: flowrt.render("{{{x" * (N // 4), ANA)),
    (
        "render: spaces around an empty placeholder",
        lambda: flowrt.render(spaces + "{{contact.last_name}}" + spaces + "x", ANA),
    ),
    (
        "render: spaces then an empty placeholder at the end",
        lambda: flowrt.render("x" + spaces + "{{contact.last_name}}", ANA),
    ),
    (
        "render: spaces not followed by an empty placeholder",
        lambda: flowrt.render("{{contact.last_name}} x" + spaces + "y", ANA),
    ),
    ("render: many empty placeholders", lambda: flowrt.render("{{contact.last_name}} " * (N // 22), NOBODY)),
    (
        "render: empty placeholders between spaces",
        lambda: flowrt.render(("a " + " " * 40 + "{{x}}" + " " * 40) * (N // 90), ANA),
    ),
    (
        "render: a long placeholder",
        lambda: flowrt.render("{{ contact.fields." + "a." * (N // 2) + "b | x }}", ANA),
    ),
    ("uses_contact: {{ and spaces", lambda: flowrt.uses_contact("{{" + spaces)),
    ("uses_contact: many placeholders", lambda: flowrt.uses_contact("{{ context.a }}" * (N // 15))),
    ("flow._check_template: {{ and spaces", lambda: _check_template("{{" + spaces)),
    (
        "flow._check_template: a long path",
        lambda: _check_template("{{contact.fields." + "a." * (N // 2) + "a}}"),
    ),
    (
        "flow._check_template: a long unknown path",
        lambda: _check_template("{{contact.fields." + "a." * (N // 2) + "}}"),
    ),
    ("flow._check_template: {{ and spaces, closed", lambda: _check_template("{{" + spaces + "}}")),
    (
        "ref_matches: *a*a*a*a*a*a*a*a*a*b and 40 a's",
        lambda: flowrt.ref_matches("*a*a*a*a*a*a*a*a*a*b", "a" * 40),
    ),
    ("ref_matches: *a*a*a*a*a*a*a*a*a*b", lambda: flowrt.ref_matches("*a*a*a*a*a*a*a*a*a*b", a_s)),
    ("ref_matches: *-*-*-*-*2024", lambda: flowrt.ref_matches("*-*-*-*-*2024", "-" * N)),
    ("ref_matches: a long part", lambda: flowrt.ref_matches("*" + "a" * 98 + "b*", a_s)),
    ("keyword_matches: contains, periodic", lambda: _keyword("a " * 49 + "b", "a " * (N // 2))),
    ("keyword_matches: contains, inside words", lambda: _keyword("a a", ("a aa" * (N // 4)))),
    (
        "keyword_matches: contains, expanding keyword",
        lambda: _keyword("\ufdfa" * 99 + "x", "\ufdfa" * (N // 18)),
    ),
    ("keyword_matches: exact", lambda: _keyword("hello", "!" * (N // 2) + "hello" + "?" * (N // 2), "exact")),
    (
        "validate_reply: email",
        lambda: flowrt.validate_reply({"validate": "email"}, "a@" + "a." * (N // 2) + "1"),
    ),
    (
        "validate_reply: email, long local part",
        lambda: flowrt.validate_reply({"validate": "email"}, "a." * (N // 2) + "@"),
    ),
    ("validate_reply: number", lambda: flowrt.validate_reply({"validate": "number"}, "1" * N + "x")),
    (
        "validate_reply: number with a comma",
        lambda: flowrt.validate_reply({"validate": "number"}, "1," + "1" * N + ","),
    ),
    ("validate_reply: phone", lambda: flowrt.validate_reply({"validate": "phone"}, "(-. " * (N // 4))),
    (
        "validate_reply: choice",
        lambda: flowrt.validate_reply({"validate": "choice", "choices": ["yes"]}, "!" * N),
    ),
    ("normalize", lambda: flowrt.normalize("e\u0301 " * (N // 3))),
    ("redact: digits", lambda: redact("1" * N)),
    ("redact: a token-like number", lambda: redact(("1" * 10 + ":" + "a" * 29 + " ") * (N // 40))),
    ("redact: Bearer and spaces", lambda: redact("Bearer" + spaces)),
    ("redact: a JSON token key and spaces", lambda: redact('"token"' + spaces + ":" + spaces)),
    ("redact: query secrets", lambda: redact("access_token" * (N // 12))),
    ("redact: many Bearers", lambda: redact("Bearer\t" * (N // 7))),
    ("redact: many JSON token keys", lambda: redact('"token" : ' * (N // 10))),
    ("parse_telegram_update: a long text", lambda: parse_telegram_update(_telegram("\ud83d" + "a" * N), "1")),
    ("parse_meta_webhook: a long text", lambda: parse_meta_webhook(_meta("\udfff" * N))),
    ("privacy_callbacks.parse_signed_request", lambda: _signed("a" * N + "=")),
    ("api.guard.body_problem", lambda: body_problem(b'["' + b"a" * N + b'"]')),
    # RE2 is linear, but its time per character grows with the program: the
    # largest one a customer may save (core.limits.MAX_REGEX_PROGRAM).
    ("pattern_search: the largest RE2 program allowed", lambda: flowrt.pattern_search(LARGEST_PROGRAM, "a " * (N // 2))),
    *[(f"ids.conforms: {kind}", lambda kind=kind: conforms("1" * (N // 2) + ":" + "_" * (N // 2), kind)) for kind in KINDS],
]


@pytest.mark.parametrize(("name", "call"), CASES, ids=[name for name, _ in CASES])
def test_each_parser_of_user_text_is_linear(name, call):
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - started)
        if best < BOUND_SECONDS:
            break
    assert best < BOUND_SECONDS, f"{name}: {best:.3f} s on {N:,} characters (bound {BOUND_SECONDS} s)"


# --- the same answers as the expressions they replaced -------------------------------------------

OLD_PLACEHOLDER_RE = re.compile(r"\{\{\s*([^{}|]*?)\s*(?:\|\s*([^{}]*?)\s*)?\}\}")
E = flowrt._EMPTY


def old_render(template: str, contact: ContactSnapshot, context: dict | None = None) -> str:
    ctx = context if isinstance(context, dict) else {}
    source = template.replace(E, "")

    def substitute(match: re.Match[str]) -> str:
        value = flowrt._as_text(flowrt._resolve(match.group(1), contact, ctx)).replace(E, "")
        if not value.strip():
            value = flowrt._fallback(match.group(2))
        return value if value.strip() else E

    out = OLD_PLACEHOLDER_RE.sub(substitute, source)
    if E not in out:
        return out
    while True:
        merged = re.sub(E + r"[ \t]*" + E, E, out)
        if merged == out:
            break
        out = merged
    out = re.sub(r"[ \t]*" + E + r"[ \t]*(?=[" + re.escape(flowrt._PUNCT_AFTER) + "])", "", out)
    out = re.sub(r"^[ \t]*" + E + r"[ \t]*", "", out, flags=re.MULTILINE)
    out = re.sub(r"[ \t]*" + E + r"[ \t]*$", "", out, flags=re.MULTILINE)
    out = re.sub(r"[ \t]+" + E + r"[ \t]+", " ", out)
    return out.replace(E, "")


TEMPLATES = [
    "Hi {{contact.first_name}}!",
    "Hi {{contact.first_name | there}}, welcome to the shop.",
    "Hi {{ contact.first_name|there }}! Your plan: {{contact.fields.plan | free}}.",
    'Hello {{contact.first_name | "friend"}} 👋',
    "Hi {{contact.last_name}}, here is the menu",
    "{{contact.last_name}} welcome",
    "Thanks {{contact.last_name}} for writing",
    "Thanks {{contact.last_name}} {{contact.username}} for writing",
    "Your code: {{context.code}}\nUse it before {{context.expiry | Sunday}}.",
    "Line one {{contact.last_name}}\n{{contact.last_name}} line two\n  {{contact.last_name}}  \nend",
    "Tags: {{contact.fields.tags}} ({{contact.fields.missing}})",
    "Bonjour ! {{contact.first_name}}",
    "a {{ }} b }} {{{",
    "Hi {{contact.first_name",
    "no placeholders, just {braces}",
    "{{contact.fields.plan}}{{contact.fields.plan}}",
    "{{contact.last_name}}\t{{contact.last_name}} . x",
    "Price: {{context.price | ask us}} — {{context.missing}}… ok",
    "{{ contact.first_name | a | b }} and {{|x}} and {{ | }}",
    "\u00a0{{contact.last_name}}\u00a0x {{\u2003contact.first_name\u2003}}",
    "(see {{contact.last_name}})",
    "{{{contact.first_name}}}",
    "Hi {{contact.first_name}},\r\n{{contact.last_name}}\r\nBye",
    "",
]
CONTACTS = [ANA, NOBODY, contact(first_name="  ", last_name="Lima", username="ana.l", fields={"plan": ""})]
CONTEXTS = [{}, {"code": "SAVE10", "price": "12 €"}, {"code": " ", "expiry": "Monday"}]


def test_render_answers_as_the_placeholder_expression_on_templates_as_written():
    for template in TEMPLATES:
        for person in CONTACTS:
            for context in CONTEXTS:
                assert flowrt.render(template, person, context) == old_render(template, person, context), (
                    template,
                    person,
                    context,
                )
        expected = [
            (m.start(), m.end(), m.group(1), m.group(2)) for m in OLD_PLACEHOLDER_RE.finditer(template)
        ]
        assert [tuple(p) for p in flowrt.placeholders(template)] == expected, template


# Pieces that meet every branch of the expression and of the tidying.
PIECES = [
    "{{",
    "}}",
    "{",
    "}",
    "|",
    " ",
    "  ",
    "\t",
    "\n",
    "\r",
    ".",
    ",",
    "!",
    ")",
    "…",
    "a",
    "Hi",
    "\u00a0",
    "\u2003",
    "\x1c",
    "\v",
    E,
    "'",
    '"',
    "contact.first_name",
    "contact.last_name",
    "contact.fields.plan",
    "context.code",
    "context.missing",
    "contact.fields.tags",
]


def test_render_answers_as_the_placeholder_expression_on_random_templates():
    rng = random.Random(16)
    for _ in range(20_000):
        template = "".join(rng.choice(PIECES) for _ in range(rng.randrange(0, 24)))
        person, context = rng.choice(CONTACTS), rng.choice(CONTEXTS)
        assert flowrt.render(template, person, context) == old_render(template, person, context), repr(
            template
        )
        assert flowrt.uses_contact(template) == any(
            m.group(1).strip().lower().startswith("contact.") for m in OLD_PLACEHOLDER_RE.finditer(template)
        ), repr(template)
        expected = [
            (m.start(), m.end(), m.group(1), m.group(2)) for m in OLD_PLACEHOLDER_RE.finditer(template)
        ]
        assert [tuple(p) for p in flowrt.placeholders(template)] == expected, repr(template)


def old_ref_matches(pattern: str, ref: str) -> bool:
    if not pattern.strip() or not ref.strip():
        return False
    regex = ".*".join(re.escape(flowrt.normalize(part)) for part in pattern.split("*"))
    return re.fullmatch(regex, flowrt.normalize(ref), re.DOTALL) is not None


def test_ref_wildcards_answer_as_the_expression():
    rng = random.Random(2)
    for _ in range(20_000):
        pattern = "".join(rng.choice("ab*_A") for _ in range(rng.randrange(1, 9)))
        ref = "".join(rng.choice("abB_") for _ in range(rng.randrange(1, 12)))
        assert flowrt.ref_matches(pattern, ref) == old_ref_matches(pattern, ref), (pattern, ref)


def test_whole_word_keywords_answer_as_the_expression():
    rng = random.Random(3)
    for _ in range(20_000):
        keyword = flowrt.normalize("".join(rng.choice("ab _-é") for _ in range(rng.randrange(1, 6))))
        text = flowrt.normalize("".join(rng.choice("ab _-é1") for _ in range(rng.randrange(0, 30))))
        if not keyword:
            continue
        expected = re.search(r"(?<!\w)" + re.escape(keyword) + r"(?!\w)", text) is not None
        assert flowrt._whole_words_in(keyword, text) == expected, (keyword, text)


def test_the_telegram_token_redaction_answers_as_before():
    old = re.compile(r"\d{6,}:[A-Za-z0-9_-]{30,}")
    (new,) = [pattern for pattern, _ in _SECRET_PATTERNS if ":[A-Za-z0-9_-]{30,}" in pattern.pattern]
    rng = random.Random(4)
    for _ in range(5_000):
        line = "".join(
            rng.choice(["1", "12345", "1234567", ":", "a", "a" * 29, "-", " ", "٣"]) for _ in range(12)
        )
        assert new.sub(REDACTED, line) == old.sub(REDACTED, line), line


def test_the_linear_scans_use_python_s_own_classes():
    """The scanners strip with ``str.strip`` where the expression had ``\\s``:
    the same characters."""
    space = re.compile(r"\s")
    assert [c for c in range(0x110000) if (space.match(chr(c)) is not None) != chr(c).isspace()] == []
