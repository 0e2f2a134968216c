"""Encoder routing by content against least-busy routing, over 1, 2 and 4 encoder replicas.

One e-pd graph on the tiny Qwen2-VL with two frontends routed to the same workers: the graph's own (routing by
content, the default) and one with `embeddingCache.routing: leastBusy`. A workload of images repeated with Zipf
popularity (a pool of `--pool` images, exponent `--zipf`), `--requests` streaming requests at `--concurrency`,
each run with a pool of images no earlier run sent (so no run inherits another's cache). For each replica count,
rounds alternate which frontend goes first. Reported per run: tower passes and cache hits (the encoders' own
`mmgraph_encoder_items_total`, summed over replicas), hit rate, TTFT p50 of requests whose image was sent before
(repeats) and of first sightings, and requests/s; medians over the rounds, with their spread.

Writes bench/out/cache.json and cache.png, and prints each run and the ratios.

    .venv/bin/python bench/cache.py [--rounds 3] [--requests 120] [--pool 48] [--replicas 1 2 4]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import yaml
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e import OUT, REPO, has_content  # the same streamed-chunk reading as bench/e2e.py

MODES = ("content", "leastBusy")
SIZE = (224, 224)  # 256 patches: the tower's share of a miss is visible even on the tiny model


def image(seed: int) -> str:
    buf = io.BytesIO()
    pixels = (np.random.RandomState(seed).rand(SIZE[1], SIZE[0], 3) * 255).astype("uint8")
    Image.fromarray(pixels).save(buf, format="PNG")
    return f"data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}"


def zipf_order(requests: int, pool: int, exponent: float, seed: int) -> list[int]:
    """Which pool image each request sends: image k with probability proportional to 1 / (k + 1) ** exponent."""
    weights = 1.0 / np.arange(1, pool + 1) ** exponent
    return np.random.RandomState(seed).choice(pool, size=requests, p=weights / weights.sum()).tolist()


async def run(endpoint: str, model: str, images: list[str], order: list[int], concurrency: int) -> dict:
    """The workload through `endpoint`: per request its image's index, whether it was sent before, and TTFT."""
    sem, seen, samples = asyncio.Semaphore(concurrency), set(), []
    async with httpx.AsyncClient(timeout=120) as client:

        async def one(k: int) -> None:
            async with sem:
                repeat = k in seen
                seen.add(k)
                body = {
                    "model": model,
                    "messages": [
                        {
                            "role": "user",
                            "content": [
                                {"type": "image_url", "image_url": {"url": images[k]}},
                                {"type": "text", "text": "describe this image"},
                            ],
                        }
                    ],
                    "max_tokens": 4,
                    "temperature": 0,
                    "stream": True,
                }
                started, first = time.perf_counter(), None
                async with client.stream("POST", f"{endpoint}/v1/chat/completions", json=body) as r:
                    assert r.status_code == 200, await r.aread()
                    async for line in r.aiter_lines():
                        if first is None and line.startswith("data: {") and has_content(json.loads(line[6:])):
                            first = time.perf_counter()
                samples.append((repeat, (first or time.perf_counter()) - started))

        t0 = time.perf_counter()
        await asyncio.gather(*(one(k) for k in order))
        wall = time.perf_counter() - t0
    repeats = [t for r, t in samples if r]
    firsts = [t for r, t in samples if not r]
    return {
        "ttft_p50_ms": 1000 * statistics.median(t for _, t in samples),
        "ttft_p50_repeat_ms": 1000 * statistics.median(repeats) if repeats else None,
        "ttft_p50_first_ms": 1000 * statistics.median(firsts) if firsts else None,
        "requests_per_s": len(samples) / wall,
        "distinct_images": len(set(order)),
    }


