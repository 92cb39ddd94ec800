"""CUDA paths: device tier in GPU memory, pinned host memory, side-stream copies and the events a
caller's stream waits on. Every test runs on the CPU too, so its logic is checked on every
machine: "cpu" as a CPU-only machine runs it, and "cpu-staged" with results filled the way they
are on a GPU (host staging: SSD blocks decoded into one host buffer and uploaded per layer,
memory blocks copied up whole and scattered). The "cuda" cases run where a GPU is and are skipped
elsewhere."""

import contextlib
import gc
import threading

import pytest
import torch

import tierkv
import tierkv.engine
import tierkv.reads
import tierkv.handles
import tierkv.hostmem
import tierkv.keys
from conftest import BLOCK, assert_kv_equal, make_kv, on_cpu, small_spec

def user_stream(device):
    """A stream of the caller's own (not the default one) on CUDA; nothing on the CPU."""
    return torch.cuda.stream(torch.cuda.Stream()) if device == "cuda" else contextlib.nullcontext()


def busy(device):
    """Queue a few milliseconds of GPU work on the current stream (a model's forward pass): work
    queued after it runs late, so a missing wait on it shows up as wrong bytes."""
    if device == "cuda":
        a = torch.randn(4096, 4096, device=device)
        for _ in range(8):
            a = a @ a
            a = a / a.norm()


def test_round_trip_all_tiers(open_store, device):
    spec = small_spec()
    n = 8 * BLOCK + 3
    kv = make_kv(spec, n, seed=1, device=device)
    s = open_store(spec, device=device, device_bytes=2 * BLOCK * spec.bytes_per_token,
                   host_bytes=2 * BLOCK * spec.bytes_per_token)
    assert s._tiers["host"].pin == (device == "cuda")
    s.save(range(n), kv, session="s")
    s.flush()
    tiers = {b.tier for b in s._blocks.values()}
    assert {"device", "host", None} <= tiers  # None: only on SSD
    host_blocks = [b for b in s._blocks.values() if b.tier == "host"]
    assert all(b.payload.is_pinned() == (device == "cuda") for b in host_blocks)
    assert all(b.payload.device.type == device for b in s._blocks.values() if b.tier == "device")
    r = s.restore(range(n), session="s")
    assert r.kv[0][0].device.type == device
    assert r.sources == {"device": 2, "host": 2, "ssd": 5}
    assert_kv_equal(on_cpu(r.kv), on_cpu(kv))


def test_host_tier_hit_into_strided_buffers(open_store, device, monkeypatch):
    """A hit held wholly in the host tier, restored into buffers with headroom (strided views),
    a partial block last; then the same session from SSD alone. Staged, the host blocks go up as
    one run and the SSD blocks through the host buffer."""
    spec = small_spec()
    n = 9 * BLOCK + 5
    kv = make_kv(spec, n, seed=6)
    s = open_store(spec, device=device, device_bytes=0, host_bytes=64 * BLOCK * spec.bytes_per_token)
    s.save(range(n), kv, session="s")
    s.flush()

    def allocate(layer, index, shape, dtype, dev):
        heads, tokens, dim = shape
        return torch.full((heads, tokens + 40, dim), -1.0, dtype=dtype, device=dev)[:, :tokens]

    for source in ("host", "host in pieces", "ssd"):
        if source == "host in pieces":  # staging capped at 2 blocks: the run goes up in 5 pieces
            monkeypatch.setattr(tierkv.handles, "_STAGE_BYTES", 2 * BLOCK * spec.bytes_per_token + 1)
        if source == "ssd":
            s.offload("s")
            s.flush()
        source = source.split()[0]
        h = s.restore_async(range(n), session="s", allocate=allocate)
        r = h.result()
        assert r.sources == {source: 10}
        assert_kv_equal(on_cpu(r.kv), kv)
        staged = device == "cuda" or tierkv.engine.via_host_staging(torch.device("cpu"))
        if staged and source == "host":
            assert len(h._batched) == 9  # the whole blocks, as one run; the partial one alone
        if source == "ssd":
            assert (h._shadow is not None) == staged


