"""Bad input gets a clear TierKVError and leaves the store unchanged."""

import os

import numpy as np
import pytest
import torch

import tierkv
from conftest import BLOCK, assert_kv_equal, make_kv, small_spec

SPEC = small_spec()


@pytest.fixture
def filled(open_store):
    s = open_store(SPEC)
    kv = make_kv(SPEC, 2 * BLOCK)
    s.save(range(2 * BLOCK), kv, session="ok").wait()
    return s, kv


def unchanged(s, kv):
    assert_kv_equal(s.restore(range(2 * BLOCK), session="ok").kv, kv)


@pytest.mark.parametrize("bad,match", [
    (lambda kv: kv[:-1], "layers"),
    (lambda kv: [(k.float(), v) for k, v in kv], "dtype"),
    (lambda kv: [(k[:, :-1], v) for k, v in kv], "shape"),
    (lambda kv: [(k.unsqueeze(0), v) for k, v in kv], "no batch axis"),
    (lambda kv: [(k,) for k, v in kv], "tuple of 2"),
    (lambda kv: [(k.float().numpy(), v) for k, v in kv], "torch.Tensor"),
    (lambda kv: None, "one entry per layer"),
    (lambda kv: (layer for layer in kv), "one entry per layer"),
    (lambda kv: kv[0][0], "one entry per layer"),
    (lambda kv: [None] * len(kv), "tuple of 2"),
    (lambda kv: [(k.float().to_sparse().to(k.dtype), v) for k, v in kv], "dense tensor"),
])
def test_wrong_kv_is_refused(filled, bad, match):
    s, kv = filled
    with pytest.raises(tierkv.SpecMismatchError, match=match):
        s.save(range(2 * BLOCK), bad(make_kv(SPEC, 2 * BLOCK, seed=3)), session="ok")
    unchanged(s, kv)


def _allocating(make):
    """An ``allocate`` whose tensor for layer 1, tensor 0 is ``make(shape, dtype)``; right elsewhere."""
    def allocate(layer, index, shape, dtype, device):
        if (layer, index) == (1, 0):
            return make(shape, dtype)
        return torch.empty(shape, dtype=dtype, device=device)
    return allocate


def test_allocate_that_is_not_callable_is_refused(filled):
    s, kv = filled
    with pytest.raises(tierkv.ConfigError, match="allocate must be a callable"):
        s.restore_async(range(2 * BLOCK), session="ok", allocate=torch.empty(4))
    unchanged(s, kv)


@pytest.mark.parametrize("make,match", [
    (lambda shape, dtype: torch.empty(shape, dtype=torch.float32), "dtype torch.float32"),
    (lambda shape, dtype: torch.empty((shape[0], shape[1] + 5, shape[2]), dtype=dtype), "shape"),
    (lambda shape, dtype: torch.empty((shape[0], shape[1] - 1, shape[2]), dtype=dtype), "shape"),
    (lambda shape, dtype: [[0.0]], "returned list, not a torch.Tensor"),
    (lambda shape, dtype: torch.empty(shape[::-1], dtype=dtype).permute(2, 1, 0), "last axis is not contiguous"),
    (lambda shape, dtype: torch.empty(shape, dtype=dtype, device="meta"), "on meta"),
])
def test_wrong_allocate_is_refused_and_the_store_keeps_working(filled, make, match):
    """A caller's ``allocate`` that hands back a wrong tensor gets a ConfigError from
    ``restore_async`` before any read starts; the store stays usable and counts no hit. (Before,
    the wrong tensor failed inside an I/O thread, the caller got an IndexError, and the store
    refused every later call with BackgroundError.)"""
    s, kv = filled
    s.flush()
    s.offload("ok")   # on SSD only: the restore would decode straight into the allocated tensors
    hits = s.stats()["hit_tokens"]
    with pytest.raises(tierkv.ConfigError, match=match):
        s.restore_async(range(2 * BLOCK), session="ok", allocate=_allocating(make))
    assert s.stats()["hit_tokens"] == hits
    unchanged(s, kv)
    s.flush()


