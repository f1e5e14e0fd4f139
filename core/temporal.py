"""Temporal client factory shared by the API, the worker and the CLI."""

from __future__ import annotations

import asyncio
import logging

from temporalio.client import Client
from temporalio.converter import DataConverter
from temporalio.runtime import Runtime

from core.settings import Settings

log = logging.getLogger(__name__)


async def connect(
    settings: Settings,
    data_converter: DataConverter,
    *,
    attempts: int = 30,
    delay: float = 1.0,
    runtime: Runtime | None = None,
    identity: str | None = None,
) -> Client:
    """Connect with the project's data converter (payload encryption),
    retrying while the server starts (compose, make run). ``runtime``
    carries the worker's SDK metrics exporter (core.observability);
    ``identity`` names the process in histories (the SDK's default:
    ``pid@host``)."""
    last: Exception | None = None
    for attempt in range(1, attempts + 1):
        try:
            return await Client.connect(
                settings.temporal_address,
                namespace=settings.temporal_namespace,
                data_converter=data_converter,
                runtime=runtime,
                **({"identity": identity} if identity else {}),
            )
        except Exception as err:  # the server is not up yet
            last = err
            if attempt < attempts:
                log.info("temporal not reachable at %s (attempt %d): %s", settings.temporal_address, attempt, err)
                await asyncio.sleep(delay)
    raise RuntimeError(f"cannot reach Temporal at {settings.temporal_address}: {last}")


# The Temporal dev server as `make run`, the tests and the benchmarks start it
# (bench/README.md measures each setting):
# - eager workflow start and eager activity execution (the first workflow
#   task comes back in the start response; an activity scheduled by a worker
#   runs on that worker without a round trip through matching);
# - the dev server has one history shard whose transfer-queue reader polls at
#   most history.transferProcessorMaxPollRPS (default 20) times a second, so
#   every task handed out through it (a workflow task after a signal or an
#   activity completion, a child start) waited up to 50 ms. A production
#   cluster has many shards and the same knob per shard;
# - the matcher that honours task priorities (workflows/common.py: a
#   person's conversation before bulk work); the default of newer servers,
#   off by default in the 1.28 cluster of docker-compose.yml.
DEV_SERVER_DYNAMIC_CONFIG = {
    "system.enableEagerWorkflowStart": "true",
    "system.enableActivityEagerExecution": "true",
    "history.transferProcessorMaxPollRPS": "1000",
    "matching.useNewMatcher": "true",
}
# A durable SQLite file for the dev server: WAL with synchronous=normal was as
# fast as the in-memory store here; the default pragmas cost ~40 % more server CPU.
DEV_SERVER_SQLITE_PRAGMAS = ("journal_mode=wal", "synchronous=normal")


def dev_server_args(dynamic_config: dict[str, str] | None = None, db_file: str | None = None) -> list[str]:
    """Extra `temporal server start-dev` arguments: the dynamic config above
    (overridden or extended by ``dynamic_config``) and, with ``db_file``,
    SQLite persistence with the pragmas above."""
    args: list[str] = []
    for key, value in {**DEV_SERVER_DYNAMIC_CONFIG, **(dynamic_config or {})}.items():
        args += ["--dynamic-config-value", f"{key}={value}"]
    if db_file:
        args += ["--db-filename", db_file]
        for pragma in DEV_SERVER_SQLITE_PRAGMAS:
            args += ["--sqlite-pragma", pragma]
    return args
