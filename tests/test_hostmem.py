"""The host tier's slab pool (tierkv/hostmem.py): places are reused only once nothing references
them, never overlap, and the slabs stay within their limit. On a machine without CUDA the slabs
are plain memory (page-locking needs the CUDA driver); the pool's logic is the same, and
tests/test_cuda.py runs the engine with page-locked slabs on a GPU."""

import gc
import mmap
import resource
import threading

import numpy as np
import pytest
import torch

import tierkv
import tierkv.hostmem as hostmem
from conftest import BLOCK, assert_kv_equal, make_kv, small_spec

SLOT = 5 * 4096 + 100  # not a page multiple: places start on page boundaries anyway


def ready_pool(slot=SLOT, limit=40 * SLOT, ahead=12 * SLOT):
    p = hostmem.SlabPool(slot, limit, ahead, pin=False)
    assert p.wait_ready(10)
    return p


def test_a_place_comes_back_only_after_its_last_view_dies():
    p = ready_pool()
    try:
        free = len(p._free)
        buf = p.take()
        assert buf.shape == (SLOT,) and buf.dtype == torch.uint8
        views = [buf[10:20], buf.view(torch.int16)[:7] if SLOT % 2 == 0 else buf[:8], buf.numpy()[5:9],
                 buf.reshape(-1, 1)]
        buf.fill_(3)
        del buf
        gc.collect()
        assert len(p._free) == free - 1  # the views still hold it
        views.pop()
        views.pop()
        gc.collect()
        assert len(p._free) == free - 1
        del views
        gc.collect()
        assert len(p._free) == free
    finally:
        p.close()


def test_places_never_overlap_and_keep_their_bytes():
    p = ready_pool()
    try:
        bufs = []
        while (b := p.take()) is not None:
            bufs.append(b)
        assert len(bufs) >= 12
        starts = sorted(b.data_ptr() for b in bufs)
        assert all(b - a >= SLOT for a, b in zip(starts, starts[1:]))
        for b in bufs:  # each inside one slab, on a page boundary of it
            (base,) = [x.data_ptr() for x in p._slabs if 0 <= b.data_ptr() - x.data_ptr() <= p.slab_bytes - SLOT]
            assert (b.data_ptr() - base) % 4096 == 0
        for i, b in enumerate(bufs):
            b.fill_(i % 251)
        for i, b in enumerate(bufs):
            assert torch.all(b == i % 251)
        # a freed place is handed out again, and the others keep their bytes
        reused_ptr = bufs[3].data_ptr()
        del bufs[3], b
        gc.collect()
        again = p.take()
        assert again.data_ptr() == reused_ptr
        again.fill_(255)
        for i, b in enumerate(bufs):
            j = i if i < 3 else i + 1
            assert torch.all(b == j % 251)
    finally:
        p.close()


def test_slabs_grow_ahead_of_takes_and_stop_at_the_limit():
    p = ready_pool(limit=40 * SLOT, ahead=12 * SLOT)
    try:
        snap = p.snapshot()
        assert snap["free_slots"] >= 12 and snap["taken"] == 0
        assert snap["slab_bytes"] & (snap["slab_bytes"] - 1) == 0  # a power of two
        held = []
        for _ in range(200):
            b = p.take()
            if b is not None:
                held.append(b)
            else:
                p.wait_ready(10)
        snap = p.snapshot()
        assert snap["starved"] > 0  # takes never wait for a slab: they come back empty
        assert snap["locked_bytes"] < 40 * SLOT + p.slab_bytes
        assert snap["slabs"] == p.max_slabs and len(held) == snap["slabs"] * p.per_slab
    finally:
        p.close()


def test_a_slab_that_cannot_be_had_stops_growth_without_failing(monkeypatch):
    def refuse(nbytes, pin):
        raise RuntimeError("out of page-locked memory")

    monkeypatch.setattr(hostmem, "host_buffer", refuse)
    p = hostmem.SlabPool(SLOT, 40 * SLOT, 12 * SLOT, pin=False)
    try:
        assert p.wait_ready(10)
        assert p.take() is None
        assert "out of page-locked memory" in p.snapshot()["error"]
    finally:
        p.close()
        p.close()  # idempotent
    assert not p._thread.is_alive()


def test_close_lets_the_slabs_go_and_places_handed_out_stay_valid():
    p = ready_pool()
    held = p.take()
    held.fill_(7)
    p.close()
    assert p.take() is None and p.snapshot()["slabs"] == 0 and not p._thread.is_alive()
    assert torch.all(held == 7)  # its slab lives as long as it does
    del held
    gc.collect()
    assert p.take() is None


@pytest.fixture
def pooled_cpu(monkeypatch):
    """The engine as on a GPU machine's host tier (pool on), with plain memory for slabs."""
    monkeypatch.setattr(hostmem, "can_pin", lambda: True)
    monkeypatch.setattr(hostmem, "host_buffer", lambda nbytes, pin: torch.empty(nbytes, dtype=torch.uint8))


