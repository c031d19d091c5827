"""What every verb shares: --version, one JSON shape, errors as JSON, piped output that no
width cuts, a sentence for an empty list, and server text that rich never reads as markup."""

from __future__ import annotations

import importlib.metadata

import click

from tests.cli.conftest import Ctl
from vnet.cli import main as cli_main


def _verbs(group: click.Group, path: tuple[str, ...] = ()) -> dict[str, click.Command]:
    out: dict[str, click.Command] = {}
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            out |= _verbs(cmd, (*path, name))
        else:
            out[" ".join((*path, name))] = cmd
    return out


def test_every_verb_takes_json() -> None:
    verbs = _verbs(cli_main.cli)
    assert {"status", "network ls", "policy explain", "container rm", "down"} <= set(verbs)
    assert [v for v, cmd in verbs.items() if "--json" not in {o for p in cmd.params for o in p.opts}] == []


async def test_version(ctl: Ctl) -> None:
    r = await ctl("--version", nats=False)
    assert r.exit_code == 0 and r.stdout.strip() == f"vnetctl {importlib.metadata.version('vnet')}"


async def test_lists_are_items_everywhere(ctl: Ctl) -> None:
    c1 = ctl.netns("j1")
    await ctl.ok("network", "create", "jweb", "--cidr", "10.230.0.0/24", "--isolation", "none")
    await ctl.ok("network", "create", "jdb", "--cidr", "10.230.1.0/24")
    await ctl.ok("network", "mesh", "create", "jmesh", "jweb", "jdb")
    await ctl.ok("endpoint", "create", c1, "--network", "jweb")
    await ctl.ok("policy", "set", '{"id": "jr", "from": [{"network": "jweb"}], "to": [{"cidr": "192.0.2.0/24"}]}')
    lists = {
        ("network", "ls"): "jweb",
        ("endpoint", "ls"): c1,
        ("endpoint", "nodes"): ctl.node,
        ("network", "mesh", "ls"): "jmesh",
        ("policy", "ls"): "jr",
        ("ipam", "pools"): None,
        ("container", "ls"): None,
    }
    for verb, needle in lists.items():
        doc = await ctl.json(*verb)
        assert isinstance(doc, dict) and isinstance(doc["items"], list), (verb, doc)
        if needle is not None:
            assert needle in str(doc["items"]), (verb, doc)
    assert set(await ctl.json("network", "ls")) == {"items", "next_cursor"}  # the one paged list
    st = await ctl.json("status")
    assert {r["name"] for r in st["items"]} >= {"ipam", "network", "endpoint", "policy", "metrics", "node"}
    assert st["missing"] == []
    # A verb about one object prints the object.
    net = await ctl.json("network", "update", "jweb", "-l", "k=v")
    assert net["name"] == "jweb" and net["labels"] == {"k": "v"}
    # A verb that takes several arguments: items and errors, however many were given.
    one = await ctl.json("network", "inspect", "jweb")
    assert [n["name"] for n in one["items"]] == ["jweb"] and one["errors"] == []
    two = await ctl.json("network", "inspect", "jweb", "nope", code=1)
    assert [n["name"] for n in two["items"]] == ["jweb"]
    assert [(e["ref"], e["code"]) for e in two["errors"]] == [("nope", "network_not_found")]
    eps = await ctl.json("endpoint", "ls")
    rm = await ctl.json("endpoint", "rm", eps["items"][0]["id"])
    assert [d["endpoint"]["id"] for d in rm["items"]] == [eps["items"][0]["id"]] and rm["errors"] == []


async def test_errors_under_json(ctl: Ctl) -> None:
    err = await ctl.error("network", "update", "nope", "--isolation", "none")
    assert err["code"] == "network_not_found" and "nope" in err["message"] and err["trace_id"]
    err = await ctl.error("network", "create", "jx", "--cidr", "10.230.5.1/24")
    assert err["code"] == "cidr_host_bits" and err["details"]
    # The command line itself: the same document, exit code 2.
    err = await ctl.error("network", "ls", "--bogus", code=2)
    assert err["code"] == "usage" and "--bogus" in err["message"]
    err = await ctl.error("policy", "set", "{not json", code=2)
    assert err["code"] == "usage"
    # Without --json: one line on stderr, nothing on stdout.
    r = await ctl("network", "update", "nope", "--isolation", "none")
    assert r.exit_code == 1 and r.stdout == ""
    assert r.stderr.startswith("error: ") and "(network_not_found)" in r.stderr and "trace id: " in r.stderr


