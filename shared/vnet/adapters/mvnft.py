"""Apply the macvlan tables (:mod:`vnet.core.mvpolicy`) inside the container namespaces.

::

    enf = MacvlanEnforcer()
    res = enf.sync(mv, rs, {ep_id: MvLocal(...)})          # a delta per endpoint whose sets changed,
                                                           # the table pair whole when its structure did
    res = enf.sync(mv, rs, locals_, check=True)            # + read each pair back: drift repaired
    res.writes, res.wholes, res.deltas, res.removed        # 0 transactions on a converged host
    enf.close()

One transaction per endpoint and change (both tables of an endpoint in one buffer);
an endpoint no longer given has its two tables deleted (its namespace may be gone:
nothing to do then). libnftables runs in-process on ONE :class:`NsWorker` thread
that enters the container's namespace for each call (one context per namespace, the
same mechanism as :mod:`vnet.adapters.libnft`); ``nft -f -`` under ``nsenter`` where
the library does not load. Nothing here touches a table that is not ours
(``vnetm_<hash>``), and nothing is removed on exit (fail static).
"""

from __future__ import annotations

import ctypes
import json
import subprocess
import threading
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from vnet.adapters import libnft
from vnet.adapters.netlink.nsctx import Netns, NsWorker, ns_path
from vnet.core import errors as E
from vnet.core import mvpolicy as mvp
from vnet.core import nft as nftr
from vnet.core.mvpolicy import MvLocal, MvPolicy
from vnet.core.policy import Ruleset


class MvNftError(E.VNetError):
    default = E.UNAVAILABLE


@dataclass
class MvSyncResult:
    writes: int = 0  # transactions written
    wholes: int = 0  # of which whole table pairs
    deltas: int = 0
    elements: int = 0
    removed: int = 0  # endpoints whose tables were deleted
    adopted: int = 0  # pairs found intact (a previous worker's) and kept without a write
    errors: dict[str, str] = field(default_factory=dict)  # endpoint -> why its tables are not right
    duration: float = 0.0


@dataclass
class _Table:
    netns: str
    ident: tuple[int, int]
    struct: str  # mvpolicy.structure() of the last whole write
    readback: str | None  # the structure listing it must have, normalized (None: not read yet)
    have: dict[tuple[str, str], frozenset[str]]
    loc: MvLocal


class _NsCtx:
    """A libnftables context living in one container namespace (calls on the shared worker)."""

    def __init__(self, worker: NsWorker, ref: str) -> None:
        self.lib = libnft.load()
        self.worker = worker
        self.ns = Netns.open(ref)
        self.ctx = 0
        try:
            self.ctx = self.worker.run(self.ns, self._new)
        except BaseException:
            self.ns.close()
            raise

    def _new(self) -> int:
        ctx = self.lib.nft_ctx_new(libnft.NFT_CTX_DEFAULT)
        if not ctx:
            raise MvNftError("libnftables: nft_ctx_new failed")
        self.lib.nft_ctx_buffer_output(ctx)
        self.lib.nft_ctx_buffer_error(ctx)
        return int(ctx)

    def run(self, cmd: str, json_out: bool = False) -> tuple[int, str, str]:
        lib, data = self.lib, cmd.encode()

        def call() -> tuple[int, str, str]:
            # Read the context here, on the worker thread that also frees it: a close() from
            # another thread (the container went) may have queued the free before this call,
            # and a context captured earlier would then be used after free (libnftables aborted
            # the whole process once in CI).
            ctx = self.ctx
            if not ctx:
                raise MvNftError("the container namespace's nftables context is closed (the endpoint went)")
            base = lib.nft_ctx_output_get_flags(ctx) & ~libnft.NFT_CTX_OUTPUT_JSON
            lib.nft_ctx_output_set_flags(ctx, base | (libnft.NFT_CTX_OUTPUT_JSON if json_out else 0))
            rc = lib.nft_run_cmd_from_buffer(ctx, data)
            out = lib.nft_ctx_get_output_buffer(ctx) or b""
            err = lib.nft_ctx_get_error_buffer(ctx) or b""
            return int(rc), out.decode(errors="replace"), err.decode(errors="replace")

        return self.worker.run(self.ns, call)

    def close(self) -> None:
        ctx, self.ctx = self.ctx, 0
        if ctx:
            try:
                self.worker.run(self.ns, lambda: self.lib.nft_ctx_free(ctypes.c_void_p(ctx)))
            except Exception:  # the namespace or the worker is going away anyway
                pass
        self.ns.close()


