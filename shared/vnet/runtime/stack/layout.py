"""What a stack is made of: its options, the child processes (argv, environment, log)
and the identity each one runs as. :func:`make_plan` turns options into that list."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from vnet.contracts import permissions, subjects
from vnet.runtime import credentials, servers, tls
from vnet.runtime.config import ENV_PREFIX, VNetConfig
from vnet.runtime.stack.netns import create_sandbox_netns, delete_netns, sandbox_netns_name
from vnet.runtime.stack.ports import check_reachable, pick_port
from vnet.runtime.stackfile import Say, StackError

NATS = "nats-server"
VALKEY = "valkey-server"
SERVERS = (NATS, VALKEY)
NODE = subjects.NODE_SERVICE
# Everything that must answer health before the stack counts as ready.
COMPONENTS = (*subjects.SERVICES, NODE)
# Services `vnetctl up --replicas N` runs N of (metrics serves /metrics on one port: one).
REPLICATED = tuple(s for s in subjects.SERVICES if s != "metrics")

_NODE_ID_BAD = re.compile(r"[^A-Za-z0-9_-]")


@dataclass
class StackOptions:
    state_dir: Path
    nats_url: str | None = None  # an existing server: do not start nats-server
    redis_url: str | None = None  # an existing server: do not start valkey-server
    nats_port: int | None = None
    redis_port: int | None = None
    metrics_port: int | None = None
    node_id: str | None = None
    host_root_netns: bool = False
    ready_timeout: float = 30.0
    stop_timeout: float = 10.0
    detached: bool = False
    demo: bool = False  # after ready, run the demo (vnet.runtime.demo) once, then keep running
    # nats-servers of the stack's own (routes on loopback, VNET_EVENTS with min(3, N) replicas):
    # vnet.runtime.cluster, docs/scale.md. 1: one server, as before.
    cluster: int = 1
    # Instances of each API service (ipam, network, endpoint, policy) in their queue group:
    # "ipam", "ipam-2", ... The metrics service stays one (it serves /metrics on one port).
    replicas: int = 1
    # A Valkey primary, one replica and three Sentinels on loopback; every process finds the
    # primary through the Sentinels and follows a failover (docs/scale.md, "Replicated state").
    replicated_valkey: bool = False


def valid_node_id(node_id: str) -> bool:
    """Node ids are NATS subject tokens."""
    return bool(node_id) and not _NODE_ID_BAD.search(node_id)


def default_node_id() -> str:
    name = socket.gethostname().split(".")[0] or "local"
    return _NODE_ID_BAD.sub("-", name)


@dataclass
class ChildSpec:
    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    port: int | None = None  # servers: the stack is not usable before this port listens


@dataclass
class Child:
    spec: ChildSpec
    proc: subprocess.Popen[bytes] | None = None
    start_time: int | None = None
    started_mono: float = 0.0
    restarts: int = 0
    failures: int = 0  # consecutive short-lived runs; sets the backoff
    restart_at: float | None = None
    died_mono: float = 0.0  # when the supervisor saw it exit
    held: bool = False  # its restart waits for the Sentinels (a Valkey data server, see Supervisor)

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def entry_argv(script: str, module: str, func: str, args: list[str]) -> list[str]:
    """A console script next to the interpreter (so ``ps`` reads well), else the same
    entry point through ``python -c`` (``-m`` would load the module twice under two names)."""
    path = Path(sys.executable).parent / script
    if path.exists():
        return [sys.executable, str(path), *args]
    return [sys.executable, "-c", f"from {module} import {func}; {func}()", *args]


def _launcher_argv(kind: str, args: list[str]) -> list[str]:
    func = "service_main" if kind == "vnet-service" else "node_main"
    return entry_argv(kind, "vnet.runtime.launcher", func, args)


def child_env(config: VNetConfig, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The parent's environment minus every VNet setting, plus ``config`` as ``VNET_*``.

    Settings are stripped first so a stray ``VNET_NATS_URL`` in the user's shell cannot
    point a child elsewhere; ``VNET_CONFIG`` too, since ``config`` already holds the file.
    """
    base = os.environ if base is None else base
    fields = set(VNetConfig.env_names()) | {"VNET_CONFIG"}
    env = {k: v for k, v in base.items() if not (k.startswith(ENV_PREFIX) and k in fields)}
    env.update(config.to_env())
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class Identities:
    """The config each process of the stack runs with: its own NATS user (when the stack
    runs NATS) and, for services only, its own Valkey user (when the stack runs Valkey)."""

    shared: VNetConfig
    nats: credentials.Credentials | None
    redis: credentials.Credentials | None

    def _nats(self, cfg: VNetConfig, user: permissions.User) -> VNetConfig:
        if self.nats is None:
            return cfg
        return msgspec.structs.replace(cfg, nats_user=user.name, nats_password=self.nats.nats[user.name],
                                       nats_token=None, nats_creds=None, nats_inbox_prefix=None)

    def admin(self) -> VNetConfig:
        return self._nats(self.shared, permissions.admin_user())

    def service(self, name: str) -> VNetConfig:
        cfg = self._nats(self.shared, permissions.service_user(name))
        if self.redis is None:
            return cfg
        user = credentials.service_redis_user(name)
        return msgspec.structs.replace(cfg, redis_username=user, redis_password=self.redis.redis[user])

    def node(self, node_id: str) -> VNetConfig:
        # Node workers hold no Valkey credentials (design rule): none are passed down.
        cfg = self._nats(self.shared, permissions.node_user(node_id))
        return msgspec.structs.replace(cfg, redis_username=None, redis_password=None)


