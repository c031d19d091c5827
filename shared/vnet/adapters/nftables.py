"""Apply the rendered policy to one host namespace with ``nft -f -`` (one transaction).

::

    enf = NftEnforcer(host_netns="vt1-h1")     # None: the namespace this process runs in
    enf.support()                              # br_netfilter present and on? nft there?
    res = enf.sync(script)                     # applies when new, or when our tables drifted
    res.wrote, res.reason                      # False, "unchanged" on a converged host

Rules of the road:

* one ``nft -f -`` per change: the script replaces ``table inet vnet`` and ``table
  bridge vnet`` (``table X; delete table X; table X {...}``) atomically — never one
  call per rule, and nobody else's table is touched;
* the namespace is entered by the child process (``nsenter --net=<path>``), never by
  this process or one of its threads;
* :meth:`sync` reads our tables back (``nft -j list table ...``) and compares them
  with what the last apply left; a table deleted or altered by hand is restored;
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
import time
from pathlib import Path
from typing import Any

import msgspec

from vnet.adapters import nats as nats_adapter
from vnet.adapters.netlink.nsctx import ns_path
from vnet.contracts import subjects
from vnet.contracts.policy import RulesetReply, RulesetRequest
from vnet.core import errors as E
from vnet.core.dataplane_model import Support
from vnet.core.nft import FAMILIES, TABLE, render, render_delete
from vnet.core.policy import FamilySets, Ruleset

BR_NF = ("net/bridge/bridge-nf-call-iptables", "net/bridge/bridge-nf-call-ip6tables")


class NftError(E.VNetError):
    default = E.UNAVAILABLE


class SyncResult(msgspec.Struct, kw_only=True):
    wrote: bool
    reason: str  # "unchanged", "new ruleset", "table missing", "table altered", "first apply"
    duration: float
    version: str = ""


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
                 state_file: str | Path | None = None) -> None:
        self.host_netns = host_netns
        self.nft = nft
        self.timeout = timeout
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
    def apply(self, script: str) -> None:
        """One transaction; raises :class:`NftError` with nft's message (nothing changed then)."""
        r = self._run([self.nft, "-f", "-"], stdin=script)
        if r.returncode != 0:
            msg = (r.stderr or r.stdout).strip()
            raise NftError(f"nft refused the ruleset (nothing was changed): {msg[:2000]}")
        self.applies += 1
        self._applied = script
        self._readback = self.read()
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

    def _adopt(self, script: str) -> bool:
        """After a restart: the kernel holds exactly what the previous worker applied for this
        very script (same digest, same canonical listing): take it over without writing."""
        if self.state_file is None:
            return False
        try:
            saved = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return False
        if not isinstance(saved, dict) or saved.get("sha256") != self._digest(script):
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
            r = self._run([self.nft, "-j", "list", "table", fam, TABLE])
            if r.returncode != 0:
                return None
            try:
                parts.append(_canonical(json.loads(r.stdout)))
            except ValueError:
                return None
        return "\n".join(parts)

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
        r = self._run([self.nft, "-f", "-"], stdin=render_delete())
        if r.returncode != 0:
            raise NftError(f"cannot delete our tables: {(r.stderr or r.stdout).strip()}")
        self._applied = self._readback = None


def empty_ruleset(node: str) -> Ruleset:
    """No endpoint, no network, no rule: our traffic is dropped (fail closed)."""
    return Ruleset(node=node, bridges=[], none_bridges=[], net_pairs=[], ports=[],
                   internal4=FamilySets(), internal6=FamilySets(), egress4=FamilySets(), egress6=FamilySets(),
                   ingress4=FamilySets(), ingress6=FamilySets())


class PolicyAgent:
    """The node worker's side of policy: fetch this node's ruleset, apply it, keep it.

    ::

        agent = PolicyAgent(nc, node="n1", host_netns=None)
        agent.start()                 # support check (+ br_netfilter on in a named test namespace)
        res = await agent.sync()      # on start, on policy/endpoint/network events, every resync

    When the policy service cannot be reached, the last ruleset stays and is still
    checked against the kernel (a deleted or altered table of ours is restored): fail
    static, never open, never flushed.
    """

    def __init__(self, nc: Any, node: str, host_netns: str | None = None, *, timeout: float = 5.0,
                 state_dir: str | None = None) -> None:
        self.nc = nc
        self.node = node
        self.enforcer = NftEnforcer(host_netns,
                                    state_file=Path(state_dir) / "nft-applied.json" if state_dir else None)
        self.timeout = timeout
        self.last_script: str | None = None
        self.version = ""
        self.support_: Support | None = None
        self.syncs = 0
        self.wrote = 0
        self.last: SyncResult | None = None
        self.last_error = ""

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

    async def sync(self) -> SyncResult:
        """Fetch and apply; counted, and the error kept for the worker's stats."""
        try:
            res = await self._sync()
        except Exception as exc:
            self.last_error = str(exc)[:500]
            raise
        self.syncs += 1
        self.wrote += int(res.wrote)
        self.last, self.last_error = res, ""
        return res

    async def _sync(self) -> SyncResult:
        try:
            rep, _ = await nats_adapter.request(self.nc, subjects.POLICY_RULESET, RulesetRequest(node=self.node),
                                                RulesetReply, timeout=self.timeout)
        except E.VNetError as exc:
            if self.last_script is None:
                raise
            res = await self.enforcer.async_sync(self.last_script, self.version)
            res.reason = f"{res.reason}; policy service unavailable ({exc.code}): kept the last ruleset"
            return res
        res = await self.enforcer.async_sync(rep.script, rep.version)
        self.last_script, self.version = rep.script, rep.version
        return res
