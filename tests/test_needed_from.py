"""A restore's ``needed_from``: per layer, the first token the caller needs (a server's own
prefix cache holds the tokens before it, or a sliding window no longer reaches them). Blocks
wholly before it are neither read nor copied for that layer, their rows of the result keep what
the caller's memory held (zeros in memory tierkv allocates), and every row from that block on is
exact, from every tier and on every result path."""

from __future__ import annotations

import pytest
import torch

import tierkv
import tierkv.keys
import tierkv.reads

from conftest import BLOCK, assert_kv_equal, flip_byte, kv_slice, make_kv, on_cpu, small_spec

N = 8 * BLOCK + 3           # eight whole blocks and a partial one
NEEDED = [0, 3 * BLOCK + 5, 6 * BLOCK, N]   # layer 3 needs nothing of this prefix
SENTINEL = -7.0


def first_block(needed: int) -> int:
    """The first block a layer needs: the one holding token ``needed`` (none past the prefix)."""
    return needed // BLOCK if needed < N else -(-N // BLOCK)


def check_rows(kv, restored, needed, untouched: float) -> None:
    """Rows from each layer's first needed block equal ``kv``; rows before it hold ``untouched``."""
    for layer, (want, got, start) in enumerate(zip(kv, restored, needed)):
        cut = min(first_block(start) * BLOCK, N)
        assert_kv_equal([tuple(x.narrow(1, cut, N - cut) for x in want)],
                        [tuple(x.narrow(1, cut, N - cut) for x in got)])
        for x in got:
            before = x.narrow(1, 0, cut)
            assert torch.all(before == untouched), f"layer {layer}: a row before token {cut} was written"


def stored(open_store, spec, device, source):
    """A store holding session "s" (N tokens) wholly in ``source``: "device", "host", "ssd", or
    "tiers" (two blocks in each memory tier, the rest on SSD only)."""
    per_block = BLOCK * spec.bytes_per_token
    sizes = {"device": (64 * per_block, 0), "host": (0, 64 * per_block), "ssd": (0, 0),
             "tiers": (2 * per_block, 2 * per_block)}[source]
    s = open_store(spec, device=device, device_bytes=sizes[0], host_bytes=sizes[1], ssd_codec="raw")
    kv = make_kv(spec, N, seed=3, device=device)
    s.save(range(N), kv, session="s")
    s.flush()
    if source == "ssd":
        s.offload("s")
    return s, on_cpu(kv)


