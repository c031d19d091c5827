"""vnet-cni driven as libcni drives a plugin: the executable `vnetctl cni install` writes,
exec'd once per call with the CNI_* environment and the configuration on stdin, against a
real control plane and a node worker serving its CNI socket.

The "runtime" of these tests lives in a host namespace the test makes: every plugin
(ours, and the reference portmap and bandwidth chained after it) runs there through
`ip netns exec`, so iptables and tc changes land in that namespace, never in the root one.
"""

from __future__ import annotations

import ast
import asyncio
import json
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import control_plane, requires_root
from tests.netns.conftest import ip_json
from vnet import VNetManager
from vnet.cli.cni import conflist, plugin_source
from vnet.runtime.config import VNetConfig
from vnet.runtime.service import Runtime

pytestmark = [pytest.mark.netns, requires_root]

REF = Path("/usr/lib/cni")
PLUGIN_SRC = Path(__file__).resolve().parents[2] / "shared" / "vnet" / "cni_plugin.py"


@dataclass
class Env:
    m: VNetManager
    host: str
    bin_dir: Path
    socket: str
    netns: Callable[[str], str]
    node_rt: Runtime

    def call(self, plugin: str, cmd: str, conf: dict[str, Any], container: str = "", netns: str = "",
             ifname: str = "eth0", extra_env: dict[str, str] | None = None) -> tuple[int, Any, float]:
        """One exec of a plugin as a runtime does it: (exit code, parsed stdout or None, seconds)."""
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "CNI_COMMAND": cmd, "CNI_CONTAINERID": container,
               "CNI_NETNS": netns, "CNI_IFNAME": ifname, "CNI_PATH": f"{self.bin_dir}:{REF}",
               **(extra_env or {})}
        exe = str(self.bin_dir / plugin) if plugin == "vnet-cni" else str(REF / plugin)
        t0 = time.perf_counter()
        res = subprocess.run(["ip", "netns", "exec", self.host, exe], input=json.dumps(conf), env=env,
                             capture_output=True, text=True, timeout=120)
        took = time.perf_counter() - t0
        out = json.loads(res.stdout) if res.stdout.strip() else None
        return res.returncode, out, took

    async def acall(self, *args: Any, **kw: Any) -> tuple[int, Any, float]:
        # in a thread: the node worker answering the socket runs in this event loop
        return await asyncio.to_thread(self.call, *args, **kw)

    async def chain_add(self, confl: dict[str, Any], container: str, netns: str) -> dict[str, Any]:
        """ADD through every plugin of a conflist, each given the previous result (libcni)."""
        prev: dict[str, Any] | None = None
        for p in confl["plugins"]:
            conf = {"cniVersion": confl["cniVersion"], "name": confl["name"], **p}
            if prev is not None:
                conf["prevResult"] = prev
            rc, out, _ = await self.acall(p["type"], "ADD", conf, container, netns)
            assert rc == 0, (p["type"], out)
            prev = out
        assert prev is not None
        return prev

    async def chain_del(self, confl: dict[str, Any], container: str, netns: str, prev: dict[str, Any]) -> None:
        for p in reversed(confl["plugins"]):
            conf = {"cniVersion": confl["cniVersion"], "name": confl["name"], **p, "prevResult": prev}
            rc, out, _ = await self.acall(p["type"], "DEL", conf, container, netns)
            assert rc == 0, (p["type"], out)


@pytest.fixture
async def env(config: VNetConfig, netns: Callable[[str], str], start_service: Callable[..., Awaitable[Runtime]],
              run_prefix: str, tmp_root: Path) -> AsyncIterator[Env]:
    work = tmp_root / f"{run_prefix}-cni-{time.monotonic_ns()}"
    (work / "bin").mkdir(parents=True)
    exe = work / "bin" / "vnet-cni"
    exe.write_text(plugin_source())
    exe.chmod(0o755)
    sock = str(work / "cni.sock")
    async with control_plane(config, start_service, netns, host="ch", node=f"{run_prefix}-cni", resync_s=60,
                             node_params={"cni": "on", "cni_socket": sock}) as cp:
        yield Env(cp.m, cp.host, work / "bin", sock, netns, cp.node_rt)
    shutil.rmtree(work, ignore_errors=True)


def _conf(env: Env, network: str, **extra: Any) -> dict[str, Any]:
    return {"cniVersion": "1.1.0", "name": network, "type": "vnet-cni", "network": network, "socket": env.socket,
            **extra}


def test_the_shim_imports_the_standard_library_only() -> None:
    tree = ast.parse(PLUGIN_SRC.read_text())
    mods = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    mods |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert mods <= {"json", "os", "_socket", "socket", "sys"}, mods
    # json only in the unusual branch of the socket lookup: not at the top of the module
    top = {a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names}
    assert top == {"os", "sys"}, top


