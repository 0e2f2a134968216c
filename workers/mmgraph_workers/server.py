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
from dataclasses import dataclass
from typing import Any, TypeVar

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from mmgraph_operator.api import POD_GRACE_SECONDS, PRESTOP_SECONDS, TransferSpec, default
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.requests import ClientDisconnect

from mmgraph_workers.protocol import PREVIOUS_VERSION, PROTOCOL_VERSION, Message

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
    return JSONResponse({"error": f"bad {kind.__name__}: {problem}", "status": 400}, status_code=400)


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
    return JSONResponse({"error": error, "status": 400, "speaks": list(SPOKEN)}, status_code=400)


class Detached:
    """Tasks that must finish even though the request that started them is cancelled (a client that leaves cancels
    every await of its request): held here until done, since the event loop keeps only a weak reference."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task] = set()

    def start(self, work: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


class BodyTooLarge(Exception):
    """A request body went past the stage's --max-request-bytes while it was read."""

    def __init__(self, limit: int):
        super().__init__(limit)
        self.limit = limit


class OverBudget(Exception):
    """A body's bytes, as they arrived, would take the stage past its --max-buffered-bytes."""


class BodyTimeout(Exception):
    """A body was not all read within --body-timeout-seconds of its request's start."""


# uvicorn reads up to its high-water mark (64 KiB) of a body per connection before the app asks for any, so bodies
# up to this size are bounded by the connection limit already, and the budget leaves them out: a small request is
# answered while large ones hold the budget.
SMALL_BODY = 1 << 16
BUDGET_BODIES = 4  # --max-buffered-bytes' default, in largest bodies
BODY_SECONDS = 60.0  # --body-timeout-seconds' default: a full-size body over a link of ~30 Mbit/s
# An idle kept-alive connection: a caller drops it after PEER_KEEPALIVE_SECONDS (ours) or 5 s (httpx's default,
# the OpenAI SDK's), well before a stage closes it (KEEP_ALIVE_SECONDS), so no caller sends a request on a
# connection the stage is closing at that moment (uvicorn's default, 5 s, equals httpx's: that race failed about 1
# request in 160 under a steady load on the node).
KEEP_ALIVE_SECONDS = 20
PEER_KEEPALIVE_SECONDS = 10.0
MAX_CONNECTIONS = 1024  # --max-connections' default: 1024 x SMALL_BODY is 64 MiB of small bodies at most


@dataclass
class Bounds:
    """What one stage holds at once, beyond each request's own limit: `budget` bytes of the bodies larger than
    SMALL_BODY received so far, across every request in flight (None: no budget), each body read within
    `body_seconds`. One per app, shared by its requests; the event loop is its only user, so it needs no lock."""

    budget: int | None
    body_seconds: float = BODY_SECONDS
    held: int = 0

    def room(self, size: int) -> bool:
        return self.budget is None or self.held + size <= self.budget


class BodyLimit:
    """ASGI middleware bounding request bodies. A body over its path's limit (`limit_of`; None: none) is a 413,
    from its Content-Length before anything is read, or as soon as a streamed body passes the limit (so no more of
    it is held). A body not all read within `bounds.body_seconds` of its request's start is a 408 that closes the
    connection: a slow upload holds its bytes, budget and connection for no longer. Across requests, the bytes of
    bodies past SMALL_BODY count against `bounds`' budget as they arrive (bytes held, not bytes promised: a
    Content-Length alone, sent by a client that then sends nothing, holds nothing) until their request ends; a body
    that would take it past the budget is a 503 with Retry-After, from its Content-Length before anything is read,
    or when the chunk that would is received, which is dropped, as is the rest (uvicorn reads and discards it)."""

    def __init__(self, app: Any, limit_of: Callable[[str], int | None], bounds: Bounds):
        self.app, self.limit_of, self.bounds = app, limit_of, bounds

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit, bounds = self.limit_of(scope["path"]), self.bounds
        declared = dict(scope.get("headers") or []).get(b"content-length")
        size = int(declared) if declared is not None and declared.isdigit() else 0
        if limit is not None and size > limit:
            return await too_large(limit)(scope, receive, send)
        if size > SMALL_BODY and not bounds.room(size):
            return await over_budget()(scope, receive, send)
        deadline = asyncio.get_running_loop().time() + bounds.body_seconds
        received = held = 0
        done = False

        async def counted() -> dict:
            nonlocal received, held, done
            if done:  # the body is in; what is left to receive is the disconnect, which has no deadline
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise BodyTimeout from None
            done = not message.get("more_body", False)
            received += len(message.get("body", b""))
            if limit is not None and received > limit:
                raise BodyTooLarge(limit)
            if received > SMALL_BODY:
                if not bounds.room(received - held):
                    raise OverBudget
                bounds.held += received - held
                held = received
            return message

        try:
            await self.app(scope, counted, send)
        finally:
            bounds.held -= held


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


READERS_SECONDS = 10.0  # what the grace period keeps, after the drain, for the readers of a stage's memory
PEER_OPEN = ("/health", "/metrics")  # probes and Prometheus: every other call of a stage is a peer's
PEER_PATHS = ("/v1/info", "/v1/transfer/")  # the stages' own calls under /v1/, beside the OpenAI API's


def peer_token(args) -> str | None:
    """The graph's inter-stage credential, from the environment variable --peer-token-env names (a Secret's key
    in a pod); None where no variable is named (a stage run by hand)."""
    if not args.peer_token_env:
        return None
    token = os.environ.get(args.peer_token_env, "")
    if not token:
        raise SystemExit(f"--peer-token-env names {args.peer_token_env}, which is empty or unset")
    return token


def peer_headers(token: str | None) -> dict[str, str]:
    """Headers of a call to another stage of the graph."""
    return {"authorization": f"Bearer {token}"} if token else {}


