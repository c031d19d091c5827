"""Every example in README.md and docs/*.md runs as written, against real parts.

**What is checked.** Every fenced block of README.md and docs/*.md (docs/contract/ is
generated, not written) is either run here or excluded by a marker on the line right
before its fence::

    <!-- example: not run (why: an output listing, an API sketch of an internal class, ...) -->

``test_every_block_is_run_or_marked`` fails on a block with neither (a language this file
cannot run, or a command it does not know) and on a marker that stands before no fence, so
a new block in the docs cannot escape silently. It needs no servers and no root.

**How a page runs** (``test_page_examples_run``, one per page): one control plane per page
(conftest's nats-server and valkey, ``control_plane(...)`` with every service plus a node
worker on a host namespace the test makes, a fresh Redis database), the page's blocks in
order, in one session.

* ```` ```console ````: each ``$ `` line is a command, the lines up to the next ``$ `` are its
  documented output. ```` ```sh ```` / ```` ```bash ````: every line is a command.

  - ``vnetctl ...`` / ``.venv/bin/vnetctl ...``: the real CLI as a subprocess, pointed at the
    test stack by ``VNET_NATS_URL``, ``VNET_REDIS_URL`` and ``VNET_STATE_DIR`` (a temp dir).
    Exit 0 expected, or N where the line's comment says ``# exit N``; when the documented
    output starts with ``error:``, nonzero, and the error code the doc shows
    (``(address_in_use)`` or ``[code]`` at its end) must be in what the CLI printed.
  - ``sudo ip netns exec NS ping ...``: ``sudo`` dropped; NS must be a namespace this test
    made (else the test fails: no packet leaves the namespaces of the test).
  - ``nats req SUBJECT BODY``: sent with nats-py to the test's NATS (the test server has no
    accounts, so ``--user``/``--password`` are dropped); the reply must carry
    ``Vnet-Trace-Id`` and no error.
  - ``a && b``: both, in order. ``{1..N}`` in an argument expands as in bash.
  - ``vnetctl ... | cut -f1 | ...``: through ``bash -o pipefail``, the filters after a pipe
    limited to ``PIPE_FILTERS`` (text filters that touch nothing).
  - Skipped by an explicit rule (``SKIP_RULES``), counted and printed: the lines that start
    or stop a stack or run the test suite (``bash ops/scripts/up.sh|test.sh``,
    ``vnetctl up|down``); tests/install and tests/integration/test_stack.py run those.
  - Anything else fails: teach this file to run it, or mark the block.
* ```` ```python ````: a block that calls ``asyncio.run(...)`` is a complete program and runs
  as a subprocess with the same environment variables (so ``VNetConfig.load()`` finds the
  test stack); exit 0 expected. Any other block is a fragment: compiled with top-level
  ``await`` allowed and run in one module namespace per page, so it continues the blocks
  before it; before each fragment ``cfg`` (the test stack's VNetConfig) and ``vnet`` (an
  open VNetManager on it) are bound, and ``VNetConfig.load()`` sees the test stack through
  the environment. Containers a fragment attaches (the first argument of
  ``create_endpoint``) are made first, as a container runtime would have. A block that
  defines ``SERVICE = ServiceDef(...)`` is started on the runtime and ``PAGE_CHECKS`` call it.

**Uniform substitutions** (what makes a doc's names safe and its ids real):

* container names -> ``<VNET_RUN_PREFIX>-<name>``. A name is an argument of ``vnetctl
  container create|rm``, the first argument of ``vnetctl endpoint create|attach`` (with
  ``--count N`` also NAME-1 .. NAME-N), the value of ``-c/--container``, the NS of ``ip
  netns exec NS``, and in Python the first argument of ``create_endpoint(`` or a
  ``container=``/``"/run/netns/NAME"`` literal. Every whole-word occurrence of such a name in
  a page's commands, Python string literals and documented output is substituted.
* the node name ``myhost`` -> the test's node worker ``<VNET_RUN_PREFIX>-myhost``.
* ids: a 16-hex-digit id in a command's documented output stands for the id at the same
  position in the real output of that command; later commands get the real id.

**Output.** The documented output lines are illustrations (ids, addresses, timings differ).
Where cheap the shape is checked: the leading words of the first documented line (names
substituted, up to the first word holding a digit; tables and elisions excluded) must begin
a line of the real output, e.g. "created network web".

**Network safety.** Every namespace a page makes (``vnetctl container create``, the demo's
``<prefix>-demo-*``, the containers of Python fragments) carries the run prefix and is
deleted at teardown, pass or fail; macvlan networks (``parent=eth0``) are records only (no
endpoint is attached to them, and the node worker lives in the test's host namespace, which
has no eth0).

**One module over 600 lines on purpose** (the house rule of issue 17). It is the one place that
says what every fenced block of the docs turns into: the same functions (``read_blocks``,
``classify``, ``shell_commands``, ``plan_page``, ``Subst``) decide what the inventory test
accepts as run and what ``test_page_examples_run`` then runs, so "run or marked" stays true
only while the rule and its execution change together. A doc writer whose block is refused
is told to teach this file (a new kind of command is a rule in ``classify``, a step in
``_run_commands`` and perhaps a substitution, read and changed side by side); split into a
parser and a runner, the inventory could accept what the runner does not know.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import tokenize
import types
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.conftest import ControlPlane, control_plane
from vnet.runtime.config import VNetConfig

T = TypeVar("T")
ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
VNETCTL = str(Path(sys.executable).parent / "vnetctl")
NODE_NAME_IN_DOCS = "myhost"

FENCE_RE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<lang>[^`\s]*)")
MARKER_RE = re.compile(r"^\s*<!--\s*example:\s*not run\s*\((?P<why>.+)\)\s*-->\s*$")
MARKER_START_RE = re.compile(r"^\s*<!--\s*example:")
RUNNABLE = {"python", "console", "sh", "bash", "shell"}

SKIP_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^bash ops/scripts/(up|test)\.sh\b"),
     "starts the stack or runs the suite: tests/install/test_install.py and tests/integration/test_stack.py"),
    (re.compile(r"^(\S*/)?vnetctl (up|down)\b"), "starts or stops a local stack: tests/integration/test_stack.py"),
]

ID_RE = re.compile(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{16}\b")
# A real id is 16 random hex digits: one in ~1,900 has no letter (8903520999834152 failed a CI
# run: not learned, the page's id was sent as written) and a few in 10^7 no digit. The doc's
# ids (ID_RE) are written with both; what a command printed is read with this.
REAL_ID_RE = re.compile(r"\b[0-9a-f]{16}\b")
BOX_CHARS = set("┏┃┓┡╇┩│└┘┴┬├─━┗┛╋")
ERROR_CODE_RE = re.compile(r"(?:\(([a-z][a-z0-9_]*)\)|\[([a-z][a-z0-9_]*)\])\s*$")
BRACES_RE = re.compile(r"\{(\d+)\.\.(\d+)\}")
# Text filters a doc may pipe vnetctl's output through (they read stdin, touch nothing).
PIPE_FILTERS = {"cat", "cut", "tail", "head", "wc", "grep", "sort"}
EXIT_COMMENT_RE = re.compile(r"\s#\s*exits?\s+(\d+)\b")


# --- the blocks of a page -----------------------------------------------------------------

@dataclass
class Block:
    page: str       # relative to the repository root
    line: int       # of the opening fence, 1-based
    lang: str
    text: str
    marker: str | None  # the reason of an `example: not run` marker, or None

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def read_blocks(path: Path) -> tuple[list[Block], list[str]]:
    """The fenced blocks of a Markdown file, and the problems with its markers."""
    rel = _rel(path)
    lines = path.read_text().splitlines()
    blocks: list[Block] = []
    problems: list[str] = []
    used_markers: set[int] = set()
    i = 0
    while i < len(lines):
        m = FENCE_RE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence = m["indent"], m["fence"]
        close = re.compile(rf"^\s*{re.escape(fence[0])}{{{len(fence)},}}\s*$")
        j = i + 1
        while j < len(lines) and not close.match(lines[j]):
            j += 1
        body = [ln[len(indent):] if ln.startswith(indent) else ln.lstrip() for ln in lines[i + 1:j]]
        marker = None
        if i > 0 and (mm := MARKER_RE.match(lines[i - 1])):
            marker = mm["why"].strip()
            used_markers.add(i - 1)
        blocks.append(Block(rel, i + 1, m["lang"].lower(), "\n".join(body), marker))
        i = j + 1
    for n, ln in enumerate(lines):
        if MARKER_START_RE.match(ln) and n not in used_markers:
            problems.append(f"{rel}:{n + 1}: a marker must read `<!-- example: not run (why) -->` and stand on the "
                            f"line right before a fence: {ln.strip()!r}")
    return blocks, problems


# --- what a page's blocks turn into -------------------------------------------------------

@dataclass
class Cmd:
    """One shell command of a block (a part of an `a && b` line) and its documented output."""

    argv: list[str]
    output: list[str]
    block: Block
    kind: str  # vnetctl | ping | nats | skip
    skip_reason: str = ""
    exit_code: int = 0  # what the doc says it exits with (`# exit N` after the command)
    pipe: list[list[str]] = field(default_factory=list)  # filters its output goes through

    @property
    def text(self) -> str:
        return shlex.join(self.argv)


@dataclass
class Plan:
    page: str
    steps: list[tuple[Block, list[Cmd] | None]] = field(default_factory=list)  # None: a Python block
    names: set[str] = field(default_factory=set)  # container names the page uses
    run_blocks: int = 0
    marked: list[Block] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def needs_stack(self) -> bool:
        return any(cmds is None or any(c.kind != "skip" for c in cmds) for _, cmds in self.steps)


def expand_braces(arg: str) -> list[str]:
    """``batch-{1..3}`` -> batch-1 batch-2 batch-3, as bash does (numeric ranges only)."""
    m = BRACES_RE.search(arg)
    if not m:
        return [arg]
    lo, hi = int(m[1]), int(m[2])
    out: list[str] = []
    for k in range(lo, hi + 1):
        out += expand_braces(arg[:m.start()] + str(k) + arg[m.end():])
    return out


def _positionals(args: list[str]) -> list[str]:
    """Arguments that are not options (a doc's options with values are always `--opt value`)."""
    flags = {"--json", "--force", "--wait", "--no-wait", "-v", "--verbose", "--all", "--keep"}
    out: list[str] = []
    skip = False
    for a in args:
        if skip:
            skip = False
            continue
        if a.startswith("-"):
            skip = a not in flags and "=" not in a
            continue
        out.append(a)
    return out


def container_names_of(argv: list[str]) -> set[str]:
    """The container names a command uses (see the module docstring)."""
    if argv[:3] == ["ip", "netns", "exec"] and len(argv) > 3:
        return {argv[3]}
    if not argv or not argv[0].endswith("vnetctl"):
        return set()
    args = [x for a in argv[1:] for x in expand_braces(a)]
    names: set[str] = set()
    for opt in ("-c", "--container"):
        names |= {args[k + 1] for k, a in enumerate(args[:-1]) if a == opt}
    if args[:2] in (["container", "create"], ["container", "rm"]):
        names |= set(_positionals(args[2:]))
    if args[:2] in (["endpoint", "create"], ["endpoint", "attach"]):
        pos = _positionals(args[2:])
        if pos:
            names.add(pos[0])
            if "--count" in args:
                n = int(args[args.index("--count") + 1])
                names |= {f"{pos[0]}-{k}" for k in range(1, n + 1)}
    return names


PY_NAME_RES = [re.compile(r"create_endpoint\(\s*\"([^\"]+)\""), re.compile(r"container=\"([^\"]+)\""),
               re.compile(r"\"/run/netns/([^\"/]+)\"")]


def classify(argv: list[str]) -> tuple[str, str]:
    text = shlex.join(argv)
    for rule, why in SKIP_RULES:
        if rule.search(text):
            return "skip", why
    if argv and (argv[0] == "vnetctl" or argv[0].endswith("/vnetctl")):
        return "vnetctl", ""
    if argv[:3] == ["ip", "netns", "exec"] and len(argv) > 4 and argv[4] == "ping":
        return "ping", ""
    if argv[:2] == ["nats", "req"]:
        return "nats", ""
    raise ValueError(f"a command this test does not know how to run: {text!r} (teach tests/docs/test_examples.py "
                     "to run it, or mark the block `<!-- example: not run (why) -->`)")


def _split(words: list[str], sep: str) -> list[list[str]]:
    out: list[list[str]] = [[]]
    for w in words:
        if w == sep:
            out.append([])
        else:
            out[-1].append(w)
    return [x for x in out if x]


def shell_commands(block: Block) -> list[Cmd]:
    """The commands of a console/sh block with their documented output."""
    cmds: list[Cmd] = []
    lines = block.text.splitlines()
    k = 0
    while k < len(lines):
        line = lines[k]
        k += 1
        if block.lang == "console":
            if not line.startswith("$ "):
                if cmds:
                    cmds[-1].output.append(line)
                elif line.strip():
                    raise ValueError(f"{block.where}: output before the first `$ ` command: {line!r}")
                continue
            line = line[2:]
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        while line.endswith("\\") and k < len(lines):
            line = line[:-1] + " " + lines[k]
            k += 1
        words = shlex.split(line, comments=True)
        said = EXIT_COMMENT_RE.search(line)
        parts = _split(words, "&&")
        for p in parts:
            if p[0] == "sudo":
                p = p[1:]
            stages = _split(p, "|")
            for st in stages[1:]:
                if st[0] not in PIPE_FILTERS:
                    raise ValueError(f"{block.where}: `{st[0]}` after a pipe is not one of {sorted(PIPE_FILTERS)}")
            kind, why = classify(stages[0])
            if stages[1:] and kind != "vnetctl":
                raise ValueError(f"{block.where}: only vnetctl output is piped here: {shlex.join(p)!r}")
            cmds.append(Cmd(stages[0], [], block, kind, why, pipe=stages[1:]))
        if said:
            cmds[-1].exit_code = int(said[1])
    # Documented output belongs to the last command of its line.
    return cmds


def plan_page(path: Path) -> Plan:
    blocks, problems = read_blocks(path)
    plan = Plan(_rel(path), problems=problems)
    for b in blocks:
        if b.marker is not None:
            plan.marked.append(b)
            continue
        if b.lang not in RUNNABLE:
            plan.problems.append(f"{b.where}: a ```{b.lang or '(no language)'} block is neither run nor marked: "
                                 "run it (python, console, sh) or put `<!-- example: not run (why) -->` on the "
                                 "line right before its fence")
            continue
        if b.lang == "python":
            try:
                ast.parse(b.text) if "asyncio.run(" in b.text else compile(
                    b.text, b.where, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT, dont_inherit=True)
            except SyntaxError as err:
                plan.problems.append(f"{b.where}: not valid Python: {err}")
                continue
            for rx in PY_NAME_RES:
                plan.names |= set(rx.findall(b.text))
            plan.steps.append((b, None))
        else:
            try:
                cmds = shell_commands(b)
            except ValueError as err:
                plan.problems.append(f"{b.where}: {err}")
                continue
            for c in cmds:
                if c.kind != "skip":
                    plan.names |= container_names_of(c.argv)
            plan.steps.append((b, cmds))
        plan.run_blocks += 1
    return plan


# --- substitutions --------------------------------------------------------------------------

class Subst:
    """Container names -> prefixed, the docs' node -> the test's, documented ids -> real ones."""

    def __init__(self, names: set[str], prefix: str, node: str) -> None:
        self.map = {n: f"{prefix}-{n}" for n in names}
        self.map[NODE_NAME_IN_DOCS] = node
        alts = "|".join(re.escape(n) for n in sorted(self.map, key=len, reverse=True))
        self.rx = re.compile(rf"(?<![\w.-])({alts})(?![\w.-])")
        self.ids: dict[str, str] = {}

    def text(self, s: str) -> str:
        s = self.rx.sub(lambda m: self.map[m[1]], s)
        for doc_id, real in self.ids.items():
            s = s.replace(doc_id, real)
        return s

    def python(self, src: str) -> str:
        """Names substituted inside string literals only (code and comments stay as written)."""
        toks = list(tokenize.generate_tokens(io.StringIO(src).readline))
        lines = src.splitlines(keepends=True)
        edits: list[tuple[int, int, str]] = []
        for t in toks:
            if t.type == tokenize.STRING and t.start[0] == t.end[0]:
                new = self.text(t.string)
                if new != t.string:
                    edits.append((t.start[0], t.start[1], t.string))
        for row, col, old in reversed(edits):  # right to left: earlier columns stay valid
            ln = lines[row - 1]
            lines[row - 1] = ln[:col] + self.text(old) + ln[col + len(old):]
        return "".join(lines)

    def learn_ids(self, documented: list[str], real: str) -> None:
        doc_ids = [i for i in dict.fromkeys(ID_RE.findall("\n".join(documented))) if i not in self.ids]
        taken = set(self.ids.values())
        real_ids = [i for i in dict.fromkeys(REAL_ID_RE.findall(real)) if i not in taken]
        self.ids.update(zip(doc_ids, real_ids, strict=False))


def leading_words(line: str, known: set[str]) -> str | None:
    """The words a real output line must start with (None: nothing cheap to check)."""
    words = line.split()
    if not words or words[0] in ("...", "…") or words[0].startswith(("…", "...")):
        return None
    out: list[str] = []
    for w in words[:4]:
        if w not in known and (any(ch.isdigit() for ch in w) or w in ("...", "…")):
            break
        out.append(w)
    return " ".join(out) or None


# --- the inventory (no servers, no root) ----------------------------------------------------

def test_every_block_is_run_or_marked() -> None:
    problems: list[str] = []
    rows: list[str] = []
    for page in PAGES:
        plan = plan_page(page)
        problems += plan.problems
        skips = sum(1 for _, cmds in plan.steps if cmds for c in cmds if c.kind == "skip")
        rows.append(f"  {plan.page:28} run {plan.run_blocks:2}  marked not run {len(plan.marked):2}  "
                    f"skipped commands {skips}")
    print("\ndoc example blocks:\n" + "\n".join(rows))
    assert not problems, "\n".join(problems)


def test_the_inventory_catches_unmarked_and_unknown_blocks(tmp_path: Path) -> None:
    """The guard itself: an unmarked listing, an unknown command and a stray marker are refused;
    a marked block is counted as not run."""
    page = tmp_path / "probe.md"
    page.write_text("text\n\n```\na listing\n```\n\n```console\n$ rm -rf /\n```\n\n"
                    "<!-- example: not run (a listing) -->\n```text\nx\n```\n\n"
                    "<!-- example: not run (x) -->\n\nprose\n")
    plan = plan_page(page)
    assert len(plan.problems) == 3, plan.problems
    assert "neither run nor marked" in plan.problems[1] or "neither run nor marked" in plan.problems[0]
    assert any("does not know how to run" in p for p in plan.problems)
    assert any("right before a fence" in p for p in plan.problems)
    assert [b.marker for b in plan.marked] == ["a listing"]


def test_substitutions_are_whole_words_and_ids_follow_positions() -> None:
    s = Subst({"web-1", "batch", "batch-1", "c1"}, "vtx", "vtx-myhost")
    assert s.text("vnetctl endpoint create web-1 --network web") == "vnetctl endpoint create vtx-web-1 --network web"
    assert s.text("web-10 web-1. deploy-42-web-1 /run/netns/web-1") == \
        "web-10 web-1. deploy-42-web-1 /run/netns/vtx-web-1"
    assert s.python('x = "c1"  # c1\nc1 = f("web-1", node="myhost")\n') == \
        'x = "vtx-c1"  # c1\nc1 = f("vtx-web-1", node="vtx-myhost")\n'
    s.learn_ids(["web-1 → web: on node myhost (3f2c9e0d41aa47b1) ready"], "vtx-web-1 → web: (0123456789abcdef) ready")
    assert s.text("vnetctl endpoint rm 3f2c9e0d41aa47b1") == "vnetctl endpoint rm 0123456789abcdef"
    s.learn_ids(["created network web 3dba8cc3425c487e 10.99.0.0/24"],
                "created network web 8903520999834152 10.99.0.0/24")  # a real id may have no letter
    assert s.text("vnetctl ipam request 3dba8cc3425c487e ep-1") == "vnetctl ipam request 8903520999834152 ep-1"
    assert expand_braces("b-{1..3}") == ["b-1", "b-2", "b-3"]
    assert container_names_of(["vnetctl", "endpoint", "create", "batch", "--count", "2", "--network", "w"]) == \
        {"batch", "batch-1", "batch-2"}
    assert leading_words("created network web 3dba8cc3425c487e 10.1.0.0/16", set()) == "created network web"
    assert leading_words("… Vnet-Trace-Id: x", set()) is None


PY_CIDR_RES = [re.compile(r"create_(?:network|pool)\(\s*\"[^\"]*\",\s*\"([^\"]+)\""),
               re.compile(r"\"cidr\"\s*:\s*\"([^\"]+)\"")]


def explicit_ranges(plan: Plan) -> list[tuple[str, str]]:
    """(where, cidr) of every IPv4 range a page's examples give a network or a pool explicitly."""
    out: list[tuple[str, str]] = []
    for block, cmds in plan.steps:
        if cmds is None:
            out += [(block.where, c) for rx in PY_CIDR_RES for c in rx.findall(block.text)]
            continue
        for c in cmds:
            a = c.argv
            out += [(block.where, a[k + 1]) for k in range(len(a) - 1) if a[k] == "--cidr"]
            if a[1:3] == ["ipam", "pool-create"] and len(a) > 4:
                out.append((block.where, a[4]))
            out += [(block.where, x) for arg in a for rx in PY_CIDR_RES[1:] for x in rx.findall(arg)]
    return [(w, c) for w, c in out if ":" not in c]


def test_example_ranges_collide_neither_with_each_other_nor_with_automatic_carving() -> None:
    """A reader who runs a page's examples one after the other (and `vnetctl network create
    NAME`, which carves from default_subnet) never meets subnet_overlap."""
    import ipaddress

    pool = ipaddress.ip_network(VNetConfig.load(env={}).default_subnet)  # the default, what a newcomer has
    problems: list[str] = []
    for page in PAGES:
        seen: list[tuple[str, ipaddress.IPv4Network | ipaddress.IPv6Network]] = []
        for where, cidr in explicit_ranges(plan_page(page)):
            net = ipaddress.ip_network(cidr, strict=False)
            if net.overlaps(pool):
                problems.append(f"{where}: {cidr} is in the automatic carving pool {pool}")
            problems += [f"{where}: {cidr} overlaps {other} ({w2})" for w2, other in seen if net.overlaps(other)]
            seen.append((where, net))
    assert not problems, "\n".join(problems)
    assert len(explicit_ranges(plan_page(ROOT / "README.md"))) >= 2  # the README's two examples are seen


async def test_commands_outside_the_tests_namespaces_are_refused_before_they_run() -> None:
    """NETWORK SAFETY of the runner itself: a ping from a namespace the test did not make, and a
    container name the substitution missed, fail before any process starts."""
    block = Block("probe.md", 1, "console", "", None)
    pn = PageNamespaces("vtx", Path("/nonexistent"))
    ping = Cmd(["ip", "netns", "exec", "web-1", "ping", "-c1", "10.1.0.50"], [], block, "ping")
    with pytest.raises(AssertionError, match="not a namespace this test made"):
        await _run_commands([ping], None, {}, Subst({"web-1"}, "vtx", "vtx-myhost"), pn, set(), [])
    create = Cmd(["vnetctl", "container", "create", "web-1"], [], block, "vnetctl")
    with pytest.raises(AssertionError, match="without the run prefix"):
        await _run_commands([create], None, {}, Subst(set(), "vtx", "vtx-myhost"), pn, set(), [])


# --- running a page -------------------------------------------------------------------------

def _netns_list() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
    return {ln.split()[0] for ln in out.splitlines() if ln.strip()}


def _delete_netns(names: set[str]) -> None:
    for ns in names:
        for pid in subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split():
            try:
                os.kill(int(pid), 9)
            except (ProcessLookupError, ValueError):
                pass
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        # `vnetctl endpoint create` may have given it a resolv.conf (a node with DNS); names are ours.
        shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)


