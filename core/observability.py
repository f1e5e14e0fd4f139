"""Metrics and structured logs for the API and the worker.

Metrics (prometheus_client, default registry; created once at import so
``create_app`` can be called many times in one process):

- ``vectory_webhook_seconds{source,outcome}`` webhook handler duration;
  outcome is ok | forged | malformed | too_large | unavailable (plus
  not_found for an unknown Telegram channel and error for anything else).
- ``vectory_webhook_events_total{source,result}`` events dispatched to
  Temporal or ignored (account not connected, unsupported item).
- ``vectory_events_deduplicated_total`` redeliveries caught by the message
  log's unique row (counted by the ``record_inbound`` activity; redeliveries
  the conversation drops from its in-memory set are not counted, because
  workflow code never touches metrics).
- ``vectory_inbox_dead_letters_total`` inbox events Temporal refused for
  good, set aside by the API's relay (``api/inbox.py``; ``vectory inbox
  dead-letters`` lists them).
- ``vectory_runs_started_total{trigger}`` ``api``: starts accepted by
  ``POST /v1/automations/{id}/runs`` (API process); ``any``: run rows
  created by the ``record_run`` activity (worker process, every trigger).

Where they are served:

- API: ``GET /metrics`` on the API port (``api/routes/ops.py``).
- Worker: its own counters on ``VECTORY_WORKER_METRICS_PORT`` (default
  9464) through ``prometheus_client.start_http_server``, and the Temporal
  SDK's metrics (task latencies, poller and slot usage, ...) on
  ``VECTORY_SDK_METRICS_PORT`` (default 9465) through the SDK runtime's
  Prometheus exporter. ``VECTORY_METRICS_HOST`` (default 127.0.0.1) is the
  bind address of both; a port of 0 disables that endpoint. A busy port
  stops the worker with a clear message.

Logs: ``configure_logging`` writes one JSON object per line to stdout with
``ts, level, logger, message, service`` and, inside Temporal code,
``workflow_id, run_id, activity``. The formatter never adds request bodies
or arbitrary ``extra`` fields, and redacts anything that looks like a
credential (bearer tokens, ``access_token=...`` query strings, Telegram bot
tokens) from the message and tracebacks.
"""

from __future__ import annotations

import functools
import gc
import json
import logging
import re
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from prometheus_client import Counter, Histogram, start_http_server
from temporalio import activity
from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig

# -- metrics -------------------------------------------------------------------

