"""Sharing, reference counts, budgets, eviction order, pins and TTLs, under scripted sequences."""

import contextlib
import threading
import time

import pytest
import torch

import tierkv
from conftest import BLOCK, assert_kv_equal, kv_slice, make_kv, small_spec

SPEC = small_spec()
BLK = BLOCK * SPEC.bytes_per_token  # bytes of one full block


def tiers_of(s, session):
    return s.session_info(session)["blocks_by_tier"]


@contextlib.contextmanager
def writer_held_off(s):
    """Hold the store's write lock on a thread of its own while the block runs: the writer can
    neither commit a batch nor demote after one."""
    held, release = threading.Event(), threading.Event()

    def hold():
        with s._ssd.batch():
            held.set()
            release.wait(60)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(60)
        yield
    finally:
        release.set()
        holder.join(60)


def test_shared_prefix_stored_once_and_survives_drop(open_store):
    prefix = list(range(3 * BLOCK))
    kv_a = make_kv(SPEC, 3 * BLOCK + 10, seed=1)
    kv_b = [tuple(torch.cat([x[:, :3 * BLOCK], y[:, 3 * BLOCK:]], dim=1) for x, y in zip(la, lb))
            for la, lb in zip(kv_a, make_kv(SPEC, 3 * BLOCK + 10, seed=2))]
    s = open_store(SPEC, persist="write_through", ssd_codec="raw")
    s.save(prefix + [1] * 10, kv_a, session="a").wait()
    used_after_a = s.stats()["resident_bytes"]
    s.save(prefix + [2] * 10, kv_b, session="b").wait()
    used_after_b = s.stats()["resident_bytes"]
    # b added only its own partial block, in memory and on SSD
    assert used_after_b["device"] - used_after_a["device"] == 10 * SPEC.bytes_per_token
    assert used_after_b["ssd"] - used_after_a["ssd"] < 10 * SPEC.bytes_per_token + 1024
    s.drop_session("a")
    s.flush()
    with pytest.raises(tierkv.UnknownSessionError):
        s.session_info("a")
    r = s.restore(prefix + [2] * 10, session="b")
    assert r.num_tokens == 3 * BLOCK + 10
    assert_kv_equal(r.kv, kv_b)
    # a's partial block is gone; the shared blocks remain, also after a reopen
    path = s.path
    s.close()
    s = open_store(SPEC, path=path, persist="write_through", ssd_codec="raw")
    assert s.lookup(prefix + [1] * 10, session="a") == 3 * BLOCK  # content match, full blocks
    r = s.restore(prefix + [2] * 10, session="b")
    assert_kv_equal(r.kv, kv_b)
    s.drop_session("b")
    s.flush()
    assert s.stats()["resident_bytes"] == {"device": 0, "host": 0, "ssd": 0}


def test_budget_accounting_and_demotion_order(open_store):
    s = open_store(SPEC, device_bytes=2 * BLK, host_bytes=2 * BLK)
    kv = {name: make_kv(SPEC, 2 * BLOCK, seed=i) for i, name in enumerate("abcdefg")}
    toks = {name: [i * 1000 + t for t in range(2 * BLOCK)] for i, name in enumerate("abcdefg")}

    def save(name, **kw):
        s.save(toks[name], kv[name], session=name, **kw)
        s.flush()

    save("a")
    assert tiers_of(s, "a") == {"memory:device": 2}
    save("b")
    assert tiers_of(s, "a") == {"memory:host": 2} and tiers_of(s, "b") == {"memory:device": 2}
    save("c")  # b pushed to host, a (least recently used there) to SSD
    assert tiers_of(s, "a") == {"ssd": 2}
    assert tiers_of(s, "b") == {"memory:host": 2}
    assert tiers_of(s, "c") == {"memory:device": 2}
    st = s.stats()
    assert st["resident_bytes"]["device"] == 2 * BLK and st["resident_bytes"]["host"] == 2 * BLK
    assert st["resident_blocks"] == {"device": 2, "host": 2}

    r = s.restore(toks["a"], session="a")  # decoded from SSD straight into the result
    assert r.sources == {"ssd": 2}
    assert_kv_equal(r.kv, kv["a"])
    s.flush()
    assert tiers_of(s, "a") == {"ssd": 2}  # a restore does not fill the memory tiers
    s.prefetch(toks["a"], session="a").wait()  # a prefetch does: a to the device, c down to host,
    s.flush()                                  # b (least recently used on host) to SSD
    assert tiers_of(s, "a") == {"memory:device": 2}
    assert tiers_of(s, "c") == {"memory:host": 2}
    assert tiers_of(s, "b") == {"ssd": 2}

    save("d", pinned=True)  # a demoted, d stays
    save("e")               # e cannot push pinned d out: e itself goes down
    assert tiers_of(s, "d") == {"memory:device": 2}
    assert tiers_of(s, "e") == {"memory:host": 2}
    assert tiers_of(s, "c") == {"ssd": 2}
    with pytest.raises(tierkv.BudgetExceededError, match="pinned"):
        s.save(toks["f"], kv["f"], session="f", pinned=True)
    with pytest.raises(tierkv.UnknownSessionError):
        s.session_info("f")  # the refused save changed nothing
    s.flush()
    assert s.stats()["resident_bytes"]["device"] == 2 * BLK
    for name in "abcde":
        assert_kv_equal(s.restore(toks[name], session=name).kv, kv[name])


