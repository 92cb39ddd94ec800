"""Concurrent save / restore / prefetch / drop from several threads of one process."""

import os
import random
import threading
import time

import pytest
from hypothesis import given
from hypothesis import strategies

import tierkv
from conftest import BLOCK, assert_kv_equal, make_kv, small_spec
from tierkv.affinity import cpu_groups

SPEC = small_spec(layers=3)


@pytest.mark.parametrize("threads,seconds", [
    (8, 40),
    pytest.param(8, 600, marks=pytest.mark.stress),
])
def test_threads_save_restore_prefetch_drop(open_store, threads, seconds):
    s = open_store(SPEC, device_bytes=6 * BLOCK * SPEC.bytes_per_token,
                   host_bytes=6 * BLOCK * SPEC.bytes_per_token, persist="write_through")
    # shared 2-block prefix so sessions share blocks across threads
    ref = make_kv(SPEC, 6 * BLOCK, seed=42)
    base = list(range(6 * BLOCK))
    errors, checks, samples = [], [0], [0]
    stop = time.monotonic() + seconds

    def worker(wid):
        rng = random.Random(wid)
        try:
            while time.monotonic() < stop:
                sid = f"s{rng.randrange(6)}"
                n = rng.randrange(1, 6 * BLOCK)
                op = rng.random()
                if op < 0.4:
                    s.save(base[:n], [tuple(x[:, :n] for x in layer) for layer in ref], session=sid)
                elif op < 0.75:
                    r = s.restore(base[:n], session=sid)
                    if r.num_tokens:
                        assert_kv_equal(r.kv, [tuple(x[:, :r.num_tokens] for x in layer) for layer in ref])
                        checks[0] += 1
                elif op < 0.9:
                    h = s.prefetch(base[:n], session=sid)
                    r = h.result()
                    if r.num_tokens:
                        assert_kv_equal(r.kv, [tuple(x[:, :r.num_tokens] for x in layer) for layer in ref])
                else:
                    try:
                        s.drop_session(sid)
                    except tierkv.UnknownSessionError:
                        pass
                # Budget invariants, sampled after every operation: each tier's usage is exactly the
                # sum of the payloads it holds, never negative, and no block is in two tiers.
                with s._lock:
                    seen = set()
                    for tier in s._tiers.values():
                        held = list(tier._lru.values())
                        assert tier.used == sum(b.nbytes for b in held) >= 0
                        assert all(b.tier == tier.name and b.payload is not None for b in held)
                        keys = {b.key for b in held}
                        assert not keys & seen
                        seen |= keys
                    samples[0] += 1
        except Exception as e:  # noqa: BLE001 - collected and re-raised in the main thread
            errors.append(e)

    workers = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert not errors, errors
    assert checks[0] > 20 and samples[0] > 100
    s.flush()
    st = s.stats()
    assert st["resident_bytes"]["device"] <= s.config.device_bytes
    assert st["resident_bytes"]["host"] <= s.config.host_bytes
    # every session left is restorable and exact, also after a reopen
    path = s.path
    s.close()
    s = open_store(SPEC, path=path)
    for i in range(6):
        try:
            n = s.session_info(f"s{i}")["tokens"]
        except tierkv.UnknownSessionError:
            continue
        r = s.restore(base[:n], session=f"s{i}")
        assert r.num_tokens == n
        assert_kv_equal(r.kv, [tuple(x[:, :n] for x in layer) for layer in ref])


@given(cpus=strategies.sets(strategies.integers(0, 255), max_size=40), threads=strategies.integers(1, 70))
def test_cpu_groups_split_the_allowed_cpus_evenly(cpus, threads):
    groups = cpu_groups(cpus, threads)
    if threads < 2 or len(cpus) < 2:
        assert groups == []
        return
    assert len(groups) == threads
    if threads >= len(cpus):  # one CPU each, every CPU used, each as often as the others (±1)
        assert all(len(g) == 1 for g in groups) and set().union(*groups) == cpus
        uses = [sum(c in g for g in groups) for c in cpus]
        assert max(uses) - min(uses) <= 1
    else:  # disjoint, contiguous slices that cover the set, sizes within one of each other
        ordered = sorted(cpus)
        assert sum(len(g) for g in groups) == len(cpus) and set().union(*groups) == cpus
        assert [c for g in groups for c in sorted(g)] == ordered
        assert max(map(len, groups)) - min(map(len, groups)) <= 1


def _io_thread_cpus(s):
    """The CPU set of each of ``s``'s I/O threads, all of them started: each is held busy while
    the next task is submitted, so the pool has to start every one."""
    gate = threading.Event()
    held = [s._pool.submit(gate.wait) for _ in range(s.config.io_threads)]
    try:
        return [os.sched_getaffinity(t.native_id) for t in threading.enumerate() if t.name.startswith("tierkv-io")]
    finally:
        gate.set()
        for f in held:
            f.result()


def _restore_from_ssd(open_store, **settings):
    """Save a session to SSD, reopen, restore it from there (the decode threads start), check it."""
    spec = small_spec(layers=6)
    kv = make_kv(spec, 4 * BLOCK, seed=3)
    base = dict(device_bytes=0, host_bytes=0, persist="write_through", **settings)
    s = open_store(spec, **base)
    s.save(range(4 * BLOCK), kv, session="s")
    s.close()
    s = open_store(spec, **base)
    assert_kv_equal(s.restore(range(4 * BLOCK), session="s").kv, kv)
    return s


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs a CPU affinity API and at least 2 CPUs")
@pytest.mark.parametrize("io_threads", [2, 3])
def test_io_threads_start_on_separate_cpus(open_store, io_threads):
    """io_affinity="spread" (the default): each decode thread has a slice of the process's CPUs
    of its own (one CPU each in turn where threads outnumber CPUs); the caller's affinity is
    untouched. "inherit" leaves them on the whole set."""
    mine = os.sched_getaffinity(0)
    s = _restore_from_ssd(open_store, io_threads=io_threads)
    groups = _io_thread_cpus(s)
    assert len(groups) == io_threads and os.sched_getaffinity(0) == mine
    assert sorted(map(sorted, groups)) == sorted(map(sorted, cpu_groups(mine, io_threads)))
    if io_threads <= len(mine):
        assert all(not (a & b) for i, a in enumerate(groups) for b in groups[i + 1:])
    s.close()
    s = _restore_from_ssd(open_store, io_threads=io_threads, io_affinity="inherit")
    assert _io_thread_cpus(s) == [mine] * io_threads


def test_restores_stay_exact_when_cpus_cannot_be_assigned(open_store, monkeypatch):
    """A CPU that went away (hotplug, a cpuset shrunk under the process) makes the affinity call
    fail: the threads run wherever they may, restores are exact, and stats() counts it."""
    def refuse(pid, cpus):
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(os, "sched_setaffinity", refuse, raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    s = _restore_from_ssd(open_store)
    assert len(_io_thread_cpus(s)) == 2
    assert s.stats()["io_affinity_refused"] == 2  # each I/O thread's refusal, counted, not hidden
