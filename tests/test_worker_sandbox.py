"""The worker's sandbox (workers/sandbox.py): still a sandbox, and the
serialization contexts it reports are the SDK's own."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from temporalio.client import Client, WorkflowFailureError
from temporalio.converter import DataConverter, PayloadCodec, SerializationContext, WithSerializationContext
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker
from temporalio.worker.workflow_sandbox import (
    RestrictedWorkflowAccessError,
    SandboxedWorkflowRunner,
    SandboxRestrictions,
)

from tests.sandbox_workflows import ClockWorkflow, Shout, ShoutWorkflow, shout
from workers.main import workflow_runner
from workers.sandbox import LeanSandboxedWorkflowRunner

from conftest import TEST_SERVER


@dataclass
class ContextLog:
    seen: list[str] = field(default_factory=list)


class RecordingCodec(PayloadCodec, WithSerializationContext):
    """Passes payloads through; records the context each one was coded under."""

    def __init__(self, log: ContextLog, context: SerializationContext | None = None) -> None:
        self.log = log
        self.context = context

    def with_context(self, context: SerializationContext) -> RecordingCodec:
        return RecordingCodec(self.log, context)

    async def encode(self, payloads):
        self.log.seen.append(f"encode {self._describe()}")
        return list(payloads)

    async def decode(self, payloads):
        self.log.seen.append(f"decode {self._describe()}")
        return list(payloads)

    def _describe(self) -> str:
        context = self.context
        if context is None:
            return "none"
        return f"{type(context).__name__}:{getattr(context, 'activity_type', '') or ''}"


async def _contexts_under(runner) -> tuple[str, list[str]]:
    log = ContextLog()
    async with await WorkflowEnvironment.start_time_skipping(test_server_existing_path=str(TEST_SERVER)) as env:
        client = Client(
            env.client.service_client,
            namespace=env.client.namespace,
            data_converter=DataConverter(payload_codec=RecordingCodec(log)),
        )
        queue = f"sandbox-{uuid.uuid4()}"
        async with Worker(
            client, task_queue=queue, workflows=[ShoutWorkflow], activities=[shout], workflow_runner=runner
        ):
            result = await client.execute_workflow(
                ShoutWorkflow.run, Shout("hi"), id=f"shout-{uuid.uuid4()}", task_queue=queue
            )
    return result.text, sorted(set(log.seen))


async def test_lean_sandbox_codes_payloads_under_the_sdks_own_contexts():
    lean_result, lean_contexts = await _contexts_under(LeanSandboxedWorkflowRunner(restrictions=SandboxRestrictions.default.with_passthrough_all_modules()))
    sdk_result, sdk_contexts = await _contexts_under(SandboxedWorkflowRunner(restrictions=SandboxRestrictions.default.with_passthrough_all_modules()))
    assert lean_result == sdk_result == "HI!"
    # Activity payloads are coded under the activity's context, the rest
    # under the workflow's: exactly as the SDK's sandbox reports them.
    assert lean_contexts == sdk_contexts
    assert any("ActivitySerializationContext:shout" in c for c in lean_contexts)


async def _run_clock_workflow(mode: str) -> str:
    runner = workflow_runner(mode)
    async with await WorkflowEnvironment.start_time_skipping(test_server_existing_path=str(TEST_SERVER)) as env:
        queue = f"sandbox-{uuid.uuid4()}"
        async with Worker(
            env.client,
            task_queue=queue,
            workflows=[ClockWorkflow],
            workflow_runner=runner,
            workflow_failure_exception_types=[RestrictedWorkflowAccessError],
        ):
            try:
                return await env.client.execute_workflow(
                    ClockWorkflow.run, id=f"clock-{uuid.uuid4()}", task_queue=queue
                )
            except WorkflowFailureError as failure:
                return f"refused: {failure.cause}"


async def test_strict_sandbox_refuses_a_clock_read_in_workflow_code():
    assert isinstance(workflow_runner("strict"), LeanSandboxedWorkflowRunner)
    outcome = await _run_clock_workflow("strict")
    assert outcome.startswith("refused") and "datetime" in outcome


async def test_passthrough_sandbox_does_not_see_module_level_clock_reads():
    """What the README says about ``passthrough``: modules are shared, so a
    workflow module's own ``datetime`` is the real one. The strict suite and
    tests/test_determinism.py are the guard there."""
    assert isinstance(workflow_runner("passthrough"), LeanSandboxedWorkflowRunner)
    assert not (await _run_clock_workflow("passthrough")).startswith("refused")


async def test_lean_sandbox_answers_store_contexts_as_the_sdks_sandbox_would():
    """The external-store context, asked for every payload sequence, is
    answered directly: the same answer as the SDK's entry into the sandbox
    gives, at every point of a workflow with an activity."""
    from temporalio.worker.workflow_sandbox._runner import _Instance

    from workers.sandbox import _LeanInstance

    answers: list[tuple[object, object]] = []

    class Comparing(_LeanInstance):
        def get_external_store_context(self, command_info):
            lean = super().get_external_store_context(command_info)
            answers.append((lean, _Instance.get_external_store_context(self, command_info)))
            return lean

    class ComparingRunner(LeanSandboxedWorkflowRunner):
        def create_instance(self, det):
            return Comparing(det, self.runner_class, self.restrictions)

    result, _ = await _contexts_under(ComparingRunner(restrictions=SandboxRestrictions.default.with_passthrough_all_modules()))
    assert result == "HI!"
    assert answers and all(lean == sdk for lean, sdk in answers)
    assert any(lean.target is not None for lean, _ in answers)
