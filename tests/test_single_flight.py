"""The encoder encodes each item once while requests that need the same item wait for it (single flight), with
interleavings chosen step by step: a request that waits never fails for another's bookkeeping, one whose holder
failed does the work itself, and nobody is left waiting. The real `Encoder.encode` runs (real data: URL fetches,
a real NIXL owner for the publish); only the tower pass is the test's, so that it can finish items in the order
each case needs."""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import Iterator

import pytest
import torch

os.environ.setdefault("UCX_NET_DEVICES", "lo")

from mmgraph_contract.graph import MediaSpec
from mmgraph_contract.settings import EncoderSettings, Server, Transfer, Weights
from mmgraph_workers.batching import Batcher, Busy, SingleFlight
from mmgraph_workers.embedding_cache import Embedding, EmbeddingCache
from mmgraph_workers.encoder import Encoder
from mmgraph_workers.handoff import EmbeddingsSender
from mmgraph_workers.media import MediaError
from mmgraph_workers.media.fetch import media_client
from mmgraph_workers.protocol import EncodeRequest, MediaItem
from mmgraph_workers.transfer import make_transfer


def url(name: str) -> str:
    return "data:image/png;base64," + base64.b64encode(name.encode()).decode()


class Tower:
    """Stands in for the decode and tower pass of the encoder's `_encode_missing`: each pass of an item waits for
    the test to `finish` it (one permit a pass), then ends as an embedding, or as a refusal for 'broken'."""

    def __init__(self) -> None:
        self.passes: dict[str, int] = {}  # passes begun, by item
        self.permits: dict[str, asyncio.Semaphore] = {}
        self.encoded: list[str] = []

    def permit(self, name: str) -> asyncio.Semaphore:
        return self.permits.setdefault(name, asyncio.Semaphore(0))

    async def finish(self, name: str) -> None:
        self.permit(name).release()
        await asyncio.sleep(0.01)

    async def started(self, name: str, passes: int = 1) -> None:
        """Wait until `passes` passes of `name` have begun."""
        for _ in range(500):
            if self.passes.get(name, 0) >= passes:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"{name} was not encoded {passes} times")

    async def encode_missing(self, request, blobs, hashes, missing, found, was_cached) -> None:
        """As the encoder's: a request's items decode together, so one broken item fails them all."""
        names = [blobs[i].decode() for i in missing]
        for name in names:
            self.passes[name] = self.passes.get(name, 0) + 1
        for name in names:
            await self.permit(name).acquire()
        if "broken" in names:
            raise MediaError(f"image {names.index('broken') + 1} is broken")
        for i, name in zip(missing, names, strict=True):
            self.encoded.append(name)
            found[hashes[i]] = Embedding(torch.full((2, 4), float(len(name))), {}, f"key-{name}")


@pytest.fixture(scope="module")
def owner() -> Iterator:
    transfer = make_transfer("nixl", f"single-flight-{os.getpid()}", pool_bytes=1 << 20)
    yield transfer
    transfer.close()


@pytest.fixture
def encoder(owner, monkeypatch) -> tuple[Encoder, Tower]:
    encoder = Encoder.__new__(Encoder)  # no model: the tower is the test's
    tower = Tower()
    encoder.settings = EncoderSettings(
        weights=Weights(model="m", served_model_name="m"),
        server=Server(port=1),
        transfer=Transfer(transfer_timeout_seconds=10),
    )
    encoder.url = "http://127.0.0.1:1"
    encoder.policy = MediaSpec(max_items=8)
    encoder.cache = EmbeddingCache(0)  # nothing stays cached: only the requests in flight share work
    encoder.in_flight = SingleFlight()
    encoder.client = media_client()
    encoder.batcher = Batcher(lambda items: items, 16)
    encoder.preparing, encoder.max_preparing = 0, 16
    encoder.transfer = owner
    encoder.sender = EmbeddingsSender(owner, encoder.url, ttl_seconds=60)
    monkeypatch.setattr(encoder, "_encode_missing", tower.encode_missing)
    return encoder, tower


def request(*names: str) -> EncodeRequest:
    return EncodeRequest(request_id="r", media=[MediaItem(url=url(name)) for name in names])


def release_all(encoder: Encoder, *answers) -> None:
    for answer in answers:
        for item in answer.items:
            encoder.transfer.release(item.embeddings.handle)