def encoder_items(stages: list) -> tuple[float, float]:
    """(tower passes, cache hits) summed over the encoder replicas' /metrics."""
    totals = {"false": 0.0, "true": 0.0}
    for stage in stages:
        for line in httpx.get(f"http://{stage.host}:{stage.port}/metrics", timeout=5).text.splitlines():
            for cached in totals:
                if line.startswith(f'mmgraph_encoder_items_total{{cached="{cached}"}}'):
                    totals[cached] += float(line.split()[-1])
    return totals["false"], totals["true"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=120)
    parser.add_argument("--pool", type=int, default=48)
    parser.add_argument("--zipf", type=float, default=1.1)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")

    from mmgraph_contract.graph import parse
    from mmgraph_contract.vocabulary import StageName
    from mmgraph_workers.ports import free_port
    from mmgraph_workers.tiny_model import build
    from mmgraph_workers.up import LocalGraph

    work = Path(tempfile.mkdtemp(prefix="mmgraph-cache-"))
    body = yaml.safe_load((REPO / "examples" / "tiny-e-p-d.yaml").read_text())
    body["spec"]["model"]["path"] = str(build(work / "tiny"))
    body["spec"]["topology"] = "e-pd"
    del body["spec"]["stages"]["decode"]
    model = body["spec"]["model"]["name"]
    graph = LocalGraph(parse(body), logdir=work / "graph")
    least = LocalGraph(parse(body), logdir=work / "least-busy")
    least.graph.spec.embedding_cache.routing = "leastBusy"
    least.peer_token = graph.peer_token  # the same graph's credential: its workers refuse any other
    rows: dict[str, dict[str, list[dict]]] = {}
    try:
        print("starting an e-pd graph and a second, least-busy frontend ...", flush=True)
        graph.start()
        graph.wait_healthy(progress=lambda line: None)
        least.spawn(StageName.FRONTEND, free_port(), graph.peers, args=graph.hosts_args(StageName.FRONTEND))
        least.wait_healthy(progress=lambda line: None)
        endpoints = {"content": graph.endpoint, "leastBusy": least.endpoint}
        run_id = 0
        for replicas in args.replicas:
            while len(graph.replicas) < replicas - 1:
                graph.add_replica(StageName.ENCODER)
            time.sleep(5)  # the frontends re-read their peers every 2 s
            encoders = [graph.stages[StageName.ENCODER], *graph.replicas]
            for r in range(args.rounds):
                for mode in MODES if r % 2 == 0 else MODES[::-1]:
                    run_id += 1
                    images = [image(1_000_000 * run_id + k) for k in range(args.pool)]
                    order = zipf_order(args.requests, args.pool, args.zipf, seed=r)  # the same order for both
                    before = encoder_items(encoders)
                    row = asyncio.run(run(endpoints[mode], model, images, order, args.concurrency))
                    after = encoder_items(encoders)
                    row["tower_passes"], row["cache_hits"] = after[0] - before[0], after[1] - before[1]
                    row["hit_rate"] = row["cache_hits"] / args.requests
                    rows.setdefault(str(replicas), {}).setdefault(mode, []).append(row)
                    print(
                        f"{replicas} encoder(s) round {r + 1} {mode:9s}: {row['tower_passes']:4.0f} passes for "
                        f"{row['distinct_images']} images, hit rate {row['hit_rate']:.2f}, TTFT p50 "
                        f"{row['ttft_p50_ms']:6.1f} ms (repeat {row['ttft_p50_repeat_ms']:6.1f}, first "
                        f"{row['ttft_p50_first_ms']:6.1f}), {row['requests_per_s']:5.1f} req/s",
                        flush=True,
                    )
    finally:
        least.stop()
        graph.stop()
    report = summarize(rows, args)
    (OUT / "cache.json").write_text(json.dumps(report, indent=2))
    plot(report["medians"])
    print(json.dumps(report["summary"], indent=2))
    print(f"wrote {OUT / 'cache.json'} and {OUT / 'cache.png'}")


KEYS = ("tower_passes", "hit_rate", "ttft_p50_ms", "ttft_p50_repeat_ms", "ttft_p50_first_ms", "requests_per_s")


def summarize(rows: dict[str, dict[str, list[dict]]], args: argparse.Namespace) -> dict:
    """Medians over the rounds with their spread, and content against least-busy per replica count."""
    medians: dict[str, dict[str, dict]] = {}
    for replicas, modes in rows.items():
        for mode, runs in modes.items():
            row = {}
            for key in KEYS:
                values = [run[key] for run in runs if run[key] is not None]
                row[key] = statistics.median(values)
                row[f"{key}_spread"] = [min(values), max(values)]
            medians.setdefault(replicas, {})[mode] = row
    summary = {
        replicas: {
            "tower_passes_content_over_least_busy": m["content"]["tower_passes"] / m["leastBusy"]["tower_passes"],
            "hit_rate": {mode: m[mode]["hit_rate"] for mode in MODES},
            "ttft_p50_delta_ms": m["content"]["ttft_p50_ms"] - m["leastBusy"]["ttft_p50_ms"],
            "ttft_p50_hit_vs_miss_ms": [m["content"]["ttft_p50_repeat_ms"], m["content"]["ttft_p50_first_ms"]],
        }
        for replicas, m in medians.items()
    }
    return {"benchmark": "cache", "args": vars(args), "rows": rows, "medians": medians, "summary": summary}


def plot(medians: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    xs = [int(r) for r in medians]
    for mode in MODES:
        for ax, key in zip(axes, ("tower_passes", "hit_rate", "ttft_p50_ms"), strict=True):
            ys = [medians[r][mode][key] for r in medians]
            low = [y - medians[r][mode][f"{key}_spread"][0] for y, r in zip(ys, medians, strict=True)]
            high = [medians[r][mode][f"{key}_spread"][1] - y for y, r in zip(ys, medians, strict=True)]
            ax.errorbar(xs, ys, yerr=[low, high], fmt="o-", capsize=3, label=mode)
    axes[0].set(xlabel="encoder replicas", ylabel="tower passes", title="tower passes per run (median, spread)")
    axes[1].set(xlabel="encoder replicas", ylabel="hits / requests", title="encoder cache hit rate")
    axes[2].set(xlabel="encoder replicas", ylabel="TTFT p50 (ms)", title="time to first token")
    for ax in axes:
        ax.set_xticks(xs)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT / "cache.png", dpi=110)


if __name__ == "__main__":
    main()