def test_host_pool_place_reused_while_a_restore_still_reads_it(open_store, device, monkeypatch):
    """The host tier's blocks come from the slab pool (page-locked on a GPU). A restore from the
    host tier into the device's memory queues its copies behind a caller's busy stream; the
    handle is dropped and saves push the restored blocks out of the host tier at once, so their
    places could be taken and written while those copies wait. The result must hold the old
    bytes: the places stay held until the copies have run (``hostmem.hold_until``)."""
    if device != "cuda":  # the pool's logic on plain memory: the CPU cannot page-lock
        monkeypatch.setattr(tierkv.hostmem, "can_pin", lambda: True)
        monkeypatch.setattr(tierkv.hostmem, "host_buffer", lambda n, pin: torch.empty(n, dtype=torch.uint8))
    spec = small_spec()
    n = 4 * BLOCK
    kv = make_kv(spec, n, seed=40)
    s = open_store(spec, device=device, device_bytes=0, host_bytes=4 * BLOCK * spec.bytes_per_token,
                   pin_host_memory=True, persist="write_through")
    assert s._host_pool.wait_ready(10)
    s.save(range(n), kv, session="a")
    s.flush()
    a_places = {b.payload.data_ptr() for b in s._blocks.values() if b.tier == "host"}
    assert len(a_places) == 4 and s.stats()["host_pool"]["taken"] == 4
    if device == "cuda":
        assert all(b.payload.is_pinned() for b in s._blocks.values() if b.tier == "host")
    with user_stream(device):
        busy(device)
        busy(device)
        h = s.restore_async(range(n), session="a")
        r = h.result()
        assert r.sources == {"host": 4}
        del h
        gc.collect()
        taken = set()  # places the later saves' blocks took
        for j in range(3):
            s.save(range(10_000 * (j + 1), 10_000 * (j + 1) + n), make_kv(spec, n, seed=41 + j), session=f"b{j}")
            taken |= places_of(s, f"b{j}")
            s.flush()
        got = on_cpu(r.kv)
    assert_kv_equal(got, on_cpu(kv))
    if device == "cuda":
        torch.cuda.synchronize()
        s.save(range(90_000, 90_000 + n), make_kv(spec, n, seed=49), session="c")
        taken |= places_of(s, "c")
    assert taken & a_places  # a's places were taken again (on a GPU, once its copies had run)


def places_of(s, session):
    blocks = [s._blocks.get(k) for k in s._sessions[session].keys]
    return {b.payload.data_ptr() for b in blocks if b is not None and b.tier == "host"}


def test_damaged_ssd_blocks_are_misses_on_every_path(open_store, store_path, device):
    """Staged, each layer's host buffer is made when its first SSD block is decoded: a block
    that fails its checksum mid-layer, and blocks that all fail before any decoding (so some
    layers never get a buffer), are misses that truncate the prefix, never wrong KV."""
    from conftest import flip_byte

    spec = small_spec()
    n = 4 * BLOCK
    kv = make_kv(spec, n, seed=60)
    s = open_store(spec, device=device)
    s.save(range(n), kv, session="s")
    s.close()
    keys = tierkv.keys.block_keys(tierkv.keys.chain_seed(s.fingerprint, None),
                                  tierkv.keys.as_tokens(range(n)), BLOCK, partial=False)
    flip_byte(store_path, keys[2], -5)  # the last layer's bytes: found while decoding it
    s = open_store(spec, device=device)
    r = s.restore(range(n), session="s")
    assert r.num_tokens == 2 * BLOCK and r.kv[0][0].device.type == device
    assert_kv_equal(on_cpu(r.kv), [tuple(x[:, :2 * BLOCK] for x in layer) for layer in kv])
    s.close()
    for k in keys:
        flip_byte(store_path, k, 30)  # the fingerprint: refused before any decoding
    s = open_store(spec, device=device)
    r = s.restore(range(n), session="s")
    assert r.num_tokens == 0 and s.stats()["corrupt_blocks"] == 4


