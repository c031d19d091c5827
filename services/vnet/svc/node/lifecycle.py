"""A node's defaults (state directory, WireGuard interface) and its teardown.

**Defaults.** ``node_state_dir`` (the WireGuard private key, the nftables state of the
last apply, the sub-interface ledger) defaults to ``$VNET_STATE_DIR/nodes/<node>`` when
``VNET_STATE_DIR`` is set, else ``/var/lib/vnet/nodes/<node>`` for root and
``$XDG_STATE_HOME/vnet/nodes/<node>`` (``~/.local/state/vnet/nodes/<node>``) for anyone
else (under the test suite, ``VNET_RUN_PREFIX`` set: ``/tmp/<prefix>-nodes/<node>``): one
directory per node, so several node workers on one machine never share keys
or ledgers. The WireGuard interface defaults to :func:`vnet.core.naming.wg_name` of the
node id (``vnw-`` + 10 hex), unique per node, because wireguard-go's control socket
``/var/run/wireguard/<ifname>.sock`` is shared by every namespace of the machine.

**Teardown** (:func:`teardown_host`) removes everything the node made, going on past
errors and reporting all of them (netavark's rule):

1. every bridge, veth, VXLAN device and macvlan shim of ours in the host namespace, and
   every macvlan/ipvlan endpoint of the sub-interface ledger in its container namespace
   (:meth:`Reconciler.teardown`; a veth's container end goes with its host end), with the
   nftables tables a macvlan endpoint has inside its container (vnet.core.mvpolicy);
2. the WireGuard mesh: wireguard-go (and its guard) stopped whoever started it, the
   interface deleted, the control socket removed;
3. our nftables tables in the host namespace, and the saved state of the last apply;
4. the ledger (it goes with its last entry).

It keeps the node's WireGuard key pair (its identity: delete the state directory to
forget it) and host sysctls (forwarding, br_netfilter: other software may rely on them).
The records in the control plane stay: a worker started again on this host rebuilds
what they describe. Two ways to run it: ``vnetctl node teardown NODE`` asks the running
worker over NATS (``vnet.node.<node>.teardown``: it stops reconciling first, so nothing
is rebuilt, deregisters, tears down and stays up answering health as "torn down" until
its process is stopped); ``vnet-node --teardown`` does it locally, with the worker
stopped (a node whose bus is gone, or whose worker will not start).
"""

from __future__ import annotations

import logging
import os
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from vnet.contracts.endpoint import TeardownReply
from vnet.core import errors as E
from vnet.core import naming
from vnet.core.plan import Departed
from vnet.runtime.config import VNetConfig

log = logging.getLogger(__name__)

NFT_STATE = "nft-applied.json"  # NftEnforcer's saved state (vnet.adapters.policy_agent.PolicyAgent)


def default_state_root(env: Mapping[str, str] | None = None) -> Path:
    """Where node state directories live when ``node_state_dir`` is not set."""
    env = os.environ if env is None else env
    if env.get("VNET_STATE_DIR"):
        return Path(env["VNET_STATE_DIR"]).expanduser() / "nodes"
    if env.get("VNET_RUN_PREFIX"):
        # Test-safety latch (as for the data plane, worker.dataplane_mode): a test run never
        # writes below /var/lib or a home directory; tests/conftest.py removes this at the end.
        return Path(tempfile.gettempdir()) / f"{env['VNET_RUN_PREFIX']}-nodes"
    if os.geteuid() == 0:
        return Path("/var/lib/vnet/nodes")
    base = env.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base).expanduser() / "vnet" / "nodes"


def state_dir(config: VNetConfig, node: str, env: Mapping[str, str] | None = None) -> str:
    """This node's state directory: ``node_state_dir``, else one of its own (module docstring)."""
    if config.node_state_dir:
        return config.node_state_dir
    return str(default_state_root(env) / node.replace("/", "_"))


def wg_ifname(params: Mapping[str, str], node: str) -> str:
    """The WireGuard interface: ``--wg-ifname``, else the node's own default name."""
    name = params.get("wg_ifname") or naming.wg_name(node)
    try:
        return naming.check_ifname(name)
    except naming.InvalidName as exc:
        raise E.make(E.INVALID_CONFIG, f"--wg-ifname: {exc}") from None


