"""Network lifecycle and topology.

Operations (subjects in ``contracts/subjects.py``, types in ``contracts/network.py``):
create, get, list, update, delete; connect / disconnect; mesh create / add / remove /
delete / get / list; host-route reports from the node workers.

Decisions worth knowing (details in ``docs/networks.md``):

* **Defaults** — a request without ``driver`` / ``isolation`` gets *this service's*
  ``default_driver`` / ``default_isolation``: the service's configuration is the
  cluster's policy, the client's is not consulted.
* **Atomicity** — name uniqueness, ``max_networks``, the overlap check and the record
  write are one Lua script (``adapters/network_store.py``), so two replicas racing on
  overlapping subnets cannot both win; overlap costs one O(log n) index lookup.
* **No partial state** — the IPAM pools are created *before* the commit with the new
  network's id; if the commit says no they are deleted again; if its outcome is unknown
  (a store timeout: the script may still run) or this process dies in between, they stay,
  and if the network never lands they belong to a network that does not exist, which the
  IPAM garbage collector removes after its grace period. Delete commits first and deletes the
  pools after, for the same reason.
* **Carving** is next-fit from a cursor (like serial address allocation): a deleted
  network's subnet is not handed out again while other space is free. It skips existing
  networks and the prefixes node workers report from their hosts; a concurrent winner
  is seen on the retry.
* **Reachability** — create (a child carved from its parent, or any network), delete,
  update (isolation), connect / disconnect and the mesh operations take
  ``dry_run``: nothing changes and the reply is the record(s) as they would be with
  ``reach``, the paths the change would open and close (:func:`vnet.core.reach.diff` over
  the fabric: networks from this store, endpoints and rules from their services). A real
  call computes the same diff before it commits — best effort: if the endpoint or policy
  service does not answer, the change goes ahead with ``reach: null`` — and puts it in its
  reply and its event.

Where the code is: this module is the service's face (its definition, start and the table
of operations); the handlers are in the sibling modules by concern — ``create`` (with
``carving`` for the subnet and ``pools`` for IPAM and the parent's exclusions),
``records`` (get, list, update, delete), ``relations`` (connections and mesh groups),
``hostroutes``, and ``common`` (store, events, idempotency, reachability diffs).
"""

from __future__ import annotations

from vnet.contracts import subjects
from vnet.contracts.network import (
    HostRoutesReport,
    HostRoutesRequest,
    MeshCreate,
    MeshListRequest,
    MeshMember,
    MeshRef,
    NetworkCreate,
    NetworkDelete,
    NetworkList,
    NetworkPair,
    NetworkRef,
    NetworkUpdate,
)
from vnet.runtime.service import Runtime, ServiceDef
from vnet.svc.network import create, hostroutes, records, relations

SERVICE = ServiceDef("network", "Networks: create, inspect, update, delete, topology")


@SERVICE.starting
async def _start(rt: Runtime) -> None:
    store = rt.adapters.network_store()
    await store.load()
    rt.state["store"] = store
    # Tell IPAM GC this index is maintained even when it is empty (Redis drops empty sets).
    await rt.adapters.mark_index_maintained("networks")


# --- operations, in the order the contract lists them ------------------------------------
# The handlers live in the sibling modules by concern; they are registered here, so importing
# this module (the launcher and the docgen do) registers every one, and the siblings need not
# import this module (no cycle between them).

SERVICE.op("create", subjects.NETWORK_CREATE, NetworkCreate)(create.create)
SERVICE.op("get", subjects.NETWORK_GET, NetworkRef)(records.get)
SERVICE.op("list", subjects.NETWORK_LIST, NetworkList)(records.list_networks)
SERVICE.op("update", subjects.NETWORK_UPDATE, NetworkUpdate)(records.update)
SERVICE.op("delete", subjects.NETWORK_DELETE, NetworkDelete)(records.delete)
SERVICE.op("connect", subjects.NETWORK_CONNECT, NetworkPair)(relations.connect)
SERVICE.op("disconnect", subjects.NETWORK_DISCONNECT, NetworkPair)(relations.disconnect)
SERVICE.op("mesh.create", subjects.NETWORK_MESH_CREATE, MeshCreate)(relations.mesh_create)
SERVICE.op("mesh.add", subjects.NETWORK_MESH_ADD, MeshMember)(relations.mesh_add)
SERVICE.op("mesh.remove", subjects.NETWORK_MESH_REMOVE, MeshMember)(relations.mesh_remove)
SERVICE.op("mesh.delete", subjects.NETWORK_MESH_DELETE, MeshRef)(relations.mesh_delete)
SERVICE.op("mesh.get", subjects.NETWORK_MESH_GET, MeshRef)(relations.mesh_get)
SERVICE.op("mesh.list", subjects.NETWORK_MESH_LIST, MeshListRequest,
           page_hint="ask for fewer meshes per page with `limit` and follow `next_cursor`")(relations.mesh_list)
SERVICE.op("hostroutes.report", subjects.NETWORK_HOSTROUTES_REPORT, HostRoutesReport,
           max_bytes=1024 * 1024)(hostroutes.hostroutes_report)
SERVICE.op("hostroutes.list", subjects.NETWORK_HOSTROUTES_LIST, HostRoutesRequest,
           page_hint="ask for fewer nodes per page with `limit` and follow `next_cursor`")(hostroutes.hostroutes_list)