def test_pin_host_memory_without_cuda_is_a_config_error(store_path):
    with pytest.raises(tierkv.ConfigError, match="needs CUDA"):
        tierkv.TierKV(store_path, small_spec(), pin_host_memory=True, block_tokens=BLOCK, ssd_bytes="64MiB")


def test_engine_recycles_places_and_every_session_stays_exact(open_store, pooled_cpu):
    """A host tier of 4 blocks behind no device tier: saves of many sessions push blocks to SSD
    and free their places, which later saves and prefetches take again. Every session, restored
    from wherever its blocks ended up, is bit-exact; concurrent saves and restores included."""
    spec = small_spec()
    n = 5 * BLOCK + 3  # a partial block last: not a full place, so not from the pool
    s = open_store(spec, device="cpu", device_bytes=0, host_bytes=4 * BLOCK * spec.bytes_per_token,
                   pin_host_memory=True)
    assert s._tiers["host"].pool is not None
    sessions = {f"s{j}": make_kv(spec, n, seed=100 + j) for j in range(12)}
    errors = []

    def saver(names):
        try:
            for name in names:
                j = int(name[1:])
                s.save(range(j * 1000, j * 1000 + n), sessions[name], session=name)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=saver, args=(list(sessions)[k::2],)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    s.flush()
    for rnd in range(2):
        for name, kv in sessions.items():
            j = int(name[1:])
            if rnd:
                s.prefetch(range(j * 1000, j * 1000 + n), session=name).wait()
            r = s.restore(range(j * 1000, j * 1000 + n), session=name)
            assert r.num_tokens == n
            assert_kv_equal(r.kv, kv)
    pool = s.stats()["host_pool"]
    assert pool["slot_bytes"] == BLOCK * spec.bytes_per_token
    assert pool["taken"] > pool["slabs"] * s._host_pool.per_slab  # places were reused
    assert s.stats()["host_pool"]["error"] is None


def test_no_pool_without_a_memory_tier_in_cpu_memory(open_store):
    s = open_store(small_spec(), device="cpu", device_bytes=0, host_bytes=0)
    assert s._host_pool is None and s.stats()["host_pool"] is None


def faults_writing(buf):
    """Page faults this thread takes writing every byte of ``buf`` (a tensor or a numpy array;
    numpy writes on this thread only)."""
    arr = buf.numpy() if isinstance(buf, torch.Tensor) else buf
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    arr.fill(1)
    return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before


