"""The frontend's HTTP app (`build_app(settings)`) and its process: parses, asks the processor, hands the
request to the router, and relays its events as one JSON answer or as SSE chunks. Errors in either form come
from one formatter."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import Counter, Gauge, Histogram
from pydantic import ValidationError

from mmgraph_contract.settings import ApiSettings, FrontendSettings
from mmgraph_contract.wire import FRONTEND_IN_FLIGHT, PEER_PATHS
from mmgraph_workers.frontend.openai_api import (
    CHAT,
    TEXT,
    ChatRequest,
    Choice,
    RequestError,
    Shape,
    TextRequest,
    chunk,
    completion,
    error_body,
    error_response,
    logprobs,
    sse,
    usage,
)
from mmgraph_workers.frontend.processor import Processor
from mmgraph_workers.frontend.router import Router
from mmgraph_workers.frontend.stage_client import Local, StageFailure
from mmgraph_workers.protocol import GenerateEvent, WorkerInfo
from mmgraph_workers.server import (
    BearerAuth,
    internal_error,
    make_app,
    new_request_id,
    peer_token,
    serve,
    unless_disconnected,
)

log = logging.getLogger("mmgraph.frontend")
T = TypeVar("T")
REQUESTS = Counter("mmgraph_requests_total", "Chat completion requests", ["status"])
ERRORS = Counter("mmgraph_request_errors_total", "Requests that failed, by the stage that failed", ["stage"])
TTFT = Histogram("mmgraph_time_to_first_token_seconds", "Time from request to first token")
IN_FLIGHT = Gauge(FRONTEND_IN_FLIGHT, "Requests being served (the frontend's queue depth)")


def is_api(path: str) -> bool:
    """An OpenAI API path: the API key guards it (when there is one), the peer credential never does. A stage's
    own calls under /v1/ stay the peers' (agg's pd serves both)."""
    return path.startswith(("/v1/", "/tokenize", "/detokenize")) and not path.startswith(PEER_PATHS)


def failure(err: Exception, request_id: str) -> tuple[int, dict]:
    """(status, OpenAI error body) for anything a request can end with; counts it."""
    if isinstance(err, RequestError):
        status, body = err.status, error_body(str(err), err.status, err.param)
    elif isinstance(err, StageFailure):
        ERRORS.labels(err.stage).inc()
        status, body = err.status, error_body(str(err), err.status)
    else:  # a bug of ours: the log has the exception, the client the request id to find it by, never its text
        log.error("request %s failed", request_id, exc_info=err)
        status, body = 500, error_body(internal_error("frontend", request_id), 500)
    REQUESTS.labels(str(status)).inc()
    return status, body


def failed(err: Exception, request_id: str) -> JSONResponse:
    """`failure` as the answer; a 503 (busy or overloaded) says when to retry, since a retry may well succeed."""
    status, body = failure(err, request_id)
    return JSONResponse(body, status_code=status, headers={"Retry-After": "1"} if status == 503 else None)


class Lane:
    """One thread with a processor of its own (a tokenizer must not be used by two threads at once) that prepares
    requests one at a time, off the event loop (a large body, base64 images, would hold every stream for as long as
    it takes). It holds at most `capacity` requests, running or queued: past that, a 503 (RequestError) at once,
    not a wait with no end; the work of a caller that is cancelled (its client left) before its turn never starts.
    """

    def __init__(self, name: str, processor: Processor, capacity: int):
        self.name, self.processor = name, processor
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=name)
        self.slots = threading.Semaphore(capacity)  # given back as each item ends, or is cancelled before it ran

    async def run(self, work: Callable[..., T], *args: Any) -> T:
        """`work(processor, *args)` on the lane's thread."""
        if not self.slots.acquire(blocking=False):
            raise RequestError(f"the frontend holds as many requests as it may ({self.name}): retry shortly", None, 503)
        future = self.executor.submit(work, self.processor, *args)
        future.add_done_callback(lambda _: self.slots.release())  # also when cancelled before it ran
        return await asyncio.wrap_future(future)  # cancelling this cancels `future` unless it has started


# (name, capacity) of the two lanes. A small body (up to LARGE_BODY: ~16k tokens of text, tens of milliseconds of a
# tokenizer's time) waits only for other small ones (256 of them: seconds at most); a large one's parse, media
# hashing or tokenizer pass holds only the large lane (16 of them, each as large as the body limit allows).
SMALL_LANE, LARGE_LANE = ("prepare", 256), ("prepare-large", 16)
LARGE_BODY = 1 << 16


@dataclass
class Lanes:
    """Two lanes, by body size, so small requests keep flowing while a large one is prepared. What a large one can
    cost is bounded first by the context: text that cannot fit is refused from its size before it is tokenized
    (Processor.check_fits), so a 20 MB prompt costs its JSON parse; text under that bound costs the large lane's
    time (on a long-context model, seconds), never the small lane's."""

    small: Lane
    large: Lane

    @classmethod
    def start(cls, api: ApiSettings) -> Lanes:
        """Each lane with a processor, and so a tokenizer, of its own."""
        return cls(*(Lane(name, Processor(api), capacity) for name, capacity in (SMALL_LANE, LARGE_LANE)))

    def of(self, body: bytes) -> Lane:
        return self.large if len(body) > LARGE_BODY else self.small


