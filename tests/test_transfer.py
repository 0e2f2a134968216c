"""The tensor hand-off between two processes over real NIXL (UCX on loopback): bytes, shapes and dtypes arrive
intact through both read paths (the pre-registered receive pool, and a registered destination for large reads),
the owner frees each buffer once the reader's notice arrives, and a reader whose owner is gone gets an error
naming it within the deadline."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

os.environ.setdefault("UCX_NET_DEVICES", "lo")

from mmgraph_workers.nixl_transfer import NixlTransfer
from mmgraph_workers.protocol import TensorRef
from mmgraph_workers.transfer import StaleRead, TransferError, make_transfer


def tensor_for(shape: list[int], dtype: str, seed: int) -> torch.Tensor:
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 100).to(getattr(torch, dtype))


def soon(seconds: float) -> float:
    """A read's deadline, `seconds` from now."""
    return time.monotonic() + seconds


def owner(conn, hold_seconds: float = 0.0) -> None:
    """The encoder's side, in its own process: publishes and releases on request and reports what is still
    published."""
    transfer = make_transfer("nixl", f"test-owner-{os.getpid()}", pool_bytes=16 << 20, hold_seconds=hold_seconds)
    while (command := conn.recv()) is not None:
        if command[0] == "publish":
            _, shape, dtype, seed, ttl = command
            ref = transfer.publish(tensor_for(shape, dtype, seed), ttl_seconds=ttl, owner="http://127.0.0.1:1")
            conn.send((ref.model_dump_json(), transfer.metadata))  # the metadata, as the owner's stage serves it
        elif command[0] == "release":
            transfer.release(command[1])
            conn.send(transfer.published())
        else:
            conn.send(transfer.published())


def publish(call: Callable, *command) -> tuple[TensorRef, str]:
    """Have the owner publish: the descriptor, and the owner's agent metadata (what pd asks the encoder for)."""
    ref, metadata = call("publish", *command)
    return TensorRef.model_validate_json(ref), metadata


@contextlib.contextmanager
def owner_process(hold_seconds: float = 0.0) -> Iterator[tuple[Callable, mp.Process]]:
    """An owner in its own process, and `call(*command)` to drive it (an error, not a hang, if it is gone)."""
    ctx = mp.get_context("spawn")
    ours, theirs = ctx.Pipe()
    proc = ctx.Process(target=owner, args=(theirs, hold_seconds), daemon=True)
    proc.start()

    def call(*command):
        assert proc.is_alive(), "the owner process is gone"
        ours.send(command)
        assert ours.poll(60), f"the owner did not answer {command[0]!r}"
        return ours.recv()

    try:
        yield call, proc
    finally:
        if proc.is_alive():
            ours.send(None)
            proc.join(10)
            proc.kill()


@pytest.fixture(scope="module")
def peer():
    with owner_process() as owner:
        yield owner


@pytest.fixture(scope="module")
def reader():
    return make_transfer("nixl", "test-reader", recv_pool_bytes=4 << 20)


def published_soon(call, expected: int) -> int:
    deadline = time.monotonic() + 10
    while (count := call("published")) != expected and time.monotonic() < deadline:
        time.sleep(0.02)
    return count


@pytest.fixture
def published(peer):
    """`published(n)` is true once the module's owner holds `n` more buffers than when the test began (the tests
    share the owner: each counts what it did, whatever ran before it)."""
    call, _ = peer
    before = call("published")
    return lambda more: published_soon(call, before + more) == before + more


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [([3], "float32"), ([256, 64], "bfloat16"), ([1024, 1024], "float32"), ([5, 7, 3], "int64")],
    ids=["12B", "32KiB-bf16", "4MiB-registered-destination", "int64-3d"],
)
def test_tensor_arrives_intact_and_the_owner_frees_it(peer, reader, published, shape, dtype):
    call, _ = peer
    ref, metadata = publish(call, shape, dtype, 7, 60.0)
    assert (ref.nbytes > NixlTransfer.COPY_MAX) == (shape == [1024, 1024])
    got = reader.fetch(ref, soon(10), metadata)
    assert got.dtype == getattr(torch, dtype) and list(got.shape) == shape
    assert torch.equal(got, tensor_for(shape, dtype, 7))
    assert published(0), "the owner kept the buffer after the reader's notice"


def test_many_reads_reuse_the_pools(peer, reader, published):
    call, _ = peer
    for seed in range(40):  # 40 x 1 MiB through a 4 MiB receive pool and a 16 MiB owner pool
        ref, metadata = publish(call, [512, 512], "float32", seed, 60.0)
        assert torch.equal(reader.fetch(ref, soon(10), metadata), tensor_for([512, 512], "float32", seed))
    assert published(0)
    assert reader.recv_pool.used() == 0


