"""Labels, pure: ``KEY=VALUE`` pairs as people type them, and the exact-match selector.

One parser for every place a person writes labels or a label filter: the Python client
(``labels=["env=prod"]`` or ``{"env": "prod"}``) and vnetctl (``--label env=prod``,
``--labels env=prod``). A selector's pairs AND together, each an exact match.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping


def parse_pairs(items: Iterable[str], *, what: str = "label") -> dict[str, str]:
    """``["env=prod", "team=a"]`` -> ``{"env": "prod", "team": "a"}``; a value may be empty
    and may hold ``=``; the last of a repeated key wins. ``ValueError`` names a bad item."""
    out: dict[str, str] = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise ValueError(f"{what} {item!r} must be key=value")
        out[k] = v
    return out


def parse_selector(selector: Mapping[str, str] | Iterable[str] | None) -> dict[str, str]:
    """``{"env": "prod"}`` or ``["env=prod", "team=a"]`` (or None) -> a dict (AND-ed exact matches)."""
    if selector is None:
        return {}
    if isinstance(selector, Mapping):
        return dict(selector)
    return parse_pairs(selector, what="label filter")


def matches(labels: Mapping[str, str], selector: Mapping[str, str]) -> bool:
    """Whether ``labels`` carry every pair of ``selector`` (an empty selector matches all)."""
    return all(labels.get(k) == v for k, v in selector.items())
