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
# Labels and published ports of a live endpoint (event vnet.evt.endpoint.updated.<id>).
ENDPOINT_UPDATE = Subject("vnet.endpoint.update")

# --- policy -------------------------------------------------------------------------
POLICY_EXPLAIN = Subject("vnet.policy.explain")
# Everything reachable from outside the fabric (published ports, none networks, CIDR rules).
POLICY_EXPOSURE = Subject("vnet.policy.exposure")

# --- metrics ------------------------------------------------------------------------
# Services report cumulative operation counters here (core NATS, not JetStream:
# a snapshot supersedes the previous one, so losing one costs nothing).
METRICS_REPORT = Subject("vnet.metrics.report.{service}.{instance}")
METRICS_SUMMARY = Subject("vnet.metrics.summary")

# --- node worker --------------------------------------------------------------------
NODE_HEALTH = Subject("vnet.node.{node}.health")
# A node registers (and heartbeats) on its own subject: the bus lets each node identity publish
# only its own (vnet.contracts.permissions), and the endpoint service checks the body agrees.
NODE_REGISTER = Subject("vnet.node.{node}.register")

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


# --- ipam (appended by the IPAM service) ---------------------------------------------
IPAM_POOL_LIST = Subject("vnet.ipam.pool.list")
IPAM_POOL_EXCLUDE = Subject("vnet.ipam.pool.exclude")

# --- network topology and host routes (appended by the network service) ---------------
NETWORK_CONNECT = Subject("vnet.network.connect")
NETWORK_DISCONNECT = Subject("vnet.network.disconnect")
NETWORK_MESH_CREATE = Subject("vnet.network.mesh.create")
NETWORK_MESH_ADD = Subject("vnet.network.mesh.add")
NETWORK_MESH_REMOVE = Subject("vnet.network.mesh.remove")
NETWORK_MESH_DELETE = Subject("vnet.network.mesh.delete")
NETWORK_MESH_GET = Subject("vnet.network.mesh.get")
NETWORK_MESH_LIST = Subject("vnet.network.mesh.list")
# Node workers report their host's routes and addresses; carving skips them.
# The node id is in the subject: the bus lets a node report only its own (vnet.contracts.permissions).
NETWORK_HOSTROUTES_REPORT = Subject("vnet.network.hostroutes.report.{node}")
NETWORK_HOSTROUTES_LIST = Subject("vnet.network.hostroutes.list")
# A node reported a new host route (not VNet's) that overlaps a network (payload RouteOverlap).
EVT_NETWORK_ROUTE_OVERLAP = Subject("vnet.evt.network.route_overlap.{id}")

# --- endpoints and the node registry (appended by the endpoint service) ---------------
# A node worker reads its desired state here (node credentials may call *.*.get).
ENDPOINT_DESIRED = Subject("vnet.endpoint.desired.get")
ENDPOINT_NODE_LIST = Subject("vnet.endpoint.node.list")
# A node acting for a container runtime on itself (the CNI plugin, through the node worker):
# the node id comes from the subject, which the bus lets only that node publish, so a node
# attaches, detaches and lists containers on itself and nowhere else.
ENDPOINT_RUNTIME_ATTACH = Subject("vnet.endpoint.runtime.{node}.attach")
ENDPOINT_RUNTIME_DETACH = Subject("vnet.endpoint.runtime.{node}.detach")
ENDPOINT_RUNTIME_LIST = Subject("vnet.endpoint.runtime.{node}.list")
# Node worker operations (served by the worker of that node).
NODE_NETNS_CHECK = Subject("vnet.node.{node}.netns.check")
NODE_STATS = Subject("vnet.node.{node}.stats")
NODE_RESYNC = Subject("vnet.node.{node}.resync")
# The drift the worker repaired (what changed, when, by which process): a bounded ring, newest first.
NODE_DRIFT = Subject("vnet.node.{node}.drift.list")
# Remove everything the node made in its kernel (interfaces, rules, wireguard-go) and stop
# reconciling (`vnetctl node teardown`); `vnet-node --teardown` does the same locally.
NODE_TEARDOWN = Subject("vnet.node.{node}.teardown")
# The node reports each endpoint's state here; the endpoint service folds it into the record.
# The node id is in the subject so the bus can hold a node to its own endpoints (see permissions).
EVT_ENDPOINT_STATUS = Subject("vnet.evt.endpoint.status.{node}.{id}")
# A node worker leaving on a graceful stop (fire and forget; a crash is caught by the heartbeat timeout).
NODE_DEREGISTER = Subject("vnet.node.{node}.deregister")
# The endpoint service: a node left (deregistered, or silent past its timeout) or (re)joined;
# every worker with an overlay re-fetches its desired state at once (remotes, peers).
EVT_NODE_LEFT = Subject("vnet.evt.node.left.{node}")
EVT_NODE_JOINED = Subject("vnet.evt.node.joined.{node}")
# Node-addressed copies (docs/scale.md): the endpoint service publishes each endpoint event
# (created, deleted, updated) on its domain subject above, for every service and watcher, and
# once more for each node that must act on it: the endpoint's own node and, for an overlay,
# the nodes holding an endpoint of that network or of an overlay related to it. A node's
# worker listens only on ``vnet.node.<node>.evt.>``, so what it receives grows with what
# changes on it, not with the cluster. Node membership events (left, joined) go the same way
# to the nodes sharing an overlay with that node.
# The copies are core NATS messages, outside the stream: a durable consumer per node on one
# shared stream made nats-server scan the stream's blocks for every node's sparse subjects
# (half of its CPU at 1,000 nodes). The worker is level-triggered, so a copy lost while it
# was disconnected is repaired by the full resync it runs when it reconnects (Felix/Typha).
EVT_TO_NODE = Subject("vnet.node.{node}.evt.>")
EVT_ENDPOINT_TO_NODE = Subject("vnet.node.{node}.evt.endpoint.{event}.{id}")
EVT_NODE_TO_NODE = Subject("vnet.node.{node}.evt.node.{event}.{id}")

# --- policy: allow rules and compiled rulesets (appended by the policy service) -------------
POLICY_RULE_PUT = Subject("vnet.policy.rule.put")
POLICY_RULE_GET = Subject("vnet.policy.rule.get")
POLICY_RULE_LIST = Subject("vnet.policy.rule.list")
POLICY_RULE_DELETE = Subject("vnet.policy.rule.delete")
# A node worker fetches its host's compiled ruleset (one nft script + version) here.
POLICY_RULESET = Subject("vnet.policy.ruleset.get")
# Rules changed: node workers refetch their ruleset (network and endpoint events too).
EVT_POLICY = Subject("vnet.evt.policy.>")
