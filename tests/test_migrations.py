"""Alembic migrations: head matches the models (a model change without a
migration fails here), downgrade/upgrade round-trips, and the app refuses an
unmigrated database. Runs on SQLite, and on PostgreSQL in a throwaway
database when a server answers (the one of VECTORY_DATABASE_URL, else
127.0.0.1:5432)."""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, make_url, pool, text
from sqlmodel import SQLModel

from core.db import (
    DatabaseNotMigrated,
    alembic_config,
    check_migrated,
    engine_for,
    head_revisions,
    make_engine,
    migrate,
    tag_key,
)

DEFAULT_PG = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def postgres_admin_url() -> str:
    url = os.environ.get("VECTORY_DATABASE_URL", "")
    return url if url.startswith("postgresql") else DEFAULT_PG


@pytest.fixture(params=["sqlite", "postgresql"])
def fresh_url(request, tmp_path) -> Iterator[str]:
    """The URL of an empty database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fresh.db'}"
        return
    admin = create_engine(postgres_admin_url(), poolclass=pool.NullPool, isolation_level="AUTOCOMMIT",
                          connect_args={"connect_timeout": 3})
    name = f"vectory_mig_{secrets.token_hex(4)}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # no server, or no right to create databases
        admin.dispose()
        pytest.skip(f"PostgreSQL not usable at {make_url(postgres_admin_url()).host}: {type(exc).__name__}")
    try:
        yield make_url(postgres_admin_url()).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def schema_diff(url: str) -> list:
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            return compare_metadata(context, SQLModel.metadata)
    finally:
        engine.dispose()


def tables(url: str) -> set[str]:
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            return set(inspect(conn).get_table_names())
    finally:
        engine.dispose()


def test_head_matches_the_models(fresh_url):
    migrate(fresh_url)
    diff = schema_diff(fresh_url)
    assert diff == [], (
        "core/db.py and migrations/ disagree; after a model change run "
        f"`.venv/bin/alembic revision --autogenerate -m '...'` and review it: {diff}"
    )
    engine = make_engine(fresh_url)
    try:
        check_migrated(engine)  # does not raise
    finally:
        engine.dispose()


def test_downgrade_to_base_then_upgrade_to_head(fresh_url):
    migrate(fresh_url)
    command.downgrade(alembic_config(fresh_url), "base")
    assert tables(fresh_url) <= {"alembic_version"}
    engine = make_engine(fresh_url)
    try:
        with pytest.raises(DatabaseNotMigrated, match="at empty"):
            check_migrated(engine)
    finally:
        engine.dispose()
    migrate(fresh_url)
    assert tables(fresh_url) >= set(SQLModel.metadata.tables)
    assert schema_diff(fresh_url) == []


def test_engine_for_refuses_an_unmigrated_database_until_migrated(tmp_path):
    url = f"sqlite:///{tmp_path / 'unmigrated.db'}"
    with pytest.raises(DatabaseNotMigrated) as info:
        engine_for(url)
    message = str(info.value)
    assert "make migrate" in message
    assert f"at empty, code expects {head_revisions()[0]}" in message
    assert "unmigrated.db" in message
    # The failure is not cached: migrate, then the same URL works.
    migrate(url)
    engine = engine_for(url)
    check_migrated(engine)
    engine.dispose()


def test_a_database_from_before_migrations_gets_a_clear_error(tmp_path):
    url = f"sqlite:///{tmp_path / 'legacy.db'}"
    engine = make_engine(url)
    try:
        SQLModel.metadata.create_all(engine)  # how the schema was made before migrations
        with pytest.raises(DatabaseNotMigrated, match="alembic stamp head"):
            check_migrated(engine)
    finally:
        engine.dispose()
    with pytest.raises(DatabaseNotMigrated, match="make clean"):
        migrate(url)



def test_contact_tags_are_copied_into_the_tag_index(fresh_url):
    """0009 fills contacttag from the tags contacts already have (lookup
    keys: lowercased, one per key; an over-long tag as a digest)."""
    command.upgrade(alembic_config(fresh_url), "0008_channel_contact_key")
    long_tag = "x" * 5000
    engine = create_engine(fresh_url, poolclass=pool.NullPool)
    try:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO workspace (id, name, api_key_hash, retention_days, status, created_at)"
                              " VALUES ('ws_1', 'w', 'h', 90, 'active', CURRENT_TIMESTAMP)"))
            conn.execute(text("INSERT INTO channel (id, workspace_id, platform, name, external_id, platform_user_id,"
                              " status, status_detail, contact_key, created_at, updated_at) VALUES ('ch_1', 'ws_1',"
                              " 'telegram', '', '', '', 'active', '', '', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"))
            for i, tags in enumerate((["VIP", "vip", "Sale"], [], [long_tag], ["Été"])):
                conn.execute(
                    text("INSERT INTO contact (id, workspace_id, channel_id, external_id, first_name, last_name,"
                         " username, tags, fields, human_takeover, processing_restricted, consent_withdrawn,"
                         " created_at, updated_at) VALUES (:id, 'ws_1', 'ch_1', :id, '', '', '', :tags, '{}',"
                         " false, false, false, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"),
                    {"id": f"ct_{i}", "tags": json.dumps(tags)},
                )
        migrate(fresh_url)
        with engine.connect() as conn:
            rows = set(conn.execute(text("SELECT contact_id, workspace_id, tag FROM contacttag")).all())
    finally:
        engine.dispose()
    assert rows == {
        ("ct_0", "ws_1", "vip"), ("ct_0", "ws_1", "sale"), ("ct_2", "ws_1", tag_key(long_tag)), ("ct_3", "ws_1", "été"),
    }
    assert tag_key(long_tag).startswith("sha256:")
