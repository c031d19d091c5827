"""Helpers for the real-kernel tests: a guard on the root namespace, ping, and
independent views of a namespace through ``ip -j`` (not through our observer); the ``lab``
fixture of the isolation lab (:mod:`tests.netns.isolation_lab`).

Every namespace comes from the ``netns`` fixture (per-run prefix, deleted at
teardown, pass or fail). The autouse ``root_netns_untouched`` fixture fails a test
that changed the root namespace's interfaces, addresses or routes.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import pytest

from vnet.core import naming

if TYPE_CHECKING:
    from tests.netns.isolation_lab import Ep, Lab, Net


def ip_json(*args: str, ns: str | None = None) -> Any:
    cmd = ["ip", "-j"] + (["-n", ns] if ns else []) + list(args)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out or "[]")


def ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = ["ip"] + (["-n", ns] if ns else []) + list(args)
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def links(ns: str | None) -> dict[str, dict[str, Any]]:
    return {x["ifname"]: x for x in ip_json("-d", "link", "show", ns=ns)}


def addrs(ns: str | None) -> set[tuple[str, str]]:
    """(ifname, cidr) of every address."""
    out = set()
    for x in ip_json("addr", "show", ns=ns):
        for a in x.get("addr_info", []):
            out.add((x["ifname"], f"{a['local']}/{a['prefixlen']}"))
    return out


def routes(ns: str | None, family: str = "-4") -> list[dict[str, Any]]:
    return list(ip_json(family, "route", "show", "table", "main", ns=ns))


def sysctl(ns: str, key: str) -> str:
    out = subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-n", key], check=True, capture_output=True,
                         text=True).stdout
    return out.strip()


def wait_links_ready(*namespaces: str, timeout: float = 30.0) -> None:
    """Wait until every link with carrier in ``namespaces`` is operationally up. The kernel
    turns a link's carrier on at once but starts sending on it only when its link-watch
    work runs, which needs the RTNL lock: after a test tore down many namespaces the
    kernel's cleanup can hold that lock for seconds, and a probe sent meanwhile is dropped
    (CI: an exposure probe failed both of its tries right after the 1,024-port test)."""
    deadline = time.monotonic() + timeout
    while True:
        late = [f"{ns}/{x['ifname']}" for ns in namespaces for x in ip_json("link", "show", ns=ns)
                if "LOWER_UP" in x.get("flags", ()) and x.get("operstate") not in ("UP", "UNKNOWN")]
        if not late:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"links with carrier still not up after {timeout:.0f} s: {late}")
        time.sleep(0.05)


def ping(ns: str, addr: str, *, tries: int = 3) -> bool:
    """An echo from inside ``ns`` to ``addr`` (an address of a namespace this test made) that
    got an answer, in up to ``tries`` attempts of 2 s each: a loaded machine must not turn
    "reachable" into "unreachable". Where no answer is the expected result, ``tries=1`` says
    so (and a lost echo cannot make that check fail)."""
    if shutil.which("ping") is None:
        pytest.skip("ping (iputils-ping) is not installed: ops/scripts/bootstrap.sh installs it")
    for _ in range(tries):
        r = subprocess.run(["ip", "netns", "exec", ns, "ping", "-c1", "-W2", "-n", "-q", addr], capture_output=True)
        if r.returncode == 0:
            return True
    return False


def ping_all(pairs: list[tuple[str, str]], workers: int = 6) -> list[tuple[str, str]]:
    """Ping every (namespace, address); return the pairs that failed."""
    with ThreadPoolExecutor(workers) as pool:
        ok = list(pool.map(lambda p: ping(*p), pairs))
    return [p for p, good in zip(pairs, ok, strict=True) if not good]


def _root_snapshot() -> tuple[frozenset[str], frozenset[tuple[str, str]], frozenset[str]]:
    names = frozenset(x["ifname"] for x in ip_json("link", "show"))
    addresses = frozenset(addrs(None))
    rts = frozenset(json.dumps(r, sort_keys=True) for fam in ("-4", "-6") for r in routes(None, fam)
                    if "expires" not in r)
    return names, addresses, rts


@pytest.fixture(autouse=True)
def root_netns_untouched() -> Iterator[None]:
    """Fail loudly if a test changed the root namespace (it never may)."""
    if shutil.which("ip") is None:
        yield
        return
    before = _root_snapshot()
    yield
    after = _root_snapshot()
    assert not any(naming.is_ours(n) for n in after[0]), f"our interface in the ROOT namespace: {after[0]}"
    assert after[0] == before[0], f"root namespace interfaces changed: {before[0] ^ after[0]}"
    assert after[1] == before[1], f"root namespace addresses changed: {before[1] ^ after[1]}"
    assert after[2] == before[2], f"root namespace routes changed: {before[2] ^ after[2]}"


@pytest.fixture
def lab(netns: Callable[[str], str]) -> Iterator[Callable[[list[Net], list[Ep]], Lab]]:
    """``lab(nets, eps)``: the isolation lab of :mod:`tests.netns.isolation_lab` (a host
    namespace, its bridges and ruleset, a probe agent per endpoint); closed at teardown."""
    from tests.netns.isolation_lab import Lab  # here, not at the top: it imports this module's helpers

    made: list[Lab] = []

    def make(nets: list[Net], eps: list[Ep]) -> Lab:
        lb = Lab(netns, nets, eps)
        made.append(lb)
        return lb

    yield make
    for lb in made:
        lb.close()
