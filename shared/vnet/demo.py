"""The main job, end to end, against a running stack: two isolated networks, three
containers, who can reach whom, and why — then everything removed again.

Used by ``vnetctl demo`` and ``vnetctl up --demo`` (the CLI hands it to the supervisor:
this is a client program, a layer above the runtime). Containers are bare network
namespaces named ``<prefix>-a`` ... (what a runtime would hand us); every packet it
sends stays between namespaces it made.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import uuid
from collections.abc import Callable

from vnet.client import VNetManager
from vnet.core.errors import VNetError
from vnet.core.model import DriverType, IsolationMode
from vnet.runtime.config import VNetConfig

Say = Callable[[str], None]


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=False)


def _ping(ns: str, addr: str) -> bool:
    r = subprocess.run(["ip", "netns", "exec", ns, "ping", "-c1", "-W1", addr],
                       capture_output=True, text=True, check=False)
    return r.returncode == 0


async def run_demo(config: VNetConfig, *, say: Say = print, keep: bool = False, prefix: str | None = None) -> int:
    """Run the demo; returns 0 when every observed result matched what explain said."""
    # Under a test run the namespaces carry the run's prefix, so a leftover is traceable.
    prefix = prefix or f"{os.environ.get('VNET_RUN_PREFIX') or 'vnet'}-demo-{uuid.uuid4().hex[:4]}"
    root = os.geteuid() == 0
    made_ns: list[str] = []
    made_eps: list[str] = []
    made_nets: list[str] = []
    mismatches = 0
    async with VNetManager(config) as m:
        try:
            nodes = [n for n in await m.nodes() if n.dataplane] if root else []
            node = nodes[0].node if nodes else None
            say(f"1. two networks: {prefix}-front (peer_only: peers talk, nothing else) and "
                f"{prefix}-back (full: nothing by default)")
            front = await m.create_network(f"{prefix}-front", None, None, DriverType.BRIDGE,
                                           IsolationMode.PEER_ONLY, {}, {"demo": prefix})
            made_nets.append(front.id)
            back = await m.create_network(f"{prefix}-back", None, None, DriverType.BRIDGE,
                                          IsolationMode.FULL, {}, {"demo": prefix})
            made_nets.append(back.id)
            say(f"   {front.name} {front.cidr} gw {front.gateway}; {back.name} {back.cidr} gw {back.gateway}")
            if node is None:
                say("   (no node worker with a data plane: not root, so the demo stops at the control plane)")
                return 0
            say(f"2. three containers on node {node}: a and b on {front.name}, c on {back.name}")
            placement = {"a": front, "b": front, "c": back}
            eps = {}
            for short, net in placement.items():
                ns = f"{prefix}-{short}"
                if _ip("netns", "add", ns).returncode != 0:
                    raise VNetError(f"could not create namespace {ns}")
                made_ns.append(ns)
                _ip("-n", ns, "link", "set", "lo", "up")
                ep = await m.create_endpoint(ns, net.id, node=node, netns=ns, wait=True)
                made_eps.append(ep.id)
                eps[short] = ep
                say(f"   {short}: {ep.ip_address} mac {ep.mac_address} in {ns} -> {ep.status}"
                    + (f" ({ep.reason})" if ep.reason else ""))
            await asyncio.sleep(0.5)  # the node applies the ruleset right after the reconcile
            say("3. who reaches whom (ICMP), and what explain says:")
            for src, dst in (("a", "b"), ("b", "a"), ("a", "c"), ("c", "a")):
                seen = await asyncio.to_thread(_ping, f"{prefix}-{src}", eps[dst].ip_address)
                verdict = await m.explain(eps[src].id, eps[dst].id, protocol="icmp")
                ok = seen == verdict.allowed
                mismatches += 0 if ok else 1
                say(f"   {src} -> {dst}: {'reaches' if seen else 'blocked'}; explain: "
                    f"{'allowed' if verdict.allowed else 'denied'} ({'; '.join(verdict.reasons[-1:])})"
                    + ("" if ok else "   <-- MISMATCH"))
            say("Try: vnetctl network topology; vnetctl endpoint ls; vnetctl policy explain "
                f"{eps['a'].id} {eps['c'].id} --proto icmp")
        finally:
            if keep:
                say(f"kept: networks {', '.join(made_nets)}; namespaces {', '.join(made_ns)}")
            else:
                for ep_id in made_eps:
                    try:
                        await m.delete_endpoint(ep_id, wait=True)
                    except VNetError as err:
                        say(f"   cleanup: endpoint {ep_id}: {err.message}")
                for net_id in reversed(made_nets):
                    try:
                        await m.delete_network(net_id, force=True)
                    except VNetError as err:
                        say(f"   cleanup: network {net_id}: {err.message}")
                for ns in made_ns:
                    _ip("netns", "del", ns)
                say("4. cleaned up: endpoints, networks and namespaces removed")
    return 1 if mismatches else 0