def test_prefetch_promotes_and_layerwise(open_store, device):
    spec = small_spec()
    n = 6 * BLOCK
    kv = make_kv(spec, n, seed=2, device=device)
    s = open_store(spec, device=device)
    s.save(range(n), kv, session="s")
    s.offload("s")
    h = s.prefetch(range(n), session="s")
    for i in range(spec.num_layers):
        got = h.layer(i)
        assert got[0].device.type == device
        assert_kv_equal(on_cpu([got]), on_cpu([kv[i]]))
    h.wait()
    s.flush()
    assert s.session_info("s")["blocks_by_tier"] == {"memory:device": 6}


def test_a_prefetch_takes_no_result_memory_until_asked(open_store, device):
    """A prefetch moves blocks up a tier; its handle made result tensors the size of the whole
    prefix at once, on a GPU beside the device-tier copies the prefetch was making, held for as
    long as the caller kept the handle (a server keeps it from a request's arrival to its
    prefill). They are made only when ``layer`` or ``result`` asks, and are then exact."""
    spec = small_spec(layers=4, heads=4, dim=64)
    n = 32 * BLOCK
    kv = make_kv(spec, n, seed=3, device=device)
    s = open_store(spec, device=device, device_bytes=2 * n * spec.bytes_per_token)
    s.save(range(n), kv, session="s")
    s.offload("s")
    s.flush()
    for tier in ("from SSD", "from the host tier"):
        if tier == "from the host tier":
            s.flush()
            with s._lock:  # the blocks back down to the host tier, still in memory
                dev, host = s._tiers["device"], s._tiers["host"]
                for b in list(dev._lru.values()):
                    host.add(b, dev.remove(b).to("cpu"))
            assert s.session_info("s")["blocks_by_tier"] == {"memory:host": 32}
        if device == "cuda":
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
        h = s.prefetch(range(n), session="s")
        assert h.wait(timeout=30)
        assert s.session_info("s")["blocks_by_tier"] == {"memory:device": 32}, tier
        assert h._outs_made is None, tier
        if device == "cuda" and tier == "from SSD":  # the blocks' copies only, not a result too
            assert torch.cuda.memory_allocated() - before < 1.5 * n * spec.bytes_per_token
        assert_kv_equal(on_cpu(h.result().kv), on_cpu(kv))
        assert_kv_equal(on_cpu([h.layer(1)]), on_cpu([kv[1]]))
    r = s.restore_async(range(n), session="s")  # a restore's results are made at once, as before
    assert r._outs_made is not None
    assert_kv_equal(on_cpu(r.result().kv), on_cpu(kv))


def test_layerwise_restore_into_a_pool_on_a_busy_stream(open_store, device):
    """A loop on its own stream, with work queued, restores layer by layer into buffers of its
    own and reads each layer at once: the reads must see the restored bytes (its stream waits
    on the copies, and the copies wait for what was queued before the restore)."""
    spec = small_spec()
    n = 7 * BLOCK
    kv = make_kv(spec, n, seed=3, device=device)
    s = open_store(spec, device=device, device_bytes=2 * BLOCK * spec.bytes_per_token,
                   host_bytes=2 * BLOCK * spec.bytes_per_token)
    s.save(range(n), kv, session="s")
    s.flush()
    pool = {}

    def allocate(layer, index, shape, dtype, dev):
        heads, tokens, dim = shape
        full = pool[(layer, index)] = torch.full((heads, tokens + 32, dim), 7.0, dtype=dtype, device=dev)
        return full[:, :tokens]

    with user_stream(device):
        busy(device)
        h = s.restore_async(range(n), session="s", allocate=allocate)
        got = []
        for i in range(spec.num_layers):
            k, v = h.layer(i)
            assert k.data_ptr() == pool[(i, 0)].data_ptr()
            got.append((k.clone(), v.clone()))  # queued on this stream, right after the wait
        r = h.result()
        got_cpu = on_cpu(got)
    assert r.num_tokens == n
    assert_kv_equal(got_cpu, on_cpu(kv))
    assert all(torch.all(b[:, n:].cpu() == 7.0) for b in pool.values())  # headroom untouched


