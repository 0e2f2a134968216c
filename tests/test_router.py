"""The frontend's router (mmgraph_workers.frontend.router): placing media on encoder replicas (stand-ins that
run no tower) and a peer watcher that outlives a failing round."""

from __future__ import annotations

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from mmgraph_contract.settings import Routes


def test_the_frontends_peer_watcher_outlives_a_failing_round(monkeypatch):
    """One bad round of re-resolution (a resolver error, a pd answering garbage) must not end the watch: a
    frontend whose watcher died would route to stale addresses for ever."""

    from mmgraph_workers.frontend import router, stage_client

    monkeypatch.setattr(stage_client, "REFRESH_SECONDS", 0.01)
    args = Routes(topology="agg", pd_url="http://pd:1", request_timeout_seconds=5)
    rounds = []

    async def flaky(self) -> None:
        rounds.append(len(rounds))
        if len(rounds) % 2:
            raise OSError("the resolver is down")
        self.pd_info = object()  # answered: the watcher now waits REFRESH_SECONDS between rounds

    monkeypatch.setattr(router.Router, "_refresh_peers", flaky)

    async def run() -> None:
        watcher = asyncio.create_task(router.Router(args, None).watch_peers())
        await asyncio.sleep(1.5)
        assert not watcher.done(), watcher
        watcher.cancel()

    asyncio.run(run())
    assert len(rounds) >= 4


class StandInEncoder:
    """A stand-in for an encoder replica (not the encoder: it runs no tower) at `host`:`port`, for the router's
    placement and bookkeeping: it records each /encode body and /release path, and answers each item with a
    one-float descriptor, or a 400 for an item whose URL contains "bad"."""

    def __init__(self, host: str, port: int):
        self.bodies: list[dict] = []
        self.released: list[str] = []
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path.startswith("/release/"):
                    stand_in.released.append(self.path.removeprefix("/release/"))
                    return self._answer(200, {})
                request = json.loads(body)
                stand_in.bodies.append(request)
                if any("bad" in m["url"] for m in request["media"]):
                    return self._answer(400, {"error": "image 2 is not an image", "status": 400})
                ref = {"agent": "a", "owner": f"http://{host}:{port}", "address": 0, "nbytes": 4}
                items = [
                    {
                        "key": m["url"],
                        "num_tokens": 1,
                        "embeddings": {**ref, "handle": f"{host}-{m['url']}", "dtype": "float32", "shape": [1]},
                    }
                    for m in request["media"]
                ]
                self._answer(200, {"items": items})

            def _answer(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_the_router_sends_each_key_to_its_owner_and_counts_every_call_back():
    """The frontend's placement over two replicas (stand-ins) and one listed address where nothing listens:
    a request's items go one call per replica, each distinct key to its owner, a repeated item in the same call,
    positions as in the request; a refused address's items go to the others; encoding again (pd could not pull)
    moves each item to another replica; a 4xx from one replica releases what the other published; and every
    call is counted back (no replica stays busy)."""

    from mmgraph_workers.frontend.openai_api import RequestError
    from mmgraph_workers.frontend.router import Media, Router
    from mmgraph_workers.ports import free_port
    from mmgraph_workers.protocol import MediaItem

    port = free_port()
    stand_ins = [StandInEncoder(host, port) for host in ("127.0.0.1", "127.0.0.2")]
    args = Routes(
        topology="e-pd",
        encoder_url=f"http://encoder.test:{port}",
        pd_url="http://pd.test:1",
        request_timeout_seconds=10,
        encoder_routing="content",
        encoder_batch_size=1,
    )

    def item(url: str) -> MediaItem:
        return MediaItem(url=url, route=f"image:{url}")

    async def scenario() -> None:
        router = Router(args, None)
        peer = router.peers["encoder"]
        peer._resolved(["127.0.0.1", "127.0.0.2"])
        try:
            urls = [f"data:,{i}" for i in range(12)]
            sent = [*urls, urls[0]]
            media = Media([item(u) for u in sent])
            await router.encode("r1", media)
            owners = {u: peer.owner(f"image:{u}")[0] for u in urls}
            assert media.encoders == [owners[u] for u in sent] and len(set(owners.values())) == 2
            assert [i.key for i in media.encoded] == sent
            for stand_in, address in zip(stand_ins, ("127.0.0.1", "127.0.0.2"), strict=True):
                (call,) = [b for b in stand_in.bodies if b["request_id"] == "r1"]  # one call per replica
                assert call["positions"] == [p for p, u in enumerate(sent) if owners[u] == address]
                assert "route" not in call["media"][0]
            first = list(media.encoders)
            await router.encode("r1", media, elsewhere=True)
            assert all(a != b for a, b in zip(first, media.encoders, strict=True))

            with pytest.raises(RequestError, match="not an image"):
                await router.encode("r2", Media([item(u) for u in [*urls[:6], "data:,bad"]]))
            other = stand_ins[1 if peer.owner("image:data:,bad")[0] == "127.0.0.1" else 0]  # not the 400's
            published = sum(len(b["media"]) for b in other.bodies if b["request_id"] == "r2")
            await asyncio.sleep(0.5)  # the release runs in a task of its own
            assert published and len(other.released) == published

            peer._resolved(["127.0.0.1", "127.0.0.2", "127.0.0.3"])  # .3: listed, nothing listening
            media = Media([item(u) for u in urls])
            await router.encode("r3", media)
            assert [i.key for i in media.encoded] == urls and "127.0.0.3" not in media.encoders
            assert any(peer.owner(f"image:{u}")[0] == "127.0.0.3" for u in urls)  # so some were refused
            assert all(count == 0 for count in peer.outstanding.values()), peer.outstanding
        finally:
            await router.http.aclose()

    try:
        asyncio.run(scenario())
    finally:
        for stand_in in stand_ins:
            stand_in.stop()