def test_pins_taken_without_new_bytes_never_hold_a_tier_over_its_budget(open_store):
    """``save``'s check counts only a save's new bytes against the tier's budget. Sessions pinned
    again with the same tokens (their blocks already cached elsewhere) and then prefetched moved
    pinned blocks up into the device tier with no check; never demoted, they held it over budget
    plus slack, and from then on every save waited SAVE_WAIT_S (10 s) for the writer, which had
    nothing it might move (found by a randomized run of every hook from three threads). A tier
    now demotes its least recently used pinned blocks while pinned bytes alone exceed its
    budget: a pin keeps a session from SSD eviction, and in memory as far as the budget allows."""
    s = open_store(SPEC, device_bytes=2 * BLK, host_bytes=6 * BLK)
    kv = {name: make_kv(SPEC, 2 * BLOCK, seed=i) for i, name in enumerate("abcz")}
    toks = {name: [i * 1000 + t for t in range(2 * BLOCK)] for i, name in enumerate("abcz")}
    for name in "abc":
        s.save(toks[name], kv[name], session=name)
        s.flush()
    assert tiers_of(s, "a") == tiers_of(s, "b") == {"memory:host": 2}
    for name in "abc":  # no new bytes: nothing counted against the device tier's budget
        s.save(toks[name], kv[name], session=name, pinned=True)
    s.flush()
    for name in "ab":
        s.prefetch(toks[name], session=name).wait()
        s.flush()
    assert s.stats()["resident_bytes"]["device"] <= 2 * BLK
    assert tiers_of(s, "b") == {"memory:device": 2}      # the last prefetched, kept
    t0 = time.monotonic()
    s.save(toks["z"], kv["z"], session="z")
    assert s.stats()["backpressure"]["timeouts"] == 0 and time.monotonic() - t0 < 5
    s.flush()
    st = s.stats()
    assert st["resident_bytes"]["device"] <= 2 * BLK and st["resident_bytes"]["host"] <= 6 * BLK
    for name in "abcz":
        assert s.session_info(name)["pinned"] is (name != "z")
        assert_kv_equal(s.restore(toks[name], session=name).kv, kv[name])


def test_ttl_expiry_hides_and_drops_the_session(open_store):
    s = open_store(SPEC)
    kv = make_kv(SPEC, BLOCK + 3)
    s.save(range(BLOCK + 3), kv, session="t", ttl=0.3)
    s.save(range(BLOCK + 3), kv, session="keep")
    assert s.lookup(range(BLOCK + 3), session="t") == BLOCK + 3
    time.sleep(0.4)
    with pytest.raises(tierkv.UnknownSessionError):
        s.session_info("t")
    # the content-addressed full block is still shared with "keep"
    assert s.lookup(range(BLOCK + 3), session="t") == BLOCK
    assert s.lookup(range(BLOCK + 3), session="keep") == BLOCK + 3


def test_ttl_is_counted_from_last_use(open_store):
    s = open_store(SPEC)
    s.save(range(BLOCK), make_kv(SPEC, BLOCK), session="t", ttl=0.5)
    for _ in range(3):
        time.sleep(0.2)
        assert s.restore(range(BLOCK), session="t").num_tokens == BLOCK
        s.flush()
    s.session_info("t")


def _ssd_store(open_store, blocks, **kw):
    # raw codec: every value is its payload plus a small header, so sizes are predictable
    return open_store(SPEC, ssd_codec="raw", persist="write_through", device_bytes=0, host_bytes=0,
                      ssd_bytes=blocks * BLK + blocks * 1024, **kw)


def test_ssd_evicts_expired_then_lru_never_pinned(open_store):
    s = _ssd_store(open_store, 4)
    kv = make_kv(SPEC, BLOCK)
    for i, name in enumerate(["pinned", "old", "expiring", "recent"]):
        s.save([i * 100 + t for t in range(BLOCK)], kv, session=name,
               pinned=name == "pinned", ttl=0.2 if name == "expiring" else None).wait()
        s.flush()
    time.sleep(0.3)
    s.restore([0 * 100 + t for t in range(BLOCK)], session="pinned")
    s.save([900 + t for t in range(BLOCK)], kv, session="new1").wait()  # needs one block: the expired one goes
    with pytest.raises(tierkv.UnknownSessionError):
        s.session_info("expiring")
    s.session_info("old")
    s.save([950 + t for t in range(BLOCK)], kv, session="new2").wait()  # next: least recently used = old
    with pytest.raises(tierkv.UnknownSessionError):
        s.session_info("old")
    for name in ("pinned", "recent", "new1", "new2"):
        assert s.session_info(name)["tokens"] == BLOCK
    assert s.stats()["evicted"]["ssd_sessions"] == 2
    assert s.stats()["resident_bytes"]["ssd"] <= s.config.ssd_bytes