@dataclass(kw_only=True)
class Plan:
    """What :func:`make_plan` decided: addresses, the sandbox, the children in start order."""

    nats_url: str
    redis_url: str
    nats_port: int | None
    redis_port: int | None
    metrics_port: int
    node_id: str
    netns: str | None
    host_netns: str | None
    privileged: bool
    children: list[ChildSpec] = field(default_factory=list)
    nats_tls_ca: str | None = None  # TLS on: the CA of the stack's own certificates
    config: VNetConfig  # the admin identity: the supervisor's own probes (health, discovery) run as it
    stream_identity: VNetConfig | None = None  # --cluster: who makes the replicated event stream
    valkey_group: ValkeyGroupPlan | None = None  # --replicated-valkey


@dataclass
class ValkeyGroupPlan:
    """``--replicated-valkey``: the data servers (child name -> port; the first is the primary
    at start) and the Sentinels watching them."""

    data: dict[str, int]
    sentinel_ports: list[int]
    service: str

    @property
    def sentinels(self) -> str:
        """What ``VNetConfig.redis_sentinels`` takes."""
        return ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)


def make_plan(o: StackOptions, base_config: VNetConfig, *, state_dir: Path, logs_dir: Path, say: Say) -> Plan:
    """Pick ports, make credentials, the sandbox namespace (as root) and the server configs, and
    list the children in start order. Raises :class:`StackError`; the sandbox made here is
    deleted again when a later step fails."""
    taken: set[int] = set()
    nats_bin = valkey_bin = None
    try:
        if o.nats_url is None:
            nats_bin = servers.nats_server_binary()
        if o.redis_url is None:
            valkey_bin = servers.valkey_server_binary()
    except FileNotFoundError as exc:
        raise StackError(f"{exc}; or give an existing server with --nats-url / --redis-url") from None
    if o.nats_url is not None:
        check_reachable(o.nats_url, 4222, "NATS", "--nats-url")
    if o.redis_url is not None:
        check_reachable(o.redis_url, 6379, "Redis", "--redis-url")
    nats_port = None if o.nats_url else pick_port(o.nats_port, "--nats-port", "nats-server", taken)
    redis_port = None if o.redis_url else pick_port(o.redis_port, "--redis-port", "valkey-server", taken)
    metrics_port = pick_port(o.metrics_port, "--metrics-port", "the metrics service", taken)
    nats_url = o.nats_url or f"nats://127.0.0.1:{nats_port}"
    # No password in the URL: stack.json and `ps` would show it; credentials travel apart.
    redis_url = o.redis_url or f"redis://127.0.0.1:{redis_port}/0"
    node_id = o.node_id or default_node_id()
    stream_identity: VNetConfig | None = None
    try:
        # Servers of our own get generated users; existing ones keep the user's settings.
        creds = credentials.ensure(state_dir, [node_id]) if (nats_bin or valkey_bin) else None
    except (OSError, credentials.CredentialsError) as exc:
        raise StackError(f"cannot prepare the stack's credentials in {state_dir}: {exc}") from None

    privileged = os.geteuid() == 0
    netns: str | None = None
    host_netns: str | None = None
    if privileged and not o.host_root_netns:
        netns = sandbox_netns_name()
        create_sandbox_netns(netns)
        host_netns = netns
    try:
        if not privileged:
            say("not running as root: the node worker will run and answer health, but it cannot change "
                "a kernel (no sandbox namespace is made, networks get no data plane); run "
                "`sudo vnetctl up` for a working data plane")
        elif o.host_root_netns:
            say("warning: --host-root-netns: the node worker manages THIS MACHINE's own network "
                "namespace (bridges, veths, nftables there)")
        tls_block: dict[str, str] | None = None
        if nats_bin is not None and base_config.stack_tls:
            try:
                tls_block = tls.nats_tls_block(state_dir)
            except (OSError, tls.TLSError) as exc:
                raise StackError(f"cannot make the TLS certificates in {state_dir / tls.TLS_DIR}: "
                                 f"{exc}") from None
        shared = msgspec.structs.replace(
            base_config, nats_url=nats_url, redis_url=redis_url, metrics_http_host="127.0.0.1",
            metrics_http_port=metrics_port, node_id=node_id, host_netns=host_netns,
            nats_tls_ca=tls_block["ca_file"] if tls_block else base_config.nats_tls_ca)
        roles = Identities(shared, creds if nats_bin else None, creds if valkey_bin else None)
        # The supervisor's own probes (health, discovery, the demo) run as the admin.
        config = roles.admin()
        env = child_env(config)
        logs = logs_dir
        children: list[ChildSpec] = []
        if nats_bin is not None and nats_port is not None and creds is not None and o.cluster > 1:
            children += _cluster_children(o.cluster, creds, node_id, tls_block, nats_port, taken, env,
                                          state_dir=state_dir, logs_dir=logs_dir)
            shared = msgspec.structs.replace(shared, nats_url=",".join(
                f"nats://127.0.0.1:{c.port}" for c in children if c.port is not None))
            nats_url = shared.nats_url
            roles = Identities(shared, creds, creds if valkey_bin else None)
            config = roles.admin()
            env = child_env(config)
            # VNET_EVENTS is made with its replicas before any service could make it with one
            stream_identity = roles.service("endpoint")
        elif nats_bin is not None and nats_port is not None and creds is not None:
            (state_dir / "nats").mkdir(exist_ok=True, mode=credentials.DIR_MODE)
            conf = credentials.write_nats_conf(state_dir, creds, [node_id], tls=tls_block)
            args = servers.nats_args(nats_port, state_dir / "nats", config_file=conf)
            children.append(ChildSpec(NATS, args, env, logs / f"{NATS}.log", nats_port))
        valkey_group: ValkeyGroupPlan | None = None
        if valkey_bin is not None and redis_port is not None and creds is not None and o.replicated_valkey:
            group_children, valkey_group = _valkey_group_children(creds, redis_port, taken, env,
                                                                  state_dir=state_dir, logs_dir=logs_dir)
            children += group_children
            # Every process asks the Sentinels where the primary is (redis_url's host is then
            # unused, its database number is); IPAM allocations wait for the replica, as in
            # docker-compose.cluster.yml.
            shared = msgspec.structs.replace(shared, redis_sentinels=valkey_group.sentinels,
                                             redis_sentinel_service=valkey_group.service, redis_wait_replicas=1)
            roles = Identities(shared, roles.nats, roles.redis)
            config = roles.admin()
            if stream_identity is not None:
                stream_identity = roles.service("endpoint")
        elif valkey_bin is not None and redis_port is not None and creds is not None:
            (state_dir / "valkey").mkdir(exist_ok=True, mode=credentials.DIR_MODE)
            conf = credentials.write_valkey_conf(state_dir, creds)
            args = servers.valkey_args(redis_port, state_dir / "valkey", config_file=conf)
            children.append(ChildSpec(VALKEY, args, env, logs / f"{VALKEY}.log", redis_port))
        for name in subjects.SERVICES:
            children.append(ChildSpec(name, _launcher_argv("vnet-service", [name]),
                                      child_env(roles.service(name)), logs / f"{name}.log"))
            for r in range(2, (o.replicas if name in REPLICATED else 1) + 1):
                children.append(ChildSpec(f"{name}-{r}", _launcher_argv("vnet-service", [name]),
                                          child_env(roles.service(name)), logs / f"{name}-{r}.log"))
        node_args = ["--node-id", node_id] + (["--host-netns", host_netns] if host_netns else [])
        # names that follow isolation on every gateway, and the CNI socket a runtime's
        # vnet-cni talks to (`vnetctl cni install --socket <state dir>/cni.sock`)
        node_args += ["--dns", "--cni", "--cni-socket", str(state_dir / "cni.sock")]
        children.append(ChildSpec(NODE, _launcher_argv("vnet-node", node_args),
                                  child_env(roles.node(node_id)), logs / f"{NODE}.log"))
    except BaseException:
        if netns:
            delete_netns(netns)
        raise
    return Plan(nats_url=nats_url, redis_url=redis_url, nats_port=nats_port, redis_port=redis_port,
                metrics_port=metrics_port, node_id=node_id, netns=netns, host_netns=host_netns, privileged=privileged,
                children=children, nats_tls_ca=tls_block["ca_file"] if tls_block else None, config=config,
                stream_identity=stream_identity, valkey_group=valkey_group)


