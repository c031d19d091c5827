"""Every NATS subject VNet uses, and its template, in one place.

Requests: ``vnet.<service>.<resource>.<verb>``; node-scoped work:
``vnet.node.<node>.<resource>.<verb>``; domain events (JetStream stream
``VNET_EVENTS``): ``vnet.evt.<domain>.<event>.<id>``. Span names use the
template (``process vnet.node.{node}.health``), never the concrete subject, so
traces group by operation rather than by id.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PREFIX = "vnet"
EVENTS_STREAM = "VNET_EVENTS"
EVENTS_WILDCARD = "vnet.evt.>"

SERVICES = ("ipam", "network", "endpoint", "policy", "metrics")
NODE_SERVICE = "node"

_TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass(frozen=True)
class Subject:
    """A subject template such as ``vnet.node.{node}.health``."""

    template: str

    def format(self, **params: str) -> str:
        for k, v in params.items():
            if not _TOKEN.match(v):
                raise ValueError(f"subject token {k}={v!r} must match [A-Za-z0-9_-]+")
        return self.template.format(**params)

    def wildcard(self) -> str:
        """The subscription form: every ``{param}`` becomes ``*``."""
        return re.sub(r"\{[a-z_]+\}", "*", self.template)

    def __str__(self) -> str:
        return self.template


def health(service: str) -> Subject:
    return Subject(f"vnet.{service}.health")


# --- ipam ---------------------------------------------------------------------------
IPAM_POOL_CREATE = Subject("vnet.ipam.pool.create")
IPAM_POOL_DELETE = Subject("vnet.ipam.pool.delete")
IPAM_POOL_GET = Subject("vnet.ipam.pool.get")
IPAM_ADDR_REQUEST = Subject("vnet.ipam.addr.request")
IPAM_ADDR_RELEASE = Subject("vnet.ipam.addr.release")
IPAM_GC = Subject("vnet.ipam.gc")
IPAM_CHECK = Subject("vnet.ipam.check")

# --- network ------------------------------------------------------------------------
NETWORK_CREATE = Subject("vnet.network.create")
NETWORK_GET = Subject("vnet.network.get")
NETWORK_LIST = Subject("vnet.network.list")
NETWORK_UPDATE = Subject("vnet.network.update")
NETWORK_DELETE = Subject("vnet.network.delete")

# --- endpoint -----------------------------------------------------------------------
ENDPOINT_CREATE = Subject("vnet.endpoint.create")
ENDPOINT_GET = Subject("vnet.endpoint.get")
ENDPOINT_LIST = Subject("vnet.endpoint.list")
ENDPOINT_DELETE = Subject("vnet.endpoint.delete")

# --- policy -------------------------------------------------------------------------
POLICY_EXPLAIN = Subject("vnet.policy.explain")

# --- metrics ------------------------------------------------------------------------
# Services report cumulative operation counters here (core NATS, not JetStream:
# a snapshot supersedes the previous one, so losing one costs nothing).
METRICS_REPORT = Subject("vnet.metrics.report.{service}.{instance}")
METRICS_SUMMARY = Subject("vnet.metrics.summary")

# --- node worker --------------------------------------------------------------------
NODE_HEALTH = Subject("vnet.node.{node}.health")
NODE_REGISTER = Subject("vnet.node.register")

# --- events -------------------------------------------------------------------------
EVT = Subject("vnet.evt.{domain}.{event}.{id}")
EVT_NETWORK = Subject("vnet.evt.network.>")
EVT_ENDPOINT = Subject("vnet.evt.endpoint.>")
EVT_NODE = Subject("vnet.evt.node.>")


def event(domain: str, name: str, ident: str) -> str:
    return EVT.format(domain=domain, event=name, id=ident)


def all_subjects() -> dict[str, Subject]:
    """Every subject constant in this module, by name (for the contract document)."""
    return {k: v for k, v in globals().items() if isinstance(v, Subject)}