WEBHOOK_SECONDS = Histogram(
    "vectory_webhook_seconds",
    "Duration of webhook handling (verify, parse, hand to Temporal), by source and outcome.",
    ["source", "outcome"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
)
WEBHOOK_EVENTS = Counter(
    "vectory_webhook_events",
    "Webhook events dispatched to Temporal or ignored, by source.",
    ["source", "result"],
)
EVENTS_DEDUPLICATED = Counter(
    "vectory_events_deduplicated",
    "Inbound events recognised as platform redeliveries by the message log.",
)
EVENTS_UNRECORDABLE = Counter(
    "vectory_events_unrecordable",
    "Inbound events the database refused for their content (skipped: the person's conversation goes on).",
)
CONVERSATIONS_STARTED_EAGERLY = Counter(
    "vectory_conversations_started_eagerly",
    "New conversations whose first task Temporal handed straight to the API's worker (api/ingress.py).",
)
INBOX_DEAD_LETTERS = Counter(
    "vectory_inbox_dead_letters",
    "Inbox events Temporal refused for good, set aside as dead letters (the contact's later events go on).",
)
RUNS_STARTED = Counter(
    "vectory_runs_started",
    "Automation runs started: trigger=api for API starts, trigger=any for run rows the worker created.",
    ["trigger"],
)

WEBHOOK_OUTCOMES = {401: "forged", 403: "forged", 400: "malformed", 404: "not_found", 413: "too_large", 503: "unavailable"}

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def webhook_outcome(status_code: int | None) -> str:
    return WEBHOOK_OUTCOMES.get(status_code or 0, "error")


def observe_webhook(source: str) -> Callable[[F], F]:
    """Time a webhook handler and count its events.

    The handler's signature is preserved (``functools.wraps``; FastAPI reads
    the unwrapped function). An exception with a ``status_code`` (FastAPI's
    ``HTTPException``) selects the outcome label; the result's
    ``dispatched`` / ``ignored`` counts feed the events counter.
    """

    def decorate(handler: F) -> F:
        @functools.wraps(handler)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            outcome = "error"
            try:
                result = await handler(*args, **kwargs)
                outcome = "ok"
            except Exception as exc:
                outcome = webhook_outcome(getattr(exc, "status_code", None))
                raise
            finally:
                WEBHOOK_SECONDS.labels(source=source, outcome=outcome).observe(time.perf_counter() - started)
            dispatched = getattr(result, "dispatched", 0)
            ignored = getattr(result, "ignored", 0)
            if dispatched:
                WEBHOOK_EVENTS.labels(source=source, result="dispatched").inc(dispatched)
            if ignored:
                WEBHOOK_EVENTS.labels(source=source, result="ignored").inc(ignored)
            return result

        return wrapper  # type: ignore[return-value]

    return decorate


def freeze_startup_heap() -> None:
    """Move everything allocated while starting (modules, FastAPI routes,
    the SDK, pydantic schemas) out of the garbage collector's generations.

    Without it, each full collection walked those objects again: under a
    200 webhooks/s load the API's event loop stopped for up to 215 ms in a
    full collection (gc callbacks, bench/README.md), the tail of its answer
    times. Objects made later are collected as usual."""
    gc.collect()
    gc.freeze()


def serve_metrics(port: int, host: str = "127.0.0.1") -> None:
    """Serve this process's prometheus_client registry on host:port (a
    daemon thread). A busy port exits with a clear message."""
    try:
        start_http_server(port, addr=host)
    except OSError as err:
        raise SystemExit(f"cannot serve worker metrics on {host}:{port}: {err}") from None


def start_worker_metrics(port: int, host: str = "127.0.0.1") -> Runtime:
    """A Temporal runtime whose SDK metrics are exported for Prometheus on
    host:port. Pass it to ``Client.connect(runtime=...)``; the worker
    inherits it from the client. A busy port exits with a clear message."""
    try:
        return Runtime(telemetry=TelemetryConfig(metrics=PrometheusConfig(bind_address=f"{host}:{port}")))
    except (ValueError, RuntimeError) as err:
        raise SystemExit(f"cannot serve Temporal SDK metrics on {host}:{port}: {err}") from None


# -- logs ----------------------------------------------------------------------

REDACTED = "[redacted]"
# Log lines carry user text: each pattern is linear in Python's re (see
# core/flowrt.py): a literal first, then runs of one class each, a run
# ending where the next part's characters begin.
_SECRET_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"(?i)\b(Bearer)\s+\S+"), rf"\1 {REDACTED}"),
    (
        re.compile(
            r"(?i)\b((?:access|input|fb_exchange|refresh)_token|appsecret_proof|client_secret|verify_token|api_key)"
            r"=[^&\s\"']+"
        ),
        rf"\1={REDACTED}",
    ),
    (re.compile(r"(?i)(\"(?:access_token|api_key|token)\"\s*:\s*\")[^\"]+"), rf"\1{REDACTED}"),
    # Telegram bot tokens, also inside https://api.telegram.org/bot<token>/...
    # Tried only at a number's first digit: from each digit of a long number
    # the search would scan the rest of it again.
    (re.compile(r"(?<!\d)\d{6,}:[A-Za-z0-9_-]{30,}"), REDACTED),
    # The codec token in the path the Temporal UI calls (uvicorn's access log).
    (re.compile(r"(/codec/t/)[^/\s\"]+"), rf"\1{REDACTED}"),
]


def redact(text: str) -> str:
    for pattern, replacement in _SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


class JsonFormatter(logging.Formatter):
    """One JSON object per line. Only the fields listed here are written:
    never a record's arbitrary ``extra`` (request bodies, payloads)."""

    def __init__(self, service: str):
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage()),
            "service": self.service,
        }
        out.update(_temporal_context(record))
        if record.exc_info:
            out["exc"] = redact(self.formatException(record.exc_info))
        elif record.exc_text:
            out["exc"] = redact(record.exc_text)
        return json.dumps(out, ensure_ascii=False, default=str)


def _temporal_context(record: logging.LogRecord) -> dict[str, str]:
    details = getattr(record, "temporal_activity", None)
    if isinstance(details, dict):
        return {
            "workflow_id": str(details.get("workflow_id", "")),
            "run_id": str(details.get("workflow_run_id", "")),
            "activity": str(details.get("activity_type", "")),
        }
    details = getattr(record, "temporal_workflow", None)
    if isinstance(details, dict):
        return {"workflow_id": str(details.get("workflow_id", "")), "run_id": str(details.get("run_id", ""))}
    try:
        if activity.in_activity():
            info = activity.info()
            return {"workflow_id": info.workflow_id or "", "run_id": info.workflow_run_id or "", "activity": info.activity_type}
    except Exception:  # never let logging fail
        pass
    return {}


def configure_logging(service: str, level: str = "INFO") -> None:
    """JSON logs on stdout for the whole process (root logger, and
    uvicorn's loggers routed to it)."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers = []
        logger.propagate = True
