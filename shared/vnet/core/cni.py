"""The CNI 1.1 side of VNet, pure: reading a network configuration, writing results and
errors the way the spec says (https://www.cni.dev/docs/spec/). No I/O here: the node
worker's socket server (``svc/node/cni.py``) and the plugin shim (``vnet/cni_plugin.py``)
do the talking.

The conf VNet reads (one plugin of a conflist, or a plain conf)::

    {"cniVersion": "1.1.0", "name": "web", "type": "vnet-cni",
     "network": "web",                       # the VNet network (name or id); default: "name"
     "socket": "/run/vnet/cni.sock",          # the node worker's socket (the shim reads it)
     "labels": {"app": "web"},                # labels of every endpoint of this conf
     "runtimeConfig": {"portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}],
                       "labels": {"io.kubernetes.pod.name": "web-1"}},
     "prevResult": {...}}                     # chaining: what earlier plugins returned
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from vnet.core import errors as E

SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
LABEL_NETWORK = "cni.vnet/network"  # marks endpoints a runtime made through CNI (GC looks at them only)

# The spec's well-known error codes; 100+ are ours.
INCOMPATIBLE_VERSION = 1
UNSUPPORTED_FIELD = 2
UNKNOWN_CONTAINER = 3
INVALID_ENV = 4
IO_FAILURE = 5
DECODING_FAILURE = 6
INVALID_CONFIG = 7
TRY_AGAIN_LATER = 11
NOT_AVAILABLE = 50
LIMITED_CONNECTIVITY = 51
VNET_CONFLICT = 100  # VNet refused: the thing clashes with existing state (already attached, port in use, ...)
VNET_FAILED = 101  # the node could not wire the container (the reason is in msg)
VNET_INTERNAL = 102


class CniError(Exception):
    """An error result: ``{"cniVersion", "code", "msg", "details"}``."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def result(self, version: str) -> dict[str, Any]:
        out: dict[str, Any] = {"cniVersion": version, "code": self.code, "msg": self.msg}
        if self.details:
            out["details"] = self.details
        return out


def from_vnet(err: E.VNetError) -> CniError:
    """A VNet error as a CNI error: the spec's code where one fits, VNet's code in details."""
    details = f"vnet: {err.code}" + (f" (trace {err.trace_id})" if getattr(err, "trace_id", None) else "")
    if err.code in (E.NETNS_NOT_FOUND.code, E.INVALID_NETNS.code, E.INVALID_IFNAME.code):
        code = INVALID_ENV
    elif err.code in (E.NETWORK_NOT_FOUND.code, E.DRIVER_UNAVAILABLE.code) or err.status == 400:
        code = INVALID_CONFIG
    elif err.status in (409, 423):
        code = VNET_CONFLICT
    elif err.status in (503, 504):
        code = TRY_AGAIN_LATER
    else:
        code = VNET_INTERNAL
    return CniError(code, err.message, details)


@dataclass
class PortMap:
    host_port: int
    container_port: int
    protocol: str = "tcp"


@dataclass
class CniConf:
    version: str
    name: str
    network: str
    labels: dict[str, str] = field(default_factory=dict)
    ports: list[PortMap] = field(default_factory=list)
    prev_result: dict[str, Any] | None = None
    valid_attachments: list[tuple[str, str]] = field(default_factory=list)  # GC: (containerID, ifname)


def _str_map(v: Any, what: str) -> dict[str, str]:
    if v is None:
        return {}
    if not isinstance(v, Mapping) or not all(isinstance(k, str) and isinstance(x, str) for k, x in v.items()):
        raise CniError(INVALID_CONFIG, f"{what} must be an object of strings")
    return dict(v)


