"""The bare-Temporal floor: one workflow, one activity, one HTTP call.

``BenchFloor`` executes ``bench_floor_send``, which POSTs a small Send API
body to the sandbox (``/instagram/v21.0/<account>/messages`` with the
account's token): the same HTTP hop a real ``send_message`` makes, without
anything of ours around it (no payload codec, no database, no conversation).
Its worker runs inside the bench process on its own task queue, with the SDK
defaults (sandboxed workflow runner, cache of 1000, 5 pollers), and the HTTP
client our worker uses (``core/http.py``), so the floor is not slowed by a
heavier client than ours.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from temporalio import activity, workflow

with workflow.unsafe.imports_passed_through():
    from core.http import HttpClient

FLOOR_TASK_QUEUE = "bench-floor"


@dataclass
class FloorInput:
    recipient_id: str
    text: str = "floor"


@workflow.defn(name="BenchFloor")
class BenchFloor:
    @workflow.run
    async def run(self, input: FloorInput) -> str:
        return await workflow.execute_activity(
            "bench_floor_send", input, result_type=str, start_to_close_timeout=timedelta(seconds=30)
        )


class FloorActivities:
    def __init__(self, http: HttpClient, sandbox_url: str, account_id: str, token: str) -> None:
        self.http = http
        self.url = f"{sandbox_url}/instagram/v21.0/{account_id}/messages"
        self.token = token

    @activity.defn(name="bench_floor_send")
    async def send(self, input: FloorInput) -> str:
        response = await self.http.request(
            "POST",
            self.url,
            json={"recipient": {"id": input.recipient_id}, "message": {"text": input.text}},
            headers={"Authorization": f"Bearer {self.token}"},
        )
        if response.status != 200:
            raise RuntimeError(f"sandbox answered HTTP {response.status}")
        return str(response.json()["message_id"])
