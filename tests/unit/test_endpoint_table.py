"""The node's table of desired endpoints counts each container namespace's endpoints as they
come and go, and a scoped reconcile's endpoints found through it are those the two passes
over every endpoint find (vnet.svc.node.workstate.EndpointTable, worker._scoped_endpoints)."""

from __future__ import annotations

import collections

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vnet.core.dataplane_model import EpDesired, Scope
from vnet.svc.node.worker import _scoped_endpoints
from vnet.svc.node.workstate import EndpointTable


def ep(i: int, ns: int) -> EpDesired:
    return EpDesired(id=f"e{i}", network_id="n1", netns=f"c{ns}", mac=f"02:00:00:00:00:{i:02x}")


# (set endpoint i in namespace ns) or (pop endpoint i)
ops = st.lists(st.one_of(st.tuples(st.just("set"), st.integers(0, 12), st.integers(0, 4)),
                         st.tuples(st.just("pop"), st.integers(0, 12), st.just(0))), max_size=60)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_the_counts_follow_every_change_and_the_scoped_endpoints_are_the_passes(seq: list[tuple[str, int, int]]
                                                                              ) -> None:
    t = EndpointTable([ep(100, 0)])
    ref: dict[str, EpDesired] = {"e100": ep(100, 0)}
    for op, i, ns in seq:
        if op == "set":
            t[f"e{i}"] = ref[f"e{i}"] = ep(i, ns)
        else:
            assert t.pop(f"e{i}", None) == ref.pop(f"e{i}", None)
        counts = collections.Counter(e.netns for e in ref.values())
        assert dict(t) == ref
        assert all(t.shared(f"c{k}") == counts.get(f"c{k}", 0) for k in range(5))
        eps = list(t.values())
        for i2 in range(13):
            scope = Scope(endpoints=frozenset({f"e{i2}"}), networks=frozenset())
            assert _scoped_endpoints(eps, scope, t) == _scoped_endpoints(eps, scope)


def test_a_table_refuses_changes_it_would_not_count() -> None:
    t = EndpointTable([ep(1, 0), ep(2, 0)])
    assert t.shared("c0") == 2
    del t["e1"]
    assert t.shared("c0") == 1
    with pytest.raises(KeyError):
        t.pop("e1")
    for change in (lambda: t.update({"e3": ep(3, 1)}), lambda: t.setdefault("e3", ep(3, 1)), t.clear, t.popitem):
        with pytest.raises(TypeError):
            change()
    assert t.shared("c0") == 1 and list(t) == ["e2"]
