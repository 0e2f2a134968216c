"""mmgraph against what a user would run instead: vLLM's own OpenAI server, and vLLM's own encoder disaggregation
(EPD), on the same weights with the same engine arguments.

Two sets, each up at once and measured one endpoint at a time, in rounds that alternate their order (so each
meets the machine's noise alike):
- serve: vLLM's server with its own defaults, with the `uni` executor and an OpenMP thread per core (unpinned),
  and with the CPU settings mmgraph gives agg's engine (`uni`, the cores but one, unpinned: one thread on 2
  cores); and mmgraph's agg graph.
- epd: vLLM's EPD as its disaggregated-encoder example runs it: an encoder instance (`--ec-transfer-config`,
  ECExampleConnector, producer), a prefill+decode instance (consumer), and for E+P+D a prefill instance (consumer
  and NixlConnector KV producer) and a decode instance (KV consumer), driven by bench/vllm_epd_proxy.py; against
  mmgraph's e-pd and e-p-d. Every engine of both gets the CPU settings mmgraph gives a graph of two engines
  (`uni`, the cores but one split between them, unpinned).
Streaming chat requests with one 96x64 PNG each (a new image for every request, so no cache helps), 16 output
tokens, at each concurrency level: TTFT (first non-empty content delta), ITL and requests/s. Medians over the
rounds, with the spread of the rounds beside them.

Writes bench/out/peers.json (raw rows per round, medians, and a `summary` of worst-case ratios: agg against the
better vLLM server configuration, e-pd and e-p-d against vLLM's EPD of the same shape, at each level) and
peers.png, and prints the table.

    .venv/bin/python bench/peers.py [--sets serve epd] [--rounds 5] [--requests 24] [--concurrency 1 4 8 16]
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
from collections.abc import Iterator
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e import OUT, REPO, run_http  # the same client and workload as bench/e2e.py

NAME = "tiny-qwen2-vl"


SERVE = (
    "vllm serve (defaults)",
    "vllm serve (uni, a thread per core)",
    "vllm serve (mmgraph's CPU settings)",
)
# mmgraph's topology -> the vLLM set it is compared with (the better of them, level by level)
PAIRS = {"mmgraph agg": SERVE, "mmgraph e-pd": ("vllm EPD (E+PD)",), "mmgraph e-p-d": ("vllm EPD (E+P+D)",)}
OURS = ("OMP_NUM_THREADS", "VLLM_CPU_OMP_THREADS_BIND", "VLLM_ENABLE_V1_MULTIPROCESSING")
UNI = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", choices=["serve", "epd"], default=["serve", "epd"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    for name in OURS:  # both sides get their thread settings from here, never from the shell
        os.environ.pop(name, None)

    from mmgraph_contract.settings import vllm_flags
    from mmgraph_workers.tiny_model import build

    work = Path(tempfile.mkdtemp(prefix="mmgraph-peers-"))
    body = yaml.safe_load((REPO / "examples" / "tiny-e-p-d.yaml").read_text())
    body["spec"]["model"]["path"] = str(build(work / "tiny"))
    engine_args = vllm_flags(body["spec"]["stages"]["pd"]["engineArgs"])
    rows: dict[str, dict[str, list[dict]]] = {}
    for name in args.sets:
        endpoints = {"serve": serve_set, "epd": epd_set}[name](body, engine_args, work / name)
        with endpoints as servers:
            rows |= measure(servers, args)
    report = summarize(rows, args)
    (OUT / "peers.json").write_text(json.dumps(report, indent=2))
    plot(report["medians"])
    print(json.dumps(report["summary"], indent=2))
    print(f"wrote {OUT / 'peers.json'} and {OUT / 'peers.png'}")


def measure(servers: dict[str, str], args: argparse.Namespace) -> dict[str, dict[str, list[dict]]]:
    """Every endpoint at every level, in rounds alternating their order; each run sends images no run sent."""
    rows: dict[str, dict[str, list[dict]]] = {}
    order = list(servers)
    for r in range(args.rounds):
        for who in order if r % 2 == 0 else order[::-1]:
            for c in args.concurrency:
                base = 100_000 * (r + 1) + 1000 * c + 10_000 * order.index(who)
                row = asyncio.run(run_http(servers[who], NAME, args.requests, c, "image", base))
                rows.setdefault(who, {}).setdefault(str(c), []).append(row)
                print(
                    f"round {r + 1} {who:36s} c={c:<3d} TTFT p50 {row['ttft_p50_ms']:6.1f} ms  "
                    f"ITL p50 {row['itl_p50_ms'] or 0:5.1f} ms  {row['requests_per_s']:5.1f} req/s",
                    flush=True,
                )
    return rows


@contextlib.contextmanager
def serve_set(body: dict, engine_args: list[str], work: Path) -> Iterator[dict[str, str]]:
    """vLLM's server in three configurations, and mmgraph's agg graph."""
    from mmgraph_contract.graph import parse
    from mmgraph_workers import cpu
    from mmgraph_workers.baseline import vllm_serve
    from mmgraph_workers.up import LocalGraph

    model = Path(body["spec"]["model"]["path"])
    clean = dict(os.environ)  # main() removed OURS: each configuration sets its own
    configs = dict(
        zip(
            SERVE,
            [
                (engine_args, clean),
                ([*engine_args, "--distributed-executor-backend", "uni"], {**clean, **UNI, "OMP_NUM_THREADS": cores()}),
                ([*engine_args, "--distributed-executor-backend", "uni"], {**clean, **UNI, **cpu.omp_threads(1, 0)}),
            ],
            strict=True,
        )
    )
    agg = dict(body, spec={**body["spec"], "topology": "agg"})
    agg["spec"]["stages"] = {k: v for k, v in body["spec"]["stages"].items() if k in ("frontend", "pd")}
    graph = LocalGraph(parse(agg), logdir=work / "agg")
    with contextlib.ExitStack() as stack:
        print(f"starting {', '.join(configs)} and mmgraph agg ...", flush=True)
        servers = {
            who: stack.enter_context(vllm_serve(model, NAME, argv, env, work / f"vllm-{i}.log"))
            for i, (who, (argv, env)) in enumerate(configs.items())
        }
        graph.start()
        stack.callback(graph.stop)
        graph.wait_healthy(progress=lambda line: None)
        yield {**servers, "mmgraph agg": graph.endpoint}


@contextlib.contextmanager
def epd_set(body: dict, engine_args: list[str], work: Path) -> Iterator[dict[str, str]]:
    """vLLM's EPD, E+PD and E+P+D (one encoder instance serves both: they read the same store), and mmgraph's
    e-p-d graph with an e-pd frontend routed to its encoder and pd."""
    from mmgraph_contract.graph import parse
    from mmgraph_contract.vocabulary import StageName
    from mmgraph_workers import cpu
    from mmgraph_workers.baseline import vllm_serve
    from mmgraph_workers.ports import free_port
    from mmgraph_workers.up import LocalGraph

    model = Path(body["spec"]["model"]["path"])
    work.mkdir(parents=True, exist_ok=True)
    store = work / "ec-store"
    store.mkdir()
    env = {**os.environ, **UNI, **cpu.omp_threads(2, 0)}
    env.setdefault("UCX_NET_DEVICES", "lo")
    base = [*engine_args, "--distributed-executor-backend", "uni"]

    def ec(role: str) -> list[str]:
        config = {"ec_connector": "ECExampleConnector", "ec_role": role}
        return [
            "--ec-transfer-config",
            json.dumps({**config, "ec_connector_extra_config": {"shared_storage_path": str(store)}}),
        ]

    def kv(role: str) -> list[str]:
        return ["--kv-transfer-config", json.dumps({"kv_connector": "NixlConnector", "kv_role": role})]

    def side_channel() -> dict[str, str]:
        return {**env, "VLLM_NIXL_SIDE_CHANNEL_PORT": str(free_port())}

    graph = LocalGraph(parse(body), logdir=work / "e-p-d")
    epd = LocalGraph(parse(dict(body, spec={**body["spec"], "topology": "e-pd"})), logdir=work / "e-pd")
    epd.peer_token = graph.peer_token  # the same graph's credential: its workers refuse any other
    with contextlib.ExitStack() as stack:
        print("starting vLLM's EPD (E, PD, P, D, two proxies) and mmgraph e-p-d with an e-pd frontend ...", flush=True)
        encoder = stack.enter_context(vllm_serve(model, NAME, [*base, *ec("ec_producer")], env, work / "e.log"))
        pd = stack.enter_context(vllm_serve(model, NAME, [*base, *ec("ec_consumer")], env, work / "pd.log"))
        prefill = stack.enter_context(
            vllm_serve(model, NAME, [*base, *ec("ec_consumer"), *kv("kv_producer")], side_channel(), work / "p.log")
        )
        decode = stack.enter_context(
            vllm_serve(model, NAME, [*base, *kv("kv_consumer")], side_channel(), work / "d.log")
        )
        servers = {
            "vllm EPD (E+PD)": stack.enter_context(proxy(["--encoder", encoder, "--decode", pd], work / "proxy-2.log")),
            "vllm EPD (E+P+D)": stack.enter_context(
                proxy(["--encoder", encoder, "--prefill", prefill, "--decode", decode], work / "proxy-3.log")
            ),
        }
        graph.start()
        stack.callback(graph.stop)
        graph.wait_healthy(progress=lambda line: None)
        peers = {s: f"http://127.0.0.1:{graph.stages[s].port}" for s in (StageName.ENCODER, StageName.PD)}
        epd.spawn(StageName.FRONTEND, free_port(), peers)
        stack.callback(epd.stop)
        epd.wait_healthy(progress=lambda line: None)
        yield {**servers, "mmgraph e-pd": epd.endpoint, "mmgraph e-p-d": graph.endpoint}
        stored = len(list(store.glob("*/encoder_cache.safetensors")))
        print(f"vLLM's encoder stored {stored} items' encoder outputs (one per image sent through a proxy)")


def proxy(argv: list[str], log: Path) -> contextlib.AbstractContextManager[str]:
    """bench/vllm_epd_proxy.py on a free loopback port, until healthy."""
    from mmgraph_workers.baseline import process
    from mmgraph_workers.ports import free_port

    port = free_port()
    command = [sys.executable, str(Path(__file__).with_name("vllm_epd_proxy.py")), "--port", str(port), *argv]
    return process(command, None, log, f"http://127.0.0.1:{port}", timeout=60)


def cores() -> str:
    return str(os.cpu_count() or 1)


def summarize(rows: dict[str, dict[str, list[dict]]], args: argparse.Namespace) -> dict:
    """Medians over the rounds with their spread, and each mmgraph topology against its vLLM peers per level
    (the better of them at each level)."""

    def median_row(runs: list[dict]) -> dict:
        out = {}
        for key in ("ttft_p50_ms", "itl_p50_ms", "requests_per_s"):
            values = [run[key] for run in runs if run[key] is not None]
            out[key] = statistics.median(values)
            out[f"{key}_spread"] = [min(values), max(values)]
        return out

    medians = {who: {c: median_row(runs) for c, runs in levels.items()} for who, levels in rows.items()}
    compared = {}
    for ours, theirs in PAIRS.items():
        if ours not in medians or not all(t in medians for t in theirs):
            continue
        rps, ttft = {}, {}
        for c, row in medians[ours].items():
            rps[c] = row["requests_per_s"] / max(medians[t][c]["requests_per_s"] for t in theirs)
            ttft[c] = row["ttft_p50_ms"] - min(medians[t][c]["ttft_p50_ms"] for t in theirs)
        compared[ours] = {"rps_ratio": rps, "ttft_p50_delta_ms": ttft}
    summary: dict = {"by_topology": compared}
    if "mmgraph agg" in compared:
        agg = compared["mmgraph agg"]
        summary["agg_vs_vllm_serve_rps_min"] = min(agg["rps_ratio"].values())
        summary["agg_vs_vllm_serve_ttft_p50_max_delta_ms"] = max(agg["ttft_p50_delta_ms"].values())
    epd = [compared[t] for t in ("mmgraph e-pd", "mmgraph e-p-d") if t in compared]
    if epd:
        summary["epd_vs_vllm_epd_rps_min"] = min(v for t in epd for v in t["rps_ratio"].values())
        summary["epd_vs_vllm_epd_ttft_p50_max_delta_ms"] = max(v for t in epd for v in t["ttft_p50_delta_ms"].values())
    return {
        "benchmark": "peers",
        "rounds": args.rounds,
        "requests_per_level": args.requests,
        "rows": rows,
        "medians": medians,
        "summary": summary,
    }


def plot(medians: dict) -> None:
    """A row per set (vLLM's server and agg; vLLM's EPD and e-pd, e-p-d): TTFT and requests/s by level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = [
        who
        for who in (
            ["mmgraph agg", *SERVE],
            [*PAIRS["mmgraph e-pd"], *PAIRS["mmgraph e-p-d"], "mmgraph e-pd", "mmgraph e-p-d"],
        )
        if any(w in medians for w in who)
    ]
    fig, axes = plt.subplots(len(sets), 2, figsize=(11, 4 * len(sets)), squeeze=False)
    for (left, right), names in zip(axes, sets, strict=True):
        for who in (w for w in names if w in medians):
            levels = medians[who]
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
