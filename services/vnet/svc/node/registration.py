"""The node worker's registration part: the kernel probe, the underlay and WireGuard key,
``register`` (repeated as the heartbeat) and the graceful deregister.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
from typing import Any

from vnet.contracts import codec, subjects
from vnet.contracts.endpoint import (
    NodeDeregister,
    NodeRegister,
    NodeRegistered,
)
from vnet.core import errors as E
from vnet.core import naming
from vnet.core.dataplane_model import (
    ProbeResult,
    Support,
)
from vnet.svc.node.dns import enabled as dns_enabled
from vnet.svc.node.workstate import RETRY_S, WorkerParts, WorkItem, _without_kernel

log = logging.getLogger(__name__)


class Registration(WorkerParts):
    """NodeWorker's registration methods (see the module docstring)."""

    async def _deregister(self) -> None:
        """Graceful stop: tell the endpoint service now, so the other hosts drop this one's
        overlay entries at once instead of after the heartbeat timeout (the kernel here keeps
        everything: fail static). Fire and forget."""
        if not self.registered:
            return
        try:
            await self.rt.nc.publish(subjects.NODE_DEREGISTER.format(node=self.node),
                                     codec.encode(NodeDeregister(node=self.node, instance=self.rt.instance)))
            await self.rt.nc.flush(timeout=2)
        except Exception as exc:  # the heartbeat timeout covers it
            log.info("node %s: could not deregister: %s", self.node, exc)
        self.registered = False

    # -- registration ----------------------------------------------------------------------
    async def _probe(self) -> None:
        if not self.dataplane:
            why = Support(available=False, reason=f"data plane off: {self.dataplane_reason}")
            self.probe_result = ProbeResult(kinds={}, drivers=_without_kernel(why))
            return
        try:
            self.probe_result = await asyncio.to_thread(self.rt.adapters.node().probe)
        except Exception as exc:
            log.warning("node %s: the kernel probe failed: %s", self.node, exc)
            why = Support(available=False, reason=f"the kernel probe failed: {exc}")
            self.probe_result = ProbeResult(kinds={}, drivers=_without_kernel(why))
            return
        missing = {d: s.reason for d, s in self.probe_result.drivers.items() if not s.available}
        for d, reason in sorted(missing.items()):
            log.info("node %s: driver %s unavailable: %s", self.node, d, reason)
        if self.underlay is None or self.underlay_ifname is None:
            try:
                found = await self._in_thread(self._find_underlay, self.underlay)
            except Exception as exc:
                log.info("node %s: could not read the host's addresses for the underlay: %s", self.node, exc)
            else:
                if found is not None:
                    self.underlay, self.underlay_ifname = found

    def _find_underlay(self, address: str | None) -> tuple[str, str] | None:
        """The interface holding ``address``, else the first IPv4 address (not loopback or
        link-local) of an interface that is not ours: where overlay peers reach this host."""
        host = self.rec.observer.host_full()
        for name in sorted(host.links):
            link = host.links[name]
            if name == "lo" or naming.is_ours(name) or naming.is_our_wg(name):
                continue
            for cidr in link.addrs:
                ip = ipaddress.ip_interface(cidr).ip
                if address is not None:
                    if str(ip) == address:
                        return address, name
                elif ip.version == 4 and not ip.is_loopback and not ip.is_link_local and not ip.is_multicast:
                    return str(ip), name
        return None

    async def _look_for_underlay(self) -> None:
        """No underlay yet (none when the worker started): look again; tell the registry when found."""
        try:
            found = await self._in_thread(self._find_underlay, self.underlay)
        except Exception as exc:
            log.debug("node %s: looking for the underlay: %s", self.node, exc)
            return
        if found is None:
            return
        self.underlay, self.underlay_ifname = found
        log.info("node %s: underlay %s on %s", self.node, *found)
        try:
            await self.register()
        except Exception as exc:  # the next heartbeat carries it
            log.info("node %s: could not re-register with the underlay: %s", self.node, exc)

    def _dns_registration(self) -> dict[str, Any]:
        """What the endpoints of this node learn about its resolver (vnet-node --dns)."""
        resolver = self.rt.state.get("dns")
        if not dns_enabled(self.rt):
            return {}
        out: dict[str, Any] = {"dns_domain": self.rt.params.get("dns_domain", "vnet")}
        if resolver is not None:  # started after the worker: the host's list from the next heartbeat on
            out.update(dns_search=resolver.search[:6], dns_options=resolver.options[:16])
        return out

    async def register(self) -> NodeRegistered:
        pr = self.probe_result
        req = NodeRegister(node=self.node, instance=self.rt.instance, underlay=self.underlay,
                           underlay_ifname=self.underlay_ifname, host_netns=self.host_netns,
                           privileged=os.geteuid() == 0, dataplane=self.dataplane,
                           drivers=dict(pr.drivers) if pr else {}, kinds=dict(pr.kinds) if pr else {},
                           heartbeat_s=self.heartbeat_s, version=self.rt.defn.version, isolation=self.isolation,
                           capabilities={"encrypted_overlay": self.encryption} if self.encryption else {},
                           wg_public_key=self.wg_public_key, wg_port=self.wg_port,
                           **self._dns_registration())
        reply, _ = await self.rt.adapters.request(subjects.NODE_REGISTER, req, NodeRegistered,
                                                  timeout=self.rt.config.request_timeout_s, params={"node": self.node})
        if reply.wg_address is not None:
            self.wg_address = reply.wg_address
        self.fleet_resync_s = reply.resync_s
        return reply

    async def _wg_key(self) -> None:
        """Whether this node can run encrypted overlays (registered as the capability
        ``encrypted_overlay``) and its WireGuard public key (the key pair is generated on
        first use, the private key stays in the node's state directory)."""
        if self.rec is None:
            self.encryption = Support(available=False, reason=f"data plane off: {self.dataplane_reason}")
            return
        kinds = self.probe_result.kinds if self.probe_result is not None else {}
        kmod = kinds.get("wireguard", Support(available=False)).available
        try:
            sup: Support = await self._in_thread(self.rec.wireguard.capability, self.wg_ifname, kmod)
            if sup.available:
                self.wg_public_key = await self._in_thread(self.rec.wg_public_key, self.wg_ifname)
        except Exception as exc:
            sup = Support(available=False, reason=f"no WireGuard key pair: {exc}")
        self.encryption = sup
        if not sup.available:
            log.warning("node %s: encrypted overlays unavailable here (their endpoints fail with %s): %s",
                        self.node, E.ENCRYPTION_UNAVAILABLE.code, sup.reason)

    async def _heartbeat(self) -> None:
        await self._probe()
        await self._wg_key()
        failures = 0
        while True:
            try:
                rep = await self.register()
            except Exception as exc:
                failures += 1
                (log.warning if failures == 1 else log.debug)(
                    "node %s: could not register with the endpoint service (retrying): %s", self.node, exc)
                await asyncio.sleep(min(RETRY_S * failures, self.heartbeat_s))
                continue
            if not self.registered or failures:
                log.info("node %s registered: %d endpoint(s) recorded here", self.node, rep.endpoints)
                if not self.fetched:
                    self.queue.put_nowait(WorkItem(kind="resync"))
            self.registered = True
            failures = 0
            await asyncio.sleep(self.heartbeat_s)
