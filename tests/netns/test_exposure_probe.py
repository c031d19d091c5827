"""The exposure audit against the kernel: what ``vnet.core.reach.exposure`` lists is exactly
what an external namespace beyond the host's uplink reaches (the ruleset compiled from the
same Policy, applied in a host namespace; probes are real TCP connects)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from tests.netns.conftest import wait_links_ready
from tests.netns.isolation_lab import FULL, NONE, PEER, Agent, Ep, Lab, Net, reached
from vnet.core import reach
from vnet.core.policy import AllowRule, PortSpec, Published, Selector


def test_exposure_matches_probes_from_outside(lab: Callable[[list[Net], list[Ep]], Lab],
                                              netns: Callable[[str], str]) -> None:
    nets = [Net("en", NONE, "10.87.1.1/24"), Net("ep", PEER, "10.87.2.1/24"), Net("ef", FULL, "10.87.3.1/24")]
    eps = [Ep("n1", "en", "10.87.1.10/24"), Ep("n2", "en", "10.87.1.11/24"),
           Ep("p", "ep", "10.87.2.10/24", published=(Published(protocol="tcp", host_port=8085, port=85),)),
           Ep("p2", "ep", "10.87.2.11/24"), Ep("f", "ef", "10.87.3.10/24"), Ep("f2", "ef", "10.87.3.11/24")]
    lb = lab(nets, eps)
    lb.set_rules([AllowRule(id="https-in", from_=[Selector(cidr="192.0.2.0/24")], to=[Selector(endpoint="f")],
                            ports=[PortSpec(protocol="tcp", port=443)])])
    ext = netns("ext")
    for cmd in (["ip", "-n", lb.host, "link", "add", "up0", "type", "veth", "peer", "name", "eth0", "netns", ext],
                ["ip", "-n", lb.host, "addr", "add", "192.0.2.1/24", "dev", "up0"],
                ["ip", "-n", lb.host, "link", "set", "up0", "up"],
                ["ip", "-n", ext, "addr", "add", "192.0.2.2/24", "dev", "eth0"],
                ["ip", "-n", ext, "link", "set", "eth0", "up"],
                ["ip", "-n", ext, "route", "add", "10.87.0.0/16", "via", "192.0.2.1"]):
        subprocess.run(cmd, check=True)
    wait_links_ready(lb.host, ext)
    agent = Agent(ext)
    try:
        got = reach.exposure(lb.policy())
        rows = {(x.kind, x.ident): set(x.endpoints) for x in got}
        assert rows == {("network", "en"): {"n1", "n2"}, ("published", "p"): {"p"}, ("rule", "https-in"): {"f"}}

        def connects(targets: dict[str, tuple[str, int]]) -> set[str]:
            def send(dst: str, port: int) -> Callable[[float], Future[Any]]:
                return lambda t: agent.send(op="tcp", dst=dst, port=port, t=t)
            return reached({k: send(*v) for k, v in targets.items()})

        # each row's way in, tried toward every endpoint: exactly the row's endpoints answer
        def state() -> str:  # what the kernel looked like, should a probe fail (CI failed once here)
            cmds = [["ip", "-n", ns, "-s", "-br", "link"] for ns in (lb.host, ext)] + [
                ["ip", "-n", ns, "neigh"] for ns in (lb.host, ext)] + [["ip", "-n", ext, "route"]]
            return "\n".join(subprocess.run(c, capture_output=True, text=True).stdout for c in cmds)

        got80 = connects({e: (lb.eps[e].addr, 80) for e in lb.eps})
        assert got80 == rows[("network", "en")], state()
        assert connects({"p": ("192.0.2.1", 8085), "p-other": ("192.0.2.1", 8086)}) == rows[("published", "p")]
        assert connects({e: (lb.eps[e].addr, 443) for e in lb.eps}) == rows[("rule", "https-in")] | rows[("network",
                                                                                                         "en")]
        # and nothing else is reachable from outside: every endpoint exposed is in the audit
        every = connects({f"{e}:{port}": (lb.eps[e].addr, port) for e in lb.eps for port in (22, 80, 85, 443)})
        assert {k.split(":")[0] for k in every} == {e for s in rows.values() for e in s}
    finally:
        agent.close()