def test_a_request_waiting_for_two_encodings_that_end_out_of_order_gets_both(encoder):
    """A1 encodes X, A2 encodes Y; B needs X and Y and waits; Y ends first, then X. (Before: B looked X and Y up
    after its first wait, when A2 had already forgotten Y: a KeyError, the client's 502.)"""
    encoder, tower = encoder

    async def case():
        a1 = asyncio.create_task(encoder.encode(request("X")))
        a2 = asyncio.create_task(encoder.encode(request("Y")))
        await tower.started("X")
        await tower.started("Y")
        b = asyncio.create_task(encoder.encode(request("X", "Y")))
        await asyncio.sleep(0.05)
        await tower.finish("Y")
        await tower.finish("X")
        answers = await asyncio.wait_for(asyncio.gather(a1, a2, b), 5)
        assert [i.key for i in answers[2].items] == ["key-X", "key-Y"]
        assert sorted(tower.encoded) == ["X", "Y"], "an item was encoded twice"
        release_all(encoder, *answers)

    asyncio.run(case())
    assert not encoder.in_flight.running


def test_when_the_holder_fails_each_waiter_gets_its_items_and_nobody_hangs(encoder):
    """A encodes X and a broken item and fails; B (X) and C (X, Z) waited for X: one of them encodes X, the other
    waits for that, and C's Z is encoded too. (Before: both took X over, the second `del` raised in `finally`, C
    failed with a KeyError and Z's waiters were never resolved: a later request for Z hung.)"""
    encoder, tower = encoder

    async def case():
        a = asyncio.create_task(encoder.encode(request("X", "broken")))
        await tower.started("X")
        b = asyncio.create_task(encoder.encode(request("X")))
        c = asyncio.create_task(encoder.encode(request("X", "Z")))
        await asyncio.sleep(0.05)
        await tower.finish("X")
        await tower.finish("broken")
        with pytest.raises(MediaError, match="broken"):
            await asyncio.wait_for(a, 5)
        await tower.started("X", passes=2)  # one waiter encodes X again, once
        await tower.finish("X")
        await tower.finish("Z")
        answers = await asyncio.wait_for(asyncio.gather(b, c), 5)
        assert [i.key for i in answers[1].items] == ["key-X", "key-Z"]
        tower.permit("Z").release()  # nothing is cached here: a later request for Z encodes it, and must not hang
        later = await asyncio.wait_for(encoder.encode(request("Z")), 5)
        assert tower.encoded.count("X") == 1, "the waiters both encoded X"
        release_all(encoder, *answers, later)

    asyncio.run(case())
    assert not encoder.in_flight.running


def test_a_cancelled_holder_hands_its_items_to_the_waiters(encoder):
    """The client of the request encoding X left: a request waiting for X encodes it itself."""
    encoder, tower = encoder

    async def case():
        a = asyncio.create_task(encoder.encode(request("X")))
        await tower.started("X")
        b = asyncio.create_task(encoder.encode(request("X")))
        await asyncio.sleep(0.05)
        a.cancel()
        await asyncio.sleep(0.05)
        await tower.finish("X")
        answer = await asyncio.wait_for(b, 5)
        assert [i.key for i in answer.items] == ["key-X"]
        release_all(encoder, answer)

    asyncio.run(case())
    assert not encoder.in_flight.running


def test_two_requests_that_need_each_others_items_never_wait_on_each_other(encoder):
    """A holds X and B holds Y; then both need X and Y again: whoever waits holds nothing, so both finish."""
    encoder, tower = encoder

    async def case():
        a = asyncio.create_task(encoder.encode(request("X", "Y")))
        await tower.started("X")
        b = asyncio.create_task(encoder.encode(request("Y", "X")))
        await asyncio.sleep(0.05)
        await tower.finish("X")
        await tower.finish("Y")
        answers = await asyncio.wait_for(asyncio.gather(a, b), 5)
        assert [i.key for i in answers[1].items] == ["key-Y", "key-X"]
        release_all(encoder, *answers)

    asyncio.run(case())


def test_the_media_being_prepared_at_once_are_bounded_and_a_busy_encoder_says_so_at_once(encoder):
    """Every request's media are held in memory from their fetch until their pass of the tower: past
    `max_preparing` items a request is refused at once (Busy: a 503 with Retry-After), before it fetches anything;
    once the others are done, it passes. A request alone passes whatever its size."""
    encoder, tower = encoder
    encoder.max_preparing = 3

    async def case():
        held = [asyncio.create_task(encoder.encode(request(f"held-{i}"))) for i in range(3)]
        for i in range(3):
            await tower.started(f"held-{i}")
        with pytest.raises(Busy, match="preparing 3 media items"):
            await encoder.encode(request("one-more"))
        assert "one-more" not in tower.passes, "a refused request was fetched and decoded"
        for i in range(3):
            await tower.finish(f"held-{i}")
        answers = await asyncio.wait_for(asyncio.gather(*held), 5)
        assert encoder.preparing == 0
        for name in ("big-0", "big-1", "big-2", "big-3", "big-4"):
            tower.permit(name).release()
        alone = await asyncio.wait_for(encoder.encode(request("big-0", "big-1", "big-2", "big-3", "big-4")), 5)
        assert len(alone.items) == 5
        release_all(encoder, *answers, alone)

    asyncio.run(case())
