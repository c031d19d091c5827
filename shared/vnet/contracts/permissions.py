"""Who may do what on the bus: the one permission matrix, deny by default.

Every NATS configuration VNet ships is generated from :data:`ROLES` — the embedded
stack's (``vnetctl up`` writes it into its state directory) and the compose stack's
(``ops/nats/nats.conf``, checked against :func:`compose_nats_config` by
``tests/contract/test_compose.py``). Nothing is allowed that a role does not list.

Roles and their users (one NATS user per identity):

=================  ============================  =============================================
role               user                          what it is for
=================  ============================  =============================================
``admin``          ``vnet-admin``                the operator: every API call, node operations
``client``         ``vnet-client``               vnetctl, VNetManager, a CNI plugin: the API
``service``        ``vnet-svc-<service>``        one per service (ipam, network, ...)
``node``           ``vnet-node-<node id>``       one per node worker, scoped to its own id
``monitor``        ``vnet-monitor``              a scraper: health, discovery, the summary
=================  ============================  =============================================

Templates in the grants: ``{user}`` (the user name), ``{service}``, ``{node}``.

* **Private replies**: each user's inbox prefix is ``_INBOX.<user>`` (the adapter passes
  it to nats-py as ``inbox_prefix``) and a user may subscribe only below its own.
  Responders answer through ``allow_responses``, never through an ``_INBOX.>`` grant.
* **Events** (``vnet.evt.>``, stream ``VNET_EVENTS``): only services publish them, each
  its own domain; a node publishes exactly two kinds, and only for itself: its
  endpoints' status (``vnet.evt.endpoint.status.<node>.<id>``) and its own
  registration (``vnet.evt.node.registered.<node>``). The endpoint service still checks
  that the endpoint lives on that node (the bus cannot know that).
* **Nodes** register and deregister on ``vnet.node.<node>.register|deregister`` and
  serve only ``vnet.node.<node>.>``; they cannot touch policy, networks or endpoints.
  They may read them (the list operations and the network, endpoint and policy events):
  the node's resolver answers names from them (``docs/dns.md``); and they attach and
  detach containers on themselves for a container runtime
  (``vnet.endpoint.runtime.<node>.attach|detach|list``, ``docs/cni.md``).

This module does no I/O: it renders text; callers write it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from vnet.contracts import subjects

ADMIN = "admin"
CLIENT = "client"
SERVICE = "service"
NODE = "node"
MONITOR = "monitor"
ROLE_NAMES = (ADMIN, CLIENT, SERVICE, NODE, MONITOR)

INBOX_ROOT = "_INBOX"
STREAM = subjects.EVENTS_STREAM

# The JetStream API a consumer of VNET_EVENTS needs, and nothing of other streams.
_JS_CONSUME = (
    "$JS.API.INFO",
    f"$JS.API.STREAM.INFO.{STREAM}",
    f"$JS.API.CONSUMER.*.{STREAM}",
    f"$JS.API.CONSUMER.*.{STREAM}.>",
    f"$JS.API.CONSUMER.DURABLE.CREATE.{STREAM}.>",
    f"$JS.API.CONSUMER.MSG.NEXT.{STREAM}.>",
    f"$JS.ACK.{STREAM}.>",
)
# A node's durable consumers are named vnet-node-<node>-<kind> (services/vnet/svc/node/worker.py):
# it may create, read, pull from and ack only those, so it cannot delete a service's consumer.
# "all": every node's endpoint events, only while this node's rules select endpoints by label
# or it enforces macvlan tables (docs/scale.md); "ep" and "node" took its node-addressed copies
# before they became core NATS messages (vnet.node.<node>.evt.>). The kinds of earlier versions
# stay, so a worker not yet upgraded keeps working under these permissions.
NODE_CONSUMER_KINDS = ("ep", "net", "node", "pol", "all")


def _node_js() -> tuple[str, ...]:
    out = ["$JS.API.INFO", f"$JS.API.STREAM.INFO.{STREAM}",
           # The runtime makes sure the stream exists at start; the name and config are fixed.
           f"$JS.API.STREAM.CREATE.{STREAM}"]
    for kind in NODE_CONSUMER_KINDS:
        name = f"vnet-node-{{node}}-{kind}"
        out += [f"$JS.API.CONSUMER.CREATE.{STREAM}.{name}", f"$JS.API.CONSUMER.CREATE.{STREAM}.{name}.>",
                f"$JS.API.CONSUMER.DURABLE.CREATE.{STREAM}.{name}", f"$JS.API.CONSUMER.INFO.{STREAM}.{name}",
                f"$JS.API.CONSUMER.DELETE.{STREAM}.{name}", f"$JS.API.CONSUMER.MSG.NEXT.{STREAM}.{name}",
                f"$JS.ACK.{STREAM}.{name}.>"]
    return tuple(out)


# $SRV discovery: everyone may ask; a responder listens for the questions about itself.
_SRV_ASK = ("$SRV.*", "$SRV.*.*", "$SRV.*.*.*")
# (a service's nats.micro name is vnet-<service>)
_SRV_SERVE = ("$SRV.*", "$SRV.*.vnet-{service}", "$SRV.*.vnet-{service}.*")
_OWN_INBOX = ("_INBOX.{user}.>",)

# The request families of the API services (what a caller may ask).
_API = tuple(f"vnet.{s}.>" for s in ("ipam", "network", "endpoint", "policy"))
# Never published by a caller: only nodes report host routes; only services and nodes
# speak for the system (events, metrics reports, registrations).
_NOT_FOR_CALLERS = (
    subjects.NETWORK_HOSTROUTES_REPORT.wildcard(),
    subjects.EVENTS_WILDCARD,
    "vnet.metrics.report.>",
    subjects.NODE_REGISTER.wildcard(),
    subjects.NODE_DEREGISTER.wildcard(),
)
# Operations of a node worker an operator may call (the endpoint service asks netns.check).
_NODE_OPS = tuple(s.wildcard() for s in (subjects.NODE_HEALTH, subjects.NODE_STATS, subjects.NODE_RESYNC,
                                         subjects.NODE_NETNS_CHECK, subjects.NODE_TEARDOWN, subjects.NODE_DRIFT))
# Maintenance an operator runs, not an application.
_ADMIN_ONLY = (subjects.IPAM_GC.template, subjects.IPAM_CHECK.template)


@dataclass(frozen=True)
class Grant:
    """One role's permissions as templates (see the module docstring)."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    deny_publish: tuple[str, ...] = ()
    allow_responses: bool = False
    redis: bool = False  # gets Valkey credentials
    summary: str = ""


