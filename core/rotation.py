"""Master-key rotation: re-encrypt every vault ciphertext under the primary key.

The vault (``core.crypto``) keeps the key id inside each ciphertext
(``v1.<kid>.<...>``) and decrypts with any key of the keyring, so a new key can
be introduced without downtime. Three kinds of rows hold vault ciphertext:

- ``Channel.token_ciphertext`` (context ``channel:<id>:token``),
- ``Channel.webhook_secret_ciphertext`` (context ``channel:<id>:webhook_secret``),
- ``DataKey.wrapped``: the per-workspace payload data keys (context
  ``datakey:<kid>``). Only the wrapping changes; the data keys themselves, and
  therefore every payload already stored in Temporal histories, stay valid.

Procedure (the operator's runbook):

1. Generate a key (``python -c "import base64,secrets;
   print(base64.urlsafe_b64encode(secrets.token_bytes(32)).decode())"``) and
   *prepend* it to ``VECTORY_MASTER_KEY``: ``new:<b64>,old:<b64>``. Restart the
   API and every worker. New writes now use ``new``; ``old`` still decrypts.
2. Run ``vectory keys rotate`` (same environment as the workers). It
   re-encrypts, in batches, every ciphertext still under another key. It is
   idempotent and safe to run while the API and workers are serving: each row
   is updated only if it still holds the ciphertext that was read.
3. Run ``vectory keys rotate --check``: it exits 0 once no row is left
   under a non-primary key (exit 1 lists how many remain and under which key
   ids). Rows that failed to decrypt are reported by id by step 2 and keep
   ``--check`` failing until they are dealt with (e.g. the channel is
   reconnected or disconnected).
4. Remove the old key from ``VECTORY_MASTER_KEY`` and restart the API and
   workers.

Nothing secret is ever printed or audited: reports carry row ids, key ids and
counts only.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, update
from sqlmodel import Session, col, select

from core.audit import audit_now
from core.crypto import TokenVault, VaultError, datakey_context, token_context, webhook_secret_context
from core.db import Channel, DataKey

ProgressFn = Callable[[str, int, "RotationReport"], None]


@dataclass
class RotationReport:
    tokens_rewrapped: int = 0
    secrets_rewrapped: int = 0
    data_keys_rewrapped: int = 0
    already_current: int = 0
    # "channel <id> token (key 'old'): <reason>" / "datakey <kid> ...": ids only.
    failures: list[str] = field(default_factory=list)

    @property
    def rewrapped(self) -> int:
        return self.tokens_rewrapped + self.secrets_rewrapped + self.data_keys_rewrapped

    def summary(self) -> str:
        return (
            f"tokens_rewrapped={self.tokens_rewrapped} secrets_rewrapped={self.secrets_rewrapped} "
            f"data_keys_rewrapped={self.data_keys_rewrapped} already_current={self.already_current} "
            f"failures={len(self.failures)}"
        )


@dataclass
class StaleReport:
    """Ciphertexts still under a key other than the primary one."""

    tokens: int = 0
    secrets: int = 0
    data_keys: int = 0
    key_ids: Counter[str] = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return self.tokens + self.secrets + self.data_keys


def key_id_of(ciphertext: str) -> str | None:
    """The key id of a ``v1.<kid>.<body>`` ciphertext (None when malformed)."""
    parts = ciphertext.split(".", 2)
    if len(parts) != 3 or parts[0] != "v1":
        return None
    return parts[1]


def _reason(exc: Exception) -> str:
    # VaultError messages name key ids and formats only, never plaintext.
    return str(exc) if isinstance(exc, VaultError) else type(exc).__name__


def _rewrap_one(
    db: Session,
    vault: TokenVault,
    report: RotationReport,
    *,
    model: Any,
    pk: Any,
    row_id: str,
    column: Any,
    ciphertext: str,
    context: str,
    label: str,
) -> bool:
    """Re-encrypt one ciphertext under the primary key. Returns True when the
    row was updated. The update is a compare-and-swap on the old ciphertext,
    so a value written concurrently by the API or a worker is never lost."""
    kid = key_id_of(ciphertext)
    if kid == vault.primary_key_id:
        report.already_current += 1
        return False
    try:
        plaintext = vault.decrypt(ciphertext, context)
        fresh = vault.encrypt(plaintext, context)
    except Exception as exc:  # reported, never stops the run
        report.failures.append(f"{label} (key {kid!r}): {_reason(exc)}")
        return False
    conn = db.connection()
    result = conn.execute(update(model).where(pk == row_id, column == ciphertext).values({column.key: fresh}))
    if result.rowcount == 1:  # type: ignore[attr-defined]
        return True
    # Changed (or deleted) since it was read: look at what is there now.
    current = conn.execute(select(column).where(pk == row_id)).scalar_one_or_none()
    if current is None or key_id_of(current) == vault.primary_key_id:
        report.already_current += current is not None
    else:
        report.failures.append(f"{label} (key {key_id_of(current)!r}): changed during rotation; run again")
    return False


def rotate_keys(
    engine: Engine,
    vault: TokenVault,
    *,
    batch_size: int = 200,
    progress: ProgressFn | None = None,
) -> RotationReport:
    """Re-encrypt every channel token, webhook secret and wrapped data key
    that is not under ``vault.primary_key_id``, keeping its context.

    ``vault`` must hold the primary (new) key first and every old key still in
    use. Commits once per batch; idempotent; a row that does not decrypt is
    listed in ``report.failures`` and the run goes on.
    ``progress(table, rows_scanned_in_table, report)`` is called per batch.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    report = RotationReport()

    # Channels: keyset pagination on the primary key.
    last_id = ""
    scanned = 0
    while True:
        with Session(engine) as db:
            rows = db.exec(
                select(Channel.id, Channel.token_ciphertext, Channel.webhook_secret_ciphertext)
                .where(Channel.id > last_id)
                .where(
                    col(Channel.token_ciphertext).is_not(None) | col(Channel.webhook_secret_ciphertext).is_not(None)
                )
                .order_by(col(Channel.id))
                .limit(batch_size)
            ).all()
            if not rows:
                break
            for channel_id, token, secret in rows:
                if token:
                    if _rewrap_one(
                        db, vault, report, model=Channel, pk=Channel.id, row_id=channel_id,
                        column=Channel.__table__.c.token_ciphertext, ciphertext=token,
                        context=token_context(channel_id), label=f"channel {channel_id} token",
                    ):
                        report.tokens_rewrapped += 1
                if secret:
                    if _rewrap_one(
                        db, vault, report, model=Channel, pk=Channel.id, row_id=channel_id,
                        column=Channel.__table__.c.webhook_secret_ciphertext, ciphertext=secret,
                        context=webhook_secret_context(channel_id), label=f"channel {channel_id} webhook secret",
                    ):
                        report.secrets_rewrapped += 1
            db.commit()
        last_id = rows[-1][0]
        scanned += len(rows)
        if progress is not None:
            progress("channel", scanned, report)

    # Data keys (tombstones have wrapped None and are skipped).
    last_kid = ""
    scanned = 0
    while True:
        with Session(engine) as db:
            rows = db.exec(
                select(DataKey.kid, DataKey.wrapped)
                .where(DataKey.kid > last_kid)
                .where(col(DataKey.wrapped).is_not(None))
                .order_by(col(DataKey.kid))
                .limit(batch_size)
            ).all()
            if not rows:
                break
            for kid, wrapped in rows:
                if _rewrap_one(
                    db, vault, report, model=DataKey, pk=DataKey.kid, row_id=kid,
                    column=DataKey.__table__.c.wrapped, ciphertext=wrapped,
                    context=datakey_context(kid), label=f"datakey {kid}",
                ):
                    report.data_keys_rewrapped += 1
            db.commit()
        last_kid = rows[-1][0]
        scanned += len(rows)
        if progress is not None:
            progress("datakey", scanned, report)

    audit_now(engine, "", "operator", "keys.rotate", vault.primary_key_id, report.summary())
    return report