def build_app(settings: FrontendSettings) -> FastAPI:
    app = make_app("frontend", lambda: api_ready(app), settings.server.max_request_bytes)
    add_api(app, settings.api(), peer_token(settings.server))
    return app


def api_ready(app: FastAPI) -> bool:
    """The API can serve: it has its processor, and pd has told it the model's limits."""
    router: Router | None = getattr(app.state, "router", None)
    return router is not None and router.pd_info is not None


def add_api(app: FastAPI, api: ApiSettings, token: str | None, *, local: Local | None = None) -> None:
    """The OpenAI API on `app`: the frontend's, or agg's pd's, whose own engine is `local` (its calls skip HTTP).
    `token` is the graph's peer credential, which the router sends to the stages."""
    api_key = os.environ.get(api.api_key_env, "") if api.api_key_env else ""
    if api.api_key_env and not api_key:
        raise SystemExit(f"--api-key-env {api.api_key_env} is set but the variable is empty")
    app.state.processor, app.state.router = None, None

    @app.on_event("startup")
    async def load() -> None:
        app.state.lanes = await asyncio.to_thread(Lanes.start, api)
        app.state.processor = app.state.lanes.small.processor  # decode, for logprobs: the event loop's, read only
        app.state.router = Router(api.routes, token, local)
        for stage in app.state.router.peers:  # 0 from the start: a dashboard shows no failures, not "no data"
            ERRORS.labels(stage)
        app.state.watcher = asyncio.create_task(app.state.router.watch_peers())

    if api_key:  # the OpenAI routes; probes and metrics stay open
        app.add_middleware(
            BearerAuth,
            token=api_key,
            guarded=is_api,
            refusal=error_response(
                "missing or wrong API key (Authorization: Bearer <key>)", 401, kind="authentication_error"
            ),
        )

    @app.get("/v1/models")
    async def models() -> dict:
        return {
            "object": "list",
            "data": [{"id": api.weights.served_model_name, "object": "model", "created": 0, "owned_by": "mmgraph"}],
        }

    @app.post("/tokenize")
    async def tokenize(request: Request) -> JSONResponse:
        router: Router = app.state.router
        max_len = router.pd_info.max_model_len if router.pd_info else None
        return await _tokenizer_call(request, lambda processor, body: processor.tokenize(body, max_len))

    @app.post("/detokenize")
    async def detokenize(request: Request) -> JSONResponse:
        return await _tokenizer_call(request, lambda processor, body: processor.detokenize(body))

    async def _tokenizer_call(request: Request, call: Callable[[Processor, dict], dict]) -> JSONResponse:
        """vLLM's /tokenize and /detokenize: on a lane, as a completion's prompt is."""
        lanes: Lanes = app.state.lanes
        try:
            body = await request.body()
            answer = await unless_disconnected(request, lanes.of(body).run(_loaded, call, body))
        except (json.JSONDecodeError, UnicodeDecodeError, ValidationError, RequestError) as err:
            return refused(err, f"tokenize-{new_request_id()}")
        return JSONResponse(answer)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await _answer(request, CHAT)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _answer(request, TEXT)

    async def _answer(request: Request, shape: Shape):
        processor: Processor | None = app.state.processor
        router: Router | None = app.state.router
        assert processor is not None and router is not None, "not ready"
        request_id = f"{shape.prefix}-{uuid.uuid4().hex}"
        lanes: Lanes = app.state.lanes
        try:
            body = await request.body()
            prepared = lanes.of(body).run(_prepare, shape, body, router.pd_info)
            req, (token_ids, media, sampling) = await unless_disconnected(request, prepared)
        except (json.JSONDecodeError, UnicodeDecodeError, ValidationError, RequestError) as err:
            return refused(err, request_id)
        events = router.run(request_id, token_ids, media, sampling, prompt=req.return_token_ids)
        writer = Writer(shape, request_id, req, processor.decode)
        if req.stream:  # Starlette stops the stream (and so the stages' calls) when the client goes
            return StreamingResponse(writer.stream(events), media_type="text/event-stream")
        return await unless_disconnected(request, writer.whole(events))


def _prepare(
    processor: Processor, shape: Shape, body: bytes, pd: WorkerInfo | None
) -> tuple[ChatRequest | TextRequest, tuple]:
    """Parse, check, template and tokenize one request, on a lane's thread; text that cannot fit the context is
    refused before anything else looks at it."""
    data = json.loads(body)
    max_len, defaults = (pd.max_model_len, pd.default_sampling) if pd else (None, {})
    processor.check_fits(data, max_len)
    if shape.chat:
        chat = ChatRequest.model_validate(data)
        return chat, processor.prepare(chat, data, max_len, defaults)
    text = TextRequest.model_validate(data)
    return text, processor.prepare_text(text, data, max_len, defaults)


