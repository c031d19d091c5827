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
* the mechanism, chosen by measurement (``docs/dataplane.md``): element deltas as one
  nfnetlink batch built here (:mod:`vnet.adapters.nfnl`, ~0.08 ms for an attach's) on a
  socket made in the host namespace; whole rulesets, reads, and any delta with an element
  that encoder does not write (intervals) through libnftables loaded in-process
  (:mod:`vnet.adapters.libnft`, ~0.3 ms for the same delta), run on a thread that enters
  the host namespace for the call; ``nft -f -`` in a child that enters it
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

The node worker's agent that keeps this node's ruleset here (fetches, attach deltas,
macvlan tables) is :class:`vnet.adapters.policy_agent.PolicyAgent`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec

from vnet.adapters import nfnl
from vnet.adapters.libnft import LibNft, NftCmdError
from vnet.adapters.libnft import available as libnft_available
from vnet.adapters.netlink.nsctx import ns_path
from vnet.core import errors as E
from vnet.core import nft as nftr
from vnet.core.dataplane_model import Support
from vnet.core.nft import FAMILIES, TABLE, render, render_delete
from vnet.core.policy import Ruleset

log = logging.getLogger(__name__)

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
                 state_file: str | Path | None = None, mechanism: str | None = None,
                 element_path: str = "nfnetlink") -> None:
        """``mechanism``: "libnftables" (default where the library loads) or "subprocess";
        ``element_path``: "nfnetlink" (element deltas as nfnetlink batches, where the mechanism
        is libnftables) or "script" (through the mechanism too)."""
        self.host_netns = host_netns
        self.nft = nft
        self.timeout = timeout
        if mechanism is None:
            mechanism = "libnftables" if libnft_available() else "subprocess"
        self.mechanism = mechanism
        # element deltas: an nfnetlink batch built here ("nfnetlink", with libnftables for
        # the rest), or the script through the mechanism ("script"); docs/dataplane.md
        self.element_path = element_path
        self._lib: LibNft | None = None
        self._nfsock: nfnl.NfnlSocket | None = None
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
            prev = self._have_rs if self._have is not None else None  # the fast path's base
            if prev is not None:
                # the fast path: only what differs from the last ruleset written is looked at
                changes, meta = nftr.delta_between(prev, rs)
            else:
                changes, meta = nftr.delta_changes(self._have or {}, rs)
            n = sum(len(gone) + len(new) for gone, new in changes.values())
            if n == 0:
                self._have_rs = rs
                return SyncResult(wrote=False, reason=f"unchanged ({reason})" if reason else "unchanged",
                                  duration=time.perf_counter() - t0)
            try:
                self.write_elements(changes, meta)
            except NftError as exc:  # our idea of the kernel was wrong: rewrite it whole
                return self._whole(rs, struct, f"delta refused ({exc.message[:200]})", t0)
            if prev is not None and self._have is not None:
                for key, (gone, new) in changes.items():
                    cur = self._have.setdefault(key, set())
                    cur -= gone
                    cur |= new
            else:
                self._have = {k: set(v) for k, v in nftr.elements(rs).items()}
            self._have_rs = rs
            self.deltas += 1
            return SyncResult(wrote=True, reason=reason or "delta", duration=time.perf_counter() - t0, elements=n)

    def write_elements(self, changes: nftr.Changes, meta: Mapping[tuple[str, str], nftr.SetDecl]) -> None:
        """One transaction of element changes: an nfnetlink batch (:mod:`vnet.adapters.nfnl`)
        when ``element_path`` is "nfnetlink" and every element is of a kind it encodes, else
        the script through the mechanism. :class:`NftError` when refused (nothing changed)."""
        with self._lock:
            if self.element_path == "nfnetlink" and self.mechanism == "libnftables":
                try:
                    msgs: list[nfnl.Message] | None = nfnl.element_batch(changes, meta, TABLE)
                except nfnl.Unsupported:
                    msgs = None
                sock = self._nfnl() if msgs else None
                if msgs and sock is not None:
                    try:
                        sock.send(msgs)
                    except OSError as exc:  # NfnlError (a refusal) included
                        raise NftError(f"nf_tables refused the element delta (nothing was changed): "
                                       f"{exc.strerror or exc}") from None
                    return
            self.execute(nftr.delta_script(changes, meta)[0])

    def _nfnl(self) -> nfnl.NfnlSocket | None:
        """The nfnetlink socket (made on first use); None, and deltas as scripts from then on,
        where it cannot be made."""
        if self._nfsock is None:
            lib = self._libnft()  # its namespace handle and thread make the socket
            try:
                self._nfsock = nfnl.NfnlSocket.open(lib.ns, lib.worker, self.timeout)
            except OSError as exc:
                log.warning("no nfnetlink socket in %s (%s): element deltas go through libnftables",
                            lib.ns.path, exc)
                self.element_path = "script"
                return None
        return self._nfsock

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
            sock, self._nfsock = self._nfsock, None
        if sock is not None:
            sock.close()
        if lib is not None:
            lib.close()


def empty_ruleset(node: str) -> Ruleset:
    """No endpoint, no network, no rule: our traffic is dropped (fail closed)."""
    return Ruleset(node=node, bridges=[], none_bridges=[], net_pairs=[], ports=[])