def _cluster_children(n: int, creds: credentials.Credentials, node_id: str, tls_block: dict[str, str] | None,
                      first_port: int, taken: set[int], env: dict[str, str], *, state_dir: Path,
                      logs_dir: Path) -> list[ChildSpec]:
    """``--cluster N``: N nats-servers joined by routes on loopback, each with the stack's
    users (the same generated config) plus a route user of its own (vnet.runtime.cluster)."""
    from vnet.runtime import cluster

    ports = [first_port] + [pick_port(None, "--nats-port", f"nats-server {i}", taken) for i in range(1, n)]
    route_ports = [pick_port(None, "--nats-port", f"nats-server {i} routes", taken) for i in range(n)]
    password = credentials.new_password()
    base = permissions.local_nats_config(dict(creds.nats), [node_id], tls=tls_block)
    out: list[ChildSpec] = []
    for i in range(n):
        name = NATS if i == 0 else f"{NATS}-{i}"
        data = state_dir / ("nats" if i == 0 else f"nats-{i}")
        data.mkdir(exist_ok=True, mode=credentials.DIR_MODE)
        conf = state_dir / f"nats-{i}.conf"
        text = base.rstrip() + "\n\n" + cluster.cluster_block(
            name=cluster.CLUSTER_NAME, port=route_ports[i], peers=[p for j, p in enumerate(route_ports) if j != i],
            user=cluster.ROUTE_USER, password=password)
        credentials.private_write(conf, text.encode())
        out.append(ChildSpec(name, servers.nats_args(ports[i], data, config_file=conf), env,
                             logs_dir / f"{name}.log", ports[i]))
    return out