def test_eviction_passes_over_unowned_blocks_a_queued_save_names(open_store):
    """A save names blocks already on SSD as unowned blocks (cached without a session), the least
    recently used entries, and its transaction must make room for its one new block. Eviction
    passes over them, since the record about to be written names them, and takes the next
    entry. Before, it evicted them first, and the record named blocks with no value (with the
    commit's check on the blocks a record names, the record was then cut back to nothing)."""
    s = _ssd_store(open_store, 4)
    toks, kv = list(range(3 * BLOCK)), make_kv(SPEC, 3 * BLOCK)
    others = [[1000 * i + t for t in range(BLOCK)] for i in (1, 2)]
    s.save(toks[:2 * BLOCK], kv_slice(kv, 2 * BLOCK)).wait()  # two unowned blocks, the oldest
    for i, other in enumerate(others):
        s.save(other, make_kv(SPEC, BLOCK, seed=i + 1)).wait()  # two more: the store is full
    s.save(toks, kv, session="x").wait()  # its first two blocks are on SSD; room for the third
    assert s.session_info("x")["tokens"] == 3 * BLOCK
    assert_kv_equal(s.restore(toks, session="x").kv, kv)
    assert s.lookup(others[0]) == 0 and s.lookup(others[1]) == BLOCK  # the next oldest went
    assert s.stats()["sessions_cut"] == 0
    assert s.stats()["resident_bytes"]["ssd"] <= s.config.ssd_bytes


def test_leased_blocks_outlive_their_last_reference_and_are_evicted_last(open_store):
    """A lease (``leases.py``: a save, in another process or this one, is about to name the
    block) keeps a block whose last reference goes as an unowned block, and eviction passes
    over leased unowned blocks while anything else can go, then takes them rather than refuse
    a write (counted). An expired lease keeps nothing. A lease of this process's own saves keeps
    blocks from this process's transactions too: a batch taken before the save does not know
    of it."""
    from tierkv.keys import as_tokens, block_keys, chain_seed
    from tierkv.leases import Leases

    s = _ssd_store(open_store, 4)
    other = Leases(s.path)  # another process's view of the table
    toks = {name: [i * 100 + t for t in range(BLOCK)] for i, name in enumerate("abcdefxy")}
    key = {name: block_keys(chain_seed(s.fingerprint, None), as_tokens(t), BLOCK, partial=False)[0]
           for name, t in toks.items()}
    kv = {name: make_kv(SPEC, BLOCK, seed=i) for i, name in enumerate(toks)}
    for name in "abcd":  # four unowned blocks, a the least recently used: the store is full
        s.save(toks[name], kv[name]).wait()
    owner = other.new_owner()
    other.grant([key["a"]], owner)
    s.save(toks["e"], kv["e"]).wait()  # room for one: not a (leased), b
    assert [s.lookup(toks[n]) for n in "abcde"] == [BLOCK, 0, BLOCK, BLOCK, BLOCK]
    assert s.stats()["leased_blocks_evicted"] == 0
    other.grant([key[n] for n in "acde"], owner)
    s.save(toks["f"], kv["f"]).wait()  # all leased: the least recently used goes all the same
    assert [s.lookup(toks[n]) for n in "acdef"] == [0, BLOCK, BLOCK, BLOCK, BLOCK]
    assert (s.stats()["blocks_kept_for_leases"], s.stats()["leased_blocks_evicted"]) == (0, 1)

    for name in "xy":
        s.save(toks[name], kv[name], session=name).wait()
        other.grant([key[name]], owner, seconds=60.0 if name == "x" else 0.0)  # y's: already over
        s.drop_session(name)
    s.flush()
    assert s.stats()["blocks_kept_for_leases"] == 1
    assert s.lookup(toks["x"]) == BLOCK and s.lookup(toks["y"]) == 0  # x kept unowned, y deleted
    assert_kv_equal(s.restore(toks["x"]).kv, kv["x"])
    assert s.stats()["resident_bytes"]["ssd"] <= s.config.ssd_bytes
    s.save(toks["y"], kv["y"], session="y").wait()
    s._ssd.leases.grant([key["y"]], s._ssd.leases.new_owner())  # a save of this process's own
    s.drop_session("y")
    s.flush()
    assert s.lookup(toks["y"]) == BLOCK and s.stats()["blocks_kept_for_leases"] == 2
    other.close()


