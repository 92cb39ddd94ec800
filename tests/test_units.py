"""Units: sizes, specs, keys and the codec (property tests with hypothesis)."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tierkv
from tierkv.codec import CorruptValueError, RawCodec, ZstdPlanesCodec, decode_layer, encode_block, parse_block
from tierkv.errors import SpecMismatchError
from tierkv.keys import as_tokens, block_keys, chain_seed
from conftest import small_spec


@pytest.mark.parametrize("text,expected", [
    ("0", 0), (512, 512), ("8GiB", 8 * 2**30), ("1.5 GB", 1_500_000_000), ("64mib", 64 * 2**20),
    ("2TiB", 2 * 2**40), ("100KB", 100_000), ("1PiB", 2**50), (np.int64(4096), 4096),
])
def test_parse_size(text, expected):
    assert tierkv.parse_size(text) == expected


@pytest.mark.parametrize("bad", ["-1GiB", "GiB", "1 XB", True, 1.5, -3])
def test_parse_size_rejects(bad):
    with pytest.raises(tierkv.ConfigError):
        tierkv.parse_size(bad)


def test_spec_from_hf_config_gqa_and_mla():
    class Llama:
        _name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
        num_hidden_layers, num_attention_heads, num_key_value_heads, hidden_size = 30, 9, 3, 576

    spec = tierkv.KVSpec.from_hf_config(Llama(), dtype=torch.bfloat16)
    assert spec.num_layers == 30 and spec.bytes_per_token == 23_040  # 30*2*3*64*2
    assert tierkv.KVSpec.from_hf_config(Llama(), dtype=torch.float32).bytes_per_token == 46_080

    class DeepSeek:
        model_type = "deepseek_v3"
        num_hidden_layers, kv_lora_rank, qk_rope_head_dim = 61, 512, 64

    mla = tierkv.KVSpec.from_hf_config(DeepSeek())
    assert mla.layers[0].tensors[0].shape(7) == (7, 576)
    assert mla.bytes_per_token == 61 * 576 * 2

    class Broken:
        model_type = "x"

    with pytest.raises(tierkv.ConfigError, match="attention field"):
        tierkv.KVSpec.from_hf_config(Broken())


def test_fingerprint_is_stable_and_sensitive():
    a = small_spec()
    assert a.fingerprint() == small_spec().fingerprint()
    assert a.fingerprint() != small_spec(torch.float16).fingerprint()
    assert a.fingerprint(block_tokens=16) != a.fingerprint(block_tokens=32)
    # a pinned value: the fingerprint must not change between releases of the same format
    assert a.fingerprint(block_tokens=16, codec="zstd-planes", device_codec="raw").hex() == \
        a.fingerprint(codec="zstd-planes", device_codec="raw", block_tokens=16).hex()


@given(st.lists(st.integers(0, 2**32 - 1), min_size=0, max_size=200), st.integers(1, 199))
def test_block_keys_chain_property(tokens, cut):
    seed = chain_seed(b"f" * 16, None)
    full = block_keys(seed, as_tokens(tokens), 16, partial=False)
    prefix = block_keys(seed, as_tokens(tokens[:cut]), 16, partial=False)
    assert full[:len(prefix)] == prefix  # a prefix's keys are the prefix of the keys
    if len(tokens) >= 16:
        other = list(tokens)
        other[0] = (other[0] + 1) % 2**32
        assert block_keys(seed, as_tokens(other), 16, partial=False)[0] != full[0]


def test_partial_key_differs_from_full_and_tenants_differ():
    t = as_tokens(range(32))
    s = chain_seed(b"f" * 16, None)
    assert block_keys(s, t[:16], 16) != block_keys(s, t[:15], 16)
    assert block_keys(chain_seed(b"f" * 16, "a"), t, 16) != block_keys(s, t, 16)
    assert as_tokens(torch.arange(5)).tolist() == as_tokens(np.arange(5, dtype=np.int64)).tolist()


@settings(max_examples=80, deadline=None)
@given(st.sampled_from(["bfloat16", "float16", "float32", "uint8"]), st.integers(1, 40),
       st.sampled_from(["zstd", "planes", "raw"]), st.binary(min_size=0, max_size=64),
       st.sampled_from([None, (64, 16), (32, 0), (4096, 16)]), st.booleans())
def test_codec_round_trip(dtype, n_tokens, codec_name, noise, align, zero_layer):
    """Every layer mode decodes back to the payload: stored (random bytes do not compress), byte
    planes kept whatever their ratio ("planes": joined as byte pairs for 2-byte elements, byte
    by byte otherwise), and the raw codec; with ``align`` (page, shift), every stored layer of a
    value large enough starts on a page once shifted, also after a compressed layer (a layer of
    zeros compresses)."""
    spec = tierkv.KVSpec("m", (tierkv.LayerSpec((tierkv.TensorSpec("k", (3,), 0, dtype),
                                                 tierkv.TensorSpec("v", (2, 5), 1, dtype))),) * 2)
    rng = np.random.default_rng(len(noise))
    payload = rng.integers(0, 256, n_tokens * spec.bytes_per_token, dtype=np.uint8)
    payload[: len(noise)] = np.frombuffer(noise, np.uint8)[: payload.size]
    if zero_layer:
        payload[slice(*spec.layer_span(0, n_tokens))] = 0
    codecs = {"zstd": ZstdPlanesCodec, "planes": lambda: ZstdPlanesCodec(min_ratio=0.0), "raw": RawCodec}
    codec = codecs[codec_name]()
    value = encode_block(codec, b"F" * 16, spec, payload, n_tokens, align=align)
    asked = []  # into a buffer given (the writer's reused ones): the same bytes, in it

    def into(n):
        asked.append(n)
        return memoryview(bytearray(b"\xee" * (n + 7)))[:n]  # a used buffer, larger than asked
    given = encode_block(codecs[codec_name](), b"F" * 16, spec, payload, n_tokens, align=align, into=into)
    assert isinstance(given, memoryview) and asked == [len(value)] and bytes(given) == value
    assert encode_block(codecs[codec_name](), b"F" * 16, spec, payload, n_tokens, align=align, into=lambda n: None) == value
    parsed = parse_block(value, b"F" * 16, spec, codec, 64)
    if align is not None and payload.size >= 16 * align[0]:
        page, shift = align
        assert value[7] & 1  # the ALIGNED flag
        stored = [planes[0][0] for _, mode, planes in parsed.layers if mode == 1]
        assert all((off + shift) % page == 0 for off in stored)
    elif align is not None:
        assert value == encode_block(codec, b"F" * 16, spec, payload, n_tokens)  # too small: not padded
    if codec_name == "planes":
        assert all(k == np.dtype(dtype.replace("bfloat16", "float16")).itemsize for k, _, _ in parsed.layers)
    out = np.zeros_like(payload)
    for layer in range(spec.num_layers):
        a, b = spec.layer_span(layer, n_tokens)
        decode_layer(codec, parsed, layer, out[a:b])
    assert np.array_equal(out, payload)


def test_planes_that_did_not_pay_are_not_compressed_again_for_a_while():
    """A layer whose planes fail ``min_ratio`` is stored without compressing them again for the
    next 1, 3, 7, then 15 blocks; a layer whose planes pay is compressed in every block; and
    every value decodes to its payload whichever way each layer went."""
    spec = small_spec(dtype=torch.float32, layers=2)
    n = 16
    rng = np.random.default_rng(3)
    codec = ZstdPlanesCodec()
    tried = []  # (block, plane size) per plane compressed
    real = codec.encode_plane
    block = 0

    def counting(plane):
        tried.append((block, plane.size))
        return real(plane)

    codec.encode_plane = counting
    noisy = slice(*spec.layer_span(1, n))
    for block in range(40):
        payload = rng.integers(0, 256, n * spec.bytes_per_token, dtype=np.uint8)
        payload[slice(*spec.layer_span(0, n))] = block % 3  # layer 0 compresses, layer 1 is noise
        value = encode_block(codec, b"F" * 16, spec, payload, n)
        parsed = parse_block(value, b"F" * 16, spec, codec, 64)
        assert [mode for _, mode, _ in parsed.layers] == [0, 1]
        out = np.zeros_like(payload)
        for layer in range(2):
            decode_layer(codec, parsed, layer, out[slice(*spec.layer_span(layer, n))])
        assert np.array_equal(out, payload)
    per_layer = (noisy.stop - noisy.start) // 4  # 4 planes of fp32, each this size in both layers
    blocks = sorted({b for b, size in tried})
    assert blocks == list(range(40))  # layer 0: every block
    assert len(tried) == 4 * 40 + 4 * 5 and all(size == per_layer for _, size in tried)
    noisy_tries = sorted(b for b, _ in tried if sum(1 for c, _ in tried if c == b) == 8)
    assert sorted(set(noisy_tries)) == [0, 2, 6, 14, 30]  # skips of 1, 3, 7, 15, 15 blocks


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.integers(0, 2**16))
def test_decoder_fuzz_any_bytes_are_a_clean_miss(junk, where):
    """Arbitrary bytes, and valid values with bytes changed, never escape as anything but a miss."""
    spec = small_spec(layers=2)
    codec = ZstdPlanesCodec()
    payload = np.arange(5 * spec.bytes_per_token, dtype=np.uint8) % 7
    payload[slice(*spec.layer_span(1, 5))] = np.random.default_rng(0).integers(0, 256, spec.layer_span(1, 5)[1]
                                                                               - spec.layer_span(1, 5)[0])
    goods = [encode_block(codec, b"F" * 16, spec, payload, 5),
             encode_block(codec, b"F" * 16, spec, payload, 5, align=(32, 16))]  # a gap, then a stored layer
    assert goods[1][7] & 1 and len(goods[1]) > len(goods[0])
    candidates = [junk]
    for good in goods:
        candidates += [good[:where % len(good)], good[:where % len(good)] + junk,
                       bytes(x ^ (0xFF if i == where % len(good) else 0) for i, x in enumerate(good))]
    for value in candidates:
        out = np.zeros_like(payload)
        try:
            parsed = parse_block(value, b"F" * 16, spec, codec, 16)
            for layer in range(spec.num_layers):
                a, b = spec.layer_span(layer, parsed.n_tokens)
                decode_layer(codec, parsed, layer, out[a:b])
        except CorruptValueError:
            continue
        # a value that decodes gives the KV it was made from: the untouched values, or one
        # changed only in its padding (zero bytes no plane and no checksum covers)
        assert parsed.n_tokens == 5 and np.array_equal(out, payload)


def test_zstd_values_decode_whichever_match_finder_wrote_them():
    """The match-finder setting is the encoder's alone: values written with zstd's own level-1
    parameters (the default before long_matches_only) and with the default decode the same."""
    from conftest import make_kv
    from tierkv.blocks import pack_block

    spec = small_spec(layers=3, heads=2, dim=64)
    n = 64
    payload = torch.empty(n * spec.bytes_per_token, dtype=torch.uint8)
    pack_block(spec, make_kv(spec, n), 0, n, payload)
    payload = payload.numpy()
    old, new = ZstdPlanesCodec(min_ratio=1.0, long_matches_only=False), ZstdPlanesCodec(min_ratio=1.0)
    for writer, reader in [(old, new), (new, old), (new, new)]:
        value = encode_block(writer, b"F" * 16, spec, payload, n)
        parsed = parse_block(value, b"F" * 16, spec, reader, 64)
        assert all(mode == 0 for _, mode, _ in parsed.layers)  # split into planes, zstd frames
        out = np.zeros_like(payload)
        for layer in range(spec.num_layers):
            a, b = spec.layer_span(layer, n)
            decode_layer(reader, parsed, layer, out[a:b])
        assert np.array_equal(out, payload)


def test_config_knows_exactly_the_codecs_codec_py_implements():
    from tierkv.codec import CODECS
    from tierkv.config import SSD_CODECS

    assert set(SSD_CODECS) == set(CODECS)


def test_tokens_view_matches_as_tokens_and_checks_range():
    import torch

    from tierkv.keys import as_tokens, tokens_view

    for t in (torch.tensor([0, 5, 2**31 + 7, 2**32 - 1]), torch.randint(0, 50_000, (70_000,)),
              torch.tensor([3, 1, 2], dtype=torch.int32)):
        assert np.array_equal(tokens_view(t), as_tokens(t))
    first = tokens_view(torch.tensor([1, 2, 3]))
    assert list(first) == [1, 2, 3]
    for bad in (torch.tensor([-1, 3]), torch.tensor([2**32]), torch.tensor([5, -(2**40)])):
        with pytest.raises(SpecMismatchError):
            tokens_view(bad)
    assert list(tokens_view([4, 5])) == [4, 5]  # other inputs go through as_tokens


@given(st.integers(0, 300_000), st.integers(0, 300_000), st.integers(0, 300_000))
@settings(max_examples=60, deadline=None)
def test_common_prefix(n_a, n_b, cut):
    from tierkv.keys import common_prefix

    a = np.arange(n_a, dtype=np.uint32)
    b = np.arange(n_b, dtype=np.uint32)
    if cut < min(n_a, n_b):
        b[cut] += 1
        expect = cut
    else:
        expect = min(n_a, n_b)
    assert common_prefix(a, b) == expect


@settings(max_examples=80, deadline=None)
@given(st.sampled_from(["bfloat16", "float16", "float32", "uint8"]), st.integers(1, 24), st.integers(0, 24),
       st.integers(0, 5), st.sampled_from(["planes", "stored", "raw"]), st.booleans(), st.booleans())
def test_decode_into_result_views_matches_the_payload(dtype, n_tokens, cut, start, mode, use_pread, headroom):
    """decode_layer_into_views (a restore's decode straight into the caller's tensors) writes
    exactly the block's first ``used`` tokens at token ``start`` and nothing else, for planes
    joined as whole elements, stored layers read as segments, result tensors with headroom
    (strided) and partial blocks."""
    from tierkv.blocks import tensor_view
    from tierkv.movers import decode_layer_into_views, layer_targets

    spec = tierkv.KVSpec("m", (tierkv.LayerSpec((tierkv.TensorSpec("k", (3,), 0, dtype),
                                                 tierkv.TensorSpec("v", (2, 5), 1, dtype))),
                               tierkv.LayerSpec((tierkv.TensorSpec("k", (2, 3), 2, dtype),)),  # tokens last
                               tierkv.LayerSpec((tierkv.TensorSpec("k", (3,), 1, dtype),))))
    rng = np.random.default_rng(n_tokens * 31 + start)
    # low-entropy bytes compress, so the planes codec keeps its planes; random ones are stored
    payload = rng.integers(0, 4 if mode == "planes" else 256, n_tokens * spec.bytes_per_token, dtype=np.uint8)
    codec = {"planes": ZstdPlanesCodec(min_ratio=0.0), "stored": ZstdPlanesCodec(min_ratio=1e9), "raw": RawCodec()}[mode]
    value = encode_block(codec, b"F" * 16, spec, payload, n_tokens)

    def read_at(off, bufs, nbytes):
        assert nbytes == sum(memoryview(b).nbytes for b in bufs)
        for b in bufs:
            m = memoryview(b).cast("B")
            m[:] = value[off:off + m.nbytes]
            off += m.nbytes

    parsed = parse_block(value, b"F" * 16, spec, codec, 64, read_at=read_at if use_pread else None)
    used = max(1, n_tokens - cut)
    total = start + used + (3 if headroom else 0)
    flat = torch.from_numpy(payload)
    for layer in range(spec.num_layers):
        outs = []
        for t in spec.layers[layer].tensors:  # with headroom: strided, as in a cache with room to grow
            big = torch.full(t.shape(total + (4 if headroom else 0)), 77, dtype=t.torch_dtype)
            outs.append(big.narrow(t.seq_axis, 0, total))
        before = [o.clone() for o in outs]
        decode_layer_into_views(codec, spec, parsed, layer, layer_targets(spec, layer, tuple(outs)), start, used)
        for i, (t, out, old) in enumerate(zip(spec.layers[layer].tensors, outs, before)):
            want = tensor_view(spec, flat, n_tokens, layer, i).narrow(t.seq_axis, 0, used)
            assert torch.equal(out.narrow(t.seq_axis, start, used).view(torch.uint8), want.view(torch.uint8))
            rest = torch.ones(out.shape, dtype=torch.bool)
            rest.narrow(t.seq_axis, start, used).fill_(False)
            assert torch.equal(out.view(torch.uint8)[rest.repeat_interleave(t.itemsize, -1)],
                               old.view(torch.uint8)[rest.repeat_interleave(t.itemsize, -1)])


def test_serial_pieces_stay_under_torchs_grain():
    """Cut for the calling thread, a save of SmolLM2's geometry (3 KV heads x 64, 256-token
    blocks, each tensor just over torch's intra-op grain) is copied in pieces that torch runs
    serially, covering every token of every tensor once, in order."""
    from tierkv.blocks import INTRA_OP_GRAIN, block_views, serial_pieces
    from tierkv.spec import KVSpec

    spec = KVSpec.gqa("test/smollm2-like", 4, 3, 64, "float32")
    B = 256
    payloads = [torch.empty(B * spec.bytes_per_token, dtype=torch.uint8) for _ in range(2)]
    kv = [torch.randn(3, B, 64) for _ in spec.tensors]
    dsts = [v for p in payloads for v in block_views(spec, p, B)]
    srcs = kv * len(payloads)
    assert all(d.numel() >= INTRA_OP_GRAIN for d in dsts)  # as they are, torch would split them
    pd, ps = serial_pieces(spec, dsts, srcs)
    assert all(d.numel() < INTRA_OP_GRAIN and d.shape == s.shape for d, s in zip(pd, ps, strict=True))
    torch._foreach_copy_(pd, ps)
    for d, s in zip(dsts, srcs):
        assert torch.equal(d, s)
    # the same cut made a block at a time (pack_blocks' path for full blocks of a uniform
    # layout): 128-token pieces, every one under the grain, every byte in its place
    from tierkv.blocks import _serial_full_blocks

    layered = [(kv[0], kv[1]), (kv[2], kv[3]), (kv[4], kv[5]), (kv[6], kv[7])]
    session = [(torch.cat([k, k + 1], 1), torch.cat([v, v + 1], 1)) for k, v in layered]  # 512 tokens
    fresh = {i: torch.zeros(B * spec.bytes_per_token, dtype=torch.uint8) for i in range(2)}
    fd, fs, rest = _serial_full_blocks(spec, session, B, fresh)
    assert not rest and len(fd) == len(fs) == 2 * 2 * len(spec.tensors)
    assert all(d.numel() < INTRA_OP_GRAIN and d.shape == (3, 128, 64) == s.shape for d, s in zip(fd, fs))
    torch._foreach_copy_(fd, fs)
    for i in range(2):
        for d, (li, ti) in zip(block_views(spec, fresh[i], B), [(li, ti) for li in range(4) for ti in range(2)]):
            assert torch.equal(d, session[li][ti][:, i * B:(i + 1) * B])


@pytest.mark.parametrize("serial", [False, True])
@pytest.mark.parametrize("kind", ["gqa", "mla", "mixed"])
def test_batched_packing_equals_packing_block_by_block(kind, serial, monkeypatch):
    """pack_blocks (one batched copy, views from one split or reshape of each payload) writes the
    bytes pack_block writes: uniform layouts, a token axis first, layers that differ in shape and
    dtype, a partial last block, and only some of a save's blocks; also in pieces cut for the
    calling thread alone (``serial``; the grain lowered so that these small tensors are cut,
    unevenly, and a tensor whose single token passes it is copied a token at a time)."""
    from conftest import make_kv
    import tierkv.blocks
    from tierkv.blocks import block_views, pack_block, pack_blocks, tensor_view

    monkeypatch.setattr(tierkv.blocks, "INTRA_OP_GRAIN", 30)
    from tierkv.spec import KVSpec, LayerSpec, TensorSpec

    if kind == "gqa":
        spec = small_spec(layers=3, heads=2, dim=8)
    elif kind == "mla":
        spec = KVSpec.mla("test/mla", 3, 24, 8)
    else:
        spec = KVSpec("test/mixed", (
            LayerSpec((TensorSpec("key", (2, 8), 1, "bfloat16"), TensorSpec("value", (2, 4), 1, "bfloat16"))),
            LayerSpec((TensorSpec("latent", (12,), 0, "float32"),)),
            LayerSpec((TensorSpec("key", (1, 8), 1, "float16"), TensorSpec("value", (1, 8), 1, "float16")))))
    assert (spec.uniform_tensor is not None) == (kind != "mixed")
    B, n = 16, 3 * 16 + 5
    kv = make_kv(spec, n, seed=3)
    for wanted in ([0, 1, 2, 3], [1, 3], [3]):
        one = {i: torch.full((min(B, n - i * B) * spec.bytes_per_token,), 0xAB, dtype=torch.uint8) for i in wanted}
        batched = {i: p.clone() for i, p in one.items()}
        for i, p in one.items():
            pack_block(spec, kv, i * B, min(B, n - i * B), p)
        pack_blocks(spec, kv, B, batched, serial=serial)
        for i in wanted:
            assert torch.equal(one[i], batched[i])
            views = block_views(spec, batched[i], min(B, n - i * B))
            flat = [(li, ti) for li, layer in enumerate(spec.layers) for ti in range(len(layer.tensors))]
            for v, (li, ti) in zip(views, flat, strict=True):
                ref = tensor_view(spec, batched[i], min(B, n - i * B), li, ti)
                assert v.data_ptr() == ref.data_ptr() and v.shape == ref.shape and v.dtype == ref.dtype


def test_imports_obey_the_layer_map():
    """docs/architecture.md's layer map lists every module of the package, and no module imports
    one of a higher layer (imports inside functions included: they are imports all the same)."""
    import ast
    import os
    import re

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "docs", "architecture.md"), encoding="utf-8") as f:
        doc = f.read()
    table = doc.split("## Layer map", 1)[1].split("\n## ", 1)[0]
    layer_of: dict[str, int] = {}
    for row in table.splitlines():
        m = re.match(r"\|\s*(\d+)\s+[^|]*\|\s*([^|]*)\|", row)
        if m:
            for path in re.findall(r"`(tierkv/[\w/]+\.py)`", m.group(2)):
                layer_of[path[:-3].replace("/", ".")] = int(m.group(1))
    modules = {}
    for dirpath, _, files in os.walk(os.path.join(root, "tierkv")):
        for name in files:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, name), root)[:-3].replace(os.sep, ".")
                modules[rel] = os.path.join(dirpath, name)
    listed = {m for m in modules if not m.endswith("__init__") or m == "tierkv.__init__"}
    assert listed <= set(layer_of), f"modules missing from the layer map: {sorted(listed - set(layer_of))}"
    upward = []
    for mod, path in modules.items():
        if mod not in layer_of:
            continue
        package = mod.rsplit(".", 1)[0]
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for t in targets:
                if t in layer_of and t != mod and layer_of[t] > layer_of[mod]:
                    upward.append(f"{mod} (layer {layer_of[mod]}) imports {t} (layer {layer_of[t]})")
    assert not upward, "\n".join(sorted(set(upward)))


def test_lease_table_is_shared_and_a_hint(tmp_path):
    """Two maps of one store directory's lease table (as two processes have) and three owners
    (three saves): each map sees every owner's leases; a commit takes only its own owner off a
    key, so another owner's lease on it stays; a slot keeps a key's last two owners still
    leasing; a lease runs out; a key landing in an occupied slot takes it over. Leases are
    hints: losing one is allowed (and counted: ``displaced``), holding one for the wrong key is
    not."""
    import os

    from tierkv.leases import FILE_BYTES, LEASE_SLOTS, Leases

    a, b = (Leases(str(tmp_path)) for _ in range(2))
    try:
        o1, o2, o3 = a.new_owner(), a.new_owner(), b.new_owner()
        assert len({o1, o2, o3}) == 3 and 0 not in (o1, o2, o3)
        k1 = (5).to_bytes(8, "little") + b"\x01" * 8
        k2 = (5 + LEASE_SLOTS).to_bytes(8, "little") + b"\x02" * 8  # k1's slot
        k3 = (6).to_bytes(8, "little") + b"\x03" * 8
        assert not b.held(k1)
        assert a.grant([k1, k3], o1) == set()  # nothing marked
        assert (a.held(k1), b.held(k1), b.held(k3), b.held(k2)) == (True, True, True, False)
        b.grant([k1], o3)  # two owners
        a.release([k1], o1)  # o1's record committed: o3's lease stays
        assert a.held(k1) and b.held(k1)
        a.grant([k1], o1)
        assert (a.displaced, b.displaced) == (0, 0)
        a.grant([k1], o2)  # a third owner: the oldest of the two (o3) goes
        assert a.displaced == 1
        b.release([k1], o3)  # not there: nothing changes
        assert b.held(k1)
        a.release([k1], o1)
        a.release([k1], o2)
        assert not a.held(k1) and not b.held(k1)
        # the newer of two owners committed first: a third takes its free column, and the older
        # one's lease stays (before, the third pushed it out all the same)
        a.grant([k1], o1)
        b.grant([k1], o3)
        b.release([k1], o3)
        a.grant([k1], o2)
        assert a.displaced == 1 and a.standing(k1, o1) == a.standing(k1, o2) == "held"
        a.release([k1], o2)
        assert b.held(k1)  # o1's, still
        a.release([k1], o1)
        assert not b.held(k1)
        b.grant([k2], o3)  # k1's slot, taken over
        assert a.held(k2) and not a.held(k1)
        a.release([k1], o3)  # not its slot any more: k2's lease stays
        assert a.held(k2) and (a.displaced, b.displaced) == (1, 0)  # it had no owner left
        a.grant([k1], o1)  # takes the slot back from k2's live lease
        assert a.displaced == 2 and not b.held(k2)
        b.grant([k1, k2], o3)  # over o1's lease, and one of its own two
        assert b.displaced == 2 and b.held(k2) and not b.held(k1)
        a.grant([k3], o1, seconds=0.0)  # run out
        assert not b.held(k3)
        # how a save's lease stands, as its commit asks on finding a trusted block gone
        assert (b.standing(k3, o1), b.standing(k2, o3), b.standing(k1, o3), b.standing(k2, o1)) == \
            ("ran_out", "held", "taken", "pushed_out")
        a.grant([], o1)
        a.release([], o1)
    finally:
        for x in (a, b):
            x.close()
        a.close()  # idempotent
    assert os.path.getsize(tmp_path / "leases.bin") == FILE_BYTES


def _grant_and_check(directory, keys, seconds, leases=None):
    """Grant ``keys`` as a new owner, check that every lease of it is held (grants and releases
    held off meanwhile: a settled view), release; again and again for ``seconds``. Returns (lost,
    checked): the leases found not held."""
    import time

    from tierkv.leases import Leases

    table = leases or Leases(directory)
    lost = checked = 0
    try:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            me = table.new_owner()
            table.grant(keys, me)
            with table._writing_slots():
                for k in keys:
                    checked += 1
                    lost += table.standing(k, me) != "held"
            table.release(keys, me)
    finally:
        if leases is None:
            table.close()
    return lost, checked


@pytest.mark.parametrize("where", ["processes", "threads"])
def test_grants_and_releases_at_once_lose_no_lease(tmp_path, where):
    """Two processes (or two threads of one, as a save's grant and the writer's release) grant
    and release leases on the same keys at once, each holding at most one lease per key, so
    each key's slot holds at most two: none may be lost. Before grants and releases took the
    table to themselves, a release that read a slot before the other's grant shifted its owners
    wrote its zero over the newer lease, and two grants at once each wrote over the other's
    owner (bench/lease_race.py). The keys lie in distinct slots: a grant's own keys sharing a
    slot lose leases by design."""
    import multiprocessing as mp
    import os
    from concurrent.futures import ThreadPoolExecutor

    from tierkv.leases import Leases

    keys = [i.to_bytes(8, "little") + os.urandom(8) for i in range(64)]  # slots 0..63
    if where == "processes":
        with mp.get_context("spawn").Pool(2) as pool:
            results = pool.starmap(_grant_and_check, [(str(tmp_path), keys, 1.5)] * 2)
    else:
        table = Leases(str(tmp_path))
        try:
            with ThreadPoolExecutor(2) as ex:
                results = list(ex.map(lambda _: _grant_and_check(str(tmp_path), keys, 1.5, table), range(2)))
        finally:
            table.close()
    assert all(checked > 1000 for _, checked in results), results
    assert sum(lost for lost, _ in results) == 0, results


def test_doom_marks_answer_a_grant_and_count(tmp_path):
    """The other half of the handshake (``leases.py``): a transaction marks the keys it is
    deleting; a grant answers with the keys it finds marked, so the save copies them; the marks
    go when the transaction is over. A bucket keeps the marks of ``MARK_WAYS`` keys apart, so
    keys that share one are answered for themselves; a collision never loses a mark: a key that
    finds every entry taken marks the bucket's overflow, which stands for every key of the
    bucket (a copy that was not needed, counted) until its count is back to zero, even when the
    key's next mark found an entry. A mark left by a process killed before its commit runs out,
    and frees its entry."""
    import os

    from tierkv.leases import FILE_BYTES, MARK_BUCKETS, MARK_WAYS, Leases

    def key(tag: int, fill: int) -> bytes:
        return tag.to_bytes(8, "little") + bytes([fill]) * 8

    assert MARK_WAYS == 4
    writer, saver = Leases(str(tmp_path)), Leases(str(tmp_path))
    try:
        k1, k2, k3, k4, k5, k8 = (key(9 + i * MARK_BUCKETS, i + 1) for i in (0, 1, 2, 3, 4, 7))  # one bucket
        k6, k7 = key(10, 6), key(10 + MARK_BUCKETS, 7)  # another
        every = [k1, k2, k3, k4, k5, k6, k7, k8]
        assert saver.grant(every, saver.new_owner()) == set()
        writer.doom([k1, k2, k6])
        assert saver.grant(every, saver.new_owner()) == {k1, k2, k6}  # each for itself
        writer.doom([k3, k4])  # the bucket's four entries
        assert saver.grant(every, saver.new_owner()) == {k1, k2, k3, k4, k6}
        assert saver.shared_marks == 0
        writer.doom([k5])  # no entry left: the overflow
        assert saver.grant(every, saver.new_owner()) == {k1, k2, k3, k4, k5, k6, k8}
        assert saver.shared_marks == 2  # k8's copy was not needed; k5's was (both counted)
        writer.undoom([k1])  # frees an entry; the overflow still stands for every key
        writer.doom([k5])  # k5's second mark takes the free entry
        assert saver.grant(every, saver.new_owner()) == {k1, k2, k3, k4, k5, k6, k8}
        assert saver.shared_marks == 4  # k1 and k8 now
        writer.undoom([k5])  # its entry's mark
        assert saver.grant(every, saver.new_owner()) == {k1, k2, k3, k4, k5, k6, k8}
        assert saver.shared_marks == 7  # k5's own mark is the overflow's again
        writer.undoom([k5])  # the overflow's
        assert saver.grant(every, saver.new_owner()) == {k2, k3, k4, k6}
        writer.undoom([k2, k3, k4, k6])
        assert saver.grant(every, saver.new_owner()) == set()
        writer.undoom([k2])  # taken off twice: no count below zero
        assert saver.grant(every, saver.new_owner()) == set()
        assert saver.shared_marks == 7
        # marks left by a killed process run out, and free their entries
        writer.doom([k1, k2, k3, k4], seconds=0.0)
        assert saver.grant(every, saver.new_owner()) == set()
        writer.doom([k5, k2])  # entries, not the overflow; k2 starts again from one live mark
        assert saver.grant(every, saver.new_owner()) == {k2, k5}
        writer.undoom([k5, k2])
        assert saver.grant(every, saver.new_owner()) == set()
        assert saver.shared_marks == 7
        ka, kb = key(12, 1), key(12, 2)  # two keys, one tag: one entry, two marks
        writer.doom([ka, kb])
        writer.undoom([ka])
        assert saver.grant([ka, kb], saver.new_owner()) == {ka, kb}
        writer.undoom([kb])
        assert saver.grant([ka, kb], saver.new_owner()) == set()
        writer.doom([])
        writer.undoom([])
        assert os.path.getsize(tmp_path / "leases.bin") == FILE_BYTES
    finally:
        writer.close()
        saver.close()


@pytest.mark.parametrize("per_bucket", [4, 7])
def test_doom_marks_follow_overlapping_transactions(tmp_path, per_bucket):
    """Marks stay right under transactions that overlap, as two processes' and a writer's do:
    random transactions mark random keys (several calls each, keys of one bucket together in
    one call), and take their marks off at their end. A grant then finds every key some open
    transaction marked (never fewer: a save would trust a block being deleted); with at most
    ``MARK_WAYS`` keys to a bucket, exactly those, and once every transaction is over, none."""
    import random
    from collections import Counter

    from tierkv.leases import MARK_BUCKETS, MARK_WAYS, Leases

    rng = random.Random(per_bucket)
    keys = [(b + i * MARK_BUCKETS).to_bytes(8, "little") + bytes([i]) * 8
            for b in (3, 4, 5) for i in range(per_bucket)]
    writer, saver = Leases(str(tmp_path)), Leases(str(tmp_path))
    try:
        open_txns: list[set[bytes]] = []
        for _ in range(400):
            if open_txns and rng.random() < 0.4:
                txn = open_txns.pop(rng.randrange(len(open_txns)))
                writer.undoom(txn)
            else:
                if not open_txns or rng.random() < 0.3:
                    open_txns.append(set())
                txn = rng.choice(open_txns)
                new = [k for k in rng.sample(keys, rng.randint(1, 6)) if k not in txn]
                writer.doom(new)
                txn.update(new)
            marked = {k for k, n in Counter(k for t in open_txns for k in t).items() if n}
            found = saver.grant(keys, saver.new_owner())
            assert marked <= found
            if per_bucket <= MARK_WAYS:
                assert found == marked
        for txn in open_txns:
            writer.undoom(txn)
        assert saver.grant(keys, saver.new_owner()) == set()
        assert (saver.shared_marks == 0) == (per_bucket <= MARK_WAYS)
    finally:
        writer.close()
        saver.close()


def test_encode_buffers_lend_reuse_and_let_go():
    """The writer's buffers for large values: none for values up to the threshold (a new bytes
    costs no more); a buffer given back is lent again for a value it holds (the smallest that
    fits), a new one where none does; free ones kept up to ``keep_bytes``; values it did not
    lend are ignored; ``clear`` lets go of the free ones."""
    from tierkv.stats import Stats
    from tierkv.writer import EncodeBuffers

    stats = Stats()
    bufs = EncodeBuffers(stats, keep_bytes=3000, reuse_above=100)
    assert bufs.take(100) is None
    a, b = bufs.take(1000), bufs.take(2000)
    assert len(a) == 1000 and len(b) == 2000 and not a.readonly
    a[:] = b"\x01" * 1000
    bufs.give(b)
    bufs.give(a)
    assert bufs.free_bytes() == 3000
    bufs.give(a)  # given twice: no longer lent, ignored
    bufs.give(b"x" * 500)
    assert bufs.free_bytes() == 3000
    c = bufs.take(900)  # the 1,000-byte one, not the 2,000
    assert c.obj is a.obj and len(c) == 900
    d = bufs.take(2500)  # none large enough: new
    assert d.obj is not b.obj and bufs.free_bytes() == 2000
    bufs.give(d)  # 2,000 + 2,500 free would pass keep_bytes: dropped
    assert bufs.free_bytes() == 2000
    bufs.give(c)
    assert bufs.free_bytes() == 3000
    bufs.clear()
    assert bufs.free_bytes() == 0
    writes = stats.snapshot({}, {}, {})["ssd_writes"]
    assert (writes["buffers_reused"], writes["buffers_new"]) == (1, 3)


def test_encode_buffers_keep_what_was_lent_at_once():
    """Past ``keep_bytes``, the free buffers may total as much as was lent at once since the
    last ``clear``: a batch's values, given back, wait there for the next batch's encodes
    (memory the writer held anyway); ``clear`` starts that count again."""
    from tierkv.stats import Stats
    from tierkv.writer import EncodeBuffers

    bufs = EncodeBuffers(Stats(), keep_bytes=0, reuse_above=0)
    lent = [bufs.take(100) for _ in range(3)]
    for v in lent:
        bufs.give(v)
    assert bufs.free_bytes() == 300
    again = [bufs.take(100) for _ in range(3)]
    assert {v.obj.ctypes.data for v in again} == {v.obj.ctypes.data for v in lent}  # the same three
    bufs.clear()  # the three still lent count
    for v in again:
        bufs.give(v)
    assert bufs.free_bytes() == 300
    bufs.clear()
    one = bufs.take(100)
    bufs.clear()
    bufs.give(one)  # lent at most 100 since: kept
    assert bufs.free_bytes() == 100
