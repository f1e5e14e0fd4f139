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
) -> Client:
    """Connect with the project's data converter (payload encryption),
    retrying while the server starts (compose, make run). ``runtime``
    carries the worker's SDK metrics exporter (core.observability)."""
    last: Exception | None = None
    for attempt in range(1, attempts + 1):
        try:
            return await Client.connect(
                settings.temporal_address,
                namespace=settings.temporal_namespace,
                data_converter=data_converter,
                runtime=runtime,
            )
        except Exception as err:  # the server is not up yet
            last = err
            if attempt < attempts:
                log.info("temporal not reachable at %s (attempt %d): %s", settings.temporal_address, attempt, err)
                await asyncio.sleep(delay)
    raise RuntimeError(f"cannot reach Temporal at {settings.temporal_address}: {last}")