def teardown_host(host_netns: str | None, node: str, state: str, ifname: str, *, rec: Any = None,
                  enforcer: Any = None) -> TeardownReply:
    """Remove everything node ``node`` made in ``host_netns`` (blocking; module docstring).
    ``rec``/``enforcer``: the running worker's reconciler and nftables enforcer, else new
    ones (they read the ledger and the saved state from ``state``)."""
    from vnet.runtime.node_wiring import NftError, nft_enforcer
    from vnet.svc.node.reconcile import SUBIF_LEDGER, Reconciler, read_ledger

    t0 = time.perf_counter()
    removed: list[str] = []
    errors: list[str] = []
    own_rec = rec is None
    if rec is None:
        rec = Reconciler(host_netns, node_name=node, state_dir=state)
    try:
        try:  # before the ledger empties: it says which containers hold macvlan tables
            r, e = drop_macvlan_tables(read_ledger(Path(state) / SUBIF_LEDGER).values())
            removed += r
            errors += e
        except Exception as exc:
            errors.append(f"macvlan endpoints' nftables tables: {type(exc).__name__}: {exc}")
        try:
            r, e = rec.teardown()
            removed += r
            errors += e
        except Exception as exc:  # go on: the other steps do not depend on this one
            errors.append(f"interfaces: {type(exc).__name__}: {exc}")
        try:
            r, e = rec.wireguard.teardown(ifname)
            removed += r
            errors += e
        except Exception as exc:
            errors.append(f"WireGuard {ifname}: {type(exc).__name__}: {exc}")
    finally:
        if own_rec:
            rec.close()
    nft_state = Path(state) / NFT_STATE
    own_enf = enforcer is None
    try:
        if enforcer is None:
            enforcer = nft_enforcer(host_netns, state_file=nft_state)
        if enforcer.read() is not None:
            enforcer.delete()
            removed.append("nftables tables")
    except NftError as exc:
        errors.append(f"nftables: {exc.message}")
    except Exception as exc:
        errors.append(f"nftables: {type(exc).__name__}: {exc}")
    finally:
        if own_enf and enforcer is not None:
            enforcer.close()
    try:  # the ledger went with its last entry (an entry left names an endpoint not removed)
        nft_state.unlink(missing_ok=True)
    except OSError as exc:
        errors.append(f"cannot remove {nft_state}: {exc}")
    return TeardownReply(node=node, removed=removed, errors=errors, ok=not errors,
                         duration_s=round(time.perf_counter() - t0, 3))


def drop_macvlan_tables(entries: Iterable[Departed]) -> tuple[list[str], list[str]]:
    """Delete the nftables tables of these macvlan endpoints inside their containers (they
    enforce an endpoint's policy there; vnet.adapters.mvnft): by name, so a worker that
    never loaded them finds them too — ``vnet-node --teardown``, and a restarted worker
    removing an endpoint deleted while it was down. ``(removed, errors)``."""
    from vnet.core import mvpolicy
    from vnet.runtime.node_wiring import ns_path

    removed: list[str] = []
    errors: list[str] = []
    for d in sorted(entries, key=lambda x: x.id):
        path = ns_path(d.netns)
        if d.kind != "macvlan" or not os.path.exists(path):
            continue  # a namespace gone took its tables with it
        name = mvpolicy.table_name(d.id)
        nsenter = ["nsenter", f"--net={path}", "--", "nft"]
        if all(subprocess.run([*nsenter, "list", "table", fam, name], capture_output=True, timeout=20).returncode
               for fam in mvpolicy.FAMILIES):
            continue
        r = subprocess.run([*nsenter, "-f", "-"], input=mvpolicy.render_delete(d.id), capture_output=True,
                           text=True, timeout=20)
        if r.returncode:
            errors.append(f"cannot delete the nftables tables of {d.id} in {d.netns}: {r.stderr.strip()}")
        else:
            removed.append(f"nftables tables {name} in {d.netns}")
    return removed, errors