@dataclass
class PageNamespaces:
    """Namespaces a page's examples may make; all deleted at teardown, pass or fail."""

    prefix: str
    state_dir: Path  # the CLI's VNET_STATE_DIR: `container create` leaves a marker per namespace there
    expected: set[str] = field(default_factory=set)  # full names (the substituted containers)
    before: set[str] = field(default_factory=set)

    def ours(self) -> set[str]:
        now = _netns_list()
        demo = {n for n in now - self.before if n.startswith(f"{self.prefix}-demo-")}
        marks = self.state_dir / "containers"
        by_cli = {m.name for m in marks.iterdir()} if marks.is_dir() else set()
        return (now & (self.expected | by_cli)) | demo


@pytest.fixture
def page_namespaces(run_prefix: str, tmp_path: Path) -> Iterator[PageNamespaces]:
    # Taken before `start_service`: the services stop before these namespaces go.
    pn = PageNamespaces(run_prefix, tmp_path / "state", before=_netns_list())
    yield pn
    _delete_netns(pn.ours())
    left = pn.ours()
    assert not left, f"namespaces left behind: {left}"


def _cli_env(cfg: VNetConfig, state_dir: Path) -> dict[str, str]:
    """This environment without VNet settings, pointed at the test stack."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VNET_") or k == "VNET_RUN_PREFIX"}
    env.update(VNET_NATS_URL=cfg.nats_url, VNET_REDIS_URL=cfg.redis_url, VNET_STATE_DIR=str(state_dir),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    return env


# The commands wait for the services, which run on this process's event loop: they block a
# thread of their own, never one of the default executor the node worker reconciles in.
_COMMANDS = ThreadPoolExecutor(2, thread_name_prefix="doc-example")


async def _off_loop(fn: Callable[..., T], *args: Any) -> T:
    return await asyncio.get_running_loop().run_in_executor(_COMMANDS, fn, *args)


def _run(argv: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)


def _ping(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """A probe between namespaces of the test: up to three tries (a busy machine can lose the first)."""
    res = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    for _ in range(2):
        if res.returncode == 0:
            break
        res = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    return res


async def _nats_req(argv: list[str], cfg: VNetConfig) -> str:
    import nats

    pos = _positionals(argv[2:])
    assert len(pos) == 2, f"nats req SUBJECT BODY expected: {argv}"
    nc = await nats.connect(cfg.nats_url, name="test-doc-examples")
    try:
        msg = await nc.request(pos[0], pos[1].encode(), timeout=30)
    finally:
        await nc.close()
    headers = msg.headers or {}
    assert "Nats-Service-Error" not in headers, f"{shlex.join(argv)} answered an error: {headers} {msg.data!r}"
    assert headers.get("Vnet-Trace-Id"), f"{shlex.join(argv)}: no Vnet-Trace-Id in the reply headers {headers}"
    return "\n".join(f"{k}: {v}" for k, v in headers.items()) + "\n" + msg.data.decode()


def _boxed(line: str) -> bool:
    return any(ch in BOX_CHARS for ch in line)


def _cut(text: str, limit: int = 2000) -> str:
    return text if len(text) <= limit else text[:limit] + f"\n... ({len(text) - limit} more characters)"


def _check_output(cmd: Cmd, argv: list[str], res: subprocess.CompletedProcess[str], subst: Subst) -> None:
    shown = "\n".join(["$ " + shlex.join(argv), _cut(res.stdout), _cut(res.stderr)])
    documented = [subst.text(x) for x in cmd.output if x.strip()]
    if documented and documented[0].lstrip().startswith("error:"):
        assert res.returncode != 0, f"{cmd.block.where}: the doc shows an error, the command succeeded:\n{shown}"
        m = ERROR_CODE_RE.search(" ".join(documented))
        if m:
            code = m[1] or m[2]
            assert code in res.stdout + res.stderr, f"{cmd.block.where}: error code {code} expected:\n{shown}"
        return
    assert res.returncode == cmd.exit_code, f"{cmd.block.where}: exit {res.returncode}, the doc says " \
        f"{cmd.exit_code}:\n{shown}"
    # Tables are drawn for a terminal (tab-separated in a pipe): no shape check on one, nor on
    # a table's title (the line before its top border).
    if documented and not (_boxed(documented[0]) or (len(documented) > 1 and _boxed(documented[1]))):
        lead = leading_words(documented[0], set(subst.map.values()))
        if lead:
            real = [" ".join(x.split()) for x in (res.stdout + "\n" + res.stderr).splitlines()]
            assert any(x.startswith(lead) for x in real), \
                f"{cmd.block.where}: the doc shows {documented[0]!r}; no output line starts with {lead!r}:\n{shown}"
    subst.learn_ids(cmd.output, res.stdout)


async def _run_commands(cmds: list[Cmd], cp: ControlPlane | None, env: dict[str, str], subst: Subst,
                        pn: PageNamespaces, made: set[str], log: list[str]) -> None:
    for cmd in cmds:
        if cmd.kind == "skip":
            log.append(f"{cmd.block.where}: skipped `{cmd.text}`: {cmd.skip_reason}")
            continue
        t0 = time.perf_counter()
        # Braces first: `batch-{1..3}` names batch-1 .. batch-3, each substituted.
        argv = [subst.text(x) for a in cmd.argv for x in expand_braces(a)]
        # NETWORK SAFETY: every container (namespace) a command names carries the run prefix.
        stray = {n for n in container_names_of(argv) if not n.startswith(f"{pn.prefix}-")}
        assert not stray, f"{cmd.block.where}: not running {argv}: names without the run prefix {stray}"
        if cmd.kind == "vnetctl":
            argv[0] = VNETCTL
            if cmd.pipe:
                script = " | ".join(shlex.join(st) for st in [argv, *cmd.pipe])
                res = await _off_loop(_run, ["bash", "-o", "pipefail", "-c", script], env)
            else:
                res = await _off_loop(_run, argv, env)
            if argv[1:3] == ["container", "create"]:
                made |= {a for a in argv[3:] if not a.startswith("-")}
        elif cmd.kind == "ping":
            ns = argv[3]
            # NETWORK SAFETY: probes only from a namespace this test made, to an address there.
            assert ns in made, f"{cmd.block.where}: {ns} is not a namespace this test made: not running {argv}"
            res = await _off_loop(_ping, argv)
        else:
            assert cp is not None
            data = await _nats_req(argv, cp.cfg)
            res = subprocess.CompletedProcess(argv, 0, data, "")
        log.append(f"{cmd.block.where}: ran `{shlex.join(argv)}` -> exit {res.returncode} in "
                   f"{time.perf_counter() - t0:.2f}s: {res.stdout[:1200]!r}")
        _check_output(cmd, argv, res, subst)


def _make_container(name: str) -> None:
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True, capture_output=True)


async def _run_python(block: Block, src: str, mod: types.ModuleType, cp: ControlPlane, env: dict[str, str],
                      made: set[str], start_service: Callable[..., Awaitable[Any]]) -> None:
    if "asyncio.run(" in src:
        res = await _off_loop(_run, [sys.executable, "-c", src], env, 120)
        assert res.returncode == 0, \
            f"{block.where}: the program exited {res.returncode}:\n{_cut(res.stdout)}\n{_cut(res.stderr)}"
        return
    # A fragment: the containers it attaches exist first (a runtime would have made them).
    for rx in PY_NAME_RES[:1]:
        for name in rx.findall(src):
            # NETWORK SAFETY: the substitution gave it the run prefix, or it is not made.
            assert name.startswith(f"{os.environ['VNET_RUN_PREFIX']}-"), f"{block.where}: {name} lacks the run prefix"
            if name not in made and name not in _netns_list():
                await _off_loop(_make_container, name)
                made.add(name)
    mod.__dict__.update(cfg=cp.cfg, vnet=cp.m)
    # Padded so that a traceback names the page and its line (pytest shows the Markdown).
    code = compile("\n" * block.line + src, str(ROOT / block.page), "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT,
                   dont_inherit=True)
    result = eval(code, mod.__dict__)
    if inspect.iscoroutine(result):
        await result
    from vnet.runtime.service import ServiceDef

    if isinstance(mod.__dict__.get("SERVICE"), ServiceDef):
        await start_service(mod.__dict__["SERVICE"], cfg=cp.cfg)
        check = PAGE_CHECKS.get(block.page)
        assert check is not None, f"{block.where} defines a service: add a check to PAGE_CHECKS that calls it"
        await check(cp, mod)


async def _check_service_pattern(cp: ControlPlane, mod: types.ModuleType) -> None:
    """docs/service-pattern.md's example service answers as the page says."""
    from vnet.core.errors import NotFound

    ns = mod.__dict__
    rep = await cp.m.call(ns["GREET"], ns["Greet"](name="ada", times=2), ns["Greeting"])
    assert rep.text == "hello ada hello ada"
    with pytest.raises(NotFound):
        await cp.m.call(ns["GREET"], ns["Greet"](name="nobody"), ns["Greeting"])


