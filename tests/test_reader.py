"""The pread read path (valuereader.ValueReader): where it reads, that it is the path taken, and that a
value read from the wrong place is a miss."""

from __future__ import annotations

import os
import sys
import threading
import time

import lmdb
import pytest
import torch

from tierkv.codec import header_bound, parse_block
from tierkv.keys import as_tokens, block_keys, chain_seed
from tierkv.pagecache import drop_file_cache, resident_fraction

from conftest import BLOCK, assert_kv_equal, kv_slice, make_kv, small_spec

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pread path is Linux-only")


def big_spec():
    # 16 tokens x 4 layers x (4 heads x 64 x fp32) x 2 = 128 KiB a block: overflow values in LMDB
    return small_spec(dtype=torch.float32, heads=4, dim=64)


def saved(open_store, n, seed, **settings):
    """A store holding one session ``s`` of ``n`` tokens (flushed to SSD), its spec and KV."""
    spec = big_spec()
    kv = make_kv(spec, n, seed=seed)
    s = open_store(spec, **settings)
    s.save(range(n), kv, session="s")
    s.flush()
    return s, spec, kv


def keys_of(s, n):
    return block_keys(chain_seed(s.fingerprint, None), as_tokens(range(n)), BLOCK, partial=False)


def test_locate_finds_each_value_where_lmdb_keeps_it(open_store):
    s, _, _ = saved(open_store, 4 * BLOCK, 0, persist="write_through")
    reader = s._ssd.values
    assert reader is not None
    fd = os.open(s._ssd.data_file(), os.O_RDONLY)
    try:
        with s._ssd.reader() as txn:
            cur = s._ssd.blocks_cursor(txn)
            for key in keys_of(s, 4 * BLOCK):
                offset, size = reader.locate(cur, key)
                value = bytes(s._ssd.get_value(txn, key))
                assert size == len(value)
                assert os.pread(fd, size, offset) == value
            assert reader.locate(cur, b"\0" * 16) is None
    finally:
        os.close(fd)


def test_restore_reads_values_with_pread_not_through_the_map(open_store, store_path, monkeypatch):
    n = 5 * BLOCK + 3
    s, spec, kv = saved(open_store, n, 4, host_bytes=0, device_bytes=0)
    s.close()
    s = open_store(spec, host_bytes=0, device_bytes=0)

    def no_map_reads(txn, key):
        raise AssertionError("a block value was read through LMDB's map")

    monkeypatch.setattr(s._ssd, "get_value", no_map_reads)
    assert_kv_equal(s.restore(range(n), session="s").kv, kv)
    assert s.stats()["ssd_read_bytes"] == s._ssd.ssd_used()  # every value read once, counted
    h = s.prefetch(range(n), session="s")  # the host-tier path reads the same way
    h.wait()
    assert_kv_equal(s.restore(range(n), session="s").kv, kv)


def test_reader_finds_the_map_from_lmdb_pages_where_the_kernel_says_it_is(open_store):
    """The reader works out where LMDB's map starts from a page header (no /proc needed); it
    must agree with the kernel's own list of this process's mappings."""
    s, _, _ = saved(open_store, 2 * BLOCK, 1, persist="write_through")
    reader = s._ssd.values
    ino = os.stat(s._ssd.data_file()).st_ino
    with open("/proc/self/maps") as f:
        maps = [line.split() for line in f]
    starts = [int(m[0].split("-")[0], 16) for m in maps if len(m) >= 6 and int(m[4]) == ino and int(m[2], 16) == 0]
    assert reader._start in starts


def test_without_pread_the_map_reads_ahead(open_store, monkeypatch):
    """Where no ValueReader can be made, values are read through the map: the store then
    reopens LMDB with readahead (without it, every 4 KiB page of a cold value is a read of its
    own), and restores stay exact, cold too."""
    from tierkv import store as store_mod

    n = 3 * BLOCK
    s, spec, kv = saved(open_store, n, 8, host_bytes=0, device_bytes=0)
    assert s._ssd.env.flags()["readahead"] is False  # the pread path keeps MADV_RANDOM
    s.close()
    monkeypatch.setattr(store_mod.ValueReader, "open", classmethod(lambda cls, store: None))
    s = open_store(spec, host_bytes=0, device_bytes=0)
    assert s._ssd.values is None and s._ssd.env.flags()["readahead"] is True
    drop_file_cache(s._ssd.data_file())
    assert_kv_equal(s.restore(range(n), session="s").kv, kv)


