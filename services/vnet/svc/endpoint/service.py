"""Endpoints: containers attached to networks, and the registry of node workers.

Operations (subjects in ``contracts/subjects.py``, types in ``contracts/endpoint.py``):
create, get, list, delete; ``desired.get`` (a node's desired state) and ``node.list``.
Node workers register on ``vnet.node.<node>.register`` (request/reply, repeated as a
heartbeat); that subject is served by a plain queue subscription rather than an
operation because clients may not publish on it (ops/nats/nats.conf), and every
operation must be callable by a client.

How a create goes (details in ``docs/endpoints.md``)::

    validate (MAC, interface name, namespace)       no I/O
    network.get                                     404 network_not_found
    node registered? driver available there?        404 node_not_found / 503 driver_unavailable
    node: does the namespace exist? (no wait only)  404 netns_not_found   (vnet.node.<node>.netns.check)
    address: IPv4 (+ IPv6)  owner = endpoint id     409 address_in_use naming the holder
      (IPAM's allocation script, called here: vnet.runtime.addresses)
    netep SADD, commit (one Lua script)             dup -> release and return the first result
    event vnet.evt.endpoint.created.<id>            the node reconciles and reports status

No partial state: anything failing after the allocation releases it; a crash in
between leaves an allocation whose owner is not in the endpoint index, which the
IPAM garbage collector releases after its grace period. A create with ``wait`` learns
of a missing namespace from the node's report (``netns_not_found``) and removes what it
committed before it answers with that error.

Statuses: the node worker publishes ``vnet.evt.endpoint.status.<node>.<id>`` (ready, failed
with a reason, or deleted); a durable JetStream consumer shared by the replicas folds
them into the records (later versions win). Every replica also hears every report on one
core subscription (``events.StatusBoard``): its requests with ``wait`` take theirs from it,
and its reads take a report not folded yet. A create with ``wait`` forwards its caller's
reply subject to the node with the event, and the node answers it as soon as the endpoint
is ready; this service answers too, after its fold (the caller keeps the first answer).

Where the code is: this module is the service's face (its definition, start and stop, and
the table of operations); the handlers are in the sibling modules by concern — ``nodes``
(the registry), ``desired`` (a node's desired state), ``create``, ``records`` (get, list,
delete, and the status and network-deleted events), ``update``, ``runtime_ops`` (the CNI
plugin's calls), ``events`` (node-addressed copies, status waits) and ``common``.
"""

from __future__ import annotations

import logging

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from vnet.contracts import subjects
from vnet.contracts.endpoint import (
    DesiredRequest,
    EndpointCreate,
    EndpointDelete,
    EndpointList,
    EndpointRef,
    EndpointUpdate,
    NodeListRequest,
    RuntimeDetach,
)
from vnet.runtime import addresses
from vnet.runtime.service import Runtime, ServiceDef
from vnet.svc.endpoint import create, desired, events, lookups, nodes, records, runtime_ops, update
from vnet.svc.endpoint.common import NETDEL_DURABLE, STATUS_DURABLE
from vnet.svc.endpoint.nodes import _on_deregister, _on_register, _watch_nodes
from vnet.svc.endpoint.records import _on_network_deleted, _on_status
from vnet.svc.endpoint.update import _repair_ports_loop

log = logging.getLogger(__name__)

SERVICE = ServiceDef("endpoint", "Endpoints: attach and detach containers; the node registry")


# --- start / stop ---------------------------------------------------------------------------

