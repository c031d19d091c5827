"""Rendering a ruleset to one nft script, and element deltas between rulesets (pure; the
kernel tests apply them for real)."""

from __future__ import annotations

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from vnet.core import naming, nft
from vnet.core.model import IsolationMode
from vnet.core.policy import (
    AllowRule,
    Policy,
    PolicyEndpoint,
    PolicyNetwork,
    PortSpec,
    Published,
    Ruleset,
    Selector,
)


def policy() -> Policy:
    nets = [PolicyNetwork(id="a", mode=IsolationMode.FULL, cidrs=("10.1.0.0/24",), gateways=("10.1.0.1",)),
            PolicyNetwork(id="b", mode=IsolationMode.NONE, cidrs=("10.2.0.0/24", "fd00:2::/64"))]
    eps = [PolicyEndpoint(id="e1", network="a", ips=("10.1.0.5",), mac="02:00:00:00:00:01", node="h"),
           PolicyEndpoint(id="e2", network="a", ips=("10.1.0.6",), mac="02:00:00:00:00:02", node="h"),
           PolicyEndpoint(id="e3", network="b", ips=("10.2.0.5", "fd00:2::5"), mac="02:00:00:00:00:03", node="h")]
    rules = [AllowRule(id="r", from_=[Selector(endpoint="e1")], to=[Selector(endpoint="e2")],
                       ports=[PortSpec(protocol="tcp", port=80, end_port=90)])]
    return Policy(nets, eps, rules)


def test_one_transaction_replacing_both_tables() -> None:
    s = nft.render(policy().compile("h"))
    lines = s.splitlines()
    # the delete is valid whether or not the table exists; then the whole new table
    assert lines[:4] == ["table inet vnet", "delete table inet vnet", "table bridge vnet", "delete table bridge vnet"]
    assert s.count("table inet vnet {") == 1 and s.count("table bridge vnet {") == 1
    assert "foreign" not in s and "flush ruleset" not in s


def test_base_chains_accept_foreign_traffic_and_drop_ours() -> None:
    s = nft.render(policy().compile("h"))
    # base chains never drop by policy: they only dispatch our bridges' / ports' traffic
    assert s.count("policy drop") == 0
    assert 'iifname "vnb-*" jump governed' in s and 'oifname "vnb-*" jump governed' in s
    assert 'iifname "vne*" jump from_port' in s
    gov = s[s.index("chain governed {"):]
    assert gov.index("ct state established,related accept") < gov.index("vmap @net_pairs")
    for chain in ("between_endpoints", "to_external", "from_external"):
        body = s[s.index(f"chain {chain} {{"):]
        body = body[:body.index("}")]
        assert body.rstrip().endswith("drop"), chain


def test_bindings_and_elements() -> None:
    s = nft.render(policy().compile("h"))
    v1 = naming.veth_name("e1")
    assert f'"{v1}" . 02:00:00:00:00:01 . 10.1.0.5' in s
    assert f'"{v1}" . 02:00:00:00:00:01 . 0.0.0.0' in s  # ARP probes with the right MAC
    assert f'"{naming.veth_name("e3")}" . 02:00:00:00:00:03 . fd00:2::5' in s
    assert "meta l4proto tcp th dport 80-90 accept" in s and "iifname . oifname @rel_pairs ip saddr @e4_" in s
    assert "masquerade" in s and f'"{naming.bridge_name("b")}"' in s
    fp = s[s.index("chain from_port {"):]
    # anti-spoofing first, nothing in it accepts
    assert fp.index("@mac_bind drop") < fp.index("@ip4_bind drop") and " accept" not in fp[:fp.index("}")]


def test_delete_script() -> None:
    assert nft.render_delete() == ("table inet vnet\ndelete table inet vnet\n"
                                   "table bridge vnet\ndelete table bridge vnet\n")