def _ident(ref: str) -> tuple[int, int] | None:
    import os
    try:
        st = os.stat(ns_path(ref))
    except OSError:
        return None
    return st.st_dev, st.st_ino


class MacvlanEnforcer:
    """The ``vnetm_*`` tables of this host's macvlan endpoints (see the module docstring)."""

    def __init__(self, *, mechanism: str | None = None, nft: str = "nft", timeout: float = 20.0) -> None:
        if mechanism is None:
            mechanism = "libnftables" if libnft.available() else "subprocess"
        self.mechanism = mechanism
        self.nft = nft
        self.timeout = timeout
        self._lock = threading.RLock()
        self._worker: NsWorker | None = None
        self._ctxs: dict[str, _NsCtx] = {}
        self._tables: dict[str, _Table] = {}
        # normalized structure listings, one per (rules, interface name): written once into a
        # scratch namespace, so a pair is checked (and a previous worker's adopted) by comparison
        self._refs: dict[str, str | None] = {}
        self._seen_ns: set[tuple[int, int]] = set()  # container namespaces already swept for strays
        self.transactions = 0

    # -- plumbing ------------------------------------------------------------------------
    def _ctx(self, ref: str) -> _NsCtx:
        c = self._ctxs.get(ref)
        if c is not None and not c.ns.still_there():
            c.close()
            c = None
        if c is None:
            if self._worker is None:
                self._worker = NsWorker()
            c = self._ctxs[ref] = _NsCtx(self._worker, ref)
        return c

    def _exec(self, ref: str, script: str) -> None:
        self.transactions += 1
        if self.mechanism == "libnftables":
            rc, out, err = self._ctx(ref).run(script)
            if rc != 0:
                raise MvNftError(f"nft refused the transaction in {ref} (nothing was changed): "
                                 f"{(err or out).strip()[:2000]}")
            return
        r = self._sub(ref, [self.nft, "-f", "-"], script)
        if r.returncode != 0:
            raise MvNftError(f"nft refused the transaction in {ref} (nothing was changed): "
                             f"{(r.stderr or r.stdout).strip()[:2000]}")

    def _sub(self, ref: str, args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(["nsenter", f"--net={ns_path(ref)}", "--", *args], input=stdin, text=True,
                                  capture_output=True, timeout=self.timeout, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise MvNftError(f"cannot run {args[0]} in {ref}: {exc}") from exc

    def _list(self, ref: str, fam: str, name: str) -> Any | None:
        cmd = f"list table {fam} {name}"
        if self.mechanism == "libnftables":
            rc, out, _ = self._ctx(ref).run(cmd, json_out=True)
        else:
            r = self._sub(ref, [self.nft, "-j", *cmd.split()])
            rc, out = r.returncode, r.stdout
        if rc != 0:
            return None
        try:
            return json.loads(out) if out.strip() else {}
        except ValueError:
            return None

    def listing(self, ref: str, endpoint: str) -> tuple[str, nftr.Elements] | None:
        """An endpoint's two tables as (structure without elements, elements); None when one is missing."""
        name = mvp.table_name(endpoint)
        docs = []
        for fam in mvp.FAMILIES:
            doc = self._list(ref, fam, name)
            if doc is None:
                return None
            docs.append((fam, _without_devices(doc)))
        return nftr.parse_listing(docs)

    # -- reference listings --------------------------------------------------------------
    def _reference(self, rs: Ruleset, loc: MvLocal) -> str | None:
        """What the kernel lists for this pair's structure (normalized: table name and endpoint
        id replaced), from one write of it into an anonymous scratch namespace (it vanishes with
        its handle); None where that cannot be done (the nft-process mechanism, an old kernel)."""
        ref_loc = loc._replace(endpoint=REF)
        key = mvp.structure(rs, ref_loc)
        if key in self._refs:
            return self._refs[key]
        got: str | None = None
        if self.mechanism == "libnftables":
            try:
                got = self._scratch_listing(mvp.render(None, rs, ref_loc), mvp.table_name(REF))
            except Exception:  # no adoption then: a pair without state is written whole
                got = None
        if len(self._refs) >= 16:  # one per rule structure and interface name; old ones go
            self._refs.clear()
        self._refs[key] = got
        return got

    def _scratch_listing(self, script: str, name: str) -> str:
        if self._worker is None:
            self._worker = NsWorker()
        lib = libnft.load()

        def job() -> list[tuple[str, Any]]:
            ctx = lib.nft_ctx_new(libnft.NFT_CTX_DEFAULT)
            if not ctx:
                raise MvNftError("libnftables: nft_ctx_new failed")
            try:
                lib.nft_ctx_buffer_output(ctx)
                lib.nft_ctx_buffer_error(ctx)
                if lib.nft_run_cmd_from_buffer(ctx, script.encode()) != 0:
                    err = (lib.nft_ctx_get_error_buffer(ctx) or b"").decode(errors="replace")
                    raise MvNftError(f"the reference tables were refused: {err.strip()[:500]}")
                lib.nft_ctx_get_output_buffer(ctx)  # empties it: only the listings below are read
                docs = []
                base = lib.nft_ctx_output_get_flags(ctx)
                lib.nft_ctx_output_set_flags(ctx, base | libnft.NFT_CTX_OUTPUT_JSON)
                for fam in mvp.FAMILIES:
                    if lib.nft_run_cmd_from_buffer(ctx, f"list table {fam} {name}".encode()) != 0:
                        raise MvNftError("the reference tables cannot be listed")
                    docs.append((fam, json.loads((lib.nft_ctx_get_output_buffer(ctx) or b"{}").decode())))
                return docs
            finally:
                lib.nft_ctx_free(ctypes.c_void_p(ctx))

        ns, docs = self._worker.run_in_new(job)
        ns.close()
        return nftr.parse_listing([(fam, _without_devices(doc)) for fam, doc in docs])[0]

    # -- sync ------------------------------------------------------------------------------
    def sync(self, mv: MvPolicy | None, rs: Ruleset, locals_: Mapping[str, MvLocal], *,
             check: bool = False, only: Collection[str] | None = None) -> MvSyncResult:
        """Make every endpoint's tables hold the policy (``check``: read each pair back first).
        ``only``: just these endpoints — the ones an attach or detach adds or removes, on its
        path — with the read-back of a new pair left to the next full sync (which the caller
        runs right after, off that path: it also writes the other containers' deltas)."""
        t0 = time.perf_counter()
        res = MvSyncResult()
        with self._lock:
            for eid in sorted(set(self._tables) - set(locals_)):
                if only is None or eid in only:
                    self._remove(eid, res)
            ix = mvp.MvIndex(mv)
            self._strays(locals_, res)
            for eid in sorted(locals_):
                if only is not None and eid not in only:
                    continue
                try:
                    self._one(mv, rs, locals_[eid], check, res, ix, readback=only is None)
                except Exception as exc:  # this endpoint alone; the next sync tries again
                    self._tables.pop(eid, None)
                    res.errors[eid] = str(getattr(exc, "message", exc))[:500]
        res.duration = time.perf_counter() - t0
        return res

    def _strays(self, locals_: Mapping[str, MvLocal], res: MvSyncResult) -> None:
        """The first time a container namespace is seen (an attach, a restart): tables of ours
        for endpoints that are not there any more (removed while no worker ran) are deleted —
        left, their ``iifname``/``oifname`` chains would govern the next interface of that name."""
        by_ns: dict[str, set[str]] = {}
        for loc in locals_.values():
            by_ns.setdefault(loc.netns, set()).add(mvp.table_name(loc.endpoint))
        for ref, mine in by_ns.items():
            ident = _ident(ref)
            if ident is None or ident in self._seen_ns:
                continue
            self._seen_ns.add(ident)
            try:
                doc = self._list_tables(ref)
            except Exception as exc:  # a namespace going away as we look: its tables go with it
                res.errors[f"stray tables in {ref}"] = str(getattr(exc, "message", exc))[:500]
                continue
            stray = sorted({(t.get("family"), t.get("name")) for t in doc
                            if str(t.get("name", "")).startswith(mvp.TABLE_PREFIX) and t.get("name") not in mine
                            and t.get("family") in mvp.FAMILIES})
            if not stray:
                continue
            try:
                self._exec(ref, "".join(f"delete table {f} {n}\n" for f, n in stray))
                res.writes += 1
                res.removed += len({n for _, n in stray})
            except MvNftError as exc:
                res.errors[f"stray tables in {ref}"] = exc.message[:500]

    def _list_tables(self, ref: str) -> list[dict[str, Any]]:
        if self.mechanism == "libnftables":
            rc, out, _ = self._ctx(ref).run("list tables", json_out=True)
        else:
            r = self._sub(ref, [self.nft, "-j", "list", "tables"])
            rc, out = r.returncode, r.stdout
        if rc != 0:
            return []
        try:
            doc = json.loads(out) if out.strip() else {}
        except ValueError:
            return []
        return [i["table"] for i in doc.get("nftables", []) if isinstance(i, dict) and isinstance(i.get("table"), dict)]

    def _one(self, mv: MvPolicy | None, rs: Ruleset, loc: MvLocal, check: bool, res: MvSyncResult,
             ix: mvp.MvIndex, *, readback: bool = True) -> None:
        ident = _ident(loc.netns)
        if ident is None:
            raise MvNftError(f"network namespace {loc.netns} of endpoint {loc.endpoint} does not exist",
                             code=E.NOT_FOUND)
        struct = mvp.structure(rs, loc)
        ref = self._reference(rs, loc)
        t = self._tables.get(loc.endpoint)
        if t is not None and (t.ident != ident or t.netns != loc.netns or t.loc.ifname != loc.ifname):
            t = None  # another namespace (re-created) or interface: start over there
        if t is None and ref is not None:  # a previous worker's pair, intact: adopt it (no write)
            got = self.listing(loc.netns, loc.endpoint)
            if got is not None and _normalize(got[0], loc.endpoint) == ref:
                t = self._tables[loc.endpoint] = _Table(netns=loc.netns, ident=ident, struct=struct, readback=ref,
                                                        have=dict(got[1]), loc=loc)
                res.adopted += 1
                check = False  # just read
        if t is None or t.struct != struct:
            self._whole(mv, rs, loc, struct, ident, res, readback=readback, ref=ref)
            return
        if t.readback is None and readback:  # written on an attach's path: its reference listing now
            got = self.listing(loc.netns, loc.endpoint)
            if got is None:
                self._whole(mv, rs, loc, struct, ident, res)
                return
            t.readback, t.have = _normalize(got[0], loc.endpoint), dict(got[1])
        elif check:
            got = self.listing(loc.netns, loc.endpoint)
            if got is None or _normalize(got[0], loc.endpoint) != t.readback:
                self._whole(mv, rs, loc, struct, ident, res, ref=ref)
                return
            t.have = {k: frozenset(v) for k, v in got[1].items()}
        sets = mvp.decls(mv, rs, loc, ix)
        want = {(d.family, d.name): frozenset(nftr.canon(x) for x in d.elements) for d in sets}
        t.loc = loc
        if want == t.have:
            return
        script, n = mvp.delta(t.have, want, sets, loc.endpoint)
        try:
            self._exec(loc.netns, script)
        except MvNftError:  # our idea of the kernel was wrong: the pair again, whole
            self._whole(mv, rs, loc, struct, ident, res)
            return
        t.have = want
        res.writes += 1
        res.deltas += 1
        res.elements += n

    def _whole(self, mv: MvPolicy | None, rs: Ruleset, loc: MvLocal, struct: str, ident: tuple[int, int],
               res: MvSyncResult, *, readback: bool = True, ref: str | None = None) -> None:
        try:
            self._exec(loc.netns, mvp.render(mv, rs, loc))
        except MvNftError as exc:
            # A kernel before 6.16 refuses a netdev chain for an interface that does not exist
            # yet (an attach writes before its netlink work): isolation now, alone, and the pair
            # again at the next sync (the agent retries soon after an error), anti-spoofing then.
            name = mvp.table_name(loc.endpoint)
            try:
                self._exec(loc.netns, f"table inet {name}\ndelete table inet {name}\n"
                           + mvp.render_inet(rs, loc, mvp.decls(mv, rs, loc)))
            except MvNftError:
                raise exc from None
            raise MvNftError(f"isolation in place, anti-spoofing not yet (retried): {exc.message}") from None
        if ref is not None or not readback:  # what was written is what we hold (the listing it must
            # have is the reference, or is read at the next full sync)
            self._tables[loc.endpoint] = _Table(netns=loc.netns, ident=ident, struct=struct, readback=ref,
                                                have=mvp.elements(mv, rs, loc), loc=loc)
        else:
            got = self.listing(loc.netns, loc.endpoint)
            if got is None:
                raise MvNftError(f"the tables of endpoint {loc.endpoint} are missing right after they were written")
            self._tables[loc.endpoint] = _Table(netns=loc.netns, ident=ident, struct=struct,
                                                readback=_normalize(got[0], loc.endpoint), have=dict(got[1]), loc=loc)
        res.writes += 1
        res.wholes += 1

    def _remove(self, eid: str, res: MvSyncResult) -> None:
        t = self._tables.pop(eid)
        if _ident(t.netns) != t.ident:
            self._drop_ctx(t.netns)
            return  # the namespace went, and our tables with it
        try:
            self._exec(t.netns, mvp.render_delete(eid))
            res.writes += 1
            res.removed += 1
        except MvNftError as exc:
            res.errors[eid] = f"cannot delete its tables: {exc.message}"[:500]
        if not any(x.netns == t.netns for x in self._tables.values()):
            self._drop_ctx(t.netns)

    def _drop_ctx(self, ref: str) -> None:
        c = self._ctxs.pop(ref, None)
        if c is not None:
            c.close()

    def close(self) -> None:
        """Release the contexts and the thread (the tables stay: fail static)."""
        with self._lock:
            for ref in list(self._ctxs):
                self._drop_ctx(ref)
            w, self._worker = self._worker, None
        if w is not None:
            w.close()


REF = "vnet-reference"  # the endpoint id of the reference tables (a scratch namespace's)


def _normalize(listing: str, endpoint: str) -> str:
    """A pair's structure listing with its table name and endpoint id replaced by the
    reference's: every endpoint with the same rules and interface name lists the same."""
    return (listing.replace(mvp.table_name(endpoint), mvp.table_name(REF))
            .replace(f"endpoint {endpoint};", f"endpoint {REF};"))


def _without_devices(doc: Any) -> Any:
    """A netdev chain lists its device only while the device exists (the hook binds when
    it appears): leave it out so a table written before its interface compares equal."""
    items = doc.get("nftables", []) if isinstance(doc, dict) else []
    out = []
    for it in items:
        ch = it.get("chain") if isinstance(it, dict) else None
        if isinstance(ch, dict) and ("dev" in ch or "device" in ch):
            ch = {k: v for k, v in ch.items() if k not in ("dev", "device")}
            it = {"chain": ch}
        out.append(it)
    return {"nftables": out}
