"""pd could not pull a request's embeddings (the encoder that published them died after answering): pd says so
with `retry`, having done no work, and the frontend's router encodes again, on a live encoder, and sends pd the
request once more; the answer is the single engine's. The router and processor are the frontend's own code, run
in this process so the dead encoder's answer can be handed to pd at the moment wanted; pd and both encoders are
real processes."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
from prometheus_client import REGISTRY

from mmgraph_contract.flags import from_argv
from mmgraph_contract.graph import parse
from mmgraph_contract.settings import FrontendSettings
from mmgraph_contract.vocabulary import StageName
from mmgraph_contract.wire import PEER_TOKEN_ENV
from mmgraph_workers.frontend.openai_api import ChatRequest
from mmgraph_workers.frontend.processor import Processor
from mmgraph_workers.frontend.router import Media, Router
from mmgraph_workers.ports import free_port
from mmgraph_workers.protocol import EncodeRequest, EncodeResponse
from mmgraph_workers.server import peer_token
from mmgraph_workers.up import LocalGraph

from .conftest import CASES, MODEL_NAME, PEER, graph_spec


def test_embeddings_lost_with_their_encoder_are_encoded_again(graph, tiny_model, reference, tmp_path_factory):
    doomed = LocalGraph(parse(graph_spec(tiny_model)), logdir=tmp_path_factory.mktemp("doomed-encoder"))
    port = free_port()
    doomed.spawn(StageName.ENCODER, port, {})
    args = from_argv(
        FrontendSettings,
        [
            f"--model={tiny_model}",
            f"--served-model-name={MODEL_NAME}",
            "--port=0",
            "--topology=e-pd",
            f"--encoder-url=http://127.0.0.1:{graph.stages[StageName.ENCODER].port}",
            f"--pd-url=http://127.0.0.1:{graph.stages[StageName.PD].port}",
            "--allowed-schemes=https,http,data",
            f"--peer-token-env={PEER_TOKEN_ENV}",
        ],
    )
    body = {"model": MODEL_NAME, "temperature": 0, **CASES["one-image"]}
    token_ids, media, sampling = Processor(args.api()).prepare(ChatRequest.model_validate(body), body, None, {})
    try:
        doomed.wait_healthy(timeout=300, progress=lambda line: None)
        body = EncodeRequest(request_id=f"doomed-{time.monotonic_ns()}", media=media).model_dump_json()
        r = httpx.post(f"http://127.0.0.1:{port}/encode", content=body, headers=PEER, timeout=60)
        assert r.status_code == 200, r.text
        stale = EncodeResponse.model_validate_json(r.content).items
        encoder = doomed.stages[StageName.ENCODER]
        os.killpg(encoder.proc.pid, signal.SIGKILL)
        encoder.proc.wait(10)
    finally:
        doomed.stop()

    async def prefill() -> list[int]:
        router = Router(args.routes, peer_token(args.server), None)
        await router._refresh_peers()
        base = {"request_id": f"reencode-{time.monotonic_ns()}", "prompt_token_ids": token_ids, "sampling": sampling}
        try:
            return [t async for event in router.prefill(base, Media(media, stale)) for t in event.token_ids]
        finally:
            await router.http.aclose()

    def retries() -> float:
        return REGISTRY.get_sample_value("mmgraph_stage_retries_total", {"stage": "pd"}) or 0.0

    before = retries()
    assert asyncio.run(prefill()) == reference["one-image"]
    assert retries() == before + 1, "pd took embeddings from an encoder that was gone?"
