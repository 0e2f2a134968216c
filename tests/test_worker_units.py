"""Pieces of the workers that need no model and no engine: routing, the transfer pool, URL safety rules, media
decoding caps. URL fetches run against a local HTTP server with a guard that fails the test if any socket
connects outside 127.0.0.0/8."""

from __future__ import annotations

import asyncio
import io
import json
import socket
import ssl
import sys
import threading
import time
import tracemalloc
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from dataplane.conftest import gzip_bomb, send_gzip_bomb
from media_samples import SAMPLES
from PIL import Image

from mmgraph_contract.flags import from_argv
from mmgraph_contract.graph import MediaSpec
from mmgraph_contract.settings import EngineSettings, Routes, Server
from mmgraph_workers.media import MediaError
from mmgraph_workers.media.fetch import _refusal, fetch_bytes
from mmgraph_workers.media.image import decode_image
from mmgraph_workers.peers import NoReplica, Peer
from mmgraph_workers.transfer import Pool


@pytest.fixture
def loopback_only():
    """Every socket connect outside loopback fails the test (and is refused), whatever code makes it."""
    sys.path.insert(0, str(Path(__file__).parent / "dataplane" / "guard"))
    from loopback_guard import install

    attempts: list = []
    undo = install(attempts.append)
    yield attempts
    undo()
    assert attempts == [], f"connections outside loopback were attempted: {attempts}"


@pytest.fixture(scope="module")
def server():
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.startswith("/to/"):
                self.send_response(302)
                self.send_header("Location", self.path[len("/to/") :])
                self.end_headers()
                return
            if self.path == "/nolocation":  # a redirect that says nowhere
                self.send_response(302)
                self.end_headers()
                return
            if self.path == "/bomb":  # ~2 KB that inflate to 256 MiB
                send_gzip_bomb(self)
                return
            if self.path == "/host":  # echoes the Host header it got
                body = self.headers["Host"].encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            if self.path == "/loop":  # redirects to itself, for ever
                self.send_response(302)
                self.send_header("Location", "/loop")
                self.end_headers()
                return
            if self.path in ("/slow", "/streamed"):  # no Content-Length: the body streams until the connection ends
                self.send_response(200)
                self.end_headers()
                for _ in range(50):
                    self.wfile.write(b"x" * 1000)
                    self.wfile.flush()
                    if self.path == "/slow":
                        time.sleep(0.1)
                return
            body = b"x" * 5000 if self.path == "/big" else b"hello"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def fetch(url: str, verify: ssl.SSLContext | bool = True, **policy) -> bytes:
    async def go() -> bytes:
        async with httpx.AsyncClient(trust_env=False, verify=verify) as client:
            return await fetch_bytes(url, MediaSpec(**policy), client)

    return asyncio.run(go())


@pytest.fixture
def names(monkeypatch):
    """A resolver for made-up names (`names["media.test"] = [addresses]`, or a callable to run instead); other
    names resolve as usual. It replaces socket.getaddrinfo, which the fetch's resolver threads call."""
    table: dict[str, Any] = {}
    real = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        if host not in table:
            return real(host, port, *args, **kwargs)
        if callable(table[host]):
            return table[host]()
        return [
            (socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in table[host]
        ]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return table


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    """HTTPS on 127.0.0.1 with a certificate for media.test only, from a test CA; records SNI and Host."""
    from kubecluster import Pki

    pki = Pki(tmp_path_factory.mktemp("pki"))
    crt, key = pki.issue("media", "media.test", sans=["media.test"])
    seen: dict[str, list] = {"sni": [], "host": []}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen["host"].append(self.headers["Host"])
            self.send_response(200)
            self.send_header("Content-Length", "5")
            self.end_headers()
            self.wfile.write(b"hello")

        def log_message(self, *args) -> None:
            pass

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(crt, key)
    context.sni_callback = lambda sock, name, ctx: seen["sni"].append(name)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd.server_address[1], ssl.create_default_context(cafile=str(pki.root / "ca.crt")), seen
    httpd.shutdown()
    httpd.server_close()


LOCAL = {"allowed_schemes": frozenset({"http", "https", "data"}), "allow_private_networks": True}


def test_fetch_from_an_allowed_private_host(server, loopback_only):
    assert fetch(f"{server}/a", **LOCAL) == b"hello"


def test_body_cut_off_past_max_bytes(server, loopback_only):
    with pytest.raises(MediaError, match="1000 byte limit") as info:
        fetch(f"{server}/big", **LOCAL, max_bytes=1000)
    assert info.value.status == 413


@pytest.mark.parametrize("target", ["http://169.254.169.254/latest/", "http://[fe80::1]/x"])
def test_redirect_to_link_local_refused_before_connecting(server, loopback_only, target):
    with pytest.raises(MediaError, match="link-local") as info:
        fetch(f"{server}/to/{target}", **LOCAL)
    assert info.value.status == 403


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:9/x", "http://10.0.0.1/x", "http://192.168.1.1/x", "http://localhost/x"]
)
def test_private_refused_by_default_before_connecting(loopback_only, url):
    with pytest.raises(MediaError, match="private or loopback"):
        fetch(url, allowed_schemes=frozenset({"http"}))


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://x/y", "gopher://x", "http://example.com/"])
def test_schemes_outside_the_policy_refused(loopback_only, url):
    with pytest.raises(MediaError, match="is not allowed for media"):
        fetch(url)  # default policy: https and data only


def test_a_streamed_body_is_cut_off_past_max_bytes_without_a_content_length(server, loopback_only):
    with pytest.raises(MediaError, match="1000 byte limit") as info:
        fetch(f"{server}/streamed", **LOCAL, max_bytes=1000)
    assert info.value.status == 413


def test_a_slow_body_hits_the_fetch_deadline(server, loopback_only):
    started = time.monotonic()
    with pytest.raises(MediaError, match=r"longer than 0\.5 s") as info:
        fetch(f"{server}/slow", **LOCAL, fetch_timeout_seconds=0.5)
    assert info.value.status == 408 and time.monotonic() - started < 2


def test_redirects_are_followed_a_bounded_number_of_times(server, loopback_only):
    with pytest.raises(MediaError, match="redirected more than"):
        fetch(f"{server}/loop", **LOCAL)