VALKEY_REPLICA = f"{VALKEY}-1"
SENTINEL = "valkey-sentinel"
SENTINELS = 3


def _valkey_group_children(creds: credentials.Credentials, first_port: int, taken: set[int], env: dict[str, str],
                           *, state_dir: Path, logs_dir: Path) -> tuple[list[ChildSpec], ValkeyGroupPlan]:
    """``--replicated-valkey``: a primary and one replica, each with the stack's service users
    plus the replication and Sentinel users (vnet.runtime.cluster, the same as
    docker-compose.cluster.yml), and three Sentinels (quorum 2) that log in as the Sentinel
    user; a client of a Sentinel (no password) may only ask where the primary is, the
    Sentinels log in to each other as a peer user (cluster.SENTINEL_CLIENT_RULES). These
    passwords are new on every start, like the NATS route user's: only these servers use
    them. Each server has its own config file: Sentinel rewrites it."""
    from vnet.runtime import cluster

    replica_port = pick_port(None, "--redis-port", "the valkey replica", taken)
    sentinel_ports = [pick_port(None, "--redis-port", f"valkey sentinel {i}", taken) for i in range(SENTINELS)]
    replica_pw, sentinel_pw, peer_pw = (credentials.new_password() for _ in range(3))
    users = credentials.valkey_conf(creds)
    out: list[ChildSpec] = []
    data: dict[str, int] = {}
    for i, (name, port) in enumerate(((VALKEY, first_port), (VALKEY_REPLICA, replica_port))):
        d = state_dir / ("valkey" if i == 0 else f"valkey-{i}")
        d.mkdir(exist_ok=True, mode=credentials.DIR_MODE)
        conf = state_dir / f"valkey-{i}.conf"
        text = users + cluster.replication_conf(replica_password=replica_pw, sentinel_password=sentinel_pw,
                                                primary_port=first_port if i else None)
        credentials.private_write(conf, text.encode())
        out.append(ChildSpec(name, servers.valkey_args(port, d, config_file=conf), env, logs_dir / f"{name}.log",
                             port))
        data[name] = port
    binary = servers.valkey_server_binary()
    for i, port in enumerate(sentinel_ports):
        name = SENTINEL if i == 0 else f"{SENTINEL}-{i}"
        conf = state_dir / f"sentinel-{i}.conf"
        credentials.private_write(conf, cluster.sentinel_conf(
            port=port, primary_port=first_port, quorum=SENTINELS // 2 + 1, auth_user=cluster.SENTINEL_USER,
            auth_pass=sentinel_pw, peer_pass=peer_pw).encode())
        # --port repeats the file's: `ps` and the stack file show where each Sentinel listens
        out.append(ChildSpec(name, [binary, str(conf), "--sentinel", "--port", str(port)], env,
                             logs_dir / f"{name}.log", port))
    return out, ValkeyGroupPlan(data, sentinel_ports, cluster.SENTINEL_SERVICE)
