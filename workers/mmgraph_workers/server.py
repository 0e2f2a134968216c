"""What every worker's HTTP side shares: /health and /metrics, JSON errors, and serving with uvicorn.

A worker is an engine-facing core plus this thin layer; nothing here knows about models or scheduling.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import signal
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.requests import ClientDisconnect

from mmgraph_contract.settings import Server
from mmgraph_contract.wire import (
    HEALTH_PATH,
    KEEP_ALIVE_SECONDS,
    METRICS_PATH,
    PEER_TOKEN_ENV,
    POD_GRACE_SECONDS,
    PRESTOP_SECONDS,
)
from mmgraph_workers.limits import (
    BUDGET_BODIES,
    BodyLimit,
    BodyTimeout,
    BodyTooLarge,
    Bounds,
    OverBudget,
    body_timeout,
    over_budget,
    too_large,
)
from mmgraph_workers.protocol import PREVIOUS_VERSION, PROTOCOL_VERSION, Message, StageErrorBody

log = logging.getLogger("mmgraph.worker")
M = TypeVar("M", bound=Message)
T = TypeVar("T")


async def read_message(request: Request, kind: type[M]) -> M | JSONResponse:
    """The typed inter-stage message in the request body (in this protocol version or the previous one, which a
    stage of the previous release sends mid-rollout), or the 400 answer that says why it is not one."""
    body = await request.body()
    try:
        message = kind.model_validate_json(body)  # the current version: parsed once
        if message.version == PROTOCOL_VERSION:
            return message
        version, problem = message.version, None
    except ValidationError as err:
        version, problem = _version(body), err
    if version == PREVIOUS_VERSION:
        try:
            data = kind.from_previous(json.loads(body))
            return kind.model_validate({**data, "version": PROTOCOL_VERSION})
        except (ValidationError, TypeError, AttributeError) as err:  # e.g. urls: null
            problem = err
    elif version is not None and version != PROTOCOL_VERSION:  # another version's fields: say that, not which
        return other_version(version)
    return stage_error(f"bad {kind.__name__}: {problem}", 400)


def _version(body: bytes) -> int | None:
    try:
        return Message.model_validate_json(body).version
    except ValidationError:
        return None


SPOKEN = (PREVIOUS_VERSION, PROTOCOL_VERSION)


def other_version(version: int) -> JSONResponse:
    """The refusal a sender of another release reads: `speaks` lists the versions to send instead (router.py)."""
    error = (
        f"protocol version {version} is not spoken here ({PREVIOUS_VERSION} or {PROTOCOL_VERSION}); "
        "this stage is of a release more than one apart: upgrade the graph's stages together"
    )
    return stage_error(error, 400, speaks=list(SPOKEN))


class Detached:
    """Tasks that must finish even though the request that started them is cancelled (a client that leaves cancels
    every await of its request): held here until done, since the event loop keeps only a weak reference."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task] = set()

    def start(self, work: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


class BearerAuth:
    """ASGI middleware: a call to a path `guarded` accepts must carry `Authorization: Bearer <token>` (compared in
    constant time: no timing oracle; never logged), or gets `refusal`. Plain ASGI, not Starlette's
    BaseHTTPMiddleware, which relays every chunk of a streamed answer through a memory stream of its own (about a
    tenth of the frontend's event loop under load)."""

    def __init__(self, app: Any, token: str, guarded: Callable[[str], bool], refusal: Response):
        self.app, self.expected, self.guarded, self.refusal = app, f"Bearer {token}".encode(), guarded, refusal

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and self.guarded(scope["path"]):
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                return await self.refusal(scope, receive, send)
        await self.app(scope, receive, send)


class Draining:
    """ASGI middleware: once the pod is being deleted (`draining()`, set by the preStop hook's SIGWINCH), every
    answer says `Connection: close`, so a caller's next request opens a new connection, which kube-proxy and the
    frontends' peer lists send to a replica that stays, instead of reusing one that SIGTERM will close."""

    def __init__(self, app: Any, draining: Callable[[], bool]):
        self.app, self.draining = app, draining

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or not self.draining():
            return await self.app(scope, receive, send)

        async def closing(message: dict) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"connection", b"close")]
            await send(message)

        await self.app(scope, receive, closing)


PEER_OPEN = (HEALTH_PATH, METRICS_PATH)  # probes and Prometheus: every other call of a stage is a peer's


def peer_token(server: Server) -> str | None:
    """The graph's inter-stage credential, from PEER_TOKEN_ENV (the operator's Secret, in every pod); None where it
    is unset (a stage run by hand). A pod told to expect it (the previous release's flag) refuses to start without."""
    token = os.environ.get(PEER_TOKEN_ENV) or None
    if server.peer_token_env and not token:
        raise SystemExit(f"{PEER_TOKEN_ENV} is empty or unset: the graph's peer credential is missing")
    return token


def peer_headers(token: str | None) -> dict[str, str]:
    """Headers of a call to another stage of the graph."""
    return {"authorization": f"Bearer {token}"} if token else {}