@pytest.mark.parametrize("tokens,match", [
    ([], "zero tokens"),
    ([[1, 2]], "1-D"),
    ([1.5] * 32, "integers"),
    ([-1] * 32, "range"),
    ([2**33] * 32, "range"),
    ("some text", "1-D sequence of ints"),
    (None, "1-D sequence of ints"),
    ((i for i in range(32)), "1-D sequence of ints"),
    (torch.arange(32, device="meta"), "cannot read this tensor"),
    (torch.arange(32).to_sparse(), "cannot read this tensor"),
])
def test_bad_tokens(filled, tokens, match):
    s, kv = filled
    with pytest.raises(tierkv.SpecMismatchError, match=match):
        s.save(tokens, kv, session="ok")
    unchanged(s, kv)


def test_bad_tokens_in_lookups_and_loads(filled):
    s, kv = filled
    for call in (s.lookup, s.restore, s.prefetch):
        for tokens in ("some text", torch.arange(32, device="meta"), torch.arange(32).to_sparse()):
            with pytest.raises(tierkv.SpecMismatchError):
                call(tokens, session="ok")
    unchanged(s, kv)


def test_a_tenant_any_str_can_hold(open_store):
    """A tenant with a lone surrogate (a file name decoded with surrogateescape, say) keys its
    blocks as session ids with one do: before, its encoding raised UnicodeEncodeError."""
    s = open_store(SPEC)
    kv = make_kv(SPEC, 2 * BLOCK)
    s.save(range(2 * BLOCK), kv, session="t", tenant="t\udcff").wait()
    assert s.lookup(range(2 * BLOCK), tenant="t\udcff") == 2 * BLOCK
    assert s.lookup(range(2 * BLOCK), tenant="t\udcfe") == 0  # another tenant shares nothing
    assert_kv_equal(s.restore(range(2 * BLOCK), session="t", tenant="t\udcff").kv, kv)


@pytest.mark.parametrize("timeout", ["1", True, float("nan"), [1]])
def test_bad_timeouts(filled, timeout):
    s, kv = filled
    with pytest.raises(tierkv.ConfigError, match="timeout"):
        s.flush(timeout=timeout)
    with pytest.raises(tierkv.ConfigError, match="timeout"):
        s.save(range(2 * BLOCK), kv, session="ok").wait(timeout=timeout)
    with pytest.raises(tierkv.ConfigError, match="timeout"):
        s.restore_async(range(2 * BLOCK), session="ok").wait(timeout=timeout)
    for fine in (30, float("inf"), 1e300):  # the last two raised OverflowError in the thread wait
        assert s.restore_async(range(2 * BLOCK), session="ok").wait(timeout=fine)
        assert s.save(range(2 * BLOCK), kv, session="ok").wait(timeout=fine)
        s.flush(timeout=fine)
    unchanged(s, kv)


@pytest.mark.parametrize("device,match", [
    ("meta", "CPU or a CUDA GPU"), (torch.device("meta"), "CPU or a CUDA GPU"), ([], "not a torch device"),
    (object(), "not a torch device"),
] + ([] if torch.cuda.is_available() else [("cuda", "CUDA is not available")]))
def test_bad_devices(filled, store_path, device, match):
    """A restore or prefetch to a device KV cannot live on is refused; before, ``"meta"`` gave
    tensors with no data, and ``"cuda"`` without CUDA an AssertionError from torch."""
    s, kv = filled
    for call in (s.restore, s.prefetch, s.restore_async):
        with pytest.raises(tierkv.ConfigError, match=match):
            call(range(2 * BLOCK), session="ok", device=device)
    with pytest.raises(tierkv.ConfigError, match=match):
        tierkv.TierKV(store_path + "-other", SPEC, device=device)
    with pytest.raises(tierkv.ConfigError, match=match):
        tierkv.CachePool().reserve(SPEC, BLOCK, device=device)
    unchanged(s, kv)


def test_bad_layer_index(filled):
    s, kv = filled
    h = s.restore_async(range(2 * BLOCK), session="ok")
    for i in (-1, SPEC.num_layers, "1", 1.0, True):
        with pytest.raises(tierkv.ConfigError, match="layer"):
            h.layer(i)
    assert_kv_equal([h.layer(i) for i in range(SPEC.num_layers)], kv)


def test_bad_cache_pool_arguments():
    pool = tierkv.CachePool()
    for tokens in (0, -5, "5", 2.0, True):
        with pytest.raises(tierkv.ConfigError, match="tokens"):
            pool.reserve(SPEC, tokens)
    for spec in ("x", None):
        with pytest.raises(tierkv.ConfigError, match="KVSpec"):
            pool.reserve(spec, BLOCK)
        with pytest.raises(tierkv.ConfigError, match="KVSpec"):
            pool.allocator(spec)


