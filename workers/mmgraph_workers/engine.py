"""The vLLM stages, pd and decode: vLLM's AsyncLLM embedded in the worker, behind a small streaming /generate.

pd takes the prompt (token ids with ONE placeholder per image; vLLM expands it) and the images in one of two
forms: URLs it loads itself (agg) or embeddings it pulls from the encoder over NIXL (e-pd, e-p-d), which the
model family's adapter turns into vLLM's `multi_modal_data`. In e-p-d it only prefills (`prefill_only`): vLLM's
NixlConnector keeps the KV blocks for the lease and the response carries `kv_transfer_params`. decode receives
the same unexpanded prompt, placeholder embeddings of the right shape with the family's metadata (positions may
depend on it, e.g. Qwen's grid; the values are never computed) and those `kv_transfer_params`, pulls the KV over
NIXL and streams tokens. Every image is keyed in the prefix cache by its content key (content_key.py).

vLLM's own argument parser reads the engine arguments (`--engine-arg=--max-model-len=1024`), so every vLLM
option works as vLLM documents it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import torch
from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from mmgraph_operator.api import kv_side_channel_port
from prometheus_client import Counter, Gauge, Histogram

from mmgraph_workers import cpu
from mmgraph_workers.frontend.app import add_api, add_api_arguments, api_ready, is_api
from mmgraph_workers.frontend.router import Local
from mmgraph_workers.media import MediaError, policy
from mmgraph_workers.media.fetch import fetch_all, media_client
from mmgraph_workers.media.load import load, vllm_item
from mmgraph_workers.media.video import DECODE_SECONDS
from mmgraph_workers.models import ItemShape, ModelAdapter, UnsupportedModel, adapter_for
from mmgraph_workers.peers import REFRESH_SECONDS, Peer, read_hosts
from mmgraph_workers.ports import bindable
from mmgraph_workers.protocol import (
    EncodedItem,
    GenerateEvent,
    GenerateRequest,
    TensorRef,
    WorkerInfo,
    sampling_params,
)
from mmgraph_workers.server import (
    PEER_KEEPALIVE_SECONDS,
    Detached,
    add_common_arguments,
    add_kv_lease_argument,
    add_transfer_arguments,
    internal_error,
    make_app,
    peer_headers,
    peer_token,
    read_message,
    readers_wait_seconds,
    serve,
)
from mmgraph_workers.transfer import TransferError, make_transfer

log = logging.getLogger("mmgraph.engine")
IN_FLIGHT = Gauge("mmgraph_engine_requests_in_flight", "Requests the engine is working on", ["stage"])
REQUESTS = Counter("mmgraph_engine_requests_total", "Generate requests", ["stage", "outcome"])
LATE_KV = Counter(
    "mmgraph_engine_kv_deadline_missed_total", "decode requests stopped because the KV came too late for pd's lease"
)
PULL_SECONDS = Histogram("mmgraph_engine_embedding_pull_seconds", "Time to pull a request's embeddings over NIXL")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    add_transfer_arguments(parser)
    policy.add_arguments(parser)  # agg: the engine loads images itself
    parser.add_argument("--kv-role", choices=["producer", "consumer"], default=None)
    add_kv_lease_argument(parser)
    parser.add_argument("--embeddings-input", action="store_true", help="accept precomputed image embeddings")
    parser.add_argument("--engine-arg", action="append", default=[], help="a vLLM engine argument, e.g. --dtype=half")
    # the only addresses a message may send this stage to: pd pulls embeddings from the encoder's replicas, decode
    # pulls the KV cache from pd's
    parser.add_argument("--encoder-url", default=None, help="pd: the encoder Service (embeddings' owners)")
    parser.add_argument("--pd-url", default=None, help="decode: the pd Service (KV caches' owners)")
    parser.add_argument(
        "--peer-hosts-file", default=None, help="/etc/hosts-style file read before DNS (`mmgraph up`'s replicas)"
    )
    parser.add_argument(
        "--openai",
        action="store_true",
        help="agg's pd: serve the OpenAI API too, the frontend in this process (no hop to the engine)",
    )
    parser.add_argument("--api-max-request-bytes", type=int, default=None, help="--openai: a client's body limit")
    add_api_arguments(parser)


def api_args(args: argparse.Namespace) -> argparse.Namespace:
    """The frontend's flags for the API agg's pd serves: agg, routed over the pd replicas (this one reached
    without HTTP), no encoder, no decode."""
    if args.embeddings_input or args.kv_role:
        raise SystemExit("--openai is agg's: a pd that takes embeddings or hands its KV cache on has a frontend")
    return argparse.Namespace(
        **{
            **vars(args),
            "topology": "agg",
            "pd_url": args.pd_url or f"http://{args.advertise_host}:{args.port}",
            "encoder_url": None,
            "decode_url": None,
        }
    )


def user_engine_args(args: argparse.Namespace) -> tuple[list[str], dict[str, Any]]:
    """The user's engine arguments, and their --kv-transfer-config apart (it is merged into the graph's)."""
    user_args, user_kv = [], {}
    for arg in args.engine_arg:
        if arg.startswith("--kv-transfer-config="):
            user_kv = json.loads(arg.split("=", 1)[1])
        else:
            user_args.append(arg)
    return user_args, user_kv


def engine_args(args: argparse.Namespace, stage: str) -> Any:
    """AsyncEngineArgs from vLLM's own parser, plus what the graph decides (model, KV connector, embeddings).
    Pure: what the engine needs in its environment is set by `main`."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    user_args, user_kv = user_engine_args(args)
    argv = ["--model", args.model, "--served-model-name", args.served_model_name, *user_args]
    if args.revision:
        argv += ["--revision", args.revision]
    if args.trust_remote_code:
        argv.append("--trust-remote-code")
    if args.embeddings_input or stage == "decode":
        argv.append("--enable-mm-embeds")
    if args.kv_role:
        config = {
            "kv_connector": "NixlConnector",
            "kv_role": f"kv_{args.kv_role}",
            "kv_connector_extra_config": {"kv_lease_duration": args.kv_lease_seconds},
        }
        if not torch.cuda.is_available():
            config["kv_buffer_device"] = "cpu"
        # the user's settings (e.g. NIXL backends) under the graph's: connector, role and lease are the graph's,
        # since the frontend times decode's pull by the graph's lease
        extra = {**user_kv.get("kv_connector_extra_config", {}), **config["kv_connector_extra_config"]}
        config = {**user_kv, **config, "kv_connector_extra_config": extra}
        argv += ["--kv-transfer-config", json.dumps(config)]
    argv += cpu.engine_executor_args(user_args)
    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
    return AsyncEngineArgs.from_cli_args(parser.parse_args(argv))


