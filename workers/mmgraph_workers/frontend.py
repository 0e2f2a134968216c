"""The frontend stage: the OpenAI chat API, the processor (chat template, tokenization, request checks), and the
router that takes each request through the graph's stages.

    agg    client -> frontend -> pd (loads the images itself, prefills, decodes)
    e-pd   client -> frontend -> encoder -> pd (pulls embeddings over NIXL, prefills, decodes)
    e-p-d  client -> frontend -> encoder -> pd (prefill only, keeps the KV) -> decode (pulls the KV, decodes)

Tokens stream from the last engine to the client through this one hop. Every call to a stage has a deadline
and a failure names the stage. A request is checked (shape, content parts, media count and schemes, length)
before any stage does work for it. Peers are URLs; their host names are re-resolved continuously, so replicas
behind a headless Service come and go without a restart, and each call goes to the least-busy address.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import socket
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import Counter, Gauge, Histogram
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mmgraph_workers.media import MediaError
from mmgraph_workers.media.fetch import check_scheme, decode_data_url, scheme_of
from mmgraph_workers.media.policy import MediaPolicy
from mmgraph_workers.protocol import (
    PEER_HOSTS_ENV,
    EncodeRequest,
    EncodeResponse,
    GenerateEvent,
    GenerateRequest,
    PlaceholderItem,
    Sampling,
    WorkerInfo,
)
from mmgraph_workers.server import add_common_arguments, make_app, serve

log = logging.getLogger("mmgraph.frontend")
REQUESTS = Counter("mmgraph_requests_total", "Chat completion requests", ["status"])
ERRORS = Counter("mmgraph_request_errors_total", "Requests that failed, by the stage that failed", ["stage"])
TTFT = Histogram("mmgraph_time_to_first_token_seconds", "Time from request to first token")
STAGE_SECONDS = Histogram("mmgraph_stage_seconds", "Time spent in each stage call", ["stage"])
IN_FLIGHT = Gauge("mmgraph_requests_in_flight", "Requests being served (the frontend's queue depth)")
CACHE_HITS = Counter("mmgraph_embedding_cache_hits_total", "Media items the encoder served from its cache")
RETRIES = Counter(
    "mmgraph_stage_retries_total", "Calls sent again after a stage failed before doing any work", ["stage"]
)
KV_REPREFILLS = Counter(
    "mmgraph_kv_lease_reprefills_total", "Prefills redone because decode could not start or pull within the KV lease"
)
# decode's first token must come this long before pd's lease ends: covers the frontend-to-decode hop (the deadline
# travels as seconds left, so clocks need not agree) with room to spare.
KV_DEADLINE_MARGIN_SECONDS = 1.0
# Prefills per request when decode cannot start, or pull the KV, within the lease: a late decode is usually a
# passing overload (on 2 cores it was mostly vLLM's worker queue, now avoided; docs/architecture.md).
KV_ATTEMPTS = 3


# ---- OpenAI request shapes ---------------------------------------------------------------------------------


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    url: str
    detail: str | None = None


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None

    def parts(self) -> list[TextPart | ImagePart]:
        if self.content is None:
            return []
        if isinstance(self.content, str):
            return [TextPart(type="text", text=self.content)]
        out: list[TextPart | ImagePart] = []
        for i, part in enumerate(self.content):
            kind = part.get("type")
            if kind == "text":
                out.append(TextPart.model_validate(part))
            elif kind == "image_url":
                out.append(ImagePart.model_validate(part))
            else:
                raise RequestError(
                    f"content part {i} has type {kind!r}; this model accepts 'text' and 'image_url'", "messages"
                )
        return out


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream_options: dict[str, Any] | None = None
    n: int = Field(default=1, ge=1, le=1)
    return_token_ids: bool = False  # vLLM's extension: the generated token ids beside the text


class RequestError(ValueError):
    """The client's request is wrong: answered 4xx in OpenAI's error format."""

    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status


class StageFailure(RuntimeError):
    """A stage failed or missed its deadline: answered 5xx naming the stage."""

    def __init__(self, stage: str, message: str, status: int = 502, retry: bool = False):
        super().__init__(f"{stage}: {message}")
        self.stage, self.detail, self.status, self.retry = stage, message, status, retry


def openai_error(message: str, status: int, param: str | None = None, kind: str | None = None) -> JSONResponse:
    kind = kind or ("invalid_request_error" if status < 500 else "server_error")
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return JSONResponse(body, status_code=status)


# ---- peers -------------------------------------------------------------------------------------------------


def read_hosts(path: str) -> dict[str, list[str]]:
    """Name -> addresses from a file in /etc/hosts format ("ADDRESS NAME..." lines, # comments)."""
    names: dict[str, list[str]] = {}
    try:
        text = Path(path).read_text()
    except OSError:
        return names
    for line in text.splitlines():
        address, *aliases = line.split("#", 1)[0].split() or [""]
        for name in aliases:
            names.setdefault(name, []).append(address)
    return names


@dataclass
class Peer:
    """A stage's replicas: the URL's host re-resolved to every address, each call to the least busy one.

    Names come from DNS (in a cluster, a headless Service lists its ready pods), or, for a name listed in the
    optional peer hosts file, from that file only: `mmgraph up` keeps one there, its local stand-in for cluster
    DNS, so adding or removing a local replica works the same way."""

    stage: str
    url: str
    addresses: list[str] = field(default_factory=list)
    outstanding: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        parts = urllib.parse.urlsplit(self.url)
        self.host, self.port, self.scheme = parts.hostname or "", parts.port or 80, parts.scheme
        self.from_file = False

    async def refresh(self, hosts: dict[str, list[str]] | None = None) -> None:
        """`hosts`: the peer hosts file's names, read once per round for every peer."""
        if hosts is not None:
            listed = hosts.get(self.host)
            if listed is not None or self.from_file:  # once listed, a name leaves only by leaving the file
                self.from_file, self.addresses = True, sorted(dict.fromkeys(listed or []))
                return
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        except socket.gaierror:
            return  # keep the last known addresses; a Service with no ready pods resolves to nothing
        addresses = sorted(dict.fromkeys(i[4][0] for i in infos))
        if addresses:
            self.addresses = addresses

    @contextlib.contextmanager
    def pick(self, avoid: Collection[str] = ()) -> Iterator[tuple[str, str]]:
        """(address, base URL) of the least busy replica not in `avoid`, counted as busy until the block ends."""
        choices = [a for a in self.addresses if a not in avoid]
        if not choices:
            reason = "no ready replica" if not avoid else f"no replica took the connection (tried {', '.join(avoid)})"
            raise StageFailure(self.stage, f"no address for {self.url} ({reason})", 503)
        address = min(choices, key=lambda a: self.outstanding.get(a, 0))
        self.outstanding[address] = self.outstanding.get(address, 0) + 1
        try:
            host = f"[{address}]" if ":" in address else address
            yield address, f"{self.scheme}://{host}:{self.port}"
        finally:
            self.outstanding[address] -= 1


# ---- the router ----------------------------------------------------------------------------------------------


class Router:
    def __init__(self, args: argparse.Namespace):
        from transformers import AutoTokenizer

        self.args = args
        self.policy = MediaPolicy.from_args(args)
        self.tokenizer = AutoTokenizer.from_pretrained(
            args.model, revision=args.revision, trust_remote_code=args.trust_remote_code
        )
        self.peers = {
            stage: Peer(stage, url)
            for stage, url in (("encoder", args.encoder_url), ("pd", args.pd_url), ("decode", args.decode_url))
            if url
        }
        timeout = httpx.Timeout(args.request_timeout_seconds, connect=30.0)
        self.http = httpx.AsyncClient(timeout=timeout, trust_env=False, limits=httpx.Limits(max_connections=256))
        self.pd_info: WorkerInfo | None = None
        self.hosts_file = os.environ.get(PEER_HOSTS_ENV)

    async def watch_peers(self) -> None:
        while True:
            hosts = read_hosts(self.hosts_file) if self.hosts_file else None
            await asyncio.gather(*(p.refresh(hosts) for p in self.peers.values()))
            if self.pd_info is None and self.peers["pd"].addresses:
                with (
                    contextlib.suppress(httpx.HTTPError, StageFailure, ValidationError),
                    self.peers["pd"].pick() as (_, base),
                ):
                    r = await self.http.get(f"{base}/v1/info", timeout=2)
                    if r.status_code == 200:
                        self.pd_info = WorkerInfo.model_validate(r.json())
            await asyncio.sleep(2.0 if self.pd_info else 0.5)

    # ---- checks and the prompt --------------------------------------------------------------------------------

    def prepare(self, req: ChatRequest) -> tuple[list[int], list[str], Sampling]:
        if req.model != self.args.served_model_name:
            raise RequestError(
                f"model {req.model!r} is not served here; this endpoint serves {self.args.served_model_name!r}",
                "model",
                404,
            )
        conversation, urls = [], []
        for message in req.messages:
            parts = []
            for part in message.parts():
                if isinstance(part, ImagePart):
                    if message.role != "user":
                        raise RequestError("images are accepted in user messages only", "messages")
                    url = part.image_url.url
                    try:
                        check_scheme(url, self.policy)
                        if scheme_of(url) == "data":
                            decode_data_url(url, self.policy)  # size and encoding, before any stage works
                    except MediaError as err:
                        raise RequestError(str(err), "messages", err.status) from None
                    urls.append(url)
                    parts.append({"type": "image"})
                else:
                    parts.append({"type": "text", "text": part.text})
            conversation.append({"role": message.role, "content": parts})
        if "image" not in self.policy.modalities and urls:
            raise RequestError("this graph does not accept images", "messages")
        if len(urls) > self.policy.max_items:
            raise RequestError(
                f"{len(urls)} images in one request, more than the {self.policy.max_items} allowed", "messages"
            )
        token_ids = self.tokenizer.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        max_len = self.pd_info.max_model_len if self.pd_info else None
        max_tokens = req.max_completion_tokens or req.max_tokens or 16
        if max_len is not None and len(token_ids) + max_tokens > max_len:
            raise RequestError(
                f"the prompt is {len(token_ids)} tokens and max_tokens is {max_tokens}: together more than the "
                f"model's {max_len} token context; lower max_tokens",
                "max_tokens",
            )
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        sampling = Sampling(
            max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, seed=req.seed, stop=stop
        )
        return list(token_ids), urls, sampling

    # ---- calls to stages ---------------------------------------------------------------------------------------

    async def encode(self, request_id: str, urls: list[str]) -> EncodeResponse:
        started = time.perf_counter()
        body = EncodeRequest(request_id=request_id, urls=urls).model_dump_json()
        avoid: set[str] = set()
        while True:
            with self._call("encoder", avoid) as base:
                r = await self.http.post(f"{base}/encode", content=body)
                break
        STAGE_SECONDS.labels("encoder").observe(time.perf_counter() - started)
        if r.status_code != 200:
            message = _error_text(r)
            if 400 <= r.status_code < 500:
                raise RequestError(message, "messages", r.status_code)
            raise StageFailure("encoder", message, 502)
        response = EncodeResponse.model_validate_json(r.content)
        CACHE_HITS.inc(sum(item.cached for item in response.items))
        return response

    async def stream_stage(self, stage: str, request: GenerateRequest) -> AsyncIterator[GenerateEvent]:
        started, avoid, body, sent = time.perf_counter(), set(), request.model_dump_json(), False
        while True:
            with self._call(stage, avoid) as base:
                async for event in self._stream(stage, base, body):
                    sent = True
                    yield event
                    if event.finish_reason is not None:
                        STAGE_SECONDS.labels(stage).observe(time.perf_counter() - started)
                        return
                raise StageFailure(stage, "the stream ended before the request finished (the stage died?)", 502)
            if sent:  # a refused connection after events came: never send the request a second time
                raise StageFailure(stage, "the connection was refused after the stream had begun", 502)

    @contextlib.contextmanager
    def _call(self, stage: str, avoid: set[str]) -> Iterator[str]:
        """Base URL of the least busy replica of `stage` not in `avoid`. A refused connection (the replica is gone
        and DNS has not caught up; nothing was sent) adds it to `avoid` and ends the block quietly, so the
        caller's loop tries the next; any other HTTP error becomes a StageFailure naming the stage."""
        with self.peers[stage].pick(avoid) as (address, base):
            try:
                yield base
            except httpx.ConnectError:
                avoid.add(address)
            except httpx.HTTPError as err:
                raise StageFailure(stage, f"{type(err).__name__} calling {base}: {err}", _status(err)) from None

    async def _stream(self, stage: str, base: str, body: str) -> AsyncIterator[GenerateEvent]:
        async with self.http.stream("POST", f"{base}/generate", content=body) as r:
            if r.status_code != 200:
                await r.aread()
                raise StageFailure(stage, _error_text(r), 502)
            async for line in r.aiter_lines():
                if line.strip():
                    event = GenerateEvent.model_validate_json(line)
                    if event.error:
                        if event.status and 400 <= event.status < 500:
                            raise RequestError(event.error, None, event.status)
                        raise StageFailure(stage, event.error, 502, retry=event.retry)
                    yield event

    async def prefill(
        self, request_id: str, urls: list[str], base: dict, encoded: list, prefill_only: bool = False
    ) -> AsyncIterator[GenerateEvent]:
        """pd's stream for embeddings from the encoder. If pd could not pull them (it did no work yet), encode
        again, on whichever encoder replica is least busy, and send once more."""
        for attempt in range(2):
            try:
                request = GenerateRequest(**base, encoded=encoded, prefill_only=prefill_only)
                async for event in self.stream_stage("pd", request):
                    yield event
                return
            except StageFailure as err:
                if not (err.retry and encoded) or attempt:
                    raise
                RETRIES.labels("pd").inc()
                log.warning("request %s: %s; encoding again", request_id, err)
                encoded[:] = (await self.encode(request_id, urls)).items

    async def run(self, request_id: str, token_ids: list[int], urls: list[str], sampling: Sampling):
        """The tokens of one request, as GenerateEvents from the last engine."""
        topology = self.args.topology
        base = {"request_id": request_id, "prompt_token_ids": token_ids, "sampling": sampling}
        if (topology == "agg" or not urls) and topology != "e-p-d":
            async for event in self.stream_stage("pd", GenerateRequest(**base, image_urls=urls)):
                yield event
            return
        encoded = (await self.encode(request_id, urls)).items if urls and topology != "agg" else []
        if topology == "e-pd":
            async for event in self.prefill(request_id, urls, base, encoded):
                yield event
            return
        # e-p-d: prefill on pd; decode must start, and pull the KV, within pd's lease (a late pull reads blocks
        # that may hold another request's KV). Either check failing, before any token, prefills again.
        for attempt in range(KV_ATTEMPTS):
            if attempt and encoded:
                encoded = (await self.encode(request_id, urls)).items  # pd released the first embeddings
            prefill, started = None, time.monotonic()
            async for event in self.prefill(request_id, urls, base, encoded, prefill_only=True):
                prefill = event
            assert prefill is not None and prefill.kv_transfer_params is not None, "pd returned no KV parameters"
            # pd's lease began when its prefill ended, after `started`: counting from `started` is conservative.
            lease_ends = started + self.args.kv_lease_seconds
            if time.monotonic() < lease_ends - self.args.transfer_timeout_seconds:
                placeholders = [
                    PlaceholderItem(
                        key=i.key, num_tokens=i.num_tokens, metadata=i.metadata, hidden_size=prefill.hidden_size or 0
                    )
                    for i in encoded
                ]
                deadline = max(0.0, lease_ends - KV_DEADLINE_MARGIN_SECONDS - time.monotonic())
                decode = GenerateRequest(
                    **base,
                    placeholders=placeholders,
                    kv_transfer_params=prefill.kv_transfer_params,
                    kv_deadline_seconds=deadline,
                )
                sent = False
                try:
                    async for event in self.stream_stage("decode", decode):
                        sent = True
                        yield event
                    return
                except StageFailure as err:
                    if sent or not err.retry:
                        raise
                    reason = err.detail
            else:
                reason = "the KV cache lease would expire before decode could start"
            KV_REPREFILLS.inc()
            log.warning("request %s: %s (attempt %d)", request_id, reason, attempt)
        raise StageFailure("decode", f"{reason}, {KV_ATTEMPTS} times; the graph is overloaded", 503)


def _status(err: httpx.HTTPError) -> int:
    return 504 if isinstance(err, httpx.TimeoutException) else 502


def _error_text(response: httpx.Response) -> str:
    try:
        body = response.json()
        return str(body.get("error") or body)
    except (json.JSONDecodeError, ValueError):
        return f"HTTP {response.status_code}: {response.text[:300]}"


# ---- HTTP ----------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    MediaPolicy.add_arguments(parser)
    parser.add_argument("--topology", choices=["agg", "e-pd", "e-p-d"], required=True)
    parser.add_argument("--encoder-url", default=None)
    parser.add_argument("--pd-url", required=True)
    parser.add_argument("--decode-url", default=None)
    parser.add_argument("--kv-lease-seconds", type=float, default=30)
    parser.add_argument("--request-timeout-seconds", type=float, default=120)
    parser.add_argument("--api-key-env", default=None, help="environment variable holding the API key")


def main(args: argparse.Namespace) -> None:
    router: Router | None = None
    api_key = os.environ.get(args.api_key_env, "") if args.api_key_env else ""
    if args.api_key_env and not api_key:
        raise SystemExit(f"--api-key-env {args.api_key_env} is set but the variable is empty")
    app = make_app("frontend", lambda: router is not None and router.pd_info is not None)

    @app.on_event("startup")
    async def load() -> None:
        nonlocal router
        router = await asyncio.to_thread(Router, args)
        app.state.watcher = asyncio.create_task(router.watch_peers())

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                return openai_error(
                    "missing or wrong API key (Authorization: Bearer <key>)", 401, kind="authentication_error"
                )
        return await call_next(request)

    @app.get("/v1/models")
    async def models() -> dict:
        return {
            "object": "list",
            "data": [{"id": args.served_model_name, "object": "model", "created": 0, "owned_by": "mmgraph"}],
        }

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        try:
            body = json.loads(await request.body())
        except json.JSONDecodeError as err:
            REQUESTS.labels("400").inc()
            return openai_error(f"the request body is not valid JSON: {err}", 400)
        try:
            req = ChatRequest.model_validate(body)
            assert router is not None, "not ready"
            token_ids, urls, sampling = router.prepare(req)
        except ValidationError as err:
            REQUESTS.labels("400").inc()
            first = err.errors(include_url=False)[0]
            where = ".".join(map(str, first["loc"]))
            return openai_error(f"{where}: {first['msg']}", 400, param=where)
        except RequestError as err:
            REQUESTS.labels(str(err.status)).inc()
            return openai_error(str(err), err.status, param=err.param)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        events = router.run(request_id, token_ids, urls, sampling)
        if req.stream:
            return StreamingResponse(_sse(request_id, req, events), media_type="text/event-stream")
        return await _complete(request_id, req, events)

    serve(app, args.host, args.port)


def _chunk(request_id: str, model: str, delta: dict, finish: str | None, usage: dict | None = None) -> bytes:
    body: dict[str, Any] = {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}] if usage is None else [],
    }
    if usage is not None:
        body["usage"] = usage
    return f"data: {json.dumps(body)}\n\n".encode()


