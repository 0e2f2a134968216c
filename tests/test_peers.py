"""A stage's view of its peers (mmgraph_workers.peers): replica choice by load and vLLM version, key ownership
for content routing, re-resolution and which addresses are trusted."""

from __future__ import annotations

import asyncio

import pytest

from mmgraph_workers.peers import NoReplica, Peer


def test_peer_picks_the_least_busy_replica():
    peer = Peer("pd", "http://pd.ns.svc:8002", addresses=["10.0.0.1", "10.0.0.2"])
    (a1, first), (a2, second) = peer.acquire(), peer.acquire()
    assert {first, second} == {"http://10.0.0.1:8002", "http://10.0.0.2:8002"}
    a3, third = peer.acquire()
    assert third in (first, second)
    peer.release(a3)
    assert peer.acquire(avoid={"10.0.0.1"}) == ("10.0.0.2", "http://10.0.0.2:8002")  # 10.0.0.1 refused, say
    for address in (a1, a2, "10.0.0.2"):
        peer.release(address)
    assert peer.outstanding == {"10.0.0.1": 0, "10.0.0.2": 0}
    with pytest.raises(NoReplica, match="no replica took the connection"):
        peer.acquire(avoid=set(peer.addresses))


def test_pd_and_decode_are_paired_by_vllm_version_while_a_rollout_changes_it():
    """NIXL moves KV only between engines of one vLLM version: mid-rollout, a prefill goes to a pd whose version
    some decode runs, and its decode to one of that version; a replica whose version is not known yet (or that
    does not say) is never passed over, and where no replica of the wanted version is left (or none took the
    connection), one of another is tried."""
    pd = Peer("pd", "http://pd:8002", addresses=["10.0.0.1", "10.0.0.2"])
    decode = Peer("decode", "http://decode:8003", addresses=["10.0.0.3", "10.0.0.4"])
    pd.versions = {"10.0.0.1": "0.32.0", "10.0.0.2": "0.33.0"}
    decode.versions = {"10.0.0.3": "0.32.0"}
    assert decode.known_versions() is None and pd.other_versions(decode.known_versions()) == set()  # .4 unknown
    decode.versions["10.0.0.4"] = "0.32.0"
    unwanted = pd.other_versions(decode.known_versions())
    assert unwanted == {"10.0.0.2"}  # no decode reads 0.33's KV
    assert {pd.acquire(unwanted=unwanted)[0] for _ in range(4)} == {"10.0.0.1"}
    assert pd.acquire(avoid={"10.0.0.1"}, unwanted=unwanted)[0] == "10.0.0.2"  # .1 refused: the other, at last
    decode.versions["10.0.0.4"] = "0.33.0"
    assert pd.other_versions(decode.known_versions()) == set()
    assert decode.other_versions({"0.33.0"}) == {"10.0.0.3"}
    assert decode.acquire(unwanted={"10.0.0.3", "10.0.0.4"})[0] in {"10.0.0.3", "10.0.0.4"}  # none wanted: any
    pd.versions["10.0.0.2"] = ""  # a release that does not say
    assert pd.other_versions({"0.32.0"}) == set() and pd.other_versions({"0.31.0"}) == {"10.0.0.1"}
    pd._resolved(["10.0.0.2", "10.0.0.5"])  # .1 left the Service: its version is forgotten (an address is reused)
    assert set(pd.versions) == {"10.0.0.2"}


def test_idle_replicas_take_turns():
    peer = Peer("encoder", "http://encoder:8001", addresses=["10.0.0.1", "10.0.0.2", "10.0.0.3"])
    picks = []
    for _ in range(6):
        address, _ = peer.acquire()
        picks.append(address)
        peer.release(address)
    assert picks == ["10.0.0.1", "10.0.0.2", "10.0.0.3"] * 2


def owners_of(peer: Peer, keys: list[str]) -> dict[str, str]:
    """key -> the replica that owns it on an idle peer."""
    picked = {}
    for key in keys:
        address, spilled = peer.owner(key)
        assert not spilled  # nothing is busy: every key goes to its first owner
        picked[key] = address
    return picked


