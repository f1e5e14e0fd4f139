"""The event loop the worker and the bench run on.

uvloop where it is installed (a dependency on Linux and macOS, not on
Windows): the worker's event loop carries the Temporal SDK's polling and
completions and every platform call; on our 2-core machines uvloop took a
keep-alive POST from 0.47 to 0.37 ms of CPU (``core/http.py``). Workflow code
does not run on this loop: each workflow has the SDK's own deterministic loop.
The API gets uvloop (and httptools) from uvicorn, which picks them when installed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop
    except ImportError:  # Windows: the standard loop
        return asyncio.run(main)
    return uvloop.run(main)
