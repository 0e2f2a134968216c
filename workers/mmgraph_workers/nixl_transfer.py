"""NIXL (UCX underneath): the transfer we ship (transfer.py says what a transfer does and how reads stay safe)."""

from __future__ import annotations

import base64
import contextlib
import logging
import math
import os
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass

import torch

from mmgraph_workers.protocol import TensorRef
from mmgraph_workers.transfer import (
    FRAME,
    Pool,
    PoolFull,
    ReadFailed,
    StaleRead,
    Transfer,
    TransferError,
    _mem,
    copy_bytes,
    framed,
)

log = logging.getLogger("mmgraph.transfer")


@dataclass
class _Published:
    offset: int  # of the frame (header, bytes, trailer)
    size: int  # the frame's
    expires: float


@dataclass
class _Landing:
    """Where a read lands: a slot of the receive pool, or a buffer of its own registered for the read."""

    tensor: torch.Tensor
    offset: int | None = None
    registration: object = None
    xfer: object = None  # a read given up on in flight: the landing stays taken until the read ends
    given_up: float = 0.0  # when (time.monotonic())
    agent: str = ""  # whose bytes it reads


def _generation_bytes(generation: int, device: torch.device) -> torch.Tensor:
    return torch.frombuffer(bytearray(generation.to_bytes(FRAME, "little")), dtype=torch.uint8).to(device)


def _generation_of(frame: torch.Tensor) -> int:
    """The generation a header or trailer holds (the trailer follows the bytes: it may be unaligned)."""
    return int.from_bytes(frame.cpu().numpy().tobytes(), "little")


