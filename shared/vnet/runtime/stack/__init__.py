"""The embedded local stack: servers, services and a node worker under one supervisor.

``vnetctl up`` builds a :class:`Supervisor` from :class:`StackOptions`, which starts
``nats-server`` (JetStream on) and ``valkey-server`` (AOF on) unless URLs of existing
servers are given, then the five services and one node worker, restarts whatever
crashes (exponential backoff, reset once a process has stayed up a while), and on
SIGINT/SIGTERM stops everything, deletes the sandbox namespace it made and removes
its state file. ``vnetctl down`` (:func:`stop_stack`) signals that supervisor.

A state directory holds::

    stack.json        what runs: URLs, ports, pids, namespace (only while the stack is up)
    stack.lock        flock held by the supervisor for its whole life (one stack per dir)
    credentials.json  NATS and Valkey passwords, one per identity (vnet.runtime.credentials)
    nats.conf         nats-server users and permissions, generated from vnet.contracts.permissions
    valkey.conf       Valkey ACL users (services only; the default user is off)
    nats/jetstream/   JetStream data (kept across up/down)
    valkey/           Redis data, AOF + RDB (kept across up/down)
    logs/<name>.log   one per process; supervisor.log when detached

Security: the directory is 0700 and every file in it 0600 (the supervisor runs with umask
077 and repairs an older directory). NATS and Valkey accept no connection without a
password; each service, the node worker and the local user's vnetctl (admin) get their own
identity, so a process of another local user gets nothing.

Safety: the stack never configures the machine's root network namespace. As root it
creates a sandbox namespace (``ip netns add``, loopback up inside it) for the node
worker to manage; the root namespace is handed to the worker only on an explicit
``host_root_netns``.

One module per concern (this package re-exports what ``vnetctl`` and the tests use):

    netns        the sandbox network namespace
    ports        ports of the stack's own servers, reachability of named ones
    layout       options, the child processes and the identity each runs as (:func:`make_plan`)
    readiness    health and discovery probes over the bus while the stack starts
    supervisor   :class:`Supervisor`: start, wait for ready, restart, stop in order
    down         ``vnetctl up --detach`` and ``vnetctl down`` from outside the supervisor
    summary      what ``vnetctl up`` prints once ready

The state file and process identity (:class:`StackFile`, :class:`StackError`, ``pid_alive``)
live beside this package in :mod:`vnet.runtime.stackfile`: the config reads the state file
to find a running stack, and this package imports the config.
"""


from __future__ import annotations

from vnet.runtime.config import apply_running_stack
from vnet.runtime.stack.down import cleanup_leftovers, start_detached, stop_stack
from vnet.runtime.stack.layout import (
    COMPONENTS,
    NATS,
    NODE,
    REPLICATED,
    SERVERS,
    VALKEY,
    Child,
    ChildSpec,
    Plan,
    StackOptions,
    child_env,
    default_node_id,
    entry_argv,
    make_plan,
    valid_node_id,
)
from vnet.runtime.stack.layout import Identities as _Identities
from vnet.runtime.stack.netns import create_sandbox_netns, delete_netns, netns_exists, sandbox_netns_name
from vnet.runtime.stack.summary import format_summary
from vnet.runtime.stack.supervisor import Supervisor
from vnet.runtime.stackfile import (
    LOCK_FILE,
    STACK_FILE,
    ProcEntry,
    Say,
    StackError,
    StackFile,
    default_state_dir,
    describe_exit,
    pid_alive,
    proc_start_time,
    read_stack_file,
    running_stack,
    stack_credentials,
    tail,
    write_stack_file,
)

__all__ = [
    "COMPONENTS", "LOCK_FILE", "NATS", "NODE", "REPLICATED", "SERVERS", "STACK_FILE", "VALKEY", "Child", "ChildSpec",
    "Plan", "ProcEntry", "Say", "StackError", "StackFile", "StackOptions", "Supervisor", "_Identities",
    "apply_running_stack", "child_env", "cleanup_leftovers", "create_sandbox_netns", "default_node_id",
    "default_state_dir", "delete_netns", "describe_exit", "entry_argv", "format_summary", "make_plan",
    "netns_exists", "pid_alive", "proc_start_time", "read_stack_file", "running_stack", "sandbox_netns_name",
    "stack_credentials", "start_detached", "stop_stack", "tail", "valid_node_id", "write_stack_file",
]