@pytest.mark.parametrize("source", ["device", "host", "ssd", "tiers"])
@pytest.mark.parametrize("into", ["fresh", "allocated"])
def test_layers_read_only_from_the_block_they_need(open_store, device, source, into):
    spec = small_spec()
    s, kv = stored(open_store, spec, device, source)
    before = s.stats()

    def allocate(layer, index, shape, dtype, dev):
        return torch.full(shape, SENTINEL, dtype=dtype, device=dev)

    h = s.restore_async(range(N), session="s", needed_from=NEEDED, allocate=allocate if into == "allocated" else None)
    r = h.result()
    assert r.num_tokens == N
    check_rows(kv, on_cpu(r.kv), NEEDED, SENTINEL if into == "allocated" else 0.0)
    after = s.stats()
    blocks = -(-N // BLOCK)
    skipped = sum(first_block(x) for x in NEEDED)
    assert after["skipped_block_layers"] - before["skipped_block_layers"] == skipped
    # layer 0 needs every block: each is a hit of its tier
    assert sum(r.sources.values()) == blocks
    if source == "ssd":
        # raw values: the bytes read are the needed (block, layer) pairs' and no more
        want = sum((min((k + 1) * BLOCK, N) - k * BLOCK) * spec.layers[layer].bytes_per_token
                   for layer, start in enumerate(NEEDED) for k in range(first_block(start), blocks))
        assert after["ssd_read_bytes"] - before["ssd_read_bytes"] == want
    # per layer through the handle too, and a full restore afterwards is whole and exact
    h = s.restore_async(range(N), session="s", needed_from=NEEDED)
    check_rows(kv, [on_cpu([h.layer(i)])[0] for i in range(spec.num_layers)], NEEDED, 0.0)
    h.result()
    assert_kv_equal(on_cpu(s.restore(range(N), session="s").kv), kv)


def test_blocks_no_layer_needs_are_not_hits_of_any_tier(open_store, device):
    """An int applies to every layer: the five blocks before token 5 x BLOCK are counted into the
    prefix (its length is the same) but read from no tier."""
    spec = small_spec()
    s, kv = stored(open_store, spec, device, "ssd")
    r = s.restore(range(N), session="s", needed_from=5 * BLOCK)
    assert r.num_tokens == N and r.sources == {"ssd": 4}
    assert s.stats()["hits"]["ssd"] == 4
    check_rows(kv, on_cpu(r.kv), [5 * BLOCK] * spec.num_layers, 0.0)


def block_key(s, n_block):
    keys = tierkv.keys.block_keys(tierkv.keys.chain_seed(s.fingerprint, None), tierkv.keys.as_tokens(range(N)),
                                  BLOCK, partial=False)
    return keys[n_block]


def test_a_damaged_block_is_a_miss_only_where_a_layer_reads_it(open_store, store_path):
    """Block 2 fails its checksum (a byte of its last layer). A restore that needs nothing before
    block 4 never reads it and restores the whole prefix; one whose last layer needs it ends the
    prefix there, a counted miss, never its bytes."""
    spec = small_spec()
    s, kv = stored(open_store, spec, "cpu", "ssd")
    key = block_key(s, 2)
    s.close()
    flip_byte(store_path, key, -5)
    s = open_store(spec, device_bytes=0, host_bytes=0, ssd_codec="raw")
    r = s.restore(range(N), session="s", needed_from=4 * BLOCK)
    assert r.num_tokens == N and s.stats()["corrupt_blocks"] == 0
    check_rows(kv, r.kv, [4 * BLOCK] * spec.num_layers, 0.0)
    h = s.restore_async(range(N), session="s", needed_from=[4 * BLOCK, 4 * BLOCK, 4 * BLOCK, 0])
    with pytest.raises(tierkv.BlockLoadError) as e:
        h.layer(3)  # the layer whose read failed
    assert e.value.first_bad_token == 2 * BLOCK
    r = h.result()
    assert r.num_tokens == 2 * BLOCK and s.stats()["corrupt_blocks"] == 1
    assert_kv_equal([r.kv[3]], [kv_slice(kv, 2 * BLOCK)[3]])
    # marked corrupt: later lookups end the prefix before it, whatever they need
    assert s.restore(range(N), session="s", needed_from=4 * BLOCK).num_tokens == 2 * BLOCK


@pytest.mark.parametrize("bad", [-1, 2.5, True, "3", [0, 1, 2], [0, 1, 2, -4], [0, 1, 2, None], (0, 1, 2, 3, 4)])
def test_a_bad_needed_from_is_refused_before_anything_is_read(open_store, bad):
    spec = small_spec()
    s, kv = stored(open_store, spec, "cpu", "ssd")
    with pytest.raises(tierkv.ConfigError, match="needed_from"):
        s.restore_async(range(N), session="s", needed_from=bad)
    assert s.stats()["hit_tokens"] == 0
    assert_kv_equal(s.restore(range(N), session="s", needed_from=[0, 0, 0, 0]).kv, kv)


def test_a_restore_with_gaps_asks_the_disk_for_every_layer_it_needs_ahead(open_store, monkeypatch):
    """Readahead sees no stream in a block read with gaps, so the layers a restore needs of such a
    block are asked for (posix_fadvise WILLNEED) ahead of the decode threads, never the layers it
    leaves out, and HINT_AHEAD_BYTES at most at a time; a whole block is asked for its first layer
    only (readahead streams the rest). Layers 1 and 3 need only the last (partial) block: in
    every other block, layers 0 and 2 are hinted, layer 1 between them is not."""
    spec = small_spec(heads=4, dim=64)   # values of a few pages: read with pread, not through the map
    s, kv = stored(open_store, spec, "cpu", "ssd")
    values = s._ssd.values
    if values is None:
        pytest.skip("no pread reader on this platform")
    calls: list[list[tuple[int, int]]] = []
    real = values.advise_willneed
    monkeypatch.setattr(values, "advise_willneed", lambda ranges: (calls.append(list(ranges)), real(ranges)))
    layer_bytes = BLOCK * spec.layers[0].bytes_per_token
    whole = -(-N // BLOCK)

    check_rows(kv, s.restore(range(N), session="s").kv, [0] * 4, 0.0)
    hints = [h for call in calls for h in call]
    assert len(hints) == whole and all(length == layer_bytes for _, length in hints[:-1])

    for window in (1 << 30, 3 * layer_bytes):   # everything up front; three layers ahead
        monkeypatch.setattr(tierkv.reads, "HINT_AHEAD_BYTES", window)
        calls.clear()
        r = s.restore(range(N), session="s", needed_from=[0, N - 1, 0, N - 1])
        check_rows(kv, r.kv, [0, N - 1, 0, N - 1], 0.0)
        hints = [h for call in calls for h in call]
        assert len(hints) == len(set(hints)) == 2 * (whole - 1) + 1
        # the whole last block's first layer, then the first layers with gaps up to the window
        assert len(calls[0]) == 1 and len(calls[1]) == min(2 * (whole - 1), window // layer_bytes)
        gapped = sorted(h for h in hints if h[1] == layer_bytes)
        assert len(gapped) == 2 * (whole - 1)
        for (first, length), (third, _) in zip(gapped[::2], gapped[1::2]):
            assert third - first == 2 * layer_bytes   # layer 1 lies between them, in no hint