async def test_add_check_del_gc_status_version(env: Env, run_prefix: str) -> None:
    net = await env.m.create_network(f"{run_prefix}-cn", "10.89.40.0/24", "10.89.40.1", "bridge", "peer_only")
    c1, c2, c3 = [await asyncio.to_thread(env.netns, n) for n in ("k1", "k2", "k3")]
    p1, p2, p3 = (f"/run/netns/{c}" for c in (c1, c2, c3))
    conf = _conf(env, net.name)

    rc, out, _ = await env.acall("vnet-cni", "VERSION", {"cniVersion": "1.1.0"})
    assert rc == 0 and "1.1.0" in out["supportedVersions"] and "0.4.0" in out["supportedVersions"]
    rc, out, _ = await env.acall("vnet-cni", "STATUS", conf)
    assert rc == 0 and out is None

    rc, res, took = await env.acall("vnet-cni", "ADD", conf, "ctr-1", p1)
    assert rc == 0, res
    print(f"\nADD through the shim: {took * 1e3:.1f} ms")
    assert res["cniVersion"] == "1.1.0"
    host_if, ctr_if = res["interfaces"]
    assert "sandbox" not in host_if and host_if["name"] in {x["ifname"] for x in ip_json("link", "show", ns=env.host)}
    assert ctr_if == {"name": "eth0", "mac": ctr_if["mac"], "sandbox": p1}
    ip4 = res["ips"][0]
    assert ip4["address"].startswith("10.89.40.") and ip4["address"].endswith("/24")
    assert ip4["gateway"] == "10.89.40.1" and ip4["interface"] == 1
    assert {"dst": "0.0.0.0/0", "gw": "10.89.40.1"} in res["routes"]
    kernel = {x["ifname"]: x for x in ip_json("addr", "show", ns=c1)}
    assert kernel["eth0"]["address"] == ctr_if["mac"]
    assert ip4["address"] in {f"{a['local']}/{a['prefixlen']}" for a in kernel["eth0"]["addr_info"]}

    # CHECK after ADD; a CHECK whose prevResult disagrees fails
    rc, out, _ = await env.acall("vnet-cni", "CHECK", {**conf, "prevResult": res}, "ctr-1", p1)
    assert rc == 0, out
    bad = {**res, "ips": [{"address": "10.89.40.250/24", "interface": 0}]}
    rc, err, _ = await env.acall("vnet-cni", "CHECK", {**conf, "prevResult": bad}, "ctr-1", p1)
    assert rc == 1 and err["code"] == 101 and "10.89.40." in err["msg"]

    # a repeated ADD is refused and changes nothing
    rc, err, _ = await env.acall("vnet-cni", "ADD", conf, "ctr-1", p1)
    assert rc == 1 and err["code"] == 100 and "already attached" in err["msg"]
    eps = await env.m.list_endpoints(container="ctr-1")
    assert len(eps) == 1 and eps[0].ip_address == ip4["address"].split("/")[0]

    # a second container: peers of a peer_only network reach each other
    rc, res2, _ = await env.acall("vnet-cni", "ADD", conf, "ctr-2", p2)
    assert rc == 0, res2
    addr2 = res2["ips"][0]["address"].split("/")[0]
    ping = await asyncio.to_thread(subprocess.run, ["ip", "netns", "exec", c1, "ping", "-c1", "-W2", addr2],
                                   capture_output=True)
    assert ping.returncode == 0

    # DEL is idempotent (a cached prevResult may come along; missing is success)
    for _ in range(2):
        rc, out, _ = await env.acall("vnet-cni", "DEL", {**conf, "prevResult": res}, "ctr-1", p1)
        assert rc == 0 and out is None
    assert await env.m.list_endpoints(container="ctr-1") == []
    assert "eth0" not in {x["ifname"] for x in ip_json("link", "show", ns=c1)}
    # DEL of a container whose namespace is gone, and of one never added
    assert (await env.acall("vnet-cni", "DEL", conf, "never-added", ""))[0] == 0

    # GC: what the runtime no longer lists goes, what it lists stays
    assert (await env.acall("vnet-cni", "ADD", conf, "ctr-3", p3))[0] == 0
    gc = {**conf, "cni.dev/valid-attachments": [{"containerID": "ctr-2", "ifname": "eth0"}]}
    rc, out, _ = await env.acall("vnet-cni", "GC", gc)
    assert rc == 0, out
    assert [e.container_id for e in await env.m.list_endpoints(network=net.id)] == ["ctr-2"]