def _service_grant(service: str) -> Grant:
    """What the service ``service`` may do: call the API services and the nodes' checks,
    publish its own events and metrics, serve its own subjects."""
    publish = [*_API, "vnet.metrics.summary", "vnet.*.health", subjects.NODE_NETNS_CHECK.wildcard(),
               f"vnet.metrics.report.{service}.*", *_SRV_ASK, *_JS_CONSUME, f"$JS.API.STREAM.CREATE.{STREAM}"]
    subscribe = [f"vnet.{service}.>", *_SRV_SERVE, *_OWN_INBOX]
    deny = [subjects.NETWORK_HOSTROUTES_REPORT.wildcard()]
    if service == "network":
        deny = []  # it serves hostroutes.report; it never calls it
    events = {"endpoint": ["vnet.evt.endpoint.>", subjects.EVT_NODE_LEFT.wildcard(),
                           subjects.EVT_NODE_JOINED.wildcard(),
                           # the node-addressed copies of its events (docs/scale.md)
                           subjects.EVT_ENDPOINT_TO_NODE.wildcard().replace(".*.*", ".>"),
                           subjects.EVT_NODE_TO_NODE.wildcard().replace(".*.*", ".>")]}.get(
        service, [f"vnet.evt.{service}.>"])
    if service == "endpoint":
        subscribe += [subjects.NODE_REGISTER.wildcard(), subjects.NODE_DEREGISTER.wildcard(),
                      subjects.EVT_ENDPOINT_STATUS.wildcard(),  # core subscription of a create that waits
                      # what empties its caches of networks and nodes (svc/endpoint/lookups.py)
                      subjects.EVT_NETWORK.template, subjects.EVT_NODE_JOINED.wildcard(),
                      subjects.EVT_NODE_LEFT.wildcard()]
        deny.append("vnet.evt.endpoint.status.>")  # only the node of the endpoint reports its status
    if service == "metrics":
        # every instance's reports, and every event it counts (a plain subscription: it only
        # counts, so it needs no consumer of its own)
        subscribe += [subjects.METRICS_REPORT.wildcard(), subjects.EVENTS_WILDCARD]
        events = []
    return Grant(tuple(publish + events), tuple(subscribe), tuple(deny), allow_responses=True, redis=True,
                 summary=f"the {service} service")


