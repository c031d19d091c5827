"""``VNetConfig``: the module description's fields plus connection settings.

Precedence (later wins): defaults < the running local stack < file (``VNET_CONFIG``
or an explicit path; TOML, YAML or JSON) < environment (``VNET_<FIELD>`` upper-case)
< explicit keyword arguments. Every key of the file and every ``VNET_*`` variable is a
field below; an unknown one is an error that names it, not silently ignored.

The running local stack (the one ``vnetctl up`` started from the default state
directory) is found by :func:`with_local_stack`, the one function ``VNetConfig.load()``
and ``vnetctl`` both use: its connection settings apply unless a NATS server is named
(file, environment, argument), so ``VNetConfig.load()`` reaches the stack exactly as
``vnetctl status`` does.
"""

from __future__ import annotations

import ipaddress
import json
import os
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import msgspec
import yaml

from vnet.core import errors as E
from vnet.core.model import DriverType, IsolationMode

ENV_PREFIX = "VNET_"
# Variables read by other parts (not config fields) that must not be mistaken for typos
# (tests/unit/test_config.py finds every VNET_* name the package reads and checks this list).
_NON_FIELD_ENV = {"VNET_CONFIG", "VNET_STATE_DIR", "VNET_RUN_PREFIX",
                  "VNET_TRACE_DIR", "VNET_LOCAL_TRACES",  # vnet.telemetry.local_traces
                  "VNET_NODE_DNS",  # vnet.svc.node.dns (vnet-node --dns)
                  "VNET_CNI_SOCKET"}  # the vnet-cni shim


class VNetConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    # The module description's fields and defaults.
    default_driver: DriverType = DriverType.BRIDGE
    default_isolation: IsolationMode = IsolationMode.FULL
    ipv6_enabled: bool = False
    default_subnet: str = "172.20.0.0/16"
    default_subnet_v6: str | None = None
    max_networks: int = 1000
    metrics_enabled: bool = True
    # Prefix length of networks carved from default_subnet when no CIDR is given.
    default_prefix_len: int = 24
    default_prefix_len_v6: int = 64
    # VXLAN network identifiers the network service allocates to overlay networks (an explicit
    # `vni` option may lie outside this range; it must only be free).
    overlay_vni_min: int = 1
    overlay_vni_max: int = (1 << 24) - 1

    # Connections.
    nats_url: str = "nats://127.0.0.1:4222"
    nats_user: str | None = None
    nats_password: str | None = None
    nats_token: str | None = None
    nats_creds: str | None = None
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_username: str | None = None
    redis_password: str | None = None
    # Replies to this process arrive below this prefix (nats-py ``inbox_prefix``); None: the
    # default ``_INBOX``, or ``_INBOX.<nats_user>`` when a user is set — the permission matrix
    # (vnet.contracts.permissions) lets each user subscribe only below its own.
    nats_inbox_prefix: str | None = None
    # TLS to NATS (nodes on other machines): the CA that signed the server's certificate, and
    # this process's own certificate and key when the server asks for one (verify on).
    nats_tls_ca: str | None = None
    nats_tls_cert: str | None = None
    nats_tls_key: str | None = None
    # `vnetctl up`: run its NATS with TLS, certificates from a CA of its own in the state dir
    # (vnet.runtime.tls); for node workers on other machines.
    stack_tls: bool = False
    # How long a client (VNetManager, vnetctl, a service starting) tries to reach NATS before
    # it gives up with `unavailable` naming the URL; it used to retry forever.
    connect_timeout_s: float = 5.0
    # Replicas of the VNET_EVENTS stream a service makes (or raises an existing one to) at
    # start: 3 on a three-server NATS cluster (docker-compose.cluster.yml), 1 on one server.
    events_replicas: int = 1
    # Every Redis command's socket timeout, and the longest wait for a pooled connection: a
    # frozen or lost store fails a request with 503 within this, instead of holding it.
    redis_timeout_s: float = 2.0
    # Connections in a service's Redis pool; None: max_inflight (one per running handler).
    redis_max_connections: int | None = None
    # Replicated Valkey (docs/scale.md): the Sentinels ("host:port,host:port,...") to ask where
    # the primary of ``redis_sentinel_service`` is; set, they replace redis_url's host and port
    # (its database number still counts) and a service follows a failover by asking them again.
    redis_sentinels: str | None = None
    redis_sentinel_service: str = "vnet"
    # With replicas: an IPAM allocation or release is answered only once this many replicas
    # hold it (WAIT, at most redis_wait_timeout_ms), so a failover cannot lose an
    # acknowledged address and hand it out twice. 0: answered once the primary has it.
    redis_wait_replicas: int = 0
    redis_wait_timeout_ms: int = 500

    # Service runtime.
    max_inflight: int = 256
    request_timeout_s: float = 5.0
    # A client's mutation that carries a request_id is sent again (same id) when an attempt of
    # request_timeout_s gets no answer or finds no responders, until this long after the first
    # attempt: a request held by a SIGKILLed instance is answered by the retry (issue 11).
    mutation_retry_s: float = 30.0
    metrics_report_interval_s: float = 2.0
    metrics_http_host: str = "127.0.0.1"
    metrics_http_port: int = 9464
    otlp_endpoint: str | None = None
    log_level: str = "INFO"

    # IPAM garbage collection: how often, and how old an orphan must be before it is released.
    ipam_gc_interval_s: float = 30.0
    ipam_gc_grace_s: float = 60.0

    # Node worker.
    node_id: str | None = None
    host_netns: str | None = None  # None: the namespace the worker runs in
    node_resync_interval_s: float = 10.0  # full resync period: drift is repaired within it
    node_underlay: str | None = None  # this host's underlay (VTEP) address; found from the routes if unset
    node_underlay_ifname: str | None = None
    # Deregister on a graceful stop, so other hosts drop this one's overlay entries at once.
    # Off by default: a restart (an upgrade) should not cut cross-host traffic (fail static);
    # a node that is really gone is removed after the heartbeat timeout anyway.
    node_deregister_on_stop: bool = False
    # The node's keys (WireGuard private key), nftables state and sub-interface ledger. Unset:
    # $VNET_STATE_DIR/nodes/<node>, else /var/lib/vnet/nodes/<node> as root (vnet.svc.node.lifecycle).
    node_state_dir: str | None = None
    # The WireGuard mesh of encrypted overlays: the node registry gives each node one address of it.
    node_wg_mesh: str = "10.255.0.0/16"

    def __post_init__(self) -> None:
        try:
            # strict=False: host bits set are accepted (and dropped), as before
            v4 = ipaddress.ip_network(self.default_subnet, strict=False)
        except (ValueError, TypeError):
            raise E.make(E.INVALID_CONFIG, f"default_subnet {self.default_subnet!r} is not a CIDR") from None
        if v4.version != 4:
            raise E.make(E.INVALID_CONFIG, f"default_subnet {self.default_subnet!r} must be IPv4; "
                         "put an IPv6 pool in default_subnet_v6")
        if self.default_subnet_v6 is not None:
            try:
                v6 = ipaddress.ip_network(self.default_subnet_v6, strict=False)
            except (ValueError, TypeError):
                raise E.make(E.INVALID_CONFIG,
                             f"default_subnet_v6 {self.default_subnet_v6!r} is not a CIDR") from None
            if v6.version != 6:
                raise E.make(E.INVALID_CONFIG, f"default_subnet_v6 {self.default_subnet_v6!r} must be IPv6")
        if not (v4.prefixlen <= self.default_prefix_len <= 30):
            raise E.make(E.INVALID_CONFIG, f"default_prefix_len {self.default_prefix_len} must be between "
                         f"the pool's /{v4.prefixlen} and /30")
        if not (1 <= self.overlay_vni_min <= self.overlay_vni_max <= (1 << 24) - 1):
            raise E.make(E.INVALID_CONFIG, f"overlay_vni_min..overlay_vni_max ({self.overlay_vni_min}.."
                         f"{self.overlay_vni_max}) must be a non-empty range within 1..16777215")
        if self.max_networks < 1:
            raise E.make(E.INVALID_CONFIG, "max_networks must be at least 1")
        if self.max_inflight < 1:
            raise E.make(E.INVALID_CONFIG, "max_inflight must be at least 1")
        if self.redis_max_connections is not None and self.redis_max_connections < 1:
            raise E.make(E.INVALID_CONFIG, "redis_max_connections must be at least 1 (or unset: max_inflight)")
        if not 1 <= self.events_replicas <= 5:
            raise E.make(E.INVALID_CONFIG, f"events_replicas {self.events_replicas} must be 1..5 (JetStream "
                         "keeps at most 5 replicas; use the number of NATS servers, up to 5)")
        if self.redis_wait_replicas < 0 or self.redis_wait_timeout_ms < 1:
            raise E.make(E.INVALID_CONFIG, "redis_wait_replicas must be 0 or more and redis_wait_timeout_ms at "
                         "least 1 (WAIT with 0 ms would block for ever)")
        for name in ("connect_timeout_s", "redis_timeout_s", "request_timeout_s", "mutation_retry_s"):
            if getattr(self, name) <= 0:
                raise E.make(E.INVALID_CONFIG, f"{name} must be a positive number of seconds")

    # -- loading ---------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return cls.__struct_fields__

    @classmethod
    def env_names(cls) -> tuple[str, ...]:
        return tuple(ENV_PREFIX + f.upper() for f in cls.__struct_fields__)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str] | None = None,
        *,
        env: Mapping[str, str] | None = None,
        discover: bool | None = None,
        **overrides: Any,
    ) -> VNetConfig:
        """Defaults, the running local stack, the file, ``VNET_*`` variables, ``overrides``.

        ``env`` replaces ``os.environ`` (tests); ``discover`` says whether to look for the
        running local stack (default: only when reading the real environment, so a test's
        ``env={}`` config never depends on a stack someone runs on the machine).
        """
        if discover is None:
            discover = env is None
        env = os.environ if env is None else env
        raw: dict[str, Any] = {}
        path = path or env.get("VNET_CONFIG")
        if path:
            raw.update(_read_file(Path(path)))
        fields = set(cls.__struct_fields__)
        for key, value in env.items():
            if not key.startswith(ENV_PREFIX) or key in _NON_FIELD_ENV:
                continue
            name = key[len(ENV_PREFIX):].lower()
            if name not in fields:
                raise E.make(E.INVALID_CONFIG, f"environment variable {key} is not a VNet setting; "
                             f"known: {', '.join(cls.env_names())}", variable=key)
            raw[name] = value
        raw.update({k: v for k, v in overrides.items()})
        config = cls.from_mapping(raw)
        if discover:
            config = with_local_stack(config, named=raw.keys(), env=env)
        return config

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> VNetConfig:
        try:
            return msgspec.convert(dict(raw), cls, strict=False)
        except msgspec.ValidationError as exc:
            raise E.make(E.INVALID_CONFIG, f"invalid configuration: {exc}") from None

    def to_env(self) -> dict[str, str]:
        """The environment that reproduces this config in a child process."""
        out: dict[str, str] = {}
        for f in self.__struct_fields__:
            v = getattr(self, f)
            if v is None:
                continue
            out[ENV_PREFIX + f.upper()] = str(v).lower() if isinstance(v, bool) else str(v)
        return out


