"""Each stage's replicas, as its callers see them: a URL whose host is re-resolved (a headless Service resolves to
every ready pod). The frontend picks the least-busy address for each call, or, for a media item, the encoder that
owns the item's routing key on a hash ring (consistent hashing with bounded loads: a busy owner's keys spill to the
next); pd and decode check that an address a message names is one of the graph's own (the encoder that owns
embeddings, the pd that holds a KV cache).
`mmgraph up` keeps a hosts file, its local stand-in for cluster DNS, so local replicas come and go the same way."""

from __future__ import annotations

import asyncio
import bisect
import itertools
import math
import socket
import time
import urllib.parse
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import blake3

from mmgraph_contract.wire import POD_GRACE_SECONDS

REFRESH_SECONDS = 2.0  # how often callers re-resolve a stage, and how stale a resolution `knows` accepts
TRUST_SECONDS = float(POD_GRACE_SECONDS)  # how long an address stays the stage's after it was last resolved
RING_POINTS = 128  # points per replica on the hash ring: each replica owns ~1/n of the keys, give or take ~10%
# A replica takes a key only while its calls in flight stay under LOAD_BOUND x the mean (+1): a hot key or a busy
# replica spills to the key's next owner instead of queueing (Mirrokni, Thorup, Zadimoghaddam, "Consistent Hashing
# with Bounded Loads", 2018).
LOAD_BOUND = 1.25


def ring_point(text: str) -> int:
    """A position on the ring: 64 bits of BLAKE3, so points spread evenly whatever the text looks like."""
    return int.from_bytes(blake3.blake3(text.encode()).digest(length=8), "big")


def ring_of(addresses: list[str]) -> list[tuple[int, str]]:
    """(point, address), RING_POINTS per address, sorted. An address's points depend on it alone, so a replica
    that comes or goes moves only the keys it takes or had."""
    return sorted((ring_point(f"{a}#{i}"), a) for a in addresses for i in range(RING_POINTS))


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
        self.versions: dict[str, str] = {}  # address -> its engine's vLLM version ("": it did not say)
        self.ring = ring_of(self.addresses)

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
        if addresses != self.addresses:
            self.ring = ring_of(addresses)
        self.addresses = addresses
        now = time.monotonic()
        self.seen.update(dict.fromkeys(addresses, now))
        self.seen = {a: t for a, t in self.seen.items() if now - t < TRUST_SECONDS}
        self.versions = {a: v for a, v in self.versions.items() if a in addresses}  # an address reused: ask again

    def known_versions(self) -> set[str] | None:
        """The vLLM versions the replicas run; None while one is not known (just listed, or it did not say)."""
        found = {self.versions.get(a, "") for a in self.addresses}
        return found if found and "" not in found else None

    def other_versions(self, versions: Collection[str] | None) -> set[str]:
        """The replicas known to run a vLLM outside `versions` (None: any will do): `unwanted` in `acquire`, which
        takes one of them only where no other is left (its failure comes before any token, and the request is
        prefilled again)."""
        if not versions:
            return set()
        return {a for a in self.addresses if self.versions.get(a, "") not in ("", *versions)}

    def acquire(self, avoid: Collection[str] = (), unwanted: Collection[str] = ()) -> tuple[str, str]:
        """(address, base URL) of the least busy replica not in `avoid`, and not in `unwanted` unless no other is
        left, counted busy until `release`; replicas equally busy take turns (an idle graph would otherwise send
        everything to the first address)."""
        choices = self._choices(self.addresses, avoid)
        choices = [a for a in choices if a not in unwanted] or choices
        least = min(self.outstanding.get(a, 0) for a in choices)
        tied = [a for a in choices if self.outstanding.get(a, 0) == least]
        address = tied[next(self.turns) % len(tied)]
        return address, self.take(address)

    def owner(self, key: str, avoid: Collection[str] = (), floor: int = 1) -> tuple[str, bool]:
        """(address, spilled) of the replica that owns `key`: the first on the ring clockwise from the key's point,
        not in `avoid`, whose calls in flight are under LOAD_BOUND x the mean, or under `floor` (the calls a
        replica serves in one pass: those do not queue); `spilled` when that is not the key's first owner. Not
        counted busy: `take` it."""
        choices = self._choices(self.owners(key), avoid)
        load = sum(self.outstanding.get(a, 0) for a in choices)
        bound = max(floor, math.ceil(LOAD_BOUND * (load + 1) / len(choices)))  # the least busy is always under it
        address = next(a for a in choices if self.outstanding.get(a, 0) < bound)
        return address, address != choices[0]

    def take(self, address: str) -> str:
        """Count a call to `address` busy until `release`; its base URL."""
        self.outstanding[address] = self.outstanding.get(address, 0) + 1
        return self.url_of(address)

    def owners(self, key: str) -> list[str]:
        """The replicas in the order `key` prefers them: clockwise on the ring from the key's point."""
        start, order = bisect.bisect(self.ring, (ring_point(key), "")), dict[str, None]()
        for i in range(len(self.ring)):
            order.setdefault(self.ring[(start + i) % len(self.ring)][1])
            if len(order) == len(self.addresses):
                break
        return list(order)

    def _choices(self, addresses: list[str], avoid: Collection[str]) -> list[str]:
        choices = [a for a in addresses if a not in avoid]
        if not choices:
            reason = "no ready replica" if not avoid else f"no replica took the connection ({len(avoid)} tried)"
            raise NoReplica(f"{self.stage}: {reason}")
        return choices

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
