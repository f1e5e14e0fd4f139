"""Broadcast activities: page through a segment, record progress."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine
from sqlmodel import Session, col, select
from temporalio import activity

from core.contracts import (
    BroadcastPage,
    BroadcastPageInput,
    BroadcastProgress,
    Recipient,
    broadcast_workflow_id,
)
from core.db import Broadcast, Channel, Contact, count_sends, utcnow

META_WINDOW = timedelta(hours=24)
SCAN_BATCH = 500


def matches_segment(contact: Contact, segment: dict) -> bool:
    """Segment filters (all optional, all must hold): tags_any, tags_all,
    tags_none, fields (equality), last_seen_within_hours."""
    tags = {t.lower() for t in contact.tags or []}
    if segment.get("tags_any") and not tags & {t.lower() for t in segment["tags_any"]}:
        return False
    if segment.get("tags_all") and not {t.lower() for t in segment["tags_all"]} <= tags:
        return False
    if segment.get("tags_none") and tags & {t.lower() for t in segment["tags_none"]}:
        return False
    fields = contact.fields or {}
    return all(fields.get(name) == value for name, value in (segment.get("fields") or {}).items())


def held_back(contact) -> str:
    """Why no broadcast reaches this contact now ("restricted",
    "human_takeover"; "" when none): when its page is chosen, and again when
    its batch sends (``send_broadcast_batch``)."""
    if contact.processing_restricted or contact.consent_withdrawn:
        return "restricted"
    if contact.human_takeover:
        return "human_takeover"
    return ""


class BroadcastActivities:
    def __init__(self, engine: Engine):
        self.engine = engine

    @activity.defn(name="load_broadcast_page")
    def load_broadcast_page(self, input: BroadcastPageInput) -> BroadcastPage:
        """The next recipients of the segment, in contact-id order, with the
        contacts skipped on the way counted by reason."""
        now = datetime.fromisoformat(input.now_iso) if input.now_iso else utcnow()
        page = BroadcastPage()
        after = input.after_contact_id
        with Session(self.engine) as db:
            channel = db.get(Channel, input.channel_id)
            if channel is None or channel.status != "active":
                page.skipped["channel_not_active"] = 0
                return page
            windowed = channel.platform != "telegram"
            seen_within = input.segment.get("last_seen_within_hours")
            while len(page.recipients) < input.limit:
                rows = db.exec(
                    select(Contact)
                    .where(Contact.channel_id == input.channel_id, col(Contact.id) > after)
                    .order_by(col(Contact.id))
                    .limit(SCAN_BATCH)
                ).all()
                if not rows:
                    page.next_after = ""
                    return page
                for contact in rows:
                    after = contact.id
                    if not matches_segment(contact, input.segment):
                        continue
                    last = contact.last_inbound_at
                    if last is not None and last.tzinfo is None:
                        last = last.replace(tzinfo=UTC)
                    if seen_within and (last is None or now - last > timedelta(hours=float(seen_within))):
                        continue  # outside the segment, not a skip
                    reason = held_back(contact)
                    if not reason and windowed and (last is None or now - last > META_WINDOW):
                        reason = "outside_window"
                    if reason:
                        page.skipped[reason] = page.skipped.get(reason, 0) + 1
                        continue
                    page.recipients.append(Recipient(contact_id=contact.id, external_id=contact.external_id))
                    if len(page.recipients) >= input.limit:
                        break
            page.next_after = after
            return page

    @activity.defn(name="record_broadcast_progress")
    def record_broadcast_progress(self, input: BroadcastProgress) -> None:
        with Session(self.engine) as db:
            row = db.get(Broadcast, input.broadcast_id)
            if row is None:
                return
            row.status = input.status
            # A cancelled or failed page was not counted by the workflow: the
            # recorded sends are the truth.
            sent = max(input.sent, count_sends(db, broadcast_workflow_id(row.workspace_id, row.id)))
            row.sent, row.failed, row.skipped = sent, input.failed, dict(input.skipped)
            if input.status in ("completed", "cancelled", "failed"):
                row.finished_at = utcnow()
            db.add(row)
            db.commit()
