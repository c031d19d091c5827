"""Rendering a ruleset to one nft script (pure; the kernel tests apply it for real)."""

from __future__ import annotations

from vnet.core import naming, nft
from vnet.core.model import IsolationMode
from vnet.core.policy import AllowRule, Policy, PolicyEndpoint, PolicyNetwork, PortSpec, Selector


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
    assert "10.1.0.5 . 10.1.0.6 . tcp . 80-90" in s
    assert "masquerade" in s and f'"{naming.bridge_name("b")}"' in s
    fp = s[s.index("chain from_port {"):]
    # anti-spoofing first, nothing in it accepts
    assert fp.index("@mac_bind drop") < fp.index("@ip4_bind drop") and " accept" not in fp[:fp.index("}")]


def test_delete_script() -> None:
    assert nft.render_delete() == ("table inet vnet\ndelete table inet vnet\n"
                                   "table bridge vnet\ndelete table bridge vnet\n")
