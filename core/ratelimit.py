"""Durable outbound rate limits: GCRA buckets in the database.

Every worker (and every restart of one) shares the same buckets, so a limit
holds across the fleet; there is no in-process counter and no lock in
Python. Each bucket is one ``RateBucket`` row whose ``tat`` (theoretical
arrival time, epoch seconds) is advanced by one conditional UPDATE:

    UPDATE ratebucket SET tat = max(tat, :now) + :interval
     WHERE key = :key AND tat - :now <= :tau          -- tau = (burst-1)*interval

One row updated means a cell was taken; none means the bucket is full, and
the wait is ``tat - now - tau``. The database serialises concurrent UPDATEs
of a row (PostgreSQL re-checks the WHERE clause on the row a concurrent
transaction committed; SQLite has one writer at a time), so two workers can
never both take the last cell. A missing row is an empty bucket: it is
inserted (``ON CONFLICT DO NOTHING``) on first use, and rows whose ``tat``
is in the past can be deleted at any time without changing behaviour
(``prune``).

A sender may also book a cell that frees up soon (``reserve(max_wait=...)``:
the same UPDATE with ``tau + max_wait``), then sleep until its slot: queued
senders are served one per interval in booking order, so a paced bucket
runs at its rate instead of losing each slot to the wake-up race.

Semantics of ``(interval, burst)``: at most ``burst`` cells at once, then
one every ``interval`` seconds; over any span of ``T`` seconds at most
``burst + T / interval`` cells. ``now`` is the caller's wall clock (workers'
clocks are assumed NTP-synchronised; a skew of a few milliseconds shifts a
slot by that much).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, Delete, Engine, Float, bindparam, case, delete, or_, select, update

from core.db import RateBucket, utcnow

Budget = tuple[str, float, int]  # (key, interval seconds, burst)

# Telegram: about 1 message/s per chat and 30/s per bot. The bot budget is
# strict pacing (burst 1) 5% slower than 30/s: any 31 consecutive cells span
# 1.05 s, so no 1-second window, wherever it starts, holds more than 30 sends
# as long as each send reaches the platform within SEND_JITTER_BUDGET of its
# cell (the sender re-books a cell it woke up too late for:
# activities/messaging.py). 1% left bursts of 31-35 on a loaded machine.
TELEGRAM_CHAT_INTERVAL = 1.0
TELEGRAM_BOT_INTERVAL = 1.0 / 30 * 1.05
SEND_JITTER_BUDGET = 30 * TELEGRAM_BOT_INTERVAL - 1.0  # 50 ms
# Meta Send API: 300 calls/s per account; private replies: 750/hour per account.
META_SEND_PER_SECOND = 300
META_PRIVATE_REPLIES_PER_HOUR = 750

# A refused reservation never reports less than this (float rounding could
# otherwise give 0 or a negative wait for a full bucket).
MIN_WAIT = 0.001

_TABLE = RateBucket.__table__  # type: ignore[attr-defined]

# The statements of a reservation, built once with bound parameters (one
# built per call cost more CPU than running it). ``b_limit`` is tau plus the
# longest wait the caller books.
_NOW = bindparam("b_now", type_=Float)
_TAKE = (
    update(_TABLE)
    .where(_TABLE.c.key == bindparam("b_key"), _TABLE.c.tat - _NOW <= bindparam("b_limit", type_=Float))
    .values(tat=case((_TABLE.c.tat > _NOW, _TABLE.c.tat), else_=_NOW) + bindparam("b_interval", type_=Float),
            updated_at=bindparam("b_updated_at"))
)
_TAT = select(_TABLE.c.tat).where(_TABLE.c.key == bindparam("b_key"))


def capped(key: str, limit: int, window: float) -> Budget:
    """A bucket that never lets more than ``limit`` cells through in ANY
    window of ``window`` seconds. GCRA admits at most ``burst + W/interval``
    cells in a window W, so half the limit is the burst and the other half
    is paced over the window."""
    burst = max(1, limit // 2)
    return (key, window / (limit - burst), burst)


def send_budgets(
    platform: str, account_id: str, chat_id: str, *, private_reply: bool, human: bool, settings: Any
) -> list[Budget]:
    """The buckets one outbound message draws from.

    ``account_id`` is the platform account (IG account id, Page id, bot id),
    ``chat_id`` the recipient (Telegram chat id; unused for Meta).

    - Telegram: ``tg:chat:<bot>:<chat>`` 1/s and ``tg:bot:<bot>`` 30/s
      (platform limits: they apply to human-written messages too).
    - Meta: always the Send API cap ``meta:send:<account>`` (300 in any second).
      Human-agent messages draw from nothing else. Private replies to
      comments (Instagram's 750/hour; applied to Messenger pages too) draw
      from ``meta:private:<account>`` instead of the automated-DM budget
      ``meta:dm:<account>`` (``settings.automated_dm_per_hour`` in any hour;
      0 disables it). Every cap holds over any window, not only on average.
    """
    if platform == "telegram":
        return [
            (f"tg:chat:{account_id}:{chat_id}", TELEGRAM_CHAT_INTERVAL, 1),
            (f"tg:bot:{account_id}", TELEGRAM_BOT_INTERVAL, 1),
        ]
    budgets: list[Budget] = [capped(f"meta:send:{account_id}", META_SEND_PER_SECOND, 1.0)]
    if human:
        return budgets
    if private_reply:
        budgets.append(capped(f"meta:private:{account_id}", META_PRIVATE_REPLIES_PER_HOUR, 3600.0))
    elif settings.automated_dm_per_hour > 0:
        budgets.append(capped(f"meta:dm:{account_id}", int(settings.automated_dm_per_hour), 3600.0))
    return budgets


def public_reply_budgets(account_id: str) -> list[Budget]:
    """A public reply under a comment: the Send API cap only."""
    return [capped(f"meta:send:{account_id}", META_SEND_PER_SECOND, 1.0)]


def buckets_of(account_ids: Sequence[str], chat_id: str | None = None) -> Delete:
    """A DELETE of the buckets naming these platform accounts (every bucket of
    the accounts), or with ``chat_id`` only that chat's Telegram bucket (of
    each account); for erasure, which must leave no platform id behind."""
    if chat_id is not None:
        keys = [f"tg:chat:{a}:{chat_id}" for a in account_ids]
        return delete(_TABLE).where(_TABLE.c.key.in_(keys))
    exact = [f"{kind}:{a}" for a in account_ids for kind in ("meta:send", "meta:dm", "meta:private", "tg:bot")]
    chats = [_TABLE.c.key.startswith(f"tg:chat:{a}:", autoescape=True) for a in account_ids]
    return delete(_TABLE).where(or_(_TABLE.c.key.in_(exact), *chats))


def _validate(requests: Sequence[Budget]) -> list[Budget]:
    seen: set[str] = set()
    out: list[Budget] = []
    for key, interval, burst in requests:
        if not key:
            raise ValueError("a rate bucket needs a key")
        if key in seen:
            raise ValueError(f"rate bucket {key!r} requested twice")
        if not interval > 0:
            raise ValueError(f"rate bucket {key!r}: interval must be > 0, not {interval!r}")
        if int(burst) < 1:
            raise ValueError(f"rate bucket {key!r}: burst must be >= 1, not {burst!r}")
        seen.add(key)
        out.append((key, float(interval), int(burst)))
    # One lock order for every transaction (PostgreSQL row locks): no deadlocks.
    return sorted(out)


class RateLimiter:
    """GCRA buckets in the ``ratebucket`` table (see the module docstring)."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def acquire(self, key: str, *, interval: float, burst: int = 1, now: float | None = None) -> float:
        """Take one cell of ``key``: 0.0 when taken, else the seconds until one
        is free (nothing is consumed then)."""
        return self.reserve([(key, interval, burst)], now=now)[0]

    def acquire_all(self, requests: Sequence[Budget], now: float | None = None) -> float:
        """Take one cell of every bucket, all or nothing: 0.0 when all were
        taken, else the longest wait among the full buckets (then none is
        consumed)."""
        return self.reserve(requests, now=now)[0]

    def reserve(
        self, requests: Sequence[Budget], now: float | None = None, *, max_wait: float = 0.0
    ) -> tuple[float, str]:
        """``acquire_all`` that also names the bucket to wait for:
        ``(0.0, "")`` when every cell was taken, else ``(wait, key)`` of the
        full bucket with the longest wait.

        With ``max_wait``, a cell that frees up within ``max_wait`` seconds is
        booked now (its slot is the caller's): ``(wait, "")`` means every cell
        was taken and the caller must wait ``wait`` seconds before using them.
        Callers queueing for one bucket are then served in booking order, one
        per interval, instead of all waking for the same free cell.

        All or nothing: the conditional UPDATEs run in one transaction (in key
        order) that is rolled back when any bucket is full.
        """
        budgets = _validate(requests)
        if not budgets:
            return 0.0, ""
        now = time.time() if now is None else float(now)
        started = time.monotonic()
        booked = 0.0
        with self.engine.connect() as conn:
            tx = conn.begin()
            try:
                for i, (key, interval, burst) in enumerate(budgets):
                    wait = self._take(conn, key, interval, burst, now, max_wait, started)
                    if wait < 0:  # booked: usable in -wait seconds
                        booked = max(booked, -wait)
                        continue
                    if wait > 0:
                        # The buckets not tried yet may be full too: report the
                        # longest wait so the caller does not come back early.
                        waits = [(wait, key)]
                        for other, o_interval, o_burst in budgets[i + 1 :]:
                            waits.append((self._peek(conn, other, o_interval, o_burst, now), other))
                        tx.rollback()
                        return max(waits)
                tx.commit()
            except BaseException:
                if tx.is_active:
                    tx.rollback()
                raise
        return booked, ""

    def _take(
        self, conn: Connection, key: str, interval: float, burst: int, now: float, max_wait: float = 0.0,
        started: float | None = None,
    ) -> float:
        """One conditional UPDATE; 0.0 when a cell was taken now, minus the
        wait when one was booked that frees up within ``max_wait``, else the
        (positive) wait. A booked cell whose moment passed while this
        reservation waited for the row's lock (``started``: its monotonic
        start) counts as taken now: concurrent senders book against their own,
        slightly older ``now``, and a wait of a few milliseconds made a sender
        judge itself late for its cell and book another one, wasting the
        first (an hourly budget lost a cell that way)."""
        tau = (burst - 1) * interval
        params = {"b_key": key, "b_now": now, "b_limit": tau + max_wait, "b_interval": interval,
                  "b_updated_at": utcnow()}
        if conn.execute(_TAKE, params).rowcount == 1:
            if max_wait <= 0:
                return 0.0
            tat = float(conn.execute(_TAT, {"b_key": key}).scalar_one())
            booked_at = tat - interval - tau  # the free moment of the cell just taken
            current = now + (time.monotonic() - started if started is not None else 0.0)
            return -(booked_at - now) if booked_at > current else 0.0
        tat = conn.execute(_TAT, {"b_key": key}).scalar()
        if tat is None:
            # First use of this bucket: an empty one (tat = now), then take.
            conn.execute(self._insert(conn).values(key=key, tat=now, updated_at=utcnow()).on_conflict_do_nothing(
                index_elements=["key"]))
            if conn.execute(_TAKE, params).rowcount == 1:
                return 0.0
            tat = conn.execute(_TAT, {"b_key": key}).scalar()
            if tat is None:  # deleted under us (prune with a skewed clock): try later
                return MIN_WAIT
        return max(float(tat) - now - tau, MIN_WAIT)

    @staticmethod
    def _peek(conn: Connection, key: str, interval: float, burst: int, now: float) -> float:
        tat = conn.execute(_TAT, {"b_key": key}).scalar()
        if tat is None:
            return 0.0
        return max(float(tat) - now - (burst - 1) * interval, 0.0)

    @staticmethod
    def _insert(conn: Connection):
        if conn.dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        elif conn.dialect.name == "sqlite":
            from sqlalchemy.dialects.sqlite import insert
        else:  # pragma: no cover - Vectory runs on SQLite and PostgreSQL
            raise NotImplementedError(f"rate limits need SQLite or PostgreSQL, not {conn.dialect.name}")
        return insert(_TABLE)

    def wait_time(self, key: str, *, interval: float, burst: int = 1, now: float | None = None) -> float:
        """Seconds until ``key`` has a free cell (0.0: now), without taking one."""
        now = time.time() if now is None else float(now)
        with self.engine.connect() as conn:
            return self._peek(conn, key, float(interval), int(burst), now)

    def prune(self, now: float | None = None, *, older_than: float = 60.0) -> int:
        """Delete buckets that have been empty for ``older_than`` seconds (a
        bucket whose ``tat`` is past behaves like a missing row). Returns the
        number of rows deleted."""
        now = time.time() if now is None else float(now)
        with self.engine.begin() as conn:
            return conn.execute(delete(_TABLE).where(_TABLE.c.tat < now - older_than)).rowcount