def count_stale(engine: Engine, primary_key_id: str, *, batch_size: int = 500) -> StaleReport:
    """Count ciphertexts not under ``primary_key_id`` (what ``--check`` reports)."""
    stale = StaleReport()

    def is_stale(ciphertext: str | None) -> bool:
        if not ciphertext:
            return False
        kid = key_id_of(ciphertext)
        if kid == primary_key_id:
            return False
        stale.key_ids[kid or "<malformed>"] += 1
        return True

    with Session(engine) as db:
        last_id = ""
        while True:
            rows = db.exec(
                select(Channel.id, Channel.token_ciphertext, Channel.webhook_secret_ciphertext)
                .where(Channel.id > last_id)
                .order_by(col(Channel.id))
                .limit(batch_size)
            ).all()
            if not rows:
                break
            for _, token, secret in rows:
                stale.tokens += is_stale(token)
                stale.secrets += is_stale(secret)
            last_id = rows[-1][0]
        last_kid = ""
        while True:
            rows = db.exec(
                select(DataKey.kid, DataKey.wrapped)
                .where(DataKey.kid > last_kid)
                .order_by(col(DataKey.kid))
                .limit(batch_size)
            ).all()
            if not rows:
                break
            for _, wrapped in rows:
                stale.data_keys += is_stale(wrapped)
            last_kid = rows[-1][0]
    return stale