@pytest.mark.parametrize("codec", ["raw", "zstd-planes"])
def test_values_in_reused_encode_buffers_are_stored_exactly(open_store, monkeypatch, codec):
    """Values encoded into the writer's reused buffers (here all of them: threshold 0; in use,
    those past 32 MiB) reach the store exactly. A buffer goes back only once LMDB has copied its
    value, and the next batches' encodes write into it: a burst of write-through saves, one op
    per batch, restores bit-exact after a reopen, and once the writer is idle it holds none."""
    monkeypatch.setattr(tierkv.writer, "REUSE_ABOVE", 0)
    monkeypatch.setattr(tierkv.writer, "WRITE_BATCH_BYTES", 1)  # a transaction per save
    s = open_store(SPEC, ssd_codec=codec, persist="write_through")
    kvs = {f"s{i}": make_kv(SPEC, 5 * BLOCK + i, seed=100 + i) for i in range(12)}
    toks = {sid: [i * 1000 + t for t in range(5 * BLOCK + i)] for i, sid in enumerate(kvs)}
    for sid, kv in kvs.items():
        s.save(toks[sid], kv, session=sid)
    s.flush()
    writes = s.stats()["ssd_writes"]
    assert writes["buffers_reused"] > 0
    assert writes["buffers_reused"] + writes["buffers_new"] >= 12 * 5
    deadline = time.monotonic() + 10
    while s._encode_buffers.free_bytes() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert s._encode_buffers.free_bytes() == 0  # idle: let go
    s.close()
    s2 = open_store(SPEC, ssd_codec=codec, persist="write_through")
    for sid, kv in kvs.items():
        got = s2.restore(toks[sid], session=sid)
        assert got.num_tokens == len(toks[sid])
        assert_kv_equal(got.kv, kv)
    assert s2.stats()["corrupt_blocks"] == 0


@pytest.mark.parametrize("reuse_above", [None, 0])
def test_write_through_commit_writes_a_block_whose_write_failed(open_store, monkeypatch, reuse_above):
    """Two saves in one write batch: x's brings six new blocks, more than the whole SSD budget,
    and y's names x's first block and brings nothing (x's op claimed its write). The batch
    fails on the full store and each op is retried alone: x's fails, y's commits, and its
    check finds the block with no value, held in memory. With write-through the commit writes
    it there: before, it trusted a write to come, but the write that claimed it had just
    failed, so y's acknowledged record named a block with no value until the block happened
    to be demoted (a process killed first left it behind). With ``reuse_above`` 0 every value
    is in a reused buffer, which the failed commit gave back: the retries encode them again."""
    if reuse_above is not None:
        monkeypatch.setattr(tierkv.writer, "REUSE_ABOVE", reuse_above)

    s = open_store(SPEC, ssd_codec="raw", persist="write_through", ssd_bytes=4 * BLK + 4 * 1024)
    toks, kv = list(range(6 * BLOCK)), make_kv(SPEC, 6 * BLOCK)
    with writer_held_off(s):  # so the writer waits with the saves queued behind it
        first = s.save([9000 + t for t in range(BLOCK)], make_kv(SPEC, BLOCK, seed=9), session="z")
        time.sleep(0.5)  # the writer has taken z's op and waits for the lock
        x = s.save(toks, kv, session="x")
        y = s.save(toks[:BLOCK], kv_slice(kv, BLOCK), session="y")
    first.wait()
    with pytest.raises(tierkv.StoreFullError):
        x.wait()
    y.wait()
    key = s._sessions["y"].keys[0]
    assert s._ssd.values_stored([key]) == {key}
    assert s.stats()["values_written_again"] == 1
    s.close()
    with _ssd_store(open_store, 4) as s2:  # memory gone: what y's record names is on SSD
        got = s2.restore(toks[:BLOCK], session="y")
        assert got.num_tokens == BLOCK
        assert_kv_equal(got.kv, kv_slice(kv, BLOCK))


def test_eviction_counts_restores_not_yet_written(open_store):
    """A restore marks its session used in memory; the mark reaches disk with the writer's next
    batch. That batch must apply it before it evicts: before, a session restored just before a
    save that needed room was evicted as the least recently used (its mark on disk still old),
    or as expired by a TTL that its last use had extended."""
    s = _ssd_store(open_store, 3)
    kv = make_kv(SPEC, BLOCK)
    toks = {name: [i * 100 + t for t in range(BLOCK)] for i, name in enumerate(["a", "b", "c", "t", "d", "e"])}
    for name in ("a", "b", "c"):
        s.save(toks[name], kv, session=name).wait()
    assert s.restore(toks["a"], session="a").num_tokens == BLOCK  # a is now the most recently used
    s.save(toks["d"], kv, session="d").wait()                    # needs a block: b, the least recently used
    assert s.lookup(toks["a"], session="a") == BLOCK
    with pytest.raises(tierkv.UnknownSessionError):
        s.session_info("b")
    s.drop_session("c")
    s.save(toks["t"], kv, session="t", ttl=0.5).wait()           # store: a, d, t
    time.sleep(0.4)
    assert s.restore(toks["t"], session="t").num_tokens == BLOCK  # used: now expires 0.5 s from here
    time.sleep(0.2)                                               # past its first expiry, not its second
    s.save(toks["e"], kv, session="e").wait()                     # needs a block: not t (a is the LRU)
    assert s.lookup(toks["t"], session="t") == BLOCK
    with pytest.raises(tierkv.UnknownSessionError):
        s.session_info("a")


