"""Shared helpers: small specs, deterministic KV, stores in temporary directories."""

from __future__ import annotations

import lmdb
import pytest
import torch

import tierkv

BLOCK = 16


def small_spec(dtype=torch.bfloat16, layers=4, heads=2, dim=8, model_id="test/tiny") -> tierkv.KVSpec:
    return tierkv.KVSpec.gqa(model_id, layers, heads, dim, dtype)


def make_kv(spec: tierkv.KVSpec, n_tokens: int, seed: int = 0, device="cpu"):
    """Deterministic KV with every bit pattern class of real KV (normal values, some extremes)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for layer in spec.layers:
        tensors = []
        for t in layer.tensors:
            x = torch.randn(t.shape(n_tokens), generator=g, dtype=torch.float32) * 3
            tensors.append(x.to(t.torch_dtype).to(device))
        out.append(tuple(tensors))
    return out


def kv_slice(kv, n):
    return [tuple(x.narrow(1, 0, n) for x in layer) for layer in kv]


def flip_byte(path, key, index, bit=0x40):
    """Flip one bit of byte ``index`` (negative: from the end) of the stored value of ``key`` in
    the store at ``path``: a block that must fail its checksum."""
    env = lmdb.open(str(path), subdir=True, max_dbs=8, map_size=1 << 34)  # room to rewrite a value of any store
    db = env.open_db(b"blocks")
    with env.begin(write=True) as txn:
        val = bytearray(txn.get(key, db=db))
        val[index] ^= bit
        txn.put(key, bytes(val), db=db)
    env.close()


def assert_kv_equal(a, b):
    assert len(a) == len(b)
    for la, lb in zip(a, b):
        for x, y in zip(la, lb):
            assert x.shape == y.shape and x.dtype == y.dtype
            # bit-exact: compare the raw bytes, so -0.0/0.0 and NaN payloads count too
            assert torch.equal(x.contiguous().view(torch.uint8) if x.dtype.itemsize == 1 else
                               x.contiguous().view(torch.int16 if x.dtype.itemsize == 2 else torch.int32),
                               y.contiguous().view(torch.uint8) if y.dtype.itemsize == 1 else
                               y.contiguous().view(torch.int16 if y.dtype.itemsize == 2 else torch.int32))


@pytest.fixture(autouse=True)
def cpu_machine_unless_marked(request, monkeypatch):
    """The suite tests the CPU configuration on every machine. With a GPU present the engine
    would default to it (device tier in GPU memory, host tier pinned), which tests/test_cuda.py
    covers; tests marked ``cuda`` or ``real_devices`` see the machine as it is."""
    if request.node.get_closest_marker("cuda") is None and request.node.get_closest_marker("real_devices") is None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


DEVICES = ["cpu", "cpu-staged", pytest.param("cuda", marks=[
    pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")])]


@pytest.fixture(params=DEVICES)
def device(request, monkeypatch):
    """Where a restore's results go: "cpu"; "cpu-staged", filled the way they are on a GPU (host
    staging: SSD blocks decoded into one host buffer and uploaded per layer, memory blocks copied
    up whole and scattered); "cuda" where a GPU is (skipped elsewhere)."""
    if request.param == "cpu-staged":
        import tierkv.engine
        monkeypatch.setattr(tierkv.engine, "via_host_staging", lambda device: True)
        return "cpu"
    return request.param


def on_cpu(kv):
    return [tuple(x.cpu() for x in layer) for layer in kv]


@pytest.fixture
def store_path(tmp_path):
    return str(tmp_path / "store")


@pytest.fixture
def open_store(store_path):
    opened = []

    def _open(spec=None, path=None, **settings):
        settings.setdefault("block_tokens", BLOCK)
        settings.setdefault("ssd_bytes", "64MiB")
        s = tierkv.TierKV(path or store_path, spec or small_spec(), **settings)
        opened.append(s)
        return s

    yield _open
    for s in opened:
        s.close()
