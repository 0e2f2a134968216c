"""Ports: whether one is free before a server needs it, and choosing them for the servers this machine starts
itself (`mmgraph up`, the tests), which must not collide."""

from __future__ import annotations

import random
import socket
from pathlib import Path

_HANDED_OUT: set[int] = set()
_RANDOM = random.SystemRandom()  # not the test order's seeded generator


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def bindable(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(span: int = 1) -> int:
    """A port, and the `span - 1` after it, that nothing on 127.0.0.1 holds, for a server to listen on.

    Chosen outside the kernel's ephemeral range, and never twice by this process: a stage binds its ports seconds
    after they are chosen (an engine's NIXL side channel, transfer port + 1, after the engine has loaded), and an
    ephemeral port can meanwhile become the local end of any outgoing connection."""
    low, high = _ephemeral_range()
    lo, hi = (10000, low) if low > 12000 else (high + 1, 65536)
    for _ in range(10000):
        port = _RANDOM.randrange(lo, hi - span + 1)
        wanted = range(port, port + span)
        if not _HANDED_OUT.intersection(wanted) and all(bindable(p) for p in wanted):
            _HANDED_OUT.update(wanted)
            return port
    raise RuntimeError(f"no {span} free consecutive ports in {lo}-{hi - 1}")