def test_the_socket_guard_is_loaded_and_refuses_outside_loopback(loopback_only):
    """Positive control: the guard the fetch tests rely on really refuses, before any packet leaves."""
    with socket.socket() as sock, pytest.raises(ConnectionRefusedError, match="test guard"):
        sock.connect(("10.255.255.1", 9))
    assert loopback_only == [("10.255.255.1", 9)]
    loopback_only.clear()  # seen: the fixture's own check must not fail on this deliberate attempt


@pytest.mark.parametrize("answer", [["93.184.216.34", "10.0.0.5"], ["10.0.0.5", "93.184.216.34"]])
def test_a_name_resolving_to_public_and_private_addresses_is_refused(names, loopback_only, answer):
    """Every address of the answer must pass, whichever comes first (else a rebinding name gets through)."""
    names["mixed.test"] = answer
    with pytest.raises(MediaError, match=r"'mixed\.test' resolves to a private or loopback address") as info:
        fetch("https://mixed.test/a.png")
    assert info.value.status == 403 and "10.0.0.5" not in str(info.value)  # the name, never what it resolved to


def test_https_goes_to_the_checked_address_and_verifies_the_name(names, tls_server, loopback_only):
    """The default scheme: the connection goes to the address that was checked, while TLS sends the URL's host
    as SNI and verifies the certificate against it (not against the address)."""
    port, trust, seen = tls_server
    names["media.test"] = ["127.0.0.1"]
    assert fetch(f"https://media.test:{port}/a.png", verify=trust, **LOCAL) == b"hello"
    assert seen["sni"][-1] == "media.test" and seen["host"][-1] == f"media.test:{port}"
    names["other.test"] = ["127.0.0.1"]  # same address, a name the certificate does not carry
    with pytest.raises(MediaError, match=r"cannot fetch media from 'other\.test': ConnectError") as info:
        fetch(f"https://other.test:{port}/a.png", verify=trust, **LOCAL)
    assert "certificate" in str(info.value).lower() and info.value.status == 422


def test_a_compressed_body_is_refused_before_it_is_inflated(server, loopback_only):
    """A server that compresses whatever the client asks (2 KB on the wire, 256 MiB inflated): refused from its
    headers, and nothing inflates it (memory measured, not only the answer)."""
    gzip_bomb()  # built before measuring
    tracemalloc.start()
    try:
        with pytest.raises(MediaError, match="Content-Encoding 'gzip, gzip'") as info:
            fetch(f"{server}/bomb", **LOCAL, max_bytes=1 << 20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.value.status == 422
    assert peak < 8 << 20, f"{peak >> 20} MiB allocated while refusing a 2 KB body"


def test_dns_runs_within_the_fetch_deadline_on_threads_of_its_own(names, loopback_only):
    """A resolver that hangs: the fetch gives up at its deadline (408), and the loop's default executor, which
    decodes images and runs the tower, stays free meanwhile."""
    names["hang.test"] = lambda: time.sleep(3) or []

    async def go() -> tuple[list, float]:
        loop = asyncio.get_running_loop()
        async with httpx.AsyncClient(trust_env=False) as client:
            policy = MediaSpec(**LOCAL, fetch_timeout_seconds=0.5)
            fetches = [asyncio.create_task(fetch_bytes("http://hang.test/a", policy, client)) for _ in range(6)]
            await asyncio.sleep(0.1)
            started = time.monotonic()
            await loop.run_in_executor(None, lambda: None)
            default_free = time.monotonic() - started
            return await asyncio.gather(*fetches, return_exceptions=True), default_free

    started = time.monotonic()
    results, default_free = asyncio.run(go())
    assert all(isinstance(r, MediaError) and r.status == 408 for r in results), results
    assert time.monotonic() - started < 2 and default_free < 0.2


@pytest.mark.parametrize(
    ("address", "private_allowed", "why"),
    [
        ("fd00:ec2::254", True, "metadata"),  # AWS's IPv6 metadata service
        ("100.100.100.200", True, "metadata"),  # Alibaba's
        ("fd20:ce::254", True, "metadata"),  # GCP's IPv6 one
        ("64:ff9b:1::a9fe:a9fe", True, "link-local"),  # local-use NAT64 of 169.254.169.254
        ("64:ff9b::a9fe:a9fe", True, "link-local"),  # NAT64 of 169.254.169.254
        ("::ffff:169.254.169.254", True, "link-local"),
        ("64:ff9b::a00:1", False, "private"),  # NAT64 of 10.0.0.1
        ("2002:a00:1::1", False, "private"),  # 6to4 of 10.0.0.1
        ("::a00:1", False, "private"),  # IPv4-compatible 10.0.0.1
    ],
)
def test_metadata_and_ipv4_inside_ipv6_are_judged_as_what_they_reach(
    names, loopback_only, address, private_allowed, why
):
    names["inside.test"] = [address]
    policy = {**LOCAL, "allow_private_networks": private_allowed}
    with pytest.raises(MediaError, match=why) as info:
        fetch("http://inside.test/a", **policy)
    assert info.value.status == 403 and address not in str(info.value)


@pytest.mark.parametrize(
    "address",
    [
        "fec0::1",  # deprecated site-local, which ipaddress's is_global calls global
        "5f00::1",  # SRv6 segment identifiers, outside global unicast space
        "::ffff:10.0.0.1",  # IPv4-mapped 10.0.0.1
        "::ffff:0:a00:1",  # IPv4-translated (SIIT) 10.0.0.1
        "::10.0.0.1",  # IPv4-compatible 10.0.0.1
        "2002:a00:1::1",  # 6to4 of 10.0.0.1
        "2001:0:4136:e378:8000:63bf:3fff:fdd2",  # Teredo
        "100.64.0.1",  # carrier-grade NAT
    ],
)
def test_an_address_short_of_global_is_refused_unless_private_networks_are_allowed(names, loopback_only, address):
    names["inside.test"] = [address]
    with pytest.raises(MediaError, match="private or loopback") as info:
        fetch("http://inside.test/a", allowed_schemes=frozenset({"http"}))
    assert info.value.status == 403 and address not in str(info.value)
    assert _refusal(address, MediaSpec(allow_private_networks=True)) is None, "allowed where the graph says so"


@pytest.mark.parametrize(
    "address",
    [
        "2001:0:4136:e378:8000:63bf:5601:5601",  # Teredo to client 169.254.169.254 (stored inverted)
        "2002:a9fe:a9fe::1",  # 6to4 of 169.254.169.254
        "::ffff:0:a9fe:a9fe",  # IPv4-translated 169.254.169.254
        "::ffff:0:6464:64c8",  # IPv4-translated 100.100.100.200 (metadata)
    ],
)
def test_link_local_and_metadata_inside_a_tunnel_are_refused_even_with_private_networks(names, loopback_only, address):
    names["inside.test"] = [address]
    with pytest.raises(MediaError, match="link-local") as info:
        fetch("http://inside.test/a", **LOCAL)
    assert info.value.status == 403


def test_a_slow_domain_takes_one_resolver_thread_not_all(names, server, loopback_only):
    """The DNS server behind one name answers slowly (faked where the resolver threads call it, socket.getaddrinfo:
    a remote DNS server is what is slow): 20 fetches of that name wait on one lookup, and a fetch of another host
    finds a resolver thread at once (with a lookup per fetch, the 20 took all 16)."""
    answer = threading.Event()

    def slow() -> list:
        answer.wait(10)
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    names["slow.test"] = slow

    async def go() -> tuple[bytes, float, list]:
        async with httpx.AsyncClient(trust_env=False) as client:
            policy = MediaSpec(**LOCAL, fetch_timeout_seconds=5)
            stuck = [asyncio.create_task(fetch_bytes("http://slow.test/a", policy, client)) for _ in range(20)]
            await asyncio.sleep(0.2)
            started = time.monotonic()
            other = await fetch_bytes(f"{server}/a", policy, client)
            took = time.monotonic() - started
            answer.set()
            return other, took, await asyncio.gather(*stuck, return_exceptions=True)

    try:
        other, took, stuck = asyncio.run(go())
    finally:
        answer.set()
    assert other == b"hello" and took < 1.0, f"another host waited {took:.1f} s for a resolver thread"
    assert all(isinstance(r, MediaError) and "cannot resolve media host 'slow.test'" in str(r) for r in stuck), stuck


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://[::1/a.png", "malformed media URL"),
        ("http://127.0.0.1:99999/a.png", "malformed media URL"),
        ("http://127.0.0.1:port/a.png", "malformed media URL"),
        ("http://" + "a" * 64 + ".test/a.png", "malformed media URL"),  # a label IDNA cannot encode
        ("http://127.0.0.1/a\x01b.png", "malformed media URL"),  # httpx's InvalidURL is no HTTPError
    ],
)
def test_malformed_urls_are_the_clients_mistake(loopback_only, url, message):
    with pytest.raises(MediaError, match=message) as info:
        fetch(url, **LOCAL)
    assert info.value.status == 400


