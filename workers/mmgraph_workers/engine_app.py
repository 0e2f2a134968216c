"""The vLLM stages' wiring: /generate and /v1/info, the engine's watchdog, and the process (the handler is
engine.py's `Engine`); agg's pd mounts the OpenAI API on the same app."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from mmgraph_contract.settings import EngineSettings
from mmgraph_contract.wire import GENERATE_PATH, INFO_PATH
from mmgraph_workers import cpu
from mmgraph_workers.engine import Engine
from mmgraph_workers.frontend.app import add_api, api_ready, is_api
from mmgraph_workers.frontend.stage_client import Local
from mmgraph_workers.protocol import (
    GenerateRequest,
    WorkerInfo,
)
from mmgraph_workers.server import (
    make_app,
    read_message,
    readers_wait_seconds,
    serve,
    stage_error,
)
from mmgraph_workers.vllm_args import user_engine_args

log = logging.getLogger("mmgraph.engine")


async def watch(engine: Engine, stage: str) -> None:
    """A dead engine must not look healthy: /health fails at once (it asks the engine), and the worker stops,
    so its pod leaves the Service and is restarted, and `mmgraph up` names it, as vLLM's own server does."""
    while not engine.llm.errored:
        await asyncio.sleep(1.0)
    log.error("%s: the vLLM engine died; stopping this worker so that it is restarted", stage)
    os.kill(os.getpid(), signal.SIGTERM)


def main(settings: EngineSettings, stage: str) -> None:
    cpu.apply_engine_env(user_engine_args(settings)[0])
    openai = settings.openai and stage == "pd"
    engine = Engine(settings, stage)
    alive = lambda: engine.llm is not None and not engine.llm.errored  # noqa: E731
    app = make_app(
        stage,
        lambda: alive() and (not openai or api_ready(app)),
        settings.server.max_request_bytes,
        engine.token,
        public=is_api if openai else None,
        public_body_bytes=settings.api_max_request_bytes,
    )

    @app.on_event("startup")
    async def load() -> None:
        app.state.peers = asyncio.create_task(engine.watch_peers())  # from the start: while the engine loads too
        await engine.start()
        app.state.watchdog = asyncio.create_task(watch(engine, stage))
        log.info("%s ready: %s (max_model_len %s)", stage, settings.weights.model, engine.max_model_len)

    @app.on_event("shutdown")
    async def stop() -> None:
        """After the drain: pd stays until decode has had time to pull the KV of its last prefills (a pull's
        deadline after the last one, within the grace period), then the engine and NIXL stop."""
        app.state.peers.cancel()
        wait = readers_wait_seconds(settings.transfer.transfer_timeout_seconds, settings.server.drain_seconds)
        if (left := engine.handed_off + wait - time.monotonic()) > 0:
            log.info("%s: waiting %.1f s for decode to pull the KV of its last prefills", stage, left)
            await asyncio.sleep(left)
        if engine.llm is not None:
            engine.llm.shutdown()
        if engine.transfer is not None:
            engine.transfer.close()

    @app.get(INFO_PATH, response_model=None)
    async def info() -> WorkerInfo | JSONResponse:
        return engine.info() or stage_error("the engine is loading", 503, retry=True)

    @app.post(GENERATE_PATH)
    async def generate(request: Request):
        req = await read_message(request, GenerateRequest)
        if isinstance(req, JSONResponse):
            return req

        async def lines() -> AsyncIterator[bytes]:
            async with contextlib.aclosing(engine.events(req)) as events:  # closing us closes it
                async for event in events:
                    yield event.model_dump_json(exclude_none=True).encode() + b"\n"

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    if openai:  # after the engine's startup: the API's starts once the engine has loaded
        local = Local(settings.transfer.advertise_host, engine.events, engine.info, engine.saturated)
        add_api(app, settings.api(), engine.token, local=local)
    serve(app, settings.server)
