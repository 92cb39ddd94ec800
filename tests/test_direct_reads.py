"""ssd_page_cache="bypass": a load reads each cold value it needs whole with O_DIRECT into a
reused bounce buffer and decodes it from there ("streamed", reads.SSDReads._stream), whatever
memory it lands in; a restore that needs only some layers of a block (``needed_from``) reads
them with O_DIRECT straight into page-aligned memory the caller allocated, or through the page
cache, then drops them; the writer drops what it wrote. Restores stay exact, a damaged layer is
a miss, and the page cache does not keep the store."""

from __future__ import annotations

import errno
import mmap
import os
import resource
import sys

import numpy as np
import pytest
import torch

import tierkv
import tierkv.reads as reads_mod
from tierkv.hostmem import HUGE_PAGE, aligned_empty, prefault
from tierkv.pagecache import drop_file_cache, resident_fraction, resident_pages
from tierkv.valuereader import OVERFLOW_HEADER_BYTES

from conftest import BLOCK, assert_kv_equal, kv_slice, make_kv, small_spec

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="O_DIRECT reads are Linux-only")

N = 6 * BLOCK


def spec_():
    # 16 tokens x 6 layers x (4 heads x 64 x fp32) x 2 = 192 KiB a block, 32 KiB a layer
    return small_spec(dtype=torch.float32, layers=6, heads=4, dim=64)


@pytest.fixture
def small_requests(monkeypatch):
    """Requests of two layers (64 KiB), and no floor: the test blocks are small."""
    monkeypatch.setattr(reads_mod, "DIRECT_READ_BYTES", 64 << 10)
    monkeypatch.setattr(reads_mod, "DIRECT_MIN_BYTES", 4096)


def cold_store(open_store, store_path, kv, spec, **settings):
    """Save ``kv`` as session "s", close, drop data.mdb's pages, reopen with ``settings``; skip
    where the file system has no O_DIRECT or keeps files in memory."""
    base = dict(host_bytes=0, device_bytes=0, persist="write_through")
    s = open_store(spec, **base, **{k: v for k, v in settings.items() if k != "ssd_page_cache"})
    s.save(range(kv[0][0].shape[1]), kv, session="s")
    s.flush()
    s.close()
    data = os.path.join(store_path, "data.mdb")
    drop_file_cache(data)
    s = open_store(spec, **base, **settings)
    if s._ssd.values is None or s._ssd.values.direct_fd() < 0:
        pytest.skip("no O_DIRECT reads on this file system")
    if resident_fraction(data) > 0.5:
        pytest.skip("this file system keeps the store in memory")
    return s, data


def preallocated(layer, index, shape, dtype, device):
    """An ``allocate`` handing out page-aligned memory of the caller's (as a server's KV memory)."""
    return aligned_empty(tuple(shape), dtype)


def restore(s, n=N, allocate=preallocated):
    return s.restore_async(range(n), session="s", allocate=allocate).result()


def cached_growth(data, before):
    """How much more of the store file is in the page cache than ``before`` (a fraction)."""
    return resident_fraction(data) - before


def located(s, block):
    """(file offset, size) of block ``block`` of session "s" in data.mdb."""
    key = s._ssd.get_session("s").keys[block]
    with s._ssd.reader() as txn:
        return s._ssd.values.locate(s._ssd.blocks_cursor(txn), key)