class ClientGone(Exception):
    """The caller disconnected before the answer was ready; its work was cancelled."""


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """`work`'s result, or ClientGone once the caller has disconnected, with `work` cancelled: a client that
    left does not keep fetches, tower passes or engine requests running for nobody (the body must have been read:
    what is left to receive is the disconnect)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(request.receive())
    try:
        while True:
            done, _ = await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                return task.result()
            if gone.result()["type"] == "http.disconnect":
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
                raise ClientGone
            gone = asyncio.ensure_future(request.receive())
    finally:
        gone.cancel()
        task.cancel()


def make_app(
    stage: str,
    ready: Callable[[], bool],
    max_body_bytes: int | None = None,
    token: str | None = None,
    public: Callable[[str], bool] | None = None,
    public_body_bytes: int | None = None,
) -> FastAPI:
    """`token`: the peer credential every call must carry (internal stages; the frontend faces clients), but
    probes, metrics and the `public` paths (the OpenAI API of a pd that serves it), whose bodies may have a limit
    of their own (`public_body_bytes`: a client's, where peers' messages wrap what a client sent). The bodies
    held at once are bounded by `app.state.bounds`: four of the largest by default (`serve` applies the flags)."""
    app = FastAPI(title=f"mmgraph {stage}", docs_url=None, redoc_url=None)
    app.state.draining = False
    app.add_middleware(Draining, draining=lambda: app.state.draining)
    peers, clients = max_body_bytes, public_body_bytes or max_body_bytes
    app.state.bounds = bounds = Bounds(budget=None if max_body_bytes is None else BUDGET_BODIES * max_body_bytes)
    app.add_middleware(BodyLimit, limit_of=lambda path: clients if public and public(path) else peers, bounds=bounds)

    @app.exception_handler(BodyTooLarge)
    async def body_too_large(request: Request, err: BodyTooLarge) -> JSONResponse:
        return too_large(err.limit)

    @app.exception_handler(OverBudget)
    async def budget_spent(request: Request, err: OverBudget) -> JSONResponse:
        return over_budget()

    @app.exception_handler(BodyTimeout)
    async def body_late(request: Request, err: BodyTimeout) -> JSONResponse:
        return body_timeout(bounds.body_seconds)

    if token is not None:
        app.add_middleware(  # added last, so it runs first: no body is read for a stranger
            BearerAuth,
            token=token,
            guarded=lambda path: path not in PEER_OPEN and not (public and public(path)),
            refusal=stage_error("this is an internal stage: calls need the graph's peer credential", 401),
        )

    @app.exception_handler(ClientGone)
    @app.exception_handler(ClientDisconnect)  # mid-body: an upload abandoned, not a failure of ours to log
    async def client_gone(request: Request, err: Exception) -> JSONResponse:
        return stage_error("the client disconnected", 499)  # nobody reads it

    @app.get(HEALTH_PATH)
    async def health() -> JSONResponse:
        ok = ready() and not app.state.draining
        body = {"stage": stage, "ready": ok, **({"draining": True} if app.state.draining else {})}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get(METRICS_PATH)
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest().decode(), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(Exception)
    async def crash(request: Request, err: Exception) -> JSONResponse:
        """A bug of ours: the log has the exception, the caller a request id to find it by (an exception's text
        can carry paths, addresses or another request's data, so it is never sent)."""
        request_id = new_request_id()
        log.error("%s failed on %s; request id %s", stage, request.url.path, request_id, exc_info=err)
        return stage_error(internal_error(stage, request_id), 500, stage=stage, request_id=request_id)

    return app


def stage_error(message: str, status: int, headers: dict[str, str] | None = None, **fields: Any) -> JSONResponse:
    """A stage's error answer, in the one envelope between stages (StageErrorBody)."""
    body = StageErrorBody(error=message, status=status, **fields).model_dump(exclude_defaults=True)
    return JSONResponse({"status": status, **body}, status_code=status, headers=headers)


def new_request_id() -> str:
    return uuid.uuid4().hex


def internal_error(stage: str, request_id: str) -> str:
    """What a caller reads of a failure that is ours: where, and the id its log line carries."""
    return f"internal error in {stage}; request id {request_id}"


def serve(app: FastAPI, server: Server) -> None:
    """Run until SIGINT/SIGTERM; then take no new requests and let those in flight finish (streams included)
    for up to --drain-seconds, within the pod's grace period. Before that, SIGWINCH (the preStop hook's: its default
    action is to ignore it, so a release without this handler ignores it too, as Apache's graceful-stop does) says
    the pod is going: keep serving, but answer `Connection: close` and fail readiness. Connections past
    --max-connections get uvicorn's 503 (it counts open connections and requests in flight)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def going(signum: int, frame: Any) -> None:
        if not app.state.draining:
            log.info("the pod is being deleted: serving on, sending callers elsewhere, until SIGTERM")
        app.state.draining = True

    signal.signal(signal.SIGWINCH, going)
    # httpx logs every call at INFO: a log line for every stage call the frontend makes
    logging.getLogger("httpx").setLevel(logging.WARNING)
    bounds: Bounds = app.state.bounds
    if server.max_buffered_bytes is not None:
        bounds.budget = server.max_buffered_bytes
    bounds.body_seconds = server.body_timeout_seconds
    uvicorn.run(
        app,
        host=server.host,
        port=server.port,
        log_level="warning",
        timeout_graceful_shutdown=server.drain_seconds,
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
        limit_concurrency=server.max_connections,
    )


def readers_wait_seconds(wanted: float, drain_seconds: float) -> float:
    """How long a stopping stage waits, after uvicorn's drain, for peers to read what it holds for them (the
    encoder's embeddings, pd's KV cache): `wanted`, but never past the pod's grace period (the preStop delay and
    the drain may have used all theirs; 2 s spare for the exit itself), so the kubelet never kills it mid-read."""
    return max(0.0, min(wanted, POD_GRACE_SECONDS - PRESTOP_SECONDS - drain_seconds - 2))


class StageError(RuntimeError):
    def __init__(self, message: str, status: int = 500, retry: bool = False):
        super().__init__(message)
        self.status, self.retry = status, retry
