"""mmgraph agg against what a user would run instead: vLLM's own OpenAI server, same weights and engine arguments.

Four servers on the tiny Qwen2-VL, up at once and measured one at a time, in rounds that alternate their order
(so each meets the machine's noise alike): vLLM's server with its own defaults, with the CPU settings mmgraph
gives agg's engine (the `uni` executor, every core's OpenMP thread, unpinned), and with one OpenMP thread (the
fastest setting found for it so far); and mmgraph's agg graph (frontend + pd, `mmgraph up`'s settings).
Streaming chat requests with one 96x64 PNG each (a new image for every request, so no cache helps), 16 output
tokens, at each concurrency level: TTFT (first non-empty content delta), ITL and requests/s. Medians over the
rounds, with the spread of the rounds beside them.

Writes bench/out/peers.json (raw rows per round, medians, and a `summary` of worst-case ratios against the better
vLLM configuration at each level) and peers.png, and prints the table.

    .venv/bin/python bench/peers.py [--rounds 5] [--requests 24] [--concurrency 1 4 8 16]

vLLM's own encoder disaggregation (EPD) is not compared yet (issue 16).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e import OUT, REPO, run_http  # the same client and workload as bench/e2e.py

NAME = "tiny-qwen2-vl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)

    from mmgraph_operator.api import parse
    from mmgraph_operator.commands import vllm_flags
    from mmgraph_workers.baseline import vllm_serve
    from mmgraph_workers.tiny_model import build
    from mmgraph_workers.up import LocalGraph

    work = Path(tempfile.mkdtemp(prefix="mmgraph-peers-"))
    model = build(work / "tiny")
    body = yaml.safe_load((REPO / "examples" / "tiny-e-p-d.yaml").read_text())
    body["spec"]["model"]["path"] = str(model)
    engine_args = vllm_flags(body["spec"]["stages"]["pd"]["engineArgs"])
    body["spec"]["topology"] = "agg"
    for stage in ("encoder", "decode"):
        del body["spec"]["stages"][stage]
    ours = ("OMP_NUM_THREADS", "VLLM_CPU_OMP_THREADS_BIND", "VLLM_ENABLE_V1_MULTIPROCESSING")
    clean = {k: v for k, v in os.environ.items() if k not in ours}
    # what mmgraph gives agg's one engine (workers/mmgraph_workers/cpu.py): the `uni` executor, all the cores'
    # OpenMP threads, unpinned; and the one-thread setting the issue measured as vLLM's fastest here
    uni = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    configs = {
        "vllm serve (defaults)": (engine_args, clean),
        "vllm serve (mmgraph's CPU settings)": (
            [*engine_args, "--distributed-executor-backend", "uni"],
            {**clean, **uni, "OMP_NUM_THREADS": str(os.cpu_count() or 1)},
        ),
        "vllm serve (1 OpenMP thread)": (engine_args, {**clean, "OMP_NUM_THREADS": "1", **uni}),
    }
    graph = LocalGraph(parse(body), logdir=work / "agg")
    rows: dict[str, dict[str, list[dict]]] = {}
    with contextlib.ExitStack() as stack:
        print(f"starting {', '.join(configs)} and mmgraph agg ...", flush=True)
        servers = {
            who: stack.enter_context(vllm_serve(model, NAME, argv, env, work / f"vllm-{i}.log"))
            for i, (who, (argv, env)) in enumerate(configs.items())
        }
        graph.start()
        stack.callback(graph.stop)
        graph.wait_healthy(progress=lambda line: None)
        servers["mmgraph agg"] = graph.endpoint
        order = list(servers)
        for r in range(args.rounds):
            for who in order if r % 2 == 0 else order[::-1]:
                for c in args.concurrency:
                    base = 100_000 * (r + 1) + 1000 * c + 10_000 * order.index(who)  # images no one sent before
                    row = asyncio.run(run_http(servers[who], NAME, args.requests, c, "image", base))
                    rows.setdefault(who, {}).setdefault(str(c), []).append(row)
                    print(
                        f"round {r + 1} {who:34s} c={c:<3d} TTFT p50 {row['ttft_p50_ms']:6.1f} ms  "
                        f"ITL p50 {row['itl_p50_ms'] or 0:5.1f} ms  {row['requests_per_s']:5.1f} req/s",
                        flush=True,
                    )
    report = summarize(rows, args)
    (OUT / "peers.json").write_text(json.dumps(report, indent=2))
    plot(report["medians"])
    print(json.dumps(report["summary"], indent=2))
    print(f"wrote {OUT / 'peers.json'} and {OUT / 'peers.png'}")


def summarize(rows: dict[str, dict[str, list[dict]]], args: argparse.Namespace) -> dict:
    """Medians over the rounds with their spread, and agg against the better vLLM configuration per level."""

    def median_row(runs: list[dict]) -> dict:
        out = {}
        for key in ("ttft_p50_ms", "itl_p50_ms", "requests_per_s"):
            values = [run[key] for run in runs if run[key] is not None]
            out[key] = statistics.median(values)
            out[f"{key}_spread"] = [min(values), max(values)]
        return out

    medians = {who: {c: median_row(runs) for c, runs in levels.items()} for who, levels in rows.items()}
    ours = medians.pop("mmgraph agg")
    rps_ratios, ttft_deltas = {}, {}
    for c, row in ours.items():
        best_rps = max(m[c]["requests_per_s"] for m in medians.values())
        best_ttft = min(m[c]["ttft_p50_ms"] for m in medians.values())
        rps_ratios[c] = row["requests_per_s"] / best_rps
        ttft_deltas[c] = row["ttft_p50_ms"] - best_ttft
    medians["mmgraph agg"] = ours
    return {
        "benchmark": "peers",
        "rounds": args.rounds,
        "requests_per_level": args.requests,
        "rows": rows,
        "medians": medians,
        "summary": {
            "agg_vs_vllm_serve_rps": rps_ratios,
            "agg_vs_vllm_serve_rps_min": min(rps_ratios.values()),
            "agg_vs_vllm_serve_ttft_p50_delta_ms": ttft_deltas,
            "agg_vs_vllm_serve_ttft_p50_max_delta_ms": max(ttft_deltas.values()),
        },
    }


def plot(medians: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for who, levels in medians.items():
        xs = [int(c) for c in levels]
        for ax, key in ((left, "ttft_p50_ms"), (right, "requests_per_s")):
            ys = [row[key] for row in levels.values()]
            low = [y - row[f"{key}_spread"][0] for y, row in zip(ys, levels.values(), strict=True)]
            high = [row[f"{key}_spread"][1] - y for y, row in zip(ys, levels.values(), strict=True)]
            ax.errorbar(xs, ys, yerr=[low, high], fmt="o-", capsize=3, label=who)
    left.set(xlabel="concurrent requests", ylabel="TTFT p50 (ms)", title="time to first token (median, spread)")
    right.set(xlabel="concurrent requests", ylabel="requests / s", title="throughput (median, spread)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(OUT / "peers.png", dpi=110)


if __name__ == "__main__":
    main()
