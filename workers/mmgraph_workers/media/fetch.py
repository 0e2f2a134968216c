"""Getting media bytes from a URL without becoming a way into the cluster (SSRF) or a memory sink.

The checks live here, where the connection is made: the scheme must be allowed; the host is resolved once and
every address it resolves to must be public (unless the graph allows private networks; link-local addresses,
where cloud metadata services answer, are refused always); the connection goes to
the address that was checked (TLS still verifies the host name); each redirect is checked the same way; the body
is cut off past max_bytes; the whole fetch, redirects included, has one deadline. data: URLs are decoded with the
same size cap. A refusal happens before any connection is attempted.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import socket
import time
import urllib.parse

import httpx

from mmgraph_workers.media import MediaError
from mmgraph_workers.media.policy import MediaPolicy

MAX_REDIRECTS = 5


def scheme_of(url: str) -> str:
    return urllib.parse.urlsplit(url).scheme.lower()


def check_scheme(url: str, policy: MediaPolicy) -> None:
    scheme = scheme_of(url)
    if scheme not in policy.allowed_schemes:
        allowed = ", ".join(sorted(policy.allowed_schemes))
        raise MediaError(f"URL scheme {scheme or '(none)'!r} is not allowed for media; allowed: {allowed}")


def decode_data_url(url: str, policy: MediaPolicy) -> bytes:
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


def _refusal(address: str, policy: MediaPolicy) -> str | None:
    """Why `address` may not be fetched from, or None. Link-local addresses (cloud metadata services live there)
    are refused even where the graph allows private networks."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    if ip.is_link_local or ip.is_multicast or ip.is_unspecified:
        return "link-local, multicast or unspecified"
    if not ip.is_global and not policy.allow_private_networks:
        return "private or loopback"
    return None


async def _resolve(host: str, port: int, policy: MediaPolicy) -> str:
    """One resolution; every address must pass, and the first is the one we connect to."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise MediaError(f"cannot resolve media host {host!r}: {err.strerror}") from None
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    for address in addresses:
        why = _refusal(address, policy)
        if why:
            hint = "" if "link-local" in why else " unless the graph sets spec.media.allowPrivateNetworks"
            raise MediaError(f"media host {host!r} resolves to {address}, a {why} address: refused{hint}", status=403)
    return addresses[0]


async def fetch_bytes(url: str, policy: MediaPolicy, client: httpx.AsyncClient) -> bytes:
    """The bytes behind `url` under `policy`; raises MediaError (4xx) for anything the request got wrong."""
    check_scheme(url, policy)
    if scheme_of(url) == "data":
        return decode_data_url(url, policy)
    deadline = time.monotonic() + policy.fetch_timeout_seconds
    for _ in range(MAX_REDIRECTS + 1):
        parts = urllib.parse.urlsplit(url)
        if not parts.hostname:
            raise MediaError(f"media URL has no host: {url[:200]}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        address = await _resolve(parts.hostname, port, policy)
        netloc = f"[{address}]" if ":" in address else address
        pinned = urllib.parse.urlunsplit((parts.scheme, f"{netloc}:{port}", parts.path or "/", parts.query, ""))
        headers = {"Host": parts.netloc.rsplit("@", 1)[-1], "Accept": "image/*,*/*;q=0.5"}
        left = deadline - time.monotonic()
        if left <= 0:
            raise MediaError(f"fetching media took longer than {policy.fetch_timeout_seconds:g} s", status=408)
        try:
            async with asyncio.timeout(left):
                request = client.build_request(
                    "GET", pinned, headers=headers, extensions={"sni_hostname": parts.hostname}
                )
                response = await client.send(request, stream=True, follow_redirects=False)
                try:
                    if response.is_redirect:
                        location = response.headers.get("location", "")
                        url = urllib.parse.urljoin(url, location)
                        check_scheme(url, policy)
                        if scheme_of(url) == "data":
                            raise MediaError("media URL redirects to a data: URL")
                        continue
                    if response.status_code >= 400:
                        raise MediaError(f"media URL answered HTTP {response.status_code}", status=422)
                    declared = int(response.headers.get("content-length") or 0)
                    if declared > policy.max_bytes:
                        raise MediaError(f"media item is larger than the {policy.max_bytes} byte limit", status=413)
                    body = bytearray()
                    async for chunk in response.aiter_bytes():
                        body += chunk
                        if len(body) > policy.max_bytes:
                            raise MediaError(f"media item is larger than the {policy.max_bytes} byte limit", status=413)
                    return bytes(body)
                finally:
                    await response.aclose()
        except TimeoutError:
            raise MediaError(
                f"fetching media took longer than {policy.fetch_timeout_seconds:g} s", status=408
            ) from None
        except httpx.HTTPError as err:
            raise MediaError(f"cannot fetch media URL: {type(err).__name__}: {err}", status=422) from None
    raise MediaError(f"media URL redirected more than {MAX_REDIRECTS} times")
