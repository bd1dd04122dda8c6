"""The batcher's admission, both sides, without Ray: `LeaseBook` (the batcher's count over
every ingress replica) and `Admitter` (one call per burst from an ingress, releases reported on
later calls). Counts only: calls are gated by events, never by sleeps that a slow box stretches.
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


def test_book_caps_every_ingress_together():
    book = LeaseBook(5)
    assert book.admit(AdmitCall("a", 0, 3)) == 3
    assert book.admit(AdmitCall("b", 0, 4)) == 2          # 3 held by a: 2 places left
    assert book.total() == 5 and book.shed == 2
    assert book.admit(AdmitCall("a", 1, 2)) == 2          # a reports 2 of its 3 ended
    assert book.total() == 5 and book.ingresses() == 2


def test_book_without_a_cap_admits_everything():
    book = LeaseBook(None)
    assert book.admit(AdmitCall("a", 0, 1000)) == 1000 and book.shed == 0


def test_book_forgets_a_silent_ingress():
    clock = Clock()
    book = LeaseBook(4, clock)
    assert book.admit(AdmitCall("dead", 0, 4)) == 4
    assert book.admit(AdmitCall("live", 0, 1)) == 0        # full: the dead one holds them all
    clock.t += TTL_S + 1
    assert book.total() == 0 and book.admit(AdmitCall("live", 0, 1)) == 1


def test_book_drops_an_ingress_that_holds_nothing():
    book = LeaseBook(4)
    book.admit(AdmitCall("a", 0, 2))
    book.admit(AdmitCall("a", 0, 0))                      # a report: nothing held any more
    assert book.ingresses() == 0 and book.total() == 0


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
        return AdmitVerdict(self.book.admit(call), self.book.limit)


async def settle(adm: Admitter) -> None:
    """Until the admitter has nothing left to send (its task ends)."""
    if adm._task is not None:
        await asyncio.wait_for(adm._task, 30)


def test_arrivals_during_a_call_go_together_in_the_next():
    async def main():
        b = GatedBatcher()
        adm = Admitter(b.send)
        tasks = [asyncio.create_task(adm.acquire()) for _ in range(10)]
        await asyncio.sleep(0)                              # the first call is out: 10 asks
        more = [asyncio.create_task(adm.acquire()) for _ in range(6)]
        b.gate.set()
        assert all(await asyncio.gather(*tasks, *more))
        assert [c.asks for c in b.calls] == [10, 6] and adm.held == 16
        for _ in range(16):
            adm.release()
        await settle(adm)
        assert b.book.total() == 0 and b.calls[-1] == AdmitCall(adm.ingress_id, 0, 0)
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
        assert await adm.acquire()                          # the freed place is reported, reused
        assert b.book.total() == 3
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
        adm.release()
        await settle(adm)
        assert adm.held == 0 and b.book.total() == 0
    asyncio.run(main())


def test_an_unreachable_batcher_fails_the_waiters_not_hangs_them():
    async def main():
        b = GatedBatcher(fail=ConnectionError("batcher gone"))
        b.gate.set()
        adm = Admitter(b.send)
        results = await asyncio.gather(adm.acquire(), adm.acquire(), return_exceptions=True)
        assert all(isinstance(r, ConnectionError) for r in results) and adm.held == 0
        await settle(adm)
    asyncio.run(main())


def test_a_holding_ingress_keeps_reporting(monkeypatch):
    monkeypatch.setattr(admitter_mod, "HEARTBEAT_S", 0.01)
    async def main():
        b = GatedBatcher()
        b.gate.set()
        adm = Admitter(b.send)
        assert await adm.acquire()
        while len(b.calls) < 4:                             # heartbeats, with nothing asked
            await asyncio.sleep(0.01)
        assert [c.asks for c in b.calls[1:4]] == [0, 0, 0]
        assert all(c.holding == 1 for c in b.calls[1:4])
        adm.release()
        await settle(adm)
        assert b.book.total() == 0
    asyncio.run(main())
