"""Codec server for the Temporal Web UI and CLI (``--ui-codec-endpoint``).

Implements the UI's protocol: ``POST {endpoint}/encode`` and
``POST {endpoint}/decode`` with ``{"payloads": [{"metadata": {k: base64},
"data": base64}]}``. Operators see decoded payloads; nobody without the codec
token does. Browsers that cannot send an Authorization header use the
token-in-path form ``/codec/t/{token}/decode``.
"""

from __future__ import annotations

import base64
import binascii

from fastapi import APIRouter, HTTPException, Request, status
from pydantic import BaseModel, Field
from temporalio.api.common.v1 import Payload

from core.codec import EncryptionCodec, KeyDestroyedError, KeyStore, UnknownKeyError
from core.crypto import constant_time_equals

router = APIRouter(tags=["codec"])


class PayloadJSON(BaseModel):
    metadata: dict[str, str] = Field(default_factory=dict)
    data: str = ""


class Payloads(BaseModel):
    payloads: list[PayloadJSON] = Field(max_length=1000)


def _authorize(request: Request, token: str | None) -> None:
    expected = request.app.state.settings.codec_token
    if not expected:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "the codec server is disabled (set VECTORY_CODEC_TOKEN)")
    if token is None:
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else ""
    if not token or not constant_time_equals(token, expected):
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "invalid codec token", headers={"WWW-Authenticate": "Bearer"})


def _to_proto(items: list[PayloadJSON]) -> list[Payload]:
    try:
        return [
            Payload(metadata={k: base64.b64decode(v) for k, v in p.metadata.items()}, data=base64.b64decode(p.data))
            for p in items
        ]
    except (binascii.Error, ValueError) as exc:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, f"payloads must be base64: {exc}") from None


def _to_json(payloads: list[Payload]) -> Payloads:
    return Payloads(
        payloads=[
            PayloadJSON(
                metadata={k: base64.b64encode(v).decode() for k, v in p.metadata.items()},
                data=base64.b64encode(p.data).decode(),
            )
            for p in payloads
        ]
    )


async def _run(request: Request, body: Payloads, op: str, token: str | None) -> Payloads:
    _authorize(request, token)
    # Keys read from the database for each request, not the API's process-wide
    # cache (its signals keep it warm): a workspace erased a moment ago, by
    # whichever process, is undecodable here at once (410).
    keys = request.app.state.keys
    codec = EncryptionCodec(KeyStore(keys.engine, keys.vault))
    payloads = _to_proto(body.payloads)
    try:
        result = await (codec.encode(payloads) if op == "encode" else codec.decode(payloads))
    except KeyDestroyedError as exc:
        raise HTTPException(status.HTTP_410_GONE, str(exc)) from None
    except (UnknownKeyError, ValueError) as exc:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, str(exc)) from None
    return _to_json(result)


@router.post("/codec/decode", response_model=Payloads, operation_id="codec_decode", summary="Decode payloads (Temporal UI)")
async def decode(request: Request, body: Payloads) -> Payloads:
    return await _run(request, body, "decode", None)


@router.post("/codec/encode", response_model=Payloads, operation_id="codec_encode", summary="Encode payloads (Temporal UI)")
async def encode(request: Request, body: Payloads) -> Payloads:
    return await _run(request, body, "encode", None)


@router.post("/codec/t/{token}/decode", response_model=Payloads, include_in_schema=False)
async def decode_with_path_token(token: str, request: Request, body: Payloads) -> Payloads:
    return await _run(request, body, "decode", token)


@router.post("/codec/t/{token}/encode", response_model=Payloads, include_in_schema=False)
async def encode_with_path_token(token: str, request: Request, body: Payloads) -> Payloads:
    return await _run(request, body, "encode", token)
