"""The permission matrix's own logic: subject matching as nats-server does it, identities,
rendering (the real server runs the rendering in tests/integration/test_security_matrix.py)."""

from __future__ import annotations

import pytest

from vnet.contracts import permissions as P
from vnet.contracts import subjects


@pytest.mark.parametrize(("pattern", "subject", "ok"), [
    ("vnet.>", "vnet.network.create", True),
    ("vnet.>", "vnet", False),  # > needs at least one token
    ("vnet.*.health", "vnet.ipam.health", True),
    ("vnet.*.health", "vnet.node.n1.health", False),
    ("vnet.node.n1.>", "vnet.node.n1.health", True),
    ("vnet.node.n1.>", "vnet.node.n2.health", False),
    ("_INBOX.vnet-client.>", "_INBOX.>", False),  # a wider subscription is not covered
    ("_INBOX.vnet-client.>", "_INBOX.vnet-client.abc.*", True),
    ("_INBOX.*.>", "_INBOX.vnet-admin.>", True),
    ("vnet.evt.endpoint.status.n1.*", "vnet.evt.endpoint.status.n1.e1", True),
    ("vnet.evt.endpoint.status.n1.*", "vnet.evt.endpoint.status.*.e1", False),
    ("a.*", "a.>", False),
    ("a.b", "a.b.c", False),
])
def test_covers_like_nats_server(pattern: str, subject: str, ok: bool) -> None:
    assert P.covers(pattern, subject) is ok


def test_deny_wins_over_allow() -> None:
    admin = P.admin_user()
    assert admin.may_publish("vnet.network.create")
    assert not admin.may_publish("vnet.network.hostroutes.report.n1")  # allowed by vnet.network.>


def test_identities() -> None:
    n = P.node_user("h-1")
    assert (n.name, n.inbox_prefix) == ("vnet-node-h-1", "_INBOX.vnet-node-h-1")
    assert "vnet.node.h-1.>" in n.subscribe and all("{" not in s for s in n.publish + n.subscribe)
    with pytest.raises(ValueError):
        P.node_user("a.b")  # a node id is one subject token
    names = [u.name for u in P.users(["a", "b"])]
    assert len(names) == len(set(names)) == 3 + len(subjects.SERVICES) + 2


def test_only_services_and_the_own_node_publish_events() -> None:
    for u in P.users(["n1"]):
        for subj in ("vnet.evt.network.created.x", "vnet.evt.endpoint.created.x", "vnet.evt.policy.changed.x"):
            if u.may_publish(subj):
                assert u.role == P.SERVICE, (u.name, subj)
    publishers = {u.name for u in P.users(["n1", "n2"]) if u.may_publish("vnet.evt.endpoint.status.n1.e")}
    assert publishers == {"vnet-node-n1"}


def test_rendering_quotes_and_reads_passwords_from_the_environment() -> None:
    text = P.compose_nats_config(["n1"])
    assert 'user: "vnet-node-n1"' in text and "password: $NATS_PASSWORD_NODE_N1" in text
    assert "no_auth_user" not in text.replace("(no_auth_user is not set)", "")
    local = P.local_nats_config({u.name: 'p"w\\' for u in P.users(["n1"])}, ["n1"])
    assert 'password: "p\\"w\\\\"' in local
    assert '"_INBOX.>"' not in text and '"_INBOX.>"' not in local
