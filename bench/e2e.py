"""End-to-end latency of the topologies on the tiny model, against one in-process vLLM engine.

For agg, e-pd and e-p-d (one graph of processes; the agg and e-pd frontends route to the same workers) and for
the baseline (vLLM's AsyncLLM embedded in this process, same prompt and image, no HTTP, no disaggregation), at a
few concurrency levels: time to first token (TTFT), inter-token latency (ITL) and requests/s. The disaggregation
tax is the TTFT difference to the baseline (p50). Writes bench/out/e2e.json and e2e.png and prints the figures.

    .venv/bin/python bench/e2e.py [--requests 16] [--concurrency 1 4 8]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
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


def image(seed: int) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(64, 96, 3) * 255).astype("uint8"))


def data_url(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def messages(i: int) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": data_url(image(i))}},
                {"type": "text", "text": f"describe image {i}"},
            ],
        }
    ]


def summarize(samples: list[tuple[float, list[float]]], wall: float) -> dict:
    ttft = sorted(s[0] for s in samples)
    itl = sorted(x for s in samples for x in s[1])
    return {
        "ttft_p50_ms": 1000 * statistics.median(ttft),
        "ttft_p90_ms": 1000 * ttft[int(0.9 * (len(ttft) - 1))],
        "itl_p50_ms": 1000 * statistics.median(itl) if itl else None,
        "requests_per_s": len(samples) / wall,
    }


async def run_http(endpoint: str, model: str, n: int, concurrency: int) -> dict:
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=120) as client:

        async def one(i: int) -> tuple[float, list[float]]:
            async with sem:
                body = {
                    "model": model,
                    "messages": messages(i),
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


async def run_in_process(model_dir: Path, n: int, levels: list[int]) -> dict[int, dict]:
    from mmgraph_workers import cpu
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
        )
    )
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe image"}]}]
    ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=False)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, output_kind=RequestOutputKind.DELTA)
    results = {}
    try:
        for concurrency in levels:

            async def one(i: int, sem: asyncio.Semaphore) -> tuple[float, list[float]]:
                async with sem:
                    started, stamps = time.perf_counter(), []
                    prompt = {"prompt_token_ids": list(ids), "multi_modal_data": {"image": image(i)}}
                    async for out in llm.generate(prompt, params, uuid.uuid4().hex):
                        if out.outputs[0].token_ids:
                            stamps.append(time.perf_counter())
                    return stamps[0] - started, [b - a for a, b in itertools.pairwise(stamps)]

            sem = asyncio.Semaphore(concurrency)
            await one(0, sem)
            t0 = time.perf_counter()
            samples = await asyncio.gather(*(one(i, sem) for i in range(1, n + 1)))
            results[concurrency] = summarize(list(samples), time.perf_counter() - t0)
    finally:
        llm.shutdown()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")

    from mmgraph_operator.api import StageName, parse
    from mmgraph_workers.ports import free_port
    from mmgraph_workers.tiny_model import build
    from mmgraph_workers.up import LocalGraph

    work = Path(tempfile.mkdtemp(prefix="mmgraph-e2e-"))
    model_dir = build(work / "tiny")
    print("baseline: one in-process engine ...", flush=True)
    baseline = asyncio.run(run_in_process(model_dir, args.requests, args.concurrency))

    body = yaml.safe_load((REPO / "examples" / "tiny-e-p-d.yaml").read_text())
    body["spec"]["model"]["path"] = str(model_dir)
    graph = LocalGraph(parse(body), logdir=work / "logs")
    extra = {}
    results: dict[str, dict] = {"in-process": {str(c): r for c, r in baseline.items()}}
    try:
        graph.start()
        graph.wait_healthy(progress=lambda line: None)
        workers = {s: f"http://127.0.0.1:{graph.stages[s].port}" for s in (StageName.ENCODER, StageName.PD)}
        for topology in ("agg", "e-pd"):
            spec = dict(body, spec={**body["spec"], "topology": topology})
            local = LocalGraph(parse(spec), logdir=work / f"logs-{topology}")
            peers = {StageName.PD: workers[StageName.PD]}
            if topology == "e-pd":
                peers[StageName.ENCODER] = workers[StageName.ENCODER]
            local.spawn(StageName.FRONTEND, free_port(), peers)
            extra[topology] = local
        for local in extra.values():
            local.wait_healthy(progress=lambda line: None)
        endpoints = {"agg": extra["agg"].endpoint, "e-pd": extra["e-pd"].endpoint, "e-p-d": graph.endpoint}
        for topology, endpoint in endpoints.items():
            results[topology] = {}
            for concurrency in args.concurrency:
                row = asyncio.run(run_http(endpoint, body["spec"]["model"]["name"], args.requests, concurrency))
                results[topology][str(concurrency)] = row
    finally:
        for local in extra.values():
            local.stop()
        graph.stop()

    print(f"{'':10s} {'conc':>4s} {'TTFT p50':>9s} {'TTFT p90':>9s} {'ITL p50':>8s} {'req/s':>6s} {'tax p50':>8s}")
    for who, rows in results.items():
        for concurrency, row in rows.items():
            tax = row["ttft_p50_ms"] - results["in-process"][concurrency]["ttft_p50_ms"]
            row["tax_ttft_p50_ms"] = tax
            print(
                f"{who:10s} {concurrency:>4s} {row['ttft_p50_ms']:7.1f}ms {row['ttft_p90_ms']:7.1f}ms "
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

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for who, rows in results.items():
        levels = [int(c) for c in rows]
        left.plot(levels, [r["ttft_p50_ms"] for r in rows.values()], "o-", label=who)
        right.plot(levels, [r["requests_per_s"] for r in rows.values()], "o-", label=who)
    left.set(xlabel="concurrent requests", ylabel="TTFT p50 (ms)", title="time to first token")
    right.set(xlabel="concurrent requests", ylabel="requests / s", title="throughput")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT / "e2e.png", dpi=110)


if __name__ == "__main__":
    sys.exit(main())