@pytest.mark.parametrize("make,match", [
    (lambda: tierkv.KVSpec.gqa("m", 2, 2, 8.5), "tuple of ints"),  # int() would make it 8
    (lambda: tierkv.KVSpec.gqa("m", 2, True, 8), "tuple of ints"),
    (lambda: tierkv.KVSpec.gqa("m", 2.0, 2, 8), "num_layers"),
    (lambda: tierkv.KVSpec.gqa("m", 0, 2, 8), "num_layers"),
    (lambda: tierkv.KVSpec.mla("m", 2, 512.0, 64), "ints"),
    (lambda: tierkv.TensorSpec("k", 8, 0, "bfloat16"), "tuple of ints"),
    (lambda: tierkv.TensorSpec("k", (2, 8), 1.0, "bfloat16"), "seq_axis"),
    (lambda: tierkv.LayerSpec(("key",)), "TensorSpec"),
    (lambda: tierkv.KVSpec("m", ("layer",)), "LayerSpec"),
    (lambda: tierkv.KVSpec("m", SPEC.layers, revision=3), "revision"),
    # a tensor starting off its element size in a block could not be viewed in place: before
    # session 54 torch refused it (RuntimeError) at a save of some token counts (15, not 16, here)
    (lambda: tierkv.KVSpec("m", (tierkv.LayerSpec((tierkv.TensorSpec("a", (3,), 0, "bfloat16"),
                                                   tierkv.TensorSpec("b", (2,), 0, "float32"))),)), "byte 6 per token"),
    (lambda: tierkv.KVSpec("m", (tierkv.LayerSpec((tierkv.TensorSpec("a", (3,), 0, "bfloat16"),)),
                                 tierkv.LayerSpec((tierkv.TensorSpec("b", (2,), 0, "float32"),)))), "layer 1"),
    (lambda: tierkv.KVSpec("m", (tierkv.LayerSpec((tierkv.TensorSpec("a", (1,), 0, "bfloat16"),)),
                                 tierkv.LayerSpec((tierkv.TensorSpec("c", (1,), 0, "bfloat16"),
                                                   tierkv.TensorSpec("d", (2,), 0, "float32"))))), "2 into its layer"),
])
def test_bad_specs(make, match):
    with pytest.raises(tierkv.ConfigError, match=match):
        make()


def test_spec_takes_numpy_ints():
    spec = tierkv.KVSpec.gqa("m", np.int64(2), np.int64(2), np.int32(8))
    assert spec == tierkv.KVSpec.gqa("m", 2, 2, 8)
    assert spec.fingerprint() == tierkv.KVSpec.gqa("m", 2, 2, 8).fingerprint()


@pytest.mark.parametrize("path", [b"/tmp/store", 5, None])
def test_bad_store_paths(path):
    with pytest.raises(tierkv.ConfigError, match="store path"):
        tierkv.TierKV(path, SPEC)


def test_token_kv_length_mismatch(filled):
    s, kv = filled
    with pytest.raises(tierkv.SpecMismatchError, match="shape"):
        s.save(range(2 * BLOCK + 1), kv, session="ok")
    unchanged(s, kv)


@pytest.mark.parametrize("sid", ["", "x" * 401, "a\x00b", 7])
def test_bad_session_ids(filled, sid):
    s, kv = filled
    with pytest.raises(tierkv.ConfigError, match="session id"):
        s.save(range(2 * BLOCK), kv, session=sid)
    unchanged(s, kv)


@pytest.mark.parametrize("kw,match", [
    (dict(ttl=0), "ttl"), (dict(ttl=float("inf")), "ttl"), (dict(ttl="60"), "ttl"), (dict(ttl=True), "ttl"),
    (dict(pinned="no"), "pinned"), (dict(pinned=1), "pinned"),
])
def test_bad_save_options(filled, kw, match):
    s, kv = filled
    with pytest.raises(tierkv.ConfigError, match=match):
        s.save(range(2 * BLOCK), make_kv(SPEC, 2 * BLOCK, seed=3), session="ok", **kw)
    assert not s.session_info("ok")["pinned"]
    unchanged(s, kv)


def test_odd_but_valid_session_ids(open_store):
    s = open_store(SPEC)
    kv = make_kv(SPEC, BLOCK)
    for sid in ["ünïcødé/🙂", "x" * 400, " spaces ", "../../etc/passwd"]:
        s.save(range(BLOCK), kv, session=sid)
        assert s.session_info(sid)["tokens"] == BLOCK