def test_a_non_ascii_host_is_fetched_by_its_idna_name(server, names, loopback_only):
    port = server.rsplit(":", 1)[1]
    names["xn--mdia-bpa.test"] = ["127.0.0.1"]
    assert fetch(f"http://média.test:{port}/host", **LOCAL) == f"xn--mdia-bpa.test:{port}".encode()


def test_a_redirect_without_location_is_an_error(server, loopback_only):
    with pytest.raises(MediaError, match="redirects without a Location") as info:
        fetch(f"{server}/nolocation", **LOCAL)
    assert info.value.status == 422


def test_data_url_size_and_encoding_checked():
    with pytest.raises(MediaError, match="byte limit"):
        fetch("data:image/png;base64," + "A" * 4000, max_bytes=1000)
    with pytest.raises(MediaError, match="not valid base64"):
        fetch("data:image/png;base64,@@@")


def test_pixel_cap_checked_before_any_pixel_is_decoded(monkeypatch):
    """A size just over the graph's cap and far under Pillow's own bomb limit: refused from the header alone."""
    buf = io.BytesIO()
    Image.new("RGB", (300, 200)).save(buf, format="PNG")
    loads = []
    original = Image.Image.load
    monkeypatch.setattr(Image.Image, "load", lambda self: loads.append(self.size) or original(self))
    with pytest.raises(MediaError, match="300x200 = 60000 pixels"):
        decode_image(buf.getvalue(), MediaSpec(max_pixels=59_999))
    assert loads == [], "pixels were decoded before the cap refused the image"
    decode_image(buf.getvalue(), MediaSpec(max_pixels=60_000))
    assert loads, "control: an image within the cap is decoded"


def test_pixel_cap_checked_before_decoding():
    buf = io.BytesIO()
    Image.new("RGB", (300, 200)).save(buf, format="PNG")
    with pytest.raises(MediaError, match="300x200"):
        decode_image(buf.getvalue(), MediaSpec(max_pixels=50_000))
    assert decode_image(buf.getvalue(), MediaSpec()).size == (300, 200)


@pytest.mark.parametrize(("size", "refused"), [((4000, 16), True), ((16, 4000), True), ((3200, 16), False)])
def test_an_aspect_ratio_over_200_is_refused_before_decoding(size, refused):
    """Processors scale the short side up (LLaVA to 336 px: 4000x16 would be 84000x336 in memory), so a thin image
    is refused from its header, for every family, as Qwen2-VL's processor would."""
    buf = io.BytesIO()
    Image.new("RGB", size).save(buf, format="PNG")
    if refused:
        with pytest.raises(MediaError, match="aspect ratio over 200") as info:
            decode_image(buf.getvalue(), MediaSpec())
        assert info.value.status == 400
    else:
        assert decode_image(buf.getvalue(), MediaSpec()).size == size


@pytest.mark.parametrize("sample", SAMPLES)
def test_an_image_decodes_to_the_pixels_vllms_loader_gives(sample):
    """EXIF orientation applied and transparency composited onto white, as vLLM's loader does; the control (what
    mmgraph did before: Pillow's plain RGB conversion) differs, so the comparison can fail."""
    from vllm.multimodal.media.image import ImageMediaIO

    data = SAMPLES[sample]()
    theirs = np.asarray(ImageMediaIO().load_bytes(data).media)
    assert np.array_equal(np.asarray(decode_image(data, MediaSpec())), theirs)
    naive = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert naive.shape != theirs.shape or not np.array_equal(naive, theirs), "the sample shows nothing"


