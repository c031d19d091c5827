"""A NATS cluster on loopback: N nats-servers joined by routes, VNET_EVENTS replicated on them.

What ``vnetctl up --cluster N`` and the cluster tests run, and the shape of a real multi-host
deployment (docs/scale.md): every server has the same users (the permission matrix's
generated per-identity users, vnet.contracts.permissions), its own JetStream store, a client
port and a route port; routes authenticate with their own generated user, so a client
identity cannot open a route and a route identity is not a client. Clients get every
server's URL (``nats_url`` as a comma-separated list, see :func:`vnet.adapters.nats.server_urls`)
and reconnect to a survivor when theirs dies; the stream's R3 raft group keeps every
acknowledged event through the loss of one server.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from nats.aio.client import Client

from vnet.adapters import nats as nats_adapter
from vnet.contracts import subjects
from vnet.runtime import credentials, servers

CLUSTER_NAME = "vnet"
ROUTE_USER = "vnet-route"


def cluster_block(*, name: str, port: int, peers: list[int], user: str, password: str,
                  host: str = "127.0.0.1") -> str:
    """The ``cluster {}`` section of one server: listen on ``port``, route to every peer."""
    routes = ",\n".join(f"    nats-route://{user}:{password}@{host}:{p}" for p in peers)
    return (f"cluster {{\n  name: {name}\n  listen: {host}:{port}\n"
            f"  authorization {{\n    user: {user}\n    password: \"{password}\"\n    timeout: 2\n  }}\n"
            f"  routes: [\n{routes}\n  ]\n}}\n")


@dataclass
class NatsCluster:
    """N running nats-servers; ``url`` is what clients are given (every server, comma-separated)."""

    servers: list[servers.ServerProc]
    route_ports: list[int]
    confs: list[Path]
    root: Path
    stopped: set[int] = field(default_factory=set)

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    @property
    def url(self) -> str:
        return ",".join(self.urls)

    def kill(self, i: int) -> None:
        """SIGKILL server ``i`` (no goodbye to clients or routes: a crash)."""
        s = self.servers[i]
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait()
        self.stopped.add(i)

    def restart(self, i: int) -> None:
        """Start server ``i`` again on the same ports, config and store (it rejoins and catches up)."""
        s = self.servers[i]
        if s.proc.poll() is None:
            return
        with open(s.log, "ab") as fh:
            proc = subprocess.Popen(s.args, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, preexec_fn=servers._die_with_parent)
        servers._wait_port("127.0.0.1", s.port, proc, f"nats-server {i}", s.log)
        s.proc = proc
        self.stopped.discard(i)

    def stop(self) -> None:
        for s in self.servers:
            s.stop()


def start_nats_cluster(root: Path, n: int = 3, *, base_conf: str = "", route_password: str | None = None,
                       monitor: bool = False) -> NatsCluster:
    """Start ``n`` clustered nats-servers under ``root`` (``root/nats-<i>``).

    ``base_conf``: the single-server config text (users and permissions, TLS) every server
    gets; the route credentials are generated unless given. Each config file is 0600.
    """
    if n < 1:
        raise ValueError("a cluster needs at least one server")
    ports = [servers.free_port() for _ in range(n)]
    route_ports = [servers.free_port() for _ in range(n)]
    mon = [servers.free_port() for _ in range(n)] if monitor else [None] * n
    password = route_password or credentials.new_password()
    started: list[servers.ServerProc] = []
    confs: list[Path] = []
    try:
        for i in range(n):
            d = root / f"nats-{i}"
            d.mkdir(parents=True, exist_ok=True)
            conf = d / "nats.conf"
            peers = [p for j, p in enumerate(route_ports) if j != i]
            text = (base_conf.rstrip() + "\n\n" if base_conf else "") + cluster_block(
                name=CLUSTER_NAME, port=route_ports[i], peers=peers, user=ROUTE_USER, password=password)
            credentials.private_write(conf, text.encode())
            confs.append(conf)
            # Each server waits for its client port only: the routes form once the others are up.
            started.append(servers.start_nats(d, ports[i], monitor_port=mon[i], config_file=conf))
    except BaseException:
        for s in started:
            s.stop()
        raise
    return NatsCluster(started, route_ports, confs, root)


async def ensure_replicated_stream(nc: Client, replicas: int, *, timeout: float = 60.0) -> int:
    """Create VNET_EVENTS with ``replicas`` replicas (or raise an R1 stream to it); its replica
    count. Retried until the cluster has a JetStream meta leader (a few seconds after start)."""
    try:
        return await nats_adapter.ensure_events_stream(nc.jetstream(), replicas, timeout=timeout)
    except Exception as exc:
        raise RuntimeError(f"could not make {subjects.EVENTS_STREAM} with {replicas} replicas: {exc}") from exc


# --- Valkey: a primary, replicas and Sentinels --------------------------------------------------

SENTINEL_SERVICE = "vnet"


@dataclass
class ValkeyGroup:
    """A Valkey primary, its replicas and the Sentinels watching them (all on loopback)."""

    primary: servers.ServerProc
    replicas: list[servers.ServerProc]
    sentinels: list[servers.ServerProc]
    service: str = SENTINEL_SERVICE

    @property
    def sentinel_spec(self) -> str:
        """What ``VNetConfig.redis_sentinels`` takes."""
        return ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)

    def data_servers(self) -> list[servers.ServerProc]:
        return [self.primary, *self.replicas]

    def stop(self) -> None:
        for s in [*self.sentinels, *self.replicas, self.primary]:
            s.stop()


# The two users replication needs besides the services' (the same names and rules as
# docker-compose.cluster.yml, which tests/contract/test_compose_cluster.py checks): the
# replica's (PSYNC, no keys) and the Sentinels' (the commands Sentinel runs, no keys).
REPLICA_USER = "vnet-replica"
SENTINEL_USER = "vnet-sentinel"
REPLICA_RULES = "resetkeys resetchannels -@all +psync +replconf +ping"
SENTINEL_RULES = ("resetkeys allchannels -@all +multi +slaveof +replicaof +ping +exec +subscribe "
                  "+config|rewrite +role +publish +info +client|setname +client|kill +script|kill")


# A Sentinel on a shared machine: clients (who take no Sentinel password: redis_sentinels has
# none) may only ask where the primary and its replicas are; everything else (SENTINEL SET,
# REMOVE, MONITOR, FAILOVER: enough to point the services at a server of one's own and catch
# their passwords) needs the peer user, which the Sentinels log in to each other with.
SENTINEL_PEER_USER = "vnet-sentinel-peer"
SENTINEL_CLIENT_RULES = ("resetkeys resetchannels -@all +ping +sentinel|masters +sentinel|master "
                         "+sentinel|get-master-addr-by-name +sentinel|slaves +sentinel|replicas +sentinel|sentinels "
                         "+client|setinfo +client|setname")


def replication_conf(*, replica_password: str, sentinel_password: str, primary_port: int | None = None,
                     host: str = "127.0.0.1") -> str:
    """What a data server of a Sentinel group adds to the stack's Valkey config: the replication
    and Sentinel users, ``masteruser``/``masterauth`` (every data server: a demoted primary must
    log in to the new one) and, for a replica, the primary to follow. Sentinel rewrites the
    file (``replicaof``) when it promotes or demotes the server: keep it writable."""
    lines = [f"user {REPLICA_USER} on >{replica_password} {REPLICA_RULES}",
             f"user {SENTINEL_USER} on >{sentinel_password} {SENTINEL_RULES}",
             f"masteruser {REPLICA_USER}", f"masterauth {replica_password}"]
    if primary_port is not None:
        lines += [f"replicaof {host} {primary_port}", "replica-read-only yes"]
    return "\n".join(lines) + "\n"


def sentinel_conf(*, port: int, primary_port: int, service: str = SENTINEL_SERVICE, quorum: int = 2,
                  down_after_ms: int = 1000, failover_timeout_ms: int = 5000, host: str = "127.0.0.1",
                  auth_user: str | None = None, auth_pass: str | None = None, peer_pass: str | None = None) -> str:
    """One Sentinel's config: watch ``service`` at ``host:primary_port``, call it down after
    ``down_after_ms`` without an answer, fail over when ``quorum`` Sentinels agree; log in to
    the data servers as ``auth_user`` when they have ACL users. ``peer_pass``: clients without a
    password may only discover (SENTINEL_CLIENT_RULES); the Sentinels log in to each other as
    SENTINEL_PEER_USER with it. (A Sentinel rewrites its file with what it learns: it must
    stay writable.)"""
    auth = ""
    if auth_user is not None and auth_pass is not None:
        auth = f"sentinel auth-user {service} {auth_user}\nsentinel auth-pass {service} {auth_pass}\n"
    if peer_pass is not None:
        auth += (f"user default on nopass {SENTINEL_CLIENT_RULES}\n"
                 f"user {SENTINEL_PEER_USER} on >{peer_pass} +@all allchannels\n"
                 f"sentinel sentinel-user {SENTINEL_PEER_USER}\nsentinel sentinel-pass {peer_pass}\n")
    return (f"port {port}\nbind {host}\nprotected-mode yes\ndaemonize no\n"
            f"sentinel monitor {service} {host} {primary_port} {quorum}\n" + auth +
            f"sentinel down-after-milliseconds {service} {down_after_ms}\n"
            f"sentinel failover-timeout {service} {failover_timeout_ms}\n"
            f"sentinel parallel-syncs {service} 1\n")


async def sentinel_primary(ports: list[int], service: str = SENTINEL_SERVICE, *, host: str = "127.0.0.1",
                           timeout: float = 1.0) -> tuple[str, int] | None:
    """The primary most of the Sentinels at ``host:ports`` name for ``service``; None when none
    answers. (Mid-failover they may disagree for a moment: the majority's answer wins.) All are
    asked at once and none twice: a dead one costs nothing, a frozen one ``timeout``."""
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.exceptions import RedisError

    async def ask(port: int) -> tuple[str, int] | None:
        r = aioredis.Redis(host=host, port=port, socket_timeout=timeout, socket_connect_timeout=timeout,
                           retry=Retry(NoBackoff(), 0))
        try:
            # redis-py leaves execute_command unannotated
            ans = await r.execute_command("SENTINEL", "get-master-addr-by-name", service)  # type: ignore[no-untyped-call]
        except (RedisError, OSError):
            return None
        finally:
            await r.aclose()
        if not ans:
            return None
        h, p = ans[0], ans[1]
        return (h.decode() if isinstance(h, bytes) else str(h), int(p))

    votes = Counter(a for a in await asyncio.gather(*(ask(p) for p in ports)) if a is not None)
    return votes.most_common(1)[0][0] if votes else None


def start_valkey_sentinel(root: Path, *, replicas: int = 1, sentinels: int = 3,
                          down_after_ms: int = 1000) -> ValkeyGroup:
    """Start a primary, ``replicas`` replicas of it and ``sentinels`` Sentinels (quorum: a
    majority) under ``root``. No ACL users (``vnetctl up --replicated-valkey`` runs the same
    with them: :func:`replication_conf`, ``sentinel_conf(auth_user=...)``)."""
    started: list[servers.ServerProc] = []
    try:
        primary = servers.start_valkey(root / "valkey-0")
        started.append(primary)
        reps: list[servers.ServerProc] = []
        for i in range(replicas):
            d = root / f"valkey-{i + 1}"
            d.mkdir(parents=True, exist_ok=True)
            conf = d / "replica.conf"
            conf.write_text(f"replicaof 127.0.0.1 {primary.port}\nreplica-read-only yes\n")
            reps.append(servers.start_valkey(d, config_file=conf))
            started.append(reps[-1])
        sents: list[servers.ServerProc] = []
        binary = servers.valkey_server_binary()
        for i in range(sentinels):
            d = root / f"sentinel-{i}"
            d.mkdir(parents=True, exist_ok=True)
            port = servers.free_port()
            conf = d / "sentinel.conf"
            conf.write_text(sentinel_conf(port=port, primary_port=primary.port, quorum=sentinels // 2 + 1,
                                          down_after_ms=down_after_ms))
            log = d / "sentinel.log"
            args = [binary, str(conf), "--sentinel"]
            with open(log, "ab") as fh:
                proc = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        start_new_session=True, cwd=d, preexec_fn=servers._die_with_parent)
            servers._wait_port("127.0.0.1", port, proc, "valkey sentinel", log)
            sents.append(servers.ServerProc("sentinel", f"redis://127.0.0.1:{port}", port, proc, log, args))
            started.append(sents[-1])
    except BaseException:
        for s in started:
            s.stop()
        raise
    return ValkeyGroup(primary, reps, sents)
