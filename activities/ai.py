"""AI replies through an OpenAI-compatible chat completions endpoint.

The client is built from settings inside the worker (``OPENAI_BASE_URL``,
``OPENAI_API_KEY``, ``VECTORY_AI_MODEL``) with ``max_retries=0``: Temporal
owns retries, and the activity input (recorded in history) carries no
configuration or secret.
"""

from __future__ import annotations

import asyncio

import openai
from sqlalchemy import Engine
from sqlmodel import Session, col, select
from temporalio import activity
from temporalio.exceptions import ApplicationError

from core.contracts import ErrorType, GenerateReplyInput, GenerateReplyResult
from core.db import AiUsage, Contact, Message

SYSTEM_PREAMBLE = (
    "You are the assistant of a business answering a customer in a direct-message conversation. "
    "Answer briefly (at most 3 sentences), in the customer's language, and never invent prices, "
    "policies or facts that the business instructions do not state."
)


class AiActivities:
    def __init__(self, engine: Engine, client: openai.AsyncOpenAI, model: str, default_history: int = 12):
        self.engine = engine
        self.client = client
        self.model = model
        self.default_history = default_history

    def _prompt(self, input: GenerateReplyInput) -> list[dict[str, str]]:
        limit = input.max_history or self.default_history
        with Session(self.engine) as db:
            contact = db.get(Contact, input.contact_id)
            if contact is None:
                raise ApplicationError("contact no longer exists", type=ErrorType.CONTACT_GONE, non_retryable=True)
            rows = db.exec(
                select(Message)
                .where(Message.contact_id == input.contact_id, col(Message.kind).in_(["message", "postback"]))
                .order_by(col(Message.created_at).desc(), col(Message.id).desc())
                .limit(limit)
            ).all()
        profile = {"first_name": contact.first_name, "username": contact.username, **(contact.fields or {})}
        known = ", ".join(f"{k}={v}" for k, v in profile.items() if v not in ("", None))
        system = f"{SYSTEM_PREAMBLE}\n\nBusiness instructions:\n{input.instructions}"
        if known:
            system += f"\n\nWhat we know about this customer: {known}"
        messages = [{"role": "system", "content": system}]
        for row in reversed(rows):
            if row.text:
                messages.append({"role": "user" if row.direction == "in" else "assistant", "content": row.text})
        return messages

    def _record_usage(self, input: GenerateReplyInput, prompt_tokens: int, completion_tokens: int) -> None:
        with Session(self.engine) as db:
            db.add(
                AiUsage(
                    workspace_id=input.workspace_id,
                    run_id=input.run_id,
                    model=self.model,
                    prompt_tokens=prompt_tokens,
                    completion_tokens=completion_tokens,
                )
            )
            db.commit()

    @activity.defn(name="generate_reply")
    async def generate_reply(self, input: GenerateReplyInput) -> GenerateReplyResult:
        messages = await asyncio.to_thread(self._prompt, input)
        try:
            completion = await self.client.chat.completions.create(model=self.model, messages=messages)
        except openai.RateLimitError as err:
            raise ApplicationError(f"AI rate limited: {err.status_code}", type=ErrorType.AI_THROTTLED) from None
        except openai.APIStatusError as err:
            retryable = err.status_code >= 500 or err.status_code in (408, 409)
            raise ApplicationError(
                f"AI endpoint answered {err.status_code}", type=ErrorType.AI_ERROR, non_retryable=not retryable
            ) from None
        except (openai.APIConnectionError, openai.APITimeoutError):
            raise ApplicationError("AI endpoint unreachable", type=ErrorType.AI_UNAVAILABLE) from None
        text = (completion.choices[0].message.content or "").strip() if completion.choices else ""
        if not text:
            raise ApplicationError("AI returned an empty reply", type=ErrorType.AI_EMPTY, non_retryable=True)
        usage = completion.usage
        prompt_tokens = usage.prompt_tokens if usage else 0
        completion_tokens = usage.completion_tokens if usage else 0
        await asyncio.to_thread(self._record_usage, input, prompt_tokens, completion_tokens)
        return GenerateReplyResult(text=text[:1000], prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