def test_only_safe_image_formats_open():
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="TIFF")
    with pytest.raises(MediaError, match="not one of PNG"):
        decode_image(buf.getvalue(), MediaSpec())


def test_peer_picks_the_least_busy_replica():
    peer = Peer("pd", "http://pd.ns.svc:8002", addresses=["10.0.0.1", "10.0.0.2"])
    (a1, first), (a2, second) = peer.acquire(), peer.acquire()
    assert {first, second} == {"http://10.0.0.1:8002", "http://10.0.0.2:8002"}
    a3, third = peer.acquire()
    assert third in (first, second)
    peer.release(a3)
    assert peer.acquire(avoid={"10.0.0.1"}) == ("10.0.0.2", "http://10.0.0.2:8002")  # 10.0.0.1 refused, say
    for address in (a1, a2, "10.0.0.2"):
        peer.release(address)
    assert peer.outstanding == {"10.0.0.1": 0, "10.0.0.2": 0}
    with pytest.raises(NoReplica, match="no replica took the connection"):
        peer.acquire(avoid=set(peer.addresses))


def test_pd_and_decode_are_paired_by_vllm_version_while_a_rollout_changes_it():
    """NIXL moves KV only between engines of one vLLM version: mid-rollout, a prefill goes to a pd whose version
    some decode runs, and its decode to one of that version; a replica whose version is not known yet (or that
    does not say) is never passed over, and where no replica of the wanted version is left (or none took the
    connection), one of another is tried."""
    pd = Peer("pd", "http://pd:8002", addresses=["10.0.0.1", "10.0.0.2"])
    decode = Peer("decode", "http://decode:8003", addresses=["10.0.0.3", "10.0.0.4"])
    pd.versions = {"10.0.0.1": "0.32.0", "10.0.0.2": "0.33.0"}
    decode.versions = {"10.0.0.3": "0.32.0"}
    assert decode.known_versions() is None and pd.other_versions(decode.known_versions()) == set()  # .4 unknown
    decode.versions["10.0.0.4"] = "0.32.0"
    unwanted = pd.other_versions(decode.known_versions())
    assert unwanted == {"10.0.0.2"}  # no decode reads 0.33's KV
    assert {pd.acquire(unwanted=unwanted)[0] for _ in range(4)} == {"10.0.0.1"}
    assert pd.acquire(avoid={"10.0.0.1"}, unwanted=unwanted)[0] == "10.0.0.2"  # .1 refused: the other, at last
    decode.versions["10.0.0.4"] = "0.33.0"
    assert pd.other_versions(decode.known_versions()) == set()
    assert decode.other_versions({"0.33.0"}) == {"10.0.0.3"}
    assert decode.acquire(unwanted={"10.0.0.3", "10.0.0.4"})[0] in {"10.0.0.3", "10.0.0.4"}  # none wanted: any
    pd.versions["10.0.0.2"] = ""  # a release that does not say
    assert pd.other_versions({"0.32.0"}) == set() and pd.other_versions({"0.31.0"}) == {"10.0.0.1"}
    pd._resolved(["10.0.0.2", "10.0.0.5"])  # .1 left the Service: its version is forgotten (an address is reused)
    assert set(pd.versions) == {"10.0.0.2"}


def test_idle_replicas_take_turns():
    peer = Peer("encoder", "http://encoder:8001", addresses=["10.0.0.1", "10.0.0.2", "10.0.0.3"])
    picks = []
    for _ in range(6):
        address, _ = peer.acquire()
        picks.append(address)
        peer.release(address)
    assert picks == ["10.0.0.1", "10.0.0.2", "10.0.0.3"] * 2


def metric_value(name: str) -> float:
    """A series of this process's default Prometheus registry (0 when it was never set)."""
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name) or 0.0


def owners_of(peer: Peer, keys: list[str]) -> dict[str, str]:
    """key -> the replica that owns it on an idle peer."""
    picked = {}
    for key in keys:
        address, spilled = peer.owner(key)
        assert not spilled  # nothing is busy: every key goes to its first owner
        picked[key] = address
    return picked


def test_keys_spread_over_encoders_and_move_only_with_the_replica_that_came_or_went():
    """Routing by content: each key has one owner, the owners' shares are even, and scaling the stage moves only
    the keys the new replica takes (and, scaling down, only the leaving one's), so the other caches stay warm."""
    keys = [f"image:{i:064x}" for i in range(4000)]
    addresses = [f"10.0.0.{i}" for i in range(1, 4)]
    three = owners_of(Peer("encoder", "http://e:8001", addresses=addresses), keys)
    assert owners_of(Peer("encoder", "http://e:8001", addresses=addresses[::-1]), keys) == three  # order-blind
    shares = [list(three.values()).count(a) / len(keys) for a in addresses]
    assert all(0.25 < share < 0.42 for share in shares), shares

    four = owners_of(Peer("encoder", "http://e:8001", addresses=[*addresses, "10.0.0.4"]), keys)
    moved = [k for k in keys if four[k] != three[k]]
    assert {four[k] for k in moved} == {"10.0.0.4"}  # only to the newcomer
    assert 0.18 < len(moved) / len(keys) < 0.32  # about a quarter

    two = owners_of(Peer("encoder", "http://e:8001", addresses=addresses[:2]), keys)
    moved = [k for k in keys if two[k] != three[k]]
    assert {three[k] for k in moved} == {"10.0.0.3"}  # only the leaver's keys