async def _sse(request_id: str, req: ChatRequest, events: AsyncIterator[GenerateEvent]) -> AsyncIterator[bytes]:
    started, first = time.perf_counter(), True
    IN_FLIGHT.inc()
    try:
        yield _chunk(request_id, req.model, {"role": "assistant", "content": ""}, None)
        async for event in events:
            if first and (event.token_ids or event.text):
                TTFT.observe(time.perf_counter() - started)
                first = False
            if event.text or event.finish_reason:
                yield _chunk(request_id, req.model, {"content": event.text} if event.text else {}, event.finish_reason)
            if event.finish_reason and (req.stream_options or {}).get("include_usage"):
                yield _chunk(request_id, req.model, {}, None, _usage(event))
        REQUESTS.labels("200").inc()
    except (RequestError, StageFailure) as err:
        status = err.status
        REQUESTS.labels(str(status)).inc()
        if isinstance(err, StageFailure):
            ERRORS.labels(err.stage).inc()
        body = {
            "error": {
                "message": str(err),
                "type": "server_error" if status >= 500 else "invalid_request_error",
                "code": status,
            }
        }
        yield f"data: {json.dumps(body)}\n\n".encode()
    except Exception as err:  # a bug of ours: still a well-formed error for the client, and a log line
        log.exception("request %s failed", request_id)
        REQUESTS.labels("500").inc()
        body = {"error": {"message": f"frontend failed: {err}", "type": "server_error", "code": 500}}
        yield f"data: {json.dumps(body)}\n\n".encode()
    finally:
        IN_FLIGHT.dec()
    yield b"data: [DONE]\n\n"