def test_a_restore_reaches_disk_without_a_save(open_store, store_path):
    """The mark of use a restore leaves reaches disk within a few seconds even where the process
    only restores (other processes sharing the store evict by it; a restart after a crash counts
    TTLs from it), and at close. Before, it waited for the next save, and close dropped it."""
    s = open_store(SPEC, persist="write_through")
    s.save(range(BLOCK), make_kv(SPEC, BLOCK), session="r", ttl=3600).wait()
    saved = s._ssd.get_session("r").last_used
    time.sleep(0.05)
    s.restore(range(BLOCK), session="r")
    used = s.session_info("r")["last_used"]
    assert used > saved
    deadline = time.monotonic() + 10
    while s._ssd.get_session("r").last_used < used and time.monotonic() < deadline:
        time.sleep(0.2)
    assert s._ssd.get_session("r").last_used == used   # on disk, without any save
    time.sleep(0.05)
    s.restore(range(BLOCK), session="r")
    used = s.session_info("r")["last_used"]
    s.close()
    s = open_store(SPEC, persist="write_through")
    assert s.session_info("r")["last_used"] == used     # close wrote it


def test_store_full_of_pinned_raises_and_keeps_committed_data(open_store):
    s = _ssd_store(open_store, 2)
    kv = make_kv(SPEC, BLOCK)
    for i in range(2):
        s.save([i * 100 + t for t in range(BLOCK)], kv, session=f"p{i}", pinned=True).wait()
    h = s.save([500 + t for t in range(BLOCK)], kv, session="x")
    with pytest.raises(tierkv.StoreFullError, match="pinned"):
        h.wait()
    s.flush()  # the error was reported through the handle: flush has nothing left to raise
    for i in range(2):
        assert_kv_equal(s.restore([i * 100 + t for t in range(BLOCK)], session=f"p{i}").kv, kv)
    path = s.path
    s.close()
    s2 = open_store(SPEC, path=path, ssd_codec="raw", ssd_bytes=10 * BLK)
    assert s2.lookup([500 + t for t in range(BLOCK)], session="x") == 0
    assert s2.session_info("p0")["pinned"] is True


@pytest.mark.parametrize("full_policy", ["raise", "miss"])
def test_device_tier_over_a_full_store_recovers_once_room_is_made(open_store, full_policy):
    """No host tier: the device tier demotes straight to SSD. While the SSD is full of pinned
    sessions those writes fail. The blocks stayed MOVING (a device-to-host copy's state, which
    only that copy reset), so no demotion ever took them again, and every later save waited
    SAVE_WAIT_S; with full_policy="miss" the writer retried the failing write in a loop, holding
    a core. Found by a randomized run of every hook from three threads."""
    path = open_store(SPEC).path  # the pinned sessions that fill the SSD, written through
    s0 = open_store(SPEC, path=path + "x", ssd_codec="raw", persist="write_through", device_bytes=0, host_bytes=0,
                    ssd_bytes=4 * BLK + 4 * 1024)
    kv = {name: make_kv(SPEC, 2 * BLOCK, seed=i) for i, name in enumerate(["p0", "p1", "a", "b"])}
    toks = {name: [i * 1000 + t for t in range(2 * BLOCK)] for i, name in enumerate(["p0", "p1", "a", "b"])}
    for name in ("p0", "p1"):
        s0.save(toks[name], kv[name], session=name, pinned=True).wait()
    s0.close()
    s = open_store(SPEC, path=path + "x", ssd_codec="raw", persist="write_back", device_bytes=2 * BLK, host_bytes=0,
                   ssd_bytes=4 * BLK + 4 * 1024, full_policy=full_policy)
    for name in ("a", "b"):
        s.save(toks[name], kv[name], session=name)
    time.sleep(0.3)   # the writer tries to demote "a" to SSD, and cannot
    assert s.stats()["resident_bytes"]["device"] == 4 * BLK
    cpu0 = time.process_time()
    time.sleep(1.0)
    assert time.process_time() - cpu0 < 0.5, "the writer spins on a write that keeps failing"
    s.drop_session("p0")
    deadline = time.monotonic() + 10
    while s.stats()["resident_bytes"]["device"] > 2 * BLK and time.monotonic() < deadline:
        time.sleep(0.1)
    assert s.stats()["resident_bytes"]["device"] <= 2 * BLK
    assert tiers_of(s, "a") == {"ssd": 2} and tiers_of(s, "b") == {"memory:device": 2}
    if full_policy == "raise":  # the failed demotion is reported once, by the next flush
        with pytest.raises(tierkv.StoreFullError, match="pinned"):
            s.flush()
    s.flush()
    for name in ("p1", "a", "b"):
        assert_kv_equal(s.restore(toks[name], session=name).kv, kv[name])


def test_write_back_persists_on_close_and_write_through_on_save(open_store, store_path):
    for mode in ("write_back", "write_through"):
        path = store_path + mode
        kv = make_kv(SPEC, 3 * BLOCK)
        s = open_store(SPEC, path=path, persist=mode)
        s.save(range(3 * BLOCK), kv, session="s").wait()
        st = s.stats()["resident_bytes"]["ssd"]
        assert (st > 0) == (mode == "write_through")
        s.close()
        s = open_store(SPEC, path=path)
        assert_kv_equal(s.restore(range(3 * BLOCK), session="s").kv, kv)


