"""What every worker's HTTP side shares: /health and /metrics, JSON errors, and serving with uvicorn.

A worker is an engine-facing core plus this thin layer; nothing here knows about models or scheduling.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from mmgraph_operator.api import TransferSpec, default
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from mmgraph_workers.protocol import PROTOCOL_VERSION, Message

log = logging.getLogger("mmgraph.worker")
M = TypeVar("M", bound=Message)


async def read_message(request: Request, kind: type[M]) -> M | JSONResponse:
    """The typed inter-stage message in the request body, or the 400 answer that says why it is not one."""
    try:
        message = kind.model_validate_json(await request.body())
    except ValidationError as err:
        return JSONResponse({"error": f"bad {kind.__name__}: {err}", "status": 400}, status_code=400)
    if message.version != PROTOCOL_VERSION:
        error = (
            f"protocol version {message.version} is not spoken here ({PROTOCOL_VERSION}); "
            "upgrade the graph's stages together"
        )
        return JSONResponse({"error": error, "status": 400}, status_code=400)
    return message


def make_app(stage: str, ready: Callable[[], bool]) -> FastAPI:
    app = FastAPI(title=f"mmgraph {stage}", docs_url=None, redoc_url=None)

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = ready()
        return JSONResponse({"stage": stage, "ready": ok}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest().decode(), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(Exception)
    async def crash(request: Request, err: Exception) -> JSONResponse:
        log.exception("%s failed on %s", stage, request.url.path)
        return JSONResponse({"error": f"{stage} failed: {type(err).__name__}: {err}", "stage": stage}, status_code=500)

    return app


def serve(app: FastAPI, host: str, port: int) -> None:
    """Run until SIGINT/SIGTERM; uvicorn drains in-flight requests for a few seconds, then stops."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)


def add_common_arguments(parser) -> None:
    """Flags every worker takes (commands.py emits them from the graph)."""
    parser.add_argument("--model", required=True, help="local path or Hugging Face id of the weights")
    parser.add_argument("--served-model-name", required=True)
    parser.add_argument("--revision", default=None)
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--transfer-timeout-seconds", type=float, default=default(TransferSpec, "timeout_seconds"))


def add_transfer_arguments(parser) -> None:
    parser.add_argument("--advertise-host", default="127.0.0.1", help="address peers reach this pod at")
    parser.add_argument("--transfer-backend", default=default(TransferSpec, "backend"), help="spec.transfer.backend")
    parser.add_argument("--transfer-port", type=int, default=default(TransferSpec, "port"), help="NIXL side channel")


def add_kv_lease_argument(parser) -> None:
    """How long pd keeps a request's KV blocks for decode (pd's NixlConnector, and the frontend's timing)."""
    parser.add_argument("--kv-lease-seconds", type=int, default=default(TransferSpec, "kv_lease_seconds"))