def parse_conf(conf: Any) -> CniConf:
    """The parts of a network configuration VNet uses; CniError for anything malformed."""
    if not isinstance(conf, Mapping):
        raise CniError(DECODING_FAILURE, "the network configuration on stdin is not a JSON object")
    version = conf.get("cniVersion")
    if not isinstance(version, str) or not version:
        raise CniError(INVALID_CONFIG, "the network configuration has no cniVersion")
    if version not in SUPPORTED_VERSIONS:
        raise CniError(INCOMPATIBLE_VERSION, f"cniVersion {version} is not supported; vnet-cni supports "
                       + ", ".join(SUPPORTED_VERSIONS))
    name = conf.get("name")
    if not isinstance(name, str) or not name:
        raise CniError(INVALID_CONFIG, "the network configuration has no name")
    network = conf.get("network", name)
    if not isinstance(network, str) or not network:
        raise CniError(INVALID_CONFIG, "\"network\" must name a VNet network (a name or an id)")
    rc = conf.get("runtimeConfig") or {}
    if not isinstance(rc, Mapping):
        raise CniError(INVALID_CONFIG, "runtimeConfig must be an object")
    labels = {**_str_map(conf.get("labels"), "labels"), **_str_map(rc.get("labels"), "runtimeConfig.labels")}
    labels[LABEL_NETWORK] = name
    ports = []
    for i, pm in enumerate(rc.get("portMappings") or []):
        if not isinstance(pm, Mapping):
            raise CniError(INVALID_CONFIG, f"runtimeConfig.portMappings[{i}] must be an object")
        hp, cp, proto = pm.get("hostPort"), pm.get("containerPort"), pm.get("protocol", "tcp")
        if not isinstance(hp, int) or not isinstance(cp, int) or not (0 < hp < 65536 and 0 < cp < 65536):
            raise CniError(INVALID_CONFIG, f"runtimeConfig.portMappings[{i}]: hostPort and containerPort must be "
                           "ports (1-65535)")
        if proto not in ("tcp", "udp"):
            raise CniError(INVALID_CONFIG, f"runtimeConfig.portMappings[{i}]: protocol {proto!r}: tcp or udp")
        if pm.get("hostIP") not in (None, "", "0.0.0.0"):
            raise CniError(UNSUPPORTED_FIELD, f"runtimeConfig.portMappings[{i}].hostIP: VNet publishes on every "
                           "address of the node; leave hostIP out")
        ports.append(PortMap(hp, cp, proto))
    prev = conf.get("prevResult")
    if prev is not None and not isinstance(prev, Mapping):
        raise CniError(INVALID_CONFIG, "prevResult must be an object")
    valid = []
    for a in conf.get("cni.dev/valid-attachments") or conf.get("cni.dev/attachments") or []:
        if isinstance(a, Mapping) and isinstance(a.get("containerID"), str):
            valid.append((a["containerID"], str(a.get("ifname", ""))))
    return CniConf(version, name, network, labels, ports, dict(prev) if prev is not None else None, valid)


@dataclass
class Attached:
    """What VNet made for one ADD: the fields a result needs."""

    ifname: str
    mac: str
    sandbox: str
    ipv4: str | None  # "10.1.0.2/24"
    gateway4: str | None
    ipv6: str | None = None
    gateway6: str | None = None
    dns_servers: list[str] = field(default_factory=list)
    dns_search: list[str] = field(default_factory=list)
    host_ifname: str | None = None  # the host side of a veth (bridge, overlay): chained plugins look for it


def add_result(version: str, a: Attached, prev: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ADD result: ``prev`` (an earlier plugin's) with our interface, addresses and routes added."""
    base: dict[str, Any] = dict(prev or {})
    interfaces = list(base.get("interfaces") or [])
    if a.host_ifname:
        interfaces.append({"name": a.host_ifname})
    idx = len(interfaces)
    interfaces.append({"name": a.ifname, "mac": a.mac, "sandbox": a.sandbox})
    ips = list(base.get("ips") or [])
    routes = list(base.get("routes") or [])
    old = version in ("0.3.0", "0.3.1", "0.4.0")
    for addr, gw in ((a.ipv4, a.gateway4), (a.ipv6, a.gateway6)):
        if not addr:
            continue
        fam = ipaddress.ip_interface(addr).version
        entry: dict[str, Any] = {"address": addr, "interface": idx}
        if gw:
            entry["gateway"] = gw
            routes.append({"dst": "0.0.0.0/0" if fam == 4 else "::/0", "gw": gw})
        if old:
            entry["version"] = str(fam)
        ips.append(entry)
    out: dict[str, Any] = {"cniVersion": version, "interfaces": interfaces, "ips": ips}
    if routes:
        out["routes"] = routes
    dns = dict(base.get("dns") or {})
    if a.dns_servers:
        dns["nameservers"] = list(dict.fromkeys([*dns.get("nameservers", []), *a.dns_servers]))
    if a.dns_search:
        dns["search"] = list(dict.fromkeys([*dns.get("search", []), *a.dns_search]))
    if dns:
        out["dns"] = dns
    return out


def check_prev(prev: Mapping[str, Any] | None, a: Attached) -> None:
    """CHECK: the prevResult must list our interface and addresses as VNet has them."""
    if prev is None:
        raise CniError(INVALID_CONFIG, "CHECK needs prevResult (the result of the ADD)")
    ifs = [i for i in prev.get("interfaces") or [] if isinstance(i, Mapping) and i.get("name") == a.ifname
           and i.get("sandbox", a.sandbox) == a.sandbox]
    if not ifs:
        raise CniError(VNET_FAILED, f"prevResult has no interface {a.ifname} in {a.sandbox}")
    if ifs[0].get("mac") and str(ifs[0]["mac"]).lower() != a.mac.lower():
        raise CniError(VNET_FAILED, f"interface {a.ifname}: prevResult says mac {ifs[0]['mac']}, VNet has {a.mac}")
    have = {str(ip.get("address")) for ip in prev.get("ips") or [] if isinstance(ip, Mapping)}
    for want in (a.ipv4, a.ipv6):
        if want and want not in have:
            raise CniError(VNET_FAILED, f"prevResult does not list {want}, which VNet assigned")