PAGE_CHECKS: dict[str, Callable[[ControlPlane, types.ModuleType], Awaitable[None]]] = {
    "docs/service-pattern.md": _check_service_pattern,
}


@pytest.fixture
def page_env(monkeypatch: pytest.MonkeyPatch) -> Callable[[VNetConfig, Path], dict[str, str]]:
    """In this process too, ``VNetConfig.load()`` sees the test stack (fragments call it)."""

    def _set(cfg: VNetConfig, state_dir: Path) -> dict[str, str]:
        for k in [k for k in os.environ if k.startswith("VNET_") and k != "VNET_RUN_PREFIX"]:
            monkeypatch.delenv(k)
        env = _cli_env(cfg, state_dir)
        for k in ("VNET_NATS_URL", "VNET_REDIS_URL", "VNET_STATE_DIR"):
            monkeypatch.setenv(k, env[k])
        return env

    return _set


def _page_ids() -> list[Any]:
    return [pytest.param(p, id=str(p.relative_to(ROOT))) for p in PAGES if plan_page(p).steps]


@pytest.mark.netns
@pytest.mark.timeout(240)  # a hung command fails the page (teardown still removes its namespaces)
@pytest.mark.parametrize("page", _page_ids())
async def test_page_examples_run(page: Path, config: VNetConfig, netns: Callable[[str], str],
                                 page_namespaces: PageNamespaces, start_service: Callable[..., Awaitable[Any]],
                                 page_env: Callable[[VNetConfig, Path], dict[str, str]], run_prefix: str,
                                 tmp_path: Path) -> None:
    plan = plan_page(page)
    assert not plan.problems, "\n".join(plan.problems)
    log: list[str] = []
    if not plan.needs_stack:
        for _, cmds in plan.steps:
            await _run_commands(cmds or [], None, {}, Subst(set(), run_prefix, ""), page_namespaces, set(), log)
        print("\n" + "\n".join(log))
        return
    if os.geteuid() != 0:
        pytest.skip("the examples make network namespaces: needs root")
    node = f"{run_prefix}-{NODE_NAME_IN_DOCS}"
    subst = Subst(plan.names, run_prefix, node)
    page_namespaces.expected |= set(subst.map.values())
    made: set[str] = set()
    slug = re.sub(r"\W", "_", plan.page)
    mod = types.ModuleType(f"vnet_doc_example_{slug}")
    sys.modules[mod.__name__] = mod
    try:
        t0 = time.perf_counter()
        async with control_plane(config, start_service, netns, host="docs-host", node=node, resync_s=5.0,
                                 services=("ipam", "network", "endpoint", "policy", "metrics")) as cp:
            env = page_env(cp.cfg, page_namespaces.state_dir)
            log.append(f"{plan.page}: control plane up in {time.perf_counter() - t0:.2f}s")
            for block, cmds in plan.steps:
                if cmds is None:
                    src = subst.python(block.text)
                    log.append(f"{block.where}: python ({'program' if 'asyncio.run(' in src else 'fragment'})")
                    await _run_python(block, src, mod, cp, env, made, start_service)
                else:
                    await _run_commands(cmds, cp, env, subst, page_namespaces, made, log)
    finally:
        sys.modules.pop(mod.__name__, None)
        print("\n" + "\n".join(log))