def test_delta_of_an_attach_is_a_few_elements_whatever_the_size() -> None:
    """One more endpoint in a Full network with a network-wide rule: the same handful of
    element lines with 2 or 200 endpoints already there, and no rule or set declared."""
    def world(n: int) -> Policy:
        nets = [PolicyNetwork(id="a", mode=IsolationMode.FULL, cidrs=("10.1.0.0/16",))]
        eps = [PolicyEndpoint(id=f"e{i:04d}", network="a", ips=(f"10.1.{i // 250}.{2 + i % 250}",),
                              mac=f"02:00:00:00:{i // 256:02x}:{i % 256:02x}", node="h", labels={"app": "web"})
               for i in range(n)]
        rules = [AllowRule(id="r", from_=[Selector(network="a")], to=[Selector(labels={"app": "web"})],
                           ports=[PortSpec(protocol="tcp", port=80)])]
        return Policy(nets, eps, rules)

    for n in (2, 200):
        before = world(n).compile("h")
        after = world(n + 1).compile("h")
        assert nft.structure(before) == nft.structure(after)
        script, count = nft.delta(nft.elements(before), after)
        # mac/ip4/arp(2)/full_ports bindings + the two sets that select it
        assert count == 7, script
        # one line per set touched (ARP: the address and the 0.0.0.0 probe in one line)
        assert "delete element" not in script and script.count("add element") == 6
        back, count = nft.delta(nft.elements(after), before)
        assert count == 7 and back.count("delete element") == 6 and "add element" not in back
        assert nft.delta(nft.elements(after), after) == ("", 0)


def test_a_map_value_change_is_delete_then_add() -> None:
    rs = policy().compile("h")
    one = msgspec.structs.replace(rs, published4=[("tcp", 8080, "10.1.0.5", 80)])
    two = msgspec.structs.replace(rs, published4=[("tcp", 8080, "10.1.0.6", 80)])
    script, n = nft.delta(nft.elements(one), two)
    lines = script.splitlines()
    assert lines[0] == "delete element inet vnet published4 { tcp . 8080 }"  # by key, first
    assert "add element inet vnet published4 { tcp . 8080 : 10.1.0.6 . 80 }" in lines
    assert n == 4  # the map entry and the ingress element, each out and in


def test_listing_parses_back_to_the_elements() -> None:
    """parse_listing on the JSON nft prints (shapes: concat, prefix, range, map, verdict)."""
    doc = {"nftables": [
        {"metainfo": {"json_schema_version": 1}},
        {"table": {"family": "inet", "name": "vnet", "handle": 3}},
        {"set": {"family": "inet", "name": "c4_x", "table": "vnet", "type": "ipv4_addr", "handle": 4,
                 "flags": ["interval"], "elem": [{"prefix": {"addr": "8.8.0.0", "len": 16}},
                                                 {"range": ["10.0.0.1", "10.0.0.9"]}, "1.2.3.4"]}},
        {"map": {"family": "inet", "name": "net_pairs", "table": "vnet", "type": ["ifname", "ifname"],
                 "map": "verdict", "handle": 5,
                 "elem": [[{"concat": ["vnb-a", "vnb-a"]}, {"accept": None}]]}},
        {"map": {"family": "inet", "name": "published4", "table": "vnet", "handle": 6,
                 "type": ["inet_proto", "inet_service"], "map": ["ipv4_addr", "inet_service"],
                 "elem": [[{"concat": ["tcp", 8080]}, {"concat": ["10.1.0.5", 80]}]]}},
    ]}
    st1, el = nft.parse_listing([("inet", doc)])
    assert el[("inet", "c4_x")] == {"8.8.0.0/16", "10.0.0.1-10.0.0.9", "1.2.3.4"}
    assert el[("inet", "net_pairs")] == {"vnb-a . vnb-a : accept"}
    assert el[("inet", "published4")] == {"tcp . 8080 : 10.1.0.5 . 80"}
    doc["nftables"][2]["set"]["elem"] = []
    doc["nftables"][2]["set"]["handle"] = 99
    st2, _ = nft.parse_listing([("inet", doc)])
    assert st1 == st2  # elements and handles are not structure


