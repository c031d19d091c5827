"""``VNetConfig``: the module description's defaults, and loading from file, environment and keywords."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vnet.core import errors as E
from vnet.core.model import DriverType, IsolationMode
from vnet.runtime.config import VNetConfig


def bad(**kw: object) -> E.VNetError:
    with pytest.raises(E.VNetError) as ei:
        VNetConfig.load(**kw)  # type: ignore[arg-type]
    assert ei.value.code == "invalid_config" and ei.value.status == 400
    return ei.value


@pytest.mark.parametrize("cfg", [VNetConfig(), VNetConfig.load(env={})], ids=["constructor", "load"])
def test_defaults_are_the_module_description(cfg: VNetConfig) -> None:
    assert cfg.default_driver is DriverType.BRIDGE
    assert cfg.default_isolation is IsolationMode.FULL
    assert cfg.ipv6_enabled is False
    assert cfg.default_subnet == "172.20.0.0/16"
    assert cfg.default_subnet_v6 is None
    assert cfg.max_networks == 1000
    assert cfg.metrics_enabled is True


def test_load_ignores_the_process_environment_when_given_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VNET_MAX_NETWORKS", "7")
    assert VNetConfig.load(env={}).max_networks == 1000
    assert VNetConfig.load().max_networks == 7


def test_from_environment() -> None:
    cfg = VNetConfig.load(env={
        "VNET_DEFAULT_DRIVER": "overlay",
        "VNET_DEFAULT_ISOLATION": "peer_only",
        "VNET_IPV6_ENABLED": "true",
        "VNET_DEFAULT_SUBNET": "10.10.0.0/16",
        "VNET_DEFAULT_SUBNET_V6": "fd00:10::/48",
        "VNET_MAX_NETWORKS": "50",
        "VNET_METRICS_ENABLED": "false",
        "VNET_REQUEST_TIMEOUT_S": "2.5",
        "PATH": "/usr/bin",  # not ours: ignored
        "VNET_RUN_PREFIX": "vt123",  # read by the tests, not a setting: allowed
    })
    assert cfg.default_driver is DriverType.OVERLAY
    assert cfg.default_isolation is IsolationMode.PEER_ONLY
    assert cfg.ipv6_enabled is True
    assert cfg.default_subnet == "10.10.0.0/16" and cfg.default_subnet_v6 == "fd00:10::/48"
    assert cfg.max_networks == 50 and cfg.metrics_enabled is False and cfg.request_timeout_s == 2.5


def test_unknown_environment_variable_is_rejected_by_name() -> None:
    e = bad(env={"VNET_MAX_NETWROKS": "5"})
    assert "VNET_MAX_NETWROKS" in e.message and "not a VNet setting" in e.message
    assert e.details["variable"] == "VNET_MAX_NETWROKS"
    assert "VNET_MAX_NETWORKS" in e.message  # the list of known names helps spot the typo


def test_every_vnet_variable_the_package_reads_is_accepted() -> None:
    """A VNET_* variable read anywhere in the package (os.environ, os.getenv, env.get) but
    neither a config field nor listed as read elsewhere made every service refuse to start
    ("not a VNet setting"): VNET_TRACE_DIR, documented for local traces, did."""
    import re
    from pathlib import Path

    import vnet
    import vnet.svc

    read: set[str] = set()
    for pkg in (vnet, vnet.svc):
        for d in pkg.__path__:
            for f in Path(d).rglob("*.py"):
                read |= set(re.findall(r"""(?:environ|getenv|env)(?:\.get)?[\[(]\s*["'](VNET_[A-Z0-9_]+)["']""",
                                       f.read_text()))
    assert {"VNET_TRACE_DIR", "VNET_NODE_DNS", "VNET_STATE_DIR"} <= read, read  # the search finds them
    for name in sorted(read - {"VNET_CONFIG"}):  # VNET_CONFIG names a file to read
        VNetConfig.load(env={name: "1"})  # raises invalid_config for a name it does not know


def test_invalid_environment_value_is_rejected() -> None:
    e = bad(env={"VNET_MAX_NETWORKS": "lots"})
    assert "max_networks" in e.message
    assert "default_driver" in bad(env={"VNET_DEFAULT_DRIVER": "token-ring"}).message


@pytest.mark.parametrize("fmt", ["toml", "yaml", "json"])
def test_from_file(tmp_path: Path, fmt: str) -> None:
    text = {
        "toml": 'default_driver = "macvlan"\nmax_networks = 12\nipv6_enabled = true\n'
                'default_subnet_v6 = "fd00:1::/48"\n',
        "yaml": "default_driver: macvlan\nmax_networks: 12\nipv6_enabled: true\ndefault_subnet_v6: fd00:1::/48\n",
        "json": json.dumps({"default_driver": "macvlan", "max_networks": 12, "ipv6_enabled": True,
                            "default_subnet_v6": "fd00:1::/48"}),
    }[fmt]
    path = tmp_path / f"vnet.{fmt}"
    path.write_text(text)
    for cfg in (VNetConfig.load(path, env={}), VNetConfig.load(env={"VNET_CONFIG": str(path)})):
        assert cfg.default_driver is DriverType.MACVLAN
        assert cfg.max_networks == 12 and cfg.ipv6_enabled is True and cfg.default_subnet_v6 == "fd00:1::/48"
        assert cfg.default_isolation is IsolationMode.FULL  # untouched fields keep their defaults


def test_file_may_nest_settings_under_vnet(tmp_path: Path) -> None:
    path = tmp_path / "stack.toml"
    path.write_text('[vnet]\nmax_networks = 3\n')
    assert VNetConfig.load(path, env={}).max_networks == 3


def test_precedence_defaults_file_env_keywords(tmp_path: Path) -> None:
    path = tmp_path / "vnet.toml"
    path.write_text('max_networks = 10\ndefault_subnet = "10.1.0.0/16"\nmetrics_enabled = false\n')
    env = {"VNET_MAX_NETWORKS": "20", "VNET_DEFAULT_SUBNET": "10.2.0.0/16"}
    cfg = VNetConfig.load(path, env=env, max_networks=30)
    assert cfg.max_networks == 30  # keyword beats env beats file
    assert cfg.default_subnet == "10.2.0.0/16"  # env beats file
    assert cfg.metrics_enabled is False  # file beats default
    assert cfg.default_isolation is IsolationMode.FULL  # default


def test_unknown_key_in_file_is_rejected_by_name(tmp_path: Path) -> None:
    path = tmp_path / "vnet.json"
    path.write_text(json.dumps({"max_netwroks": 5}))
    assert "max_netwroks" in bad(path=path, env={}).message


def test_unreadable_or_broken_file(tmp_path: Path) -> None:
    assert "cannot read config file" in bad(path=tmp_path / "missing.toml", env={}).message
    broken = tmp_path / "broken.toml"
    broken.write_text("max_networks = = 3")
    assert "is not valid" in bad(path=broken, env={}).message
    listing = tmp_path / "list.json"
    listing.write_text("[1, 2]")
    assert "mapping" in bad(path=listing, env={}).message


@pytest.mark.parametrize("subnet", ["300.1.0.0/16", "nope", "172.20.0.0/40", "", "fd00::/48"])
def test_invalid_default_subnet_is_rejected(subnet: str) -> None:
    e = bad(env={}, default_subnet=subnet)
    assert "default_subnet" in e.message


@pytest.mark.parametrize("subnet", ["nope", "10.0.0.0/8", "fd00::/200"])
def test_invalid_default_subnet_v6_is_rejected(subnet: str) -> None:
    assert "default_subnet_v6" in bad(env={}, default_subnet_v6=subnet).message


@pytest.mark.parametrize(("field", "value"), [("max_networks", 0), ("max_inflight", 0), ("default_prefix_len", 12),
                                              ("default_prefix_len", 31)])
def test_out_of_range_values_are_rejected(field: str, value: int) -> None:
    assert field in bad(env={}, **{field: value}).message


def test_to_env_round_trips() -> None:
    cfg = VNetConfig.load(env={}, default_driver=DriverType.OVERLAY, ipv6_enabled=True,
                          default_subnet_v6="fd00:2::/48", max_networks=9, nats_url="nats://10.0.0.1:4222")
    env = cfg.to_env()
    assert env["VNET_DEFAULT_DRIVER"] == "overlay" and env["VNET_IPV6_ENABLED"] == "true"
    assert VNetConfig.load(env=env) == cfg
