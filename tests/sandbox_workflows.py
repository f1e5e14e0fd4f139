"""Workflows for tests/test_worker_sandbox.py, in a module light enough for
the strict sandbox to re-import (temporalio and the standard library only)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from temporalio import activity, workflow


@dataclass
class Shout:
    text: str


@activity.defn(name="shout")
async def shout(arg: Shout) -> Shout:
    return Shout(arg.text.upper())


@workflow.defn(name="SandboxShout", sandboxed=True)
class ShoutWorkflow:
    @workflow.run
    async def run(self, arg: Shout) -> Shout:
        local = await workflow.execute_local_activity(
            shout, arg, start_to_close_timeout=timedelta(seconds=10)
        )
        remote = await workflow.execute_activity(
            shout, Shout(local.text + "!"), start_to_close_timeout=timedelta(seconds=10)
        )
        return remote


@workflow.defn(name="SandboxClock", sandboxed=True)
class ClockWorkflow:
    @workflow.run
    async def run(self) -> str:
        return datetime.now().isoformat()  # not deterministic: the sandbox must refuse