# --------------------------------------------------------------------------- property: deltas = scratch

NETS = [PolicyNetwork(id="a", mode=IsolationMode.FULL, cidrs=("10.5.1.0/24", "fd00:5:1::/64")),
        PolicyNetwork(id="b", mode=IsolationMode.PEER_ONLY, cidrs=("10.5.2.0/24",), connected=("c",)),
        PolicyNetwork(id="c", mode=IsolationMode.MESH_ONLY, cidrs=("10.5.3.0/24",), connected=("b",))]
RULES = [AllowRule(id="r1", from_=[Selector(network="a")], to=[Selector(labels={"tier": "db"})],
                   ports=[PortSpec(protocol="tcp", port=5432)]),
         AllowRule(id="r2", from_=[Selector(labels={"tier": "web"}), Selector(cidr="192.0.2.0/24")],
                   to=[Selector(network="b"), Selector(cidr="10.5.3.0/25")]),
         AllowRule(id="r3", from_=[Selector(endpoint="x3")], to=[Selector(cidr="8.8.8.0/24")])]


def _ep(i: int, net: str, tier: str, node: str, pub: bool) -> PolicyEndpoint:
    k = "abc".index(net) + 1
    ips = (f"10.5.{k}.{10 + i}",) + ((f"fd00:5:1::{10 + i:x}",) if net == "a" else ())
    return PolicyEndpoint(id=f"x{i}", network=net, ips=ips, mac=f"02:00:00:00:05:{i:02x}", node=node,
                          labels={"tier": tier},
                          published=(Published(protocol="tcp", host_port=9000 + i, port=80),) if pub else ())


@settings(max_examples=150, deadline=None)
@given(ops=st.lists(st.tuples(st.integers(0, 11), st.sampled_from("abc"), st.sampled_from(["web", "db"]),
                              st.sampled_from(["h", "h", "o"]), st.booleans(), st.booleans()),
                    min_size=1, max_size=25))
def test_node_side_deltas_equal_the_engine(ops: list[tuple[int, str, str, str, bool, bool]]) -> None:
    """Attaches and detaches applied to a ruleset on the node (Ruleset.with_endpoint /
    without_endpoint) give the ruleset the engine compiles from scratch, or say they
    cannot (then the node fetches the engine's)."""
    live: dict[str, PolicyEndpoint] = {}
    # every network in play here from the start (one endpoint each that stays)
    for i, n in enumerate("abc"):
        live[f"s{i}"] = PolicyEndpoint(id=f"s{i}", network=n, ips=(f"10.5.{i + 1}.250",),
                                       mac=f"02:00:00:00:06:{i:02x}", node="h")
    rs: Ruleset | None = Policy(NETS, live.values(), RULES).compile("h")
    for i, net, tier, node, pub, attach in ops:
        eid = f"x{i}"
        if attach and eid not in live:
            e = _ep(i, net, tier, node, pub)
            live[eid] = e
            assert rs is not None
            nxt = rs.with_endpoint(e, local=node == "h", bridge=naming.bridge_name(net))
        elif not attach and eid in live:
            e = live.pop(eid)
            assert rs is not None
            nxt = rs.without_endpoint(e, local=e.node == "h")
        else:
            continue
        scratch = Policy(NETS, live.values(), RULES).compile("h")
        if nxt is None:  # the node fetches the engine's ruleset
            rs = scratch
            continue
        assert nft.structure(nxt) == nft.structure(scratch)
        assert nft.elements(nxt) == nft.elements(scratch)
        assert nxt.version() == scratch.version()
        # the fast delta (only what differs) = the delta from every element
        assert rs is not None
        changes, meta = nft.delta_between(rs, nxt)
        assert nft.delta_script(changes, meta) == nft.delta(nft.elements(rs), nxt)
        assert nft.delta_changes(nft.elements(rs), nxt)[0] == {k: v for k, v in changes.items() if v[0] or v[1]}
        have = {k: set(v) for k, v in nft.elements(rs).items()}
        for key, (gone, new) in changes.items():
            have[key] = (have.get(key, set()) - gone) | new
        assert have == {k: set(v) for k, v in nft.elements(nxt).items()}
        rs = nxt


