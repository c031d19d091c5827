"""``vnetctl container create|rm|ls NAME``: bare named network namespaces that stand for
containers in demos and tests (a real runtime passes its own namespace instead).

``create`` runs ``ip netns add NAME`` and brings loopback up inside; it leaves a marker
file ``<state dir>/containers/NAME`` (state dir: ``$VNET_STATE_DIR``, else
``~/.local/state/vnet``) so that ``rm`` deletes only namespaces vnetctl made — anything
else needs ``--force``. Nothing outside the new namespace is touched. Needs root.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import click
from rich.markup import escape
from rich.table import Table

from vnet.cli.main import cli, console, err_console, print_json

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
NETNS_DIR = Path("/run/netns")


def marker_dir() -> Path:
    from vnet.runtime.stack import default_state_dir

    return default_state_dir() / "containers"


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("ip") or next((p for p in ("/usr/sbin/ip", "/sbin/ip") if os.path.exists(p)), None)
    if binary is None:
        err_console.print("[red]error[/red]: the `ip` command (iproute2) is needed; install iproute2")
        sys.exit(2)
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=10, check=False)


def _check_name(name: str) -> None:
    if not NAME_RE.match(name):
        raise click.BadParameter(f"{name!r}: a container name is 1-64 letters, digits, '_', '.' or '-', starting "
                                 "with a letter or digit", param_hint="NAME")


def _need_root() -> None:
    if os.geteuid() != 0:
        err_console.print("[red]error[/red]: creating and deleting network namespaces needs root (sudo vnetctl ...)")
        sys.exit(2)


def _pids(name: str) -> list[str]:
    return _ip("netns", "pids", name).stdout.split()


@cli.group()
def container() -> None:
    """Bare network namespaces standing for containers (demos and tests)."""


@container.command("create")
@click.argument("names", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True)
def create_cmd(names: tuple[str, ...], as_json: bool) -> None:
    """Create network namespace(s) NAME (loopback up) to attach as containers."""
    for n in names:
        _check_name(n)
    _need_root()
    marks = marker_dir()
    marks.mkdir(parents=True, exist_ok=True)
    made: list[dict[str, Any]] = []
    failed = False
    for n in names:
        if (NETNS_DIR / n).exists():
            ours = (marks / n).exists()
            err_console.print(f"[red]error[/red]: network namespace {escape(n)} already exists"
                              + (" (made by vnetctl)" if ours else " (not made by vnetctl)"))
            failed = True
            continue
        res = _ip("netns", "add", n)
        if res.returncode != 0:
            err_console.print(f"[red]error[/red]: cannot create network namespace {escape(n)}: "
                              f"{escape(res.stderr.strip())}")
            failed = True
            continue
        info = {"name": n, "netns": str(NETNS_DIR / n), "created_at": dt.datetime.now(dt.UTC).isoformat()}
        (marks / n).write_text(json.dumps(info))
        up = _ip("-n", n, "link", "set", "lo", "up")
        if up.returncode != 0:
            err_console.print(f"[yellow]warning[/yellow]: loopback of {escape(n)} not up: {escape(up.stderr.strip())}")
        made.append(info)
        if not as_json:
            console.print(f"created container {escape(n)} (network namespace {NETNS_DIR / n}); attach it with "
                          f"`vnetctl endpoint create {escape(n)} --network NET`")
    if as_json:
        print_json(made)
    if failed:
        sys.exit(1)


@container.command("rm")
@click.argument("names", nargs=-1, required=True)
@click.option("--force", is_flag=True, help="Also delete namespaces vnetctl did not make, and ones with processes.")
def rm_cmd(names: tuple[str, ...], force: bool) -> None:
    """Delete network namespace(s) NAME made by `vnetctl container create`."""
    for n in names:
        _check_name(n)
    _need_root()
    marks = marker_dir()
    failed = False
    for n in names:
        mark = marks / n
        exists = (NETNS_DIR / n).exists()
        if not exists:
            if mark.exists():
                mark.unlink()
                console.print(f"container {escape(n)} was already gone; forgot it")
            else:
                err_console.print(f"[red]error[/red]: no network namespace {escape(n)}")
                failed = True
            continue
        if not mark.exists() and not force:
            err_console.print(f"[red]error[/red]: {escape(n)} was not made by `vnetctl container create` (no marker in "
                              f"{marks}); pass --force to delete it anyway")
            failed = True
            continue
        pids = _pids(n)
        if pids and not force:
            err_console.print(f"[red]error[/red]: {len(pids)} process(es) run in {escape(n)} ({' '.join(pids[:5])}); "
                              "stop them, or pass --force (they keep the namespace alive after its name is gone)")
            failed = True
            continue
        res = _ip("netns", "del", n)
        if res.returncode != 0:
            err_console.print(f"[red]error[/red]: cannot delete {escape(n)}: {escape(res.stderr.strip())}")
            failed = True
            continue
        if mark.exists():
            mark.unlink()
        console.print(f"deleted container {escape(n)} (endpoints still attached to it turn failed until detached: "
                      f"`vnetctl endpoint ls -c {escape(n)}`)")
    if failed:
        sys.exit(1)


@container.command("ls")
@click.option("--json", "as_json", is_flag=True)
def ls_cmd(as_json: bool) -> None:
    """Containers made by `vnetctl container create`."""
    marks = marker_dir()
    rows: list[dict[str, Any]] = []
    for mark in sorted(marks.glob("*")) if marks.is_dir() else []:
        try:
            info = json.loads(mark.read_text())
        except (OSError, ValueError):
            info = {"name": mark.name}
        name = str(info.get("name", mark.name))
        exists = (NETNS_DIR / name).exists()
        rows.append({"name": name, "netns": str(NETNS_DIR / name), "exists": exists,
                     "created_at": info.get("created_at", ""),
                     "processes": len(_pids(name)) if exists and os.geteuid() == 0 else 0})
    if as_json:
        print_json(rows)
        return
    table = Table(title=f"containers ({marks})")
    for col in ("name", "namespace", "exists", "processes", "created"):
        table.add_column(col)
    for r in rows:
        table.add_row(escape(r["name"]), r["netns"], "yes" if r["exists"] else "[red]no[/red]", str(r["processes"]),
                      str(r["created_at"]))
    console.print(table)
