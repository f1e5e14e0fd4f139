"""The workflow sandbox without its per-payload toll.

The SDK's sandbox (``temporalio.worker.workflow_sandbox``) enters the sandbox
by ``exec`` of a small source string: to activate a workflow, and also, since
temporalio 1.3x, once per payload the worker encodes or decodes, to ask the
workflow which serialization context the payload belongs to. Each entry
compiled its string again and applied the sandbox's import hooks; in a burst
of one-message runs that was about a fifth of the worker's CPU (py-spy,
bench/README.md).

``LeanSandboxedWorkflowRunner`` keeps the sandbox as it is for workflow code
(the same restrictions, import hooks and runtime determinism checks while a
workflow runs) and changes two things underneath it:

- the source strings are compiled once per process, not at every entry
  (the same code runs: ``exec`` of a code object compiled from the same
  string);
- the serialization-context and external-store-context questions (asked
  once per payload sequence) are answered by calling the SDK's own
  in-sandbox instance directly. Those methods are SDK code that only read
  the instance's info and pending commands (no workflow code runs), so the
  import hooks have nothing to guard there.

It leans on two private names of the pinned SDK (``_Instance._run_code`` and
the ``__temporal_in_sandbox`` global); ``tests/test_worker_sandbox.py`` fails
if an SDK upgrade moves them, rather than the worker silently slowing down or
breaking.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from typing import Any

import temporalio.workflow
from temporalio.converter import StorageDriverStoreContext
from temporalio.worker import _command_aware_visitor
from temporalio.worker._workflow_instance import WorkflowInstance, WorkflowInstanceDetails
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner
from temporalio.worker.workflow_sandbox._runner import _Instance


@functools.lru_cache(maxsize=64)
def _compiled(code: str):
    return compile(code, "<string>", "exec")


class _LeanInstance(_Instance):
    def _run_code(self, code: str, **extra_globals: Any) -> None:
        # _Instance._run_code, with the compilation cached.
        for key, value in extra_globals.items():
            self.globals_and_locals[key] = value
        try:
            temporalio.workflow.unsafe._set_in_sandbox(True)
            self._current_thread_id = threading.get_ident()
            exec(_compiled(code), self.globals_and_locals, self.globals_and_locals)
        finally:
            temporalio.workflow.unsafe._set_in_sandbox(False)
            self._current_thread_id = None
            for key in extra_globals:
                self.globals_and_locals.pop(key, None)

    def get_serialization_context(
        self, command_info: _command_aware_visitor.CommandInfo | None
    ) -> temporalio.converter.SerializationContext | None:
        return self.globals_and_locals["__temporal_in_sandbox"].get_serialization_context(command_info)

    def get_external_store_context(
        self, command_info: _command_aware_visitor.CommandInfo | None
    ) -> StorageDriverStoreContext:
        return self.globals_and_locals["__temporal_in_sandbox"].get_external_store_context(command_info)


@dataclasses.dataclass(frozen=True)
class LeanSandboxedWorkflowRunner(SandboxedWorkflowRunner):
    """``SandboxedWorkflowRunner`` whose instances enter the sandbox without
    recompiling and answer serialization-context lookups directly."""

    def create_instance(self, det: WorkflowInstanceDetails) -> WorkflowInstance:
        return _LeanInstance(det, self.runner_class, self.restrictions)