ROLES: dict[str, Grant] = {
    ADMIN: Grant(
        publish=(*_API, "vnet.metrics.summary", "vnet.*.health", *_NODE_OPS, *_SRV_ASK),
        subscribe=(*_OWN_INBOX, subjects.EVENTS_WILDCARD),
        deny_publish=_NOT_FOR_CALLERS,
        summary="the operator (the owner of a local stack): every operation, node operations, maintenance"),
    CLIENT: Grant(
        publish=(*_API, "vnet.metrics.summary", "vnet.*.health", subjects.NODE_HEALTH.wildcard(), *_SRV_ASK),
        subscribe=(*_OWN_INBOX, subjects.EVENTS_WILDCARD),
        deny_publish=(*_NOT_FOR_CALLERS, *_ADMIN_ONLY),
        summary="applications (vnetctl, VNetManager, a CNI plugin): the API; read-only event watching"),
    NODE: Grant(
        publish=(
            subjects.NODE_REGISTER.template, subjects.NODE_DEREGISTER.template,
            subjects.NODE_HEALTH.template,  # the container healthcheck asks with these credentials
            subjects.ENDPOINT_DESIRED.template, subjects.POLICY_RULESET.template,
            subjects.NETWORK_HOSTROUTES_REPORT.template,
            # read-only, for the node's resolver (svc/node/dns.py)
            subjects.NETWORK_LIST.template, subjects.ENDPOINT_LIST.template, subjects.POLICY_RULE_LIST.template,
            # a container runtime's calls through the node's CNI socket, on itself only
            subjects.ENDPOINT_RUNTIME_ATTACH.template, subjects.ENDPOINT_RUNTIME_DETACH.template,
            subjects.ENDPOINT_RUNTIME_LIST.template,
            "vnet.evt.endpoint.status.{node}.*", "vnet.evt.node.registered.{node}",
            "vnet.metrics.report.node.*", *_SRV_ASK, *_node_js()),
        subscribe=("vnet.node.{node}.>", "$SRV.*", "$SRV.*.vnet-node", "$SRV.*.vnet-node.*", *_OWN_INBOX,
                   subjects.EVT_NETWORK.template, subjects.EVT_ENDPOINT.template, subjects.EVT_POLICY.template),
        allow_responses=True,
        summary="one node worker, speaking only for itself; no Valkey credentials"),
    MONITOR: Grant(
        publish=("vnet.metrics.summary", "vnet.*.health", subjects.NODE_HEALTH.wildcard(), *_SRV_ASK),
        subscribe=_OWN_INBOX,
        summary="a scraper or dashboard: health, $SRV discovery, the metrics summary"),
}


def service_grant(service: str) -> Grant:
    return _service_grant(service)


