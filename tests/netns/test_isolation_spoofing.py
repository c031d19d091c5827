"""Isolation on a real kernel: anti-spoofing in every mode (forged source MAC or address,
forged ARP) while the attacker's own traffic still passes. The attacker's agent and its
forgeries come from :mod:`tests.netns.isolation_lab`.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.conftest import requires_root
from tests.netns.isolation_lab import (
    ALL3,
    FULL,
    MESH,
    NONE,
    PEER,
    Ep,
    Lab,
    Net,
    assert_forgeries_dropped,
)
from vnet.core.model import IsolationMode
from vnet.core.policy import AllowRule, Selector

pytestmark = [pytest.mark.netns, requires_root]


@pytest.mark.parametrize("mode", [FULL, PEER, MESH, NONE], ids=lambda m: m.value)
def test_anti_spoofing(lab: Callable[[list[Net], list[Ep]], Lab], mode: IsolationMode) -> None:
    nets = [Net("s", mode, "10.82.1.1/24")]
    eps = [Ep("att", "s", "10.82.1.10/24"), Ep("vic", "s", "10.82.1.20/24"), Ep("peer", "s", "10.82.1.30/24")]
    lb = lab(nets, eps)
    # inside the network everything is allowed by a rule, in every mode: only anti-spoofing can drop
    lb.set_rules([AllowRule(id="open", from_=[Selector(network="s")], to=[Selector(network="s")])])
    assert_forgeries_dropped(lb.agents["att"], lb.agents["vic"], lb.eps, lb.ns["vic"])
    # and the attacker's own traffic still passes through the kernel's stack
    assert lb.probe(ALL3, [("att", "vic")]) == {"tcp/80": {"att>vic"}, "udp/80": {"att>vic"}, "icmp": {"att>vic"}}
