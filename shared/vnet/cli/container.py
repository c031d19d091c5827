"""``vnetctl container create|rm|ls NAME``: bare named network namespaces that stand for
containers in demos and tests (a real runtime passes its own namespace instead).

``create`` runs ``ip netns add NAME`` and brings loopback up inside; it leaves a marker
file ``<state dir>/containers/NAME`` (state dir: ``$VNET_STATE_DIR``, else
``~/.local/state/vnet``) so that ``rm`` deletes only namespaces vnetctl made — anything
else needs ``--force``. Nothing outside the new namespace is touched. Needs root.

When a container gets an endpoint whose node runs the resolver (``vnet-node --dns``),
``vnetctl endpoint create`` writes ``/etc/netns/NAME/resolv.conf`` pointing at it (the
iproute2 convention: ``ip netns exec NAME`` sees it as ``/etc/resolv.conf``), and ``rm``
removes it again.
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

from vnet.cli import output
from vnet.cli.main import cli, console, escape
from vnet.core import errors as E

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
NETNS_DIR = Path("/run/netns")
ETC_NETNS = Path("/etc/netns")  # `ip netns exec NAME` bind-mounts /etc/netns/NAME/* over /etc
RESOLV_MARK = "# written by vnetctl: the node's resolver of the container's network (docs/dns.md)"


def write_resolv_conf(name: str, nameservers: list[str], search: list[str], options: list[str]) -> bool:
    """Point a container made by `vnetctl container create` at its resolver, the iproute2
    way; never over a resolv.conf somebody else wrote. True when written."""
    if not NAME_RE.match(name) or not (marker_dir() / name).exists():
        return False
    f = ETC_NETNS / name / "resolv.conf"
    if f.exists() and RESOLV_MARK not in f.read_text(errors="replace"):
        return False
    f.parent.mkdir(parents=True, exist_ok=True)
    lines = [RESOLV_MARK, *(f"nameserver {n}" for n in nameservers)]
    if search:
        lines.append("search " + " ".join(search))
    if options:
        lines.append("options " + " ".join(options))
    f.write_text("\n".join(lines) + "\n")
    return True


def _forget_resolv_conf(name: str) -> None:
    f = ETC_NETNS / name / "resolv.conf"
    if f.exists() and RESOLV_MARK in f.read_text(errors="replace"):
        f.unlink()
        try:
            f.parent.rmdir()  # only when nothing else is in it
        except OSError:
            pass


def marker_dir() -> Path:
    from vnet.runtime.stack import default_state_dir

    return default_state_dir() / "containers"


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("ip") or next((p for p in ("/usr/sbin/ip", "/sbin/ip") if os.path.exists(p)), None)
    if binary is None:
        output.fail(E.UNPROCESSABLE.code, "the `ip` command (iproute2) is needed; install iproute2",
                    exit_code=output.EXIT_USAGE)
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=10, check=False)


def _check_name(name: str) -> None:
    if not NAME_RE.match(name):
        raise click.BadParameter(f"{name!r}: a container name is 1-64 letters, digits, '_', '.' or '-', starting "
                                 "with a letter or digit", param_hint="NAME")


def _need_root() -> None:
    if os.geteuid() != 0:
        output.fail(E.UNPROCESSABLE.code, "creating and deleting network namespaces needs root (sudo vnetctl ...)",
                    exit_code=output.EXIT_USAGE)


def _pids(name: str) -> list[str]:
    return _ip("netns", "pids", name).stdout.split()


@cli.group()
def container() -> None:
    """Bare network namespaces standing for containers (demos and tests)."""


class _Errors:
    """Per-name failures of a multi-name verb: error lines now, or the ``errors`` of the JSON."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.items: list[dict[str, Any]] = []

    def add(self, name: str, code: E.ErrorCode, message: str) -> None:
        self.items.append({"ref": name, **output.error_doc(code.code, message)})
        if not self.as_json:
            output.print_error(code.code, message)


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
    errors = _Errors(as_json)
    for n in names:
        if (NETNS_DIR / n).exists():
            ours = (marks / n).exists()
            errors.add(n, E.NAME_TAKEN, f"network namespace {n} already exists"
                       + (" (made by vnetctl)" if ours else " (not made by vnetctl)"))
            continue
        res = _ip("netns", "add", n)
        if res.returncode != 0:
            errors.add(n, E.INTERNAL, f"cannot create network namespace {n}: {res.stderr.strip()}")
            continue
        info = {"name": n, "netns": str(NETNS_DIR / n), "created_at": dt.datetime.now(dt.UTC).isoformat()}
        (marks / n).write_text(json.dumps(info))
        up = _ip("-n", n, "link", "set", "lo", "up")
        if up.returncode != 0:
            output.warn(f"loopback of {n} not up: {up.stderr.strip()}")
        made.append(info)
        if not as_json:
            console.print(f"created container {escape(n)} (network namespace {NETNS_DIR / n}); attach it with "
                          f"`vnetctl endpoint create {escape(n)} --network NET`", highlight=False)
    if as_json:
        output.emit({"items": made, "errors": errors.items})
    if errors.items:
        sys.exit(output.EXIT_ERROR)


@container.command("rm")
@click.argument("names", nargs=-1, required=True)
@click.option("--force", is_flag=True, help="Also delete namespaces vnetctl did not make, and ones with processes.")
@click.option("--json", "as_json", is_flag=True)
def rm_cmd(names: tuple[str, ...], force: bool, as_json: bool) -> None:
    """Delete network namespace(s) NAME made by `vnetctl container create`."""
    for n in names:
        _check_name(n)
    _need_root()
    marks = marker_dir()
    errors = _Errors(as_json)
    done: list[dict[str, Any]] = []
    for n in names:
        mark = marks / n
        exists = (NETNS_DIR / n).exists()
        if not exists:
            if mark.exists():
                mark.unlink()
                done.append({"name": n, "deleted": False, "forgotten": True})
                if not as_json:
                    console.print(f"container {escape(n)} was already gone; forgot it", highlight=False)
            else:
                errors.add(n, E.NOT_FOUND, f"no network namespace {n}")
            continue
        if not mark.exists() and not force:
            errors.add(n, E.CONFLICT, f"{n} was not made by `vnetctl container create` (no marker in {marks}); pass "
                       "--force to delete it anyway")
            continue
        pids = _pids(n)
        if pids and not force:
            errors.add(n, E.CONFLICT, f"{len(pids)} process(es) run in {n} ({' '.join(pids[:5])}); stop them, or "
                       "pass --force (they keep the namespace alive after its name is gone)")
            continue
        res = _ip("netns", "del", n)
        if res.returncode != 0:
            errors.add(n, E.INTERNAL, f"cannot delete {n}: {res.stderr.strip()}")
            continue
        _forget_resolv_conf(n)
        if mark.exists():
            mark.unlink()
        done.append({"name": n, "deleted": True, "forgotten": False})
        if not as_json:
            console.print(f"deleted container {escape(n)} (endpoints still attached to it turn failed until "
                          f"detached: `vnetctl endpoint ls -c {escape(n)}`)", highlight=False)
    if as_json:
        output.emit({"items": done, "errors": errors.items})
    if errors.items:
        sys.exit(output.EXIT_ERROR)


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
        output.emit_items(rows)
        return
    output.table(("name", "namespace", "exists", "processes", "created"),
                 [[r["name"], r["netns"], "yes" if r["exists"] else output.styled("no", "red"), str(r["processes"]),
                   str(r["created_at"])] for r in rows],
                 empty="no containers (`vnetctl container create NAME` makes one)", title=f"containers ({marks})")
