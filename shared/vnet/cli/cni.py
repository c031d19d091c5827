"""``vnetctl cni install|uninstall``: put the vnet-cni plugin and a conflist where a
container runtime looks for them (``docs/cni.md``)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click
from rich.markup import escape

from vnet.cli import output
from vnet.cli.main import cli

MARK = "installed by vnetctl cni install"
PLUGIN = "vnet-cni"


def _interpreter() -> str:
    # the system Python when there is one: the shim needs the standard library only, and
    # a runtime's environment may not see this virtualenv
    return "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable


def plugin_source(interpreter: str | None = None) -> str:
    from vnet import cni_plugin

    src = Path(cni_plugin.__file__).read_text()
    body = src.split("\n", 1)[1] if src.startswith("#!") else src
    # -I -S: isolated, no site packages: the shim starts in ~20 ms instead of ~40
    return f"#!{interpreter or _interpreter()} -IS\n# {MARK}\n{body}"


def conflist(name: str, network: str, socket_path: str, version: str = "1.0.0") -> dict[str, object]:
    return {"cniVersion": version, "name": name,
            "plugins": [{"type": PLUGIN, "network": network, "socket": socket_path,
                         "capabilities": {"portMappings": True}}]}


@cli.group()
def cni() -> None:
    """The CNI plugin: install it where a container runtime (podman, containerd, CRI-O) looks."""


@cni.command()
@click.option("--network", required=True, help="The VNet network (name or id) the runtime's containers join.")
@click.option("--name", default=None, help="The CNI network name runtimes know it by (default: --network).")
@click.option("--bin-dir", default="/opt/cni/bin", show_default=True, type=click.Path(file_okay=False),
              help="Where the runtime looks for plugin executables (CNI_PATH).")
@click.option("--conf-dir", default="/etc/cni/net.d", show_default=True, type=click.Path(file_okay=False),
              help="Where the runtime reads network configurations.")
@click.option("--socket", "socket_path", default="/run/vnet/cni.sock", show_default=True,
              help="The node worker's CNI socket (vnet-node --cni --cni-socket ...).")
@click.option("--cni-version", default="1.0.0", show_default=True,
              type=click.Choice(["0.4.0", "1.0.0", "1.1.0"]),
              help="The conflist's cniVersion: 1.1.0 adds STATUS and GC, but podman 4 and containerd 1.6 "
                   "read results up to 1.0.0.")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON.")
def install(network: str, name: str | None, bin_dir: str, conf_dir: str, socket_path: str, cni_version: str,
            as_json: bool) -> None:
    """Write the vnet-cni executable and a conflist for one VNet network."""
    name = name or network
    b, c = Path(bin_dir), Path(conf_dir)
    b.mkdir(parents=True, exist_ok=True)
    c.mkdir(parents=True, exist_ok=True)
    exe = b / PLUGIN
    tmp = exe.with_suffix(".tmp")
    tmp.write_text(plugin_source())
    tmp.chmod(0o755)
    tmp.replace(exe)  # atomic: a runtime exec'ing it meanwhile sees the old or the new file
    conf = c / f"50-vnet-{name}.conflist"
    conf.write_text(json.dumps(conflist(name, network, socket_path, cni_version), indent=2) + "\n")
    if as_json:
        output.emit({"plugin": str(exe), "conflist": str(conf), "network": network, "name": name})
    else:
        output.say(escape(f"installed {exe} and {conf} (CNI network {name} -> VNet network {network})"))


@cni.command()
@click.option("--name", default=None, help="Remove only this CNI network's conflist (default: every vnet-cni one).")
@click.option("--bin-dir", default="/opt/cni/bin", show_default=True, type=click.Path(file_okay=False))
@click.option("--conf-dir", default="/etc/cni/net.d", show_default=True, type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print what was removed as JSON.")
def uninstall(name: str | None, bin_dir: str, conf_dir: str, as_json: bool) -> None:
    """Remove the conflists vnet-cni uses and, when none is left, the executable."""
    removed: list[str] = []
    c = Path(conf_dir)
    for f in sorted(c.glob("*.conflist")) if c.is_dir() else []:
        try:
            doc = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        ours = any(isinstance(p, dict) and p.get("type") == PLUGIN for p in doc.get("plugins", []))
        if ours and (name is None or doc.get("name") == name):
            f.unlink()
            removed.append(str(f))
    left = [f for f in (sorted(c.glob("*.conflist")) if c.is_dir() else []) if PLUGIN in f.read_text()]
    exe = Path(bin_dir) / PLUGIN
    if not left and exe.exists() and MARK in exe.read_text(errors="replace"):
        exe.unlink()
        removed.append(str(exe))
    if as_json:
        output.emit({"removed": removed})
    else:
        output.say(escape("removed " + (", ".join(removed) if removed else "nothing (no vnet-cni files there)")))
