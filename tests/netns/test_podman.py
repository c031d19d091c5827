"""A real container runtime on VNet: podman 4 with its CNI backend runs containers from a
rootfs directory (no image registry is reachable) on a VNet network through vnet-cni.

Everything podman reads or writes is under a temp directory of this test: its
containers.conf (CNI backend, plugin and config dirs), its storage (--root/--runroot),
the conflist `vnetctl cni install` writes. The one thing named by podman, not by us, is
the container's network namespace (`/run/netns/netns-<uuid>`): podman makes it and
removes it with the container (checked at the end).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.conftest import control_plane, requires_root
from vnet import VNetManager
from vnet.cli.main import cli, register
from vnet.runtime.config import VNetConfig
from vnet.runtime.service import Runtime

BUSYBOX = shutil.which("busybox") or "/bin/busybox"
pytestmark = [pytest.mark.netns, requires_root,
              pytest.mark.skipif(shutil.which("podman") is None, reason="podman is not installed"),
              pytest.mark.skipif(not os.path.exists(BUSYBOX), reason="busybox-static is not installed (the rootfs)")]


@dataclass
class Pod:
    m: VNetManager
    work: Path
    host: str
    netns: Callable[[str], str]

    def podman(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "CONTAINERS_CONF": str(self.work / "containers.conf"),
               "HOME": str(self.work), "XDG_RUNTIME_DIR": str(self.work / "xdg")}
        return subprocess.run(["podman", "--root", str(self.work / "root"), "--runroot", str(self.work / "run"),
                               "--storage-driver", "vfs", "--cgroup-manager", "cgroupfs", "--events-backend", "file",
                               *args], env=env, capture_output=True, text=True, timeout=timeout)

    async def apodman(self, *args: str) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(self.podman, *args)


def _rootfs(d: Path) -> None:
    (d / "bin").mkdir(parents=True)
    shutil.copy(BUSYBOX, d / "bin" / "busybox")
    for tool in ("sh", "ip", "ping", "sleep", "cat", "nc", "hostname"):
        (d / "bin" / tool).symlink_to("busybox")
    for sub in ("proc", "sys", "dev", "etc", "tmp", "run"):
        (d / sub).mkdir(exist_ok=True)


def _podman_netns() -> set[str]:
    d = Path("/run/netns")
    return {n.name for n in d.iterdir() if n.name.startswith(("netns-", "cni-"))} if d.is_dir() else set()


@pytest.fixture
async def pod(config: VNetConfig, netns: Callable[[str], str], start_service: Callable[..., Awaitable[Runtime]],
              run_prefix: str) -> AsyncIterator[Pod]:
    # short: podman refuses a runroot longer than 50 characters
    work = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix=f"{run_prefix}-p", dir="/tmp"))
    before = await asyncio.to_thread(_podman_netns)
    for sub in ("bin", "net.d", "root", "run", "xdg"):
        (work / sub).mkdir(parents=True)
    _rootfs(work / "rootfs")
    sock = str(work / "cni.sock")
    (work / "containers.conf").write_text(
        "[network]\n"
        'network_backend = "cni"\n'
        f'cni_plugin_dirs = ["{work / "bin"}", "/usr/lib/cni"]\n'
        f'network_config_dir = "{work / "net.d"}"\n'
        "[engine]\n"
        # crun refuses this sandbox's hybrid cgroup layout; runc runs in it
        'runtime = "runc"\n'
        'cgroup_manager = "cgroupfs"\n'
        'events_logger = "file"\n'
        "[containers]\n"
        # this sandbox's hard limits are below podman's defaults (crun: setrlimit RLIMIT_NOFILE)
        'default_ulimits = []\n'
        f'tmp_dir = "{work / "run"}"\n')
    async with control_plane(config, start_service, netns, host="ph", node=f"{run_prefix}-pod", resync_s=60,
                             node_params={"cni": "on", "cni_socket": sock}) as cp:
        p = Pod(cp.m, work, cp.host, netns)
        try:
            yield p
        finally:
            await p.apodman("rm", "--all", "--force")
            await asyncio.to_thread(shutil.rmtree, work, True)
    # the namespaces podman made for its containers went with them
    left = await asyncio.to_thread(_podman_netns) - before
    assert not left, f"podman left network namespaces behind: {left}"


async def test_podman_containers_get_vnet_addresses_and_follow_isolation(pod: Pod, run_prefix: str) -> None:
    net = await pod.m.create_network(f"{run_prefix}-pn", "10.89.70.0/24", "10.89.70.1", "bridge", "peer_only")
    res = await asyncio.to_thread(CliRunner().invoke, cli, [
        "cni", "install", "--network", net.name, "--bin-dir", str(pod.work / "bin"), "--conf-dir",
        str(pod.work / "net.d"), "--socket", str(pod.work / "cni.sock")], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    ls = await pod.apodman("network", "ls", "--format", "{{.Name}} {{.Driver}}")
    assert f"{net.name} vnet-cni" in ls.stdout, ls.stdout + ls.stderr

    run = await pod.apodman("run", "-d", "--name", f"{run_prefix}-web", "--network", net.name,
                            "--rootfs", str(pod.work / "rootfs"), "sh", "-c", "sleep 600")
    assert run.returncode == 0, run.stderr
    eps = await pod.m.list_endpoints(network=net.id)
    assert len(eps) == 1 and eps[0].status == "ready", eps
    web = eps[0]
    # inside the container: the address VNet handed out, on eth0
    out = await pod.apodman("exec", f"{run_prefix}-web", "ip", "-4", "addr", "show", "eth0")
    assert f"{web.ip_address}/24" in out.stdout, out.stdout + out.stderr

    # a second container reaches the first (peer_only: peers talk)
    out = await pod.apodman("run", "--rm", "--network", net.name, "--rootfs", str(pod.work / "rootfs"),
                            "ping", "-c1", "-W2", web.ip_address)
    assert out.returncode == 0, out.stdout + out.stderr
    # a container of another network does not (no relation between the two)
    other = await pod.m.create_network(f"{run_prefix}-po", "10.89.71.0/24", "10.89.71.1", "bridge", "peer_only")
    res = await asyncio.to_thread(CliRunner().invoke, cli, [
        "cni", "install", "--network", other.name, "--bin-dir", str(pod.work / "bin"), "--conf-dir",
        str(pod.work / "net.d"), "--socket", str(pod.work / "cni.sock")], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    out = await pod.apodman("run", "--rm", "--network", other.name, "--rootfs", str(pod.work / "rootfs"),
                            "ping", "-c1", "-W2", web.ip_address)
    assert out.returncode != 0
    # --rm containers gave their addresses back
    assert [e.id for e in await pod.m.list_endpoints(network=other.id)] == []

    # podman rm: the endpoint and its address go
    rm = await pod.apodman("rm", "--force", f"{run_prefix}-web")
    assert rm.returncode == 0, rm.stderr
    assert await pod.m.list_endpoints(network=net.id) == []
    pools = await pod.m.pools(net.id)
    assert all(p.used == 0 for p in pools), pools
    res = await asyncio.to_thread(CliRunner().invoke, cli, [
        "cni", "uninstall", "--bin-dir", str(pod.work / "bin"), "--conf-dir", str(pod.work / "net.d")],
        catch_exceptions=False)
    assert res.exit_code == 0 and not (pod.work / "bin" / "vnet-cni").exists()


register()
