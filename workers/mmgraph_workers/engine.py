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

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
from prometheus_client import Counter, Gauge, Histogram

from mmgraph_contract.settings import EngineSettings
from mmgraph_contract.wire import PEER_KEEPALIVE_SECONDS, kv_side_channel_port
from mmgraph_workers.handoff import EmbeddingsReceiver
from mmgraph_workers.media import MediaError
from mmgraph_workers.media.fetch import fetch_all, media_client
from mmgraph_workers.media.load import load, vllm_item
from mmgraph_workers.media.video import DECODE_SECONDS
from mmgraph_workers.models import ItemShape, ModelAdapter, UnsupportedModel, adapter_for
from mmgraph_workers.peers import REFRESH_SECONDS, Peer, read_hosts
from mmgraph_workers.ports import bindable
from mmgraph_workers.protocol import (
    GenerateEvent,
    GenerateRequest,
    WorkerInfo,
    sampling_params,
)
from mmgraph_workers.server import (
    StageError,
    internal_error,
    peer_headers,
    peer_token,
)
from mmgraph_workers.transfer import make_transfer
from mmgraph_workers.vllm_args import engine_args

log = logging.getLogger("mmgraph.engine")
IN_FLIGHT = Gauge("mmgraph_engine_requests_in_flight", "Requests the engine is working on", ["stage"])
REQUESTS = Counter("mmgraph_engine_requests_total", "Generate requests", ["stage", "outcome"])
LATE_KV = Counter(
    "mmgraph_engine_kv_deadline_missed_total", "decode requests stopped because the KV came too late for pd's lease"
)
PULL_SECONDS = Histogram("mmgraph_engine_embedding_pull_seconds", "Time to pull a request's embeddings over NIXL")


class Engine:
    """The engine-facing core: turns a GenerateRequest into vLLM inputs and vLLM outputs into GenerateEvents."""

    def __init__(self, settings: EngineSettings, stage: str):
        self.settings, self.stage = settings, stage
        self.policy = settings.media
        self.llm: Any = None
        name = f"{stage}-{settings.transfer.advertise_host}-{settings.server.port}"
        backend = settings.transfer.transfer_backend
        self.transfer = make_transfer(backend, name, recv_pool_bytes=64 << 20) if stage == "pd" else None
        # the family turns embeddings and placeholders into vLLM's inputs (agg's pd needs none: vLLM loads pixels)
        takes_embeddings = settings.embeddings_input or stage == "decode"
        try:
            weights = settings.weights
            adapter: ModelAdapter | None = adapter_for(weights.model, weights.revision, weights.trust_remote_code)
        except UnsupportedModel:
            if takes_embeddings:
                raise
            adapter = None  # agg's pd serves a model of another family as vLLM does, pixels in
        self.adapter = adapter if takes_embeddings else None
        # pd loads the audio of requests that come with media (agg), at the rate and within the length the model's
        # feature extractor takes (the frontend admits audio only where the graph enables it)
        loads_audio = stage == "pd" and adapter is not None and "audio" in adapter.modalities
        self.audio_format = adapter.audio_format(adapter.load_processor()) if loads_audio else None
        self.token = peer_token(settings.server)
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
        self.encoders = Peer("encoder", settings.encoder_url) if settings.encoder_url else None
        self.pds = Peer("pd", settings.pd_url) if settings.pd_url else None
        self.in_flight = 0  # requests in this engine, from every caller
        self.handed_off = -float("inf")  # when pd last answered a prefill whose KV decode is yet to pull
        self.embeddings = (  # pd of e-pd and e-p-d: its end of the embeddings hand-off
            EmbeddingsReceiver(
                self.transfer,
                self.encoders,
                self.http,
                settings.transfer.transfer_timeout_seconds,
                settings.peer_hosts_file,
            )
            if self.transfer is not None
            else None
        )
        self.max_num_seqs = 1

    def info(self) -> WorkerInfo | None:
        """What /v1/info answers (None until the engine has loaded)."""
        if self.llm is None:
            return None
        from vllm import __version__ as vllm_version

        return WorkerInfo(
            stage=self.stage,
            model=self.settings.weights.model,
            served_model_name=self.settings.weights.served_model_name,
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

        if self.settings.kv_role:  # vLLM's NixlConnector reads its side channel from the environment
            transfer = self.settings.transfer
            host, port = transfer.advertise_host, kv_side_channel_port(transfer.transfer_port)
            if not bindable(port, host):  # vLLM's listener thread would die and the engine wait for it forever
                raise RuntimeError(f"the KV side channel's port {host}:{port} (--transfer-port + 1) is in use")
            os.environ["VLLM_NIXL_SIDE_CHANNEL_HOST"] = host
            os.environ["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(port)
        self.llm = AsyncLLM.from_engine_args(engine_args(self.settings, self.stage))
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
            if self.embeddings is None or self.adapter is None:
                raise MediaError("this stage does not accept embeddings")
            started = time.perf_counter()
            embeds = await self.embeddings.pull(req)
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

    async def watch_peers(self) -> None:
        """Resolve the replicas whose memory this stage reads (decode: pd's KV; pd: the encoders' embeddings) every
        REFRESH_SECONDS, not only when asked: a replica that leaves its Service (rolled, scaled down) keeps serving
        pulls for TRUST_SECONDS, so a stage that started meanwhile must have seen it to trust it."""
        hosts_file = self.settings.peer_hosts_file
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
        while not await self.pds.knows(host, self.settings.peer_hosts_file):
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


def _uuids(items: list[Any]) -> dict[str, list[str]]:
    """vLLM's `multi_modal_uuids`: each modality's content keys, in prompt order."""
    out: dict[str, list[str]] = {}
    for item in items:
        out.setdefault(item.modality, []).append(item.key)
    return out