async def _complete(request_id: str, req: ChatRequest, events: AsyncIterator[GenerateEvent]) -> JSONResponse:
    started, text, token_ids, last = time.perf_counter(), [], [], None
    IN_FLIGHT.inc()
    try:
        async for event in events:
            if not text and (event.token_ids or event.text):
                TTFT.observe(time.perf_counter() - started)
            text.append(event.text)
            token_ids += event.token_ids
            last = event
    except RequestError as err:
        REQUESTS.labels(str(err.status)).inc()
        return openai_error(str(err), err.status, param=err.param)
    except StageFailure as err:
        REQUESTS.labels(str(err.status)).inc()
        ERRORS.labels(err.stage).inc()
        return openai_error(str(err), err.status)
    except Exception as err:
        log.exception("request %s failed", request_id)
        REQUESTS.labels("500").inc()
        return openai_error(f"frontend failed: {err}", 500)
    finally:
        IN_FLIGHT.dec()
    REQUESTS.labels("200").inc()
    choice: dict[str, Any] = {
        "index": 0,
        "message": {"role": "assistant", "content": "".join(text)},
        "finish_reason": last.finish_reason if last else None,
    }
    if req.return_token_ids:
        choice["token_ids"] = token_ids
    return JSONResponse(
        {
            "id": request_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": req.model,
            "choices": [choice],
            "usage": _usage(last) if last else None,
        }
    )


def _usage(event: GenerateEvent) -> dict[str, int]:
    prompt, completion = event.prompt_tokens or 0, event.completion_tokens or 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