async def test_bad_input_gets_the_spec_codes_and_leaves_nothing(env: Env, run_prefix: str) -> None:
    net = await env.m.create_network(f"{run_prefix}-cb", "10.89.41.0/24", "10.89.41.1", "bridge", "none")
    c = await asyncio.to_thread(env.netns, "kb")
    p = f"/run/netns/{c}"
    conf = _conf(env, net.name)
    exe = str(env.bin_dir / "vnet-cni")

    def raw(stdin: str, **envv: str) -> tuple[int, Any]:
        e = {"PATH": "/usr/bin:/bin", "CNI_COMMAND": "ADD", "CNI_CONTAINERID": "x", "CNI_NETNS": p,
             "CNI_IFNAME": "eth0", **envv}
        r = subprocess.run([exe], input=stdin, env=e, capture_output=True, text=True, timeout=60)
        return r.returncode, json.loads(r.stdout)

    assert (await asyncio.to_thread(raw, "{not json"))[1]["code"] == 6
    assert (await asyncio.to_thread(raw, json.dumps({**conf, "cniVersion": "9.9.9"})))[1]["code"] == 1
    assert (await asyncio.to_thread(raw, json.dumps(conf), CNI_COMMAND="FROB"))[1]["code"] == 4
    rc, err = await asyncio.to_thread(raw, json.dumps({**conf, "network": "no-such-network"}))
    assert rc == 1 and err["code"] == 7 and "no-such-network" in err["msg"], err
    rc, err = await asyncio.to_thread(raw, json.dumps(conf), CNI_NETNS="/run/netns/nope-missing")
    assert rc == 1 and err["code"] == 4 and "CNI_NETNS" in err["msg"], err
    rc, err = await asyncio.to_thread(raw, json.dumps(conf), CNI_IFNAME="")
    assert rc == 1 and err["code"] == 4 and "CNI_IFNAME" in err["msg"], err
    rc, err = await asyncio.to_thread(raw, json.dumps({**conf, "runtimeConfig": {"portMappings": [
        {"hostPort": 0, "containerPort": 80}]}}))
    assert rc == 1 and err["code"] == 7, err
    # no half-made endpoint or address after all that
    assert await env.m.list_endpoints(network=net.id) == []
    pools = await env.m.pools(net.id)
    assert all(pl.used == 0 for pl in pools), pools
    # nobody on the socket: STATUS says not available, ADD says try again later
    rc, err, _ = await env.acall("vnet-cni", "STATUS", {**conf, "socket": env.socket + ".gone"})
    assert rc == 1 and err["code"] == 50
    rc, err, _ = await env.acall("vnet-cni", "ADD", {**conf, "socket": env.socket + ".gone"}, "y", p)
    assert rc == 1 and err["code"] == 11


@pytest.mark.skipif(not (REF / "portmap").exists() or shutil.which("iptables") is None,
                    reason="the reference plugins (containernetworking-plugins) or iptables are not installed")
async def test_chained_with_the_reference_portmap_and_bandwidth(env: Env, run_prefix: str) -> None:
    net = await env.m.create_network(f"{run_prefix}-cc", "10.89.42.0/24", "10.89.42.1", "bridge", "none")
    c = await asyncio.to_thread(env.netns, "kc")
    p = f"/run/netns/{c}"
    confl = conflist(net.name, net.name, env.socket)
    confl["cniVersion"] = "1.0.0"  # Debian's reference plugins stop at 1.0.0
    confl["plugins"] += [
        {"type": "portmap", "capabilities": {"portMappings": True}, "snat": False,
         "runtimeConfig": {"portMappings": [{"hostPort": 18080, "containerPort": 80, "protocol": "tcp"}]}},
        {"type": "bandwidth", "ingressRate": 1000000, "ingressBurst": 100000,
         "egressRate": 1000000, "egressBurst": 100000},
    ]
    res = await env.chain_add(confl, "ctr-c", p)
    # our interface and address survive the chain, each plugin adding its own
    assert res["interfaces"][1]["name"] == "eth0" and res["interfaces"][1]["sandbox"] == p
    assert res["ips"][0]["address"].startswith("10.89.42.")
    nat = await asyncio.to_thread(subprocess.run, ["ip", "netns", "exec", env.host, "iptables", "-t", "nat", "-S"],
                                  capture_output=True, text=True)
    assert "18080" in nat.stdout  # portmap's DNAT, in the test's host namespace
    qd = await asyncio.to_thread(subprocess.run, ["tc", "-n", env.host, "qdisc", "show"], capture_output=True,
                                 text=True)
    assert "tbf" in qd.stdout  # bandwidth's shaping on the host side
    # CHECK of the whole chain's result: ours finds its interface in it
    conf0 = {"cniVersion": "1.0.0", "name": net.name, **confl["plugins"][0], "prevResult": res}
    assert (await env.acall("vnet-cni", "CHECK", conf0, "ctr-c", p))[0] == 0
    await env.chain_del(confl, "ctr-c", p, res)
    assert await env.m.list_endpoints(network=net.id) == []
    nat = await asyncio.to_thread(subprocess.run, ["ip", "netns", "exec", env.host, "iptables", "-t", "nat", "-S"],
                                  capture_output=True, text=True)
    assert "18080" not in nat.stdout
