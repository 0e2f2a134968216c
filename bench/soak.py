"""Soak: a minute of mixed valid and invalid requests at 32 concurrent against `mmgraph up`'s e-p-d graph, with
abuse alongside: a text flood (20 MB prompts, back to back) and slow uploads (full-size bodies trickled in).

Valid requests (text, one image, two images; greedy) must all come back with exactly the tokens the same request
got alone before the soak (nothing wrong, nothing lost: the exit status says so); invalid ones (a bad model name,
a broken image, a refused URL scheme, max_tokens past the context, an image the model cannot tile, malformed JSON)
must all be 4xx; each flood prompt a 400 (it cannot fit the context), each slow upload a 408 (its body's deadline)
or 503 (the frontend's body budget). Every stage's resident memory (its process tree) is sampled five times a
second: bounded means it levels off, not grows with the requests served, nor with the abuse. Loopback only.
Writes bench/out/soak.json and soak.png and prints the figures, the valid requests' latency during the abuse
among them.

    .venv/bin/python bench/soak.py [--seconds 60] [--concurrency 32] [--flood-mb 20] [--slow-uploads 8]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import psutil
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "out"
UNANSWERED = 90  # seconds: past the stages' body deadline (--body-timeout-seconds, 60 by default)


def png_url(width: int, height: int, seed: int) -> str:
    img = Image.fromarray((np.random.RandomState(seed).rand(height, width, 3) * 255).astype("uint8"))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def user(*parts: dict | str) -> list[dict]:
    content = [p if isinstance(p, dict) else {"type": "text", "text": p} for p in parts]
    return [{"role": "user", "content": content}]


def image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def cases(model: str) -> tuple[dict[str, dict], dict[str, bytes]]:
    """(valid request bodies, invalid raw bodies), by name."""
    a, b = png_url(96, 64, 1), png_url(64, 96, 2)
    valid = {
        "text": {"messages": user("say something")},
        "one-image": {"messages": user(image(a), "describe")},
        "two-images": {"messages": user(image(a), image(b), "compare")},
    }
    valid = {
        k: {"model": model, "max_tokens": 8, "temperature": 0, "return_token_ids": True, **v} for k, v in valid.items()
    }
    invalid = {
        "wrong-model": {"model": "gpt-9", "messages": user("hi")},
        "broken-image": {"model": model, "messages": user(image("data:image/png;base64,iVBORw0KGgo="), "x")},
        "refused-scheme": {"model": model, "messages": user(image("file:///etc/passwd"), "x")},
        "too-many-tokens": {"model": model, "messages": user("hi"), "max_tokens": 100000},
        "untileable": {"model": model, "messages": user(image(png_url(4000, 16, 3)), "x")},
    }
    raw = {k: json.dumps(v).encode() for k, v in invalid.items()}
    raw["malformed-json"] = b'{"model": "' + model.encode() + b'", "messages": ['
    return valid, raw


class RssSampler(threading.Thread):
    """Each stage's resident memory (the worker and its children: vLLM's engine core), five times a second (a
    refused flood prompt's memory lives for a fraction of one)."""

    def __init__(self, pids: dict[str, int]):
        super().__init__(daemon=True)
        self.pids, self.samples, self.stop = pids, [], threading.Event()

    def run(self) -> None:
        started = time.monotonic()
        while not self.stop.is_set():
            row = {"t": time.monotonic() - started}
            for stage, pid in self.pids.items():
                try:
                    proc = psutil.Process(pid)
                    row[stage] = sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2**20
                except psutil.Error:
                    row[stage] = float("nan")
            self.samples.append(row)
            self.stop.wait(0.2)


async def flood(endpoint: str, model: str, size: int, deadline: float, outcomes: Counter[str]) -> None:
    """Prompts of `size` bytes of text, one after another: each must be refused (400: it cannot fit the context)."""
    body = json.dumps({"model": model, "messages": user("word " * (size // 5)), "max_tokens": 2}).encode()
    async with httpx.AsyncClient(timeout=120, trust_env=False) as http:
        while time.monotonic() < deadline:
            try:
                r = await http.post(
                    f"{endpoint}/v1/chat/completions", content=body, headers={"content-type": "application/json"}
                )
                outcomes["flood-400" if r.status_code == 400 else f"flood-{r.status_code}"] += 1
            except httpx.HTTPError as err:
                outcomes[f"flood-{type(err).__name__}"] += 1


async def slow_upload(endpoint: str, size: int, deadline: float, outcomes: Counter[str]) -> None:
    """Bodies of `size` declared and trickled in (64 KiB a second), one after another: each must be refused, 408
    at the frontend's body deadline or 503 when its body budget is held; one still unanswered UNANSWERED seconds
    after the soak ends counts as such (an upload with no deadline would trickle for an hour)."""
    url = httpx.URL(endpoint)
    head = f"POST /v1/chat/completions HTTP/1.1\r\nhost: {url.host}\r\ncontent-type: application/json\r\n"
    head += f"content-length: {size}\r\n\r\n"
    while time.monotonic() < deadline:
        reader, writer = await asyncio.open_connection(url.host, url.port)
        writer.write(head.encode())
        answer = asyncio.ensure_future(reader.readline())
        try:
            await asyncio.wait({answer}, timeout=1.0)
            while not answer.done() and time.monotonic() < deadline + UNANSWERED:
                writer.write(b" " * (1 << 16))
                await asyncio.wait_for(writer.drain(), 10)
                await asyncio.wait({answer}, timeout=1.0)
            status = answer.result().split() if answer.done() else [b"", b"unanswered"]
            outcomes[f"slow-{status[1].decode() if len(status) > 1 else 'closed'}"] += 1
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as err:
            outcomes[f"slow-{type(err).__name__}"] += 1
        finally:
            answer.cancel()
            writer.close()
        await asyncio.sleep(1)  # a refusal's Retry-After


async def soak(endpoint: str, valid: dict, invalid: dict, expected: dict, args: argparse.Namespace) -> dict:
    outcomes: Counter[str] = Counter()
    failures: list[str] = []
    names = [("valid", k) for k in valid] + [("invalid", k) for k in invalid]
    deadline = time.monotonic() + args.seconds
    latencies: dict[str, list[float]] = {"valid": [], "invalid": []}

    async def worker(http: httpx.AsyncClient, offset: int) -> None:
        i = offset
        while time.monotonic() < deadline:
            kind, name = names[i % len(names)]
            i += 1
            started = time.monotonic()
            try:
                if kind == "valid":
                    r = await http.post(f"{endpoint}/v1/chat/completions", json=valid[name])
                else:
                    r = await http.post(
                        f"{endpoint}/v1/chat/completions",
                        content=invalid[name],
                        headers={"content-type": "application/json"},
                    )
            except httpx.HTTPError as err:
                outcomes[f"{kind}-lost"] += 1
                failures.append(f"{name}: {type(err).__name__}")
                continue
            latencies[kind].append(time.monotonic() - started)
            if kind == "valid":
                ok = r.status_code == 200 and r.json()["choices"][0]["token_ids"] == expected[name]
                outcomes["valid-right" if ok else "valid-wrong"] += 1
                if not ok:
                    failures.append(f"{name}: {r.status_code} {r.text[:200]}")
            else:
                ok = 400 <= r.status_code < 500
                outcomes["invalid-4xx" if ok else "invalid-not-4xx"] += 1
                if not ok:
                    failures.append(f"{name}: {r.status_code} {r.text[:200]}")

    model = next(iter(valid.values()))["model"]
    abuse = [flood(endpoint, model, args.flood_mb << 20, deadline, outcomes) for _ in range(args.floods)]
    abuse += [slow_upload(endpoint, args.upload_bytes, deadline, outcomes) for _ in range(args.slow_uploads)]
    limits = httpx.Limits(max_connections=args.concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits, trust_env=False) as http:
        started, abusing = time.monotonic(), asyncio.gather(*abuse)
        await asyncio.gather(*(worker(http, k) for k in range(args.concurrency)))
        wall = time.monotonic() - started
        await abusing  # a slow upload's answer comes at its body deadline, after the load
    served = sum(outcomes[k] for k in ("valid-right", "valid-wrong", "valid-lost", "invalid-4xx", "invalid-not-4xx"))
    return {
        "outcomes": dict(outcomes),
        "failures": failures[:20],
        "valid_wrong_or_lost": outcomes["valid-wrong"] + outcomes["valid-lost"],
        "requests": served,
        "requests_per_s": served / wall,
        **{f"{kind}_latency_ms": percentiles(values) for kind, values in latencies.items()},
    }


def percentiles(values: list[float]) -> dict[str, float] | None:
    """p50, p99 and max, in ms."""
    if not values:
        return None
    values = sorted(values)
    return {
        "p50": round(1000 * values[len(values) // 2], 1),
        "p99": round(1000 * values[int(len(values) * 0.99)], 1),
        "max": round(1000 * values[-1], 1),
    }


def plot(samples: list[dict], stages: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for stage in stages:
        ax.plot([s["t"] for s in samples], [s[stage] for s in samples], label=stage)
    ax.set_xlabel("seconds")
    ax.set_ylabel("RSS (MiB, process tree)")
    ax.set_title("Stage memory during the soak (warm-up, then mixed requests, a text flood and slow uploads)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--flood-mb", type=int, default=20, help="size of each text-flood prompt")
    parser.add_argument("--floods", type=int, default=1, help="text-flood clients (each sends one prompt at a time)")
    parser.add_argument("--slow-uploads", type=int, default=8, help="clients trickling full-size bodies")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)

    from mmgraph_contract.graph import parse
    from mmgraph_contract.settings import max_request_bytes
    from mmgraph_contract.vocabulary import StageName
    from mmgraph_workers.tiny_model import build
    from mmgraph_workers.up import LocalGraph

    work = Path(tempfile.mkdtemp(prefix="mmgraph-soak-"))
    body = yaml.safe_load((REPO / "examples" / "tiny-e-p-d.yaml").read_text())
    body["spec"]["model"]["path"] = str(build(work / "tiny"))
    model = body["spec"]["model"]["name"]
    valid, invalid = cases(model)
    spec = parse(body)
    args.upload_bytes = max_request_bytes(spec.spec.media, StageName.FRONTEND)  # the largest body it accepts
    graph = LocalGraph(spec, logdir=work / "logs")
    try:
        graph.start()
        graph.wait_healthy(progress=lambda line: print(line, flush=True))
        pids = {s.value: stage.proc.pid for s, stage in graph.stages.items()}
        sampler = RssSampler(pids)
        sampler.start()
        with httpx.Client(timeout=120, trust_env=False) as http:  # alone, before the soak: the oracle
            expected = {
                k: http.post(f"{graph.endpoint}/v1/chat/completions", json=v).json()["choices"][0]["token_ids"]
                for k, v in valid.items()
            }
        time.sleep(3)
        settled = dict(sampler.samples[-1])
        print(
            f"soak: {args.seconds:.0f} s at {args.concurrency} concurrent, with {args.floods} x {args.flood_mb} MB "
            f"text flood and {args.slow_uploads} slow uploads of {args.upload_bytes} bytes ...",
            flush=True,
        )
        result = asyncio.run(soak(graph.endpoint, valid, invalid, expected, args))
        time.sleep(3)
        sampler.stop.set()
        sampler.join()
        dead = graph.dead()
        assert dead is None, f"{dead.name} died during the soak"
    finally:
        graph.stop()
    samples = sampler.samples
    during = [s for s in samples if s["t"] >= settled["t"]]
    memory = {
        stage: {
            "before_mib": round(settled[stage], 1),
            "peak_mib": round(max(s[stage] for s in during), 1),
            "peak_growth_mib": round(max(s[stage] for s in during) - settled[stage], 1),
            "after_mib": round(samples[-1][stage], 1),
        }
        for stage in pids
    }
    report = {
        "seconds": args.seconds,
        "concurrency": args.concurrency,
        "flood_mb": args.flood_mb,
        "slow_uploads": args.slow_uploads,
        **result,
        "memory": memory,
        "rss": samples,
    }
    (OUT / "soak.json").write_text(json.dumps(report, indent=2))
    plot(samples, list(pids), OUT / "soak.png")
    print(json.dumps({k: v for k, v in report.items() if k != "rss"}, indent=2))
    print(f"wrote {OUT / 'soak.json'} and soak.png")
    if result["valid_wrong_or_lost"]:
        raise SystemExit(f"{result['valid_wrong_or_lost']} valid requests were answered wrong or lost")


if __name__ == "__main__":
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    main()
