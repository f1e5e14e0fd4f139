"""Process settings, read from the environment (prefix ``VECTORY_``).

Only the API, the worker and activities read settings. Workflow code never
does: configuration is not workflow input (DESIGN.md §3).
"""

from __future__ import annotations

import base64
import os
import secrets
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DATA_DIR = Path(os.environ.get("VECTORY_DATA_DIR", ".data"))
DEV_ADMIN_TOKEN = "dev-admin-token"
DEV_APP_SECRET = "dev-meta-app-secret"
DEV_VERIFY_TOKEN = "dev-verify-token"

TASK_QUEUE = "vectory"

SEARCH_ATTRIBUTES = ("WorkspaceId", "ChannelId", "ContactId", "AutomationId", "Platform")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VECTORY_", extra="ignore")

    environment: str = Field("development", description="development | test | production")
    database_url: str = Field(default_factory=lambda: f"sqlite:///{DATA_DIR / 'vectory.db'}")
    temporal_address: str = "localhost:7233"
    temporal_namespace: str = "default"
    task_queue: str = TASK_QUEUE
    admin_token: str = DEV_ADMIN_TOKEN
    # Keyring for the token vault: "kid:base64key[,kid:base64key...]"; the
    # first key encrypts, all of them decrypt. Empty in development means a
    # generated key file under the data dir.
    master_key: str = ""
    public_url: str = "http://127.0.0.1:8000"
    meta_app_secret: str = DEV_APP_SECRET
    meta_verify_token: str = DEV_VERIFY_TOKEN
    graph_api_url: str = "https://graph.facebook.com"
    instagram_api_url: str = "https://graph.instagram.com"
    graph_api_version: str = "v21.0"
    telegram_api_url: str = "https://api.telegram.org"
    ai_model: str = "gpt-4o-mini"
    ai_history_messages: int = 12
    # Codec server for the Temporal UI: its own token (empty disables it) and
    # the UI origins allowed to call it from a browser.
    codec_token: str = ""
    codec_cors_origins: str = "http://127.0.0.1:8233,http://localhost:8233"
    max_webhook_body_bytes: int = 4 * 1024 * 1024
    # Webhooks waiting on Temporal at once; more (overload) are acknowledged
    # from the durable inbox and relayed (api/inbox.py). 0: always the inbox.
    webhook_max_inflight_dispatches: int = Field(32, ge=0)
    # How long a webhook waits for Temporal to take its events before it
    # keeps them in the inbox and answers 200 anyway (the signal goes on; its
    # inbox rows are deleted once it lands). Keeps the answer prompt while
    # Temporal is busy; while its recent signals (a moving average) took
    # longer than this, the webhook does not wait at all.
    webhook_ack_wait_ms: int = Field(10, ge=0)
    # Eager start (api/ingress.py): the API starts a new contact's
    # conversation with their first message in its input and runs its first
    # task in its own small worker, skipping Temporal's task matching (a new
    # contact's first reply at the bare-Temporal floor instead of 1.3x it on
    # our 2-core machines), at the cost of workflow work and memory in the
    # API process (bench/README.md). At most this many such tasks at once,
    # only while no other webhook waits on Temporal and webhooks come slowly;
    # 0 turns it off (the API then only signals).
    api_conversation_slots: int = Field(2, ge=0)
    # Conversations the API's worker keeps in memory (it keeps serving the
    # ones it started; evicted ones are replayed from their history).
    api_max_cached_conversations: int = Field(500, ge=1)
    http_timeout_seconds: float = 15.0
    # Automated Instagram/Messenger DMs per connected account per hour (a
    # burst of this many, then evenly spaced; durable across workers, see
    # core/ratelimit.py). Human-agent messages and private replies have their
    # own budgets. 0 disables this budget (benchmarks).
    automated_dm_per_hour: int = Field(200, ge=0)
    # Worker tuning (bench/README.md has what each bought). The workflow
    # sandbox: "strict" re-imports the workflow modules per workflow instance
    # so a clock, random or I/O call in workflow code fails the task (the test
    # suite runs every workflow this way); "passthrough" imports every module
    # once and shares it (~5 ms less per new workflow, but of the runtime
    # checks only the restricted builtins such as open() remain: determinism
    # is then guarded by tests/test_determinism.py, the strict test suite and
    # the replay test); "off" runs workflows unsandboxed (measured, not
    # recommended). The cache bounds worker memory with many
    # waiting conversations (evicted ones replay from history when woken).
    worker_sandbox: Literal["passthrough", "strict", "off"] = "passthrough"
    worker_max_cached_workflows: int = Field(1000, ge=0)
    worker_workflow_pollers: int = Field(5, ge=1)
    worker_activity_pollers: int = Field(5, ge=1)
    worker_max_concurrent_activities: int = Field(100, ge=1)
    # The worker's metrics (core/observability.py): its own counters and the
    # Temporal SDK's, each on its own port of metrics_host; 0 disables one.
    worker_metrics_port: int = Field(9464, ge=0, le=65535)
    sdk_metrics_port: int = Field(9465, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @model_validator(mode="after")
    def _refuse_default_secrets(self) -> Settings:
        if self.environment == "production":
            weak = [
                name
                for name, default in (
                    ("VECTORY_ADMIN_TOKEN", DEV_ADMIN_TOKEN),
                    ("VECTORY_META_APP_SECRET", DEV_APP_SECRET),
                    ("VECTORY_META_VERIFY_TOKEN", DEV_VERIFY_TOKEN),
                )
                if getattr(self, name.removeprefix("VECTORY_").lower()) == default
            ]
            if not self.master_key:
                weak.append("VECTORY_MASTER_KEY")
            if weak:
                raise ValueError(f"refusing to start in production with default secrets: {', '.join(weak)}")
        return self

    def keyring(self) -> list[tuple[str, bytes]]:
        """The vault keys, newest (encrypting) first."""
        spec = self.master_key.strip()
        if not spec:
            spec = _dev_key_file()
        keys: list[tuple[str, bytes]] = []
        for part in spec.split(","):
            kid, sep, b64 = part.strip().partition(":")
            if not sep:
                raise ValueError("VECTORY_MASTER_KEY must be 'kid:base64key[,kid:base64key...]'")
            key = base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4))
            if len(key) != 32:
                raise ValueError(f"master key {kid!r} must be 32 bytes (base64 of 32 random bytes)")
            keys.append((kid, key))
        return keys


def _dev_key_file() -> str:
    path = DATA_DIR / "master.key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        key = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
        tmp = path.with_suffix(".tmp")
        tmp.write_text(f"dev1:{key}\n")
        tmp.chmod(0o600)
        tmp.replace(path)
    return path.read_text().strip()


@lru_cache
def get_settings() -> Settings:
    return Settings()
