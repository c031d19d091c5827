"""Run a mutation once per request id, also when a repeat arrives while the first still runs.

A client that timed out sends the request again with the same ``request_id`` (VNetManager
does it by itself), often while the first attempt is still running. Recording the reply only
after the change let such a repeat run the change a second time and answer what the second
run saw (404: already deleted, 409: already a member, a reply without the change). Here the
request id is claimed in Redis before the change (one script: absent -> a pending marker
with a short TTL; :mod:`vnet.adapters.idempotency`):

* the request that claims it runs the change, extends the marker while it runs, and
  replaces the marker with its reply (kept a day);
* a repeat that finds the reply answers it; one that finds the marker polls for the reply
  until shortly before its caller's deadline (at most :data:`WAIT_MAX_S`), then answers
  503 ``unavailable`` ("retry with the same request_id"; ``details.pending`` is true, and
  VNetManager retries such an answer by itself);
* a first request that fails drops its marker, so a waiting repeat runs the change itself
  (errors are not stored: a repeat after a 409 tries again, as before);
* a process that dies mid-change stops extending its marker, which expires after
  :data:`PENDING_TTL_S`: a later retry runs the change (crash safety).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar

import msgspec

from vnet.core import errors as E
from vnet.runtime.ports import ReplyStorePort

log = logging.getLogger(__name__)

T = TypeVar("T")

PENDING = b"\x00pending:"  # the marker's prefix (a stored reply is JSON: it starts with "{")
PENDING_TTL_S = 15.0  # how long a dead request's claim blocks the request id
KEEP_EVERY_S = 5.0  # the running request extends its claim this often
WAIT_MAX_S = 30.0  # longest a repeat waits for the first's reply
WAIT_NO_DEADLINE_S = 10.0  # ... when its caller sent no deadline
DEADLINE_MARGIN_S = 0.5  # answer this long before the caller's deadline, so the answer reaches it


def _wait_until(deadline: float | None) -> float:
    """Monotonic time until which a repeat waits for the first's reply."""
    now = time.monotonic()
    if deadline is None:
        return now + WAIT_NO_DEADLINE_S
    return now + max(0.0, min(WAIT_MAX_S, deadline - time.time() - DEADLINE_MARGIN_S))


async def _keep(store: ReplyStorePort, name: str, marker: bytes) -> None:
    while True:
        await asyncio.sleep(KEEP_EVERY_S)
        try:
            if not await store.keep(name, marker, PENDING_TTL_S):
                log.warning("the claim of %s expired while its request ran; a repeat may run it again", name)
                return
        except Exception as exc:  # Redis away for a moment: the marker lives PENDING_TTL_S
            log.debug("could not extend the claim of %s: %s", name, exc)


async def run_once(store: ReplyStorePort, name: str, reply_type: type[T], fn: Callable[[], Awaitable[T]], *,
                   deadline: float | None = None, what: str = "this request") -> T:
    """``fn()``'s reply, run at most once at a time per ``name`` (``"<op>:<request id>"``); a
    repeat gets the first's reply. ``deadline``: the caller's (Unix seconds), bounding the
    wait of a repeat. ``what`` names the request in the 503 of a repeat that waited."""
    marker = PENDING + uuid.uuid4().hex.encode()
    until = _wait_until(deadline)
    pause = 0.02
    while True:
        held = await store.claim(name, marker, PENDING_TTL_S)
        if held is None:
            break  # ours: run it
        if not held.startswith(PENDING):
            return msgspec.json.decode(held, type=reply_type)
        left = until - time.monotonic()
        if left <= 0:
            raise E.make(E.UNAVAILABLE, f"{what} with this request_id is still running (an earlier attempt); retry "
                         "with the same request_id to get its result", pending=True)
        await asyncio.sleep(min(pause, left))
        pause = min(pause * 2, 0.25)
    keeper = asyncio.ensure_future(_keep(store, name, marker))
    try:
        result = await fn()
    except BaseException:
        keeper.cancel()
        with contextlib.suppress(Exception):  # unreleased, the marker expires by itself
            await asyncio.shield(store.release(name, marker))
        raise
    keeper.cancel()
    try:
        if not await store.finish(name, marker, msgspec.json.encode(result)):
            log.warning("the claim of %s was taken over before its reply was stored; a repeat gets the other's", name)
    except Exception as exc:  # done, but not recorded: answer it; a repeat after the TTL runs again
        log.warning("could not record the reply of %s: %s", name, exc)
    return result
