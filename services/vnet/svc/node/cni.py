"""The node worker's side of the CNI plugin: a unix socket (root only) where the
``vnet-cni`` shim hands over each call, answered through the control plane.

The shim writes ``VNETCNI1`` and CNI_COMMAND, CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME and
CNI_ARGS one per line, then the configuration exactly as the runtime gave it, and closes
its side; the node answers the plugin's exit code on one line and then its stdout (a
result, nothing, or a CNI error). The shim parses nothing, so it starts like bare Python.

The node asks the endpoint service on its own node-scoped subjects
(``vnet.endpoint.runtime.<node>.attach|detach|list``): the bus lets a node publish only
its own, so a node attaches containers on itself and nowhere else. Enabled with the node
parameter ``cni=on`` (``vnet-node --cni``); the socket is ``cni_socket`` (default
``/run/vnet/cni.sock``).

The fast path (``docs/cni.md`` "Where the time goes"): an ADD is one request (a create
with a request id of its own and no wait: a repeated ADD comes back as an endpoint made by
another request, which is the conflict), answered as soon as this node's worker reports
the endpoint wired, seen on the node's own status subject, not after the endpoint
service's status round trip. A DEL of a container this node attached answers from its own
record: the detach names the network by id and does not wait in the service; the answer
follows the worker's "deleted" report. The record is in memory only; after a restart a
DEL goes the long way (the service finds the endpoint).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import uuid
from collections import OrderedDict
from typing import Any

import msgspec
from nats.aio.msg import Msg

from vnet.contracts import subjects
from vnet.contracts.endpoint import (
    EndpointCreate,
    EndpointInfo,
    EndpointList,
    EndpointPage,
    EndpointStatusEvent,
    PortMapping,
    RuntimeDetach,
    RuntimeDetached,
)
from vnet.core import cni, drivers, naming
from vnet.core import errors as E
from vnet.runtime.service import Runtime

log = logging.getLogger(__name__)

DEFAULT_SOCKET = "/run/vnet/cni.sock"
ATTACH_WAIT_S = 60.0
DETACH_WAIT_S = 30.0  # then DEL succeeds anyway: the worker's queue keeps a later ADD behind the teardown
RECHECK_S = 2.0  # a status report not seen this long: the record is read (a report can be lost)
MAX_REQUEST = 1 << 20
TEARDOWN_FIRST = True
SEEN_MAX = 1024  # status reports kept for an ADD whose reply comes after the report
_VETH_DRIVERS = frozenset(d.name for d in drivers.all_drivers() if d.bridged)  # a veth on the host per endpoint


def enabled(rt: Runtime) -> bool:
    return rt.params.get("cni", "off").lower() in ("on", "1", "true", "yes") or "cni_socket" in rt.params


def _ip_json(netns: str, *args: str) -> Any:
    out = subprocess.run(["nsenter", f"--net={netns}", "ip", "-j", *args], capture_output=True, text=True,
                         timeout=10, check=False)
    if out.returncode != 0:
        raise cni.CniError(cni.VNET_FAILED, f"cannot read {netns}: {out.stderr.strip() or out.returncode}")
    return json.loads(out.stdout or "[]")


def parse_request(data: bytes) -> dict[str, Any] | None:
    """The shim's request (``VNETCNI1``, command, container id, netns, ifname, CNI_ARGS, one
    per line, then the configuration as the runtime wrote it); None when it is not one."""
    parts = data.split(b"\n", 6)
    if len(parts) != 7 or parts[0] != b"VNETCNI1" or len(data) > MAX_REQUEST:
        return None
    cmd, cid, netns, ifname, args = (p.decode(errors="replace") for p in parts[1:6])
    try:
        conf: Any = json.loads(parts[6]) if parts[6].strip() else None
    except ValueError as exc:
        conf = cni.CniError(cni.DECODING_FAILURE, f"the network configuration on stdin is not JSON: {exc}")
    return {"command": cmd, "container_id": cid, "netns": netns, "ifname": ifname,
            "args": dict(kv.split("=", 1) for kv in args.split(";") if "=" in kv), "config": conf}


class StatusWatch:
    """This node's endpoint status reports (``vnet.evt.endpoint.status.<node>.*``), as the
    bus carries them: the worker's "ready" after the kernel work is what an ADD answers on.
    Reports that arrive before anyone waits (the worker can be faster than a reply) are kept,
    the last ``SEEN_MAX`` of them."""

    def __init__(self) -> None:
        self.seen: OrderedDict[str, EndpointStatusEvent] = OrderedDict()
        # several callers may wait for one endpoint (an ADD and a CHECK of it)
        self.waiting: dict[str, list[tuple[frozenset[str], asyncio.Future[EndpointStatusEvent]]]] = {}

    def on_msg(self, msg: Msg) -> None:
        try:
            ev = msgspec.json.decode(msg.data, type=EndpointStatusEvent)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return
        for wanted, fut in self.waiting.get(ev.endpoint_id, ()):
            if ev.status in wanted and not fut.done():
                fut.set_result(ev)
        self.seen[ev.endpoint_id] = ev
        self.seen.move_to_end(ev.endpoint_id)
        while len(self.seen) > SEEN_MAX:
            self.seen.popitem(last=False)

    def expect(self, eid: str, wanted: frozenset[str]) -> asyncio.Future[EndpointStatusEvent]:
        """A future for ``eid``'s next report in ``wanted`` (at once if one was seen already)."""
        fut: asyncio.Future[EndpointStatusEvent] = asyncio.get_running_loop().create_future()
        ev = self.seen.get(eid)
        if ev is not None and ev.status in wanted:
            fut.set_result(ev)
        else:
            self.waiting.setdefault(eid, []).append((wanted, fut))
        return fut

    def done(self, eid: str, fut: asyncio.Future[EndpointStatusEvent]) -> None:
        """``fut`` (from :meth:`expect`) waits no more."""
        rest = [w for w in self.waiting.pop(eid, []) if w[1] is not fut]
        if rest:
            self.waiting[eid] = rest


