"""Apply the policy to one host namespace: element deltas, whole rulesets only when the
structure changes (one transaction either way).

::

    enf = NftEnforcer(host_netns="vt1-h1")     # None: the namespace this process runs in
    enf.support()                              # br_netfilter present and on? nft there?
    res = enf.sync_ruleset(rs)                 # a delta of set elements (or the whole ruleset
                                               # when its structure changed): one transaction
    res = enf.sync_ruleset(rs, check=True)     # + read the kernel back: drift repaired
    res.wrote, res.reason, res.elements        # False, "unchanged", 0 on a converged host
    res = enf.sync(script)                     # a whole rendered script (tests, tools)

Rules of the road:

* one transaction per change: a delta (``delete element`` / ``add element`` lines of
  :func:`vnet.core.nft.delta`) when the structure is the one in the kernel, else the
  whole script replacing ``table inet vnet`` and ``table bridge vnet`` (``table X;
  delete table X; table X {...}``) atomically — never one call per rule, and nobody
  else's table is touched;
* the mechanism, chosen by measurement (``docs/dataplane.md``): libnftables loaded
  in-process (:mod:`vnet.adapters.libnft`, ~0.1 ms per delta), run on a thread that
  enters the host namespace for the call; ``nft -f -`` in a child that enters it
  (``nsenter --net=<path>``, ~3 ms) where the library is missing;
* ``check=True`` (the periodic resync) reads our tables back and compares their
  structure with what the last whole apply left and their elements with the ruleset:
  a table deleted or altered by hand is restored, a converged host costs no write;
* fail static: nothing here removes our tables except an explicit :meth:`delete`;
  a stopping worker leaves the last ruleset enforcing.

Stateful filtering between ports of one bridge needs br_netfilter (DESIGN section 5,
method (a)): ``net.bridge.bridge-nf-call-iptables`` / ``-ip6tables`` = 1 in the host
namespace. :meth:`support` checks it; :meth:`enable_br_netfilter` sets it — in a
named test namespace always, in the process's own namespace only when asked to
(``allow_current_ns=True``: the production worker owns its host).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgspec

from vnet.adapters import nats as nats_adapter
from vnet.adapters.libnft import LibNft, NftCmdError
from vnet.adapters.libnft import available as libnft_available
from vnet.adapters.mvnft import MacvlanEnforcer, MvSyncResult
from vnet.adapters.netlink.nsctx import ns_path
from vnet.contracts import subjects
from vnet.contracts.policy import RulesetReply, RulesetRequest, join_ruleset
from vnet.core import errors as E
from vnet.core import nft as nftr
from vnet.core.dataplane_model import Support
from vnet.core.mvpolicy import MvLocal, MvPolicy
from vnet.core.nft import FAMILIES, TABLE, render, render_delete
from vnet.core.policy import PolicyEndpoint, Ruleset

MV_RETRIES = 20  # deferred macvlan passes retried after an error, MV_RETRY_S apart
MV_RETRY_S = 0.25
BR_NF = ("net/bridge/bridge-nf-call-iptables", "net/bridge/bridge-nf-call-ip6tables")


class NftError(E.VNetError):
    default = E.UNAVAILABLE


class SyncResult(msgspec.Struct, kw_only=True):
    wrote: bool
    reason: str  # "unchanged", "delta", "new ruleset", "new structure", "table missing", "table altered", ...
    duration: float
    version: str = ""
    elements: int = 0  # set/map elements a delta added or deleted
    whole: bool = False  # the whole ruleset was written (structure changed, first apply, drift)


def _canonical(doc: Any) -> str:
    """A table listing without handles and metainfo, for comparison."""
    def strip(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k != "handle"}
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x
    items = [i for i in doc.get("nftables", []) if "metainfo" not in i]
    return json.dumps(strip(items), sort_keys=True)


class NftEnforcer:
    """Our nftables tables in one host namespace (``None``: this process's namespace)."""

    def __init__(self, host_netns: str | None = None, *, nft: str = "nft", timeout: float = 20.0,
                 state_file: str | Path | None = None, mechanism: str | None = None) -> None:
        """``mechanism``: "libnftables" (default where the library loads) or "subprocess"."""
        self.host_netns = host_netns
        self.nft = nft
        self.timeout = timeout
        if mechanism is None:
            mechanism = "libnftables" if libnft_available() else "subprocess"
        self.mechanism = mechanism
        self._lib: LibNft | None = None
        self._lock = threading.RLock()  # one transaction at a time, whichever thread asks
        # the element path (sync_ruleset): the structure in the kernel and its elements
        self._struct: str | None = None  # nft.structure() of the last whole apply
        self._struct_readback: str | None = None  # its kernel listing without elements
        self._have: dict[tuple[str, str], set[str]] | None = None  # the elements our tables hold
        self._have_rs: Ruleset | None = None  # the ruleset they are exactly (fast deltas from it)
        self.deltas = 0
        self.wholes = 0
        # What the last apply wrote (script digest + canonical readback), kept across worker
        # restarts so a restarted worker adopts an intact ruleset instead of rewriting it.
        self.state_file = Path(state_file) if state_file is not None else None
        self._applied: str | None = None  # the script of the last successful apply
        self._readback: str | None = None  # canonical listing right after it
        self.applies = 0

    # -- plumbing --------------------------------------------------------------------
    def _prefix(self) -> list[str]:
        if self.host_netns is None:
            return []
        return ["nsenter", f"--net={ns_path(self.host_netns)}", "--"]

    def _run(self, args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(self._prefix() + args, input=stdin, capture_output=True, text=True,
                                  timeout=self.timeout, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise NftError(f"cannot run {args[0]}: {exc}") from exc

    # -- support ----------------------------------------------------------------------
    def support(self) -> Support:
        """nft present, and bridged IP traffic passing the inet hooks (br_netfilter on)."""
        if shutil.which(self.nft) is None:
            return Support(available=False, reason=f"{self.nft} is not installed")
        r = self._run(["cat", *(f"/proc/sys/{p}" for p in BR_NF)])
        if r.returncode != 0:
            return Support(available=False, reason="br_netfilter is not loaded (no /proc/sys/net/bridge): "
                           "connections between ports of one bridge cannot be tracked, so isolation "
                           "inside a network is not enforced statefully; load br_netfilter on the host")
        vals = r.stdout.split()
        if vals != ["1", "1"]:
            return Support(available=False, reason=f"bridge-nf-call-iptables/ip6tables are {vals} in the host "
                           "namespace; they must be 1 (enable_br_netfilter sets them)")
        return Support(available=True)

    def enable_br_netfilter(self, *, allow_current_ns: bool = False) -> None:
        """Turn on bridge-nf-call-iptables/ip6tables in the host namespace (per namespace)."""
        if self.host_netns is None and not allow_current_ns:
            raise NftError("refusing to write sysctls in this process's own namespace without allow_current_ns",
                           code=E.INVALID_REQUEST)
        for p in BR_NF:
            r = self._run(["sysctl", "-q", "-w", f"{p.replace('/', '.')}=1"])
            if r.returncode != 0:
                raise NftError(f"cannot set {p}: {r.stderr.strip() or r.stdout.strip()}")

    # -- apply / read ------------------------------------------------------------------
    def _libnft(self) -> LibNft:
        if self._lib is None:
            self._lib = LibNft(self.host_netns)
        return self._lib

    def execute(self, script: str) -> None:
        """One transaction through the chosen mechanism; :class:`NftError` with nft's
        message when refused (nothing changed then)."""
        with self._lock:
            if self.mechanism == "libnftables":
                try:
                    self._libnft().run(script)
                except NftCmdError as exc:
                    raise NftError(exc.message) from None
                return
            r = self._run([self.nft, "-f", "-"], stdin=script)
            if r.returncode != 0:
                msg = (r.stderr or r.stdout).strip()
                raise NftError(f"nft refused the ruleset (nothing was changed): {msg[:2000]}")

    def _list(self, fam: str) -> Any | None:
        if self.mechanism == "libnftables":
            return self._libnft().run_json(f"list table {fam} {TABLE}")
        r = self._run([self.nft, "-j", "list", "table", fam, TABLE])
        if r.returncode != 0:
            return None
        try:
            return json.loads(r.stdout)
        except ValueError:
            return None

    def apply(self, script: str) -> None:
        """One transaction; raises :class:`NftError` with nft's message (nothing changed then)."""
        with self._lock:
            self.execute(script)
            self.applies += 1
            self._applied = script
            self._readback = self.read()
            self._struct = self._struct_readback = self._have = self._have_rs = None  # the element path starts over
            self._save_state(script)

    @staticmethod
    def _digest(script: str) -> str:
        return hashlib.sha256(script.encode()).hexdigest()

    def _save_state(self, script: str) -> None:
        if self.state_file is None or self._readback is None:
            return
        try:
            self.state_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.state_file.with_suffix(".tmp")
            tmp.write_text(json.dumps({"sha256": self._digest(script), "readback": self._readback}))
            os.replace(tmp, self.state_file)
        except OSError:  # only costs a rewrite after the next restart
            pass

    def _saved(self, key: str, text: str) -> dict[str, Any] | None:
        """What the previous worker saved, if it was saved for exactly ``text`` (digest under ``key``)."""
        if self.state_file is None:
            return None
        try:
            saved = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(saved, dict) or saved.get(key) != self._digest(text):
            return None
        return saved

    def _adopt(self, script: str) -> bool:
        """After a restart: the kernel holds exactly what the previous worker applied for this
        very script (same digest, same canonical listing): take it over without writing."""
        saved = self._saved("sha256", script)
        if saved is None:
            return False
        now = self.read()
        if now is None or now != saved.get("readback"):
            return False
        self._applied, self._readback = script, now
        return True

    def read(self) -> str | None:
        """Canonical listing of our tables; ``None`` when one of them is missing."""
        parts: list[str] = []
        for fam in FAMILIES:
            doc = self._list(fam)
            if doc is None:
                return None
            parts.append(_canonical(doc))
        return "\n".join(parts)

    def listing(self) -> tuple[str, nftr.Elements] | None:
        """Our tables as (structure without elements, elements); ``None`` when one is missing."""
        docs = []
        for fam in FAMILIES:
            doc = self._list(fam)
            if doc is None:
                return None
            docs.append((fam, doc))
        return nftr.parse_listing(docs)

    # -- the element path ----------------------------------------------------------------
    def sync_ruleset(self, rs: Ruleset, *, check: bool = False) -> SyncResult:
        """Make our tables hold ``rs``: a delta of elements when the structure in the kernel
        is ``rs``'s, else the whole ruleset. ``check``: read the kernel back first (drift)."""
        t0 = time.perf_counter()
        with self._lock:
            struct = nftr.structure(rs)
            reason = ""
            if self._struct != struct:
                if self._struct is None and self._adopt_structure(struct):
                    reason = "adopted from the previous worker"
                else:
                    why = "first apply" if self._struct is None else "new structure"
                    return self._whole(rs, struct, why, t0)
            elif check:
                got = self.listing()
                if got is None:
                    return self._whole(rs, struct, "table missing", t0)
                if got[0] != self._struct_readback:
                    return self._whole(rs, struct, "table altered", t0)
                if self._have is not None and got[1] != self._have:
                    reason = "table altered"
                self._have = {k: set(v) for k, v in got[1].items()}
                self._have_rs = None
            if self._have_rs is not None and self._have is not None:
                # the fast path: only what differs from the last ruleset written is looked at
                script, n, changes = nftr.delta_between(self._have_rs, rs)
            else:
                script, n = nftr.delta(self._have or {}, rs)
                changes = None
            if n == 0:
                self._have_rs = rs
                return SyncResult(wrote=False, reason=f"unchanged ({reason})" if reason else "unchanged",
                                  duration=time.perf_counter() - t0)
            try:
                self.execute(script)
            except NftError as exc:  # our idea of the kernel was wrong: rewrite it whole
                return self._whole(rs, struct, f"delta refused ({exc.message[:200]})", t0)
            if changes is not None and self._have is not None:
                for key, (gone, new) in changes.items():
                    cur = self._have.setdefault(key, set())
                    cur -= gone
                    cur |= new
            else:
                self._have = {k: set(v) for k, v in nftr.elements(rs).items()}
            self._have_rs = rs
            self.deltas += 1
            return SyncResult(wrote=True, reason=reason or "delta", duration=time.perf_counter() - t0, elements=n)

    def _whole(self, rs: Ruleset, struct: str, reason: str, t0: float) -> SyncResult:
        self.execute(render(rs))
        self.applies += 1
        self.wholes += 1
        got = self.listing()
        self._struct = struct
        self._struct_readback = got[0] if got is not None else None
        self._have = {k: set(v) for k, v in nftr.elements(rs).items()}
        self._have_rs = rs
        self._applied = self._readback = None  # the script path starts over
        self._save_structure(struct)
        return SyncResult(wrote=True, reason=reason, duration=time.perf_counter() - t0, version=rs.version(),
                          whole=True, elements=sum(len(v) for v in self._have.values()))

    def _save_structure(self, struct: str) -> None:
        if self.state_file is None or self._struct_readback is None:
            return
        try:
            self.state_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.state_file.with_suffix(".tmp")
            tmp.write_text(json.dumps({"structure_sha256": self._digest(struct),
                                       "structure_readback": self._struct_readback}))
            os.replace(tmp, self.state_file)
        except OSError:  # only costs a rewrite after the next restart
            pass

    def _adopt_structure(self, struct: str) -> bool:
        """After a restart: the kernel holds the structure the previous worker applied for
        this very ruleset shape: take it over (its elements become what we have, so only
        a difference is written)."""
        saved = self._saved("structure_sha256", struct)
        if saved is None:
            return False
        got = self.listing()
        if got is None or got[0] != saved.get("structure_readback"):
            return False
        self._struct, self._struct_readback = struct, got[0]
        self._have, self._have_rs = {k: set(v) for k, v in got[1].items()}, None
        return True

    def sync(self, script: str, version: str = "") -> SyncResult:
        """Apply ``script`` unless it is what we applied last and our tables are intact."""
        t0 = time.perf_counter()
        if self._applied is None:
            if self._adopt(script):
                return SyncResult(wrote=False, reason="unchanged (adopted from the previous worker)",
                                  duration=time.perf_counter() - t0, version=version)
            reason = "first apply"
        elif script != self._applied:
            reason = "new ruleset"
        else:
            now = self.read()
            if now is None:
                reason = "table missing"
            elif now != self._readback:
                reason = "table altered"
            else:
                return SyncResult(wrote=False, reason="unchanged", duration=time.perf_counter() - t0,
                                  version=version)
        self.apply(script)
        return SyncResult(wrote=True, reason=reason, duration=time.perf_counter() - t0, version=version)

    async def async_sync(self, script: str, version: str = "") -> SyncResult:
        """:meth:`sync` off the event loop (the node worker's call)."""
        return await asyncio.to_thread(self.sync, script, version)

    def ensure_tables(self, node: str) -> bool:
        """Install the empty ruleset (every frame of a ``vne*`` port and every packet of a
        ``vnb-*`` bridge dropped) when our tables are missing; leave them when present.
        The node worker calls this before its first reconcile, so an endpoint created
        before the policy service answers is denied, never open. True when it wrote."""
        if self.read() is not None:
            return False  # a previous worker's ruleset keeps enforcing (fail static)
        self.apply(render(empty_ruleset(node)))
        return True

    def delete(self) -> None:
        """Remove our tables (explicit teardown only; never on worker exit)."""
        with self._lock:
            try:
                self.execute(render_delete())
            except NftError as exc:
                raise NftError(f"cannot delete our tables: {exc.message}") from None
            self._applied = self._readback = None
            self._struct = self._struct_readback = self._have = self._have_rs = None

    def close(self) -> None:
        """Release the libnftables context and its thread (the tables stay: fail static)."""
        with self._lock:
            lib, self._lib = self._lib, None
        if lib is not None:
            lib.close()


def empty_ruleset(node: str) -> Ruleset:
    """No endpoint, no network, no rule: our traffic is dropped (fail closed)."""
    return Ruleset(node=node, bridges=[], none_bridges=[], net_pairs=[], ports=[])


class PolicyAgent:
    """The node worker's side of policy: this node's ruleset, kept in the kernel by deltas.

    ::

        agent = PolicyAgent(nc, node="n1", host_netns=None)
        agent.start()                          # support check (+ br_netfilter on in a named test namespace)
        res = await agent.sync()               # fetch the whole ruleset from the policy service, check the
                                               # kernel, write the difference (start, rule/network events, resync)
        agent.note_added(ep, local=True, bridge=b)   # an attach, computed here (no round trip) ...
        agent.push()                           # ... and written as one element delta (in the worker's thread)

    :meth:`note_added` / :meth:`note_removed` change the target ruleset the way the
    engine would (:meth:`Ruleset.with_endpoint`); when they cannot (a network new to
    this host, a host port taken), they answer False and the caller fetches. A fetch
    that was under way while endpoints were noted is rebased on them, so a reply
    computed before an attach never takes its binding away. :meth:`push` writes the
    latest target whichever thread calls it, so two pushes never write an older
    state last.

    When the policy service cannot be reached, the last ruleset stays and is still
    checked against the kernel (a deleted or altered table of ours is restored): fail
    static, never open, never flushed.
    """

    def __init__(self, nc: Any, node: str, host_netns: str | None = None, *, timeout: float = 5.0,
                 state_dir: str | None = None, mechanism: str | None = None) -> None:
        self.nc = nc
        self.node = node
        self.enforcer = NftEnforcer(host_netns, mechanism=mechanism,
                                    state_file=Path(state_dir) / "nft-applied.json" if state_dir else None)
        self.timeout = timeout
        self.target: Ruleset | None = None  # what the kernel must hold (latest known)
        self.version = ""
        self.support_: Support | None = None
        self.syncs = 0
        self.wrote = 0
        self.deltas = 0
        self.fetches = 0
        self.last: SyncResult | None = None
        self.last_error = ""
        self._seq = 0
        # (seq, added, ep, local, bridge) noted while a fetch is on its way (to rebase its reply on)
        self._ops: list[tuple[int, bool, PolicyEndpoint, bool, str]] = []
        self._fetching = 0
        # macvlan endpoints: their tables in the container namespaces (vnet.core.mvpolicy), from the
        # same fetch and the same noted deltas; the worker says which endpoints are macvlan ones
        self.macvlan = MacvlanEnforcer(mechanism=mechanism)
        self.mv_target: MvPolicy | None = None
        self.mv_locals: dict[str, MvLocal] = {}
        self.locals_source: Callable[[], dict[str, MvLocal]] | None = None
        self.mv_last: MvSyncResult | None = None
        self._mv_pending: set[str] = set()  # macvlan endpoints noted added/removed since the last push
        self._mv_bg: ThreadPoolExecutor | None = None  # the other containers' deltas, off the attach path
        self._mv_bg_queued = False
        self._mv_retries = 0

    def start(self, *, enable: bool | None = None) -> Support:
        """Check support; turn br_netfilter on when it is off and ``enable`` (default: only
        for a named host namespace, never the process's own namespace unasked)."""
        sup = self.enforcer.support()
        if sup.available or shutil.which(self.enforcer.nft) is None:
            self.support_ = sup
            return sup
        if not sup.available and (enable if enable is not None else self.enforcer.host_netns is not None):
            try:
                self.enforcer.enable_br_netfilter(allow_current_ns=bool(enable))
            except NftError:
                pass
            sup = self.enforcer.support()
        self.support_ = sup
        return sup

    async def ensure_tables(self) -> bool:
        """:meth:`NftEnforcer.ensure_tables` off the event loop (before the first reconcile)."""
        return await asyncio.to_thread(self.enforcer.ensure_tables, self.node)

    # -- local deltas (event loop) -----------------------------------------------------------
    @staticmethod
    def _apply_op(rs: Ruleset, added: bool, ep: PolicyEndpoint, local: bool, bridge: str) -> Ruleset | None:
        return rs.with_endpoint(ep, local=local, bridge=bridge) if added else rs.without_endpoint(ep, local=local)

    def _note(self, added: bool, ep: PolicyEndpoint, local: bool, bridge: str) -> bool:
        if self.target is None:
            return False
        rs = self._apply_op(self.target, added, ep, local, bridge)
        if rs is None:
            return False
        self._refresh_locals()
        mv = self.mv_target
        if added and local and ep.id in self.mv_locals and (mv is None or mv.net(ep.network) is None):
            return False  # the first macvlan endpoint of its network here: the engine places it
        if mv is not None:
            self.mv_target = mv.with_endpoint(ep) if added else mv.without_endpoint(ep)
        if local and (ep.id in self.mv_locals or ep.id in self.macvlan._tables):
            self._mv_pending.add(ep.id)
        self._seq += 1
        if self._fetching:
            self._ops.append((self._seq, added, ep, local, bridge))
        self.target = rs
        return True

    def note_added(self, ep: PolicyEndpoint, *, local: bool, bridge: str = "") -> bool:
        """Add ``ep`` to the target (no kernel write yet); False: fetch the whole ruleset instead."""
        return self._note(True, ep, local, bridge)

    def note_removed(self, ep: PolicyEndpoint, *, local: bool) -> bool:
        """Remove ``ep`` from the target; False: fetch the whole ruleset instead."""
        return self._note(False, ep, local, "")

    def push(self) -> SyncResult | None:
        """Write the latest target as a delta (blocking: call it from a worker thread)."""
        rs = self.target
        if rs is None:
            return None
        with self.enforcer._lock:
            rs = self.target  # the latest, under the lock: never an older state written last
            assert rs is not None
            res = self.enforcer.sync_ruleset(rs)
            # on an attach's path only the endpoints it adds or removes; the others' deltas next
            pending, self._mv_pending = self._mv_pending, set()
            self._sync_macvlan(rs, check=False, only=pending)
        self._macvlan_later()
        self.syncs += 1
        self.wrote += int(res.wrote)
        self.deltas += int(res.wrote and not res.whole)
        self.last = res
        return res

    # -- whole-ruleset fetch -------------------------------------------------------------------
    async def sync(self, *, check: bool = True) -> SyncResult:
        """Fetch and apply; counted, and the error kept for the worker's stats."""
        try:
            res = await self._sync(check)
        except Exception as exc:
            self.last_error = str(exc)[:500]
            raise
        self.syncs += 1
        self.wrote += int(res.wrote)
        self.deltas += int(res.wrote and not res.whole)
        self.last, self.last_error = res, ""
        return res

    async def _fetch(self) -> RulesetReply:
        """The structured ruleset, every part of it (a node with thousands of endpoints gets
        it in parts); parts of two different versions (a change in between): fetch again."""
        for _ in range(3):
            parts: list[RulesetReply] = []
            while True:
                rep, _ = await nats_adapter.request(self.nc, subjects.POLICY_RULESET,
                                                    RulesetRequest(node=self.node, structured=True, part=len(parts)),
                                                    RulesetReply, timeout=self.timeout)
                parts.append(rep)
                if len(parts) >= rep.parts:
                    break
            try:
                return join_ruleset(parts)
            except ValueError:
                continue  # the ruleset changed between two of its parts: fetch it again
        raise E.make(E.UNAVAILABLE, f"the ruleset of node {self.node} changed while its parts were fetched, three "
                     "times; the next sync tries again")

    async def _sync(self, check: bool) -> SyncResult:
        seq0 = self._seq
        self._fetching += 1
        try:
            rep = await self._fetch()
        except E.VNetError as exc:
            self._fetching -= 1
            if not self._fetching:
                self._ops.clear()
            if self.target is None:
                raise
            res = await asyncio.to_thread(self._apply_target, check)
            res.reason = f"{res.reason}; policy service unavailable ({exc.code}): kept the last ruleset"
            return res
        except BaseException:
            self._fetching -= 1
            if not self._fetching:
                self._ops.clear()
            raise
        self._fetching -= 1
        self.fetches += 1
        if rep.ruleset is None:  # a policy service from before rulesets travelled structured
            return await self.enforcer.async_sync(rep.script, rep.version)
        rs = rep.ruleset
        mv = rep.macvlan
        # rebase: what was noted while the reply was on its way stays (idempotent on a reply
        # that already has it)
        for _, added, ep, local, bridge in [o for o in self._ops if o[0] > seq0]:
            nxt = self._apply_op(rs, added, ep, local, bridge)
            if nxt is not None:
                rs = nxt
            if mv is not None:
                mv = mv.with_endpoint(ep) if added else mv.without_endpoint(ep)
        self._ops = [o for o in self._ops if o[0] > seq0] if self._fetching else []
        self._refresh_locals()
        self.target, self.mv_target, self.version = rs, mv, rep.version
        return await asyncio.to_thread(self._apply_target, check)

    def _apply_target(self, check: bool) -> SyncResult:
        with self.enforcer._lock:
            rs = self.target
            assert rs is not None
            res = self.enforcer.sync_ruleset(rs, check=check)
            self._sync_macvlan(rs, check=check)
            return res

    # -- macvlan endpoints (their tables live in the container namespaces) ------------------
    def _macvlan_later(self) -> None:
        """The deltas of every other container (a new endpoint's address in its peers' sets), on
        a thread of their own: an attach does not wait for them. Coalesced: one pass at a time,
        always from the latest target."""
        if not self.mv_locals and not self.macvlan._tables:
            return
        with self.enforcer._lock:
            if self._mv_bg_queued:
                return
            self._mv_bg_queued = True
            if self._mv_bg is None:
                self._mv_bg = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"vnet-mv-{self.node}")
        self._mv_bg.submit(self._macvlan_pass)

    def _macvlan_pass(self) -> None:
        with self.enforcer._lock:
            self._mv_bg_queued = False
            rs = self.target
            if rs is None:
                return
            try:
                self._sync_macvlan(rs, check=False)
            except Exception as exc:  # the next sync tries again
                self.last_error = f"macvlan tables: {exc}"[:500]
            failed = self.mv_last is not None and bool(self.mv_last.errors)
            self._mv_retries = self._mv_retries + 1 if failed else 0
            retry = failed and self._mv_retries <= MV_RETRIES
        if retry:
            # e.g. a pair written before its interface existed on an older kernel: again soon,
            # not only at the next event or resync (a few times, then it is the resync's turn)
            t = threading.Timer(MV_RETRY_S, self._macvlan_later)
            t.daemon = True
            t.start()

    def wait_macvlan(self) -> None:
        """Until the deferred pass queued so far has run (tests, benchmarks)."""
        if self._mv_bg is not None:
            self._mv_bg.submit(lambda: None).result()

    def _refresh_locals(self) -> None:
        """On the event loop: which of the node's endpoints are macvlan ones, and where (a
        snapshot: the kernel thread reads it, never the worker's own dicts)."""
        if self.locals_source is not None:
            self.mv_locals = self.locals_source()

    def _sync_macvlan(self, rs: Ruleset, *, check: bool, only: set[str] | None = None) -> None:
        """In the kernel thread, under the enforcer's lock, after the host's tables: each macvlan
        endpoint's table pair (one transaction per endpoint whose sets changed; none converged);
        ``only``: just those endpoints (an attach's own pair, before its netlink work)."""
        locs = self.mv_locals
        if (not locs and not self.macvlan._tables) or only == set():
            return
        try:
            res = self.macvlan.sync(self.mv_target, rs, locs, check=check, only=only)
        except Exception as exc:  # never in the way of the host's tables; the next sync tries again
            self.last_error = f"macvlan tables: {exc}"[:500]
            return
        self.mv_last = res
        if res.errors:
            self.last_error = "; ".join(f"macvlan endpoint {k}: {v}" for k, v in sorted(res.errors.items()))[:500]
