"""The node worker's isolation part: this node's nftables ruleset, kept by the PolicyAgent.

Tables made to exist before the first reconcile, whole-ruleset syncs on rule and network
events and at every resync, an attach's delta computed here and pushed in the kernel
thread (the worker's module docstring, "policy"). Other nodes' endpoints that rules here
select come addressed to this node (the endpoint service's ``event_nodes``), like its own.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from nats.aio.msg import Msg

from vnet.contracts.endpoint import (
    PolicyStats,
)
from vnet.core import drivers as core_drivers
from vnet.core import mvpolicy, naming
from vnet.core.dataplane_model import (
    Support,
)
from vnet.svc.node.workstate import WorkerParts

log = logging.getLogger(__name__)


class PolicySync(WorkerParts):
    """NodeWorker's policysync methods (see the module docstring)."""

    # -- isolation (nftables) -----------------------------------------------------------------
    async def _start_policy(self) -> None:
        """Check stateful filtering, and make our tables exist before anything is created:
        with no table of ours a new endpoint would be open until the first ruleset."""
        if not self.dataplane:  # same latch as the reconciler: never the kernel without a data plane
            self.isolation = Support(available=False, reason=f"data plane off: {self.dataplane_reason}")
            return
        agent = self.rt.adapters.node().policy_agent(self.node, host_netns=self.host_netns,
                                                     timeout=self.rt.config.request_timeout_s,
                                                     state_dir=self.state_dir)
        # macvlan endpoints are enforced inside their containers: the agent asks which they are
        agent.locals_source = self._macvlan_locals
        self.isolation = await asyncio.to_thread(agent.start)
        if not self.isolation.available:
            log.warning("node %s: isolation is not stateful here: %s", self.node, self.isolation.reason)
        try:
            if await agent.ensure_tables():
                log.info("node %s: no nftables table of ours yet: installed the empty ruleset (our traffic "
                         "dropped until the first ruleset)", self.node)
        except Exception as exc:
            log.error("node %s: cannot install our nftables tables: %s", self.node, exc)
            self.isolation = Support(available=False, reason=f"nftables: {exc}")
        self.policy = agent

    def _macvlan_locals(self) -> dict[str, mvpolicy.MvLocal]:
        """This node's macvlan endpoints for the agent (asked on every attach and detach): no
        pass over every endpoint when no network here is enforced in its containers (a bridge
        node with 1,000 endpoints paid ~0.5 ms per attach for an empty answer)."""
        if not any(core_drivers.get(n.driver).enforced_in_container for n in self.nets.values()):
            return {}
        return mvpolicy.locals_from_desired(self.eps.values(), self.nets)

    async def _policy_sync(self, why: str, *, check: bool = True) -> None:
        """Fetch and apply this node's ruleset now (serialised); errors are logged and kept in
        the stats (the last ruleset, or the empty one, keeps enforcing)."""
        agent = self.policy
        if agent is None:
            return
        async with self._policy_lock:
            try:
                res = await agent.sync(check=check)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.info("node %s: policy sync (%s) failed; the last ruleset stays: %s", self.node, why, exc)
                return
        self.metrics.ruleset(res)
        if res.wrote:
            log.info("node %s: nftables ruleset %s applied (%s, %s) in %.0f ms", self.node, res.version, why,
                     res.reason, res.duration * 1000)

    def _policy_changed(self) -> None:
        """Something only the policy service sees whole changed (rules, modes, relations)."""
        if self.policy is not None:
            self._policy_fetch = True
            self._policy_dirty.set()

    def _policy_note(self, event: str, info: Any, *, local: bool) -> bool:
        """An endpoint added or removed: change the target ruleset here; False when that
        needs the whole ruleset (then fetched)."""
        agent = self.policy
        if agent is None:
            return True
        from vnet.contracts.policy import policy_endpoint

        pe = policy_endpoint(info)
        if event == "created":
            net = self.nets.get(info.network_id)
            bridge = net.bridge_name() if net is not None else naming.bridge_name(info.network_id)
            return agent.note_added(pe, local=local, bridge=bridge)
        return agent.note_removed(pe, local=local)

    def _push_policy(self) -> None:
        """In the kernel thread: the target ruleset's delta, one transaction (before the netlink work)."""
        agent = self.policy
        if agent is None:
            return
        try:
            res = agent.push()
        except Exception as exc:  # the next resync rewrites; the old bindings keep failing closed
            agent.last_error = str(exc)[:500]
            log.info("node %s: policy delta failed; the next sync repairs: %s", self.node, exc)
            self._policy_fetch = True
            return
        self.metrics.ruleset(res)  # from the kernel thread: handed to the loop
        if res is not None and res.whole:
            log.info("node %s: nftables ruleset written whole (%s) in %.1f ms", self.node, res.reason,
                     res.duration * 1000)

    async def _policy_loop(self) -> None:
        """Event-driven syncs, coalesced: events arriving during a sync cause one more."""
        while True:
            await self._policy_dirty.wait()
            self._policy_dirty.clear()
            if self._policy_fetch:
                self._policy_fetch = False
                await self._policy_sync("event", check=False)
            elif self.policy is not None:
                await asyncio.to_thread(self._push_policy)

    async def _on_policy_event(self, msg: Msg) -> None:
        self._policy_changed()

    def _policy_stats(self) -> PolicyStats | None:
        a = self.policy
        if a is None:
            return None
        return PolicyStats(syncs=a.syncs, applies=a.wrote, version=a.version,
                           last_reason=a.last.reason if a.last else "", last_error=a.last_error)
