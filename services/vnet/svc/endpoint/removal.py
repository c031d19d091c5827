"""Removing an endpoint: its record and indexes, the node told, its addresses released. A
detach (``records.delete``), an endpoint of a deleted network, and a create whose node found no
namespace (``create``) all end here.
"""

from __future__ import annotations

import asyncio
import logging

from vnet.contracts.endpoint import EndpointDeleted, EndpointEvent
from vnet.core import drivers
from vnet.core import errors as E
from vnet.runtime import addresses
from vnet.runtime.service import Ctx
from vnet.svc.endpoint.common import _not_found, _store
from vnet.svc.endpoint.events import _publish_endpoint_event, _StatusWaiter

log = logging.getLogger(__name__)


async def _release(ctx: Ctx, network_id: str, ident: str) -> tuple[list[str], str | None]:
    """Release what ``ident`` holds; a failure is a warning (IPAM GC collects it later)."""
    try:
        return await addresses.release(ctx, network_id, ident), None
    except Exception as exc:
        why = exc.message if isinstance(exc, E.VNetError) else f"{type(exc).__name__}: {exc}"
        log.warning("could not release the addresses of endpoint %s: %s", ident, why)
        return [], (f"the addresses of {ident} were not released ({why}); the IPAM garbage collector "
                    "releases them after its grace period")


async def remove(ctx: Ctx, ident: str, *, wait: bool, timeout: float) -> EndpointDeleted:
    store = _store(ctx)
    info = await store.get(ident)
    if info is None:
        raise _not_found(ident)
    warnings: list[str] = []
    waiter = None
    if wait:
        node = await store.node(info.node)
        if node is None:
            warnings.append(f"node {info.node} is not registered: its interface is removed when its worker comes "
                            "back (full resync)")
        else:
            waiter = _StatusWaiter(ctx.rt, ident, frozenset({"deleted", "failed"}))
            await waiter.start()
    try:
        old = await store.delete(info)
        if old is None:
            raise _not_found(ident)
        await store.netep_remove(old.network_id, ident)
        try:
            await _publish_endpoint_event(ctx, "deleted", old, EndpointEvent(endpoint=old),
                                          msg_id=f"endpoint.deleted.{ident}")
        except Exception as exc:
            log.warning("could not publish endpoint.deleted for %s: %s", ident, exc)
            warnings.append(f"the node was not told ({exc}); its next full resync removes the interface")
        released: list[str] = []
        if drivers.get(old.driver).container_iface:  # one sharing the host's namespace holds no address
            released, warn = await _release(ctx, old.network_id, ident)
            if warn:
                warnings.append(warn)
        confirmed = False
        if waiter is not None:
            try:
                ev = await asyncio.wait_for(asyncio.shield(waiter.got), timeout)
            except TimeoutError:
                warnings.append(f"node {old.node} did not confirm the teardown within {timeout:.0f}s")
            else:
                confirmed = ev.status == "deleted"
                if not confirmed:
                    warnings.append(f"node {old.node} could not tear the interface down: {ev.reason}")
    finally:
        if waiter is not None:
            await waiter.close()
    return EndpointDeleted(endpoint=old, released=released, node_confirmed=confirmed, warnings=warnings)
