"""libnftables in-process (ctypes), bound to one network namespace.

::

    nft = LibNft("vt1-h1")              # None: the namespace this process runs in
    nft.run("add element inet vnet s { 10.0.0.5 }")   # one transaction; NftCmdError on refusal
    doc = nft.run_json("list table inet vnet")        # parsed ``nft -j`` output
    nft.close()

Why: an ``nft`` process costs ~2.5 ms before it does anything (fork, exec, loading
the library, reading the cache), more than the whole element delta of an attach;
the same library loaded once answers a read in ~0.05 ms (figures in
``docs/dataplane.md``).

libnftables talks to the kernel through a netlink socket opened in the calling
thread's network namespace (and ``nft_ctx`` is not thread-safe), so every call runs
on ONE :class:`~vnet.adapters.netlink.nsctx.NsWorker` thread that enters the host
namespace for the call and comes back home — the same mechanism the netlink code
uses; this process never moves any other thread.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import threading
from typing import Any

from vnet.adapters.netlink.nsctx import Netns, NsWorker
from vnet.core import errors as E

NFT_CTX_DEFAULT = 0
NFT_CTX_OUTPUT_JSON = 1 << 4
LIBRARY = "libnftables.so.1"


class NftCmdError(E.VNetError):
    """nft refused a command (nothing of that transaction was changed)."""

    default = E.UNAVAILABLE


_lib: ctypes.CDLL | None = None
_lib_lock = threading.Lock()


def load() -> ctypes.CDLL:
    """The library, loaded once per process (raises OSError when it is not installed)."""
    global _lib
    with _lib_lock:
        if _lib is None:
            lib = ctypes.CDLL(ctypes.util.find_library("nftables") or LIBRARY, use_errno=True)
            lib.nft_ctx_new.restype = ctypes.c_void_p
            lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
            lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
            lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
            lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
            lib.nft_ctx_output_get_flags.restype = ctypes.c_uint
            lib.nft_ctx_output_get_flags.argtypes = [ctypes.c_void_p]
            lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
            lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
            _lib = lib
        return _lib


def available() -> bool:
    try:
        load()
    except OSError:
        return False
    return True


class LibNft:
    """One libnftables context living in namespace ``host_netns`` (see the module docstring)."""

    def __init__(self, host_netns: str | None = None) -> None:
        self.lib = load()
        self.ns = Netns.open(host_netns)
        self.worker = NsWorker()
        self.calls = 0
        try:
            self._ctx: int = self.worker.run(self.ns, self._new)
        except BaseException:
            self.worker.close()
            self.ns.close()
            raise

    def _new(self) -> int:
        ctx = self.lib.nft_ctx_new(NFT_CTX_DEFAULT)
        if not ctx:
            raise NftCmdError("libnftables: nft_ctx_new failed")
        self.lib.nft_ctx_buffer_output(ctx)
        self.lib.nft_ctx_buffer_error(ctx)
        return int(ctx)

    def _run(self, cmd: bytes, json_out: bool) -> tuple[int, str, str]:
        lib, ctx = self.lib, self._ctx
        base = lib.nft_ctx_output_get_flags(ctx) & ~NFT_CTX_OUTPUT_JSON
        lib.nft_ctx_output_set_flags(ctx, base | (NFT_CTX_OUTPUT_JSON if json_out else 0))
        rc = lib.nft_run_cmd_from_buffer(ctx, cmd)
        out = lib.nft_ctx_get_output_buffer(ctx) or b""
        err = lib.nft_ctx_get_error_buffer(ctx) or b""
        return rc, out.decode(errors="replace"), err.decode(errors="replace")

    def run_raw(self, cmd: str, *, json_out: bool = False) -> tuple[int, str, str]:
        """(return code, output, error text) of one command buffer (one transaction)."""
        if not self._ctx:
            raise NftCmdError("libnftables context is closed")
        data = cmd.encode()
        self.calls += 1
        return self.worker.run(self.ns, lambda: self._run(data, json_out))

    def run(self, cmd: str) -> str:
        rc, out, err = self.run_raw(cmd)
        if rc != 0:
            raise NftCmdError(f"nft refused the transaction (nothing was changed): {(err or out).strip()[:2000]}")
        return out

    def run_json(self, cmd: str) -> Any | None:
        """Parsed JSON output; ``None`` when nft refused (e.g. the table does not exist)."""
        rc, out, _ = self.run_raw(cmd, json_out=True)
        if rc != 0:
            return None
        try:
            return json.loads(out) if out.strip() else {}
        except ValueError:
            return None

    def close(self) -> None:
        ctx, self._ctx = self._ctx, 0
        if ctx:
            try:
                self.worker.run(self.ns, lambda: self.lib.nft_ctx_free(ctx))
            except Exception:  # the worker is going away anyway
                pass
        self.worker.close()
        self.ns.close()