def test_many_port_rules_are_dispatched_by_port() -> None:
    """From DISPATCH_MIN port lines on, one verdict-map lookup on (protocol . port) jumps to
    the chain of exactly the lines that can match that port (checked port by port)."""
    nets = [PolicyNetwork(id="a", mode=IsolationMode.FULL, cidrs=("10.1.0.0/24",))]
    eps = [PolicyEndpoint(id=f"e{i}", network="a", ips=(f"10.1.0.{10 + i}",), mac=f"02:00:00:00:00:{i:02x}",
                          node="h") for i in range(4)]
    ranges = [(80, 80), (80, 90), (85, 443), (443, 443), (1000, 2000), (1500, 1500), (3000, 3010), (53, 53)]
    rules = [AllowRule(id=f"r{k}", from_=[Selector(endpoint=f"e{k % 4}")], to=[Selector(endpoint=f"e{(k + 1) % 4}")],
                       ports=[PortSpec(protocol="tcp", port=lo, end_port=hi if hi != lo else None)])
             for k, (lo, hi) in enumerate(ranges)]
    rules.append(AllowRule(id="all-udp", from_=[Selector(network="a")], to=[Selector(network="a")],
                           ports=[PortSpec(protocol="udp")]))
    rules.append(AllowRule(id="icmp", from_=[Selector(network="a")], to=[Selector(network="a")],
                           ports=[PortSpec(protocol="icmp")]))
    rs = Policy(nets, eps, rules).compile("h")
    s = nft.render(rs)
    body = s[s.index("chain between_endpoints {"):]
    body = body[:body.index("}")]
    assert "meta l4proto icmp" in body  # not a port protocol: checked line by line
    assert [x.strip() for x in body.splitlines() if "th dport" in x] == ["meta l4proto . th dport vmap @int_ports"]
    _, segs = nft._dispatched(rs, "int")
    lines = [ln for ln in rs.lines if ln.chain == "int" and ln.proto in nft.PORT_PROTOS]
    for proto in ("tcp", "udp"):
        for port in [0, 1, 52, 53, 54, 79, 80, 81, 84, 85, 90, 91, 442, 443, 444, 999, 1000, 1499, 1500, 1501,
                     2000, 2001, 2999, 3000, 3010, 3011, 65535]:
            want = {ln for ln in lines if ln.proto == proto and (not ln.lo or ln.lo <= port <= ln.hi)}
            hit = [g for g in segs if g.proto == proto and g.lo <= port <= g.hi]
            assert len(hit) <= 1 and set(hit[0].lines if hit else ()) == want, (proto, port)
            if hit:
                assert f"chain {nft._seg_chain('int', hit[0])} {{" in s
    # the map is structure: equal structures have equal maps, and it is compared like any set
    assert ("inet", "int_ports") in nft.elements(rs)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 60), unique=True), st.lists(st.integers(0, 60), unique=True),
       st.sets(st.integers(0, 60)))
def test_the_head_and_tail_skip_gives_the_set_differences(old: list[int], new: list[int], copied: set[int]) -> None:
    """``_differ`` skips the identical head and tail and hashes the middle only: the same
    answer as the set differences, whether the items are the same objects or equal copies."""
    objs = {i: f"e{i:03d}" for i in range(61)}
    a = [objs[i] for i in sorted(old)]
    b = [("".join(objs[i]) if i in copied else objs[i]) for i in sorted(new)]  # an equal, distinct str
    gone, added = nft._differ(a, b)
    assert (gone, added) == (set(a) - set(b), set(b) - set(a))
