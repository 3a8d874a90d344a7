"""Downloads run ahead of the slowest pending URL; results still come back in the order asked.

A shard's samples must be written in the seeded order, but URLs finish in any order: one that
answers after 3 s must not idle every thread until it is done. `OrderedFetcher.run` keeps all
its threads busy on the URLs that follow, parks their finished bodies, and hands results back
strictly in input order. What it may park is bounded by bytes, not by a count of URLs:

- the *look-ahead* is every byte read for an item after the one the writer waits for (the
  *head*), finished or still streaming; it never exceeds `limit` bytes;
- a thread about to read a chunk that would overflow the look-ahead waits (its clock stops:
  the wait is not the server's fault) until the head moves on and frees room;
- the head itself is never counted and never waits, so the writer always gets its next item,
  even one larger than the limit, and nothing can deadlock;
- no new URL is started while the look-ahead is full.

Threads outnumber request slots (`concurrency`). A fetch first sleeps until its own turn at
its host (the per-host rate limit), then takes a request slot; sleeping before a retry holds no
slot either. So the slots go to fetches that can send now: when each thread took the next URL
and slept for its host's turn inside a slot, a run of URLs on one host idled the slots while
other hosts were free (the benchmark's default run took 18.8 s where its rate limits allow
about 14). The head needs no slot (its host's turn only), so it always runs: at most
`concurrency` + 1 requests are in flight. A fetch that waited for a slot past its turn starts
late, so two requests to one host can then start closer together than 1/rate; over any
stretch of time a host still gets no more requests than its turns.

The bytes written do not depend on timing: each result lands at its index, and the order of
hand-back is the order of the input.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

from shardify.records import Reject


class Abandoned(Exception):
    """The reader stopped (the writer failed or was interrupted): a fetch still running ends."""


# threads per request slot: enough fetches waiting for their hosts' turns that a free slot
# usually finds one whose host is due
THREADS_PER_SLOT = 8


class LookAhead:
    """The bytes held ahead of the head and the request slots, shared by a reader's threads;
    `peak` is the most bytes ever held."""

    def __init__(self, limit: int, slots: int = 1):
        self.limit = limit
        self.free = slots  # request slots not in use
        self._slots = threading.Condition()  # waits for a slot (its own lock: no wake-ups on every chunk)
        self._slot_waiting: set[int] = set()  # indices waiting for a slot
        self._stop = threading.Event()  # set by close()
        self.head = 0  # index of the item the writer waits for
        self.held = 0  # bytes of items after the head (finished or streaming)
        self.peak = 0
        self.waiting = 0  # threads waiting for room right now
        self.closed = False
        self._taken: dict[int, int] = {}
        self._cond = threading.Condition()

    def take(self, index: int, nbytes: int) -> float:
        """Account `nbytes` more of item `index`, waiting while they would overflow the window.

        Returns the seconds spent waiting; raises Abandoned once the window is closed.
        """
        waited = 0.0
        with self._cond:
            if index != self.head and self.held + nbytes > self.limit and not self.closed:
                start = time.monotonic()
                self.waiting += 1
                while index != self.head and self.held + nbytes > self.limit and not self.closed:
                    self._cond.wait()
                self.waiting -= 1
                waited = time.monotonic() - start
            if self.closed:
                raise Abandoned()
            if index != self.head:
                self._taken[index] = self._taken.get(index, 0) + nbytes
                self.held += nbytes
                self.peak = max(self.peak, self.held)
        return waited

    def begin(self, index: int, host: str, limiter) -> tuple[bool, float]:
        """Wait until item `index` may send a request to `host`: its turn at the host, then a
        free request slot (the head goes without one when none is free). Returns (whether a
        slot was taken, for `end`; the seconds waited). Raises Abandoned once closed."""
        start = time.monotonic()
        delay = limiter.turn(host)
        if delay > 0:
            self._stop.wait(delay)  # a sleep that close() cuts short
        with self._slots:
            self._slot_waiting.add(index)
            try:
                while not self.closed and self.free <= 0 and index != self.head:
                    self._slots.wait()
            finally:
                self._slot_waiting.discard(index)
            if self.closed:
                raise Abandoned()
            took = self.free > 0
            if took:
                self.free -= 1
        return took, time.monotonic() - start

    def end(self, took: bool) -> None:
        """A request is over: its slot (if it took one) goes to one waiting fetch."""
        if took:
            with self._slots:
                self.free += 1
                self._slots.notify()

    def drop(self, index: int) -> None:
        """A failed attempt: what it read is gone."""
        with self._cond:
            self.held -= self._taken.pop(index, 0)
            self._cond.notify_all()

    def advance(self) -> None:
        """The head went to the writer: the next item becomes the head and leaves the look-ahead."""
        with self._cond:
            self.head += 1
            self.held -= self._taken.pop(self.head, 0)
            self._cond.notify_all()
        with self._slots:
            if self.head in self._slot_waiting:  # the new head needs no slot: let it go
                self._slots.notify_all()

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()
        self._stop.set()
        with self._slots:
            self._slots.notify_all()

    def hold(self, index: int) -> _Hold:
        return _Hold(self, index)


class _Hold:
    """One item's account in a LookAhead (what `download.fetch` is given)."""

    __slots__ = ("window", "index")

    def __init__(self, window: LookAhead, index: int):
        self.window, self.index = window, index

    def take(self, nbytes: int) -> float:
        return self.window.take(self.index, nbytes)

    def drop(self) -> None:
        self.window.drop(self.index)

    def begin(self, host: str, limiter) -> tuple[bool, float]:
        return self.window.begin(self.index, host, limiter)

    def end(self, took: bool) -> None:
        self.window.end(took)


