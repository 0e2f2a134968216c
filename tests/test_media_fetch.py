"""Media URL fetching and its refusals (mmgraph_workers.media.fetch): schemes, private and link-local addresses,
DNS, TLS, redirects, size and time limits. Fetches run against a local HTTP server with a guard that fails the
test if any socket connects outside 127.0.0.0/8."""

from __future__ import annotations

import asyncio
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
import pytest
from bombs import gzip_bomb, send_gzip_bomb

from mmgraph_contract.graph import MediaSpec
from mmgraph_workers.media import MediaError
from mmgraph_workers.media.fetch import _refusal, fetch_bytes


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