def value_bytes(s, n_blocks=N // BLOCK):
    """The stored sizes of session "s"'s first ``n_blocks`` values."""
    return sum(located(s, i)[1] for i in range(n_blocks))


@pytest.mark.parametrize("codec", ["raw", "zstd-planes"])
def test_cold_restore_into_callers_memory_reads_with_o_direct_exactly(open_store, store_path, small_requests, codec):
    """Every layer comes back bit-exact; (nearly) all bytes were read with O_DIRECT, and the
    store file is no more in the page cache after the restore than before it."""
    spec = spec_()
    kv = make_kv(spec, N, seed=1)
    s, data = cold_store(open_store, store_path, kv, spec, ssd_codec=codec, ssd_page_cache="bypass")
    before = resident_fraction(data)
    assert_kv_equal(restore(s).kv, kv)
    st = s.stats()
    assert st["corrupt_blocks"] == 0
    assert st["ssd_direct_read_bytes"] >= 0.9 * N * spec.bytes_per_token
    s.close()  # the last decode thread drops what was read buffered: done once the store is closed
    assert cached_growth(data, before) < 0.1


def test_cold_restore_into_fresh_tensors_streams_past_the_page_cache(open_store, store_path, small_requests):
    """Results tierkv allocates for the restore: every value is read with O_DIRECT into a bounce
    buffer (in requests of DIRECT_READ_BYTES) and copied out, so the store file gains no pages
    in the page cache, even while the store is open."""
    spec = spec_()
    kv = make_kv(spec, N, seed=1)
    s, data = cold_store(open_store, store_path, kv, spec, ssd_codec="raw", ssd_page_cache="bypass")
    before = resident_fraction(data)
    assert_kv_equal(s.restore(range(N), session="s").kv, kv)
    assert s.stats()["ssd_direct_read_bytes"] >= 0.8 * value_bytes(s)
    assert s.stats()["corrupt_blocks"] == 0
    assert cached_growth(data, before) < 0.1
    s.close()


def header_pages_cached(s, locations):
    """Per value at these (offset, size): whether the page holding its overflow page header (the
    page it begins in) is in the page cache. (Asked with mincore: a lookup would read it in.)"""
    start = s._ssd.values._start
    return [resident_pages(start + offset - OVERFLOW_HEADER_BYTES, 1)[0] == 1 for offset, _ in locations]


def test_a_bypass_restore_keeps_each_values_first_page_so_the_next_lookup_reads_no_disk(open_store, store_path):
    """A bypassing restore drops what it read, but not the page each value begins in: LMDB reads
    that page whenever a lookup stops at the block's key, so the next restore of the session
    would otherwise read it from the disk in its setup, on the caller's thread (a major fault
    per block). Kept, the next restore's setup faults nothing in from the disk, and the rest of
    the values stays out of the page cache."""
    spec = spec_()
    kv = make_kv(spec, N, seed=12)
    s, data = cold_store(open_store, store_path, kv, spec, ssd_codec="raw", ssd_page_cache="bypass")
    locations = [located(s, i) for i in range(N // BLOCK)]
    before = resident_fraction(data)
    assert_kv_equal(s.restore(range(N), session="s").kv, kv)
    s.flush()   # the decode threads are done: the load's pages are dropped
    assert all(header_pages_cached(s, locations))
    assert cached_growth(data, before) < 0.1
    faults = resource.getrusage(resource.RUSAGE_THREAD).ru_majflt
    handle = s.restore_async(range(N), session="s")
    assert resource.getrusage(resource.RUSAGE_THREAD).ru_majflt == faults   # the setup read no page from the disk
    assert_kv_equal(handle.result().kv, kv)
    assert s.stats()["corrupt_blocks"] == 0


def test_a_bypass_restore_of_cached_values_leaves_none_of_them_cached(open_store, store_path):
    """Values the page cache held already (written by a store that uses it) come from there, and
    a bypassing restore drops them, first pages too: the kernel keeps such pages in folios of
    many, and keeping one page would keep its whole folio."""
    spec = spec_()
    kv = make_kv(spec, N, seed=13)
    base = dict(host_bytes=0, device_bytes=0, persist="write_through", ssd_codec="raw")
    s = open_store(spec, **base, ssd_page_cache="use")
    s.save(range(N), kv, session="s")
    s.flush()
    s.close()
    data = os.path.join(store_path, "data.mdb")
    s = open_store(spec, **base, ssd_page_cache="bypass")
    if s._ssd.values is None or s._ssd.values.direct_fd() < 0:
        pytest.skip("no O_DIRECT reads on this file system")
    if resident_fraction(data) < 0.5:
        pytest.skip("the written values did not stay in the page cache")
    value_total = value_bytes(s)
    assert_kv_equal(s.restore(range(N), session="s").kv, kv)
    assert s.stats()["ssd_direct_read_bytes"] == 0   # every value came from the page cache
    s.close()
    assert resident_fraction(data) * os.path.getsize(data) < 0.25 * value_total


def test_dropping_values_keeps_the_first_pages_asked_for_even_where_ranges_merge(tmp_path):
    """ValueReader.drop_values asks to drop every page of each value but the first of those in
    ``keep_first``, also where the values lie close together and their ranges go to the kernel
    as one; without ``keep_first`` every page goes."""
    from tierkv.valuereader import ValueReader

    asked = []

    class Reader(ValueReader):
        def __init__(self):
            self._start, self._end = 0, 0   # no map: nothing to unmap

        def _advise(self, ranges, advice):
            asked.extend(ranges)

    page = mmap.PAGESIZE
    head = OVERFLOW_HEADER_BYTES
    values = [(page + head, 2 * page + 100), (4 * page + head, page), ((64 << 20) + head, 3 * page)]
    Reader().drop_values(values, keep_first={offset for offset, _ in values})
    dropped = {p for start, length in asked for p in range(start, start + length, page)}
    for offset, size in values:
        first = offset - head
        assert first not in dropped
        assert all(p in dropped for p in range(first + page, (offset + size) // page * page, page))
    # the first two values' ranges are closer than DONTNEED_GAP: one merged range, split around
    # the second value's first page
    assert asked[0] == (2 * page, 2 * page)
    asked.clear()
    Reader().drop_values(values)
    dropped = {p for start, length in asked for p in range(start, start + length, page)}
    assert all(offset - head in dropped for offset, _ in values)


def test_the_default_restore_fills_the_page_cache_for_comparison(open_store, store_path):
    """The same cold restore with ssd_page_cache="use" leaves the values in the page cache (what
    the tests above show "bypass" avoids)."""
    spec = spec_()
    kv = make_kv(spec, N, seed=1)
    s, data = cold_store(open_store, store_path, kv, spec, ssd_codec="raw", ssd_page_cache="use")
    before = resident_fraction(data)
    assert_kv_equal(restore(s).kv, kv)
    assert s.stats()["ssd_direct_read_bytes"] == 0
    s.close()
    assert cached_growth(data, before) > 0.5


def test_values_with_a_compressed_layer_stream_exactly(open_store, store_path, small_requests):
    """zstd-planes compresses a layer of zeros and stores the rest as they are: a streamed value
    decodes both kinds from the bounce buffer, and per-layer waits see every layer."""
    spec = spec_()
    kv = make_kv(spec, N, seed=2)
    kv[1] = tuple(torch.zeros_like(x) for x in kv[1])
    s, _ = cold_store(open_store, store_path, kv, spec, ssd_codec="zstd-planes", ssd_page_cache="bypass")
    h = s.restore_async(range(N), session="s", allocate=preallocated)
    for layer in range(spec.num_layers):
        k, v = h.layer(layer)
        assert torch.equal(k, kv[layer][0]) and torch.equal(v, kv[layer][1])
    assert_kv_equal(h.result().kv, kv)
    assert s.stats()["ssd_direct_read_bytes"] >= 0.9 * value_bytes(s)


def test_layers_after_a_compressed_layer_are_aligned_and_read_directly(open_store, store_path, small_requests):
    """The stored layers after a compressed one start on a page (a gap of zeros before them):
    a restore that needs only layers 0-2 (``needed_from``), so no value is wanted whole and
    none is streamed, reads stored layers 0 and 2 with O_DIRECT straight into the caller's
    memory, around compressed layer 1."""
    spec = spec_()
    kv = make_kv(spec, N, seed=2)
    kv[1] = tuple(torch.zeros_like(x) for x in kv[1])
    s, _ = cold_store(open_store, store_path, kv, spec, ssd_codec="zstd-planes", ssd_page_cache="bypass")
    L = spec.num_layers
    r = s.restore_async(range(N), session="s", allocate=preallocated, needed_from=[0] * 3 + [N] * (L - 3)).result()
    assert r.num_tokens == N
    assert_kv_equal(r.kv[:3], kv[:3])
    # stored layers 0 and 2 of every block at most; a run of the first block may lie in the
    # pages the store read around its own header when it opened, and is read from there
    stored = 2 * spec.layer_span(0, BLOCK)[1] * (N // BLOCK)
    assert 0.8 * stored <= s.stats()["ssd_direct_read_bytes"] <= stored


def test_a_damaged_layer_read_directly_is_a_counted_miss(open_store, store_path, small_requests):
    """A byte flipped inside a stored layer of block 2: the O_DIRECT read checks the layer's
    CRC32C, so the restore returns the two blocks before it, exact, and counts one corrupt block."""
    spec = spec_()
    kv = make_kv(spec, N, seed=3)
    s, data = cold_store(open_store, store_path, kv, spec, ssd_codec="raw", ssd_page_cache="bypass")
    offset, size = located(s, 2)
    s.close()
    with open(data, "r+b") as f:
        f.seek(offset + size - 100)  # inside the last layer
        b = f.read(1)
        f.seek(offset + size - 100)
        f.write(bytes([b[0] ^ 0x40]))
    drop_file_cache(data)
    s = open_store(spec, host_bytes=0, device_bytes=0, ssd_codec="raw", ssd_page_cache="bypass")
    r = restore(s)
    assert r.num_tokens == 2 * BLOCK
    assert_kv_equal(r.kv, kv_slice(kv, 2 * BLOCK))
    assert s.stats()["corrupt_blocks"] == 1 and s.stats()["ssd_direct_read_bytes"] > 0


def test_a_short_streamed_read_is_a_miss_not_wrong_kv(open_store, store_path, small_requests, monkeypatch):
    """An O_DIRECT read that comes back short inside block 3's value (a disk or file system
    fault): that block is a miss, the three before it are restored exactly."""
    spec = spec_()
    kv = make_kv(spec, N, seed=11)
    s, _ = cold_store(open_store, store_path, kv, spec, ssd_codec="raw", ssd_page_cache="bypass")
    offset, size = located(s, 3)
    direct_fd, real = s._ssd.values.direct_fd(), os.preadv
    short = []

    def preadv(fd, bufs, at, *a):
        got = real(fd, bufs, at, *a)
        if fd == direct_fd and offset + size // 2 <= at < offset + size:  # its second half
            short.append(at)
            return 4096
        return got

    monkeypatch.setattr(os, "preadv", preadv)
    r = s.restore(range(N), session="s")
    assert short
    assert r.num_tokens == 3 * BLOCK
    assert_kv_equal(r.kv, kv_slice(kv, 3 * BLOCK))


def test_a_streamed_value_behind_a_wrong_page_header_is_a_miss(open_store, store_path, small_requests):
    """A streamed value is parsed from the bytes it reads, the LMDB overflow page header in
    front of it included: when that header names another page (a damaged page, or a location
    gone stale), the value is a miss, counted, and the blocks before it are restored exactly."""
    spec = spec_()
    kv = make_kv(spec, N, seed=14)
    s, data = cold_store(open_store, store_path, kv, spec, ssd_codec="raw", ssd_page_cache="bypass")
    offset, _ = located(s, 1)
    s.close()
    with open(data, "r+b") as f:  # the low byte of the page number in front of block 1's value
        f.seek(offset - 16)
        b = f.read(1)
        f.seek(offset - 16)
        f.write(bytes([b[0] ^ 0x01]))
    drop_file_cache(data)
    s = open_store(spec, host_bytes=0, device_bytes=0, ssd_codec="raw", ssd_page_cache="bypass")
    r = s.restore(range(N), session="s")
    assert r.num_tokens == BLOCK
    assert_kv_equal(r.kv, kv_slice(kv, BLOCK))
    assert s.stats()["corrupt_blocks"] == 1


def test_a_value_above_the_stream_limit_is_read_layer_by_layer(open_store, store_path, small_requests, monkeypatch):
    """Values larger than STREAM_MAX_BYTES are not streamed (a bounce buffer per I/O thread of
    their size would cost too much memory): into fresh tensors they are read through the page
    cache, layer by layer, exact."""
    monkeypatch.setattr(reads_mod, "STREAM_MAX_BYTES", 64 << 10)
    spec = spec_()
    kv = make_kv(spec, N, seed=12)
    s, _ = cold_store(open_store, store_path, kv, spec, ssd_codec="raw", ssd_page_cache="bypass")
    assert_kv_equal(s.restore(range(N), session="s").kv, kv)
    assert s.stats()["ssd_direct_read_bytes"] == 0
    assert s._reads._bounce.held_bytes == 0


def test_bounce_buffers_are_reused_and_let_go_at_close(open_store, store_path, small_requests):
    """Restore after restore reuses the same few bounce buffers (at most one per I/O thread is
    kept), and closing the store lets go of them."""
    spec = spec_()
    kv = make_kv(spec, N, seed=13)
    s, data = cold_store(open_store, store_path, kv, spec, ssd_codec="raw", ssd_page_cache="bypass")
    kept = []
    for _ in range(3):
        drop_file_cache(data)
        assert_kv_equal(s.restore(range(N), session="s").kv, kv)
        kept.append(s._reads._bounce.held_bytes)
    assert 0 < kept[0] == kept[1] == kept[2] <= s.config.io_threads * HUGE_PAGE  # a value rounds up to one
    s.close()
    assert s._reads._bounce.held_bytes == 0


def test_layers_a_restore_does_not_need_are_not_read_directly(open_store, store_path, small_requests):
    """``needed_from``: layers 0-2 need blocks 3-5, layers 3-5 all six. The O_DIRECT requests
    cover the needed layers only, the rows before a layer's first block keep the caller's
    memory, and every needed row is exact."""
    spec = spec_()
    kv = make_kv(spec, N, seed=6)
    s, _ = cold_store(open_store, store_path, kv, spec, ssd_codec="raw", ssd_page_cache="bypass")

    def allocate(layer, index, shape, dtype, device):
        return preallocated(layer, index, shape, dtype, device).fill_(-7.0)

    needed = [3 * BLOCK] * 3 + [0] * 3
    r = s.restore_async(range(N), session="s", allocate=allocate, needed_from=needed).result()
    assert r.num_tokens == N
    for layer, start in enumerate(needed):
        assert_kv_equal([tuple(x[:, start:] for x in r.kv[layer])], [tuple(x[:, start:] for x in kv[layer])])
        assert all(torch.all(x[:, :start] == -7.0) for x in r.kv[layer])
    read = N * spec.bytes_per_token * 3 // 4  # a quarter of the (block, layer) pairs left out
    # blocks 3-5, needed whole, are streamed (their headers too: a page at most each); blocks
    # 0-2 have their needed layers read straight into the caller's memory
    assert 0.8 * read <= s.stats()["ssd_direct_read_bytes"] <= read + 3 * 4096
    assert s.stats()["ssd_read_bytes"] <= read + 6 * 4096


def test_warm_values_are_read_through_the_page_cache(open_store, store_path, small_requests):
    """A value already in the page cache comes from there: nothing is read with O_DIRECT."""
    spec = spec_()
    kv = make_kv(spec, N, seed=4)
    s, data = cold_store(open_store, store_path, kv, spec, ssd_codec="raw", ssd_page_cache="bypass")
    with open(data, "rb") as f:
        while f.read(1 << 20):  # warm the whole file
            pass
    assert_kv_equal(restore(s).kv, kv)
    assert s.stats()["ssd_direct_read_bytes"] == 0


def test_unaligned_result_memory_is_filled_from_the_bounce_buffer(open_store, store_path, small_requests):
    """Result tensors the caller allocates off a page boundary cannot take O_DIRECT themselves:
    the values are streamed into the bounce buffer and copied out, exact."""
    spec = spec_()
    kv = make_kv(spec, N, seed=5)
    s, _ = cold_store(open_store, store_path, kv, spec, ssd_codec="raw", ssd_page_cache="bypass")

    def allocate(layer, index, shape, dtype, device):
        n = int(np.prod(shape))
        return aligned_empty((n + 1,), dtype)[1:].view(shape)  # 4 bytes past a page

    assert_kv_equal(restore(s, allocate=allocate).kv, kv)
    assert s.stats()["ssd_direct_read_bytes"] >= 0.8 * value_bytes(s)


def test_refused_o_direct_falls_back_to_buffered_reads(open_store, store_path, small_requests, monkeypatch):
    """A file system that opens with O_DIRECT but refuses the read (EINVAL): the read is redone
    through the page cache, exact, and later reads do not try O_DIRECT again."""
    spec = spec_()
    kv = make_kv(spec, N, seed=6)
    s, _ = cold_store(open_store, store_path, kv, spec, ssd_codec="raw", ssd_page_cache="bypass")
    direct_fd = s._ssd.values.direct_fd()
    real = os.preadv
    tries = []

    def preadv(fd, bufs, offset, *a):
        if fd == direct_fd:
            tries.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, bufs, offset, *a)

    monkeypatch.setattr(os, "preadv", preadv)
    assert_kv_equal(restore(s).kv, kv)
    assert 1 <= len(tries) <= s.config.io_threads  # each thread that tried before the first refusal
    assert s._ssd.values.direct_fd() == -1


def test_prefetch_streams_into_host_buffers(open_store, store_path):
    """A prefetch decodes SSD blocks into host buffers allocated for it, streamed like a
    restore's, past the page cache; a restore after it is exact (from the host tier)."""
    spec = spec_()
    kv = make_kv(spec, N, seed=7)
    base = dict(host_bytes="64MiB", device_bytes=0, persist="write_through", ssd_codec="raw")
    s = open_store(spec, **base)
    s.save(range(N), kv, session="s")
    s.flush()
    s.close()
    data = os.path.join(store_path, "data.mdb")
    drop_file_cache(data)
    s = open_store(spec, **base, ssd_page_cache="bypass")
    if s._ssd.values is None:
        pytest.skip("values are not read with pread here")
    before = resident_fraction(data)
    s.prefetch(range(N), session="s").wait()
    assert cached_growth(data, before) < 0.1
    assert_kv_equal(s.restore(range(N), session="s").kv, kv)
    if s._ssd.values.direct_fd() >= 0:
        assert s.stats()["ssd_direct_read_bytes"] >= 0.9 * value_bytes(s)
    s.close()
    assert cached_growth(data, before) < 0.1


def test_values_written_before_alignment_are_streamed_too(open_store, store_path, small_requests):
    """A store written by a tierkv that did not align values: their layers cannot be read
    straight into the result, but a streamed read starts at the value's page, so they are read
    with O_DIRECT all the same, exact."""
    spec = spec_()
    kv = make_kv(spec, N, seed=8)
    s = open_store(spec, host_bytes=0, device_bytes=0, persist="write_through", ssd_codec="raw")
    s._align = None  # as values were written before
    s.save(range(N), kv, session="s")
    s.flush()
    s.close()
    drop_file_cache(os.path.join(store_path, "data.mdb"))
    s = open_store(spec, host_bytes=0, device_bytes=0, ssd_codec="raw", ssd_page_cache="bypass")
    if s._ssd.values is None or s._ssd.values.direct_fd() < 0:
        pytest.skip("no O_DIRECT reads on this file system")
    assert_kv_equal(restore(s).kv, kv)
    assert s.stats()["ssd_direct_read_bytes"] >= 0.8 * value_bytes(s)


def test_setting_is_checked():
    with pytest.raises(tierkv.ConfigError, match="ssd_page_cache"):
        tierkv.TierKVConfig(ssd_page_cache="off")


def test_aligned_empty_starts_on_a_page_and_on_huge_pages_when_asked():
    for shape, dtype in [((3, 5), torch.float32), ((1000,), torch.bfloat16), ((0,), torch.uint8)]:
        t = aligned_empty(shape, dtype)
        assert t.shape == shape and t.dtype == dtype and t.data_ptr() % 4096 == 0
    t = aligned_empty((3 * HUGE_PAGE,), torch.uint8, huge=True)
    assert t.data_ptr() % HUGE_PAGE == 0
    t.fill_(7)
    assert int(t.sum()) == 7 * 3 * HUGE_PAGE


def _anon_huge_kib(addr: int) -> int:
    """AnonHugePages (KiB) of the mapping of this process that holds ``addr``, from smaps."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and not head[0].endswith(":"):
                lo, hi = (int(x, 16) for x in head[0].split("-"))
                inside = lo <= addr < hi
            elif inside and head[0] == "AnonHugePages:":
                return int(head[1])
    return 0


def _thp_fallbacks() -> int:
    with open("/proc/vmstat") as f:
        return sum(int(v) for k, v in (line.split() for line in f) if k == "thp_fault_fallback")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="transparent huge pages are Linux's")
def test_huge_buffers_get_huge_pages_after_the_c_allocator_freed_large_ones():
    """Once a process has freed a large buffer, glibc serves the next large requests from its
    heap, whose memory ``MADV_HUGEPAGE`` did not turn into huge pages: a huge buffer (a bypassing
    load's bounce buffers, a ``CachePool``'s slab) then came out in 4 KiB pages, and its 4 MiB
    O_DIRECT reads reached the disk in pieces of about 1 MiB (reload run 81)."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            thp = f.read()
    except OSError:
        pytest.skip("no transparent huge pages here")
    if "[never]" in thp:
        pytest.skip("transparent huge pages are off")
    for _ in range(3):   # large buffers freed: glibc raises its threshold for mapping one apart
        x = torch.empty(24 << 20, dtype=torch.uint8)
        x.fill_(1)
        del x
    before = _thp_fallbacks()
    t = aligned_empty((4 * HUGE_PAGE,), torch.uint8, huge=True)   # under the raised threshold
    prefault(t)
    if _thp_fallbacks() > before:
        pytest.skip("the kernel had no huge page to give")
    assert t.data_ptr() % HUGE_PAGE == 0 and t.numel() == 4 * HUGE_PAGE
    assert _anon_huge_kib(t.data_ptr()) >= 4 * HUGE_PAGE // 1024
    t.fill_(3)   # the memory is the tensor's own, and writable
    assert int(t[-1]) == 3 and int(t[0]) == 3


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="transparent huge pages are Linux's")
def test_a_huge_buffer_is_unmapped_when_its_last_view_dies():
    """A huge buffer is a map of its own: a view keeps all of it, and the last one to go unmaps it."""
    import psutil

    proc = psutil.Process()
    before = proc.memory_info().rss
    t = aligned_empty((32 * HUGE_PAGE,), torch.uint8, huge=True)
    prefault(t)
    view = t.view(torch.float32)[:16]
    del t
    view.fill_(1.5)
    assert proc.memory_info().rss - before > 48 * 2**20   # 64 MiB resident, held by the view
    del view
    assert proc.memory_info().rss - before < 16 * 2**20

@pytest.mark.parametrize("mode", ["use", "bypass"])
def test_saved_values_leave_the_page_cache_when_bypassing_it(open_store, store_path, mode):
    """With "bypass", the writer drops the values it wrote from the page cache once committed;
    with "use" they stay there. Either way the session restores exactly."""
    spec = spec_()
    kv = make_kv(spec, N, seed=9)
    data = os.path.join(store_path, "data.mdb")
    s = open_store(spec, host_bytes=0, device_bytes=0, persist="write_through", ssd_codec="raw", ssd_page_cache=mode)
    s.save(range(N), kv, session="s")
    s.flush()
    if s._ssd.values is None:
        pytest.skip("values are not read with pread here")
    value_bytes = N * spec.bytes_per_token
    cached = resident_fraction(data) * os.path.getsize(data)
    if mode == "bypass":
        assert cached < 0.25 * value_bytes
    else:
        assert cached > 0.9 * value_bytes
    assert_kv_equal(s.restore(range(N), session="s").kv, kv)


def _mounts() -> list[tuple[str, str]]:
    with open("/proc/mounts") as f:
        return [tuple(line.split()[1:3]) for line in f]


def _fs_type(path: str) -> str:
    """The type of the file system ``path`` lies on (the longest mount point above it)."""
    path = os.path.realpath(path)
    return max(((m, t) for m, t in _mounts() if path == m or path.startswith(m.rstrip("/") + "/")),
               key=lambda mt: len(mt[0]))[1]


def _tmpfs_dir() -> str | None:
    """A writable directory on a file system kept in memory (tmpfs), if this machine has one."""
    return next((m for m, t in _mounts() if t == "tmpfs" and m in ("/dev/shm", "/tmp") and os.access(m, os.W_OK)),
                None)


def test_make_cold_refuses_pages_a_mapping_keeps(tmp_path):
    """A benchmark's cold read must come from the disk: while a mapping of the file holds its
    pages, dropping them cannot work, and make_cold says so instead of returning quietly."""
    import mmap

    from tierkv.pagecache import make_cold

    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(4 << 20))
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        sum(m[i] for i in range(0, len(m), mmap.PAGESIZE))  # every page mapped by this process
        with pytest.raises(tierkv.ColdReadError, match="stayed in the page cache"):
            make_cold(str(path))
    # mapping closed: the pages go, unless the file system keeps files in memory
    if _fs_type(str(tmp_path)) in ("tmpfs", "ramfs"):
        pytest.skip("tmp_path is on a file system in memory")
    assert make_cold(str(path)) <= 0.01
    assert resident_fraction(str(path)) <= 0.01


def test_make_cold_refuses_a_file_system_in_memory():
    from tierkv.pagecache import make_cold

    where = _tmpfs_dir()
    if where is None:
        pytest.skip("no writable tmpfs here")
    import tempfile

    with tempfile.NamedTemporaryFile(dir=where) as f:
        f.write(os.urandom(1 << 20))
        f.flush()
        with pytest.raises(tierkv.ColdReadError, match="tmpfs"):
            make_cold(f.name)
        assert isinstance(tierkv.ColdReadError("x"), tierkv.TierKVError)


def test_direct_io_probe_reads_and_cleans_up(tmp_path, monkeypatch):
    from tierkv import pagecache

    assert pagecache.direct_io_supported(str(tmp_path)) in (True, False)
    assert os.listdir(tmp_path) == []  # its probe file is gone
    # a file system that refuses O_DIRECT (EINVAL at open, as older tmpfs and some FUSE mounts)
    real_open = os.open

    def refusing(path, flags, *a, **k):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a, **k)
    monkeypatch.setattr(pagecache.os, "open", refusing)
    assert pagecache.direct_io_supported(str(tmp_path)) is False
    assert os.listdir(tmp_path) == []
