"""docs/security.md shows the permission matrix as the code has it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vnet.contracts import permissions

DOC = Path(__file__).resolve().parents[2] / "docs" / "security.md"


def section(text: str, name: str) -> str:
    m = re.search(rf"<!-- {name}:begin -->\n(.*?)<!-- {name}:end -->", text, re.S)
    assert m is not None, f"docs/security.md has no {name} section"
    return m.group(1)


def render(text: str) -> str:
    """``text`` with both generated sections filled from the code."""
    for name, body in (("matrix", permissions.matrix_markdown()), ("roles", permissions.roles_markdown())):
        text = re.sub(rf"(<!-- {name}:begin -->\n).*?(<!-- {name}:end -->)",
                      lambda m, b=body: m.group(1) + b + m.group(2), text, flags=re.S)
    return text


def test_security_doc_tables_match_the_matrix() -> None:
    text = DOC.read_text()
    assert text == render(text), ("docs/security.md's tables differ from vnet.contracts.permissions; rewrite them "
                                  "with `python tests/contract/test_security_doc.py`")


def test_the_check_fails_on_a_stale_table() -> None:
    stale = render(DOC.read_text()).replace("| yes |", "| · |", 1)
    assert stale != render(stale)
    with pytest.raises(AssertionError):
        section("no sections here", "matrix")


if __name__ == "__main__":
    DOC.write_text(render(DOC.read_text()))
