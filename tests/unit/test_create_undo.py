"""A waiting create whose node found no namespace undoes itself (svc/endpoint/create.py): when
the removal fails too, the caller still gets ``netns_not_found`` first, told which endpoint is
left and how to remove it, and the request id stays bound to that endpoint."""

from __future__ import annotations

from typing import Any

import pytest

from vnet.contracts.endpoint import EndpointInfo
from vnet.core import errors as E
from vnet.svc.endpoint import create as C


class _Store:
    def __init__(self) -> None:
        self.forgot: list[tuple[str, str]] = []

    async def forget_request(self, request_id: str, ident: str) -> None:
        self.forgot.append((request_id, ident))


def _failed() -> EndpointInfo:
    return EndpointInfo(id="ep1", container_id="c1", network_id="n1", ip_address="10.9.0.2",
                        mac_address="02:00:00:00:00:01", interface_name="eth0", created_at="2026-12-04T00:00:00Z",
                        node="node-a", netns="ghost", status="failed", status_code=E.NETNS_NOT_FOUND.code,
                        reason="container network namespace ghost does not exist")


@pytest.mark.parametrize("removal", ["ok", "gone already", "redis down"])
async def test_undo_answers_netns_not_found_whatever_the_removal_did(monkeypatch: pytest.MonkeyPatch,
                                                                     removal: str) -> None:
    st = _Store()
    calls: list[str] = []

    async def remove(ctx: Any, ident: str, *, wait: bool, timeout: float) -> None:
        calls.append(ident)
        if removal == "gone already":
            raise E.make(E.ENDPOINT_NOT_FOUND, f"endpoint {ident} not found")
        if removal == "redis down":
            raise ConnectionError("Error 111 connecting to 127.0.0.1:6379")

    monkeypatch.setattr(C, "remove", remove)
    monkeypatch.setattr(C, "_store", lambda ctx: st)
    with pytest.raises(E.VNetError) as ei:
        await C._undo_missing_netns(None, _failed(), "rq-1")  # type: ignore[arg-type]
    err = ei.value
    assert calls == ["ep1"]
    assert err.code == "netns_not_found" and err.status == 404
    assert "'ghost'" in err.message and "node-a" in err.message and "/run/netns/ghost" in err.message
    assert err.details["netns"] == "ghost" and err.details["node"] == "node-a"
    if removal == "redis down":
        assert "vnetctl endpoint rm ep1" in err.message and "Error 111" in err.message
        assert st.forgot == []  # the record stays, so does its request id
    else:
        assert "vnetctl endpoint rm" not in err.message
        assert st.forgot == [("rq-1", "ep1")]
