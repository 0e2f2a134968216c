"""Encoder -> PD hand-off of embedding tensors: our transfer (NIXL) vs the same bytes in an HTTP request body,
with an in-process copy as the ceiling.

Two processes, as in a graph: an owner (the encoder's side: publishes tensors, polls for completion notices, and
also runs a plain HTTP server for the baseline) and a reader (the PD side: this process). For each size, each
method is repeated and the median is reported. Writes bench/out/transfer.json and transfer.png, prints ratios.

    .venv/bin/python bench/transfer.py [--repeat 20]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

os.environ.setdefault("UCX_NET_DEVICES", "lo")
os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as `mmgraph worker` sets it (see mmgraph_workers.cli)

import torch

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "out"
SIZES = [64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20]


def http_sink(port_out) -> None:
    """The HTTP baseline's receiving process: reads each request body completely, answers 204."""

    class Sink(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            left = int(self.headers["Content-Length"])
            while left:
                left -= len(self.rfile.read(min(left, 1 << 20)))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    port_out.send(server.server_address[1])
    server.serve_forever()


def owner(conn) -> None:
    """The encoder's side: publishes a tensor of the asked size and sends back its descriptor."""
    from mmgraph_workers.transfer import make_transfer

    transfer = make_transfer("nixl", "bench-owner", pool_bytes=160 << 20)
    tensors: dict[int, torch.Tensor] = {}
    while True:
        size = conn.recv()
        if size is None:
            break
        tensor = tensors.setdefault(size, torch.randn(size // 4))
        ref = transfer.publish(tensor, ttl_seconds=60, owner="http://127.0.0.1:1")
        conn.send((ref.model_dump_json(), transfer.metadata))
    transfer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)

    import httpx

    from mmgraph_workers.protocol import TensorRef
    from mmgraph_workers.transfer import copy_bytes, make_transfer

    ctx = mp.get_context("spawn")
    ours, theirs = ctx.Pipe()
    port_in, port_out = ctx.Pipe()
    proc = ctx.Process(target=owner, args=(theirs,), daemon=True)
    proc.start()
    sink = ctx.Process(target=http_sink, args=(port_out,), daemon=True)
    sink.start()
    http_port = port_in.recv()
    reader = make_transfer("nixl", "bench-reader", recv_pool_bytes=128 << 20)
    http = httpx.Client(trust_env=False, timeout=60)
    results = []
    try:
        for size in SIZES:
            src = torch.randn(size // 4)
            dst = torch.empty_like(src)
            body = src.numpy().tobytes()
            nixl_s, http_s, copy_s = [], [], []
            for i in range(args.repeat + 2):  # the methods take turns, so they meet the same noise; 2 warm-ups
                ours.send(size)
                published, metadata = ours.recv()
                ref = TensorRef.model_validate_json(published)
                t0 = time.perf_counter()
                reader.fetch(ref, 30, metadata)
                t1 = time.perf_counter()
                http.post(f"http://127.0.0.1:{http_port}/", content=body)
                t2 = time.perf_counter()
                copy_bytes(dst, src)  # one thread, as the transfer's own copies (see transfer.copy_bytes)
                t3 = time.perf_counter()
                if i >= 2:
                    nixl_s.append(t1 - t0)
                    http_s.append(t2 - t1)
                    copy_s.append(t3 - t2)
            row = {
                "bytes": size,
                "nixl_median_s": statistics.median(nixl_s),
                "http_median_s": statistics.median(http_s),
                "copy_median_s": statistics.median(copy_s),
            }
            row["nixl_gbps"] = size / row["nixl_median_s"] / 1e9
            row["http_gbps"] = size / row["http_median_s"] / 1e9
            row["copy_gbps"] = size / row["copy_median_s"] / 1e9
            row["speedup_vs_http"] = row["http_median_s"] / row["nixl_median_s"]
            results.append(row)
            print(
                f"{size >> 10:8d} KiB  nixl {row['nixl_median_s'] * 1e6:9.0f} us ({row['nixl_gbps']:5.2f} GB/s)  "
                f"http {row['http_median_s'] * 1e6:9.0f} us ({row['http_gbps']:5.2f} GB/s)  "
                f"copy {row['copy_median_s'] * 1e6:8.0f} us  | nixl/http speed-up {row['speedup_vs_http']:5.2f}x",
                flush=True,
            )
    finally:
        ours.send(None)
        proc.join(10)
        for p in (proc, sink):
            if p.is_alive():
                p.kill()
    report = {"benchmark": "transfer", "repeat": args.repeat, "results": results}
    (OUT / "transfer.json").write_text(json.dumps(report, indent=2))
    plot(results)
    print(f"warm per-transfer overhead (64 KiB, median): {results[0]['nixl_median_s'] * 1e6:.0f} us")
    print(f"wrote {OUT / 'transfer.json'} and {OUT / 'transfer.png'}")


def plot(results: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [r["bytes"] / (1 << 20) for r in results]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("nixl_gbps", "NIXL (ours)"), ("http_gbps", "HTTP body"), ("copy_gbps", "in-process copy")):
        ax.plot(sizes, [r[key] for r in results], "o-", label=label)
    ax.set(
        xscale="log", yscale="log", xlabel="tensor size (MiB)", ylabel="GB/s (median)", title="encoder → pd hand-off"
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(OUT / "transfer.png", dpi=110)


if __name__ == "__main__":
    sys.exit(main())