EXPIRY_MARGIN_SECONDS = 2.0  # of a descriptor's time-to-live, for the time it spent on its way here


def pull_deadline(items: list[EncodedItem], received: float, timeout_seconds: float) -> float:
    """When pd must have pulled all of a request's embeddings (`time.monotonic()`'s clock): within the transfer
    timeout for all items together, and a margin before the first of them expires at its owner (counted from
    `received`: the owner's seconds, never its clock). A read after that could meet a freed buffer; the frame
    check would refuse it, but pd need not try."""
    expiries = [i.embeddings.expires_in_seconds for i in items if i.embeddings.expires_in_seconds is not None]
    return received + min([timeout_seconds, *(left - EXPIRY_MARGIN_SECONDS for left in expiries)])


class Engine:
    """The engine-facing core: turns a GenerateRequest into vLLM inputs and vLLM outputs into GenerateEvents."""

    def __init__(self, args: argparse.Namespace, stage: str):
        self.args, self.stage = args, stage
        self.policy = policy.from_args(args)
        self.llm: Any = None
        name = f"{stage}-{args.advertise_host}-{args.port}"
        self.transfer = make_transfer(args.transfer_backend, name, recv_pool_bytes=64 << 20) if stage == "pd" else None
        # the family turns embeddings and placeholders into vLLM's inputs (agg's pd needs none: vLLM loads pixels)
        takes_embeddings = args.embeddings_input or stage == "decode"
        try:
            adapter: ModelAdapter | None = adapter_for(args.model, args.revision, args.trust_remote_code)
        except UnsupportedModel:
            if takes_embeddings:
                raise
            adapter = None  # agg's pd serves a model of another family as vLLM does, pixels in
        self.adapter = adapter if takes_embeddings else None
        # pd loads the audio of requests that come with media (agg), at the rate and within the length the model's
        # feature extractor takes (the frontend admits audio only where the graph enables it)
        loads_audio = stage == "pd" and adapter is not None and "audio" in adapter.modalities
        self.audio_format = adapter.audio_format(adapter.load_processor()) if loads_audio else None
        self.token = peer_token(args)
        self.http = httpx.AsyncClient(  # to peers
            trust_env=False,
            timeout=5,
            headers=peer_headers(self.token),
            limits=httpx.Limits(
                max_connections=100, max_keepalive_connections=20, keepalive_expiry=PEER_KEEPALIVE_SECONDS
            ),
        )
        self.media = media_client()  # agg: the request's URLs
        self.hidden_size: int | None = None
        self.max_model_len: int | None = None
        self.encoders = Peer("encoder", args.encoder_url) if args.encoder_url else None
        self.pds = Peer("pd", args.pd_url) if args.pd_url else None
        self.in_flight = 0  # requests in this engine, from every caller
        self.handed_off = -float("inf")  # when pd last answered a prefill whose KV decode is yet to pull
        self.releasing = Detached()  # releases of a cancelled request's embeddings
        self.max_num_seqs = 1

    def info(self) -> WorkerInfo | None:
        """What /v1/info answers (None until the engine has loaded)."""
        if self.llm is None:
            return None
        from vllm import __version__ as vllm_version

        return WorkerInfo(
            stage=self.stage,
            model=self.args.model,
            served_model_name=self.args.served_model_name,
            max_model_len=self.max_model_len,
            hidden_size=self.hidden_size,
            default_sampling=self.llm.model_config.get_diff_sampling_param(),
            vllm_version=vllm_version,
        )

    def saturated(self) -> bool:
        """Every sequence slot of the engine is taken: another request would queue here."""
        return self.in_flight >= self.max_num_seqs

    async def start(self) -> None:
        from vllm.v1.engine.async_llm import AsyncLLM

        if self.args.kv_role:  # vLLM's NixlConnector reads its side channel from the environment
            host, port = self.args.advertise_host, kv_side_channel_port(self.args.transfer_port)
            if not bindable(port, host):  # vLLM's listener thread would die and the engine wait for it forever
                raise RuntimeError(f"the KV side channel's port {host}:{port} (--transfer-port + 1) is in use")
            os.environ["VLLM_NIXL_SIDE_CHANNEL_HOST"] = host
            os.environ["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(port)
        self.llm = AsyncLLM.from_engine_args(engine_args(self.args, self.stage))
        config = self.llm.model_config
        self.max_model_len = config.max_model_len
        self.hidden_size = config.get_hidden_size()
        self.max_num_seqs = self.llm.vllm_config.scheduler_config.max_num_seqs

    async def _media(self, req: GenerateRequest) -> tuple[Any, dict[str, list[str]] | None]:
        """vLLM's `multi_modal_data` for the request's media, and their `multi_modal_uuids`: the content keys
        (content_key.py) of embeddings and placeholders, so this engine's prefix cache keys each item by what
        it is, never by placeholder values; with media it loads itself (agg) vLLM hashes the pixels."""
        if req.media:
            blobs = await fetch_all([m.url for m in req.media], self.policy, self.media)
            deadline = time.monotonic() + DECODE_SECONDS  # one for all of the request's videos
            loaded = await asyncio.to_thread(
                lambda: [self._load(m.modality, b, deadline) for m, b in zip(req.media, blobs, strict=True)]
            )
            data: dict[str, list[Any]] = {}
            for m, item in zip(req.media, loaded, strict=True):
                data.setdefault(m.modality, []).append(item)
            return {modality: items if len(items) > 1 else items[0] for modality, items in data.items()}, None
        if req.encoded:
            if self.transfer is None or self.adapter is None:
                raise MediaError("this stage does not accept embeddings")
            started = time.perf_counter()
            embeds = await self._pull(req)
            PULL_SECONDS.observe(time.perf_counter() - started)
            shapes = [ItemShape(item.num_tokens, item.metadata, item.modality) for item in req.encoded]
            return self.adapter.embeddings_data(embeds, shapes), _uuids(req.encoded)
        if req.placeholders:
            if self.adapter is None:
                raise MediaError("this stage does not accept placeholders (it is not a decode stage)")
            shapes = [ItemShape(p.num_tokens, p.metadata, p.modality) for p in req.placeholders]
            mm = self.adapter.placeholder_data(shapes, req.placeholders[0].hidden_size, self.llm.model_config.dtype)
            return mm, _uuids(req.placeholders)
        return None, None

    def _load(self, modality: str, blob: bytes, deadline: float) -> Any:
        """An image as vLLM takes it (PIL), a video as (frames, metadata), a clip as (samples, rate): what our
        loader decoded, as the encoder would have encoded it (a clip at the model's rate: vLLM resamples nothing)."""
        return vllm_item(load(modality, blob, self.policy, deadline, self.audio_format))

    async def _owner(self, ref: TensorRef) -> str:
        """The base URL of the encoder replica that owns `ref`: its address must be one the graph's encoder Service
        resolves to, so a message cannot send pd (or its NIXL agent) anywhere else."""
        owner = await self.encoders.own(ref.owner, self.args.peer_hosts_file) if self.encoders else None
        if owner is None:
            raise StageError("embeddings owned by an address that is not one of this graph's encoders", 403)
        return owner

    async def _agent_metadata(self, ref: TensorRef) -> str | None:
        """The owning agent's NIXL metadata, asked of the owner itself; None when already connected to it."""
        base = await self._owner(ref)
        if self.transfer is None or self.transfer.connected(ref.agent):
            return None
        try:
            r = await self.http.get(f"{base}/v1/transfer/agent")
            r.raise_for_status()
            agent = r.json()
        except (httpx.HTTPError, ValueError) as err:
            raise TransferError(f"asking {ref.agent} for its metadata: {type(err).__name__}: {err}") from err
        if agent.get("agent") != ref.agent:  # the owner restarted: the embeddings are gone with the old agent
            raise TransferError(f"{ref.agent} is gone (its address now runs {agent.get('agent')})")
        return agent["metadata"]

    async def _pull(self, req: GenerateRequest) -> list[Any]:
        """The request's embeddings from their encoders, all by one deadline (`pull_deadline`). What was not
        pulled is released at its owner: at once when a pull failed, in the background when the request was
        cancelled (its client left), so nothing waits out its time-to-live for nobody."""
        deadline = pull_deadline(req.encoded, time.monotonic(), self.args.transfer_timeout_seconds)
        embeds: list[Any] = []
        unread = 0  # the items from here on were never asked for (a read in a thread finishes on its own)
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                for item in req.encoded:
                    metadata = await self._agent_metadata(item.embeddings)
                    unread += 1
                    embeds.append(await asyncio.to_thread(self.transfer.fetch, item.embeddings, deadline, metadata))
        except (TransferError, TimeoutError) as err:
            await self._release(req.encoded)
            log.warning("request %s: %s", req.request_id, str(err) or "the embeddings' pull deadline passed")
            raise StageError("pulling embeddings from the encoder failed", 502, retry=True) from err
        except asyncio.CancelledError:
            self.releasing.start(self._release(req.encoded[unread:]))
            raise
        return embeds

    async def _release(self, items: list[EncodedItem]) -> None:
        for item in items:
            try:
                await self.http.post(f"{await self._owner(item.embeddings)}/release/{item.embeddings.handle}")
            except (httpx.HTTPError, StageError):
                pass  # its time-to-live frees it

    async def watch_peers(self) -> None:
        """Resolve the replicas whose memory this stage reads (decode: pd's KV; pd: the encoders' embeddings) every
        REFRESH_SECONDS, not only when asked: a replica that leaves its Service (rolled, scaled down) keeps serving
        pulls for TRUST_SECONDS, so a stage that started meanwhile must have seen it to trust it."""
        hosts_file = self.args.peer_hosts_file
        while True:
            for peer in (p for p in (self.pds, self.encoders) if p is not None):
                with contextlib.suppress(Exception):  # a resolver hiccup: the next round
                    await peer.refresh(read_hosts(hosts_file) if hosts_file else None)
            await asyncio.sleep(REFRESH_SECONDS)

    async def _check_kv_owner(self, params: dict[str, Any]) -> None:
        """decode pulls the KV cache from the host the message names: it must be one of the graph's pd replicas.
        A replica that just became ready may be in the frontend's list a moment before it is in ours (each
        resolves on its own clock): an unknown host is looked up again for a few seconds before it is refused."""
        host = str(params.get("remote_host", ""))
        refusal = StageError("kv_transfer_params name a host that is not one of this graph's pd replicas", 403)
        if self.pds is None:
            raise refusal
        deadline = time.monotonic() + 2 * REFRESH_SECONDS
        while not await self.pds.knows(host, self.args.peer_hosts_file):
            if time.monotonic() >= deadline:
                log.warning("kv_transfer_params name %s; pd's replicas: %s", host, self.pds.addresses)
                raise refusal
            await asyncio.sleep(0.5)

    async def generate(self, req: GenerateRequest) -> AsyncIterator[GenerateEvent]:
        from vllm.sampling_params import RequestOutputKind

        mm, uuids = await self._media(req)
        prompt: dict[str, Any] = {"prompt_token_ids": req.prompt_token_ids}
        if mm is not None:
            prompt["multi_modal_data"] = mm
        if uuids is not None:
            prompt["multi_modal_uuids"] = uuids
        params = sampling_params(req.sampling)  # vLLM's own checks, again: a message is a peer's claim
        params.output_kind = RequestOutputKind.DELTA  # this stage streams its tokens to the frontend
        if req.prefill_only:  # pd of e-p-d: the KV cache for decode, whose first token is its own
            params.max_tokens, params.min_tokens, params.n = 1, 0, 1
            params.structured_outputs = None  # no grammar to compile for a token nobody sees
            params.extra_args = {**(params.extra_args or {}), "kv_transfer_params": {"do_remote_decode": True}}
        elif req.kv_transfer_params is not None:
            params.extra_args = {**(params.extra_args or {}), "kv_transfer_params": req.kv_transfer_params}
        completion, first, finished = 0, req.return_prompt_token_ids, False
        try:
            async with asyncio.timeout(req.kv_deadline_seconds) as lease:  # the owner check is inside the lease
                if req.kv_transfer_params is not None:
                    await self._check_kv_owner(req.kv_transfer_params)
                async for out in self.llm.generate(prompt, params, req.request_id):
                    lease.reschedule(None)  # the KV was pulled in time: no deadline for the rest
                    for k, piece in enumerate(out.outputs):  # one per choice with news (n > 1: several)
                        completion += len(piece.token_ids)
                        last = out.finished and k == len(out.outputs) - 1  # usage, once, for all choices
                        finished = last  # a caller that stops at the last event leaves nothing to abort
                        if piece.finish_reason == "error":  # vLLM's retryable request failure (a KV load)
                            raise StageError(
                                f"{self.stage}'s engine failed the request (vLLM: e.g. the KV cache could not be "
                                "loaded); nothing of it was kept",
                                503,
                                retry=True,
                            )
                        if last and req.prefill_only:
                            self.handed_off = time.monotonic()
                        yield GenerateEvent(
                            index=piece.index,
                            final=last,
                            prompt_token_ids=list(out.prompt_token_ids or []) if first else None,
                            token_ids=list(piece.token_ids) if not req.prefill_only else [],
                            text=piece.text if not req.prefill_only else "",
                            finish_reason=piece.finish_reason,
                            prompt_tokens=len(out.prompt_token_ids or []) if last else None,
                            completion_tokens=completion if last else None,
                            kv_transfer_params=out.kv_transfer_params if last else None,
                            hidden_size=self.hidden_size,
                            logprobs=_logprobs(piece.logprobs) if piece.logprobs is not None else None,
                        )
                        first = False
        except (asyncio.CancelledError, GeneratorExit):  # the caller left: stop computing for nobody
            if not finished:
                await self.llm.abort(req.request_id)
            raise
        except TimeoutError:  # no token before the deadline: whatever KV it pulls now may be another request's
            if not lease.expired():
                raise
            await self.llm.abort(req.request_id)
            LATE_KV.inc()
            raise StageError(
                f"the KV cache was not pulled within {req.kv_deadline_seconds:.1f} s, before pd's lease could end; "
                "the request was stopped before its first token",
                503,
                retry=True,
            ) from None

    async def events(self, req: GenerateRequest) -> AsyncIterator[GenerateEvent]:
        """What /generate streams for `req`: its events, and a failure as a last event that says whose it is
        (the client's 4xx, or this stage's). agg's pd, serving the API itself, reads these without HTTP."""
        stage = self.stage
        IN_FLIGHT.labels(stage).inc()
        self.in_flight += 1
        outcome, finished = "ok", False
        try:
            async with contextlib.aclosing(self.generate(req)) as generated:  # closing us closes it
                async for event in generated:
                    finished = event.final
                    yield event
        except (asyncio.CancelledError, GeneratorExit):  # the caller hung up: generate() aborted the request
            outcome = "ok" if finished else "cancelled"  # (or stopped reading at the last event: in process)
            raise
        except MediaError as err:
            outcome = "bad_request"
            yield GenerateEvent(error=str(err), status=err.status)
        except StageError as err:
            outcome = "error"
            yield GenerateEvent(error=str(err), status=err.status, retry=err.retry)
        except Exception as err:
            if (refusal := _refusal(err)) is not None:  # vLLM refuses the input (too long, an image it cannot tile)
                outcome = "bad_request"
                yield GenerateEvent(error=refusal, status=400)
                return
            outcome = "error"  # a bug of ours: its text stays in our log, the caller gets the request id
            log.exception("%s failed on request %s", stage, req.request_id)
            yield GenerateEvent(error=internal_error(stage, req.request_id), status=500)
        finally:
            IN_FLIGHT.labels(stage).dec()
            self.in_flight -= 1
            REQUESTS.labels(stage, outcome).inc()


def _logprobs(steps: Any) -> list[list[tuple[int, float, int | None, str | None]]]:
    """vLLM's logprobs of each new position (a list or FlatLogprobs of {token id: Logprob}), order kept; clamped
    at -9999 as vLLM's server does (JSON has no -inf)."""
    return [
        [(token_id, max(p.logprob, -9999.0), p.rank, p.decoded_token) for token_id, p in steps[i].items()]
        for i in range(len(steps))
    ]


def _refusal(err: BaseException) -> str | None:
    """The message to answer 400 with when vLLM refused the request's input, else None. vLLM refuses input with a
    ValueError or its own VLLMClientError, which 0.32 wraps in an EngineGenerateError with no message of its own
    (its cause may wrap another: the innermost says what is wrong). A pydantic ValidationError is never the
    client's here."""
    from pydantic import ValidationError
    from vllm.exceptions import VLLMClientError
    from vllm.v1.engine.exceptions import EngineGenerateError

    refusals = (ValueError, VLLMClientError)  # VLLMValidationError (a token id out of vocabulary) is not a ValueError
    cause = err.__cause__ if isinstance(err, EngineGenerateError) else err
    if not isinstance(cause, refusals) or isinstance(cause, ValidationError):
        return None
    while isinstance(cause.__cause__, refusals):
        cause = cause.__cause__
    log.warning("input refused by vLLM: %s", cause)
    return str(cause)


async def watch(engine: Engine, stage: str) -> None:
    """A dead engine must not look healthy: /health fails at once (it asks the engine), and the worker stops,
    so its pod leaves the Service and is restarted, and `mmgraph up` names it, as vLLM's own server does."""
    while not engine.llm.errored:
        await asyncio.sleep(1.0)
    log.error("%s: the vLLM engine died; stopping this worker so that it is restarted", stage)
    os.kill(os.getpid(), signal.SIGTERM)


class StageError(RuntimeError):
    def __init__(self, message: str, status: int = 500, retry: bool = False):
        super().__init__(message)
        self.status, self.retry = status, retry


def main(args: argparse.Namespace, stage: str) -> None:
    cpu.apply_engine_env(user_engine_args(args)[0])
    openai = args.openai and stage == "pd"
    engine = Engine(args, stage)
    alive = lambda: engine.llm is not None and not engine.llm.errored  # noqa: E731
    app = make_app(
        stage,
        lambda: alive() and (not openai or api_ready(app)),
        args.max_request_bytes,
        engine.token,
        public=is_api if openai else None,
        public_body_bytes=args.api_max_request_bytes,
    )

    @app.on_event("startup")
    async def load() -> None:
        app.state.peers = asyncio.create_task(engine.watch_peers())  # from the start: while the engine loads too
        await engine.start()
        app.state.watchdog = asyncio.create_task(watch(engine, stage))
        log.info("%s ready: %s (max_model_len %s)", stage, args.model, engine.max_model_len)

    @app.on_event("shutdown")
    async def stop() -> None:
        """After the drain: pd stays until decode has had time to pull the KV of its last prefills (a pull's
        deadline after the last one, within the grace period), then the engine and NIXL stop."""
        app.state.peers.cancel()
        wait = readers_wait_seconds(args.transfer_timeout_seconds, args.drain_seconds)
        if (left := engine.handed_off + wait - time.monotonic()) > 0:
            log.info("%s: waiting %.1f s for decode to pull the KV of its last prefills", stage, left)
            await asyncio.sleep(left)
        if engine.llm is not None:
            engine.llm.shutdown()
        if engine.transfer is not None:
            engine.transfer.close()

    @app.get("/v1/info", response_model=None)
    async def info() -> WorkerInfo | JSONResponse:
        return engine.info() or JSONResponse({"error": "the engine is loading", "status": 503}, status_code=503)

    @app.post("/generate")
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
        add_api(app, api_args(args), Local(args.advertise_host, engine.events, engine.info, engine.saturated))
    serve(app, args)


def _uuids(items: list[Any]) -> dict[str, list[str]]:
    """vLLM's `multi_modal_uuids`: each modality's content keys, in prompt order."""
    out: dict[str, list[str]] = {}
    for item in items:
        out.setdefault(item.modality, []).append(item.key)
    return out