def test_a_busy_owner_spills_its_keys_to_the_next_owner_and_takes_them_back_when_free():
    """Bounded loads: a hot key (every call for one image) fills its owner up to 1.25x the mean (or the floor,
    what one pass takes), then goes to the key's next owner instead of queueing; once calls end, the owner takes
    it again."""
    peer = Peer("encoder", "http://e:8001", addresses=["10.0.0.1", "10.0.0.2", "10.0.0.3"])
    owner, second, _ = peer.owners("image:hot")
    picks = []
    for _ in range(6):  # six calls for the key, each in flight while the next is placed
        picks.append(peer.owner("image:hot"))
        assert peer.take(picks[-1][0]) == peer.url_of(picks[-1][0])
    # the bound, ceil(1.25 * (calls in flight + 1) / 3), is 1, 1, 2, 2, 3, 3: the hot key alternates between its
    # first two owners; the third is never needed
    assert picks == [(owner, False), (second, True)] * 3
    assert peer.owner("image:hot", floor=4) == (owner, False)  # 3 in flight: still one pass of a batch of 4
    for address, _ in picks:
        peer.release(address)
    assert peer.owner("image:hot") == (owner, False)
    assert peer.owner("image:hot", avoid={owner}) == (second, False)  # a refusal, say: the next owner, no spill
    with pytest.raises(NoReplica, match="no ready replica"):
        Peer("encoder", "http://e:8001").owner("image:hot")


def test_peer_with_no_ready_replica_fails_naming_the_stage():
    with pytest.raises(NoReplica, match="pd: no ready replica"):
        Peer("pd", "http://pd:1").acquire()


def test_peer_re_resolves_and_keeps_addresses_when_dns_fails():
    peer = Peer("encoder", "http://localhost:8001")
    asyncio.run(peer.refresh())
    assert "127.0.0.1" in peer.addresses
    gone = Peer("encoder", "http://no-such-host.invalid:8001", addresses=["127.0.0.9"])
    asyncio.run(gone.refresh())
    assert gone.addresses == ["127.0.0.9"]


def test_a_peer_trusts_an_address_while_it_may_still_be_draining(tmp_path, monkeypatch):
    """pd and decode accept an owner the stage's Service resolves to: a new replica (resolved again on a miss),
    and one that has just left the Service (it still serves pulls while it drains), but not one gone longer than
    a pod's grace period, nor one never seen."""
    from mmgraph_workers import peers

    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 encoder.g.local\n")
    peer = Peer("encoder", "http://encoder.g.local:8001")
    assert asyncio.run(peer.knows("127.0.0.1", str(hosts)))
    hosts.write_text("127.0.0.1 encoder.g.local\n127.0.0.2 encoder.g.local\n")  # a new replica: a miss resolves
    assert asyncio.run(peer.knows("127.0.0.2", str(hosts)))
    hosts.write_text("127.0.0.2 encoder.g.local\n")  # 127.0.0.1 left the Service, and drains
    peer.refreshed = -1e9
    assert asyncio.run(peer.knows("127.0.0.1", str(hosts))) and peer.addresses == ["127.0.0.2"]
    monkeypatch.setattr(peers, "TRUST_SECONDS", 0.0)  # ...longer ago than a grace period
    assert not asyncio.run(peer.knows("127.0.0.1", str(hosts)))
    assert not asyncio.run(peer.knows("127.0.0.3", str(hosts)))


def test_pool_allocates_aligned_and_coalesces():
    pool = Pool(4096)
    a, b, c = pool.alloc(100), pool.alloc(300), pool.alloc(256)
    assert (a, b, c) == (0, 256, 768)
    assert pool.alloc(4096) is None
    pool.release(b, 300)
    pool.release(a, 100)
    assert pool.alloc(512) == 0  # the two freed neighbours merged
    pool.release(0, 512)
    pool.release(c, 256)
    assert pool.free == [(0, 4096)] and pool.used() == 0