class CniServer:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.node = rt.params["node"]
        self.path = rt.params.get("cni_socket", DEFAULT_SOCKET)
        self.server: asyncio.Server | None = None
        self.calls: dict[str, int] = {}
        self.took: dict[str, float] = {}  # the last call's time here, by command (benchmarks read it)
        self.watch = StatusWatch()
        self._sub: Any = None
        # what this node attached for a runtime, by (container, conf network, ifname): a DEL
        # finds the endpoint here without asking (in memory: a restart forgets, the service finds)
        self.attached: dict[tuple[str, str, str], EndpointInfo] = {}

    async def start(self) -> None:
        d = os.path.dirname(self.path) or "."
        os.makedirs(d, mode=0o700, exist_ok=True)
        try:
            os.unlink(self.path)  # a socket left by a killed worker
        except FileNotFoundError:
            pass
        async def on_status(msg: Msg) -> None:
            self.watch.on_msg(msg)

        # vnet.evt.endpoint.status.<this node>.*: the node's own reports only
        own = subjects.EVT_ENDPOINT_STATUS.format(node=self.node, id="x").rsplit(".", 1)[0] + ".*"
        self._sub = await self.rt.nc.subscribe(own, cb=on_status)
        old = os.umask(0o177)  # the socket is born 0600: only root may hand over calls
        try:
            self.server = await asyncio.start_unix_server(self._client, self.path, limit=MAX_REQUEST)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        log.info("node %s: CNI socket %s", self.node, self.path)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception as exc:  # the connection is going anyway
                log.debug("node %s: CNI status subscription: %s", self.node, exc)
            self._sub = None
        try:
            os.unlink(self.path)
        except OSError:
            pass

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            data = await reader.read(MAX_REQUEST + 1)
            while len(data) <= MAX_REQUEST:
                more = await reader.read(MAX_REQUEST + 1 - len(data))
                if not more:
                    break
                data += more
            resp = await self.handle(parse_request(data))
            if resp.get("error"):
                out = f"1\n{json.dumps(resp['error'])}\n"
            elif resp.get("result") is not None:
                out = f"0\n{json.dumps(resp['result'])}\n"
            else:
                out = "0\n"
            writer.write(out.encode())
            await writer.drain()
        except (ConnectionError, ValueError) as exc:
            log.info("node %s: CNI client: %s", self.node, exc)
        finally:
            writer.close()

    # -- calls ---------------------------------------------------------------------------
    async def handle(self, req: Any) -> dict[str, Any]:
        cmd = str(req.get("command", "")) if isinstance(req, dict) else ""
        self.calls[cmd] = self.calls.get(cmd, 0) + 1
        version = "1.1.0"
        t0 = asyncio.get_running_loop().time()
        code: str | None = None
        try:
            if not isinstance(req, dict):
                raise cni.CniError(cni.DECODING_FAILURE, "the request is not one vnet-cni sends (VNETCNI1)")
            if isinstance(req.get("config"), cni.CniError):
                raise req["config"]
            if cmd == "STATUS":
                conf_v = (req.get("config") or {}).get("cniVersion", version)
                version = conf_v if isinstance(conf_v, str) else version
                await self._status()
                return {"result": None}
            conf = cni.parse_conf(req.get("config"))
            version = conf.version
            if cmd == "ADD":
                return {"result": await self._add(req, conf)}
            if cmd == "DEL":
                await self._del(req, conf)
                return {"result": None}
            if cmd == "CHECK":
                await self._check(req, conf)
                return {"result": None}
            if cmd == "GC":
                await self._gc(conf)
                return {"result": None}
            raise cni.CniError(cni.INVALID_ENV, f"CNI_COMMAND {cmd!r} is not one of ADD, DEL, CHECK, STATUS, GC, "
                               "VERSION")
        except cni.CniError as err:
            code = f"cni_{err.code}"
            return {"error": err.result(version)}
        except E.VNetError as err:
            code = err.code
            return {"error": cni.from_vnet(err).result(version)}
        except Exception as exc:
            log.exception("node %s: CNI %s failed", self.node, cmd)
            code = "internal"
            return {"error": cni.CniError(cni.VNET_INTERNAL, f"vnet-cni {cmd} failed: {exc}").result(version)}
        finally:
            took = asyncio.get_running_loop().time() - t0
            self.took[cmd] = took
            self.rt.metrics.observe(f"cni.{cmd.lower() or 'unknown'}", took, code)

    async def _req(self, subject: subjects.Subject, payload: Any, reply: type[Any],
                   timeout: float | None = None) -> Any:
        rep, _ = await self.rt.adapters.request(subject, payload, reply, params={"node": self.node},
                                                timeout=timeout or self.rt.config.request_timeout_s)
        return rep

    @staticmethod
    def _env(req: dict[str, Any], *names: str) -> list[str]:
        out = []
        for n in names:
            v = req.get(n)
            if not isinstance(v, str) or not v:
                raise cni.CniError(cni.INVALID_ENV, f"CNI_{n.upper()} is missing or empty")
            out.append(v)
        return out

    async def _find(self, container: str, network: str, ifname: str | None) -> list[EndpointInfo]:
        page: EndpointPage = await self._req(subjects.ENDPOINT_RUNTIME_LIST,
                                             EndpointList(container=container, network=network, limit=1000),
                                             EndpointPage)
        return [e for e in page.endpoints if ifname is None or e.interface_name == ifname]

    def _attached(self, e: EndpointInfo) -> cni.Attached:
        v4 = f"{e.ip_address}/{e.prefix_len}" if e.ip_address and e.prefix_len else None
        v6 = f"{e.ipv6_address}/{e.prefix_len_v6}" if e.ipv6_address and e.prefix_len_v6 else None
        dns = self.rt.state.get("dns")
        servers = [g for g in (e.gateway, e.gateway_v6) if g] if dns is not None else []
        search = [f"{e.network_id}.{dns.domain}", dns.domain] if dns is not None else []
        return cni.Attached(ifname=e.interface_name, mac=e.mac_address, sandbox=e.netns, ipv4=v4,
                            gateway4=e.gateway, ipv6=v6, gateway6=e.gateway_v6, dns_servers=servers,
                            dns_search=search,
                            host_ifname=naming.veth_name(e.id) if e.driver in _VETH_DRIVERS else None)

    async def _wait_reported(self, eid: str, fut: asyncio.Future[EndpointStatusEvent], timeout: float,
                             recheck: tuple[str, str, str] | None = None) -> str | None:
        """The status the worker reported for ``eid`` (a state in the future's set); None past
        ``timeout``. ``recheck`` (container, network id, ifname): when no report came for
        ``RECHECK_S``, the record's status counts too (a report is an event and can be lost
        while the record still changes)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            while True:
                left = deadline - loop.time()
                if left <= 0:
                    return None
                try:
                    ev = await asyncio.wait_for(asyncio.shield(fut), min(left, RECHECK_S))
                    return ev.status
                except TimeoutError:
                    if recheck is None:
                        continue
                    found = [e for e in await self._find(*recheck) if e.id == eid]
                    if not found:
                        return "deleted"
                    if found[0].status != "pending":
                        return found[0].status
        finally:
            self.watch.done(eid, fut)

    async def _add(self, req: dict[str, Any], conf: cni.CniConf) -> dict[str, Any]:
        container, netns, ifname = self._env(req, "container_id", "netns", "ifname")
        if not await asyncio.to_thread(os.path.exists, netns):
            raise cni.CniError(cni.INVALID_ENV, f"CNI_NETNS {netns} does not exist")
        # A request id of this ADD's own: the create is idempotent per (container, network), so a
        # repeated ADD gets the first endpoint back, made by another request: that is the
        # conflict, found without a list request before every ADD.
        rid = f"cni-{uuid.uuid4().hex}"
        # a port mapping's protocol was checked against tcp/udp when the conf was parsed (core.cni): a str here
        create = EndpointCreate(container_id=container, network_id=conf.network, netns=netns, ifname=ifname,
                                labels=conf.labels, request_id=rid,
                                ports=[PortMapping(host_port=p.host_port, container_port=p.container_port,
                                                   protocol=p.protocol) for p in conf.ports])  # type: ignore[arg-type]
        ep: EndpointInfo = await self._req(subjects.ENDPOINT_RUNTIME_ATTACH, create, EndpointInfo)
        if ep.request_id != rid:
            raise cni.CniError(cni.VNET_CONFLICT, f"container {container} is already attached to network "
                               f"{conf.network} (endpoint {ep.id}): DEL it first", "vnet: conflict")
        # No wait in the service: this node's worker wires the endpoint from the created event
        # and reports it on our own status subject, which answers the ADD.
        fut = self.watch.expect(ep.id, frozenset({"ready", "failed"}))
        status = await self._wait_reported(ep.id, fut, ATTACH_WAIT_S, (container, ep.network_id, ifname))
        if status != "ready":
            why = (self.watch.seen[ep.id].reason if status == "failed" and ep.id in self.watch.seen
                   else f"still {status or 'pending'} after {ATTACH_WAIT_S:.0f} s")
            # nothing half-made: the record, the address and whatever the node wired go again
            await self._detach(container, ep.network_id, ifname, ep)
            raise cni.CniError(cni.VNET_FAILED, f"node {self.node} could not attach {container}: {why}",
                               f"vnet: {status or 'pending'}")
        ep = msgspec.structs.replace(ep, status="ready")
        self.attached[(container, conf.network, ifname)] = ep
        return cni.add_result(conf.version, self._attached(ep), conf.prev_result)

    async def _detach(self, container: str, network: str, ifname: str | None,
                      known: EndpointInfo | None = None) -> None:
        """Detach and wait for this node's worker to report the kernel side gone; ``known``: the
        endpoint as this node recorded it (its network by id: the service resolves no name)."""
        fut = None
        if known is not None:  # asked before the detach is sent: any report from now on is about it
            self.watch.seen.pop(known.id, None)
            fut = self.watch.expect(known.id, frozenset({"deleted", "failed"}))
            self._teardown_first(known)
        try:
            rep: RuntimeDetached = await self._req(
                subjects.ENDPOINT_RUNTIME_DETACH,
                RuntimeDetach(container_id=container, network_id=known.network_id if known else network,
                              ifname=ifname, wait=False),
                RuntimeDetached)
        finally:
            if known is not None and fut is not None:
                self.watch.done(known.id, fut)  # expected again below when it is the one detached
        if rep.deleted is None:
            return
        old = rep.deleted.endpoint
        if rep.deleted.warnings:
            log.info("node %s: CNI DEL %s: %s", self.node, container, "; ".join(rep.deleted.warnings))
        if known is None or known.id != old.id or fut is None or not fut.done():
            fut = self.watch.expect(old.id, frozenset({"deleted", "failed"}))
        assert fut is not None
        # the record is gone already: only the worker's report says the kernel side is
        status = await self._wait_reported(old.id, fut, DETACH_WAIT_S)
        if status != "deleted":  # the record and the address are gone; the next resync retries the kernel
            log.info("node %s: CNI DEL %s: endpoint %s not torn down yet (%s)", self.node, container, old.id,
                     status or "no report")

    def _teardown_first(self, ep: EndpointInfo) -> None:
        """The kernel side goes now, in parallel with the detach in the control plane: this
        node's worker gets the "deleted" work its event would bring (~10 ms later: the service
        resolves, deletes, publishes first). The event still comes and finds nothing left to
        do; a detach that fails leaves the record, and the next full resync wires it again."""
        worker: Any = self.rt.state.get("worker")
        if not TEARDOWN_FIRST or worker is None:  # no worker here: the event does it
            return
        worker.queue.put_nowait(worker._item(kind="endpoint", event="deleted", ident=ep.id, endpoint=ep))

    async def _del(self, req: dict[str, Any], conf: cni.CniConf) -> None:
        container, ifname = self._env(req, "container_id", "ifname")
        known = self.attached.pop((container, conf.network, ifname), None)
        try:
            await self._detach(container, conf.network, ifname, known)
        except E.VNetError as err:
            if err.code != E.NETWORK_NOT_FOUND.code:  # the network went first: nothing of ours is left
                if known is not None:
                    self.attached[(container, conf.network, ifname)] = known
                raise

    async def _check(self, req: dict[str, Any], conf: cni.CniConf) -> None:
        container, netns, ifname = self._env(req, "container_id", "netns", "ifname")
        found = await self._find(container, conf.network, ifname)
        if not found:
            raise cni.CniError(cni.UNKNOWN_CONTAINER, f"container {container} has no {ifname} in network "
                               f"{conf.network}")
        ep = found[0]
        if ep.status == "pending":
            # ADD answers on the worker's report; the record follows it a moment later
            status = await self._wait_reported(ep.id, self.watch.expect(ep.id, frozenset({"ready", "failed"})),
                                               ATTACH_WAIT_S, (container, ep.network_id, ifname))
            ep = msgspec.structs.replace(ep, status=status or "pending")
        if ep.status != "ready":
            raise cni.CniError(cni.VNET_FAILED, f"endpoint {ep.id} is {ep.status}: {ep.reason}")
        a = self._attached(ep)
        cni.check_prev(conf.prev_result, a)
        links = await asyncio.to_thread(_ip_json, netns, "addr", "show")
        dev = next((x for x in links if x.get("ifname") == ifname), None)
        if dev is None:
            raise cni.CniError(cni.VNET_FAILED, f"{netns} has no interface {ifname}")
        if str(dev.get("address", "")).lower() != ep.mac_address.lower():
            raise cni.CniError(cni.VNET_FAILED, f"{ifname} in {netns} has mac {dev.get('address')}, "
                               f"VNet has {ep.mac_address}")
        have = {f"{x['local']}/{x['prefixlen']}" for x in dev.get("addr_info", [])}
        for want in (a.ipv4, a.ipv6):
            if want and want not in have:
                raise cni.CniError(cni.VNET_FAILED, f"{ifname} in {netns} lacks {want}")

    async def _gc(self, conf: cni.CniConf) -> None:
        valid = set(conf.valid_attachments)
        page: EndpointPage = await self._req(subjects.ENDPOINT_RUNTIME_LIST,
                                             EndpointList(labels={cni.LABEL_NETWORK: conf.name}, limit=1000),
                                             EndpointPage)
        errors = []
        for e in page.endpoints:
            if (e.container_id, e.interface_name) in valid:
                continue
            try:
                await self._detach(e.container_id, e.network_id, e.interface_name)
                for key in [k for k, v in self.attached.items() if v.id == e.id]:
                    del self.attached[key]
                log.info("node %s: CNI GC removed %s (%s %s)", self.node, e.id, e.container_id, e.interface_name)
            except E.VNetError as err:
                errors.append(f"{e.container_id}/{e.interface_name}: {err.message}")
        if errors:
            raise cni.CniError(cni.VNET_INTERNAL, "GC could not remove: " + "; ".join(errors))

    async def _status(self) -> None:
        try:
            await self._req(subjects.ENDPOINT_RUNTIME_LIST, EndpointList(limit=1), EndpointPage, timeout=2.0)
        except E.VNetError as err:
            raise cni.CniError(cni.NOT_AVAILABLE, f"the VNet control plane does not answer node {self.node}: "
                               f"{err.message}", f"vnet: {err.code}") from None
