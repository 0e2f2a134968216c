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

from mmgraph_workers.protocol import TensorRef
from mmgraph_workers.transfer import NixlTransfer, TransferError, make_transfer


def tensor_for(shape: list[int], dtype: str, seed: int) -> torch.Tensor:
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 100).to(getattr(torch, dtype))


def owner(conn) -> None:
    """The encoder's side, in its own process: publishes on request and reports what is still published."""
    transfer = make_transfer("nixl", f"test-owner-{os.getpid()}", pool_bytes=16 << 20)
    while (command := conn.recv()) is not None:
        if command[0] == "publish":
            _, shape, dtype, seed, ttl = command
            ref = transfer.publish(tensor_for(shape, dtype, seed), ttl_seconds=ttl, owner="http://127.0.0.1:1")
            conn.send((ref.model_dump_json(), transfer.metadata))  # the metadata, as the owner's stage serves it
        else:
            conn.send(transfer.published())


def publish(call: Callable, *command) -> tuple[TensorRef, str]:
    """Have the owner publish: the descriptor, and the owner's agent metadata (what pd asks the encoder for)."""
    ref, metadata = call("publish", *command)
    return TensorRef.model_validate_json(ref), metadata


@contextlib.contextmanager
def owner_process() -> Iterator[tuple[Callable, mp.Process]]:
    """An owner in its own process, and `call(*command)` to drive it (an error, not a hang, if it is gone)."""
    ctx = mp.get_context("spawn")
    ours, theirs = ctx.Pipe()
    proc = ctx.Process(target=owner, args=(theirs,), daemon=True)
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


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [([3], "float32"), ([256, 64], "bfloat16"), ([1024, 1024], "float32"), ([5, 7, 3], "int64")],
    ids=["12B", "32KiB-bf16", "4MiB-registered-destination", "int64-3d"],
)
def test_tensor_arrives_intact_and_the_owner_frees_it(peer, reader, shape, dtype):
    call, _ = peer
    ref, metadata = publish(call, shape, dtype, 7, 60.0)
    assert (ref.nbytes > NixlTransfer.COPY_MAX) == (shape == [1024, 1024])
    got = reader.fetch(ref, 10, metadata)
    assert got.dtype == getattr(torch, dtype) and list(got.shape) == shape
    assert torch.equal(got, tensor_for(shape, dtype, 7))
    assert published_soon(call, 0) == 0, "the owner kept the buffer after the reader's notice"


def test_many_reads_reuse_the_pools(peer, reader):
    call, _ = peer
    for seed in range(40):  # 40 x 1 MiB through a 4 MiB receive pool and a 16 MiB owner pool
        ref, metadata = publish(call, [512, 512], "float32", seed, 60.0)
        assert torch.equal(reader.fetch(ref, 10, metadata), tensor_for([512, 512], "float32", seed))
    assert published_soon(call, 0) == 0
    assert reader.recv_pool.used() == 0


def test_concurrent_reads_from_many_threads_each_get_their_own_bytes(peer, reader):
    """pd pulls the embeddings of concurrent requests from several threads; the reads overlap (the agent is locked
    per call, not per read) and each must land its own tensor, through both read paths."""
    call, _ = peer
    jobs = [([256, 64], "float32", 100 + i) if i % 3 else ([600, 512], "float32", 100 + i) for i in range(24)]
    refs = [publish(call, shape, dtype, seed, 60.0) for shape, dtype, seed in jobs]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda published: reader.fetch(published[0], 20, published[1]), refs))
    for (shape, dtype, seed), tensor in zip(jobs, got, strict=True):
        assert torch.equal(tensor, tensor_for(shape, dtype, seed)), seed
    assert published_soon(call, 0) == 0
    assert reader.recv_pool.used() == 0


def test_unread_buffer_freed_when_its_time_to_live_passes(peer):
    call, _ = peer
    call("publish", [1000], "float32", 1, 0.2)
    assert published_soon(call, 0) == 0


@pytest.mark.parametrize("connected", [True, False], ids=["connected-before", "never-connected"])
def test_reader_of_a_dead_owner_gets_an_error_naming_it(reader, connected):
    """Its own owner (killing the module's would break the tests after it): whether or not the reader had
    connected to it, the read fails within its deadline with a TransferError naming the owner."""
    with owner_process() as (call, proc):
        ref, metadata = publish(call, [512, 512], "float32", 3, 60.0)
        if connected:
            reader.fetch(publish(call, [4], "float32", 1, 60.0)[0], 10, metadata)
        proc.kill()
        proc.join(10)
        started = time.monotonic()
        with pytest.raises(TransferError, match=ref.agent):
            reader.fetch(ref, 3, metadata)
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
            reader.fetch(ref, 10, metadata)
        assert reader.peers() == 1
    ref, metadata = publish(call, [4], "float32", 2, 60.0)
    assert torch.equal(reader.fetch(ref, 10, metadata), tensor_for([4], "float32", 2))  # reconnects when needed


def test_a_reader_connects_only_with_metadata_it_was_given(peer, reader):
    """A descriptor names its agent but carries no way to reach it: a reader not yet connected to that agent
    needs the metadata its caller asked the owner for (pd asks the encoder replica it resolved)."""
    call, _ = peer
    ref, _ = publish(call, [4], "float32", 5, 60.0)
    stranger = ref.model_copy(update={"agent": "somebody-else"})
    with pytest.raises(TransferError, match="not connected to somebody-else"):
        reader.fetch(stranger, 3)
    assert not reader.connected("somebody-else")
