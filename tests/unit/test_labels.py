"""vnet.core.labels: the one KEY=VALUE / label-selector parser (client and vnetctl)."""

from __future__ import annotations

import click
import pytest

from vnet.api.network import parse_label_selector
from vnet.cli.params import pairs
from vnet.core.labels import matches, parse_pairs, parse_selector


def test_pairs_keep_empty_values_and_equals_signs_and_the_last_repeat() -> None:
    assert parse_pairs(["env=prod", "note=a=b", "empty=", "env=dev"]) == {"env": "dev", "note": "a=b", "empty": ""}


@pytest.mark.parametrize("bad", ["env", "=prod", ""])
def test_a_pair_without_key_or_equals_is_refused_by_name(bad: str) -> None:
    with pytest.raises(ValueError, match=repr(bad)):
        parse_pairs(["ok=1", bad])


def test_selector_takes_a_mapping_a_list_or_none_and_the_client_uses_it() -> None:
    assert parse_selector({"a": "1"}) == parse_selector(["a=1"]) == {"a": "1"}
    assert parse_selector(None) == {}
    assert parse_label_selector is parse_selector
    with pytest.raises(ValueError, match="label filter 'x'"):
        parse_selector(["x"])


def test_match_is_exact_and_ands_the_pairs() -> None:
    assert matches({"env": "prod", "team": "a"}, {"env": "prod"})
    assert not matches({"env": "prod"}, {"env": "prod", "team": "a"})
    assert not matches({"env": "prod2"}, {"env": "prod"})
    assert matches({}, {})


def test_the_cli_names_the_bad_option() -> None:
    assert pairs(("a=1", "b=2"), "--label") == {"a": "1", "b": "2"}
    with pytest.raises(click.BadParameter, match="'nope' must be key=value"):
        pairs(("a=1", "nope"), "--label")
