"""Concurrent save / restore / prefetch / drop from several threads of one process."""

import os
import random
import threading
import time

import pytest
import torch
from hypothesis import given
from hypothesis import strategies

import tierkv
from conftest import BLOCK, assert_kv_equal, make_kv, small_spec
from tierkv.affinity import cpu_groups


def run_threads(worker, n):
    """Run ``worker(0)`` ... ``worker(n - 1)`` on threads of their own, and wait for them all."""
    threads = [threading.Thread(target=worker, args=(w,)) for w in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

SPEC = small_spec(layers=3)


@pytest.mark.parametrize("threads,seconds", [
    (8, 20),   # in the default suite; the long run is behind the stress marker
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

    run_threads(worker, threads)
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


@pytest.mark.parametrize("seed,phases,ops", [
    (1, 4, 300),
    (2, 4, 300),
    pytest.param(3, 40, 600, marks=pytest.mark.stress),
])
def test_every_hook_from_three_threads_under_random_settings(tmp_path, seed, phases, ops):
    """Every hook (save with pins, TTLs and tenants; restore; restore_async into a CachePool;
    prefetch; lookup; drop; offload; session_info) from three threads, over small budgets that
    keep every tier and the SSD evicting, the store reopened with other settings (persist,
    ssd_page_cache, host tier or none, full_policy) between phases. Every restore is checked
    bit-exact; no save may wait out SAVE_WAIT_S for a writer with nothing to move. Its first
    run found two such stalls (docs/reliability.md: pinned blocks over a tier's budget; a
    device tier over a full store)."""
    spec = small_spec(layers=4, heads=2, dim=64)
    n_seq, length = 8, 200
    kvs = [make_kv(spec, length, seed=i) for i in range(n_seq)]
    toks = [list(range(i * 1000, i * 1000 + length)) for i in range(n_seq)]
    for i in range(0, n_seq, 2):  # pairs share their first 100 tokens, and so that KV
        toks[i + 1][:100] = toks[i][:100]
        kvs[i + 1] = [tuple(torch.cat([a[:, :100], b[:, 100:]], 1) for a, b in zip(la, lb))
                      for la, lb in zip(kvs[i], kvs[i + 1])]
    expected = (tierkv.StoreFullError, tierkv.BudgetExceededError, tierkv.UnknownSessionError)
    path = str(tmp_path / "store")
    codec = random.Random(seed).choice(["zstd-planes", "raw"])
    checked = [0]

    def check(r, i, asked):
        assert 0 <= r.num_tokens <= asked
        if r.num_tokens:
            assert_kv_equal(r.kv, [tuple(x[:, :r.num_tokens] for x in layer) for layer in kvs[i]])
            checked[0] += 1

    for phase in range(phases):
        rng0 = random.Random(seed * 100 + phase)
        s = tierkv.TierKV(path, spec, block_tokens=16, ssd_codec=codec,
                          device_bytes=rng0.choice(["256KiB", "1MiB"]), host_bytes=rng0.choice(["0", "1MiB", "4MiB"]),
                          ssd_bytes=rng0.choice(["4MiB", "16MiB"]), persist=rng0.choice(["write_back", "write_through"]),
                          ssd_page_cache=rng0.choice(["use", "bypass"]), full_policy=rng0.choice(["raise", "miss"]))
        pool = tierkv.CachePool()
        errors = []

        def worker(w):
            rng = random.Random(seed * 1000 + phase * 10 + w)
            for _ in range(ops):
                k = rng.randrange(40)
                sid, tenant = f"w{w}-{k}", "t1" if k % 3 == 0 else None  # a session keeps its tenant
                i, m, q = rng.randrange(n_seq), rng.randrange(1, length + 1), rng.randrange(1, length + 1)
                op = rng.random()
                try:
                    if op < 0.35:
                        t0 = time.monotonic()
                        h = s.save(toks[i][:m], [tuple(x[:, :m] for x in layer) for layer in kvs[i]],
                                   session=sid if rng.random() < 0.8 else None, tenant=tenant,
                                   ttl=rng.choice([None, None, 0.3, 30.0]), pinned=rng.choice([None, None, True, False]))
                        assert time.monotonic() - t0 < 5, "save waited for a writer with nothing to move"
                        if rng.random() < 0.2:
                            h.wait()
                    elif op < 0.6:
                        check(s.restore(toks[i][:q], session=sid if rng.random() < 0.7 else None, tenant=tenant), i, q)
                    elif op < 0.7:
                        h = s.restore_async(toks[i][:q], session=sid, tenant=tenant,
                                            allocate=pool.allocator(spec) if w == 0 else None)
                        if rng.random() < 0.5:
                            h.layer(rng.randrange(spec.num_layers))
                        check(h.result(), i, q)
                    elif op < 0.78:
                        h = s.prefetch(toks[i][:q], session=sid, tenant=tenant)
                        if rng.random() < 0.5:
                            h.wait()
                    elif op < 0.84:
                        assert 0 <= s.lookup(toks[i][:q], session=sid, tenant=tenant) <= q
                    elif op < 0.9:
                        s.drop_session(sid)
                    elif op < 0.95:
                        s.offload(sid if rng.random() < 0.5 else None)
                    else:
                        s.session_info(sid)
                except expected:
                    pass
                except Exception as e:  # noqa: BLE001 - collected and re-raised in the main thread
                    errors.append(e)
                    return

        run_threads(worker, 3)
        assert not errors, errors
        try:
            s.flush(timeout=60)
        except tierkv.StoreFullError:
            pass
        st = s.stats()
        s.close()
        assert st["backpressure"]["timeouts"] == 0, (phase, st["backpressure"])
        assert st["corrupt_blocks"] == 0
    assert checked[0] > 50 * phases


@pytest.mark.parametrize("seed,persist", [(1, "write_back"), (2, "write_through"), (3, "write_back")])
def test_close_while_other_threads_use_the_store(tmp_path, seed, persist):
    """A server shutting down closes the store while request threads still call it. Each call
    must then finish, or fail with StoreClosedError; none may hang or fail otherwise. Before, a
    prefetch that had matched its blocks when the I/O pool shut down raised RuntimeError
    ('cannot schedule new futures after shutdown') and left its blocks LOADING for good, so a
    thread joining that load waited for ever; a save or flush could queue an op after the
    writer had exited, and wait for ever too; and with write-back, a save that landed while
    close() flushed was never written (its session restored only up to it after a reopen)."""
    spec = small_spec(layers=4, heads=2, dim=64)
    kvs = [make_kv(spec, 120, seed=i) for i in range(6)]
    toks = [list(range(i * 1000, i * 1000 + 120)) for i in range(6)]
    path = str(tmp_path / "store")
    rng0 = random.Random(seed)
    s = tierkv.TierKV(path, spec, block_tokens=16, device_bytes="256KiB", host_bytes="512KiB", ssd_bytes="64MiB",
                      persist=persist)
    for i in range(6):
        s.save(toks[i], kvs[i], session=f"s{i}")
    s.offload()
    errors, closed = [], []
    saved = {}  # (worker, i) -> tokens of that worker's last save of session s{i}-{w} that returned

    def worker(w):
        rng = random.Random(seed * 10 + w)
        try:
            while True:
                i, q = rng.randrange(6), rng.randrange(1, 121)
                op = rng.random()
                if op < 0.3:
                    s.save(toks[i][:q], [tuple(x[:, :q] for x in layer) for layer in kvs[i]], session=f"s{i}-{w}")
                    saved[(w, i)] = q
                elif op < 0.5:
                    r = s.restore(toks[i][:q], session=f"s{i}")
                    if r.num_tokens:
                        assert_kv_equal(r.kv, [tuple(x[:, :r.num_tokens] for x in layer) for layer in kvs[i]])
                elif op < 0.65:
                    s.prefetch(toks[i][:q], session=f"s{i}").wait()
                elif op < 0.75:
                    s.lookup(toks[i][:q], session=f"s{i}")
                elif op < 0.85:
                    s.offload(f"s{i}" if rng.random() < 0.5 else None)
                elif op < 0.9:
                    s.flush()
                elif op < 0.95:
                    s.stats()
                else:
                    s.session_info(f"s{i}")
        except tierkv.StoreClosedError:
            closed.append(w)
        except Exception as e:  # noqa: BLE001 - collected and re-raised in the main thread
            errors.append(e)

    workers = [threading.Thread(target=worker, args=(w,), daemon=True) for w in range(4)]
    for t in workers:
        t.start()
    time.sleep(rng0.uniform(0.1, 0.6))
    s.close()
    for t in workers:
        t.join(30)
    assert not [t for t in workers if t.is_alive()], "a call hung after close"
    assert not errors, errors
    assert sorted(closed) == [0, 1, 2, 3]
    with tierkv.TierKV(path, spec, block_tokens=16) as s2:  # what was saved before restores exactly
        for i in range(6):
            r = s2.restore(toks[i], session=f"s{i}")
            assert r.num_tokens == 120
            assert_kv_equal(r.kv, kvs[i])
        # and so does every save a worker's call returned from, write-back's included: close()
        # writes what memory alone held, saves that landed during its flush too
        for (w, i), q in saved.items():
            r = s2.restore(toks[i][:q], session=f"s{i}-{w}")
            assert r.num_tokens == q, (w, i, q, r.num_tokens)
            assert_kv_equal(r.kv, [tuple(x[:, :q] for x in layer) for layer in kvs[i]])


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors through /proc")
def test_reopening_under_churn_leaves_no_descriptors_or_threads_behind(tmp_path):
    """A server keeps one process for days and may close and reopen its store. Each cycle here
    runs 2 threads of random hooks, restores whose handles are dropped unread among them (their
    reads hold a descriptor per value until done), then closes: afterwards the process must hold
    the descriptors and threads it held after the first cycle, no more (bench/soak.py runs the
    same for minutes and samples memory too)."""
    spec = small_spec(layers=3, heads=2, dim=32)
    kvs = [make_kv(spec, 100, seed=i) for i in range(4)]
    toks = [list(range(i * 1000, i * 1000 + 100)) for i in range(4)]
    path = str(tmp_path / "store")

    def fds():
        return len(os.listdir("/proc/self/fd"))

    def cycle(seed):
        with tierkv.TierKV(path, spec, block_tokens=16, device_bytes="64KiB", host_bytes="96KiB",
                           ssd_bytes="8MiB", persist="write_back") as s:
            def worker(w):
                rng = random.Random(seed * 10 + w)
                for _ in range(120):
                    i, q = rng.randrange(4), rng.randrange(1, 101)
                    op = rng.random()
                    if op < 0.35:
                        s.save(toks[i][:q], [tuple(x[:, :q] for x in layer) for layer in kvs[i]], session=f"s{i}")
                    elif op < 0.55:
                        s.restore_async(toks[i][:q], session=f"s{i}")  # dropped unread
                    elif op < 0.75:
                        r = s.restore(toks[i][:q], session=f"s{i}")
                        if r.num_tokens:
                            assert_kv_equal(r.kv, [tuple(x[:, :r.num_tokens] for x in layer) for layer in kvs[i]])
                    elif op < 0.85:
                        s.prefetch(toks[i][:q], session=f"s{i}")  # dropped unwaited
                    elif op < 0.95:
                        s.offload()
                    else:
                        try:
                            s.drop_session(f"s{i}")
                        except tierkv.UnknownSessionError:
                            pass
            run_threads(worker, 2)

    cycle(0)  # the first cycle starts what a process starts once (torch's threads, imports)
    base = (fds(), threading.active_count())
    for seed in range(1, 5):
        cycle(seed)
        assert (fds(), threading.active_count()) == base, f"cycle {seed}: (fds, threads) {base} before"