async def test_piped_output_is_tab_separated_and_never_cut(ctl: Ctl) -> None:
    long_value = "x" * 150
    await ctl.ok("network", "create", "jwide", "--cidr", "10.230.2.0/24", "-l", f"long={long_value}",
                 "-l", "other=value with spaces")
    r = await ctl.ok("network", "ls")
    lines = r.stdout.splitlines()
    assert lines[0].split("\t") == ["name", "id", "cidr", "gateway", "driver", "isolation", "parent", "relations",
                                    "labels"]
    row = lines[1].split("\t")
    assert len(lines) == 2 and len(row) == 9 and row[0] == "jwide" and row[2] == "10.230.2.0/24"
    assert row[8] == f"long={long_value},other=value with spaces"  # whole, at COLUMNS=80
    assert "…" not in r.stdout and "┃" not in r.stdout and "│" not in r.stdout
    r = await ctl.ok("network", "inspect", "jwide")
    assert f"labels\tlong={long_value},other=value with spaces" in r.stdout.splitlines()


async def test_empty_lists_say_so(ctl: Ctl) -> None:
    for verb, sentence in ((("network", "ls"), "no networks"), (("endpoint", "ls"), "no endpoints"),
                           (("policy", "ls"), "no allow rules"), (("network", "mesh", "ls"), "no mesh groups"),
                           (("ipam", "pools"), "no IPAM pools")):
        r = await ctl.ok(*verb)
        # Piped: stdout stays empty (a script sees no rows), the sentence goes to stderr.
        assert r.stdout == "" and sentence in r.stderr, (verb, r.stdout, r.stderr)
    r = await ctl.ok("endpoint", "ls", "--network", "anything")
    assert "no endpoints match" in r.stderr


async def test_server_text_is_not_markup(ctl: Ctl) -> None:
    # The name pattern in the server's message has brackets rich used to eat.
    r = await ctl("network", "create", "BAD_NAME!!")
    assert r.exit_code == 1 and "[a-zA-Z0-9]" in r.stderr, r.stderr
    err = await ctl.error("network", "create", "BAD_NAME!!")
    assert "[a-zA-Z0-9]" in err["message"]
    # Labels and names the user gave come back verbatim, in tables, inspect and messages.
    await ctl.ok("network", "create", "jmark", "--cidr", "10.230.3.0/24", "-l", "note=[bold]x[/bold]",
                 "-l", "w=[red]:thumbs_up:")
    r = await ctl.ok("network", "ls")
    assert "note=[bold]x[/bold],w=[red]:thumbs_up:" in r.stdout
    r = await ctl.ok("network", "inspect", "jmark")
    assert "note=[bold]x[/bold],w=[red]:thumbs_up:" in r.stdout
    c = ctl.netns("jm")
    r = await ctl.ok("endpoint", "create", c, "--network", "jmark", "-l", "tag=[/]")
    assert f"{c} → jmark" in r.stdout
    r = await ctl.ok("endpoint", "ls")
    assert "tag=[/]" in r.stdout and c in r.stdout


async def test_json_of_the_stack_and_demo_verbs(ctl: Ctl) -> None:
    # No stack runs from this state dir: said as JSON, exit 0.
    assert await ctl.json("down") == {"stopped": False, "state_dir": str(ctl.state_dir.absolute())}
    # A foreground stack prints a log, not one document.
    err = await ctl.error("up", code=2)
    assert err["code"] == "usage" and "--detach" in err["message"]
    # The demo against this control plane: its narration in the document, nothing else on stdout.
    doc = await ctl.json("demo")
    assert doc["ok"] is True and doc["exit_code"] == 0, doc
    assert doc["lines"][0].startswith("1. two networks") and any("explain" in ln for ln in doc["lines"])
    assert (await ctl.json("network", "ls"))["items"] == []  # the demo removed what it made
