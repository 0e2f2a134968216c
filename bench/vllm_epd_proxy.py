"""The proxy vLLM's encoder disaggregation is driven with, as its disaggregated-encoder example documents it (that
example ships in vLLM's repository, not in its package): for each chat request, every media item goes to an
encoder instance (an `--ec-transfer-config` producer) as a one-item chat request with max_tokens 1, all at once;
with a prefill instance, the request then goes there with max_tokens 1 and `kv_transfer_params` asking for remote
decode; then the original request goes to the decode (or prefill+decode) instance, which finds each item's encoder
output by its hash, and its answer is relayed as it streams.

    python bench/vllm_epd_proxy.py --port P --encoder URL [--encoder URL ...] [--prefill URL] --decode URL

Written for bench/peers.py; this is the baseline, not part of mmgraph.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import uuid
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

MEDIA_PARTS = ("image_url", "audio_url", "input_audio", "video_url")
REMOTE_DECODE = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}


def build_app(encoders: list[str], prefill: str | None, decode: str) -> FastAPI:
    app = FastAPI()
    http = httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=512), trust_env=False)
    turns = itertools.count()

    async def encode(body: dict[str, Any], part: dict[str, Any], request_id: str) -> None:
        primer = {"model": body["model"], "messages": [{"role": "user", "content": [part]}], "max_tokens": 1}
        url = encoders[next(turns) % len(encoders)]
        r = await http.post(f"{url}/v1/chat/completions", json=primer, headers={"x-request-id": request_id})
        if r.status_code != 200:
            raise RuntimeError(f"encoder {url}: HTTP {r.status_code}: {r.text[:300]}")

    @app.get("/health")
    async def health() -> dict:
        return {}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        request_id = uuid.uuid4().hex
        parts = [
            part
            for message in body.get("messages", [])
            if isinstance(message.get("content"), list)
            for part in message["content"]
            if part.get("type") in MEDIA_PARTS
        ]
        try:
            await asyncio.gather(*(encode(body, part, f"{request_id}:{i}") for i, part in enumerate(parts)))
        except RuntimeError as err:
            return JSONResponse({"error": str(err)}, status_code=502)
        if prefill is not None:
            first = {**body, "max_tokens": 1, "stream": False, "kv_transfer_params": REMOTE_DECODE}
            first.pop("stream_options", None)
            r = await http.post(f"{prefill}/v1/chat/completions", json=first, headers={"x-request-id": request_id})
            if r.status_code != 200:
                return JSONResponse({"error": f"prefill: {r.text[:300]}"}, status_code=502)
            body = {**body, "kv_transfer_params": r.json().get("kv_transfer_params")}
        if not body.get("stream"):
            r = await http.post(f"{decode}/v1/chat/completions", json=body, headers={"x-request-id": request_id})
            return JSONResponse(r.json(), status_code=r.status_code)

        async def relay():
            headers = {"x-request-id": request_id}
            async with http.stream("POST", f"{decode}/v1/chat/completions", json=body, headers=headers) as r:
                async for chunk in r.aiter_raw():
                    yield chunk

        return StreamingResponse(relay(), media_type="text/event-stream")

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--encoder", action="append", required=True)
    parser.add_argument("--prefill", default=None)
    parser.add_argument("--decode", required=True)
    args = parser.parse_args()
    app = build_app(args.encoder, args.prefill, args.decode)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
