"""The batcher's admission, both sides, without Ray: `LeaseBook` (the model's places leased to
the ingress replicas, never more than the cap together) and `Admitter` (local admission within
the grant, one call for every request that finds it full). Counts only: calls are gated by
events, never by sleeps that a slow box stretches.
"""
from __future__ import annotations

import asyncio

import pytest

from dfastllm_ray.serve import admitter as admitter_mod
from dfastllm_ray.serve.admitter import Admitter
from dfastllm_ray.serve.lease_book import TTL_S, LeaseBook
from dfastllm_ray.serve.records import AdmitCall, AdmitVerdict


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_grants_never_pass_the_cap_together():
    book = LeaseBook(8)
    a = book.call(AdmitCall("a", 0, 3))
    assert a.admitted == 3 and a.grant == 3 + 4             # asks + a spare half-share
    b = book.call(AdmitCall("b", 0, 4))
    assert b.admitted == 1 and b.grant == 1                 # a's grant leaves one place
    assert book.granted() == 8 and book.shed == 3
    a = book.call(AdmitCall("a", 1, 0))                      # a's heartbeat: 2 of its 3 ended
    assert a.grant == 1 + book.spare(2) and book.granted() <= 8
    b = book.call(AdmitCall("b", 1, 3))
    assert b.admitted == 3 and book.granted() <= 8


def test_an_idle_ingress_keeps_only_a_spare_share():
    book = LeaseBook(64)
    assert book.call(AdmitCall("a", 0, 40)).grant == 64      # alone: up to the whole cap
    assert book.call(AdmitCall("a", 0, 0)).grant == 32       # idle again: the spare half


def test_without_a_cap_everything_is_admitted():
    book = LeaseBook(None)
    v = book.call(AdmitCall("a", 0, 1000))
    assert v.admitted == 1000 and v.grant >= 1000 and book.shed == 0


def test_a_silent_ingress_is_forgotten_and_its_places_come_back():
    clock = Clock()
    book = LeaseBook(4, clock)
    assert book.call(AdmitCall("dead", 0, 4)).admitted == 4
    assert book.call(AdmitCall("live", 0, 1)).admitted == 0  # full: the dead one holds them all
    clock.t += TTL_S + 1
    assert book.call(AdmitCall("live", 0, 1)).admitted == 1 and book.ingresses() == 1


class GatedBatcher:
    """`send` for an Admitter: each call waits until the test opens the gate."""

    def __init__(self, limit=None, fail=None) -> None:
        self.book = LeaseBook(limit)
        self.calls: list[AdmitCall] = []
        self.gate = asyncio.Event()
        self.fail = fail

    async def send(self, call: AdmitCall) -> AdmitVerdict:
        self.calls.append(call)
        await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return self.book.call(call)


async def until(cond) -> None:
    """Let the loop run until `cond()` (a bounded number of iterations, no clock)."""
    for _ in range(1000):
        if cond():
            return
        await asyncio.sleep(0)
    raise AssertionError("the condition never held")


def test_within_the_grant_requests_are_admitted_without_a_call():
    async def main():
        b = GatedBatcher(limit=16)
        b.gate.set()
        adm = Admitter(b.send)
        assert await adm.acquire()                          # the first call: grant 1 + 8
        assert len(b.calls) == 1 and adm.grant == 9
        assert all([await adm.acquire() for _ in range(8)])
        assert len(b.calls) == 1 and adm.held == 9          # 8 more, no call
        assert await adm.acquire()                          # the grant is full: a call
        assert len(b.calls) == 2 and b.calls[1] == AdmitCall(adm.ingress_id, 9, 1)
        for _ in range(10):
            adm.release()
        assert adm.held == 0 and len(b.calls) == 2          # releases make no call
    asyncio.run(main())


def test_arrivals_during_a_call_go_together_in_the_next():
    async def main():
        b = GatedBatcher(limit=64)
        adm = Admitter(b.send)
        first = [asyncio.create_task(adm.acquire()) for _ in range(10)]
        await until(lambda: len(b.calls) == 1)              # the first call is out: 10 asks
        more = [asyncio.create_task(adm.acquire()) for _ in range(6)]
        await until(lambda: len(adm._waiting) == 6)         # a call is out: they wait
        assert adm.held == 0 and len(b.calls) == 1
        b.gate.set()
        assert all(await asyncio.gather(*first, *more))
        assert [c.asks for c in b.calls] == [10, 6] and adm.held == 16
    asyncio.run(main())


def test_past_the_cap_the_later_asks_are_refused():
    async def main():
        b = GatedBatcher(limit=3)
        b.gate.set()
        adm = Admitter(b.send)
        got = await asyncio.gather(*(adm.acquire() for _ in range(5)))
        assert got == [True, True, True, False, False] and adm.limit == 3
        assert adm.held == 3 and b.book.shed == 2
        adm.release()
        assert await adm.acquire()                          # the freed place, within the grant
        assert adm.held == 3 and b.book.granted() == 3
    asyncio.run(main())


def test_a_waiter_that_leaves_keeps_no_place():
    async def main():
        b = GatedBatcher(limit=10)
        adm = Admitter(b.send)
        gone = asyncio.create_task(adm.acquire())
        stays = asyncio.create_task(adm.acquire())
        await asyncio.sleep(0)
        gone.cancel()                                       # the client left while waiting
        b.gate.set()
        assert await stays
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert adm.held == 1
    asyncio.run(main())


def test_an_unreachable_batcher_fails_the_waiters_not_hangs_them():
    async def main():
        b = GatedBatcher(fail=ConnectionError("batcher gone"))
        b.gate.set()
        adm = Admitter(b.send)
        results = await asyncio.gather(adm.acquire(), adm.acquire(), return_exceptions=True)
        assert all(isinstance(r, ConnectionError) for r in results) and adm.held == 0
        await asyncio.wait_for(adm._task, 30)               # nothing held: the task ends
    asyncio.run(main())


def test_a_holding_ingress_keeps_its_lease_alive(monkeypatch):
    monkeypatch.setattr(admitter_mod, "HEARTBEAT_S", 0.01)

    async def main():
        b = GatedBatcher(limit=8)
        b.gate.set()
        adm = Admitter(b.send)
        assert await adm.acquire()
        while len(b.calls) < 4:                             # heartbeats, nothing asked
            await asyncio.sleep(0.01)
        assert [(c.holding, c.asks) for c in b.calls[1:4]] == [(1, 0)] * 3
        adm._task.cancel()
    asyncio.run(main())


def test_a_batcher_that_never_answers_refuses_the_waiters_in_bounded_time(monkeypatch):
    from dfastllm_ray.serve.errors import APIError
    monkeypatch.setattr(admitter_mod, "ADMIT_TIMEOUT_S", 0.01)

    async def main():
        b = GatedBatcher(limit=8)                           # the gate never opens
        adm = Admitter(b.send)
        with pytest.raises(APIError) as err:
            await adm.acquire()
        assert err.value.status == 503 and err.value.headers["Retry-After"]
        assert adm.held == 0 and adm.grant == 0
        b.gate.set()                                        # the batcher answers again
        assert await adm.acquire() and adm.held == 1
        adm._task.cancel()
    asyncio.run(main())
