"""The API process: ``uvicorn --factory workers.apiserver:create_app``.

The API runs a worker of its own for the conversations it starts
(api/ingress.py); this is where that worker's build is handed to it, so the
``api`` package never imports the worker's.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI
from temporalio.client import Client
from temporalio.worker import Worker

from api.main import create_app as create_api
from core.settings import Settings
from workers.main import build_worker, worker_deps


def api_worker(
    client: Client, settings: Settings, engine, vault, keys, **options: Any
) -> tuple[Worker, Callable[[], Awaitable[None]]]:
    """Every workflow and activity of the worker processes, around the API's
    own engine and keys; ``options`` keep it to local activities and eager
    starts."""
    deps = worker_deps(settings, engine, vault, keys)
    return build_worker(client, settings, deps, **options), deps.http.aclose


def create_app(settings: Settings | None = None, temporal: Client | None = None) -> FastAPI:
    return create_api(settings, temporal, worker_factory=api_worker)
