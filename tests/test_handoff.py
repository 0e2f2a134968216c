"""How pd pulls a request's embeddings (mmgraph_workers.handoff): one deadline for all items, before any expires."""

from __future__ import annotations


def test_pd_pulls_a_requests_embeddings_by_one_deadline_before_any_of_them_expires():
    """All of a request's items share one deadline (a per-item timeout let 8 items take 80 s, past the encoder's
    time-to-live), and it falls a margin before the first item's owner frees it, counted from when pd got the
    message: owners' seconds, never their clocks. A descriptor of the previous release has no expiry."""
    from mmgraph_workers.handoff import EXPIRY_MARGIN_SECONDS, pull_deadline
    from mmgraph_workers.protocol import EncodedItem, TensorRef

    def item(expires: float | None) -> EncodedItem:
        ref = TensorRef(
            handle="h", agent="a", owner="http://127.0.0.1:1", address=8, nbytes=4, dtype="float32", shape=[1],
            generation=1 if expires else None, expires_in_seconds=expires,
        )  # fmt: skip
        return EncodedItem(key="k", embeddings=ref, num_tokens=1)

    assert pull_deadline([item(60), item(None)], 100.0, 10.0) == 110.0  # the timeout, for all items together
    assert pull_deadline([item(60), item(5)], 100.0, 10.0) == 105.0 - EXPIRY_MARGIN_SECONDS
    assert pull_deadline([item(1)], 100.0, 10.0) <= 100.0  # expired on arrival: not even begun
