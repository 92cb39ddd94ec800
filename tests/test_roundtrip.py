"""Bit-exact round trips along every tier path, for every float dtype."""

import pytest
import torch

from conftest import BLOCK, assert_kv_equal, kv_slice, make_kv, small_spec

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path", ["device", "host", "ssd_reopen"])
def test_round_trip_bit_exact(open_store, store_path, dtype, path):
    spec = small_spec(dtype)
    n = 5 * BLOCK + 7  # full blocks and a partial one
    kv = make_kv(spec, n, seed=1)
    toks = list(range(1000, 1000 + n))
    budgets = {"device": dict(device_bytes="1MiB", host_bytes="1MiB"),
               "host": dict(device_bytes=0, host_bytes="1MiB"),
               "ssd_reopen": dict(device_bytes="1MiB", host_bytes="1MiB")}[path]
    s = open_store(spec, **budgets)
    s.save(toks, kv, session="s").wait()
    if path == "ssd_reopen":
        s.close()
        s = open_store(spec)
    r = s.restore(toks, session="s")
    assert r.num_tokens == n
    assert_kv_equal(r.kv, kv)
    want = {"device": "device", "host": "host", "ssd_reopen": "ssd"}[path]
    assert set(r.sources) == {want}


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_through_demotion_to_ssd(open_store, dtype):
    spec = small_spec(dtype)
    n = 8 * BLOCK
    kv = make_kv(spec, n, seed=2)
    s = open_store(spec, device_bytes=2 * BLOCK * spec.bytes_per_token, host_bytes=2 * BLOCK * spec.bytes_per_token)
    s.save(range(n), kv, session="s")
    s.flush()
    st = s.stats()
    assert st["resident_bytes"]["device"] <= 2 * BLOCK * spec.bytes_per_token
    assert st["resident_bytes"]["host"] <= 2 * BLOCK * spec.bytes_per_token
    r = s.restore(range(n), session="s")
    assert r.num_tokens == n and r.sources.get("ssd", 0) >= 4
    assert_kv_equal(r.kv, kv)


def test_mla_layout_and_mixed_layers(open_store):
    import tierkv

    latent = tierkv.LayerSpec((tierkv.TensorSpec("latent", (40,), 0, "bfloat16"),))
    gqa = tierkv.LayerSpec((tierkv.TensorSpec("key", (1, 8), 1, "float16"),
                            tierkv.TensorSpec("value", (1, 4), 1, "float16")))
    spec = tierkv.KVSpec("mixed", (latent, gqa, latent))
    n = 2 * BLOCK + 3
    kv = make_kv(spec, n, seed=3)
    s = open_store(spec, device_bytes=0, host_bytes=0)
    s.save(range(n), kv, session="m").wait()
    s.flush()
    r = s.restore(range(n), session="m")
    assert r.num_tokens == n
    assert_kv_equal(r.kv, kv)


def test_restore_of_longer_query_returns_cached_prefix(open_store):
    spec = small_spec()
    n = 3 * BLOCK + 5
    kv = make_kv(spec, n)
    s = open_store(spec)
    s.save(range(n), kv, session="s")
    query = list(range(n)) + [7, 8, 9]
    assert s.lookup(query, session="s") == n
    r = s.restore(query, session="s")
    assert r.num_tokens == n
    assert_kv_equal(r.kv, kv)


def test_restore_diverging_inside_a_block_returns_exact_common_prefix(open_store):
    spec = small_spec()
    n = 3 * BLOCK
    kv = make_kv(spec, n)
    s = open_store(spec)
    s.save(range(n), kv, session="s")
    query = list(range(n))
    query[BLOCK + 5] = 99999
    r = s.restore(query, session="s")
    assert r.num_tokens == BLOCK + 5
    assert_kv_equal(r.kv, kv_slice(kv, BLOCK + 5))
    # without the session only whole blocks match by content
    assert s.lookup(query) == BLOCK


def test_content_match_without_session(open_store):
    spec = small_spec()
    kv = make_kv(spec, 4 * BLOCK)
    s = open_store(spec)
    s.save(range(4 * BLOCK), kv)  # no session: full blocks, by content
    assert s.lookup(range(4 * BLOCK + 9)) == 4 * BLOCK
    assert s.lookup([5] + list(range(1, 4 * BLOCK))) == 0
    r = s.restore(range(3 * BLOCK + 2))
    assert r.num_tokens == 3 * BLOCK
    assert_kv_equal(r.kv, kv_slice(kv, 3 * BLOCK))