@pytest.mark.parametrize(
    ("engine_arg", "backend"),
    [(None, "uni"), ("--distributed-executor-backend=mp", "mp"), ("--tensor-parallel-size=2", None)],
)
def test_cpu_engines_keep_the_model_in_the_engine_core_unless_told_otherwise(monkeypatch, engine_arg, backend):
    """On CPU the pd/decode engines run vLLM's `uni` executor (the worker-process queue stalled under load), and
    say so to vLLM's CPU platform, which would turn `uni` back into `mp`; a user's parallelism settings win."""
    import os

    import torch

    from mmgraph_workers import cpu
    from mmgraph_workers import vllm_args as engine

    if torch.cuda.is_available():
        pytest.skip("CPU-only behaviour")
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    argv = ["--model=/models/tiny", "--served-model-name=tiny", "--port=1", "--kv-role=consumer"]
    args = from_argv(EngineSettings, argv + ([f"--engine-arg={engine_arg}"] if engine_arg else []))
    built = engine.engine_args(args, "decode")
    assert built.distributed_executor_backend == backend
    assert built.kv_transfer_config.kv_connector == "NixlConnector"
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "1", "engine_args has no side effects"
    cpu.apply_engine_env(engine.user_engine_args(args)[0])
    assert (engine_arg is None) == (os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0")


def test_encoder_passes_together_what_arrived_during_a_pass_and_a_bad_request_fails_alone():
    """The first request starts a pass at once; those that arrive while it runs share the next pass (less one
    whose client left); that pass fails on one request's image, so each is retried alone and only that one fails."""
    from mmgraph_workers.batching import Batcher

    started, release, calls = threading.Event(), threading.Event(), []

    def forward(images):  # stands in for the processor and vision tower; the real ones run in tests/dataplane
        calls.append(list(images))
        started.set()
        release.wait(10)
        if "broken" in images:
            raise ValueError("the tower failed on this image")
        return [f"emb-{image}" for image in images]

    async def scenario():
        batcher = Batcher(forward, max_items=16)
        first = asyncio.create_task(batcher.run(["a"]))
        await asyncio.to_thread(started.wait, 10)
        later = [asyncio.create_task(batcher.run(images)) for images in (["b", "cc"], ["broken"], ["d"], ["gone"])]
        await asyncio.sleep(0.05)
        later[-1].cancel()  # its client left while it waited: no pass includes it
        release.set()
        return await first, await asyncio.gather(*later, return_exceptions=True)

    first, (two, broken, last, gone) = asyncio.run(scenario())
    assert isinstance(gone, asyncio.CancelledError)
    assert calls == [["a"], ["b", "cc", "broken", "d"], ["b", "cc"], ["broken"], ["d"]]
    assert first == ["emb-a"]
    assert two == ["emb-b", "emb-cc"]
    assert isinstance(broken, ValueError)
    assert last == ["emb-d"]


def test_the_encoders_queue_is_bounded():
    """While a pass runs, requests wait up to `max_waiting` images; past that the encoder says it is busy at once
    (a 503 with Retry-After) instead of queueing without end; a lone request is never refused."""
    from mmgraph_workers.batching import Batcher, Busy

    started, release = threading.Event(), threading.Event()

    def forward(images):
        started.set()
        release.wait(10)
        return images

    async def scenario():
        batcher = Batcher(forward, max_items=4, max_waiting=5)
        first = asyncio.create_task(batcher.run(list(range(9))))  # more than max_waiting, alone: accepted
        await asyncio.to_thread(started.wait, 10)
        waiting = [asyncio.create_task(batcher.run([i, i])) for i in range(2)]  # 4 images wait
        await asyncio.sleep(0)
        assert metric_value("mmgraph_encoder_items_waiting") == 4  # the series an encoder's HPA steers on
        with pytest.raises(Busy, match="4 items waiting"):
            await batcher.run([7, 7])  # 6 > 5
        release.set()
        return await first, await asyncio.gather(*waiting)

    first, waiting = asyncio.run(scenario())
    assert first == list(range(9)) and waiting == [[0, 0], [1, 1]]


def test_the_embedding_cache_keeps_the_most_recently_used_within_its_bytes():
    import torch

    from mmgraph_workers.embedding_cache import Embedding, EmbeddingCache

    def item(n: int) -> Embedding:
        return Embedding(torch.zeros(n, 4), {}, f"k{n}")  # n * 16 bytes

    cache = EmbeddingCache(capacity_bytes=100)
    evicted = metric_value("mmgraph_encoder_cache_evictions_total")
    cache.put("bytes-a", "a", item(2))
    cache.put("bytes-b", "b", item(2))
    cache.put("bytes-c", "c", item(2))  # 96 bytes: all fit
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("bytes-d", "d", item(2))  # 128 bytes: the least recently used (b) goes
    assert cache.get("b") is None and all(cache.get(k) is not None for k in "acd")
    assert cache.used == 96 and metric_value("mmgraph_encoder_cache_evictions_total") == evicted + 1
    assert metric_value("mmgraph_encoder_cache_bytes") == 96
    cache.put("bytes-huge", "huge", item(10))  # larger than the whole cache: not kept, nothing evicted
    assert cache.get("huge") is None and cache.used == 96


def test_the_embedding_cache_is_keyed_by_decoded_content():
    """Other bytes of the same content (another PNG compression) find the entry once decoded; bytes seen before
    find it without decoding; bytes whose content was evicted miss."""
    import torch

    from mmgraph_workers.embedding_cache import Embedding, EmbeddingCache

    cache = EmbeddingCache(capacity_bytes=64)
    entry = Embedding(torch.zeros(2, 4), {}, "key")
    cache.put("png-fast", "image:pixels", entry)
    assert cache.by_bytes("png-fast") is entry and cache.by_bytes("png-small") is None  # not decoded yet
    assert cache.get("image:pixels") is entry  # what the encoder finds after decoding png-small
    cache.put("png-small", "image:pixels", None)
    assert cache.by_bytes("png-small") is entry and len(cache.items) == 1 and cache.used == 32
    cache.put("other", "image:other", Embedding(torch.zeros(4, 4), {}, "other"))  # 64 bytes: evicts the first
    assert cache.by_bytes("png-fast") is None and cache.by_bytes("png-small") is None


def test_the_embedding_cache_counts_each_entry_once_under_repeated_inserts():
    """One content inserted again (other bytes of it, or two misses of one image in one request) is counted
    once, so hits do not fade as the count drifts. (The encoder uses its cache on its event loop only.)"""
    import torch

    from mmgraph_workers.embedding_cache import Embedding, EmbeddingCache

    cache = EmbeddingCache(capacity_bytes=1000)
    for i in range(400):
        cache.put(f"b{i}", f"k{i % 5}", Embedding(torch.zeros(2, 4), {}, f"k{i % 5}"))
    assert cache.used == 5 * 32 == sum(e.tensor.numel() * e.tensor.element_size() for e in cache.items.values())
    assert all(cache.get(f"k{i}") is not None for i in range(5))


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


def test_content_key_changes_with_whatever_changes_the_kv():
    """The key covers the decoded media, the adapter's metadata and token count, and the encoder's identity
    (tower weights and processor settings); the same item through the same encoder keeps its key."""
    import copy

    import torch

    from mmgraph_workers.content_key import encoder_identity, item_key, media_digest

    tower = torch.nn.Linear(4, 4)
    identity = encoder_identity(tower, {"max_pixels": 12544})
    image = Image.new("RGB", (96, 64), (10, 20, 30))
    digest = media_digest(image)
    key = item_key(identity, "image", digest, {"grid_thw": [1, 4, 6]}, 6)
    assert key == item_key(
        encoder_identity(tower, {"max_pixels": 12544}), "image", media_digest(image.copy()), {"grid_thw": [1, 4, 6]}, 6
    )
    other_pixels = image.copy()
    other_pixels.putpixel((0, 0), (10, 20, 31))
    retrained = torch.nn.Linear(4, 4)
    variants = [
        item_key(identity, "image", media_digest(other_pixels), {"grid_thw": [1, 4, 6]}, 6),
        item_key(identity, "image", media_digest(image.convert("L").convert("RGB")), {"grid_thw": [1, 4, 6]}, 6),
        item_key(identity, "image", digest, {"grid_thw": [1, 6, 4]}, 6),
        item_key(identity, "image", digest, {"grid_thw": [1, 4, 6]}, 8),
        item_key(identity, "video", digest, {"grid_thw": [1, 4, 6]}, 6),
        item_key(encoder_identity(tower, {"max_pixels": 50176}), "image", digest, {"grid_thw": [1, 4, 6]}, 6),
        item_key(encoder_identity(retrained, {"max_pixels": 12544}), "image", digest, {"grid_thw": [1, 4, 6]}, 6),
        item_key(
            encoder_identity(copy.deepcopy(tower).double(), {"max_pixels": 12544}),
            "image",
            digest,
            {"grid_thw": [1, 4, 6]},
            6,
        ),
    ]
    assert len({key, *variants}) == len(variants) + 1
    assert "http" not in key and len(key) == len("mmg1-") + 64


def test_a_users_kv_transfer_config_is_accepted_and_merged_into_the_graphs():
    """One behaviour everywhere: the webhook's rules accept it, the engine merges it over what the graph implies."""
    from pathlib import Path

    import yaml

    from mmgraph_contract.graph import parse
    from mmgraph_contract.rules import problems
    from mmgraph_contract.settings import worker_command
    from mmgraph_contract.vocabulary import StageName
    from mmgraph_workers import vllm_args as engine

    body = yaml.safe_load((Path(__file__).parents[1] / "examples" / "tiny-e-p-d.yaml").read_text())
    user = {"kv_connector_extra_config": {"enforce_handshake_compat": False}}
    body["spec"]["stages"]["decode"]["engineArgs"]["kv-transfer-config"] = user
    graph = parse(body)
    assert problems(graph) == []
    argv = worker_command(
        graph.spec, StageName.DECODE, model="/m", host="127.0.0.1", advertise_host="127.0.0.1", peers={}
    )
    config = engine.engine_args(from_argv(EngineSettings, argv[2:]), "decode").kv_transfer_config
    assert config.kv_connector == "NixlConnector" and config.kv_role == "kv_consumer"
    assert config.kv_connector_extra_config == {"kv_lease_duration": 30, "enforce_handshake_compat": False}


@pytest.mark.parametrize(
    ("topology", "config", "refused"),
    [
        ("e-p-d", {"kv_role": "kv_both"}, "sets kv_role"),
        ("e-p-d", {"kv_connector_extra_config": {"kv_lease_duration": 5}}, "kv_lease_duration"),
        ("e-pd", {"kv_connector_extra_config": {"backends": ["UCX"]}}, "moves no KV cache"),
    ],
)
def test_kv_transfer_config_cannot_change_what_the_graph_decides(topology, config, refused):
    """The frontend times decode's pull by spec.transfer.kvLeaseSeconds: a user's lease, role or connector would
    make that timing wrong, and outside e-p-d the setting would be silently unused."""
    from pathlib import Path

    import yaml

    from mmgraph_contract.graph import parse
    from mmgraph_contract.rules import problems

    body = yaml.safe_load((Path(__file__).parents[1] / "examples" / "tiny-e-p-d.yaml").read_text())
    body["spec"]["topology"] = topology
    if topology != "e-p-d":
        del body["spec"]["stages"]["decode"]
    body["spec"]["stages"]["pd"]["engineArgs"]["kv-transfer-config"] = config
    assert any(refused in p for p in problems(parse(body))), problems(parse(body))


def test_the_content_key_of_a_large_image_does_not_copy_it_whole():
    """The digest reads the pixels in strips: hashing a 4096x4096 image (48 MB decoded, the default maxPixels)
    holds a few MB at once, not a second copy of the image."""
    import tracemalloc

    from mmgraph_workers.content_key import media_digest

    image = Image.new("RGB", (4096, 4096), (1, 2, 3))
    tracemalloc.start()
    try:
        media_digest(image)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16e6, f"{peak / 1e6:.0f} MB held while hashing a 48 MB image"


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"shape": [1 << 40, 1 << 20]}, "not the"),  # a huge shape with a small nbytes: never allocated
        ({"nbytes": 1 << 40, "shape": [1 << 38]}, "less than or equal"),  # over MAX_TENSOR_BYTES
        ({"dtype": "load"}, "dtype"),  # was getattr(torch, dtype)
        ({"shape": []}, "shape"),
        ({"shape": [-4]}, "shape"),
    ],
)
def test_a_descriptor_that_does_not_add_up_is_refused_before_anything_is_allocated(change, why):
    """A TensorRef is a peer's claim: checked on arrival like a client's, before a reader allocates for it."""
    from pydantic import ValidationError

    from mmgraph_workers.protocol import TensorRef

    good = {"handle": "h", "agent": "a", "owner": "http://e:1", "address": 0, "nbytes": 64, "dtype": "float32"}
    TensorRef.model_validate({**good, "shape": [4, 4]})
    with pytest.raises(ValidationError, match=why):
        TensorRef.model_validate({**good, "shape": [4, 4], **change})


