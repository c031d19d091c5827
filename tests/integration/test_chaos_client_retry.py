"""The client answers a request nobody will answer (issue 11, "no request left without an answer").

A mutation held by an instance that is SIGKILLed gets no reply; before, only the caller's
timeout ended it. ``VNetManager.call`` now sends a mutation that carries a ``request_id``
again, with the same id, after an attempt that got no answer or found no responders, within
``mutation_retry_s``. A stand-in service on a nats-server of this test swallows requests
(as a killed instance does) and then answers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from vnet import VNetManager
from vnet.contracts import codec, subjects
from vnet.contracts import headers as H
from vnet.contracts.ipam import AddrRelease, ReleaseReply
from vnet.core import errors as E
from vnet.runtime import servers
from vnet.runtime.config import VNetConfig

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(60)]

SUBJECT = subjects.IPAM_ADDR_RELEASE.format()


@pytest.fixture
def own_nats(tmp_path: Path) -> Iterator[servers.ServerProc]:
    s = servers.start_nats(tmp_path / "nats")
    try:
        yield s
    finally:
        s.stop()


def _cfg(config: VNetConfig, url: str, **kw: float) -> VNetConfig:
    return msgspec.structs.replace(config, nats_url=url, **kw)


async def _stand_in(url: str, swallow: int, seen: list[AddrRelease], *, skipped: int = 0) -> Client:
    """A service that leaves the first ``swallow`` requests unanswered, answers the next
    ``skipped`` with 504 ``deadline_exceeded`` (taken off its queue too late: not run), then
    answers."""
    nc = await nats.connect(url)

    async def handle(msg: Msg) -> None:
        seen.append(msgspec.json.decode(msg.data, type=AddrRelease))
        if len(seen) <= swallow:
            return
        if len(seen) <= swallow + skipped:
            err = E.make(E.DEADLINE_EXCEEDED, "the caller's deadline passed before addr.release started; "
                         "nothing was done")
            await nc.publish(msg.reply, codec.error_body(err),
                             headers={H.ERROR_CODE: str(err.status), H.ERROR: err.message})
            return
        await msg.respond(msgspec.json.encode(ReleaseReply(released=["10.0.0.2"])))

    await nc.subscribe(SUBJECT, cb=handle)
    await nc.flush()
    return nc


async def test_unanswered_mutation_is_sent_again_with_its_request_id(config: VNetConfig,
                                                                     own_nats: servers.ServerProc) -> None:
    seen: list[AddrRelease] = []
    svc = await _stand_in(own_nats.url, 2, seen)
    try:
        async with VNetManager(_cfg(config, own_nats.url, request_timeout_s=0.3, mutation_retry_s=10)) as m:
            assert await m.release_address("n1", "o1", request_id="rq-1") == ["10.0.0.2"]
            assert m.retries == 2
    finally:
        await svc.close()
    assert [r.request_id for r in seen] == ["rq-1"] * 3 and len({msgspec.json.encode(r) for r in seen}) == 1


async def test_an_attempt_skipped_for_its_deadline_is_sent_again(config: VNetConfig,
                                                                 own_nats: servers.ServerProc) -> None:
    """A 504 ``deadline_exceeded`` says the service did not run the attempt: resent too."""
    seen: list[AddrRelease] = []
    svc = await _stand_in(own_nats.url, 0, seen, skipped=2)
    try:
        async with VNetManager(_cfg(config, own_nats.url, request_timeout_s=2, mutation_retry_s=20)) as m:
            assert await m.release_address("n1", "o1", request_id="rq-4") == ["10.0.0.2"]
            assert m.retries == 2
    finally:
        await svc.close()
    assert [r.request_id for r in seen] == ["rq-4"] * 3


async def test_without_request_id_a_timeout_is_the_callers(config: VNetConfig,
                                                           own_nats: servers.ServerProc) -> None:
    seen: list[AddrRelease] = []
    svc = await _stand_in(own_nats.url, 1, seen)
    try:
        async with VNetManager(_cfg(config, own_nats.url, request_timeout_s=0.3, mutation_retry_s=10)) as m:
            with pytest.raises(E.VNetError) as ei:
                await m.release_address("n1", "o1")
            assert ei.value.code == E.TIMEOUT.code and m.retries == 0 and len(seen) == 1
    finally:
        await svc.close()


async def test_no_responders_is_retried_until_the_service_comes(config: VNetConfig,
                                                                own_nats: servers.ServerProc) -> None:
    seen: list[AddrRelease] = []
    async with VNetManager(_cfg(config, own_nats.url, request_timeout_s=2, mutation_retry_s=20)) as m:
        call = asyncio.create_task(m.release_address("n1", "o1", request_id="rq-2"))
        await asyncio.sleep(1.0)  # the service is "restarting": nobody serves the subject
        assert not call.done() and m.retries >= 2
        svc = await _stand_in(own_nats.url, 0, seen)
        try:
            assert await asyncio.wait_for(call, 15) == ["10.0.0.2"]
        finally:
            await svc.close()
    assert [r.request_id for r in seen] == ["rq-2"]


async def test_retries_end_at_the_callers_overall_deadline(config: VNetConfig,
                                                           own_nats: servers.ServerProc) -> None:
    seen: list[AddrRelease] = []
    svc = await _stand_in(own_nats.url, 10**6, seen)  # never answers
    try:
        async with VNetManager(_cfg(config, own_nats.url, request_timeout_s=0.4, mutation_retry_s=1.5)) as m:
            t0 = time.monotonic()
            with pytest.raises(E.VNetError) as ei:
                await m.release_address("n1", "o1", request_id="rq-3")
            took = time.monotonic() - t0
        assert ei.value.code == E.TIMEOUT.code
        assert took < 30  # ended by the overall deadline, not retried for ever
        assert len(seen) >= 2 and {r.request_id for r in seen} == {"rq-3"}
    finally:
        await svc.close()