def too_large(limit: int) -> JSONResponse:
    return refuse_body(f"the request body is larger than this graph's {limit} byte limit (spec.media sets it)", 413)


def over_budget() -> JSONResponse:
    message = "this stage holds as many request bytes as it may at once (--max-buffered-bytes): retry shortly"
    return refuse_body(message, 503, {"retry-after": "1"})


def body_timeout(seconds: float) -> JSONResponse:
    """Closes the connection: the slow client's upload goes with it."""
    message = f"the request body did not arrive within {seconds:g} s (--body-timeout-seconds)"
    return refuse_body(message, 408, {"connection": "close"})


def refuse_body(message: str, status: int, headers: dict[str, str] | None = None) -> JSONResponse:
    """A refusal of a request's body, in the OpenAI error shape (a client's, or a peer's, reads it)."""
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status, headers=headers)


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
        refusal = {"error": "this is an internal stage: calls need the graph's peer credential", "status": 401}
        app.add_middleware(  # added last, so it runs first: no body is read for a stranger
            BearerAuth,
            token=token,
            guarded=lambda path: path not in PEER_OPEN and not (public and public(path)),
            refusal=JSONResponse(refusal, status_code=401),
        )

    @app.exception_handler(ClientGone)
    @app.exception_handler(ClientDisconnect)  # mid-body: an upload abandoned, not a failure of ours to log
    async def client_gone(request: Request, err: Exception) -> JSONResponse:
        return JSONResponse({"error": "the client disconnected", "status": 499}, status_code=499)  # nobody reads it

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = ready() and not app.state.draining
        body = {"stage": stage, "ready": ok, **({"draining": True} if app.state.draining else {})}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest().decode(), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(Exception)
    async def crash(request: Request, err: Exception) -> JSONResponse:
        """A bug of ours: the log has the exception, the caller a request id to find it by (an exception's text
        can carry paths, addresses or another request's data, so it is never sent)."""
        request_id = new_request_id()
        log.error("%s failed on %s; request id %s", stage, request.url.path, request_id, exc_info=err)
        body = {"error": internal_error(stage, request_id), "stage": stage, "request_id": request_id}
        return JSONResponse(body, status_code=500)

    return app


def new_request_id() -> str:
    return uuid.uuid4().hex


def internal_error(stage: str, request_id: str) -> str:
    """What a caller reads of a failure that is ours: where, and the id its log line carries."""
    return f"internal error in {stage}; request id {request_id}"


def serve(app: FastAPI, args) -> None:
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
    if args.max_buffered_bytes is not None:
        bounds.budget = args.max_buffered_bytes
    bounds.body_seconds = args.body_timeout_seconds
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level="warning",
        timeout_graceful_shutdown=args.drain_seconds,
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
        limit_concurrency=args.max_connections,
    )


def add_common_arguments(parser) -> None:
    """Flags every worker takes (commands.py emits them from the graph)."""
    parser.add_argument("--model", required=True, help="local path or Hugging Face id of the weights")
    parser.add_argument("--served-model-name", required=True)
    parser.add_argument("--revision", default=None)
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--transfer-timeout-seconds", type=float, default=default(TransferSpec, "timeout_seconds"))
    parser.add_argument(
        "--max-request-bytes",
        type=int,
        default=None,
        help="refuse request bodies larger than this (413); the operator sets it from spec.media",
    )
    parser.add_argument(
        "--max-buffered-bytes",
        type=int,
        default=None,
        help=f"bytes of request bodies (those over {SMALL_BODY}) held at once across requests; past them, 503 "
        f"(default: {BUDGET_BODIES} x --max-request-bytes, or no bound without it)",
    )
    parser.add_argument(
        "--body-timeout-seconds",
        type=float,
        default=BODY_SECONDS,
        help="a request body not all received this long after its request began is refused (408) and dropped",
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        default=MAX_CONNECTIONS,
        help="open connections (or requests in flight) past which new requests get 503",
    )
    parser.add_argument(
        "--peer-token-env",
        default=None,
        help="environment variable holding the graph's inter-stage credential (the operator's Secret); "
        "stages refuse calls without it, the frontend sends it",
    )
    parser.add_argument(
        "--drain-seconds",
        type=float,
        default=POD_GRACE_SECONDS - PRESTOP_SECONDS - READERS_SECONDS - 5,
        help="on SIGTERM, how long requests in flight may take to finish (what the pod's grace period leaves after "
        f"the preStop delay, {READERS_SECONDS:.0f} s for readers of what this stage holds, and 5 s to exit)",
    )


def readers_wait_seconds(wanted: float, drain_seconds: float) -> float:
    """How long a stopping stage waits, after uvicorn's drain, for peers to read what it holds for them (the
    encoder's embeddings, pd's KV cache): `wanted`, but never past the pod's grace period (the preStop delay and
    the drain may have used all theirs; 2 s spare for the exit itself), so the kubelet never kills it mid-read."""
    return max(0.0, min(wanted, POD_GRACE_SECONDS - PRESTOP_SECONDS - drain_seconds - 2))


def add_transfer_arguments(parser) -> None:
    parser.add_argument("--advertise-host", default="127.0.0.1", help="address peers reach this pod at")
    parser.add_argument("--transfer-backend", default=default(TransferSpec, "backend"), help="spec.transfer.backend")
    parser.add_argument("--transfer-port", type=int, default=default(TransferSpec, "port"), help="NIXL side channel")


def add_kv_lease_argument(parser) -> None:
    """How long pd keeps a request's KV blocks for decode (pd's NixlConnector, and the frontend's timing)."""
    parser.add_argument("--kv-lease-seconds", type=int, default=default(TransferSpec, "kv_lease_seconds"))