def test_offload_pushes_a_session_to_ssd(open_store):
    s = open_store(SPEC)
    kv = make_kv(SPEC, 3 * BLOCK + 1)
    s.save(range(3 * BLOCK + 1), kv, session="s")
    s.offload("s")
    assert tiers_of(s, "s") == {"ssd": 4}
    assert s.stats()["resident_bytes"]["device"] == 0
    r = s.restore(range(3 * BLOCK + 1), session="s")
    assert r.sources == {"ssd": 4}
    assert_kv_equal(r.kv, kv)


def test_tenants_do_not_share_blocks(open_store):
    s = open_store(SPEC)
    kv = make_kv(SPEC, 2 * BLOCK)
    s.save(range(2 * BLOCK), kv, tenant="A")
    assert s.lookup(range(2 * BLOCK), tenant="A") == 2 * BLOCK
    assert s.lookup(range(2 * BLOCK), tenant="B") == 0
    assert s.lookup(range(2 * BLOCK)) == 0
    s.save(range(2 * BLOCK), kv, session="sa", tenant="A")
    assert s.lookup(range(2 * BLOCK), session="sa", tenant="B") == 0
    with pytest.raises(tierkv.ConfigError, match="tenant"):
        s.save(range(2 * BLOCK), kv, session="sa", tenant="B")


def test_session_lookup_fast_path_agrees_with_block_match(open_store):
    """lookup(session=...) counts without the generic matcher; both must say the same."""
    spec = small_spec()
    n = 6 * BLOCK + 5
    s = open_store(spec)
    s.save(range(n), make_kv(spec, n), session="s")
    s.flush()
    base = list(range(n))
    queries = [base, base[:3 * BLOCK], base[:3 * BLOCK + 7], base + [1, 2, 3],
               base[:2 * BLOCK + 4] + [99_999] + base[2 * BLOCK + 5:], [7] + base[1:], base[:1]]

    def generic(q):
        with s._lock:
            return sum(used for _, used in s._match(tierkv.keys.as_tokens(q), "s", None))

    for q in queries:
        assert s.lookup(q, session="s") == generic(q), q[:3]
    rec = s._sessions["s"]
    s._block(rec.keys[4]).corrupt = True   # as a failed checksum leaves it
    s._block(rec.keys[4]).tier = None
    for q in queries:
        assert s.lookup(q, session="s") == generic(q), q[:3]
    assert s.lookup(base, session="s") == 4 * BLOCK


def test_memoized_session_lookup_follows_every_availability_change(open_store):
    """lookup(session=...) remembers how many leading blocks are available until a block's
    availability moves; through saves, shared prefixes, drops, offloads, SSD evictions and a
    corrupt block, it must keep agreeing with the generic matcher."""
    import random

    spec = small_spec()
    blk = BLOCK * spec.bytes_per_token
    # SSD holds ~8 blocks: later saves evict older sessions
    s = open_store(spec, device_bytes=3 * blk, host_bytes=3 * blk, ssd_bytes=8 * blk + 8 * 1024,
                   ssd_codec="raw", persist="write_through")
    rng = random.Random(5)
    prefix = list(range(10_000, 10_000 + 2 * BLOCK))
    live: dict[str, list[int]] = {}

    def check():
        s.flush()
        for sid, toks in live.items():
            for q in (toks, toks[:BLOCK + 3], toks + [5]):
                with s._lock:  # one look: background threads cannot move blocks in between
                    fast = s.lookup(q, session=sid)  # an evicted session's is a content match
                    slow = sum(used for _, used in s._match(tierkv.keys.as_tokens(q), sid, None))
                assert fast == slow, (sid, len(q))

    for step in range(40):
        with s._lock:
            known = sorted(k for k in live if s._session(k) is not None)  # SSD eviction drops some
        op = rng.choice(["save", "save", "drop", "offload", "corrupt", "resave"])
        if op == "save" or not known:
            sid = f"s{step}"
            n = rng.randrange(1, 5) * BLOCK + rng.randrange(BLOCK)
            toks = (prefix if rng.random() < 0.5 else []) + list(range(step * 1000, step * 1000 + n))
            s.save(toks, make_kv(spec, len(toks), seed=step), session=sid).wait()
            live[sid] = toks
        elif op == "drop":
            sid = rng.choice(known)
            s.drop_session(sid)
            del live[sid]
        elif op == "offload":
            s.offload(rng.choice(known))
        elif op == "corrupt":
            sid = rng.choice(known)
            with s._lock:
                s.lookup(live[sid], session=sid)  # the memo is current: the flag alone must move it
                rec = s._session(sid)
                on_ssd = [s._blocks[k] for k in rec.keys if k in s._blocks and s._blocks[k].tier is None
                          and s._blocks[k].available]
                if on_ssd:
                    rng.choice(on_ssd).corrupt = True  # as a failed checksum on a restore leaves it
                    assert s.lookup(live[sid], session=sid) == sum(
                        used for _, used in s._match(tierkv.keys.as_tokens(live[sid]), sid, None))
        else:
            sid = rng.choice(known)
            s.save(live[sid], make_kv(spec, len(live[sid]), seed=step), session=sid).wait()
        check()
    assert s.stats()["evicted"]["ssd_sessions"] > 0  # the scenario did reach SSD eviction
    # quiet store: a second lookup answers from the memo, without walking the blocks again
    with s._lock:
        sid = max((k for k in live if s._session(k) is not None), key=lambda k: int(k[1:]))
    s.lookup(live[sid], session=sid)
    epoch = s._epoch.value
    with s._lock:
        memo = s._session(sid).available_at
    s.lookup(live[sid], session=sid)
    assert s._epoch.value == epoch and memo is not None and memo[0] == epoch