def _loaded(processor: Processor, call: Callable[[Processor, Any], dict], body: bytes) -> dict:
    """`call` on the parsed body, on a lane's thread: a large body's parse holds no other request either."""
    return call(processor, json.loads(body))


def refused(err: Exception, request_id: str) -> JSONResponse:
    """The 4xx (or busy 503) for what was wrong with a request before any stage saw it. The error's traceback is
    dropped: its frames (the request's body and parsed JSON among their locals) and the futures that carried it to
    this task form a reference cycle, which would keep a refused 20 MB body alive until a full garbage collection."""
    answer = failed(_request_error(err), request_id)
    err.__traceback__ = None
    return answer


def _request_error(err: Exception) -> RequestError:
    """What was wrong with the request body, as the 400 that names it."""
    if isinstance(err, json.JSONDecodeError):
        return RequestError(f"the request body is not valid JSON: {err}")
    if isinstance(err, UnicodeDecodeError):  # json.loads takes UTF-8, -16 or -32, and nothing else
        return RequestError(f"the request body is not JSON text in UTF-8: {err.reason} at byte {err.start}")
    if isinstance(err, ValidationError):
        first = err.errors(include_url=False)[0]
        where = ".".join(map(str, first["loc"]))
        return RequestError(f"{where}: {first['msg']}", where)
    assert isinstance(err, RequestError)
    return err


def main(settings: FrontendSettings) -> None:
    if not settings.routes.pd_url:
        raise SystemExit("mmgraph worker frontend: --pd-url is required (every topology has pd)")
    serve(build_app(settings), settings.server)


@dataclass
class Writer:
    """Writes one request's answer in its shape, streamed (SSE) or whole, from the stages' events (one choice per
    `n`, each event naming its own)."""

    shape: Shape
    request_id: str
    req: ChatRequest | TextRequest
    decode: Callable[[int], str]

    def _logprobs(self, token_ids: list[int], steps: list | None) -> dict | None:
        return logprobs(self.req, token_ids, steps, self.decode) if isinstance(self.req, ChatRequest) else None

    async def stream(self, events: AsyncIterator[GenerateEvent]) -> AsyncIterator[bytes]:
        shape, req = self.shape, self.req
        started, first = time.perf_counter(), True
        include_usage = bool((req.stream_options or {}).get("include_usage"))
        IN_FLIGHT.inc()
        try:
            ids = req.return_token_ids  # vLLM's extension: token ids beside the text, the prompt's once
            prompt_ids: list[int] | None = None
            started_choices: set[int] = set()
            async for event in events:
                if prompt_ids is None:  # the chat's opening chunks wait for the engine's prompt, as in vLLM
                    prompt_ids = event.prompt_token_ids or []
                    for index in range(req.n if shape.chat else 0):
                        opening = {"index": index, "delta": {"role": "assistant", "content": ""}}
                        body = chunk(shape, self.request_id, req.model, {**opening, "finish_reason": None})
                        if ids and index == 0:
                            body["prompt_token_ids"] = prompt_ids
                        yield sse(body)
                if first and (event.token_ids or event.text):
                    TTFT.observe(time.perf_counter() - started)
                    first = False
                if event.text or event.finish_reason or event.logprobs or (ids and event.token_ids):
                    probs = self._logprobs(event.token_ids, event.logprobs)
                    choice = shape.choice(event.index, event.text, event.finish_reason, probs, streamed=True)
                    if ids:
                        choice["token_ids"] = event.token_ids
                        if not shape.chat and event.index not in started_choices:
                            choice["prompt_token_ids"] = prompt_ids
                    started_choices.add(event.index)
                    yield sse(chunk(shape, self.request_id, req.model, choice))
                if event.final and include_usage:
                    yield sse(chunk(shape, self.request_id, req.model, None, usage(event)))
            REQUESTS.labels("200").inc()
        except Exception as err:
            yield sse(failure(err, self.request_id)[1])
        finally:
            IN_FLIGHT.dec()
        yield sse("[DONE]")

    async def whole(self, events: AsyncIterator[GenerateEvent]) -> JSONResponse:
        started, choices, last, prompt_ids = time.perf_counter(), defaultdict(Choice), None, None
        IN_FLIGHT.inc()
        try:
            async for event in events:
                prompt_ids = prompt_ids if prompt_ids is not None else event.prompt_token_ids
                if not choices and (event.token_ids or event.text):
                    TTFT.observe(time.perf_counter() - started)
                choices[event.index].add(event)
                last = event
        except Exception as err:
            return failed(err, self.request_id)
        finally:
            IN_FLIGHT.dec()
        REQUESTS.labels("200").inc()
        probs = lambda c: self._logprobs(c.token_ids, c.steps)  # noqa: E731
        body = completion(self.shape, self.request_id, self.req, prompt_ids or [], choices, last, probs)
        return JSONResponse(body)
