"""Leader election on a coordination.k8s.io Lease, so two replicas can run and only one reconciles.

kopf has no leader election (its peering only pauses operators, and writes on every start), and the Python
client's only lock is a ConfigMap; this is client-go's algorithm on a Lease, in a few lines. The holder renews
every `retry` seconds. Another replica takes over once it has seen the same lease record, unrenewed, for
`duration` seconds by its own clock (never by comparing clocks across machines). A leader that cannot renew for
`renew_deadline` (< duration) steps down before anyone can take over, so two never lead at once, and it gives the
lease up on a clean exit so the standby takes over at once. A standby writes nothing; it only reads the Lease.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from mmgraph_operator import metrics
from mmgraph_operator.kubeapi import call

log = logging.getLogger("mmgraph.leader")


@dataclass(frozen=True)
class Timing:
    duration: float = 15.0  # a non-renewed lease is free after this long
    renew_deadline: float = 10.0  # a leader that could not renew for this long steps down
    retry: float = 2.0  # how often the leader renews and a standby looks

    def __post_init__(self) -> None:
        # A leader counts its deadline from the start of its last successful attempt (the renewal was stored no
        # earlier) and notices a missed one up to two retries late (an attempt, then a sleep); it must have stepped
        # down before a standby, which waits a whole duration from a later moment, takes over.
        if not (0 < self.retry < self.renew_deadline and self.renew_deadline + 2 * self.retry < self.duration):
            raise ValueError("leader election needs 0 < retry < renew deadline < lease duration - 2 x retry")


class LeaseElector:
    """Runs the election; `leading` is set while this replica holds the lease."""

    def __init__(
        self,
        api: client.ApiClient,
        namespace: str,
        name: str,
        identity: str,
        timing: Timing,
        on_started: Callable[[], None],
        on_stopped: Callable[[], None],
    ):
        self.leases = client.CoordinationV1Api(api)
        self.namespace, self.name, self.identity, self.timing = namespace, name, identity, timing
        self.on_started, self.on_stopped = on_started, on_stopped
        self.leading = False
        self._renewed = 0.0  # monotonic time of our last successful renewal
        self._observed: tuple | None = None  # (holder, renewTime) last seen, and when we first saw it
        self._observed_at = 0.0

    async def run(self) -> None:
        while True:
            started = time.monotonic()
            try:  # an attempt that outlives `retry` is a failed one (its write, if it lands, carries a stale rv)
                held = await asyncio.wait_for(self._acquire_or_renew(), self.timing.retry)
            except Exception as err:  # an API hiccup is a missed renewal, never a crash
                log.warning("lease %s/%s: %s", self.namespace, self.name, err)
                held = False
            if held:
                self._renewed = started  # the renewal was stored no earlier than this
                if not self.leading:
                    self._set(True)
            elif self.leading and time.monotonic() - self._renewed > self.timing.renew_deadline:
                log.error(
                    "could not renew lease %s/%s for %.0fs: stepping down",
                    self.namespace,
                    self.name,
                    self.timing.renew_deadline,
                )
                self._set(False)
            await asyncio.sleep(self.timing.retry)

    def held_until(self) -> float:
        """The monotonic time before which no other replica can take the lease over: our last stored renewal plus
        the duration another waits, unrenewed, before it takes over (a write of ours must have landed by then)."""
        return self._renewed + self.timing.duration if self.leading else 0.0

    def _set(self, leading: bool) -> None:
        self.leading = leading
        metrics.LEADER.set(int(leading))
        if leading:
            metrics.LEADER_ACQUISITIONS.inc()
            log.info("%s leads (lease %s/%s)", self.identity, self.namespace, self.name)
            self.on_started()
        else:
            self.on_stopped()

    async def _acquire_or_renew(self) -> bool:
        now = datetime.datetime.now(datetime.UTC)
        try:
            lease = await call(self.leases.read_namespaced_lease, self.name, self.namespace, timeout=self.timing.retry)
        except ApiException as err:
            if err.status != 404:
                raise
            body = client.V1Lease(
                metadata=client.V1ObjectMeta(name=self.name, namespace=self.namespace),
                spec=self._spec(now, now, 0),
            )
            try:
                await call(self.leases.create_namespaced_lease, self.namespace, body, timeout=self.timing.retry)
            except ApiException as err:
                if err.status == 409:  # another replica created it first
                    return False
                raise
            return True
        spec = lease.spec
        record = (spec.holder_identity, spec.renew_time)
        if record != self._observed:
            self._observed, self._observed_at = record, time.monotonic()
        mine = spec.holder_identity == self.identity
        duration = max(self.timing.duration, spec.lease_duration_seconds or 0)  # the holder's word, if longer
        if spec.holder_identity and not mine and time.monotonic() - self._observed_at < duration:
            if self.leading:  # another took it (we were away too long): stop now, not at our deadline
                log.error("lease %s/%s is held by %s: stepping down", self.namespace, self.name, spec.holder_identity)
                self._set(False)
            return False  # held by another, renewed within the lease duration as we measure it
        transitions = (spec.lease_transitions or 0) + (0 if mine else 1)
        lease.spec = self._spec(spec.acquire_time if mine else now, now, transitions)
        try:  # optimistic: the read's resourceVersion makes a concurrent taker's write fail with 409
            await call(
                self.leases.replace_namespaced_lease, self.name, self.namespace, lease, timeout=self.timing.retry
            )
        except ApiException as err:
            if err.status == 409:
                return False
            raise
        return True

    def _spec(self, acquired: datetime.datetime, renewed: datetime.datetime, transitions: int) -> client.V1LeaseSpec:
        return client.V1LeaseSpec(
            holder_identity=self.identity,
            lease_duration_seconds=round(self.timing.duration),
            acquire_time=acquired,
            renew_time=renewed,
            lease_transitions=transitions,
        )

    async def release(self) -> None:
        """Give the lease up (a clean exit): the standby takes over on its next look, not a lease duration later."""
        if not self.leading:
            return
        self._set(False)
        try:
            lease = await call(self.leases.read_namespaced_lease, self.name, self.namespace, timeout=self.timing.retry)
            if lease.spec.holder_identity == self.identity:
                lease.spec.holder_identity = None
                lease.spec.lease_duration_seconds = 1
                await call(
                    self.leases.replace_namespaced_lease, self.name, self.namespace, lease, timeout=self.timing.retry
                )
        except Exception as err:  # the standby then takes over a lease duration later
            log.warning("could not release lease %s/%s: %s", self.namespace, self.name, err)
