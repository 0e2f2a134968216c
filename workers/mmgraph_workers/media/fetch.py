"""Getting media bytes from a URL without becoming a way into the cluster (SSRF) or a memory sink.

The checks live here, where the connection is made: the scheme must be allowed; the host is resolved once, within
the fetch's deadline and on a small executor of its own (a hung resolver must not take the threads that decode
images and run the tower), one lookup per name in flight, shared by the fetches that name it (a slow domain must
not take every resolver thread), and every address it resolves to must be global (unless the graph allows private
networks; link-local and cloud metadata addresses are refused always, and an IPv4 address carried inside IPv6 is
judged too); the connection goes to the address that was checked (TLS still sends and verifies the host name)
and is never reused (a pooled connection verified for one name must not carry another's request); each redirect
is checked the same way; only uncompressed bodies are accepted (a 2 KB gzip body can decode to gigabytes before
any size check), cut off past max_bytes; the whole fetch, redirects included, has one deadline. data: URLs are
decoded with the same size cap. A refusal happens before any connection is attempted, and its message names the
URL's host, never an address it resolved to.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import socket
import threading
import urllib.parse
from concurrent.futures import Future, ThreadPoolExecutor
from typing import NamedTuple

import httpx

from mmgraph_contract.graph import MediaSpec
from mmgraph_workers.media import MediaError

MAX_REDIRECTS = 5
RESOLVERS = ThreadPoolExecutor(16, thread_name_prefix="media-dns")  # at most 16 lookups hung at once
LOOKUPS: dict[str, Future[list]] = {}  # each host name's lookup in flight (_lookup)
LOOKUPS_LOCK = threading.Lock()  # fetches run on any thread's event loop
# Cloud metadata services outside link-local space (AWS's IPv6 one, Alibaba's): refused like 169.254.169.254.
METADATA = {ipaddress.ip_address(a) for a in ("fd00:ec2::254", "fd20:ce::254", "100.100.100.200")}
NAT64 = ipaddress.ip_network("64:ff9b::/96")
NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")  # local-use translation (RFC 8215): IPv4 in the last 32 bits
TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")  # IPv4-translated (SIIT, RFC 2765): IPv4 in the last 32 bits
GLOBAL_UNICAST = ipaddress.ip_network("2000::/3")  # where IANA allocates global IPv6 unicast from (RFC 4291 2.4)
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def media_client() -> httpx.AsyncClient:
    """The HTTP client media fetches use: no proxies from the environment, no connection reuse (connections go to
    checked addresses with the URL's host as SNI, so a pooled one verified for one name must not serve another)."""
    return httpx.AsyncClient(trust_env=False, limits=httpx.Limits(max_keepalive_connections=0))


def scheme_of(url: str) -> str:
    try:
        return urllib.parse.urlsplit(url).scheme.lower()
    except ValueError as err:  # e.g. an unclosed IPv6 bracket
        raise MediaError(f"malformed media URL: {err}") from None


def check_scheme(url: str, policy: MediaSpec) -> None:
    scheme = scheme_of(url)
    if scheme not in policy.allowed_schemes:
        allowed = ", ".join(sorted(policy.allowed_schemes))
        raise MediaError(f"URL scheme {scheme or '(none)'!r} is not allowed for media; allowed: {allowed}")


def decode_data_url(url: str, policy: MediaSpec) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.startswith("data:"):
        raise MediaError("malformed data: URL (expected data:<mime>;base64,<payload>)")
    if ";base64" not in header:
        raise MediaError("data: URLs must be base64-encoded (data:<mime>;base64,...)")
    if len(payload) * 3 // 4 > policy.max_bytes:
        raise MediaError(f"media item is larger than the {policy.max_bytes} byte limit", status=413)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise MediaError("data: URL payload is not valid base64") from None


def _reached(raw: IPAddress) -> list[IPAddress]:
    """The addresses to judge for `raw`: the IPv4 address of a prefix the network translates to IPv4 (mapped,
    NAT64, SIIT, IPv4-compatible) instead of it; an address that carries an IPv4 address a tunnel delivers to (6to4,
    Teredo's server and client) together with it."""
    if isinstance(raw, ipaddress.IPv4Address):
        return [raw]
    if raw.ipv4_mapped:
        return [raw.ipv4_mapped]
    if any(raw in net for net in (NAT64, NAT64_LOCAL, TRANSLATED)) or 1 < int(raw) < 1 << 32:  # ::a.b.c.d, not ::1
        return [ipaddress.IPv4Address(int(raw) & 0xFFFFFFFF)]
    return [raw, *([raw.sixtofour] if raw.sixtofour else raw.teredo or ())]


def _is_global(ip: IPAddress) -> bool:
    """ipaddress's is_global, and for IPv6 within global unicast space: is_global misses deprecated ranges outside
    it (fec0::/10, deprecated site-local; 5f00::/16, SRv6 segment identifiers)."""
    return ip.is_global and (ip.version == 4 or ip in GLOBAL_UNICAST)


def _refusal(address: str, policy: MediaSpec) -> str | None:
    """Why `address` may not be fetched from, or None. Link-local addresses (cloud metadata services live there)
    and the known metadata addresses are refused even where the graph allows private networks; any address short
    of global is refused unless it does."""
    reached = _reached(ipaddress.ip_address(address.split("%", 1)[0]))
    if any(ip.is_link_local or ip.is_multicast or ip.is_unspecified or ip in METADATA for ip in reached):
        return "link-local, metadata, multicast or unspecified"
    if not policy.allow_private_networks and not all(map(_is_global, reached)):
        return "private or loopback"
    return None


def _lookup(host: str) -> Future[list]:
    """The lookup of `host` in flight, started if there is none: fetches of one name share it, so a slow domain
    takes one resolver thread however many fetches name it, and lookups of other names still find threads. It is
    marked running before it is queued: a fetch that gives up cancels its own wait, never the others' lookup."""
    with LOOKUPS_LOCK:
        if host in LOOKUPS:
            return LOOKUPS[host]
        lookup: Future[list] = Future()
        lookup.set_running_or_notify_cancel()
        LOOKUPS[host] = lookup
    lookup.add_done_callback(lambda _: LOOKUPS.pop(host, None))
    RESOLVERS.submit(_settle, lookup, host)
    return lookup


def _settle(lookup: Future[list], host: str) -> None:
    try:
        lookup.set_result(socket.getaddrinfo(host, None, type=socket.SOCK_STREAM))
    except Exception as err:  # the waiting fetches judge it
        lookup.set_exception(err)


async def _resolve(host: str, policy: MediaSpec) -> str:
    """One resolution (shared with concurrent fetches of the name; the caller's deadline bounds the wait); every
    address must pass, and the first is the one we connect to."""
    try:
        infos = await asyncio.wrap_future(_lookup(host))
    except (socket.gaierror, UnicodeError) as err:
        raise MediaError(f"cannot resolve media host {host!r}: {getattr(err, 'strerror', None) or err}") from None
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    for address in addresses:
        why = _refusal(address, policy)
        if why:
            hint = "" if "link-local" in why else " unless the graph sets spec.media.allowPrivateNetworks"
            raise MediaError(f"media host {host!r} resolves to a {why} address: refused{hint}", status=403)
    return addresses[0]


async def fetch_all(urls: list[str], policy: MediaSpec, client: httpx.AsyncClient) -> list[bytes]:
    """Every URL's bytes, fetched concurrently; the first refusal cancels the fetches still running."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(fetch_bytes(url, policy, client)) for url in urls]
    except* Exception as errors:  # the client's mistake first, if there is one
        first = next((e for e in errors.exceptions if isinstance(e, MediaError)), errors.exceptions[0])
        raise first from None
    return [task.result() for task in tasks]


async def fetch_bytes(url: str, policy: MediaSpec, client: httpx.AsyncClient) -> bytes:
    """The bytes behind `url` under `policy`; raises MediaError (4xx) for anything the request got wrong."""
    check_scheme(url, policy)
    if scheme_of(url) == "data":
        return decode_data_url(url, policy)
    limit = policy.fetch_timeout_seconds
    try:
        async with asyncio.timeout(limit):
            return await _fetch(url, policy, client)
    except TimeoutError:
        raise MediaError(f"fetching media took longer than {limit:g} s", status=408) from None


class Target(NamedTuple):
    """An http(s) URL, parsed once: where it points and how to ask for it at a checked address."""

    scheme: str
    host: str  # ASCII (IDNA) form: what is resolved, sent as SNI and named in messages
    port: int
    host_header: str
    path: str
    query: str

    def at(self, address: str) -> str:
        """The URL with its host replaced by `address` (the one that was checked)."""
        netloc = f"[{address}]" if ":" in address else address
        return urllib.parse.urlunsplit((self.scheme, f"{netloc}:{self.port}", self.path, self.query, ""))


def _target(url: str) -> Target:
    """Where an http(s) URL points, or the MediaError a person can act on."""
    try:
        parts = urllib.parse.urlsplit(url)
        host, explicit_port = parts.hostname, parts.port
        host = host.encode("idna").decode() if host else ""
    except ValueError as err:  # a malformed IPv6 literal, a bad port, a name IDNA cannot encode (UnicodeError)
        raise MediaError(f"malformed media URL: {err}") from None
    if not host:
        raise MediaError(f"media URL has no host: {url[:200]}")
    header = f"[{host}]" if ":" in host else host
    return Target(
        parts.scheme,
        host,
        explicit_port or (443 if parts.scheme == "https" else 80),
        header + (f":{explicit_port}" if explicit_port else ""),
        parts.path or "/",
        parts.query,
    )


async def _fetch(url: str, policy: MediaSpec, client: httpx.AsyncClient) -> bytes:
    for _ in range(MAX_REDIRECTS + 1):
        target = _target(url)
        host = target.host
        pinned = target.at(await _resolve(host, policy))
        headers = {
            "Host": target.host_header,
            "Accept": "image/*,video/*,audio/*,*/*;q=0.5",
            "Accept-Encoding": "identity",
        }
        try:
            request = client.build_request("GET", pinned, headers=headers, extensions={"sni_hostname": host})
            response = await client.send(request, stream=True, follow_redirects=False)
        except httpx.InvalidURL as err:  # e.g. a control character in the path
            raise MediaError(f"malformed media URL: {err}") from None
        except httpx.HTTPError as err:
            raise _unreachable(host, err) from None
        try:
            if response.is_redirect:
                location = response.headers.get("location")
                if not location:
                    raise MediaError(f"media URL on {host!r} redirects without a Location", status=422)
                url = urllib.parse.urljoin(url, location)
                check_scheme(url, policy)
                if scheme_of(url) == "data":
                    raise MediaError("media URL redirects to a data: URL")
                continue
            if response.status_code >= 400:
                raise MediaError(f"media URL answered HTTP {response.status_code}", status=422)
            encoding = response.headers.get("content-encoding", "identity").strip().lower()
            if encoding not in ("", "identity"):
                accepted = "only uncompressed bodies are accepted"
                raise MediaError(f"media URL answered with Content-Encoding {encoding[:40]!r}; {accepted}", status=422)
            try:
                declared = int(response.headers.get("content-length") or 0)
            except ValueError:
                raise MediaError("media URL answered with a malformed Content-Length", status=422) from None
            if declared > policy.max_bytes:
                raise MediaError(f"media item is larger than the {policy.max_bytes} byte limit", status=413)
            body = bytearray()
            async for chunk in response.aiter_raw():  # raw: nothing decodes the body behind the size check
                body += chunk
                if len(body) > policy.max_bytes:
                    raise MediaError(f"media item is larger than the {policy.max_bytes} byte limit", status=413)
            return bytes(body)
        except httpx.HTTPError as err:
            raise _unreachable(host, err) from None
        finally:
            await response.aclose()
    raise MediaError(f"media URL redirected more than {MAX_REDIRECTS} times")


def _unreachable(host: str, err: httpx.HTTPError) -> MediaError:
    """The connection failed: the name and the reason (a TLS name mismatch, a refusal), never the address."""
    return MediaError(f"cannot fetch media from {host!r}: {type(err).__name__}: {str(err)[:200]}", status=422)
