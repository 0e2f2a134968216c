"""What one stage holds at once, beyond each request's own limit: a body's size (413), the bytes of bodies held
across requests (503), and how long a body may take to arrive (408), enforced as the bytes arrive."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi.responses import JSONResponse

from mmgraph_contract.settings import BODY_SECONDS


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
