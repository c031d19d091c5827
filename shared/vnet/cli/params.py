"""Argument parsing shared by the vnetctl verbs."""

from __future__ import annotations

import click

from vnet.core.labels import parse_pairs


def pairs(values: tuple[str, ...], what: str) -> dict[str, str]:
    """``KEY=VALUE`` options (``--label``, ``--opt`` ...) -> a dict; a bad one is a usage error."""
    try:
        return parse_pairs(values)
    except ValueError:
        bad = next(v for v in values if not v.partition("=")[1] or not v.partition("=")[0])
        raise click.BadParameter(f"{bad!r} must be key=value", param_hint=what) from None