def test_keys_spread_over_encoders_and_move_only_with_the_replica_that_came_or_went():
    """Routing by content: each key has one owner, the owners' shares are even, and scaling the stage moves only
    the keys the new replica takes (and, scaling down, only the leaving one's), so the other caches stay warm."""
    keys = [f"image:{i:064x}" for i in range(4000)]
    addresses = [f"10.0.0.{i}" for i in range(1, 4)]
    three = owners_of(Peer("encoder", "http://e:8001", addresses=addresses), keys)
    assert owners_of(Peer("encoder", "http://e:8001", addresses=addresses[::-1]), keys) == three  # order-blind
    shares = [list(three.values()).count(a) / len(keys) for a in addresses]
    assert all(0.25 < share < 0.42 for share in shares), shares

    four = owners_of(Peer("encoder", "http://e:8001", addresses=[*addresses, "10.0.0.4"]), keys)
    moved = [k for k in keys if four[k] != three[k]]
    assert {four[k] for k in moved} == {"10.0.0.4"}  # only to the newcomer
    assert 0.18 < len(moved) / len(keys) < 0.32  # about a quarter

    two = owners_of(Peer("encoder", "http://e:8001", addresses=addresses[:2]), keys)
    moved = [k for k in keys if two[k] != three[k]]
    assert {three[k] for k in moved} == {"10.0.0.3"}  # only the leaver's keys


def test_a_busy_owner_spills_its_keys_to_the_next_owner_and_takes_them_back_when_free():
    """Bounded loads: a hot key (every call for one image) fills its owner up to 1.25x the mean (or the floor,
    what one pass takes), then goes to the key's next owner instead of queueing; once calls end, the owner takes
    it again."""
    peer = Peer("encoder", "http://e:8001", addresses=["10.0.0.1", "10.0.0.2", "10.0.0.3"])
    owner, second, _ = peer.owners("image:hot")
    picks = []
    for _ in range(6):  # six calls for the key, each in flight while the next is placed
        picks.append(peer.owner("image:hot"))
        assert peer.take(picks[-1][0]) == peer.url_of(picks[-1][0])
    # the bound, ceil(1.25 * (calls in flight + 1) / 3), is 1, 1, 2, 2, 3, 3: the hot key alternates between its
    # first two owners; the third is never needed
    assert picks == [(owner, False), (second, True)] * 3
    assert peer.owner("image:hot", floor=4) == (owner, False)  # 3 in flight: still one pass of a batch of 4
    for address, _ in picks:
        peer.release(address)
    assert peer.owner("image:hot") == (owner, False)
    assert peer.owner("image:hot", avoid={owner}) == (second, False)  # a refusal, say: the next owner, no spill
    with pytest.raises(NoReplica, match="no ready replica"):
        Peer("encoder", "http://e:8001").owner("image:hot")


def test_peer_with_no_ready_replica_fails_naming_the_stage():
    with pytest.raises(NoReplica, match="pd: no ready replica"):
        Peer("pd", "http://pd:1").acquire()


def test_peer_re_resolves_and_keeps_addresses_when_dns_fails():
    peer = Peer("encoder", "http://localhost:8001")
    asyncio.run(peer.refresh())
    assert "127.0.0.1" in peer.addresses
    gone = Peer("encoder", "http://no-such-host.invalid:8001", addresses=["127.0.0.9"])
    asyncio.run(gone.refresh())
    assert gone.addresses == ["127.0.0.9"]


def test_a_peer_trusts_an_address_while_it_may_still_be_draining(tmp_path, monkeypatch):
    """pd and decode accept an owner the stage's Service resolves to: a new replica (resolved again on a miss),
    and one that has just left the Service (it still serves pulls while it drains), but not one gone longer than
    a pod's grace period, nor one never seen."""
    from mmgraph_workers import peers

    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 encoder.g.local\n")
    peer = Peer("encoder", "http://encoder.g.local:8001")
    assert asyncio.run(peer.knows("127.0.0.1", str(hosts)))
    hosts.write_text("127.0.0.1 encoder.g.local\n127.0.0.2 encoder.g.local\n")  # a new replica: a miss resolves
    assert asyncio.run(peer.knows("127.0.0.2", str(hosts)))
    hosts.write_text("127.0.0.2 encoder.g.local\n")  # 127.0.0.1 left the Service, and drains
    peer.refreshed = -1e9
    assert asyncio.run(peer.knows("127.0.0.1", str(hosts))) and peer.addresses == ["127.0.0.2"]
    monkeypatch.setattr(peers, "TRUST_SECONDS", 0.0)  # ...longer ago than a grace period
    assert not asyncio.run(peer.knows("127.0.0.1", str(hosts)))
    assert not asyncio.run(peer.knows("127.0.0.3", str(hosts)))