def test_save_waits_for_the_kernels_that_produce_the_kv(open_store, device):
    """KV computed on a caller's stream and saved at once: the copy must follow the kernels."""
    spec = small_spec(dtype=torch.float32)
    n = 4 * BLOCK
    s = open_store(spec, device=device, device_bytes=BLOCK * spec.bytes_per_token,
                   host_bytes=BLOCK * spec.bytes_per_token)
    with user_stream(device):
        busy(device)
        base = make_kv(spec, n, seed=4, device=device)
        kv = [tuple(torch.sin(x) * 3 + 1 for x in layer) for layer in base]  # queued, not yet run
        s.save(range(n), kv, session="s")
        expect = on_cpu(kv)
    s.flush()
    s.close()
    with tierkv.TierKV(s.path, spec, block_tokens=BLOCK, ssd_bytes="64MiB", device=device) as s2:
        r = s2.restore(range(n), session="s")
        assert_kv_equal(on_cpu(r.kv), expect)


def test_restore_to_another_device_than_saved_from(open_store, device):
    spec = small_spec()
    n = 5 * BLOCK
    kv = make_kv(spec, n, seed=5, device=device)
    s = open_store(spec, device=device, device_bytes=BLOCK * spec.bytes_per_token)
    s.save(range(n), kv, session="a")
    s.save(range(1000, 1000 + n), on_cpu(kv), session="b")
    s.flush()
    r = s.restore(range(n), session="a", device="cpu")
    assert r.kv[0][0].device.type == "cpu"
    assert_kv_equal(r.kv, on_cpu(kv))
    r = s.restore(range(1000, 1000 + n), session="b", device=device)
    assert r.kv[0][0].device.type == device
    assert_kv_equal(on_cpu(r.kv), on_cpu(kv))


