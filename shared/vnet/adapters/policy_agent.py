"""The node worker's side of policy: this node's ruleset, fetched from the policy service or
computed here for an attach, kept in the kernel by :class:`~vnet.adapters.nftables.NftEnforcer`
(and by :class:`~vnet.adapters.mvnft.MacvlanEnforcer` in the containers of macvlan
endpoints). Usage and guarantees: :class:`PolicyAgent`'s docstring.
"""

from __future__ import annotations

import asyncio
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from vnet.adapters import nats as nats_adapter
from vnet.adapters.mvnft import MacvlanEnforcer, MvSyncResult
from vnet.adapters.nftables import NftEnforcer, NftError, SyncResult
from vnet.contracts import subjects
from vnet.contracts.policy import RulesetReply, RulesetRequest, join_ruleset
from vnet.core import errors as E
from vnet.core.dataplane_model import Support
from vnet.core.mvpolicy import MvLocal, MvPolicy
from vnet.core.policy import PolicyEndpoint, Ruleset

MV_RETRIES = 20  # deferred macvlan passes retried after an error, MV_RETRY_S apart
MV_RETRY_S = 0.25


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
