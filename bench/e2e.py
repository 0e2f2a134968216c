"""End-to-end latency of the topologies on the tiny model, against one in-process vLLM engine.

For agg, e-pd and e-p-d (one graph of processes; the agg and e-pd frontends route to the same workers) and for
the baseline (vLLM's AsyncLLM embedded in this process, same prompt and image, no HTTP, no disaggregation), at a
few concurrency levels: time to first token (TTFT), inter-token latency (ITL) and requests/s. The disaggregation
tax is the TTFT difference to the baseline (p50). Two workloads: one 96x64 PNG per request, and one 2 s 160x96
H.264 clip per request (8 frames sampled; the baseline decodes it with mmgraph's loader inside the timed region,
as vLLM's server would decode it). Writes bench/out/e2e.json and e2e.png and prints the figures.

    .venv/bin/python bench/e2e.py [--requests 16] [--concurrency 1 4 8] [--video-concurrency 1 4]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import io
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "out"
MAX_TOKENS = 16
VIDEO_FRAMES = 8  # examples/tiny-e-p-d.yaml's spec.media.videoFrames


def image(seed: int) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(64, 96, 3) * 255).astype("uint8"))


def data_url(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@functools.cache
def video(seed: int) -> bytes:
    from mmgraph_workers.media.samples import clip

    return clip(seconds=2.0, seed=seed)


def messages(i: int, media: str) -> list[dict]:
    if media == "video":
        part = {
            "type": "video_url",
            "video_url": {"url": "data:video/mp4;base64," + base64.b64encode(video(i)).decode()},
        }
    else:
        part = {"type": "image_url", "image_url": {"url": data_url(image(i))}}
    return [{"role": "user", "content": [part, {"type": "text", "text": f"describe {media} {i}"}]}]


def summarize(samples: list[tuple[float, list[float]]], wall: float) -> dict:
    ttft = sorted(s[0] for s in samples)
    itl = sorted(x for s in samples for x in s[1])
    return {
        "ttft_p50_ms": 1000 * statistics.median(ttft),
        "ttft_p90_ms": 1000 * ttft[int(0.9 * (len(ttft) - 1))],
        "itl_p50_ms": 1000 * statistics.median(itl) if itl else None,
        "requests_per_s": len(samples) / wall,
    }


async def run_http(endpoint: str, model: str, n: int, concurrency: int, media: str) -> dict:
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=120) as client:

        async def one(i: int) -> tuple[float, list[float]]:
            async with sem:
                body = {
                    "model": model,
                    "messages": messages(i, media),
                    "max_tokens": MAX_TOKENS,
                    "temperature": 0,
                    "stream": True,
                }
                started, stamps = time.perf_counter(), []
                async with client.stream("POST", f"{endpoint}/v1/chat/completions", json=body) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data: {") and '"content": "' in line and '"content": ""' not in line:
                            stamps.append(time.perf_counter())
                return stamps[0] - started, [b - a for a, b in itertools.pairwise(stamps)]

        await one(0)  # warm-up
        t0 = time.perf_counter()
        samples = await asyncio.gather(*(one(i) for i in range(1, n + 1)))
        return summarize(list(samples), time.perf_counter() - t0)


async def run_in_process(model_dir: Path, n: int, levels: dict[str, list[int]]) -> dict[str, dict[str, dict]]:
    from mmgraph_workers import cpu
    from mmgraph_workers.media.policy import MediaPolicy
    from mmgraph_workers.media.video import decode_video
    from transformers import AutoTokenizer
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    cpu.apply_engine_env([])  # the same environment as the graph's CPU engines
    llm = AsyncLLM.from_engine_args(
        AsyncEngineArgs(
            model=str(model_dir),
            dtype="float32",
            enforce_eager=True,
            block_size=32,
            max_model_len=1024,
            kv_cache_memory_bytes=64 << 20,
            # the same executor as the graph's engines, or the baseline would pay for vLLM's worker process
            distributed_executor_backend="uni" if cpu.uses_uni_executor([]) else None,
            limit_mm_per_prompt={"image": 1, "video": 1},
        )
    )
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, output_kind=RequestOutputKind.DELTA)

    async def media_data(i: int, media: str) -> object:
        if media == "image":
            return image(i)
        loaded = await asyncio.to_thread(decode_video, video(i), MediaPolicy(), VIDEO_FRAMES)
        return (loaded.frames, loaded.metadata)

    results: dict[str, dict[str, dict]] = {}
    for i in range(n + 1):
        video(i)  # encoded once, here, not in a timed request
    try:
        for media, concurrencies in levels.items():
            conversation = [{"role": "user", "content": [{"type": media}, {"type": "text", "text": "describe"}]}]
            ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, return_dict=False)
            results[media] = {}
            for concurrency in concurrencies:

                async def one(i: int, sem: asyncio.Semaphore, media: str = media, ids: list = ids) -> tuple:
                    async with sem:
                        started, stamps = time.perf_counter(), []
                        prompt = {
                            "prompt_token_ids": list(ids),
                            "multi_modal_data": {media: await media_data(i, media)},
                        }
                        async for out in llm.generate(prompt, params, uuid.uuid4().hex):
                            if out.outputs[0].token_ids:
                                stamps.append(time.perf_counter())
                        return stamps[0] - started, [b - a for a, b in itertools.pairwise(stamps)]

                sem = asyncio.Semaphore(concurrency)
                await one(0, sem)
                t0 = time.perf_counter()
                samples = await asyncio.gather(*(one(i, sem) for i in range(1, n + 1)))
                results[media][str(concurrency)] = summarize(list(samples), time.perf_counter() - t0)
    finally:
        llm.shutdown()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--video-concurrency", type=int, nargs="+", default=[1, 4])
    args = parser.parse_args()
    levels = {"image": args.concurrency, "video": args.video_concurrency}
    OUT.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")

    from mmgraph_operator.api import StageName, parse
    from mmgraph_workers.ports import free_port
    from mmgraph_workers.tiny_model import build
    from mmgraph_workers.up import LocalGraph

    work = Path(tempfile.mkdtemp(prefix="mmgraph-e2e-"))
    model_dir = build(work / "tiny")
    print("baseline: one in-process engine ...", flush=True)
    baseline = asyncio.run(run_in_process(model_dir, args.requests, levels))

    body = yaml.safe_load((REPO / "examples" / "tiny-e-p-d.yaml").read_text())
    body["spec"]["model"]["path"] = str(model_dir)
    graph = LocalGraph(parse(body), logdir=work / "logs")
    extra = {}
    results = {media: {"in-process": rows} for media, rows in baseline.items()}
    try:
        graph.start()
        graph.wait_healthy(progress=lambda line: None)
        workers = {s: f"http://127.0.0.1:{graph.stages[s].port}" for s in (StageName.ENCODER, StageName.PD)}
        for topology in ("agg", "e-pd"):
            spec = dict(body, spec={**body["spec"], "topology": topology})
            local = LocalGraph(parse(spec), logdir=work / f"logs-{topology}")
            local.peer_token = graph.peer_token  # the same graph's credential: its workers refuse any other
            peers = {StageName.PD: workers[StageName.PD]}
            if topology == "e-pd":
                peers[StageName.ENCODER] = workers[StageName.ENCODER]
            local.spawn(StageName.FRONTEND, free_port(), peers)
            extra[topology] = local
        for local in extra.values():
            local.wait_healthy(progress=lambda line: None)
        endpoints = {"agg": extra["agg"].endpoint, "e-pd": extra["e-pd"].endpoint, "e-p-d": graph.endpoint}
        for media, concurrencies in levels.items():
            for topology, endpoint in endpoints.items():
                results[media][topology] = {}
                for concurrency in concurrencies:
                    name = body["spec"]["model"]["name"]
                    row = asyncio.run(run_http(endpoint, name, args.requests, concurrency, media))
                    results[media][topology][str(concurrency)] = row
    finally:
        for local in extra.values():
            local.stop()
        graph.stop()

    print(
        f"{'':6s} {'':10s} {'conc':>4s} {'TTFT p50':>9s} {'TTFT p90':>9s} {'ITL p50':>8s} {'req/s':>6s} {'tax p50':>8s}"
    )
    for media, by_who in results.items():
        for who, rows in by_who.items():
            for concurrency, row in rows.items():
                tax = row["ttft_p50_ms"] - by_who["in-process"][concurrency]["ttft_p50_ms"]
                row["tax_ttft_p50_ms"] = tax
                print(
                    f"{media:6s} {who:10s} {concurrency:>4s} {row['ttft_p50_ms']:7.1f}ms {row['ttft_p90_ms']:7.1f}ms "
                    f"{(row['itl_p50_ms'] or 0):6.1f}ms {row['requests_per_s']:6.1f} {tax:+7.1f}ms"
                )
    (OUT / "e2e.json").write_text(
        json.dumps({"benchmark": "e2e", "max_tokens": MAX_TOKENS, "results": results}, indent=2)
    )
    plot(results)
    print(f"wrote {OUT / 'e2e.json'} and {OUT / 'e2e.png'}")


def plot(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 2, figsize=(10, 4 * len(results)), squeeze=False)
    for (left, right), (media, by_who) in zip(axes, results.items(), strict=True):
        for who, rows in by_who.items():
            levels = [int(c) for c in rows]
            left.plot(levels, [r["ttft_p50_ms"] for r in rows.values()], "o-", label=who)
            right.plot(levels, [r["requests_per_s"] for r in rows.values()], "o-", label=who)
        left.set(xlabel="concurrent requests", ylabel="TTFT p50 (ms)", title=f"time to first token, one {media}")
        right.set(xlabel="concurrent requests", ylabel="requests / s", title=f"throughput, one {media}")
        for ax in (left, right):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT / "e2e.png", dpi=110)


if __name__ == "__main__":
    sys.exit(main())
