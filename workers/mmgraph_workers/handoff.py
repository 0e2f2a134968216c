"""The embeddings hand-off, both ends.

The encoder (`EmbeddingsSender`) publishes a request's embeddings in its NIXL pool, all or nothing, and names them
in its answer (a TensorRef per item); it answers pd's agent handshake (AGENT_PATH) and frees what a reader releases
(RELEASE_PATH). pd (`EmbeddingsReceiver`) checks that each owner is one of the graph's encoder replicas, asks that
owner (never the message) for its agent's metadata, pulls every item by one deadline, and releases at the owner
whatever it did not pull. The frontend releases what no pd took (`release`, the one call both use).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import httpx

from mmgraph_contract.wire import AGENT_PATH, release_path
from mmgraph_workers.peers import Peer
from mmgraph_workers.protocol import (
    AgentInfo,
    EncodedItem,
    GenerateRequest,
    TensorRef,
)
from mmgraph_workers.server import (
    Detached,
    StageError,
)
from mmgraph_workers.transfer import PoolFull, Transfer, TransferError

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
        if self.transfer.connected(ref.agent):
            return None
        try:
            r = await self.http.get(base + AGENT_PATH)
            r.raise_for_status()
            agent = AgentInfo.model_validate_json(r.content)
        except (httpx.HTTPError, ValueError) as err:  # a pydantic ValidationError is a ValueError
            raise TransferError(f"asking {ref.agent} for its metadata: {type(err).__name__}: {err}") from err
        if agent.agent != ref.agent:  # the owner restarted: the embeddings are gone with the old agent
            raise TransferError(f"{ref.agent} is gone (its address now runs {agent.agent})")
        return agent.metadata

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
            with contextlib.suppress(StageError):  # not the graph's: nothing of ours to free there
                await release(self.http, await self.owner(item.embeddings), item.embeddings.handle)


async def release(http: httpx.AsyncClient, owner: str, handle: str) -> None:
    """Free a published buffer at its owner (`owner`: the base URL of one of the graph's encoders) that nobody will
    read; a failed call leaves it to its time-to-live."""
    with contextlib.suppress(httpx.HTTPError):
        await http.post(owner + release_path(handle))


class EmbeddingsSender:
    """The encoder's end: a request's embeddings published together or not at all, the agent handshake, and the
    releases its readers send."""

    def __init__(self, transfer: Transfer, owner: str, ttl_seconds: float):
        self.transfer, self.owner, self.ttl_seconds = transfer, owner, ttl_seconds

    def publish(self, tensors: list[Any]) -> list[TensorRef]:
        """A descriptor per tensor, each registered until its reader's notice or its time-to-live; PoolFull (with
        none of them published) when the pool cannot take them all."""
        refs: list[TensorRef] = []
        try:
            for tensor in tensors:
                refs.append(self.transfer.publish(tensor, ttl_seconds=self.ttl_seconds, owner=self.owner))
        except PoolFull:
            for ref in refs:
                self.transfer.release(ref.handle, handed_out=False)
            raise
        return refs

    def agent(self) -> AgentInfo:
        return AgentInfo(agent=self.transfer.name, metadata=self.transfer.metadata)

    def release(self, handle: str) -> None:
        self.transfer.release(handle)


EXPIRY_MARGIN_SECONDS = 2.0  # of a descriptor's time-to-live, for the time it spent on its way here


def pull_deadline(items: list[EncodedItem], received: float, timeout_seconds: float) -> float:
    """When pd must have pulled all of a request's embeddings (`time.monotonic()`'s clock): within the transfer
    timeout for all items together, and a margin before the first of them expires at its owner (counted from
    `received`: the owner's seconds, never its clock). A read after that could meet a freed buffer; the frame
    check would refuse it, but pd need not try."""
    expiries = [i.embeddings.expires_in_seconds for i in items if i.embeddings.expires_in_seconds is not None]
    return received + min([timeout_seconds, *(left - EXPIRY_MARGIN_SECONDS for left in expiries)])
