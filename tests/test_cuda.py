"""CUDA paths: device tier in GPU memory, pinned host memory, side-stream copies (GPU only)."""

import pytest
import torch

import tierkv
from conftest import BLOCK, assert_kv_equal, make_kv, small_spec

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_cuda_round_trip_all_tiers(open_store):
    spec = small_spec()
    n = 8 * BLOCK + 3
    kv = make_kv(spec, n, seed=1, device="cuda")
    s = open_store(spec, device="cuda", device_bytes=2 * BLOCK * spec.bytes_per_token,
                   host_bytes=2 * BLOCK * spec.bytes_per_token)
    assert s._tiers["host"].pin
    s.save(range(n), kv, session="s")
    s.flush()
    host_blocks = [b for b in s._blocks.values() if b.tier == "host"]
    assert host_blocks and all(b.payload.is_pinned() for b in host_blocks)
    assert all(b.payload.is_cuda for b in s._blocks.values() if b.tier == "device")
    r = s.restore(range(n), session="s")
    assert r.kv[0][0].is_cuda
    assert_kv_equal([tuple(x.cpu() for x in l) for l in r.kv], [tuple(x.cpu() for x in l) for l in kv])


def test_cuda_prefetch_promotes_to_gpu_and_layerwise(open_store):
    spec = small_spec()
    n = 6 * BLOCK
    kv = make_kv(spec, n, seed=2, device="cuda")
    s = open_store(spec, device="cuda")
    s.save(range(n), kv, session="s")
    s.offload("s")
    h = s.prefetch(range(n), session="s")
    for i in range(spec.num_layers):
        got = h.layer(i)
        assert got[0].is_cuda
        assert_kv_equal([tuple(x.cpu() for x in got)], [tuple(x.cpu() for x in kv[i])])
    h.wait()
    s.flush()
    assert s.session_info("s")["blocks_by_tier"] == {"memory:device": 6}
