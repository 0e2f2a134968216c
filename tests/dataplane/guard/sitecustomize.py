"""Test-only: loaded into a worker process by putting this folder on its PYTHONPATH, it installs the loopback
guard (loopback_guard.py) and writes each refused address to $MMGRAPH_GUARD_LOG, so a test can prove that
refusals happen before any connection, and that a broken check cannot send traffic out."""

import os

from loopback_guard import install


def _log(address: object) -> None:
    with open(os.environ.get("MMGRAPH_GUARD_LOG", "/dev/null"), "a") as log:
        log.write(f"{address!r}\n")


install(_log)
