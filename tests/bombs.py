"""Compression bombs for the tests that check a body is refused before it is inflated: plain helpers, no fixtures,
shared by the unit tests and the data-plane conftest."""

from __future__ import annotations

import functools
import gzip
import zlib
from http.server import BaseHTTPRequestHandler


@functools.cache
def gzip_bomb(size: int = 256 << 20) -> bytes:
    """`size` zero bytes, gzipped twice (Content-Encoding: gzip, gzip): about 2 KB on the wire."""
    once = zlib.compressobj(9, zlib.DEFLATED, 31)
    chunk = b"\0" * (1 << 20)
    inner = b"".join([once.compress(chunk) for _ in range(size >> 20)] + [once.flush()])
    return gzip.compress(inner, 9)


def send_gzip_bomb(handler: BaseHTTPRequestHandler) -> None:
    """Answer with the bomb as `Content-Encoding: gzip, gzip`, whatever the client said it accepts."""
    body = gzip_bomb()
    handler.send_response(200)
    handler.send_header("Content-Encoding", "gzip, gzip")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)
