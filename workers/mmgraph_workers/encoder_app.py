"""The encoder stage's wiring: its HTTP routes and its process (the handler is encoder.py's `Encoder`)."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from fastapi import Request
from fastapi.responses import JSONResponse
from prometheus_client import Counter

from mmgraph_contract.settings import EncoderSettings
from mmgraph_contract.wire import AGENT_PATH, ENCODE_PATH, INFO_PATH, RELEASE_PATH
from mmgraph_workers.batching import Busy
from mmgraph_workers.encoder import Encoder
from mmgraph_workers.media import MediaError
from mmgraph_workers.protocol import EncodeRequest, WorkerInfo
from mmgraph_workers.server import (
    make_app,
    peer_token,
    read_message,
    readers_wait_seconds,
    serve,
    stage_error,
    unless_disconnected,
)
from mmgraph_workers.transfer import make_transfer

log = logging.getLogger("mmgraph.encoder")
MEDIA_ERRORS = Counter("mmgraph_encoder_media_errors_total", "Requests refused for their media", ["status"])


def main(settings: EncoderSettings) -> None:
    encoder: Encoder | None = None
    app = make_app(
        "encoder", lambda: encoder is not None, settings.server.max_request_bytes, peer_token(settings.server)
    )

    @app.on_event("startup")
    async def load() -> None:
        nonlocal encoder
        # a restart is a new agent
        name = f"encoder-{settings.transfer.advertise_host}-{settings.server.port}-{uuid.uuid4().hex[:8]}"
        hold = settings.transfer.transfer_timeout_seconds + 1  # a read begun before a free ends by its deadline
        encoder = await asyncio.to_thread(
            Encoder,
            settings,
            lambda size: make_transfer(settings.transfer.transfer_backend, name, size, hold_seconds=hold),
        )
        app.state.metrics = asyncio.create_task(encoder.report_published())
        log.info("encoder ready: %s", settings.weights.model)

    @app.on_event("shutdown")
    async def drain() -> None:
        """Stay until pd has pulled what we published (or the pulls' deadline passes): a replica being scaled
        down has answered requests whose embeddings are still to be read from this process's memory."""
        if encoder is None:
            return
        # a pull's deadline
        wait = readers_wait_seconds(settings.transfer.transfer_timeout_seconds, settings.server.drain_seconds)
        deadline, waiting = time.monotonic() + wait, encoder.transfer.published()
        while encoder.transfer.published() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if left := encoder.transfer.published():
            log.warning("stopping with %d of %d published embeddings unread", left, waiting)
        else:
            log.info("stopping: every published embedding was read (%d waited for)", waiting)
        encoder.transfer.close()

    @app.get(INFO_PATH)
    async def info() -> WorkerInfo:
        weights = settings.weights
        return WorkerInfo(stage="encoder", model=weights.model, served_model_name=weights.served_model_name)

    @app.post(ENCODE_PATH)
    async def encode(request: Request) -> JSONResponse:
        body = await read_message(request, EncodeRequest)
        if isinstance(body, JSONResponse):
            return body
        try:
            encoded = await unless_disconnected(request, encoder.encode(body))  # type: ignore[union-attr]
            return JSONResponse(encoded.model_dump())
        except MediaError as err:
            MEDIA_ERRORS.labels(status=str(err.status)).inc()
            return stage_error(str(err), err.status)
        except Busy as err:
            return stage_error(str(err), 503, headers={"Retry-After": "1"}, retry=True)

    @app.get(AGENT_PATH)
    async def agent() -> JSONResponse:
        """What pd connects to this encoder's NIXL agent with: asked of the encoder itself, at an address pd
        resolved from the graph's encoder Service, never taken from a message."""
        return JSONResponse(encoder.sender.agent().model_dump())  # type: ignore[union-attr]

    @app.post(RELEASE_PATH)
    async def release(handle: str) -> JSONResponse:
        encoder.sender.release(handle)  # type: ignore[union-attr]
        return JSONResponse({"released": handle})

    serve(app, settings.server)