class OrderedFetcher:
    """A bounded thread pool that runs `fetch_one(index, hold)` ahead of the writer, at most
    `concurrency` requests at a time (plus the head's) on `THREADS_PER_SLOT` x as many threads.

    The pool lives as long as the fetcher (one per worker process, reused shard after shard);
    `window` is the LookAhead of the latest `run`, for inspection.
    """

    def __init__(self, concurrency: int, limit: int):
        self.concurrency = max(1, concurrency)
        self.threads = self.concurrency * THREADS_PER_SLOT
        self.limit = limit
        self.window: LookAhead | None = None
        self._pool: ThreadPoolExecutor | None = None

    def run(self, n: int, fetch_one: Callable[[int, _Hold], bytes]) -> Iterator[bytes | Reject]:
        """Results of fetch_one(0..n-1) in index order: bytes, or the Reject it raised (any other
        exception becomes a `download_error` reject: one URL never takes the shard down)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="shardify-download")
        window = self.window = LookAhead(self.limit, self.concurrency)
        done: queue.SimpleQueue = queue.SimpleQueue()

        def task(index: int) -> None:
            hold = window.hold(index)
            result: bytes | Reject | None = None
            try:
                result = fetch_one(index, hold)
            except Reject as rej:
                result = rej
            except Abandoned:
                pass
            except Exception as exc:  # noqa: BLE001 - recorded as a reject, never lost
                hold.drop()
                result = Reject("download_error", f"{type(exc).__name__}: {exc}")
            finally:
                done.put((index, result))  # always: the writer waits for every index

        results: dict[int, bytes | Reject | None] = {}
        started = running = 0
        try:
            for head in range(n):
                while True:
                    # Keep every thread busy while the look-ahead has room. Fetches are started
                    # in index order, so the head always has a thread of its own.
                    while started < n and running < self.threads and window.held < window.limit:
                        self._pool.submit(task, started)
                        started += 1
                        running += 1
                    if head in results:
                        break
                    index, result = done.get()
                    running -= 1
                    results[index] = result
                result = results.pop(head)
                window.advance()
                yield result if result is not None else Reject("download_error", "the fetch ended without a result")
        finally:
            window.close()  # a writer that stopped early releases threads waiting for room

    def close(self) -> None:
        if self.window is not None:
            self.window.close()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