def test_miss_returns_empty(open_store):
    s = open_store()
    r = s.restore([1, 2, 3])
    assert r.num_tokens == 0 and r.kv == []
    assert s.lookup([]) == 0
    assert s.stats()["miss_tokens"] == 3


def test_save_grows_a_session_and_reuses_blocks(open_store):
    spec = small_spec()
    n1, n2 = 2 * BLOCK + 3, 4 * BLOCK + 1
    kv = make_kv(spec, n2)
    s = open_store(spec, persist="write_through")
    s.save(range(n1), kv_slice(kv, n1), session="s").wait()
    first = s.stats()["ssd_raw_written"]
    s.save(range(n2), kv, session="s").wait()
    # the two full blocks were not written again; the old partial block was deleted
    written = s.stats()["ssd_raw_written"] - first
    assert written == (n2 - 2 * BLOCK) * spec.bytes_per_token
    assert s.session_info("s")["tokens"] == n2
    assert s.stats()["resident_bytes"]["ssd"] > 0
    r = s.restore(range(n2), session="s")
    assert_kv_equal(r.kv, kv)


@pytest.mark.parametrize("cap", [1, 1 << 40])
def test_writer_bounds_each_transaction(open_store, monkeypatch, cap):
    """Saves queued while the writer is busy go to SSD in transactions of whole ops that stop
    once WRITE_BATCH_BYTES of new values is reached (at least one op each), in queue order:
    LMDB holds a transaction's new pages in memory until it commits. Each value is encoded once
    (the next batch's start while one commits). A flush still waits for all of them, and every
    session restores exactly."""
    import threading

    import tierkv.writer

    monkeypatch.setattr(tierkv.writer, "WRITE_BATCH_BYTES", cap)
    spec = small_spec()
    n = 2 * BLOCK
    s = open_store(spec, persist="write_through")
    gate, holding, real = threading.Event(), threading.Event(), s._apply
    calls = []

    def held(ops):  # the first batch waits until every other save is queued behind it
        calls.append([op.session for op in ops if op.kind == "session"])
        if len(calls) == 1:
            holding.set()
            gate.wait(10)
        real(ops)

    s._apply = held
    encoded = []
    real_encode = s._encode

    def counting(b, payload, reuse=False):
        encoded.append(b.key)
        return real_encode(b, payload, reuse)

    s._encode = counting
    kvs = [make_kv(spec, n, seed=i) for i in range(5)]
    handles = [s.save(range(n), kvs[0], session="s0")]
    assert holding.wait(10)  # the writer holds the first save's batch: the others queue behind it
    handles += [s.save(range(i * 1000, i * 1000 + n), kvs[i], session=f"s{i}") for i in range(1, 5)]
    gate.set()
    s.flush()
    for h in handles:
        h.wait()
    sessions = [x for batch in calls for x in batch]
    assert sessions == [f"s{i}" for i in range(5)]  # in queue order
    sizes = [len(b) for b in calls if b]
    # uncapped, everything queued behind the held batch goes in one more
    assert sizes == ([1, 1, 1, 1, 1] if cap == 1 else [1, 4])
    assert s.stats()["ssd_writes"]["batches"] == len([b for b in calls if b])
    # each value encoded once: a batch's values were started while the one before committed,
    # and used (never encoded twice)
    assert len(encoded) == len(set(encoded)) == 5 * n // BLOCK
    for i in range(5):
        assert_kv_equal(s.restore(range(i * 1000, i * 1000 + n), session=f"s{i}").kv, kvs[i])


def test_saves_copy_on_their_own_thread_while_the_writer_works(open_store, monkeypatch):
    """A save packs its blocks across torch's intra-op threads while the SSD writer is idle, and
    on the calling thread alone while the writer holds a batch or has ops queued (their spinning
    would take cores from it); either way every session restores exactly."""
    import threading

    import tierkv.engine
    import tierkv.writer

    spec = small_spec()
    n = 2 * BLOCK + 3
    s = open_store(spec, persist="write_through")
    calls = []  # each save's serial flag
    real_pack = tierkv.engine.pack_blocks

    def recording(spec_, kv, block_tokens, payloads, serial=False):
        calls.append(serial)
        real_pack(spec_, kv, block_tokens, payloads, serial=serial)

    monkeypatch.setattr(tierkv.engine, "pack_blocks", recording)
    gate, holding, real = threading.Event(), threading.Event(), s._apply

    def held(ops):
        holding.set()
        gate.wait(10)
        real(ops)

    s._apply = held
    kvs = [make_kv(spec, n, seed=10 + i) for i in range(3)]
    s.save(range(n), kvs[0], session="s0")  # packed before its op is queued: the writer idle
    assert calls == [False]
    assert holding.wait(10)  # the writer holds s0's batch
    s.save(range(1000, 1000 + n), kvs[1], session="s1")
    s.save(range(2000, 2000 + n), kvs[2], session="s2")
    assert calls == [False, True, True]
    gate.set()
    s.flush()
    s._apply = real
    s.save(range(3000, 3000 + n), kvs[0], session="s3")  # idle again
    assert calls[-1] is False
    for i, kv in enumerate(kvs):
        assert_kv_equal(s.restore(range(i * 1000, i * 1000 + n), session=f"s{i}").kv, kv)