_DEFAULTS: dict[str, Any] = {f: getattr(VNetConfig(), f) for f in VNetConfig.__struct_fields__}


def local_stack_settings(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Connection settings of the local stack running from the default state directory
    (``$VNET_STATE_DIR``, else ``$XDG_STATE_HOME/vnet``, else ``~/.local/state/vnet``), read
    from its state file; ``{}`` when none runs there (or its supervisor is gone).

    The keys are :class:`VNetConfig` fields; the state file decides which
    (``StackFile.connection_settings``), so credentials it records reach clients too.
    """
    from vnet.runtime import stackfile as state  # the state file and liveness check (no cycle: it does not import us)

    try:
        running = state.running_stack(state.default_state_dir(env))
    except state.StackError:
        return {}
    if running is None:
        return {}
    return running.connection_settings()


def with_local_stack(config: VNetConfig, *, named: Iterable[str] = (),
                     env: Mapping[str, str] | None = None) -> VNetConfig:
    """``config`` pointed at the running local stack unless it names its own NATS server.

    ``named`` are the fields the user set (file, environment, arguments); a NATS URL that
    differs from the default counts as named too. Then ``config`` is returned as is: a
    stack's Redis or credentials must not be mixed with another NATS. Otherwise the stack's
    settings replace every field that was not named.
    """
    named = set(named)
    if "nats_url" in named or config.nats_url != _DEFAULTS["nats_url"]:
        return config
    settings = {k: v for k, v in local_stack_settings(env).items()
                if k not in named and k in _DEFAULTS and getattr(config, k) == _DEFAULTS[k]}
    if not settings:
        return config
    return msgspec.structs.replace(config, **settings)


def apply_running_stack(config: VNetConfig, *, explicit_nats: bool = False) -> VNetConfig:
    """Point ``config`` at the running local stack unless the user named servers.

    The user named a NATS server when ``explicit_nats`` (``--nats``), ``VNET_NATS_URL``
    is set, or the config file changed ``nats_url`` from its default; then ``config`` is
    returned as is. Otherwise, if the stack of the default state directory is up, its
    NATS URL (and its Redis URL, unless named likewise) replace the defaults.
    """
    named = {f for f in VNetConfig.__struct_fields__ if os.environ.get(ENV_PREFIX + f.upper())}
    if explicit_nats:
        named.add("nats_url")
    return with_local_stack(config, named=named)


def _read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise E.make(E.INVALID_CONFIG, f"cannot read config file {path}: {exc.strerror}") from None
    try:
        if path.suffix == ".toml":
            data: Any = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError, json.JSONDecodeError) as exc:
        raise E.make(E.INVALID_CONFIG, f"config file {path} is not valid: {exc}") from None
    if not isinstance(data, dict):
        raise E.make(E.INVALID_CONFIG, f"config file {path} must hold a mapping of settings")
    data = data.get("vnet", data)
    return dict(data)
