"""``kvfs.engines.guard.Guard``: the deadline and outage breaker engines call kvfs through. Plain
threads and functions stand in for storage calls here: the guard runs callables, it does not talk to
a service (the engine tests drive it against real kvfs processes)."""

from __future__ import annotations

import errno
import logging
import threading
import time

from kvfs.engines.guard import Guard

log = logging.getLogger("test-guard")


def test_calls_reuse_one_worker_thread_and_return_values_and_errors():
    guard = Guard(log, timeout=5)
    seen = []
    for i in range(5):
        ok, value = guard.call(lambda i=i: (seen.append(threading.get_ident()), i * 2)[1], "probe")
        assert (ok, value) == (True, i * 2)
    assert len(set(seen)) == 1 and seen[0] != threading.get_ident()  # one kept worker, not the caller
    ok, value = guard.call(lambda: (_ for _ in ()).throw(OSError(errno.EIO, "down")), "probe")
    assert (ok, value) == (False, None) and guard.down  # an OSError is an outage
    guard.close()


def test_a_stuck_call_is_abandoned_and_the_next_call_runs_on_another_worker():
    guard = Guard(log, timeout=0.3, retry_after=0.2)
    release = threading.Event()
    stuck_on = []

    def hang():
        stuck_on.append(threading.current_thread())
        release.wait(10)

    t0 = time.monotonic()
    assert guard.call(hang, "load") == (False, None)
    assert 0.25 < time.monotonic() - t0 < 3 and guard.down
    assert guard.call(lambda: 1, "load") == (False, None)  # breaker open: fails at once, runs nothing
    time.sleep(0.25)
    ran_on = []
    assert guard.call(lambda: ran_on.append(threading.current_thread()) or 7, "load") == (True, 7)
    assert ran_on[0] is not stuck_on[0] and not guard.down
    release.set()
    stuck_on[0].join(5)
    assert not stuck_on[0].is_alive()  # the abandoned worker exits once its call returns
    guard.close()


def test_concurrent_callers_each_get_a_worker():
    before = set(threading.enumerate())
    guard = Guard(log, timeout=5)
    barrier = threading.Barrier(3)
    results = []

    def caller(n):
        results.append(guard.call(lambda: (barrier.wait(5), n)[1], "lookup"))

    threads = [threading.Thread(target=caller, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(results) == [(True, 0), (True, 1), (True, 2)]  # all three ran at once (the barrier)
    workers = [t for t in set(threading.enumerate()) - before if t.name == "kvfs-guard"]
    assert len(workers) == 3
    guard.close()
    for t in workers:
        t.join(5)
    assert not any(t.is_alive() for t in workers)