def test_concurrent_restores_from_threads(open_store, device):
    """Threads restoring different sessions at once share the side stream; each result is its own."""
    spec = small_spec()
    n = 6 * BLOCK + 5
    sessions = {f"s{j}": make_kv(spec, n, seed=10 + j) for j in range(4)}
    s = open_store(spec, device=device, device_bytes=3 * BLOCK * spec.bytes_per_token,
                   host_bytes=3 * BLOCK * spec.bytes_per_token)
    for j, (name, kv) in enumerate(sessions.items()):
        s.save(range(j * 10_000, j * 10_000 + n), [tuple(x.to(device) for x in l) for l in kv], session=name)
    s.flush()
    errors = []

    def run(j, name):
        try:
            with user_stream(device):
                for _ in range(5):
                    r = s.restore(range(j * 10_000, j * 10_000 + n), session=name)
                    assert r.num_tokens == n
                    assert_kv_equal(on_cpu(r.kv), sessions[name])
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(j, name)) for j, name in enumerate(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_transformers_random_weights_restore_is_exact(tmp_path, device):
    """A transformers model on the device. Continuation from the restored cache equals
    continuation from the original cache, token for token and bit for bit; restored layer by
    layer into buffers with headroom (``restore_cache``, as a serving loop does), the KV is
    bit-exact and the continuation the same (its attention reads strided buffers, so a GPU may
    pick another kernel: logits within float rounding)."""
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tierkv.integrations.hf import cache_to_kv, greedy_decode, kv_to_cache, prefill, restore_cache, spec_for_model

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).to(device).eval()
    spec = spec_for_model(model, model_id="test/llama-random")
    ctx = [(7 * i) % 500 + 3 for i in range(300)]
    _, cache = prefill(model, ctx)
    original = [(k.clone(), v.clone()) for k, v in cache_to_kv(cache)]

    def continuation(c):
        logits, c = prefill(model, [11, 12, 13], c)
        toks, logits, _ = greedy_decode(model, logits, c, 6)
        return toks, torch.stack(logits).cpu()

    reference = continuation(kv_to_cache([(k.clone(), v.clone()) for k, v in original], model.config))
    with tierkv.TierKV(str(tmp_path / "store"), spec, block_tokens=64, device=device) as s:
        s.save(ctx, original, session="q")
    with tierkv.TierKV(str(tmp_path / "store"), spec, block_tokens=64, device=device) as s:
        with user_stream(device):
            r = s.restore(ctx, session="q")
            assert r.num_tokens == len(ctx) and r.kv[0][0].device.type == device
            assert_kv_equal(on_cpu(r.kv), on_cpu(original))
            got = continuation(kv_to_cache(r.kv, model.config))
        assert got[0] == reference[0]
        assert torch.equal(got[1], reference[1]), float((got[1] - reference[1]).abs().max())
    with tierkv.TierKV(str(tmp_path / "store"), spec, block_tokens=64, device=device) as s:
        with user_stream(device):
            restored, handle = restore_cache(s, ctx, model.config, session="q")
            assert handle.num_tokens == len(ctx)
            got = continuation(restored)
            layers = [(layer.keys[0, :, :len(ctx)], layer.values[0, :, :len(ctx)]) for layer in restored.layers]
            assert_kv_equal(on_cpu(layers), on_cpu(original))
    assert got[0] == reference[0]
    assert torch.allclose(got[1], reference[1], atol=1e-4, rtol=1e-4), float((got[1] - reference[1]).abs().max())


def test_cold_restore_bypassing_the_page_cache(open_store, store_path, device, monkeypatch):
    """ssd_page_cache="bypass" on every result path, exact: cold values are streamed with
    O_DIRECT through bounce buffers and copied out, into CPU memory the caller allocated or
    into the staging buffers that go up to the device (page-locked on CUDA); the page cache
    keeps nothing of the store."""
    import os

    from tierkv.pagecache import drop_file_cache, resident_fraction

    monkeypatch.setattr(tierkv.reads, "DIRECT_READ_BYTES", 64 << 10)
    monkeypatch.setattr(tierkv.reads, "DIRECT_MIN_BYTES", 4096)
    spec = small_spec(dtype=torch.float32, layers=6, heads=4, dim=64)  # 32 KiB a layer and block
    n = 6 * BLOCK
    kv = make_kv(spec, n, seed=11)
    settings = dict(device=device, device_bytes=0, host_bytes=0, ssd_codec="raw")
    s = open_store(spec, persist="write_through", **settings)
    s.save(range(n), on_cpu(kv) if device == "cuda" else kv, session="s")
    s.flush()
    s.close()
    data = os.path.join(store_path, "data.mdb")
    drop_file_cache(data)
    s = open_store(spec, ssd_page_cache="bypass", **settings)
    before = resident_fraction(data)

    def allocate(layer, index, shape, dtype, dev):
        return tierkv.hostmem.aligned_empty(tuple(shape), dtype) if dev.type == "cpu" else torch.empty(
            shape, dtype=dtype, device=dev)

    with user_stream(device):
        busy(device)
        r = s.restore_async(range(n), session="s", device=device, allocate=allocate).result()
        got = on_cpu(r.kv)
    assert_kv_equal(got, on_cpu(kv))
    direct = s.stats()["ssd_direct_read_bytes"]
    if s._ssd.values is not None and s._ssd.values.direct_fd() >= 0:
        assert direct > 0.8 * n * spec.bytes_per_token
    s.close()
    assert resident_fraction(data) - before < 0.1