class NixlTransfer(Transfer):
    """NIXL agent per process, UCX backend; DRAM here, VRAM where tensors live on a GPU."""

    RELEASE = b"mmgraph-release:"
    # Reads up to this size land in the pre-registered receive pool and are copied out; larger ones register their
    # destination instead, since a copy grows with the size and a registration of host memory does not (measured
    # here: ~50 us from 1 to 64 MiB; UCX caches registrations where they pin memory).
    COPY_MAX = 1 << 20
    # A read on one host completes within tens of microseconds (a check costs ~3 us); yielding the GIL with sleep(0)
    # cost ~90 us when the scheduler took the chance to run another process, so a reader checks back to back first.
    SPIN_SECONDS = 200e-6
    MAX_PEERS = 256  # owners a reader stays connected to (encoders and pds come and go with their pods)
    LEAVE_SECONDS = 5.0  # a forgotten peer's connection is kept this long, for what is still pending on it
    ABANDON_SECONDS = 60  # a read given up on that NIXL still calls in progress after this has its landing freed

    def __init__(
        self,
        name: str | None = None,
        pool_bytes: int = 0,
        recv_pool_bytes: int = 0,
        hold_seconds: float = 0.0,
        device: str = "cpu",
    ):
        os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")
        from nixl._api import nixl_agent, nixl_agent_config

        self.name = name or f"mmgraph-{uuid.uuid4().hex[:12]}"
        self.agent = nixl_agent(self.name, nixl_agent_config(enable_prog_thread=False, backends=["UCX"]))
        self.buffer = torch.empty(pool_bytes, dtype=torch.uint8, device=device)
        self.pool = Pool(pool_bytes)
        self.recv_buffer = torch.empty(recv_pool_bytes, dtype=torch.uint8, device=device)
        self.recv_pool = Pool(recv_pool_bytes)
        for buffer in (self.buffer, self.recv_buffer):
            if buffer.numel():
                self.agent.register_memory(buffer)
        self.metadata = base64.b64encode(self.agent.get_agent_metadata()).decode()
        self._published: dict[str, _Published] = {}
        # a restarted owner's generations do not repeat its predecessor's
        self._generation = int.from_bytes(os.urandom(6), "little") << 8
        self.hold_seconds = hold_seconds
        self._held: list[tuple[float, int, int]] = []  # (until, offset, size): freed without a reader's notice
        self._unfinished: list[_Landing] = []  # reads given up on while in flight: their landings, until they end
        self._leaving: dict[str, float] = {}  # peers forgotten, and when their connection goes (_forget)
        self._peers: OrderedDict[str, str] = OrderedDict()  # agent name -> metadata we connected with, LRU
        self._lock = threading.Lock()  # the agent is shared by request threads and the poller
        self._stop, self._work = threading.Event(), threading.Event()
        if pool_bytes:
            threading.Thread(target=self._poller, name="nixl-poller", daemon=True).start()

    # ---- owner ----------------------------------------------------------------------------------------------

    def publish(self, tensor: torch.Tensor, ttl_seconds: float, owner: str) -> TensorRef:
        nbytes = tensor.numel() * tensor.element_size()
        handle = uuid.uuid4().hex
        with self._lock:
            offset = self.pool.alloc(framed(nbytes))
            if offset is None:
                raise PoolFull(f"the transfer pool ({self.pool.size} B) is full: readers are not pulling fast enough")
            self._generation += 1
            generation = self._generation
            stamp = _generation_bytes(generation, self.buffer.device)
            region = self.buffer[offset + FRAME : offset + FRAME + nbytes]
            copy_bytes(region, tensor.contiguous().view(-1).view(torch.uint8))
            copy_bytes(self.buffer[offset : offset + FRAME], stamp)
            copy_bytes(self.buffer[offset + FRAME + nbytes : offset + 2 * FRAME + nbytes], stamp)
            self._published[handle] = _Published(offset, framed(nbytes), time.monotonic() + ttl_seconds)
        self._work.set()
        return TensorRef(
            handle=handle,
            agent=self.name,
            owner=owner,
            address=region.data_ptr(),
            nbytes=nbytes,
            dtype=str(tensor.dtype).removeprefix("torch."),
            shape=list(tensor.shape),
            mem_type=_mem(self.buffer),
            device_id=self.buffer.device.index or 0,
            generation=generation,
            expires_in_seconds=ttl_seconds,
        )

    def _poller(self) -> None:
        """Progress reads of what we published: poll continuously while anything is published (a rendezvous read
        stalls without the owner's progress), sleep while nothing is."""
        while not self._stop.is_set():
            try:
                self.poll()
            except Exception:  # the poller must outlive any one bad notice, or every later read stalls
                log.exception("NIXL poller")
            if not self._published:
                self._work.wait(0.05)
                self._work.clear()
            else:
                time.sleep(0)  # a reader may be pulling right now: keep progressing, yielding only the GIL

    def close(self) -> None:
        self._stop.set()

    def poll(self) -> None:
        with self._lock:
            notices = self.agent.get_new_notifs()
        for messages in notices.values():
            for message in messages:
                if message.startswith(self.RELEASE):  # NIXL sends it after the data: the read has ended
                    self._drop(message[len(self.RELEASE) :].decode(), read=True)
        now = time.monotonic()
        with self._lock:  # publish() adds entries from other threads
            expired = [h for h, p in self._published.items() if p.expires < now]
            while self._held and self._held[0][0] < now:
                _, offset, size = self._held.pop(0)
                self.pool.release(offset, size)
        for handle in expired:
            self._drop(handle, read=False)

    def release(self, handle: str, handed_out: bool = True) -> None:
        self._drop(handle, read=not handed_out)

    def _drop(self, handle: str, read: bool) -> None:
        """Free a published frame, its header and trailer zeroed first: a reader still to come sees that it is
        gone, whatever is published there next. Freed without its reader's notice (its time-to-live passed, or a
        release), a read may be under way: the frame stays out of the pool for `hold_seconds` (a read's deadline),
        so the bytes such a read copies are never another publish's, whatever order a transport copies them in."""
        with self._lock:
            entry = self._published.pop(handle, None)
            if entry is None:
                return
            self.buffer[entry.offset : entry.offset + FRAME].zero_()
            self.buffer[entry.offset + entry.size - FRAME : entry.offset + entry.size].zero_()
            if read or not self.hold_seconds:
                self.pool.release(entry.offset, entry.size)
            else:
                self._held.append((time.monotonic() + self.hold_seconds, entry.offset, entry.size))

    def published(self) -> int:
        return len(self._published)

    # ---- reader ---------------------------------------------------------------------------------------------

    def connected(self, agent: str) -> bool:
        return agent in self._peers

    def _connect(self, agent: str, metadata: str | None) -> None:
        if agent in self._peers and metadata in (None, self._peers[agent]):
            self._peers.move_to_end(agent)
            return
        if metadata is None:
            raise TransferError(f"not connected to {agent}, and no metadata to connect with")
        if agent in self._peers:  # the owner restarted under the same name
            self._forget(agent)
        if self._leaving.pop(agent, None) is not None:  # forgotten a moment ago: disconnect it now, then connect
            self._disconnect(agent)
        self.agent.add_remote_agent(base64.b64decode(metadata))
        self._peers[agent] = metadata
        while len(self._peers) > self.MAX_PEERS:  # owners come and go with their pods: keep the recent ones
            self._forget(next(iter(self._peers)))

    def _forget(self, agent: str) -> None:
        """Drop a peer (gone, or least recently used), its reads given up on cancelled first; the connection goes
        LEAVE_SECONDS later (`_reap`): UCX aborts the process if a connection is dropped while a request on it is
        still pending (the release notice of a read that just ended, say). Called with the lock held."""
        self._peers.pop(agent, None)
        for landing in self._unfinished:
            if landing.agent == agent:
                self._cancel(landing)
        self._leaving.setdefault(agent, time.monotonic() + self.LEAVE_SECONDS)

    def _disconnect(self, agent: str) -> None:
        try:
            self.agent.remove_remote_agent(agent)
        except Exception as err:  # nixl._bindings errors share no base class; it may never have connected
            log.debug("forgetting NIXL peer %s: %s", agent, err)

    def peers(self) -> int:
        """How many owners this reader is connected to (for tests and metrics)."""
        return len(self._peers)

    def fetch(self, ref: TensorRef, deadline: float, metadata: str | None = None) -> torch.Tensor:
        dtype = getattr(torch, ref.dtype)
        itemsize = torch.empty(0, dtype=dtype).element_size()
        if itemsize * math.prod(ref.shape) != ref.nbytes:
            raise TransferError(f"descriptor of {ref.agent} is inconsistent: {ref.shape} {ref.dtype} != {ref.nbytes} B")
        if time.monotonic() >= deadline:  # e.g. its time-to-live was over before the read could begin
            raise TransferError(f"the read from {ref.agent} is past its deadline before it began")
        is_framed = ref.generation is not None  # a descriptor of the previous release has no frame: its bytes alone
        span = framed(ref.nbytes) if is_framed else ref.nbytes
        asked = time.monotonic()
        with self._lock:
            self._reap()
            try:
                self._connect(ref.agent, metadata)
            except TransferError:
                raise
            except Exception as err:  # nixl._bindings errors share no base class; the owner may be gone
                raise TransferError(f"cannot reach {ref.agent}: {type(err).__name__}: {err}") from err
            offset = self.recv_pool.alloc(span) if span <= self.COPY_MAX else None
            if offset is None:  # large, or the pool is full: read into a buffer of its own, registered for it
                buffer = torch.empty(span, dtype=torch.uint8)
                landing = _Landing(buffer, registration=self.agent.register_memory(buffer))
            else:
                landing = _Landing(self.recv_buffer[offset : offset + span], offset=offset)
        if (waited := time.monotonic() - asked) > 0.5:
            log.warning("NIXL read from %s waited %.2f s for the agent", ref.agent, waited)
        try:
            started = time.monotonic()
            try:
                self._read(ref, landing, deadline, is_framed)
            except ReadFailed:  # the owner is gone or broken (a deadline alone says nothing of the others)
                with self._lock:
                    self._forget(ref.agent)
                raise
            if (took := time.monotonic() - started) > 0.5:
                log.warning("NIXL read of %d B from %s took %.2f s", ref.nbytes, ref.agent, took)
            if is_framed:
                head, tail = _generation_of(landing.tensor[:FRAME]), _generation_of(landing.tensor[-FRAME:])
                if head != ref.generation or tail != ref.generation:
                    raise StaleRead(
                        f"the embeddings {ref.agent} published were freed before they were read (read late, past "
                        "their time-to-live); they must be encoded again"
                    )
            data = landing.tensor[FRAME : FRAME + ref.nbytes] if is_framed else landing.tensor
            if landing.registration is None:  # a pool slot: copy out
                out = torch.empty(ref.shape, dtype=dtype)
                copy_bytes(out.view(-1).view(torch.uint8), data)
                return out
            return data.view(dtype).view(ref.shape)  # its own buffer: the tensor is a view of it
        finally:
            with self._lock:
                if landing.xfer is None:
                    self._free(landing)
                else:
                    self._unfinished.append(landing)

    def _free(self, landing: _Landing) -> None:
        """Give a landing back (lock held): its pool slot, or its registration."""
        if landing.registration is not None:
            self.agent.deregister_memory(landing.registration)
        elif landing.offset is not None:
            self.recv_pool.release(landing.offset, landing.tensor.numel())

    def _reap(self) -> None:
        """Free the landings of reads given up on once NIXL says they ended, or ABANDON_SECONDS after (a read to
        a peer that died mid-read may never end; nothing has written for that long) (lock held). A NIXL error
        here fails no request."""
        now = time.monotonic()
        for agent in [agent for agent, at in self._leaving.items() if at < now]:
            del self._leaving[agent]
            self._disconnect(agent)
        for landing in list(self._unfinished):
            if landing.xfer is not None and self._ended(landing.xfer):
                landing.xfer = None
            elif now - landing.given_up < self.ABANDON_SECONDS:
                continue
            else:
                log.warning("freeing the landing of a NIXL read given up %d s ago", self.ABANDON_SECONDS)
                self._cancel(landing)
            self._unfinished.remove(landing)
            try:
                self._free(landing)
            except Exception as err:  # nixl._bindings errors share no base class
                log.warning("freeing the landing of an abandoned NIXL read: %s", err)

    def _ended(self, handle: object) -> bool:
        """Whether a read has ended (done, or failed: a state NIXL cannot report is an error), its handle then
        released."""
        try:
            if self.agent.check_xfer_state(handle) == "PROC":
                return False
        except Exception as err:  # nixl._bindings errors share no base class
            log.debug("an abandoned NIXL read ended in error: %s", err)
        with contextlib.suppress(Exception):  # it has ended: its handle is bookkeeping only
            self.agent.release_xfer_handle(handle)
        return True

    def _cancel(self, landing: _Landing) -> None:
        """Release a read still in progress (UCX cancels it; its transport may still write a while: the landing
        stays taken until `_reap` frees it ABANDON_SECONDS after it was given up)."""
        if landing.xfer is not None:
            with contextlib.suppress(Exception):
                self.agent.release_xfer_handle(landing.xfer)
            landing.xfer = None

    def unfinished(self) -> int:
        """Reads given up on whose landing is still taken until NIXL says they ended (for tests and metrics)."""
        return len(self._unfinished)

    def _read(self, ref: TensorRef, landing: _Landing, deadline: float, is_framed: bool) -> None:
        """One READ of the descriptor's frame (or its bytes alone, unframed) with its release notice. The agent
        lock is held per NIXL call, not across the wait: reads of several requests overlap, and one slow read does
        not hold up the others. A read given up on while NIXL still has it in progress is not released (UCX's
        cancel returns before the transport has stopped writing): its handle stays in `landing.xfer`, and the
        caller must not reuse the landing until NIXL says the read ended."""
        target = landing.tensor
        address = ref.address - FRAME if is_framed else ref.address
        try:
            with self._lock:
                local = self.agent.get_xfer_descs(
                    [(target.data_ptr(), target.numel(), target.device.index or 0)], _mem(target)
                )
                remote = self.agent.get_xfer_descs([(address, target.numel(), ref.device_id)], ref.mem_type)
                notice = self.RELEASE + ref.handle.encode()  # NIXL delivers it to the owner after the data
                handle = self.agent.initialize_xfer("READ", local, remote, ref.agent, notice)
        except Exception as err:  # nixl._bindings errors share no base class
            raise ReadFailed(f"NIXL read from {ref.agent}: {type(err).__name__}: {err}") from err
        state = "PROC"
        try:
            with self._lock:
                state = self.agent.transfer(handle)
            spin_until = time.monotonic() + self.SPIN_SECONDS
            while state != "DONE":
                if state == "ERR":
                    raise ReadFailed(f"NIXL read from {ref.agent} failed")
                now = time.monotonic()
                if now > deadline:
                    raise TransferError(f"NIXL read from {ref.agent} missed its deadline")
                if now > spin_until:
                    time.sleep(0)  # let the other readers' threads have the GIL between checks
                with self._lock:
                    state = self.agent.check_xfer_state(handle)
        except TransferError:
            raise
        except Exception as err:  # NIXL reports a failed read by raising: it has ended
            state = "ERR"
            raise ReadFailed(f"NIXL read from {ref.agent}: {type(err).__name__}: {err}") from err
        finally:
            if state in ("DONE", "ERR"):
                with self._lock, contextlib.suppress(Exception):  # it has ended: its handle is bookkeeping only
                    self.agent.release_xfer_handle(handle)
            else:
                log.warning("NIXL read from %s given up in flight: its landing waits for it to end", ref.agent)
                landing.xfer, landing.given_up, landing.agent = handle, time.monotonic(), ref.agent