def test_concurrent_reads_from_many_threads_each_get_their_own_bytes(peer, reader, published):
    """pd pulls the embeddings of concurrent requests from several threads; the reads overlap (the agent is locked
    per call, not per read) and each must land its own tensor, through both read paths."""
    call, _ = peer
    jobs = [([256, 64], "float32", 100 + i) if i % 3 else ([600, 512], "float32", 100 + i) for i in range(24)]
    refs = [publish(call, shape, dtype, seed, 60.0) for shape, dtype, seed in jobs]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda published: reader.fetch(published[0], soon(20), published[1]), refs))
    for (shape, dtype, seed), tensor in zip(jobs, got, strict=True):
        assert torch.equal(tensor, tensor_for(shape, dtype, seed)), seed
    assert published(0)
    assert reader.recv_pool.used() == 0


def test_unread_buffer_freed_when_its_time_to_live_passes(peer, published):
    call, _ = peer
    call("publish", [1000], "float32", 1, 0.2)
    assert published(0)


@pytest.mark.parametrize("connected", [True, False], ids=["connected-before", "never-connected"])
def test_reader_of_a_dead_owner_gets_an_error_naming_it(connected):
    """Its own owner (killing the module's would break the tests after it): whether or not the reader had
    connected to it, the read fails within its deadline with a TransferError naming the owner."""
    reader = make_transfer("nixl", f"test-reader-{connected}", recv_pool_bytes=4 << 20)  # left as it ends here
    with owner_process() as (call, proc):
        ref, metadata = publish(call, [512, 512], "float32", 3, 60.0)
        if connected:
            reader.fetch(publish(call, [4], "float32", 1, 60.0)[0], soon(10), metadata)
        proc.kill()
        proc.join(10)
        started = time.monotonic()
        with pytest.raises(TransferError, match=ref.agent):
            reader.fetch(ref, soon(3), metadata)
        assert time.monotonic() - started < 5
    assert reader.recv_pool.used() == 0
    assert ref.agent not in reader._peers, "the reader keeps a connection to an owner that is gone"


def test_a_reader_keeps_only_its_most_recent_owners(reader, peer, monkeypatch):
    """Owners come and go with their pods: past MAX_PEERS the least recently used connection is dropped."""
    call, _ = peer
    monkeypatch.setattr(reader, "MAX_PEERS", 1)
    with owner_process() as (other, _):
        for owner in (call, other):
            ref, metadata = publish(owner, [4], "float32", 1, 60.0)
            reader.fetch(ref, soon(10), metadata)
        assert reader.peers() == 1
    ref, metadata = publish(call, [4], "float32", 2, 60.0)
    assert torch.equal(reader.fetch(ref, soon(10), metadata), tensor_for([4], "float32", 2))  # reconnects when needed


def test_a_reader_connects_only_with_metadata_it_was_given(peer, reader):
    """A descriptor names its agent but carries no way to reach it: a reader not yet connected to that agent
    needs the metadata its caller asked the owner for (pd asks the encoder replica it resolved)."""
    call, _ = peer
    ref, _ = publish(call, [4], "float32", 5, 60.0)
    stranger = ref.model_copy(update={"agent": "somebody-else"})
    try:
        with pytest.raises(TransferError, match="not connected to somebody-else"):
            reader.fetch(stranger, soon(3))
        assert not reader.connected("somebody-else")
    finally:
        call("release", ref.handle)  # nobody reads it: the owner is shared with the other tests


# ---- a read never returns the bytes of another publish ---------------------------------------------------------


@pytest.mark.parametrize(
    "then",
    [None, [512], [256], [2048]],
    ids=["freed", "reused-by-the-same-size", "reused-by-a-smaller-one", "reused-by-a-larger-one"],
)
def test_a_read_of_a_buffer_freed_and_reused_is_refused_not_served(peer, reader, published, then):
    """The encoder freed a descriptor's buffer (its time-to-live passed: pd was late) and may have published
    another request's embeddings in the same place: NIXL would read the new bytes without an error. The frame
    around every publish makes the late read a StaleRead; the new publish still reads intact."""
    call, _ = peer
    late, metadata = publish(call, [512], "float32", 11, 0.2)
    assert published(0), "the time-to-live did not free the buffer"
    if then is not None:
        current, _ = publish(call, then, "float32", 12, 60.0)
        assert current.address == late.address, "the pool did not reuse the slot: the test proves nothing"
    with pytest.raises(StaleRead, match="encoded again"):
        reader.fetch(late, soon(10), metadata)
    if then is not None:
        assert torch.equal(reader.fetch(current, soon(10), metadata), tensor_for(then, "float32", 12))
    assert published(0) and reader.recv_pool.used() == 0


