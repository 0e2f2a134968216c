"""Each stage's replicas, as its callers see them: a URL whose host is re-resolved (a headless Service resolves to
every ready pod). The frontend picks the least-busy address for each call; pd and decode check that an address a
message names is one of the graph's own (the encoder that owns embeddings, the pd that holds a KV cache).
`mmgraph up` keeps a hosts file, its local stand-in for cluster DNS, so local replicas come and go the same way."""

from __future__ import annotations

import asyncio
import itertools
import math
import socket
import time
import urllib.parse
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from mmgraph_operator.api import POD_GRACE_SECONDS

REFRESH_SECONDS = 2.0  # how stale a resolution `knows` accepts
TRUST_SECONDS = float(POD_GRACE_SECONDS)  # how long an address stays the stage's after it was last resolved


class NoReplica(RuntimeError):
    """No address of the stage is left to try."""


def read_hosts(path: str) -> dict[str, list[str]]:
    """Name -> addresses from a file in /etc/hosts format ("ADDRESS NAME..." lines, # comments)."""
    names: dict[str, list[str]] = {}
    try:
        text = Path(path).read_text()
    except OSError:
        return names
    for line in text.splitlines():
        address, *aliases = line.split("#", 1)[0].split() or [""]
        for name in aliases:
            names.setdefault(name, []).append(address)
    return names


@dataclass
class Peer:
    """A stage's replicas: the URL's host re-resolved to every address, each call to the least busy one.

    Names come from DNS, or, for a name listed in the optional peer hosts file, from that file only."""

    stage: str
    url: str
    addresses: list[str] = field(default_factory=list)
    outstanding: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        parts = urllib.parse.urlsplit(self.url)
        self.host, self.port, self.scheme = parts.hostname or "", parts.port or 80, parts.scheme
        self.from_file = False
        self.turns = itertools.count()
        self.refreshed = -math.inf
        self.seen: dict[str, float] = {}  # address -> when it was last resolved

    async def refresh(self, hosts: dict[str, list[str]] | None = None) -> None:
        """`hosts`: the peer hosts file's names, read once per round for every peer."""
        self.refreshed = time.monotonic()
        if hosts is not None:
            listed = hosts.get(self.host)
            if listed is not None or self.from_file:  # once listed, a name leaves only by leaving the file
                self.from_file = True
                self._resolved(sorted(dict.fromkeys(listed or [])))
                return
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        except socket.gaierror:
            return  # keep the last known addresses; a Service with no ready pods resolves to nothing
        addresses = sorted(dict.fromkeys(i[4][0] for i in infos))
        if addresses:
            self._resolved(addresses)

    def _resolved(self, addresses: list[str]) -> None:
        self.addresses = addresses
        now = time.monotonic()
        self.seen.update(dict.fromkeys(addresses, now))
        self.seen = {a: t for a, t in self.seen.items() if now - t < TRUST_SECONDS}

    def acquire(self, avoid: Collection[str] = ()) -> tuple[str, str]:
        """(address, base URL) of the least busy replica not in `avoid`, counted busy until `release`; replicas
        equally busy take turns (an idle graph would otherwise send everything to the first address)."""
        choices = [a for a in self.addresses if a not in avoid]
        if not choices:
            reason = "no ready replica" if not avoid else f"no replica took the connection ({len(avoid)} tried)"
            raise NoReplica(f"{self.stage}: {reason}")
        least = min(self.outstanding.get(a, 0) for a in choices)
        tied = [a for a in choices if self.outstanding.get(a, 0) == least]
        address = tied[next(self.turns) % len(tied)]
        self.outstanding[address] = self.outstanding.get(address, 0) + 1
        return address, self.url_of(address)

    def url_of(self, address: str, port: int | None = None) -> str:
        """The base URL of the replica at `address` (on the Service's port unless told another)."""
        host = f"[{address}]" if ":" in address else address
        return f"{self.scheme}://{host}:{port or self.port}"

    async def own(self, url: str, hosts_file: str | None) -> str | None:
        """`url` rebuilt from its parts if its host is one of the stage's replicas (a message may name a port of
        the graph's own pods, never another host), else None."""
        try:
            parts = urllib.parse.urlsplit(url)
            address, port = parts.hostname or "", parts.port
        except ValueError:
            return None
        if parts.scheme != self.scheme or not await self.knows(address, hosts_file):
            return None
        return self.url_of(address, port)

    async def knows(self, address: str, hosts_file: str | None) -> bool:
        """Whether `address` is one of the stage's replicas: resolved now (again, if it is not yet known or the
        last resolution is older than REFRESH_SECONDS), or within TRUST_SECONDS, since a replica that has left
        its Service (scaled down, rolled) still serves pulls of what it holds while it drains."""
        if address not in self.addresses or time.monotonic() - self.refreshed > REFRESH_SECONDS:
            await self.refresh(read_hosts(hosts_file) if hosts_file else None)
        return address in self.addresses or time.monotonic() - self.seen.get(address, -math.inf) < TRUST_SECONDS

    def release(self, address: str) -> None:
        self.outstanding[address] -= 1
