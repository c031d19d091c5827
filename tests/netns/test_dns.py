"""Names inside networks, end to end: real clients (`dig`, `getent`) in container
namespaces ask the node's resolver on their gateway address; the answers follow
isolation exactly as `explain` does, forwarding goes to a fake upstream resolver in a
namespace of this test, and changes show without a resync (the resync is 60 s here).

Every namespace is made by the ``netns`` fixture (per-run prefix); the upstream's
address (192.0.2.53, TEST-NET-1) lives only inside a namespace of this test.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import control_plane, requires_root
from tests.netns.conftest import ip
from vnet import VNetManager
from vnet.core.policy import AllowRule, PortSpec, Selector
from vnet.runtime.config import VNetConfig
from vnet.runtime.service import Runtime

pytestmark = [pytest.mark.netns, requires_root,
              pytest.mark.skipif(shutil.which("dig") is None,
                                 reason="dig (dnsutils) is not installed: ops/scripts/bootstrap.sh installs it")]

UPSTREAM = "192.0.2.53"
UPSTREAM_ANSWER = "198.51.100.7"
FRESH_S = 1.0  # the bound the issue sets for a change to show on the resolver
FAKE_UPSTREAM = f"""
import socket
from dnslib import A, QTYPE, RR, DNSRecord
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("{UPSTREAM}", 53))
while True:
    data, peer = s.recvfrom(4096)
    q = DNSRecord.parse(data)
    r = q.reply()
    r.add_answer(RR(q.q.qname, QTYPE.A, rdata=A("{UPSTREAM_ANSWER}"), ttl=60))
    s.sendto(r.pack(), peer)
