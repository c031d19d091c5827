"""Services are handed their adapters (issue 17): the node's reconciler works on the data plane
it is given, and the runtime's bundle builds each service's store behind its port."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest

from vnet.runtime.dataplane import Dataplane
from vnet.runtime.wiring import ServiceAdapters
from vnet.svc.node.reconcile import Reconciler


class _Fake:
    """Records calls; any method returns None."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.writes = 0

    def __getattr__(self, name: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> None:
            self.calls.append(name)
        return call


def test_the_reconciler_works_on_the_data_plane_it_is_handed() -> None:
    ns, observer, applier, wg = _Fake(), _Fake(), _Fake(), _Fake()
    made: list[tuple[str | None, str | os.PathLike[str]]] = []

    def make_wg(host: str | None, state: str | os.PathLike[str], has_link: Callable[[str], bool]) -> Any:
        made.append((host, state))
        return wg

    rec = Reconciler("h1", node_name="n1", kernel=Dataplane(namespaces=ns, observer=observer,  # type: ignore[arg-type]
                                                              applier=applier, wireguard=make_wg))
    assert rec.observer is observer and rec.applier is applier and rec.ctx is ns
    assert rec.wireguard is wg and made and made[0][0] == "h1"
    rec.stop_wireguard()
    assert wg.calls == ["stop"]
    # without a state_dir the key lives in a temporary directory of its own, gone at close()
    key_dir = os.fspath(made[0][1])
    assert os.path.isdir(key_dir) and os.path.basename(key_dir).startswith("vnet-node-n1-")
    rec.close()
    assert not os.path.exists(key_dir) and "close" in ns.calls


def test_the_runtime_bundle_builds_the_stores_on_the_service_redis() -> None:
    redis = object()
    bundle = ServiceAdapters(config=None, js=None, redis_client=redis)  # type: ignore[arg-type]
    store = bundle.endpoint_store()
    assert type(store).__name__ == "EndpointStore" and store.r is redis  # type: ignore[attr-defined]
    assert bundle.ipam_store().r is redis
    no_redis = ServiceAdapters(config=None, js=None)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="without Redis"):
        no_redis.endpoint_store()


def test_a_stop_reason_names_its_sender_or_the_kernel() -> None:
    from vnet.runtime.stopsignals import StopReason

    by_kill = StopReason(signal="SIGTERM", pid=42, uid=0, how="kill()", sender="vnetctl down", parent_died=False,
                         parent=1)
    assert by_kill.describe() == "SIGTERM from pid 42 (uid 0: vnetctl down) via kill()"
    ctrl_c = StopReason(signal="SIGINT", pid=0, uid=0, how="the kernel", sender="", parent_died=False, parent=1)
    assert ctrl_c.describe() == "SIGINT from the kernel (no sending process: a terminal's Ctrl-C or hangup)"
    orphan = StopReason(signal="SIGTERM", pid=0, uid=0, how="the kernel", sender="", parent_died=True, parent=7)
    assert "the parent process (pid 7) died" in orphan.describe()
