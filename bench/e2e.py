"""End-to-end latency of the topologies on the tiny model, against one in-process vLLM engine.

For agg, e-pd and e-p-d (one graph of processes; the agg and e-pd frontends route to the same workers) and for
the baseline (vLLM's AsyncLLM embedded in this process, same prompt and image, no HTTP, no disaggregation), at a
few concurrency levels: time to first token (TTFT), inter-token latency (ITL) and requests/s. The disaggregation
tax is the TTFT difference to the baseline (p50). Three workloads, each request with its own item: a 96x64 PNG
and a 2 s 160x96 H.264 clip (8 frames sampled) on the tiny Qwen2-VL graph, a 2 s 16 kHz WAV on the tiny
Qwen2-Audio graph. The baseline decodes each item from its bytes with mmgraph's loader inside the timed region,
as vLLM's server would decode it. Writes bench/out/e2e.json and e2e.png and prints the figures.

    .venv/bin/python bench/e2e.py [--requests 16] [--concurrency 1 4 8] [--media-concurrency 1 4]
        [--workloads image video audio]
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
# workload -> (example graph, tiny model family, mime type)
WORKLOADS = {
    "image": ("tiny-e-p-d.yaml", "qwen2-vl", "image/png"),
    "video": ("tiny-e-p-d.yaml", "qwen2-vl", "video/mp4"),
    "audio": ("tiny-qwen2-audio-e-p-d.yaml", "qwen2-audio", "audio/wav"),
}


@functools.cache
def item(media: str, seed: int) -> bytes:
    """The bytes of request `seed`'s item: every request has its own (no cache hit)."""
    from mmgraph_workers.media.samples import clip, tone

    if media == "video":
        return clip(seconds=2.0, seed=seed)
    if media == "audio":
        return tone(seconds=2.0, seed=seed)
    buf = io.BytesIO()
    Image.fromarray((np.random.RandomState(seed).rand(64, 96, 3) * 255).astype("uint8")).save(buf, format="PNG")
    return buf.getvalue()


def first_seed(concurrency: int) -> int:
    """Each level sends items of its own: a level after the first would otherwise hit the caches the first filled
    (the encoder's embeddings, the engines' prefix caches: a video's or a clip's prompt spans several blocks)."""
    return 1000 * concurrency


def messages(i: int, media: str) -> list[dict]:
    data = base64.b64encode(item(media, i)).decode()
    if media == "audio":
        part = {"type": "input_audio", "input_audio": {"data": data, "format": "wav"}}
    else:
        url = f"data:{WORKLOADS[media][2]};base64,{data}"
        part = {"type": f"{media}_url", f"{media}_url": {"url": url}}
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


def has_content(chunk: dict) -> bool:
    """A streamed chunk that carries text (vLLM's server writes its JSON without spaces, the frontend with)."""
    return any((choice.get("delta") or {}).get("content") for choice in chunk.get("choices") or [])


async def run_http(endpoint: str, model: str, n: int, concurrency: int, media: str, base: int | None = None) -> dict:
    """Streaming requests `base + 1 .. base + n` (after one warm-up request), `concurrency` at a time."""
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
                        if line.startswith("data: {") and has_content(json.loads(line[6:])):
                            stamps.append(time.perf_counter())
                first = stamps[0] if stamps else time.perf_counter()  # the answer was empty (EOS came first)
                return first - started, [b - a for a, b in itertools.pairwise(stamps)]

        base = first_seed(concurrency) if base is None else base
        await one(base)  # warm-up
        t0 = time.perf_counter()
        samples = await asyncio.gather(*(one(i) for i in range(base + 1, base + n + 1)))
        return summarize(list(samples), time.perf_counter() - t0)