@pytest.mark.skipif(not hasattr(resource, "RUSAGE_THREAD"), reason="per-thread fault counts are Linux's")
def test_plain_slabs_are_prefaulted_so_a_copy_into_a_place_takes_no_page_faults():
    slot = 4 << 20
    p = hostmem.SlabPool(slot, 8 * slot, 2 * slot, pin=False)
    try:
        assert p.wait_ready(10) and p.snapshot()["pinned"] is False
        assert faults_writing(p.take()) < (slot // 4096) // 8
        # the control: new memory, from a fresh anonymous mapping (not torch.empty, whose
        # allocator may hand back memory written before: the control then took no fault in one
        # CI run)
        fresh = mmap.mmap(-1, 64 << 20)
        try:
            view = np.frombuffer(fresh, dtype=np.uint8)
            assert faults_writing(view) > (64 << 20) // 4096 // 2
            del view
        finally:
            fresh.close()
    finally:
        p.close()


def test_a_plain_pool_fills_as_saves_ask_and_holds_off_while_one_copies():
    p = hostmem.SlabPool(SLOT, 400 * SLOT, 0, pin=False)
    try:
        assert p.wait_ready(10) and p.snapshot()["slabs"] == 0  # nothing ahead until asked
        with p.copying():
            p.expect(10 * SLOT)                  # twice that is wanted now...
            assert p.ahead == 20 and not p.wait_ready(0.3)
            assert p.snapshot()["slabs"] == 0    # ...but no slab is made while a save copies
        assert p.wait_ready(10)
        snap = p.snapshot()
        assert snap["free_slots"] >= 20 and snap["ahead_slots"] == 20
        p.expect(SLOT)                           # what is kept ahead never shrinks
        p.expect(10**12)                         # nor grows past the limit
        assert p.ahead == p.ahead_max == 400 * SLOT // p.stride
    finally:
        p.close()


@pytest.mark.skipif(not hasattr(resource, "RUSAGE_THREAD"), reason="per-thread fault counts are Linux's")
def test_a_plain_pool_with_no_free_place_grows_on_the_spot_and_keeps_that_memory():
    """A burst of saves leaves the background thread no quiet moment to make slabs. Then a take
    adds a slab itself (plain memory, faulted in by the caller's copy as new memory would be),
    and the memory stays in the pool: freed places are taken again, and the thread prefaults the
    rest of such a slab once no save copies."""
    slot = 1 << 20
    p = hostmem.SlabPool(slot, 64 * slot, 0, pin=False)
    try:
        assert p.wait_ready(10) and p.snapshot()["slabs"] == 0
        with p.copying():                       # a save copies: the thread makes nothing
            first = p.take()
            snap = p.snapshot()
            assert first is not None and snap["slabs"] == 1 and snap["grown_on_demand"] == 1
            assert snap["starved"] == 0 and snap["free_slots"] == p.per_slab - 1
            held = [first] + [p.take() for _ in range(p.per_slab - 1)]   # the rest of that slab
            assert p.snapshot()["slabs"] == 1 and all(b is not None for b in held)
            held.append(p.take())                                        # the next one adds one
            assert p.snapshot()["slabs"] == 2 and p.snapshot()["grown_on_demand"] == 2
        assert p.wait_ready(10) and not p._unfaulted   # quiet: the thread prefaulted both slabs
        fresh = p.take()                                 # a place no copy has written yet
        assert faults_writing(fresh) < (slot // 4096) // 8
        addresses = {b.data_ptr() for b in held + [fresh]}
        del held, fresh, first
        gc.collect()
        again = [p.take() for _ in range(2 * p.per_slab)]     # every place of the two slabs
        assert all(b is not None for b in again) and p.snapshot()["slabs"] == 2
        assert addresses <= {b.data_ptr() for b in again}      # the same memory, taken again
    finally:
        p.close()


def test_takes_on_many_threads_grow_the_pool_without_overlapping_places():
    p = hostmem.SlabPool(SLOT, 200 * SLOT, 0, pin=False)   # two slabs of 85 places
    got: list[list[torch.Tensor]] = [[] for _ in range(4)]
    start = threading.Barrier(4)

    def taker(i):
        start.wait()
        for _ in range(60):
            b = p.take()
            if b is not None:
                got[i].append(b)
    try:
        with p.copying():
            threads = [threading.Thread(target=taker, args=(i,)) for i in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        places = [b for g in got for b in g]
        snap = p.snapshot()
        assert len(places) == snap["slabs"] * p.per_slab == p.max_slabs * p.per_slab  # up to the limit
        assert snap["starved"] == 240 - len(places) > 0 and snap["slabs"] == 2
        starts = sorted(b.data_ptr() for b in places)
        assert all(b - a >= p.stride for a, b in zip(starts, starts[1:]))  # no two places overlap
        for i, b in enumerate(places):
            b.fill_(i % 251)
        assert all(int(b[0]) == int(b[-1]) == i % 251 for i, b in enumerate(places))
    finally:
        p.close()


def test_cpu_tiers_take_their_blocks_from_one_plain_pool_and_reuse_them(open_store):
    """Without CUDA, the device tier (CPU memory) and the host tier share one pool of prefaulted
    plain memory: a save's full blocks come from it (its trailing partial block does not), the
    pool then keeps twice the save ahead, and places freed by eviction are taken again. Every
    session stays exact."""
    spec = small_spec()
    per_block = BLOCK * spec.bytes_per_token
    s = open_store(spec, device="cpu", device_bytes=2 * per_block, host_bytes=4 * per_block,
                   persist="write_through")
    assert s._tiers["device"].pool is s._tiers["host"].pool is s._host_pool
    assert s.stats()["host_pool"]["pinned"] is False and s.stats()["host_pool"]["slabs"] == 0
    n = 3 * BLOCK + 5
    sessions = {f"s{j}": make_kv(spec, n, seed=200 + j) for j in range(10)}
    for j, (name, kv) in enumerate(sessions.items()):
        s.save(range(j * 1000, j * 1000 + n), kv, session=name).wait()
        if j == 0:
            assert s._host_pool.ahead >= 6 and s._host_pool.wait_ready(10)
    s.flush()
    for j, (name, kv) in enumerate(sessions.items()):
        r = s.restore(range(j * 1000, j * 1000 + n), session=name)
        assert r.num_tokens == n
        assert_kv_equal(r.kv, kv)
    pool = s.stats()["host_pool"]
    assert pool["taken"] >= 27 and pool["error"] is None   # the full blocks of the later saves at least
    assert pool["taken"] > pool["slabs"] * s._host_pool.per_slab  # places were reused


def test_a_slab_made_ahead_while_saves_grew_the_pool_to_its_limit_is_let_go():
    """The thread's slab and the saves' slabs race for the last room under the limit: the
    limit holds, whichever lands first."""
    started, release = threading.Event(), threading.Event()

    class Slow(hostmem.SlabPool):
        def _new_slab(self):
            started.set()
            release.wait(10)   # saves take meanwhile
            return super()._new_slab()

    p = Slow(SLOT, 200 * SLOT, 200 * SLOT, pin=False)   # two slabs at most; wants both ahead
    try:
        assert started.wait(10)
        held = [p.take() for _ in range(2 * p.per_slab)]   # the saves grow it to the limit
        assert all(b is not None for b in held) and p.snapshot()["grown_on_demand"] == 2
        release.set()
        assert p.wait_ready(10)
        assert p.snapshot()["slabs"] == p.max_slabs == 2 and p.take() is None
    finally:
        release.set()
        p.close()
