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
    # what a save of this KV, grown, passes as known_from (a restore of every row: None)
    assert r.known_from == [5 * BLOCK] * spec.num_layers and s.restore(range(N), session="s").known_from is None


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


def test_a_save_never_copies_rows_it_was_not_given(open_store):
    """A save's ``known_from``: the KV a restore with ``needed_from`` gave (rows before each
    layer's first needed block hold what the caller's memory held, the sentinel here), grown by
    new tokens, saves the session whole where the store holds the blocks it was not given all of;
    where it lacks one, the session ends before it, and nothing of the sentinel rows is ever
    stored. Layer 3 needs the prefix's last, partial block: grown, it is a new block, copied.
    Needing nothing of it (``NEEDED``'s last layer) cuts the save before it."""
    needed = NEEDED[:3] + [8 * BLOCK]
    spec = small_spec()
    s, kv = stored(open_store, spec, "cpu", "ssd")
    grown = make_kv(spec, N + 2 * BLOCK, seed=4)
    h = s.restore_async(range(N), session="s", needed_from=needed,
                        allocate=lambda layer, index, shape, dtype, dev: torch.full(shape, SENTINEL, dtype=dtype))
    mine = [tuple(torch.cat([x, y.narrow(1, N, 2 * BLOCK)], dim=1) for x, y in zip(p, q))
            for p, q in zip(h.result().kv, grown)]
    # without the prefix's last rows of layer 3, its grown block 8 cannot be made: cut before it
    s.save(range(N + 2 * BLOCK), mine, session="w", known_from=NEEDED).wait()
    assert s.lookup(range(N + 2 * BLOCK), session="w") == 8 * BLOCK and s.stats()["saves_cut_unknown"] == 1
    # the store holds every block of the prefix: the save names them and adds the new ones
    s.save(range(N + 2 * BLOCK), mine, session="s", known_from=needed).wait()
    want = [tuple(torch.cat([x, y.narrow(1, N, 2 * BLOCK)], dim=1) for x, y in zip(p, q)) for p, q in zip(kv, grown)]
    assert_kv_equal(on_cpu(s.restore(range(N + 2 * BLOCK), session="s").kv), want)
    assert s.stats()["saves_cut_unknown"] == 1
    # a store that holds only the first two blocks (another session's): the save ends before
    # block 2, which it was not given all of (known_from 3 x BLOCK + 5 for layer 1)
    other = open_store(spec, path=s.path + "-other", ssd_codec="raw")
    other.save(range(2 * BLOCK), kv_slice(kv, 2 * BLOCK), session="a").wait()
    other.save(range(N + 2 * BLOCK), mine, session="t", known_from=needed).wait()
    assert other.lookup(range(N + 2 * BLOCK), session="t") == 2 * BLOCK
    assert_kv_equal(on_cpu(other.restore(range(N + 2 * BLOCK), session="t").kv), kv_slice(kv, 2 * BLOCK))
    assert other.stats()["saves_cut_unknown"] == 1
    # one that holds none of them: cut to nothing, the session is not made, nothing stored
    empty = open_store(spec, path=s.path + "-empty", ssd_codec="raw")
    handle = empty.save(range(N + 2 * BLOCK), mine, session="u", known_from=needed)
    assert handle.done() and handle.wait()
    assert empty.lookup(range(N + 2 * BLOCK), session="u") == 0 and empty.stats()["saves_cut_unknown"] == 1
    assert sum(empty.stats()["resident_blocks"].values()) == 0
    with pytest.raises(tierkv.ConfigError, match="known_from must"):
        empty.save(range(N + 2 * BLOCK), mine, session="u", known_from=[1, 2])
    # a block dropped between the save's first look and its record (another thread): the same cut
    real = other._to_copy
    other._to_copy = lambda keys, deleting: [i for i in real(keys, deleting) if i >= 8]  # noqa: E731
    other.save(range(N + 2 * BLOCK), mine, session="v", known_from=needed).wait()
    assert other.lookup(range(N + 2 * BLOCK), session="v") == 2 * BLOCK
    assert other.stats()["saves_cut_unknown"] == 2