@SERVICE.starting
async def _start(rt: Runtime) -> None:
    store = rt.adapters.endpoint_store()
    await store.load()
    rt.state["store"] = store
    # Attach and detach allocate and release addresses themselves (vnet.runtime.addresses).
    await addresses.start(rt)
    # Tell IPAM GC this index is maintained even when it is empty (Redis drops empty sets).
    await rt.adapters.mark_index_maintained("endpoints")
    async def on_register(msg: Msg) -> None:
        await _on_register(rt, msg)

    async def on_status(msg: Msg) -> None:
        await _on_status(rt, msg)

    async def on_network_deleted(msg: Msg) -> None:
        await _on_network_deleted(rt, msg)

    async def on_deregister(msg: Msg) -> None:
        await _on_deregister(rt, msg)

    consumers = [
        rt.adapters.event_consumer(STATUS_DURABLE, subjects.EVT_ENDPOINT_STATUS.wildcard(), deliver_all=False),
        rt.adapters.event_consumer(NETDEL_DURABLE, subjects.EVT.wildcard().replace("*.*.*", "network.deleted.*"),
                                   deliver_all=False),
    ]
    rt.state["consumers"] = consumers
    try:
        # before any request: every wait and every read of a status takes from it
        await events.board(rt).start(rt)
        lk = rt.state["lookups"] = lookups.Lookups()
        await lk.start(rt)
        # every node's heartbeat comes here: handled side by side, not one after another
        rt.state["register_sub"] = await rt.nc.subscribe(subjects.NODE_REGISTER.wildcard(),
                                                         queue=f"vnet-{SERVICE.name}",
                                                         cb=rt.concurrently(on_register, "register"))
        rt.state["deregister_sub"] = await rt.nc.subscribe(subjects.NODE_DEREGISTER.wildcard(),
                                                           queue=f"vnet-{SERVICE.name}",
                                                           cb=rt.concurrently(on_deregister, "deregister"))
        await consumers[0].start(on_status)
        await consumers[1].start(on_network_deleted)
        rt.spawn(_watch_nodes(rt), "endpoint-node-watch")
        rt.spawn(_repair_ports_loop(rt), "endpoint-port-repair")
    except BaseException:  # the runtime does not call stop hooks after a failed start
        await _stop(rt)
        raise


@SERVICE.stopping
async def _stop(rt: Runtime) -> None:
    for key in ("register_sub", "deregister_sub"):
        sub: Subscription | None = rt.state.pop(key, None)
        if sub is not None:
            try:
                await sub.unsubscribe()
            except Exception as exc:
                log.debug("unsubscribe %s: %s", key, exc)
    for c in rt.state.pop("consumers", []):
        await c.stop()
    b: events.StatusBoard | None = rt.state.pop("board", None)
    if b is not None:
        await b.stop()
    lk: lookups.Lookups | None = rt.state.pop("lookups", None)
    if lk is not None:
        await lk.stop()


async def _store_check(rt: Runtime) -> tuple[str, str]:
    return "endpoint_store", "ok" if "store" in rt.state else "not started"


SERVICE.health_checks.append(_store_check)


# --- operations, in the order the contract lists them ------------------------------------
# The handlers live in the sibling modules by concern; they are registered here, so importing
# this module (the launcher and the docgen do) registers every one, and the siblings need not
# import this module (no cycle between them).

SERVICE.op("node.list", subjects.ENDPOINT_NODE_LIST, NodeListRequest)(nodes.node_list)
SERVICE.op("desired.get", subjects.ENDPOINT_DESIRED, DesiredRequest,
            page_hint="ask for fewer endpoints per page with `limit` and follow `next_cursor`")(desired.desired_get)
SERVICE.op("create", subjects.ENDPOINT_CREATE, EndpointCreate)(create.create)
SERVICE.op("get", subjects.ENDPOINT_GET, EndpointRef)(records.get)
SERVICE.op("list", subjects.ENDPOINT_LIST, EndpointList)(records.list_endpoints)
SERVICE.op("delete", subjects.ENDPOINT_DELETE, EndpointDelete)(records.delete)
SERVICE.op("update", subjects.ENDPOINT_UPDATE, EndpointUpdate)(update.update)
SERVICE.op("runtime.attach", subjects.ENDPOINT_RUNTIME_ATTACH, EndpointCreate)(runtime_ops.runtime_attach)
SERVICE.op("runtime.detach", subjects.ENDPOINT_RUNTIME_DETACH, RuntimeDetach)(runtime_ops.runtime_detach)
SERVICE.op("runtime.list", subjects.ENDPOINT_RUNTIME_LIST, EndpointList)(runtime_ops.runtime_list)
