"""Isolation on a real kernel, as properties: over random topologies (modes, relations,
rules, labels) what ``explain`` says is what the probes observe, and what a dry run's reach
diff says is the change in the probes. Topologies and probes:
:mod:`tests.netns.isolation_lab`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings

from tests.conftest import requires_root
from tests.netns.isolation_lab import (
    FULL,
    PEPS,
    PNETS,
    Ep,
    Lab,
    Net,
    Scenario,
    scenarios,
    set_scenario,
)

pytestmark = [pytest.mark.netns, requires_root]


@pytest.fixture
def prop_lab(lab: Callable[[list[Net], list[Ep]], Lab]) -> Lab:
    nets = [Net(n, FULL, f"10.84.{k}.1/24") for k, n in enumerate(PNETS)]
    eps = [Ep(e, n, f"10.84.{PNETS.index(n)}.{10 + i}/24") for i, (e, n) in enumerate(PEPS)]
    return lab(nets, eps)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sc=scenarios())
def test_explain_equals_observed(prop_lab: Lab, sc: Scenario) -> None:
    lb = prop_lab
    set_scenario(lb, sc)
    checks: list[tuple[str, int | None]] = [("tcp", 80), ("icmp", None)]
    seen = lb.probe(checks)
    pol = lb.policy()
    want: dict[str, set[str]] = {"tcp/80": set(), "icmp": set()}
    for a, b in itertools.permutations([e for e, _ in PEPS], 2):
        if pol.verdict(a, b, "tcp", 80).allowed:
            want["tcp/80"].add(f"{a}>{b}")
        if pol.verdict(a, b, "icmp").allowed:
            want["icmp"].add(f"{a}>{b}")
    assert seen == want, sc


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(before=scenarios(), after=scenarios())
def test_reach_diff_equals_the_change_in_probes(prop_lab: Lab, before: Scenario, after: Scenario) -> None:
    """What a dry run answers (vnet.core.reach, the engine behind every ``dry_run``) is what the
    kernel then does: over random pairs of topologies (modes, relations, rules and labels all
    change at once), a probe that changed from denied to allowed is an opened path of the
    diff, the other way a closed one, and an unchanged probe is in no path of the diff."""
    from vnet.core import reach

    lb = prop_lab
    checks: list[tuple[str, int | None]] = [("tcp", 80), ("icmp", None)]
    set_scenario(lb, before)
    seen_b, pol_b = lb.probe(checks), lb.policy()
    set_scenario(lb, after)
    seen_a, pol_a = lb.probe(checks), lb.policy()
    paths = reach.paths(pol_b, pol_a)

    def in_diff(src: str, dst: str, proto: str, port: int | None) -> bool | None:
        for p in paths:
            if (p.src, p.dst) == (src, dst) and p.protocol in (proto, "any") and (
                    port is None or p.protocol == "any" or p.lo <= port <= p.hi):
                return p.opened
        return None

    for a, b in itertools.permutations([e for e, _ in PEPS], 2):
        for proto, port in checks:
            key = f"{proto}/{port}" if port else proto
            was, now = f"{a}>{b}" in seen_b[key], f"{a}>{b}" in seen_a[key]
            got = in_diff(a, b, proto, port)
            assert got == (now if was != now else None), (key, a, b, was, now, got, before, after)
