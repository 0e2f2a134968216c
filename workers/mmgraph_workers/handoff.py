"""pd's end of the embeddings hand-off: the encoder published a request's embeddings in its NIXL pool and named
them in its answer (a TensorRef per item); pd checks that each owner is one of the graph's encoder replicas, asks
that owner (never the message) for its agent's metadata, pulls every item by one deadline, and releases at the
owner whatever it did not pull. The encoder's end is `Encoder.publish`; the frontend releases what no pd took."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import httpx

from mmgraph_workers.peers import Peer
from mmgraph_workers.protocol import (
    EncodedItem,
    GenerateRequest,
    TensorRef,
)
from mmgraph_workers.server import (
    Detached,
    StageError,
)
from mmgraph_workers.transfer import Transfer, TransferError

log = logging.getLogger("mmgraph.engine")


class EmbeddingsReceiver:
    """Pulls a request's embeddings from the encoders that own them (pd of e-pd and e-p-d)."""

    def __init__(
        self,
        transfer: Transfer,
        owners: Peer | None,
        http: httpx.AsyncClient,
        timeout_seconds: float,
        hosts_file: str | None = None,
    ):
        self.transfer, self.owners, self.http = transfer, owners, http
        self.timeout_seconds, self.hosts_file = timeout_seconds, hosts_file
        self.releasing = Detached()  # releases of a cancelled request's embeddings

    async def owner(self, ref: TensorRef) -> str:
        """The base URL of the encoder replica that owns `ref`: its address must be one the graph's encoder Service
        resolves to, so a message cannot send pd (or its NIXL agent) anywhere else."""
        owner = await self.owners.own(ref.owner, self.hosts_file) if self.owners else None
        if owner is None:
            raise StageError("embeddings owned by an address that is not one of this graph's encoders", 403)
        return owner

    async def agent_metadata(self, ref: TensorRef) -> str | None:
        """The owning agent's NIXL metadata, asked of the owner itself; None when already connected to it."""
        base = await self.owner(ref)
        if self.transfer is None or self.transfer.connected(ref.agent):
            return None
        try:
            r = await self.http.get(f"{base}/v1/transfer/agent")
            r.raise_for_status()
            agent = r.json()
        except (httpx.HTTPError, ValueError) as err:
            raise TransferError(f"asking {ref.agent} for its metadata: {type(err).__name__}: {err}") from err
        if agent.get("agent") != ref.agent:  # the owner restarted: the embeddings are gone with the old agent
            raise TransferError(f"{ref.agent} is gone (its address now runs {agent.get('agent')})")
        return agent["metadata"]

    async def pull(self, req: GenerateRequest) -> list[Any]:
        """The request's embeddings from their encoders, all by one deadline (`pull_deadline`). What was not
        pulled is released at its owner: at once when a pull failed, in the background when the request was
        cancelled (its client left), so nothing waits out its time-to-live for nobody."""
        deadline = pull_deadline(req.encoded, time.monotonic(), self.timeout_seconds)
        embeds: list[Any] = []
        unread = 0  # the items from here on were never asked for (a read in a thread finishes on its own)
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                for item in req.encoded:
                    metadata = await self.agent_metadata(item.embeddings)
                    unread += 1
                    embeds.append(await asyncio.to_thread(self.transfer.fetch, item.embeddings, deadline, metadata))
        except (TransferError, TimeoutError) as err:
            await self.release(req.encoded)
            log.warning("request %s: %s", req.request_id, str(err) or "the embeddings' pull deadline passed")
            raise StageError("pulling embeddings from the encoder failed", 502, retry=True) from err
        except asyncio.CancelledError:
            self.releasing.start(self.release(req.encoded[unread:]))
            raise
        return embeds

    async def release(self, items: list[EncodedItem]) -> None:
        for item in items:
            try:
                await self.http.post(f"{await self.owner(item.embeddings)}/release/{item.embeddings.handle}")
            except (httpx.HTTPError, StageError):
                pass  # its time-to-live frees it


EXPIRY_MARGIN_SECONDS = 2.0  # of a descriptor's time-to-live, for the time it spent on its way here


def pull_deadline(items: list[EncodedItem], received: float, timeout_seconds: float) -> float:
    """When pd must have pulled all of a request's embeddings (`time.monotonic()`'s clock): within the transfer
    timeout for all items together, and a margin before the first of them expires at its owner (counted from
    `received`: the owner's seconds, never its clock). A read after that could meet a freed buffer; the frame
    check would refuse it, but pd need not try."""
    expiries = [i.embeddings.expires_in_seconds for i in items if i.embeddings.expires_in_seconds is not None]
    return received + min([timeout_seconds, *(left - EXPIRY_MARGIN_SECONDS for left in expiries)])