"""


async def dig(ns: str, server: str, name: str, qtype: str = "A", *, tcp: bool = False) -> tuple[str, list[str]]:
    """(status, answers) of one query from inside ``ns`` (in a thread: the resolver runs in this loop)."""
    return await asyncio.to_thread(_dig, ns, server, name, qtype, tcp)


def _dig(ns: str, server: str, name: str, qtype: str, tcp: bool) -> tuple[str, list[str]]:
    args = ["ip", "netns", "exec", ns, "dig", f"@{server}", name, qtype, "+time=2", "+tries=2"]
    if tcp:
        args.append("+tcp")
    out = subprocess.run(args, capture_output=True, text=True, timeout=20).stdout
    status = out.split("status: ", 1)[1].split(",", 1)[0] if "status: " in out else "NO-ANSWER"
    answers = []
    if "ANSWER SECTION:" in out:
        for line in out.split("ANSWER SECTION:", 1)[1].strip().splitlines():
            if not line.strip():
                break
            answers.append(line.split()[-1])
    return status, answers


async def _status(ns: str, server: str, name: str) -> str:
    return (await dig(ns, server, name))[0]


@dataclass
class Env:
    m: VNetManager
    node_rt: Runtime
    netns: Callable[[str], str]
    host: str


def _fake_upstream(netns: Callable[[str], str], host: str) -> subprocess.Popen[bytes]:
    up = netns("up")
    ip("link", "add", "vdu0", "type", "veth", "peer", "name", "vdu1", "netns", up, ns=host)
    ip("addr", "add", "192.0.2.1/24", "dev", "vdu0", ns=host)
    ip("link", "set", "vdu0", "up", ns=host)
    ip("addr", "add", f"{UPSTREAM}/24", "dev", "vdu1", ns=up)
    ip("link", "set", "vdu1", "up", ns=up)
    return subprocess.Popen(["ip", "netns", "exec", up, sys.executable, "-c", FAKE_UPSTREAM],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.fixture
async def env(config: VNetConfig, netns: Callable[[str], str], start_service: Callable[..., Awaitable[Runtime]],
              run_prefix: str) -> AsyncIterator[Env]:
    async with control_plane(config, start_service, netns, host="dh", node=f"{run_prefix}-dns", resync_s=60,
                             node_params={"dns": "on", "dns_upstream": UPSTREAM, "dns_ttl_s": "1"}) as cp:
        # the host's upstream resolver: a fake in a namespace of this test, behind a veth
        proc = await asyncio.to_thread(_fake_upstream, netns, cp.host)
        try:
            yield Env(cp.m, cp.node_rt, netns, cp.host)
        finally:
            proc.kill()
            proc.wait()


@pytest.fixture
def resolv_dirs() -> Iterator[list[Path]]:
    made: list[Path] = []
    yield made
    for d in made:
        shutil.rmtree(d, ignore_errors=True)


async def _eventually(fn: Callable[[], Awaitable[object]], want: object, within: float) -> float:
    """Seconds until ``await fn()`` returns ``want`` (fails after ``within``)."""
    t0 = time.monotonic()
    got: object = None
    while time.monotonic() - t0 < within:
        got = await fn()
        if got == want:
            return time.monotonic() - t0
        await asyncio.sleep(0.05)
    raise AssertionError(f"still {got!r} after {within} s, want {want!r}")


async def test_names_follow_isolation_and_forwarding_follows_external_access(
        env: Env, run_prefix: str, resolv_dirs: list[Path]) -> None:
    m = env.m
    front = await m.create_network(f"{run_prefix}-front", "10.89.10.0/24", "10.89.10.1", "bridge", "peer_only")
    back = await m.create_network(f"{run_prefix}-back", "10.89.11.0/24", "10.89.11.1", "bridge", "full")
    open_ = await m.create_network(f"{run_prefix}-open", "10.89.12.0/24", "10.89.12.1", "bridge", "none")
    names = {k: await asyncio.to_thread(env.netns, k) for k in ("a", "b", "c", "d", "n")}
    where = {"a": front, "b": front, "c": back, "d": back, "n": open_}
    eps = {}
    for k, net in where.items():
        eps[k] = await m.create_endpoint(names[k], net.id, wait=True, wait_timeout=30)
        assert eps[k].status == "ready", eps[k]
    gw = {k: where[k].gateway for k in where}

    # peers of a peer_only network see each other, by short name and by full name, over UDP and TCP
    assert await dig(names["a"], gw["a"], names["b"]) == ("NOERROR", [eps["b"].ip_address])
    full_name = f"{names['b']}.{front.name}.vnet"
    assert await dig(names["a"], gw["a"], full_name, tcp=True) == ("NOERROR", [eps["b"].ip_address])
    # reverse lookups too
    rev = ".".join(reversed(eps["b"].ip_address.split("."))) + ".in-addr.arpa"
    assert await dig(names["a"], gw["a"], rev, "PTR") == ("NOERROR", [f"{names['b']}.{front.name}.vnet.".lower()])
    # across unrelated networks the name does not exist; in a Full network neither does a peer's
    assert await _status(names["a"], gw["a"], names["c"]) == "NXDOMAIN"
    assert await _status(names["c"], gw["c"], names["d"]) == "NXDOMAIN"
    assert await dig(names["c"], gw["c"], names["c"]) == ("NOERROR", [eps["c"].ip_address])
    for src in "abcdn":
        for dst in "abcdn":
            v = await m.explain(eps[src].id, eps[dst].id, protocol="icmp")
            status, _ = await dig(names[src], gw[src], names[dst])
            assert (status == "NOERROR") == (v.allowed or src == dst), (src, dst, status, v.reasons)

    # an allow rule opens the name in its direction (and only there), without a resync
    await m.put_rule(AllowRule(id="c-to-d", from_=[Selector(endpoint=eps["c"].id)],
                               to=[Selector(endpoint=eps["d"].id)], ports=[PortSpec(protocol="tcp", port=5432)]))
    took = await _eventually(lambda: _status(names["c"], gw["c"], names["d"]), "NOERROR", within=10)
    print(f"\nrule put -> name visible: {took * 1e3:.0f} ms")
    assert took <= FRESH_S * 3
    assert await _status(names["d"], gw["d"], names["c"]) == "NXDOMAIN"

    # forwarding: only for queriers whose network may reach external addresses
    assert await dig(names["n"], gw["n"], "example.test") == ("NOERROR", [UPSTREAM_ANSWER])
    assert await _status(names["a"], gw["a"], "example.test") == "REFUSED"
    assert await _status(names["a"], gw["a"], "nosuch.vnet") == "NXDOMAIN"  # our domain: never forwarded

    # a new endpoint resolves when create(wait=True) returns, aliases too; a deleted one stops within the bound
    e = await m.create_endpoint(await asyncio.to_thread(env.netns, "e"), front.id, wait=True, wait_timeout=30,
                                aliases=["Cache", "redis-1"])
    assert e.status == "ready" and e.aliases == ["cache", "redis-1"]
    assert await dig(names["a"], gw["a"], e.container_id) == ("NOERROR", [e.ip_address])
    assert await dig(names["a"], gw["a"], f"redis-1.{front.name}.vnet") == ("NOERROR", [e.ip_address])
    assert await dig(names["a"], gw["a"], "CACHE") == ("NOERROR", [e.ip_address])
    assert await _status(names["c"], gw["c"], f"cache.{front.name}.vnet") == "NXDOMAIN"  # isolated: no alias either
    await m.delete_endpoint(e.id, wait=True)
    e_full = f"{e.container_id}.{front.name}.vnet"
    took = await _eventually(lambda: _status(names["a"], gw["a"], e_full), "NXDOMAIN", within=10)
    print(f"endpoint deleted -> NXDOMAIN: {took * 1e3:.0f} ms")
    assert took <= FRESH_S * 3
    # the short name is no longer ours: outside the domain, and this network may not forward
    assert await _status(names["a"], gw["a"], e.container_id) == "REFUSED"

    # the iproute2 convention: `ip netns exec` reads /etc/netns/<name>/resolv.conf
    d = Path("/etc/netns") / names["a"]
    resolv_dirs.append(d)
    d.mkdir(parents=True, exist_ok=True)
    (d / "resolv.conf").write_text(f"nameserver {gw['a']}\nsearch {front.name}.vnet vnet\n")
    out = (await asyncio.to_thread(subprocess.run, ["ip", "netns", "exec", names["a"], "getent", "hosts", names["b"]],
                                   capture_output=True, text=True, timeout=20)).stdout
    assert out.split()[:1] == [eps["b"].ip_address], out
    # the host itself may ask (operators: dig @gateway name) and sees every name
    assert await dig(env.host, gw["a"], names["c"]) == ("NOERROR", [eps["c"].ip_address])


async def test_garbage_never_stops_the_resolver(env: Env, run_prefix: str) -> None:
    m = env.m
    net = await m.create_network(f"{run_prefix}-g", "10.89.13.0/24", "10.89.13.1", "bridge", "peer_only")
    a, b = [await asyncio.to_thread(env.netns, k) for k in ("ga", "gb")]
    ea = await m.create_endpoint(a, net.id, wait=True, wait_timeout=30)
    eb = await m.create_endpoint(b, net.id, wait=True, wait_timeout=30)
    assert ea.status == eb.status == "ready"
    sender = (
        "import os, socket\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "for n in range(300):\n"
        f"    s.sendto(os.urandom(n % 64) + b'\\xc0\\x0c' * (n % 7), ('{net.gateway}', 53))\n"
        # a compression pointer loop: the name points at itself
        f"s.sendto(bytes.fromhex('abcd01000001000000000000c00c00010001'), ('{net.gateway}', 53))\n"
    )
    await asyncio.to_thread(subprocess.run, ["ip", "netns", "exec", a, sys.executable, "-c", sender], check=True,
                            timeout=30)
    assert await dig(a, net.gateway, b) == ("NOERROR", [eb.ip_address])
    counters = env.node_rt.state["dns"].server.counters
    assert counters.malformed >= 100, counters  # they did arrive, and were answered FORMERR or dropped


async def test_endpoints_carry_their_resolver_and_vnetctl_writes_it_for_containers(
        env: Env, run_prefix: str, tmp_root: Path) -> None:
    from click.testing import CliRunner

    from vnet.cli import main as cli_main

    cli_main.register()
    m = env.m
    net = await m.create_network(f"{run_prefix}-r", "10.89.14.0/24", "10.89.14.1", "bridge", "peer_only")
    peer = await m.create_endpoint(await asyncio.to_thread(env.netns, "rp"), net.id, wait=True, wait_timeout=30)
    assert peer.dns is not None
    assert peer.dns.nameservers == ["10.89.14.1"] and peer.dns.search == [f"{net.name}.vnet".lower(), "vnet"]
    name = f"{run_prefix}-rc"
    state = tmp_root / f"{run_prefix}-rstate"

    def ctl(*args: str) -> str:
        r = CliRunner().invoke(cli_main.cli, ["--nats", m.config.nats_url, *args],
                               env={"VNET_STATE_DIR": str(state)}, catch_exceptions=False)
        assert r.exit_code == 0, (args, r.output)
        return r.output

    resolv = Path("/etc/netns") / name / "resolv.conf"
    try:
        await asyncio.to_thread(ctl, "container", "create", name)
        await asyncio.to_thread(ctl, "endpoint", "create", name, "--network", net.name)
        text = resolv.read_text()
        assert "nameserver 10.89.14.1" in text and f"search {net.name}.vnet".lower() in text
        # `ip netns exec` shows it as /etc/resolv.conf: plain getent finds the peer by name
        out = (await asyncio.to_thread(subprocess.run, ["ip", "netns", "exec", name, "getent", "hosts",
                                                        peer.container_id], capture_output=True, text=True,
                                       timeout=20)).stdout
        assert out.split()[:1] == [peer.ip_address], out
        await asyncio.to_thread(ctl, "endpoint", "rm", *[e.id for e in await m.list_endpoints(container=name)])
        await asyncio.to_thread(ctl, "container", "rm", name)
        assert not resolv.exists() and not resolv.parent.exists()
    finally:
        await asyncio.to_thread(subprocess.run, ["ip", "netns", "del", name], capture_output=True)
        await asyncio.to_thread(shutil.rmtree, resolv.parent, True)


async def test_srv_lists_published_ports_as_isolation_says_and_answers_count_by_rcode(
        env: Env, run_prefix: str) -> None:
    from vnet.contracts.endpoint import PortMapping

    m = env.m
    net = await m.create_network(f"{run_prefix}-s", "10.89.15.0/24", "10.89.15.1", "bridge", "peer_only")
    other = await m.create_network(f"{run_prefix}-s2", "10.89.16.0/24", "10.89.16.1", "bridge", "peer_only")
    a, db, x = [await asyncio.to_thread(env.netns, k) for k in ("sa", "sdb", "sx")]
    ea = await m.create_endpoint(a, net.id, wait=True, wait_timeout=30)
    edb = await m.create_endpoint(db, net.id, wait=True, wait_timeout=30,
                                  ports=[PortMapping(host_port=25432, container_port=5432)])
    ex = await m.create_endpoint(x, other.id, wait=True, wait_timeout=30)
    assert ea.status == edb.status == ex.status == "ready"
    target = f"{db}.{net.name}.vnet.".lower()
    assert await dig(a, net.gateway, f"_postgresql._tcp.{db}", "SRV") == ("NOERROR", [target])
    assert await dig(a, net.gateway, f"_5432._tcp.{db}.{net.name}.vnet", "SRV", tcp=True) == ("NOERROR", [target])
    status, _ = await dig(a, net.gateway, f"_5432._udp.{db}", "SRV")  # not published over udp
    assert status == "NXDOMAIN"
    status, _ = await dig(x, other.gateway, f"_5432._tcp.{db}.{net.name}.vnet", "SRV")  # isolated network
    assert status == "NXDOMAIN"
    counts = {tuple(sorted(c.labels.items())): c.value for c in env.node_rt.metrics.snapshot().counters
              if c.name == "vnet_dns_queries"}
    node = env.node_rt.params["node"]
    assert counts.get((("node", node), ("rcode", "NOERROR")), 0) >= 2
    assert counts.get((("node", node), ("rcode", "NXDOMAIN")), 0) >= 2


async def test_repeated_questions_are_answered_from_the_cache_by_the_udp_pump_and_counted(
        env: Env, run_prefix: str) -> None:
    m = env.m
    net = await m.create_network(f"{run_prefix}-p", "10.89.17.0/24", "10.89.17.1", "bridge", "peer_only")
    a, b = [await asyncio.to_thread(env.netns, k) for k in ("pa", "pb")]
    await m.create_endpoint(a, net.id, wait=True, wait_timeout=30)
    eb = await m.create_endpoint(b, net.id, wait=True, wait_timeout=30)
    client = (
        "import socket, sys\n"
        "from dnslib import DNSRecord\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)\n"
        f"q = DNSRecord.question('{b}')\n"
        "for i in range(20):\n"
        "    q.header.id = 1000 + i\n"
        f"    s.sendto(q.pack(), ('{net.gateway}', 53))\n"
        "    r = DNSRecord.parse(s.recv(4096))\n"
        "    assert r.header.id == 1000 + i, r.header.id\n"
        "    print(r.rr[0].rdata)\n"
    )
    server = env.node_rt.state["dns"].server
    hits0, noerror0 = server.counters.cache_hits, server.counters.queries.get("NOERROR", 0)
    out = (await asyncio.to_thread(subprocess.run, ["ip", "netns", "exec", a, sys.executable, "-c", client],
                                   capture_output=True, text=True, timeout=30, check=True)).stdout
    assert out.split() == [eb.ip_address] * 20  # each reply carries its own query's id

    async def answered() -> int:  # the pump hands its counts to the loop every 0.1 s
        return int(server.counters.queries.get("NOERROR", 0) - noerror0)

    await _eventually(answered, 20, within=5)
    assert server.counters.cache_hits - hits0 >= 19  # only the first one asked the table