async def run_in_process(model_dir: Path, n: int, levels: dict[str, list[int]]) -> dict[str, dict[str, dict]]:
    from transformers import AutoTokenizer
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    from mmgraph_contract.graph import MediaSpec
    from mmgraph_workers import cpu
    from mmgraph_workers.media.load import load, vllm_item
    from mmgraph_workers.models import adapter_for

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    family = adapter_for(str(model_dir))
    audio_format = family.audio_format(family.load_processor())
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
            limit_mm_per_prompt={modality: 1 for modality in family.modalities},
        )
    )
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, output_kind=RequestOutputKind.DELTA)
    policy = MediaSpec(modalities=list(family.modalities))

    def decoded(i: int, media: str) -> object:
        return vllm_item(load(media, item(media, i), policy, time.monotonic() + 30, audio_format))

    results: dict[str, dict[str, dict]] = {}
    try:
        for media, concurrencies in levels.items():
            for concurrency in concurrencies:
                for i in range(first_seed(concurrency), first_seed(concurrency) + n + 1):
                    item(media, i)  # made once, here, not in a timed request
            conversation = [{"role": "user", "content": [{"type": media}, {"type": "text", "text": "describe"}]}]
            ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, return_dict=False)
            results[media] = {}
            for concurrency in concurrencies:

                async def one(i: int, sem: asyncio.Semaphore, media: str = media, ids: list = ids) -> tuple:
                    async with sem:
                        started, stamps = time.perf_counter(), []
                        data = await asyncio.to_thread(decoded, i, media)
                        prompt = {"prompt_token_ids": list(ids), "multi_modal_data": {media: data}}
                        async for out in llm.generate(prompt, params, uuid.uuid4().hex):
                            if out.outputs[0].token_ids:
                                stamps.append(time.perf_counter())
                        return stamps[0] - started, [b - a for a, b in itertools.pairwise(stamps)]

                sem = asyncio.Semaphore(concurrency)
                base = first_seed(concurrency)
                await one(base, sem)
                t0 = time.perf_counter()
                samples = await asyncio.gather(*(one(i, sem) for i in range(base + 1, base + n + 1)))
                results[media][str(concurrency)] = summarize(list(samples), time.perf_counter() - t0)
    finally:
        llm.shutdown()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8], help="image levels")
    parser.add_argument("--media-concurrency", type=int, nargs="+", default=[1, 4], help="video and audio levels")
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    work = Path(tempfile.mkdtemp(prefix="mmgraph-e2e-"))
    results: dict[str, dict] = {}
    for example in dict.fromkeys(WORKLOADS[w][0] for w in args.workloads):
        workloads = [w for w in args.workloads if WORKLOADS[w][0] == example]
        levels = {w: args.concurrency if w == "image" else args.media_concurrency for w in workloads}
        results |= measure(example, WORKLOADS[workloads[0]][1], levels, args.requests, work)

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


def measure(example: str, family: str, levels: dict[str, list[int]], n: int, work: Path) -> dict[str, dict]:
    """The in-process baseline, then `example`'s graph (e-p-d, with an agg and an e-pd frontend routed to its
    workers), for each workload of `levels` at its concurrency levels."""
    from mmgraph_contract.graph import parse
    from mmgraph_contract.vocabulary import StageName
    from mmgraph_workers.ports import free_port
    from mmgraph_workers.tiny_model import build
    from mmgraph_workers.up import LocalGraph

    model_dir = build(work / family, family=family)
    print(f"{family}: baseline, one in-process engine ...", flush=True)
    results = {media: {"in-process": rows} for media, rows in asyncio.run(run_in_process(model_dir, n, levels)).items()}
    body = yaml.safe_load((REPO / "examples" / example).read_text())
    body["spec"]["model"]["path"] = str(model_dir)
    graph = LocalGraph(parse(body), logdir=work / f"logs-{family}")
    extra = {}
    try:
        print(f"{family}: the graph ...", flush=True)
        graph.start()
        graph.wait_healthy(progress=lambda line: None)
        workers = {s: f"http://127.0.0.1:{graph.stages[s].port}" for s in (StageName.ENCODER, StageName.PD)}
        for topology in ("agg", "e-pd"):
            spec = dict(body, spec={**body["spec"], "topology": topology})
            local = LocalGraph(parse(spec), logdir=work / f"logs-{family}-{topology}")
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
                    row = asyncio.run(run_http(endpoint, name, n, concurrency, media))
                    results[media][topology][str(concurrency)] = row
    finally:
        for local in extra.values():
            local.stop()
        graph.stop()
    return results


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