@pytest.mark.parametrize(
    ("wanted", "drain", "waits"),
    [(10.0, 35.0, 10.0), (3.0, 35.0, 3.0), (3600.0, 35.0, 13.0), (3600.0, 10.0, 38.0), (10.0, 49.0, 0.0)],
)
def test_a_stopping_stage_waits_for_its_readers_only_within_the_grace_period(wanted, drain, waits):
    """After the preStop delay and uvicorn's drain (up to --drain-seconds), the encoder waits for pd's pulls and
    pd for decode's; the three together stay inside the pod's grace period however long the wait wanted is, so
    the kubelet never kills a read. The default drain leaves a pull's deadline (10 s) whole."""
    from mmgraph_contract.wire import POD_GRACE_SECONDS, PRESTOP_SECONDS
    from mmgraph_workers.server import readers_wait_seconds

    assert readers_wait_seconds(wanted, drain) == waits
    assert PRESTOP_SECONDS + drain + readers_wait_seconds(wanted, drain) < POD_GRACE_SECONDS


def test_the_default_drain_leaves_room_for_the_prestop_delay_and_a_pulls_deadline():

    from mmgraph_contract.graph import TransferSpec
    from mmgraph_contract.wire import POD_GRACE_SECONDS, PRESTOP_SECONDS
    from mmgraph_workers.server import readers_wait_seconds

    args = Server(port=1)
    deadline = TransferSpec().timeout_seconds
    assert readers_wait_seconds(deadline, args.drain_seconds) == deadline
    assert PRESTOP_SECONDS + args.drain_seconds + deadline + 2 <= POD_GRACE_SECONDS