def test_stats_split_the_writers_time(open_store):
    spec = small_spec()
    s = open_store(spec, persist="write_through")
    assert s.stats()["ssd_writes"] == {"batches": 0, "encode_seconds": 0.0, "transaction_seconds": 0.0,
                                       "commit_seconds": 0.0, "buffers_reused": 0, "buffers_new": 0}
    n = 3 * BLOCK
    s.save(range(n), make_kv(spec, n), session="s").wait()
    w = s.stats()["ssd_writes"]
    assert w["batches"] >= 1 and w["encode_seconds"] > 0
    # LMDB's commit is a part of the transaction, which wrote every value and the session record
    assert 0 < w["commit_seconds"] <= w["transaction_seconds"]
    assert s.stats()["moved"]["host->ssd"]["seconds"] >= w["transaction_seconds"]
    assert w["buffers_reused"] == w["buffers_new"] == 0  # values of a few KiB: new bytes, as ever


def test_cache_pool_serves_restores_from_the_same_memory(open_store):
    """``tierkv.CachePool``: a restore through ``allocator`` lands, bit-exact, in the buffers
    ``reserve`` made, and the next restore in the same ones; a longer restore gets larger
    buffers, kept for the one after. Latent (token axis first) and GQA layers alike."""
    import tierkv

    latent = tierkv.LayerSpec((tierkv.TensorSpec("latent", (40,), 0, "bfloat16"),))
    gqa = tierkv.LayerSpec((tierkv.TensorSpec("key", (2, 8), 1, "float16"),
                            tierkv.TensorSpec("value", (2, 4), 1, "float16")))
    spec = tierkv.KVSpec("mixed", (latent, gqa))
    n = 2 * BLOCK + 3
    kv = make_kv(spec, 4 * BLOCK, seed=5)
    s = open_store(spec, device_bytes=0, host_bytes=0)
    s.save(range(4 * BLOCK), kv, session="a").wait()
    s.flush()
    pool = tierkv.CachePool()
    pool.reserve(spec, n)
    places = {(i, j): pool.buffer(i, j, (1, *t.shape(n)), t.torch_dtype, "cpu", 1 + t.seq_axis).data_ptr()
              for i, layer in enumerate(spec.layers) for j, t in enumerate(layer.tensors)}
    for _ in range(2):
        h = s.restore_async(range(n), session="a", allocate=pool.allocator(spec))
        r = h.result()
        assert r.num_tokens == n
        assert_kv_equal(r.kv, [tuple(x.narrow(t.seq_axis, 0, n) for x, t in zip(layer, ls.tensors))
                               for layer, ls in zip(kv, spec.layers)])
        assert {(i, j): x.data_ptr() for i, layer in enumerate(r.kv) for j, x in enumerate(layer)} == places
    r = s.restore_async(range(4 * BLOCK), session="a", allocate=pool.allocator(spec)).result()
    assert r.num_tokens == 4 * BLOCK
    assert_kv_equal(r.kv, kv)
    grown = {(i, j): x.data_ptr() for i, layer in enumerate(r.kv) for j, x in enumerate(layer)}
    assert all(grown[k] != places[k] for k in places)
    again = s.restore_async(range(n), session="a", allocate=pool.allocator(spec)).result()
    assert {(i, j): x.data_ptr() for i, layer in enumerate(again.kv) for j, x in enumerate(layer)} == grown


def test_import_tierkv_needs_no_transformers():
    """The engine, its CachePool and the CLI's defaults import without transformers (the ``hf``
    extra): a server that does not use it, and the benches' child processes, skip its import."""
    import subprocess
    import sys

    code = ("import sys, tierkv, tierkv.cli; tierkv.CachePool(); tierkv.cli.default_cache_dir(); "
            "print('transformers' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "False"
