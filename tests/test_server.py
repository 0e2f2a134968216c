"""A stopping stage's drain and wait for its readers (mmgraph_workers.server), within the pod's grace period."""

from __future__ import annotations

import pytest

from mmgraph_contract.settings import Server


@pytest.mark.parametrize(
    ("wanted", "drain", "waits"),
    [(10.0, 35.0, 10.0), (3.0, 35.0, 3.0), (3600.0, 35.0, 13.0), (3600.0, 10.0, 38.0), (10.0, 49.0, 0.0)],
)
def test_a_stopping_stage_waits_for_its_readers_only_within_the_grace_period(wanted, drain, waits):
    """After the preStop delay and uvicorn's drain (up to --drain-seconds), the encoder waits for pd's pulls and
    pd for decode's; the three together stay inside the pod's grace period however long the wait wanted is, so
    the kubelet never kills a read. The default drain leaves a pull's deadline (10 s) whole."""
    from mmgraph_contract.wire import POD_GRACE_SECONDS, PRESTOP_SECONDS
    from mmgraph_workers.server import readers_wait_seconds

    assert readers_wait_seconds(wanted, drain) == waits
    assert PRESTOP_SECONDS + drain + readers_wait_seconds(wanted, drain) < POD_GRACE_SECONDS


def test_the_default_drain_leaves_room_for_the_prestop_delay_and_a_pulls_deadline():

    from mmgraph_contract.graph import TransferSpec
    from mmgraph_contract.wire import POD_GRACE_SECONDS, PRESTOP_SECONDS
    from mmgraph_workers.server import readers_wait_seconds

    args = Server(port=1)
    deadline = TransferSpec().timeout_seconds
    assert readers_wait_seconds(deadline, args.drain_seconds) == deadline
    assert PRESTOP_SECONDS + args.drain_seconds + deadline + 2 <= POD_GRACE_SECONDS
