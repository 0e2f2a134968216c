"""Test-only guard, loaded into a worker process by putting this folder on its PYTHONPATH: any attempt to connect
a socket to an address outside 127.0.0.0/8 (or ::1, or a Unix socket) is refused and written to $MMGRAPH_GUARD_LOG,
so a test can prove that refusals happen before any connection, and that a broken check cannot send traffic out."""

import ipaddress
import os
import socket

_connect = socket.socket.connect
_connect_ex = socket.socket.connect_ex


def _outside(address) -> bool:
    if not isinstance(address, tuple):
        return False  # Unix sockets
    try:
        return not ipaddress.ip_address(address[0]).is_loopback
    except ValueError:
        return True  # a host name here means something skipped resolution: refuse it too


def _guarded(original):
    def connect(self, address):
        if _outside(address):
            with open(os.environ.get("MMGRAPH_GUARD_LOG", "/dev/null"), "a") as log:
                log.write(f"{address!r}\n")
            raise ConnectionRefusedError(f"test guard: connection to {address!r} outside loopback")
        return original(self, address)

    return connect


socket.socket.connect = _guarded(_connect)
socket.socket.connect_ex = _guarded(_connect_ex)