def test_map_fallback_restores_exactly(open_store):
    """Off Linux (no ValueReader) values are read through the map; same bytes."""
    n = 3 * BLOCK
    s, _, kv = saved(open_store, n, 5, host_bytes=0, device_bytes=0)
    s._ssd.values = None
    assert_kv_equal(s.restore(range(n), session="s").kv, kv)


def restore_after_damage(open_store, n, seed, damage):
    """Save ``n`` tokens, apply ``damage(store)`` (it closes the store), reopen, restore: only
    the first block may come back (exact), and one block is counted corrupt."""
    s, spec, kv = saved(open_store, n, seed, host_bytes=0, device_bytes=0)
    damage(s)
    s = open_store(spec, host_bytes=0, device_bytes=0)
    r = s.restore(range(n), session="s")
    assert r.num_tokens == BLOCK
    assert_kv_equal(r.kv, kv_slice(kv, BLOCK))
    assert s.stats()["corrupt_blocks"] == 1


def test_value_stored_under_another_key_is_a_miss(open_store, store_path):
    """The header checksum is seeded with the block key: another block's value (same model,
    same size, a valid value in itself) found under a key is a counted miss, never its KV."""
    def swap(s):
        k0, k1, _ = keys_of(s, 3 * BLOCK)
        s.close()
        env = lmdb.open(store_path, max_dbs=8)
        db = env.open_db(b"blocks")
        with env.begin(write=True) as txn:
            txn.put(k1, bytes(txn.get(k0, db=db)), db=db)
        env.close()

    restore_after_damage(open_store, 3 * BLOCK, 6, swap)


def test_untrusted_location_falls_back_to_the_map(open_store, store_path):
    """A location whose overflow page header does not name it (a damaged LMDB page, or an LMDB
    whose layout is not 0.9's) is not read by pread: the value is read through the map, where
    its own checksums judge it — here it is intact, so the restore is whole and exact."""
    n = 2 * BLOCK
    s, spec, kv = saved(open_store, n, 7, host_bytes=0, device_bytes=0)
    with s._ssd.reader() as txn:
        offset, _ = s._ssd.values.locate(s._ssd.blocks_cursor(txn), keys_of(s, n)[1])
    s.close()
    with open(os.path.join(store_path, "data.mdb"), "r+b") as f:
        f.seek(offset - 16)  # the overflow page's own page number
        f.write(b"\xff" * 8)
    s = open_store(spec, host_bytes=0, device_bytes=0)
    r = s.restore(range(n), session="s")
    assert_kv_equal(r.kv, kv)
    st = s.stats()
    assert st["pread_fallbacks"] == 1 and st["corrupt_blocks"] == 0