# --- users ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class User:
    name: str
    role: str
    node: str | None = None
    service: str | None = None

    @property
    def grant(self) -> Grant:
        return service_grant(self.service) if self.role == SERVICE and self.service else ROLES[self.role]

    @property
    def inbox_prefix(self) -> str:
        return inbox_prefix(self.name)

    def _fill(self, templates: Iterable[str]) -> list[str]:
        params = {"user": self.name, "node": self.node or "", "service": self.service or ""}
        return [t.format(**params) if "{" in t else t for t in templates]

    @property
    def publish(self) -> list[str]:
        return self._fill(self.grant.publish)

    @property
    def deny_publish(self) -> list[str]:
        return self._fill(self.grant.deny_publish)

    @property
    def subscribe(self) -> list[str]:
        return self._fill(self.grant.subscribe)

    def may_publish(self, subject: str) -> bool:
        return (any(matches(subject, p) for p in self.publish)
                and not any(matches(subject, d) for d in self.deny_publish))

    def may_subscribe(self, subject: str) -> bool:
        return any(covers(p, subject) for p in self.subscribe)


_USER_TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")


def inbox_prefix(user: str) -> str:
    """``_INBOX.<user>``: where this user's replies arrive (nats-py ``inbox_prefix``)."""
    return f"{INBOX_ROOT}.{user}"


def admin_user() -> User:
    return User("vnet-admin", ADMIN)


def client_user() -> User:
    return User("vnet-client", CLIENT)


def monitor_user() -> User:
    return User("vnet-monitor", MONITOR)


def service_user(service: str) -> User:
    return User(f"vnet-svc-{service}", SERVICE, service=service)


def node_user(node: str) -> User:
    if not _USER_TOKEN.match(node):
        raise ValueError(f"node id {node!r} must match [A-Za-z0-9_-]+ (it is a subject token)")
    return User(f"vnet-node-{node}", NODE, node=node)


def users(nodes: Iterable[str], services: Iterable[str] = subjects.SERVICES) -> list[User]:
    """Every identity of a deployment: admin, client, monitor, one per service, one per node."""
    return [admin_user(), client_user(), monitor_user(), *(service_user(s) for s in services),
            *(node_user(n) for n in nodes)]


# --- subject matching (what nats-server decides, for tests and docs) -----------------------------

def matches(subject: str, pattern: str) -> bool:
    """Whether the literal ``subject`` matches ``pattern`` (``*`` one token, ``>`` the rest)."""
    return covers(pattern, subject)


def covers(pattern: str, subject: str) -> bool:
    """Whether every subject ``subject`` (itself possibly a wildcard) can match lies within
    ``pattern`` — how nats-server checks a subscription against an allow list."""
    p, s = pattern.split("."), subject.split(".")
    for i, tok in enumerate(p):
        if tok == ">":
            return len(s) > i
        if i >= len(s):
            return False
        if tok == "*":
            if s[i] == ">":
                return False
            continue
        if tok != s[i]:
            return False
    return len(s) == len(p)


# --- rendering nats-server configuration ---------------------------------------------------------