def test_every_field_of_vllms_chat_request_is_honoured_ignored_or_refused():
    """A field vLLM's request model gains later must be decided on, not silently ignored."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    from mmgraph_workers.frontend.openai_api import HONOURED, IGNORED, REFUSED

    assert not (HONOURED & IGNORED or HONOURED & REFUSED or IGNORED & REFUSED)
    fields = set(ChatCompletionRequest.model_fields)
    assert fields - (HONOURED | IGNORED | REFUSED) == set(), "new in vLLM: honour, ignore (as vLLM does) or refuse"
    assert (HONOURED | IGNORED | REFUSED) - fields == set(), "gone from vLLM"


def test_a_refused_field_at_its_default_is_accepted():
    """Clients send defaults explicitly (echo: false, priority: 0): only a value that asks for
    something mmgraph does not do is refused."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    from mmgraph_workers.frontend.openai_api import RequestError, refuse_unsupported

    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    for defaults in ({"prompt_logprobs": None}, {"tool_choice": "none"}, {"priority": 0}, {"echo": False}, {"n": 1}):
        refuse_unsupported(ChatCompletionRequest.model_validate({**base, **defaults}), defaults)
    asked_for = (
        {"prompt_logprobs": 2},
        {"priority": 1},
        {"echo": True},
        {"stream": True, "stream_options": {"continuous_usage_stats": True}},
    )
    for asked in asked_for:
        with pytest.raises(RequestError) as info:
            refuse_unsupported(ChatCompletionRequest.model_validate({**base, **asked}), asked)
        assert info.value.param == list(asked)[-1]


def test_every_field_of_vllms_text_completion_request_is_decided():
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    from mmgraph_workers.frontend.openai_api import IGNORED, TEXT_HONOURED, TEXT_REFUSED

    assert not TEXT_HONOURED & TEXT_REFUSED
    assert set(CompletionRequest.model_fields) - (TEXT_HONOURED | IGNORED | TEXT_REFUSED) == set()


def test_sampling_parameters_travel_intact_and_strangers_are_refused():
    """The message carries vLLM's SamplingParams; an engine stage gets exactly them back (logit_bias's int keys
    included), and a field SamplingParams does not have is an error, not silently dropped."""
    from mmgraph_workers.protocol import sampling, sampling_params

    fields = {"max_tokens": 4, "temperature": 0.5, "seed": 3, "logit_bias": {7: 2.0}, "stop": ["x"]}
    params = sampling_params(json.loads(json.dumps(sampling(**fields))))
    assert {k: getattr(params, k) for k in fields} == fields
    with pytest.raises(ValueError, match="unknown fields"):
        sampling_params({"max_tokens": 4, "remote_block_ids": [1]})


def test_a_peer_cannot_smuggle_kv_parameters_in_sampling():
    """vLLM reads kv_transfer_params from SamplingParams.extra_args: decode checks the KV owner only where the
    message names it, so a message's extra_args are refused outright."""
    from mmgraph_workers.protocol import sampling_params

    with pytest.raises(ValueError, match="extra_args"):
        sampling_params({"extra_args": {"kv_transfer_params": {"remote_host": "10.0.0.9"}}})


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


def test_messages_go_to_the_previous_protocol_version_and_back():
    """What a stage of the previous release reads (media as image URLs) and what this one makes of it again; what
    the previous version cannot say is refused, not dropped."""
    import json

    from mmgraph_workers.protocol import (
        PREVIOUS_VERSION,
        CannotDowngrade,
        EncodeRequest,
        GenerateRequest,
        MediaItem,
        sampling,
    )

    images = [MediaItem(url="data:a"), MediaItem(url="data:b")]
    for message in (
        EncodeRequest(request_id="r", media=images, positions=[1, 0]),
        GenerateRequest(request_id="r", prompt_token_ids=[1, 2], sampling=sampling(max_tokens=3), media=images),
    ):
        old = json.loads(message.dump_for(PREVIOUS_VERSION))
        assert old["version"] == PREVIOUS_VERSION and "media" not in old
        assert (old.get("urls") or old.get("image_urls")) == ["data:a", "data:b"]
        again = type(message).model_validate({**type(message).from_previous(old), "version": message.version})
        assert again == message
        video = message.model_copy(update={"media": [MediaItem(url="data:v", modality="video")]})
        with pytest.raises(CannotDowngrade, match="cannot take video"):
            video.dump_for(PREVIOUS_VERSION)
        with pytest.raises(CannotDowngrade):
            message.dump_for(PREVIOUS_VERSION - 1)


def test_a_refusal_names_the_versions_a_peer_speaks_in_either_releases_words():
    import httpx

    from mmgraph_workers.frontend.stage_client import _versions_spoken

    def refusal(body: object) -> httpx.Response:
        return httpx.Response(400, json=body)

    assert _versions_spoken(refusal({"error": "...", "speaks": [4, 5]})) == {4, 5}
    previous = "protocol version 5 is not spoken here (4); upgrade the graph's stages together"
    assert _versions_spoken(refusal({"error": previous, "status": 400})) == {4}
    assert _versions_spoken(refusal({"error": "bad EncodeRequest: ..."})) == set()
    assert _versions_spoken(refusal(["not", "an", "object"])) == set()


def test_pd_pulls_a_requests_embeddings_by_one_deadline_before_any_of_them_expires():
    """All of a request's items share one deadline (a per-item timeout let 8 items take 80 s, past the encoder's
    time-to-live), and it falls a margin before the first item's owner frees it, counted from when pd got the
    message: owners' seconds, never their clocks. A descriptor of the previous release has no expiry."""
    from mmgraph_workers.handoff import EXPIRY_MARGIN_SECONDS, pull_deadline
    from mmgraph_workers.protocol import EncodedItem, TensorRef

    def item(expires: float | None) -> EncodedItem:
        ref = TensorRef(
            handle="h", agent="a", owner="http://127.0.0.1:1", address=8, nbytes=4, dtype="float32", shape=[1],
            generation=1 if expires else None, expires_in_seconds=expires,
        )  # fmt: skip
        return EncodedItem(key="k", embeddings=ref, num_tokens=1)

    assert pull_deadline([item(60), item(None)], 100.0, 10.0) == 110.0  # the timeout, for all items together
    assert pull_deadline([item(60), item(5)], 100.0, 10.0) == 105.0 - EXPIRY_MARGIN_SECONDS
    assert pull_deadline([item(1)], 100.0, 10.0) <= 100.0  # expired on arrival: not even begun