def test_restore_asks_the_disk_for_every_blocks_first_layer_at_once(open_store, store_path):
    """Layer 0 of every block is wanted first, each at a new place in the file: the restore asks
    the kernel for all of them before any decode thread reads, and for nothing beyond them."""
    n = 6 * BLOCK
    settings = dict(host_bytes=0, device_bytes=0, io_threads=1, ssd_codec="raw")
    s, spec, kv = saved(open_store, n, 9, persist="write_through", **settings)
    s.close()
    data = os.path.join(store_path, "data.mdb")
    drop_file_cache(data)
    if resident_fraction(data) > 0.05:
        pytest.skip("this file system keeps the store in memory")
    s = open_store(spec, **settings)
    with s._ssd.reader() as txn:
        cur = s._ssd.blocks_cursor(txn)
        offsets = [s._ssd.values.locate(cur, key)[0] for key in keys_of(s, n)]
        # where layer 0 starts in a value: after its header (and the padding that puts it on a page)
        size = s._ssd.values.locate(cur, keys_of(s, n)[0])[1]
        head = s._ssd.values.read_head(offsets[0], size, header_bound(spec, s.codec))
        first = parse_block(size, s.fingerprint, spec, s.codec, BLOCK, head=head, key=keys_of(s, n)[0]).layers[0][2][0][0]
    drop_file_cache(data)  # the header read just now, and whatever was read around it
    layer = spec.layer_span(0, BLOCK)[1]  # bytes of one layer of a full block
    gate = threading.Event()
    s._pool.submit(gate.wait)  # the only decode thread waits: whatever is read now was asked for
    try:
        h = s.restore_async(range(n), session="s")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and min(
                resident_fraction(data, off + first, layer) for off in offsets) < 1.0:
            time.sleep(0.01)
        assert min(resident_fraction(data, off + first, layer) for off in offsets) == 1.0
        last = [resident_fraction(data, off + first + (spec.num_layers - 1) * layer, layer) for off in offsets]
        assert max(last) == 0.0, last
    finally:
        gate.set()
    assert_kv_equal(h.result().kv, kv)


def _descriptors_of(path):
    """How many of this process's open descriptors refer to ``path``."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink(f"/proc/self/fd/{fd}") == path
        except OSError:
            pass
    return n


def test_each_value_is_read_through_a_descriptor_of_its_own_closed_after(open_store, monkeypatch):
    """The kernel keeps readahead state per open file: a restore reads each value through a
    descriptor of its own (one sequential stream per block, layer after layer), and closes them
    all when it is done. Over the cap, values share the reader's descriptor; still exact."""
    n = 6 * BLOCK + 5
    settings = dict(host_bytes=0, device_bytes=0, io_threads=1)
    s, spec, kv = saved(open_store, n, 11, **settings)
    s.close()
    s = open_store(spec, **settings)
    data = os.path.realpath(s._ssd.data_file())
    shared = _descriptors_of(data)  # the reader's own, plus LMDB's
    gate = threading.Event()
    s._pool.submit(gate.wait)  # the only decode thread waits: the restore's files are open now
    try:
        h = s.restore_async(range(n), session="s")
        assert _descriptors_of(data) == shared + 7  # 6 full blocks and the partial one
    finally:
        gate.set()
    assert_kv_equal(h.result().kv, kv)
    h.wait()
    deadline = time.monotonic() + 5  # closed by the thread that decodes the last layer
    while _descriptors_of(data) != shared and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _descriptors_of(data) == shared and s._ssd.values._own_fds == 0

    monkeypatch.setattr(type(s._ssd.values), "MAX_OWN_FDS", 2)
    gate = threading.Event()
    s._pool.submit(gate.wait)
    try:
        h = s.restore_async(range(n), session="s")
        assert _descriptors_of(data) == shared + 2
    finally:
        gate.set()
    assert_kv_equal(h.result().kv, kv)
    deadline = time.monotonic() + 5
    while _descriptors_of(data) != shared and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _descriptors_of(data) == shared and s._ssd.values._own_fds == 0


def test_a_restores_reads_are_counted_before_its_caller_wakes(open_store, monkeypatch):
    """stats() right after restore() returns already counts the restore's reads, however long
    the decode thread then takes to close the restore's descriptors."""
    from tierkv.valuereader import ValueFile

    n = 3 * BLOCK
    s, spec, kv = saved(open_store, n, 12, host_bytes=0, device_bytes=0)
    s.close()
    s = open_store(spec, host_bytes=0, device_bytes=0)
    close = ValueFile.close
    monkeypatch.setattr(ValueFile, "close", lambda self: (time.sleep(0.05), close(self))[1])
    assert_kv_equal(s.restore(range(n), session="s").kv, kv)
    st = s.stats()
    assert st["ssd_read_bytes"] == s._ssd.ssd_used() and st["moved"]["ssd->caller"]["bytes"] > 0