def test_unknown_session(filled):
    s, _ = filled
    with pytest.raises(tierkv.UnknownSessionError, match="nope"):
        s.drop_session("nope")
    with pytest.raises(KeyError):  # also a KeyError, for callers that catch that
        s.session_info("nope")
    assert s.lookup(range(2 * BLOCK), session="nope") == 2 * BLOCK  # falls back to content


@pytest.mark.parametrize("settings,match", [
    (dict(block_tokens=8), "block_tokens"),
    (dict(block_tokens=5000), "block_tokens"),
    (dict(device_bytes="lots"), "device_bytes"),
    (dict(host_bytes=-1), "host_bytes"),
    (dict(ssd_bytes=0), "ssd_bytes"),
    (dict(persist="sometimes"), "persist"),
    (dict(ssd_codec="lzma"), "ssd_codec"),
    (dict(io_affinity="pinned"), "io_affinity"),
    (dict(io_threads=0), "io_threads"),
    (dict(colour="blue"), "unknown setting"),
    (dict(device="tpu:0"), "device"),
    (dict(device=""), "device"),
    (dict(io_threads=True), "io_threads"),
    (dict(zstd_level=True), "zstd_level"),
    (dict(pin_host_memory="yes"), "pin_host_memory"),
    (dict(pin_host_memory=1), "pin_host_memory"),
])
def test_bad_settings(store_path, settings, match):
    with pytest.raises(tierkv.ConfigError, match=match):
        tierkv.TierKV(store_path, SPEC, **settings)


def test_cuda_device_without_cuda(store_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(tierkv.ConfigError, match="CUDA"):
        tierkv.TierKV(store_path, SPEC, device="cuda")


def test_foreign_store_refused(open_store, store_path):
    s = open_store(SPEC)
    s.save(range(BLOCK), make_kv(SPEC, BLOCK), session="s")
    s.close()
    for spec, settings in [(small_spec(model_id="another"), {}), (small_spec(torch.float16), {}),
                           (SPEC, {"block_tokens": 32}), (SPEC, {"ssd_codec": "raw"})]:
        with pytest.raises(tierkv.ForeignStoreError, match="another model or layout"):
            tierkv.TierKV(store_path, spec, **{"block_tokens": BLOCK, **settings})
    s = open_store(SPEC)
    assert s.lookup(range(BLOCK), session="s") == BLOCK


def test_other_format_version_refused(open_store, store_path):
    import struct

    import lmdb

    open_store(SPEC).close()
    env = lmdb.open(store_path, subdir=True, max_dbs=8)
    meta = env.open_db(b"meta")  # before the write txn: open_db inside one would deadlock
    with env.begin(write=True) as txn:
        txn.put(b"format", struct.pack("<I", 99), db=meta)
    env.close()
    with pytest.raises(tierkv.ForeignStoreError, match="format 99"):
        tierkv.TierKV(store_path, SPEC, block_tokens=BLOCK)


def test_path_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(tierkv.ConfigError, match="is a file"):
        tierkv.TierKV(str(f), SPEC)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_directory(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o500)
    with pytest.raises(tierkv.StoreIOError, match="writable"):
        tierkv.TierKV(str(d / "store"), SPEC)


def test_same_path_twice_in_one_process(open_store, store_path):
    open_store(SPEC)
    with pytest.raises(tierkv.ConfigError, match="already open"):
        tierkv.TierKV(store_path, SPEC, block_tokens=BLOCK)


def test_closed_store(open_store):
    s = open_store(SPEC)
    s.close()
    s.close()  # idempotent
    for call in (lambda: s.lookup([1]), lambda: s.restore([1]), lambda: s.stats(),
                 lambda: s.save(range(BLOCK), make_kv(SPEC, BLOCK)), s.__enter__):
        with pytest.raises(tierkv.StoreClosedError):
            call()


def test_store_files_are_owner_only(open_store, store_path):
    open_store(SPEC).close()
    assert os.stat(store_path).st_mode & 0o077 == 0
    assert os.stat(os.path.join(store_path, "data.mdb")).st_mode & 0o077 == 0


def test_errors_form_one_tree():
    for name in tierkv.__all__:
        obj = getattr(tierkv, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, tierkv.TierKVError)