def test_cpu_device_tier_demotes_and_promotes_without_copying(open_store):
    """With the device tier on the CPU (no CUDA) and an unpinned host tier, both hold the same
    kind of memory: a demotion or a prefetch's promotion changes a block's tier, not its buffer."""
    s = open_store(SPEC, device="cpu", device_bytes=2 * BLK, host_bytes=8 * BLK, pin_host_memory=False)
    kv_a, kv_b = make_kv(SPEC, 2 * BLOCK, seed=1), make_kv(SPEC, 2 * BLOCK, seed=2)
    s.save(range(2 * BLOCK), kv_a, session="a")
    s.flush()
    with s._lock:
        before = [s._blocks[k].payload.data_ptr() for k in s._sessions["a"].keys]
    s.save(range(5000, 5000 + 2 * BLOCK), kv_b, session="b")  # pushes a down to the host tier
    s.flush()
    assert tiers_of(s, "a") == {"memory:host": 2}
    with s._lock:
        assert [s._blocks[k].payload.data_ptr() for k in s._sessions["a"].keys] == before
    s.prefetch(range(2 * BLOCK), session="a").wait()  # and back up (b's blocks go down)
    assert tiers_of(s, "a").get("memory:device", 0) >= 1
    with s._lock:
        assert [s._blocks[k].payload.data_ptr() for k in s._sessions["a"].keys] == before
    assert_kv_equal(s.restore(range(2 * BLOCK), session="a").kv, kv_a)
    assert_kv_equal(s.restore(range(5000, 5000 + 2 * BLOCK), session="b").kv, kv_b)
    moved = s.stats()["moved"]  # bytes copied between tiers: none were
    assert "device->host" not in moved and "host->device" not in moved, moved


@pytest.mark.parametrize("persist", ["write_back", "write_through"])
def test_saves_faster_than_the_disk_wait_instead_of_growing_memory(open_store, persist):
    """Backpressure: saves arriving faster than the writer moves blocks to SSD may run a memory
    tier over its budget by its slack (its budget again); beyond that, save waits for the writer.
    Before, nothing bounded it: an 8 MiB host tier held 619 MiB after 1,500 quick 1 MiB saves."""
    budget, n = 4 << 20, 4096                       # 1 MiB of KV per session
    s = open_store(SPEC, block_tokens=256, persist=persist, device_bytes=0, host_bytes=budget,
                   ssd_bytes="512MiB")
    kv = make_kv(SPEC, n)
    peak = 0
    for i in range(120):
        s.save([i] + list(range(1, n)), kv, session=f"s{i}")
        peak = max(peak, s.stats()["resident_bytes"]["host"])
    assert peak <= 2 * budget + n * SPEC.bytes_per_token
    assert s.stats()["backpressure"]["timeouts"] == 0
    s.flush()
    for i in (0, 60, 119):
        r = s.restore([i] + list(range(1, n)), session=f"s{i}")
        assert r.num_tokens == n
        assert_kv_equal(r.kv, kv)


def test_close_lets_go_of_the_memory_tiers_at_once(tmp_path):
    """A closed store held its tiers' payloads until the garbage collector next broke its
    reference cycles (its threads' callbacks): up to both budgets of host memory, and on a GPU
    device memory, for a process that reopens stores (bench/soak.py found 1.4 GB kept). close()
    now lets go of them; results a caller holds stay valid. The collector is off here, so only
    close() can free them."""
    import gc
    import weakref

    kv = make_kv(SPEC, 6 * BLOCK, seed=3)
    s = tierkv.TierKV(str(tmp_path / "s"), SPEC, block_tokens=BLOCK, device_bytes=3 * BLK, host_bytes=3 * BLK,
                      persist="write_back")
    gc.collect()
    gc.disable()
    try:
        s.save(list(range(6 * BLOCK)), kv, session="a")
        s.flush()
        held = s.restore(list(range(6 * BLOCK)), session="a")  # a result the caller keeps
        s.flush()
        payloads = [weakref.ref(b.payload) for t in s._tiers.values() for b in t._lru.values()]
        assert len(payloads) == 6 and all(r() is not None for r in payloads)
        s.close()
        assert [r() for r in payloads] == [None] * 6
        assert s._tiers["device"].used == s._tiers["host"].used == 0
    finally:
        gc.enable()
    assert_kv_equal(held.kv, kv)
    with tierkv.TierKV(str(tmp_path / "s"), SPEC, block_tokens=BLOCK) as s2:  # write-back wrote them at close
        r = s2.restore(list(range(6 * BLOCK)), session="a")
        assert r.num_tokens == 6 * BLOCK
        assert_kv_equal(r.kv, kv)