def _q(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _list(items: Sequence[str], indent: str) -> str:
    if not items:
        return "[]"
    inner = "".join(f"{indent}  {_q(i)},\n" for i in items)
    return f"[\n{inner}{indent}]"


def password_env(user: User) -> str:
    """The environment variable the compose stack passes this user's password in."""
    return "NATS_PASSWORD_" + re.sub(r"[^A-Z0-9]", "_", user.name.upper().removeprefix("VNET-"))


def render_users(users_: Sequence[User], passwords: Mapping[str, str] | None = None) -> str:
    """The ``authorization { users = [...] }`` block. ``passwords`` maps user -> password;
    without it each password is ``$NATS_PASSWORD_<USER>`` (read from the environment)."""
    out = ["authorization {", "  users = ["]
    for u in users_:
        g = u.grant
        pw = _q(passwords[u.name]) if passwords is not None else "$" + password_env(u)
        out.append(f"    # {u.name}: {g.summary}")
        out.append("    {")
        out.append(f"      user: {_q(u.name)}")
        out.append(f"      password: {pw}")
        out.append("      permissions: {")
        pub = f"        publish: {{\n          allow: {_list(u.publish, '          ')}"
        if u.deny_publish:
            pub += f"\n          deny: {_list(u.deny_publish, '          ')}"
        out.append(pub + "\n        }")
        out.append(f"        subscribe: {{\n          allow: {_list(u.subscribe, '          ')}\n        }}")
        if g.allow_responses:
            out.append("        allow_responses: true")
        out.append("      }")
        out.append("    }")
    out += ["  ]", "}"]
    return "\n".join(out) + "\n"


COMPOSE_NODES = ("node1",)

_COMPOSE_HEADER = """\
# NATS for the VNet compose stack. GENERATED from shared/vnet/contracts/permissions.py
# (the one permission matrix) by
#   python -m vnet.contracts.permissions compose > ops/nats/nats.conf
# Do not edit by hand: tests/contract/test_compose.py fails when this file and the
# matrix differ. docs/security.md explains the roles.
#
# Mounted read-only at /etc/nats/vnet.conf; started as
#   nats-server -c /etc/nats/vnet.conf -js -sd /data -m 8222
# Each password is read from the container's environment (nats-server resolves a
# $VARIABLE the file does not define from there), set in docker-compose.yml from
# the NATS_PASSWORD_* variables (the defaults there are for a laptop only).
# Node workers: one user per node id (this file has {nodes}).

server_name: vnet-nats
max_payload: 1MB
# Without credentials nothing connects (no_auth_user is not set).

"""


def compose_nats_config(nodes: Sequence[str] = COMPOSE_NODES) -> str:
    """``ops/nats/nats.conf``: every user of the compose stack, passwords from the environment."""
    return _COMPOSE_HEADER.format(nodes=", ".join(nodes)) + render_users(users(nodes))


def local_nats_config(passwords: Mapping[str, str], nodes: Sequence[str], *,
                      tls: Mapping[str, str] | None = None) -> str:
    """The embedded stack's nats-server config (written 0600 into its state directory)."""
    head = ["# VNet embedded stack: generated by vnetctl up from shared/vnet/contracts/permissions.py.",
            "# Holds passwords: keep it 0600.", "max_payload: 1MB"]
    if tls:
        head.append("tls {\n" + "".join(f"  {k}: {_q(v)}\n" for k, v in tls.items()) + "}")
    return "\n".join(head) + "\n\n" + render_users(users(nodes), passwords)


def matrix_markdown(nodes: Sequence[str] = ("n1",), probes: Sequence[tuple[str, str, str]] | None = None) -> str:
    """The matrix as a Markdown table: for each probe subject, which users may use it."""
    us = users(nodes)
    probes = probes or PROBES
    head = "| operation | subject | " + " | ".join(u.name for u in us) + " |"
    sep = "|" + "---|" * (2 + len(us))
    rows = [head, sep]
    for what, op, subj in probes:
        cells = []
        for u in us:
            s = subj.format(node=u.node or nodes[0], other="n2", user=u.name)
            ok = u.may_publish(s) if op == "pub" else u.may_subscribe(s)
            cells.append("yes" if ok else "·")
        rows.append(f"| {what} ({op}) | `{subj}` | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def roles_markdown() -> str:
    """Each role's grants as written in :data:`ROLES` (templates), as a Markdown table."""
    rows = ["| role | publish (allow) | publish (deny) | subscribe | replies | Valkey |", "|---|---|---|---|---|---|"]

    def cell(items: Sequence[str]) -> str:
        return "<br>".join(f"`{i}`" for i in items) or "·"

    grants = [(name, g) for name, g in ROLES.items()] + [
        (f"service ({s})", service_grant(s)) for s in subjects.SERVICES]
    for name, g in grants:
        rows.append(f"| {name} | {cell(g.publish)} | {cell(g.deny_publish)} | {cell(g.subscribe)} | "
                    f"{'allow_responses' if g.allow_responses else '·'} | {'yes' if g.redis else 'no'} |")
    return "\n".join(rows) + "\n"


# Subject families probed by the matrix test and shown in docs/security.md: (what, pub|sub,
# subject); {node} is the user's own node id (n1 for users that are not nodes), {other} another
# node, {user} the user's own name.
PROBES: tuple[tuple[str, str, str], ...] = (
    ("API request", "pub", "vnet.network.create"),
    ("API request", "pub", "vnet.endpoint.create"),
    ("allow rule", "pub", "vnet.policy.rule.put"),
    ("allow rule", "pub", "vnet.policy.rule.delete"),
    ("desired state", "pub", "vnet.endpoint.desired.get"),
    ("node ruleset", "pub", "vnet.policy.ruleset.get"),
    ("IPAM maintenance", "pub", "vnet.ipam.gc"),
    ("host routes report, own", "pub", "vnet.network.hostroutes.report.{node}"),
    ("host routes report, other", "pub", "vnet.network.hostroutes.report.{other}"),
    ("health", "pub", "vnet.network.health"),
    ("metrics summary", "pub", "vnet.metrics.summary"),
    ("node health", "pub", "vnet.node.{node}.health"),
    ("node resync, own", "pub", "vnet.node.{node}.resync"),
    ("node resync, other", "pub", "vnet.node.{other}.resync"),
    ("node drift list", "pub", "vnet.node.{node}.drift.list"),
    ("node register, own", "pub", "vnet.node.{node}.register"),
    ("node register, other", "pub", "vnet.node.{other}.register"),
    ("network event", "pub", "vnet.evt.network.created.x"),
    ("policy event", "pub", "vnet.evt.policy.changed.x"),
    ("endpoint status, own node", "pub", "vnet.evt.endpoint.status.{node}.e1"),
    ("endpoint status, other node", "pub", "vnet.evt.endpoint.status.{other}.e1"),
    ("node registered event, own", "pub", "vnet.evt.node.registered.{node}"),
    ("node left event", "pub", "vnet.evt.node.left.{other}"),
    ("node-addressed endpoint event", "pub", "vnet.node.{other}.evt.endpoint.created.e1"),
    ("metrics report", "pub", "vnet.metrics.report.ipam.i1"),
    ("delete the event stream", "pub", "$JS.API.STREAM.DELETE.VNET_EVENTS"),
    ("purge the event stream", "pub", "$JS.API.STREAM.PURGE.VNET_EVENTS"),
    ("discovery", "pub", "$SRV.PING"),
    ("everything", "sub", ">"),
    ("every inbox", "sub", "_INBOX.>"),
    ("the admin's inbox", "sub", "_INBOX.vnet-admin.>"),
    ("own inbox", "sub", "_INBOX.{user}.>"),
    ("events", "sub", "vnet.evt.>"),
    ("events addressed to own node", "sub", "vnet.node.{node}.evt.endpoint.created.e1"),
    ("events addressed to another node", "sub", "vnet.node.{other}.evt.endpoint.created.e1"),
    ("serve the network API", "sub", "vnet.network.>"),
    ("serve node ops, own", "sub", "vnet.node.{node}.health"),
    ("serve node ops, other", "sub", "vnet.node.{other}.health"),
    ("node registrations", "sub", "vnet.node.*.register"),
)


def main(argv: Sequence[str] | None = None) -> int:
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    what = args[0] if args else "compose"
    if what == "compose":
        sys.stdout.write(compose_nats_config())
    elif what == "table":
        sys.stdout.write(matrix_markdown())
    elif what == "roles":
        sys.stdout.write(roles_markdown())
    else:
        sys.stderr.write("usage: python -m vnet.contracts.permissions [compose|table|roles]\n")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
