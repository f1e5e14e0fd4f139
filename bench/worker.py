"""A worker with tuning knobs, for measuring what they would buy:
``python -m bench.worker`` (``bench.run --worker-knobs ...`` starts it
instead of ``python -m workers.main``).

Same workflows, activities, data converter and task queue as
``workers.main``; only the Worker options differ, read from the environment:

- ``VECTORY_BENCH_RUNNER``: ``sandbox`` (as workers.main), ``passthrough``
  (the sandbox's checks, but every module passed through instead of
  re-imported per workflow) or ``unsandboxed``
- ``VECTORY_BENCH_MAX_CACHED``: max_cached_workflows (SDK default 1000)
- ``VECTORY_BENCH_WFT_POLLERS`` / ``VECTORY_BENCH_ACT_POLLERS``: poller maxima (SDK default 5)

It is not the product's worker: knobs proven here belong in workers/main.py.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import signal

from temporalio.worker import PollerBehaviorSimpleMaximum, UnsandboxedWorkflowRunner, Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from core.codec import data_converter
from core.observability import configure_logging
from core.settings import get_settings
from core.temporal import connect
from workers.main import WORKFLOWS, activities_for, build_deps


def knobs() -> dict:
    out: dict = {}
    runner = os.environ.get("VECTORY_BENCH_RUNNER", "sandbox")
    if runner == "unsandboxed":
        out["workflow_runner"] = UnsandboxedWorkflowRunner()
    elif runner == "passthrough":
        out["workflow_runner"] = SandboxedWorkflowRunner(
            restrictions=SandboxRestrictions.default.with_passthrough_all_modules()
        )
    else:
        out["workflow_runner"] = SandboxedWorkflowRunner(
            restrictions=SandboxRestrictions.default.with_passthrough_modules("core", "workflows.common")
        )
    if os.environ.get("VECTORY_BENCH_MAX_CACHED"):
        out["max_cached_workflows"] = int(os.environ["VECTORY_BENCH_MAX_CACHED"])
    if os.environ.get("VECTORY_BENCH_WFT_POLLERS"):
        out["workflow_task_poller_behavior"] = PollerBehaviorSimpleMaximum(int(os.environ["VECTORY_BENCH_WFT_POLLERS"]))
    if os.environ.get("VECTORY_BENCH_ACT_POLLERS"):
        out["activity_task_poller_behavior"] = PollerBehaviorSimpleMaximum(int(os.environ["VECTORY_BENCH_ACT_POLLERS"]))
    return out


async def amain() -> None:
    configure_logging("worker", os.environ.get("VECTORY_LOG_LEVEL", "INFO"))
    settings = get_settings()
    deps = build_deps(settings)
    client = await connect(settings, data_converter(deps.keys))
    worker = Worker(
        client,
        task_queue=settings.task_queue,
        workflows=WORKFLOWS,
        activities=activities_for(settings, deps, client),
        activity_executor=concurrent.futures.ThreadPoolExecutor(max_workers=32),
        **knobs(),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with worker:
        await stop.wait()
    await deps.http.aclose()


if __name__ == "__main__":
    asyncio.run(amain())