def test_a_buffer_freed_before_its_reader_said_so_is_not_reused_while_a_read_may_run(reader):
    """A buffer freed without its reader's notice (its time-to-live passed, or a release) may be under a read:
    the owner keeps it out of its pool for a read's deadline, so a read that copies the frame in any order never
    meets another publish's bytes; a late read meets the zeroed frame (StaleRead); afterwards the place is reused.
    A buffer whose reader's notice came back is reused at once."""
    with owner_process(hold_seconds=1.0) as (call, _):
        read, metadata = publish(call, [512], "float32", 21, 60.0)
        reader.fetch(read, soon(10), metadata)
        assert published_soon(call, 0) == 0
        assert publish(call, [512], "float32", 22, 0.2)[0].address == read.address, "a read buffer was held"
        late = publish(call, [512], "float32", 22, 0.2)[0]
        assert published_soon(call, 0) == 0, "the time-to-live did not free the buffers"
        meanwhile, _ = publish(call, [512], "float32", 23, 60.0)
        assert meanwhile.address not in (read.address, late.address), "a buffer that may be under a read was reused"
        with pytest.raises(StaleRead):
            reader.fetch(late, soon(10), metadata)
        time.sleep(1.2)
        after = [publish(call, [512], "float32", 24, 60.0)[0] for _ in range(3)]
        assert late.address in {ref.address for ref in after}, "the held buffer never came back"
        for ref in [meanwhile, *after]:
            call("release", ref.handle)


def test_a_descriptor_of_the_previous_release_still_reads(peer, reader, published):
    """A descriptor without a generation (an encoder of the previous release, mid-rollout) names the bytes
    alone: read as before, unchecked."""
    call, _ = peer
    ref, metadata = publish(call, [300], "float32", 13, 60.0)
    previous = TensorRef.model_validate(ref.model_dump(exclude={"generation", "expires_in_seconds"}))
    assert previous.generation is None
    assert torch.equal(reader.fetch(previous, soon(10), metadata), tensor_for([300], "float32", 13))
    assert published(0)


def test_a_read_past_its_deadline_is_not_begun(peer, reader, published):
    call, _ = peer
    ref, metadata = publish(call, [4], "float32", 14, 60.0)
    with pytest.raises(TransferError, match="past its deadline before it began"):
        reader.fetch(ref, time.monotonic(), metadata)
    call("release", ref.handle)
    assert published(0)


def test_a_landing_stays_taken_while_a_read_given_up_on_may_write_it(peer, reader, published, monkeypatch):
    """A read that misses its deadline may still be in flight, and UCX's cancel returns before the transport has
    stopped writing: the landing is not given back, nor the read released, until NIXL says it ended. The read is
    real; NIXL's report that it is still in progress until the deadline is injected (a read on one host ends in
    microseconds, too fast to catch in flight), and its real end then frees the landing."""
    call, _ = peer
    ref, metadata = publish(call, [64, 1024], "float32", 15, 60.0)  # 256 KiB: a slot of the receive pool
    agent, unfinished, used = reader.agent, reader.unfinished(), reader.recv_pool.used()
    real_transfer, released = agent.transfer, []
    with monkeypatch.context() as faults:
        faults.setattr(agent, "check_xfer_state", lambda handle: "PROC")
        faults.setattr(agent, "transfer", lambda handle: real_transfer(handle) and "PROC")  # posted for real
        faults.setattr(agent, "release_xfer_handle", released.append)
        with pytest.raises(TransferError, match="missed its deadline"):
            reader.fetch(ref, soon(0.3), metadata)
        assert not released, "a read still in flight was released (UCX's cancel does not stop the transport)"
        assert reader.unfinished() == unfinished + 1
        assert reader.recv_pool.used() >= used + ref.nbytes, "the landing of a read still in flight was given back"
    deadline = soon(10)
    while (
        reader.unfinished() > unfinished and time.monotonic() < deadline
    ):  # each read looks at (and progresses) the old one
        other, _ = publish(call, [4], "float32", 16, 60.0)
        assert torch.equal(reader.fetch(other, soon(10), metadata), tensor_for([4], "float32", 16))
    assert reader.unfinished() == unfinished and reader.recv_pool.used() == used, "the ended read's landing is taken"
    assert published(0)  # the read ended for real: the owner had its notice