@pytest.mark.parametrize("how", ["close", "offload"])
def test_memory_only_blocks_beyond_the_ssd_budget_are_written_in_parts_that_fit(open_store, store_path, how):
    """With write-back, more KV than the SSD budget, held in memory alone, goes to SSD at close
    (or at ``offload()``). It went as one write: one LMDB transaction of everything (a server's
    host tier: gigabytes), and once that outgrew the budget it was refused whole
    (StoreFullError) and nothing was written, not even the sessions the budget holds. Now it
    goes in parts, each at most a quarter of the budget (and WRITE_BATCH_BYTES): each part
    evicts the least recently used sessions as any write does, and the newest sessions are on
    SSD after a reopen, exact."""
    n = 10
    kv = {i: make_kv(SPEC, 4 * BLOCK, seed=i) for i in range(n)}
    toks = {i: [i * 1000 + t for t in range(4 * BLOCK)] for i in range(n)}
    budget = 12 * BLK   # three sessions of four blocks, with room for the values' headers
    s = open_store(SPEC, persist="write_back", ssd_codec="raw", device_bytes=0, host_bytes=64 * n * BLK,
                   ssd_bytes=budget)
    for i in range(n):
        s.save(toks[i], kv[i], session=f"s{i}").wait()
    assert s.stats()["resident_bytes"]["ssd"] == 0  # every block in memory alone
    if how == "offload":
        s.offload()
        assert s.stats()["resident_bytes"]["host"] == 0
        assert s.stats()["ssd_writes"]["batches"] >= 14  # 40 blocks in parts of 3 (a quarter of the budget)
    s.close()
    from tierkv.verify import verify_store

    r = verify_store(store_path)  # every record whole: no block without its value, nothing stray
    assert (r["bad_blocks"], r["sessions_with_missing_blocks"], r["stray_index_entries"],
            r["blocks_without_values"], r["sessions_with_unwritten_blocks"]) == (0, [], 0, 0, {})
    s = open_store(SPEC, path=store_path, ssd_codec="raw", ssd_bytes=budget)
    assert 0 < s.stats()["resident_bytes"]["ssd"] <= budget
    for i in range(n - 2, n):  # the newest sessions are whole and exact
        r = s.restore(toks[i], session=f"s{i}")
        assert r.sources == {"ssd": 4}
        assert_kv_equal(r.kv, kv[i])
    for i in range(n - 4):   # the oldest went to make room for them
        assert s.lookup(toks[i], session=f"s{i}") < 4 * BLOCK


def test_a_save_lets_go_of_blocks_on_ssd_to_fit_the_host_tier(open_store):
    """A save that would take the host tier over its budget first lets go of the least recently
    used blocks there that are on SSD already (its own excepted), as the writer would between
    its batches: here the writer is stuck in a transaction, and the save still leaves the tier
    within its budget, its copy going into the places those blocks held. Before, the tier ran
    over (by up to its slack) until the writer's next batch ended, and the save's blocks came
    from new memory. Nothing is lost: the blocks let go restore from SSD."""

    s = open_store(SPEC, device_bytes=0, host_bytes=4 * BLK, persist="write_through")
    kv = {n: make_kv(SPEC, 2 * BLOCK, seed=i) for i, n in enumerate("ab")}
    toks = {n: [i * 1000 + t for t in range(2 * BLOCK)] for i, n in enumerate("ab")}
    for n in "ab":
        s.save(toks[n], kv[n], session=n).wait()
    s.flush()
    assert s.stats()["resident_bytes"]["host"] == 4 * BLK
    with writer_held_off(s):  # the writer cannot finish a batch, nor demote after it
        more = make_kv(SPEC, 4 * BLOCK, seed=7)
        kv_c = [tuple(torch.cat([x, y[:, 2 * BLOCK:]], 1) for x, y in zip(la, lm)) for la, lm in zip(kv["a"], more)]
        toks_c = toks["a"] + [5000 + t for t in range(2 * BLOCK)]
        c = s.save(toks_c, kv_c, session="c")  # a's two blocks and two new ones
        stats = s.stats()
        assert stats["resident_bytes"]["host"] == 4 * BLK  # within budget, writer or not
        assert stats["evicted"]["host_blocks"] == 2
        held_keys = set(s._tiers["host"]._lru)
        assert set(s._sessions["a"].keys) <= held_keys  # its own blocks stay
        assert not set(s._sessions["b"].keys) & held_keys  # b's, on SSD, went
    c.wait()
    s.flush()
    for n, t, want in (("b", toks["b"], kv["b"]), ("c", toks_c, kv_c), ("a", toks["a"], kv["a"])):
        got = s.restore(t, session=n)
        assert got.num_tokens == len(t)
        assert_kv_equal(got.kv, want)
