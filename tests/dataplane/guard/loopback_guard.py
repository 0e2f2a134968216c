"""The one loopback-only socket guard of the tests: any attempt to connect a socket to an address outside
127.0.0.0/8 (or ::1) is refused before it is made, and reported. Used in-process by unit tests (a fixture) and in
worker processes (sitecustomize.py in this folder), so a broken check can never send traffic off the machine."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable


def outside(address: object) -> bool:
    if not isinstance(address, tuple):
        return False  # Unix sockets
    try:
        return not ipaddress.ip_address(address[0]).is_loopback
    except ValueError:
        return True  # a host name here means something skipped resolution: refuse it too


def install(report: Callable[[object], None]) -> Callable[[], None]:
    """Guard every socket's connect and connect_ex; `report` is told each refused address. Returns the undo."""
    originals = socket.socket.connect, socket.socket.connect_ex

    def guarded(original):
        def connect(self, address):
            if outside(address):
                report(address)
                raise ConnectionRefusedError(f"test guard: connection to {address!r} outside loopback")
            return original(self, address)

        return connect

    socket.socket.connect, socket.socket.connect_ex = guarded(originals[0]), guarded(originals[1])

    def undo() -> None:
        socket.socket.connect, socket.socket.connect_ex = originals

    return undo
