"""Isolation on a real kernel: a deleted or altered table is restored by the next sync, and a
node worker's exit leaves its rules in place. (Lab: :mod:`tests.netns.isolation_lab`.)
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable

import pytest

from tests.conftest import requires_root
from tests.netns.isolation_lab import (
    ALL3,
    FULL,
    PEER,
    Ep,
    Lab,
    Net,
)
from vnet.core import nft

pytestmark = [pytest.mark.netns, requires_root]


# --------------------------------------------------------------------------- resync


def test_deleted_or_altered_table_is_restored_and_workers_exit_leaves_rules(
        lab: Callable[[list[Net], list[Ep]], Lab]) -> None:
    lb = lab([Net("r", PEER, "10.83.1.1/24")], [Ep("r1", "r", "10.83.1.10/24"), Ep("r2", "r", "10.83.1.20/24"),
                                               Ep("q", "r", "10.83.1.30/24")])
    script = nft.render(lb.policy().compile("h1"))
    subprocess.run(["ip", "netns", "exec", lb.host, "nft", "delete", "table", "bridge", "vnet"], check=True)
    r = lb.enf.sync(script)
    assert (r.wrote, r.reason) == (True, "table missing")
    subprocess.run(["ip", "netns", "exec", lb.host, "nft", "add", "element", "bridge", "vnet", "mac_bind",
                    '{ "vne000000000000" . 02:00:00:00:00:01 }'], check=True)
    r = lb.enf.sync(script)
    assert (r.wrote, r.reason) == (True, "table altered")
    assert lb.enf.sync(script).wrote is False
    # a foreign accept-all table cannot open what ours forbids (Full would forbid r1 -> r2)
    lb.nets["r"].mode = FULL
    lb.apply()
    subprocess.run(["ip", "netns", "exec", lb.host, "nft", "-f", "-"], check=True, text=True,
                   input="table inet foreign {\n chain f {\n type filter hook forward priority -500; policy accept;\n"
                         " counter accept\n }\n}\n")
    blocked: dict[str, set[str]] = {"tcp/80": set(), "udp/80": set(), "icmp": set()}
    assert lb.probe(ALL3, [("r1", "r2")]) == blocked
    # Fail static: a worker process that applied this ruleset and then exits (stopped the way a
    # service manager stops it, or killed) removes nothing: the tables stay, and keep enforcing.
    script = nft.render(lb.policy().compile("h1"))
    for sig in (signal.SIGTERM, signal.SIGKILL):
        worker = subprocess.Popen([sys.executable, "-c", WORKER, lb.host], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert worker.stdin is not None and worker.stdout is not None
            worker.stdin.write(script)
            worker.stdin.close()
            line = worker.stdout.readline()
            assert line.startswith("applied"), f"the worker did not apply the ruleset: {line!r}"
            worker.send_signal(sig)
            rc = worker.wait(timeout=60)
        finally:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
        assert rc == -sig, (sig, rc)
        assert our_tables(lb.host) == {"table inet vnet", "table bridge vnet"}, sig
        assert lb.probe(ALL3, [("r1", "r2")]) == blocked, f"not enforced after the worker got {sig!r}"
    # Control: without our tables the same probes pass, so the checks above can fail.
    subprocess.run(["ip", "netns", "exec", lb.host, "nft", "-f", "-"], check=True, text=True,
                   input="delete table inet vnet\ndelete table bridge vnet\n")
    assert lb.probe(ALL3, [("r1", "r2")]) == {"tcp/80": {"r1>r2"}, "udp/80": {"r1>r2"}, "icmp": {"r1>r2"}}


# A node worker's enforcer in a process of its own: it applies the ruleset it reads on stdin,
# says so, and waits to be stopped.
WORKER = r'''
import signal, sys
from vnet.adapters.nftables import NftEnforcer
res = NftEnforcer(sys.argv[1]).sync(sys.stdin.read())
print("applied", res.wrote, res.reason, flush=True)
signal.pause()
'''


def our_tables(ns: str) -> set[str]:
    out = subprocess.run(["ip", "netns", "exec", ns, "nft", "list", "tables"], check=True, capture_output=True,
                         text=True).stdout
    return {line.strip() for line in out.splitlines() if line.strip().endswith(" vnet")}
