"""Crash safety (SIGKILL), multi-process sharing, NaN policy, and store repair."""

import contextlib
import os
import random
import signal
import subprocess
import sys
import threading
import time

import lmdb
import pytest
import torch

import tierkv
from conftest import BLOCK, assert_kv_equal, flip_byte, kv_slice, make_kv, small_spec
from helpers.saver import tokens_for

HERE = os.path.dirname(__file__)
SAVER = os.path.join(HERE, "helpers", "saver.py")
SPEC = small_spec()


def child_env():
    """The environment of a child process: this one's, with the tests' folder first on its path
    (kept, not replaced: where tierkv or its dependencies are found through PYTHONPATH too)."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [HERE, os.environ.get("PYTHONPATH")])))


def read_lines(proc, lines):
    for line in proc.stdout:
        lines.append(line.split())


def check_store(path, acked, started):
    """Every session whose save was acknowledged restores bit-exact to that version or to the one
    in flight when the process died; nothing else (no partial session) is visible."""
    checked = 0
    with tierkv.TierKV(path, SPEC, block_tokens=BLOCK, ssd_bytes="256MiB") as s:
        for sid, (vseed, n) in acked.items():
            candidates = [(vseed, n)] + [c for c in started.get(sid, []) if c != (vseed, n)]
            info = s.session_info(sid)
            for cs, cn in candidates:
                if info["tokens"] != cn:
                    continue
                r = s.restore(tokens_for(cs, cn), session=sid)
                if r.num_tokens == cn:
                    assert_kv_equal(r.kv, make_kv(SPEC, cn, seed=cs))
                    checked += 1
                    break
            else:
                raise AssertionError(f"session {sid} matches neither its acknowledged nor its in-flight version")
    return checked


# a process each, most of its second importing torch: 10 in the default suite, 200 under -m stress
@pytest.mark.parametrize("kills", [10, pytest.param(200, marks=pytest.mark.stress)])
def test_sigkill_loses_nothing_acknowledged(tmp_path, kills):
    path = str(tmp_path / "store")
    rng = random.Random(7)
    acked, started, total_checked = {}, {}, 0

    def spawn(k):   # imports while the process before it runs; opens the store when told to
        return subprocess.Popen([sys.executable, SAVER, path, str(k), "--wait"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True, env=child_env())

    waiting = spawn(0)
    for k in range(kills):
        proc = waiting
        proc.stdin.write("go\n")
        proc.stdin.close()
        waiting = spawn(k + 1)
        lines = []
        t = threading.Thread(target=read_lines, args=(proc, lines), daemon=True)
        t.start()
        deadline = time.monotonic() + 30
        while not any(x[0] == "ok" for x in lines) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.4))  # kill at a random moment after the first durable save
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        t.join(timeout=5)
        assert any(x[0] == "ok" for x in lines), "child never saved"
        for kind, sid, vseed, n in lines:
            if kind == "ok":
                acked[sid] = (int(vseed), int(n))
                started[sid] = []
            else:
                started.setdefault(sid, []).append((int(vseed), int(n)))
        total_checked = check_store(path, acked, started)
    waiting.stdin.close()   # the spare: told there is nothing to do, it exits without opening the store
    assert waiting.wait(timeout=60) == 0
    waiting.stdout.close()
    assert total_checked == len(acked) >= 5


def test_three_processes_share_one_store(tmp_path):
    path = str(tmp_path / "store")
    tierkv.TierKV(path, SPEC, block_tokens=BLOCK, ssd_bytes="256MiB").close()  # create it
    procs, outs = [], []
    for seed in range(3):
        p = subprocess.Popen([sys.executable, SAVER, path, str(seed), "--shared"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=child_env())
        lines = []
        t = threading.Thread(target=read_lines, args=(p, lines), daemon=True)
        t.start()
        procs.append((p, t))
        outs.append(lines)
    time.sleep(8)
    for p, _ in procs:
        assert p.poll() is None, p.stderr.read()[-2000:]
        p.send_signal(signal.SIGKILL)
        p.wait()
    acked, started = {}, {}
    for lines in outs:
        for kind, sid, vseed, n in lines:
            if kind == "ok":
                acked[sid] = (int(vseed), int(n))
            if kind in ("ok", "start"):
                started.setdefault(sid, []).append((int(vseed), int(n)))
    assert sum(1 for lines in outs for x in lines if x[0] == "ok") > 30
    assert sum(1 for lines in outs for x in lines if x[0] == "shared-restored") > 5
    assert sum(1 for lines in outs for x in lines if x[0] == "restored") > 5
    assert "shared" in acked
    check_store(path, acked, started)


OTHER_PROCESS = """
import os, sys
sys.path.insert(0, sys.argv[2])
import tierkv
from conftest import BLOCK, make_kv, small_spec
s = tierkv.TierKV(sys.argv[1], small_spec(), block_tokens=BLOCK)   # write-back, memory tiers
s.drop_session("x")             # no other session has its blocks: their values go
s.flush()
if sys.argv[3] == "saved-again":
    s.save(list(range(2 * BLOCK)), make_kv(small_spec(), 2 * BLOCK), session="x").wait()
    s.flush()                   # its record is on disk, its blocks' values only in this memory
os._exit(0)                     # gone before close() could write them back
"""


def _other_process(path, what):
    """Run OTHER_PROCESS on the store: "dropped" or "saved-again"."""
    r = subprocess.run([sys.executable, "-c", OTHER_PROCESS, path, HERE, what],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.parametrize("other", ["dropped", "saved-again"])
def test_a_value_another_process_removed_is_a_miss_not_corruption(tmp_path, other):
    """Another process sharing the store drops a session this one has read, and maybe saves it
    again with write-back (its blocks' records on disk, their values still in its memory). This
    process's records still say the values are on SSD: a restore finds none, a miss counted in
    ``vanished_blocks``, not corruption, and its stale records are let go, so lookups stop
    promising the blocks. Before, the second case counted each block corrupt (its record was
    there, its value not): with two processes sharing a store, ``bench/soak.py`` counted up to
    26 corrupt blocks in 30 s with nothing damaged, and lookups went on promising them."""
    path = str(tmp_path / "store")
    toks, kv = list(range(2 * BLOCK)), make_kv(SPEC, 2 * BLOCK)
    with _ssd_only(path, "64MiB") as s:
        s.save(toks, kv, session="x").wait()
        assert s.restore(toks, session="x").num_tokens == 2 * BLOCK  # its records: on SSD
        _other_process(path, other)
        assert s.lookup(toks, session="x") == 2 * BLOCK  # stale: nothing tells it yet
        assert s.restore(toks, session="x").num_tokens == 0
        st = s.stats()
        assert st["corrupt_blocks"] == 0
        assert st["vanished_blocks"] == 2  # both were matched and read
        assert s.lookup(toks, session="x") == 0  # its records of them are let go
        s.save(toks, kv, session="x").wait()  # and a save here writes it again
        got = s.restore(toks, session="x")
        assert got.num_tokens == 2 * BLOCK
        assert_kv_equal(got.kv, kv)
    with _ssd_only(path, "64MiB") as s:  # on disk, whole
        assert_kv_equal(s.restore(toks, session="x").kv, kv)
        assert s.stats()["corrupt_blocks"] == 0


@pytest.mark.parametrize("persist", ["write_through", "write_back"])
def test_a_save_copies_blocks_another_process_removed(tmp_path, persist):
    """This process holds a session's blocks as "on SSD"; another process drops the session, and
    their values go. A save of the session here copies those blocks again, so what it saved
    restores whole, here and after a restart. Before, the save trusted its stale record: it
    copied nothing, its record named blocks with no value, and the session restored nothing
    until the next save."""
    path = str(tmp_path / "store")
    toks, kv = list(range(3 * BLOCK)), make_kv(SPEC, 3 * BLOCK)
    with _ssd_only(path, "64MiB") as s:
        s.save(toks[:2 * BLOCK], kv_slice(kv, 2 * BLOCK), session="x").wait()
    with tierkv.TierKV(path, SPEC, block_tokens=BLOCK, persist=persist) as s:
        assert s.lookup(toks, session="x") == 2 * BLOCK  # its records: on SSD, not in memory
        _other_process(path, "dropped")
        s.save(toks, kv, session="x").wait()  # the next turn, one block longer
        got = s.restore(toks, session="x")
        assert got.num_tokens == 3 * BLOCK
        assert_kv_equal(got.kv, kv)
    with _ssd_only(path, "64MiB") as s:
        got = s.restore(toks, session="x")
        assert got.num_tokens == 3 * BLOCK
        assert_kv_equal(got.kv, kv)
        assert s.stats()["vanished_blocks"] == 0


@pytest.mark.parametrize("persist", ["write_through", "write_back"])
def test_a_save_writes_again_blocks_held_in_memory_whose_values_another_process_removed(tmp_path, persist):
    """This process holds session x's blocks in memory as "on SSD"; another process drops x, and
    their values go. A save here of x grown by two blocks (as session y) finds, as it looks
    after its leases, that the store has no values for them: they count as not on SSD from then
    on (``stale_blocks_rewritten``), so they are written again from memory. Meanwhile the writer
    is held up by another transaction (as when it is busy with a batch taken before), and
    demotion lets go of every host block it believes has a copy on SSD. Before, the save
    trusted its stale belief, demotion let the blocks go, and the commit, finding neither a
    value nor a copy, cut the record back before block 0: the save was lost (26 of the 27 cuts
    of a two-process bf16 soak in session 46, each with the save's lease intact). A commit of
    this process's own after the other's drop must not make the save skip the look (the skip is
    for a store no other process has written to since this one's memory last mirrored it)."""
    path = str(tmp_path / "store")
    toks, kv = list(range(6 * BLOCK)), make_kv(SPEC, 6 * BLOCK)
    with _ssd_only(path, "64MiB") as s:
        s.save(toks[:4 * BLOCK], kv_slice(kv, 4 * BLOCK), session="x").wait()
    with tierkv.TierKV(path, SPEC, block_tokens=BLOCK, persist=persist, device_bytes=0) as s:
        s.prefetch(toks[:4 * BLOCK], session="x").wait()
        held = [s._blocks[k] for k in s._sessions["x"].keys]
        assert all(b.on_ssd and b.tier == "host" for b in held)
        _other_process(path, "dropped")
        # a commit of this process's own after the other's: the store's last transaction is
        # this process's again, but its memory does not mirror the drop before it
        s.save(list(range(10**6, 10**6 + BLOCK)), kv_slice(kv, BLOCK), session="z").wait()
        with s._ssd.batch():  # the writer's next transaction waits for this one
            saved = s.save(toks, kv, session="y")
            with s._lock:  # demotion's rule for host blocks with a copy on SSD: let go, unwritten
                for b in held:
                    if b.on_ssd and b.tier is not None and not b.write_queued:
                        s._tiers[b.tier].remove(b)
        saved.wait()
        st = s.stats()
        assert (st["sessions_cut"], st["stale_blocks_rewritten"]) == (0, 4)
        assert s.session_info("y")["tokens"] == 6 * BLOCK
        assert_kv_equal(s.restore(toks, session="y").kv, kv)
    with _verified_and_reopened(path, toks, kv):
        pass


def test_a_save_looks_at_the_store_only_after_another_process_wrote_to_it(tmp_path):
    """The look of the test above costs a few ms for a 1M-token session. A process alone on its
    store skips it: while the store's last write transaction is its own (LMDB's txn id), its
    memory mirrors every deletion. Once another process has written, its saves look again."""
    path = str(tmp_path / "store")
    toks, kv = list(range(6 * BLOCK)), make_kv(SPEC, 6 * BLOCK)
    with tierkv.TierKV(path, SPEC, block_tokens=BLOCK, persist="write_through", device_bytes=0) as s:
        s.save(toks[:4 * BLOCK], kv_slice(kv, 4 * BLOCK), session="x").wait()
        looked, values_stored = [], s._ssd.values_stored
        s._ssd.values_stored = lambda keys: looked.append(len(keys)) or values_stored(keys)
        s.save(toks[:5 * BLOCK], kv_slice(kv, 5 * BLOCK), session="x").wait()
        assert looked == []  # its four blocks held in memory and on SSD: nobody else wrote
        _other_process(path, "dropped")
        s.save(toks, kv, session="x").wait()
        assert looked == [5] and s.stats()["stale_blocks_rewritten"] == 5
        assert_kv_equal(s.restore(toks, session="x").kv, kv)
    with _ssd_only(path, "64MiB") as s:  # written again: whole from the disk too
        got = s.restore(toks, session="x")
        assert got.num_tokens == 6 * BLOCK
        assert_kv_equal(got.kv, kv)


HOLDER = """
import sys, time
sys.path.insert(0, sys.argv[2])
import tierkv
from conftest import BLOCK, small_spec
with tierkv.TierKV(sys.argv[1], small_spec(), block_tokens=BLOCK, persist="write_through") as s:
    with s._ssd.batch() as batch:   # the store's write lock: the other process's commits wait
        if sys.argv[3] == "drop first":
            batch.drop_session("x")  # blocks 2 and 3 were x's alone: their values go
        print("holding", flush=True)
        sys.stdin.readline()
        if sys.argv[3] in ("push out later", "take slot later"):  # the save's leases on 2 and 3 lost
            leases, keys = batch.store.leases, list(batch._get_session("x").keys[2:4])
            if sys.argv[3] == "take slot later":  # other blocks' leases take their slots
                from tierkv.leases import LEASE_SLOTS
                keys = [((int.from_bytes(k[:8], "little") + LEASE_SLOTS) % 2**64).to_bytes(8, "little") + k[8:]
                        for k in keys]
            owners = [leases.new_owner() for _ in range(2)]  # two later saves (committed)
            for o in owners:
                leases.grant(keys, o)
            for o in owners:
                leases.release(keys, o)
        if sys.argv[3] != "drop first":
            batch.drop_session("x")
        if sys.argv[3] == "evict later":  # room for one more byte: the least recently used goes
            batch.make_room(batch.store.ssd_bytes - batch.ssd_used + 1, time.time(), set())
        print("kept", batch.kept_for_leases, "evicted", batch.leased_evicted, flush=True)
"""


def _save_racing_a_drop(path, toks, kv, held, order):
    """Sessions "base" (blocks 0-1, pinned) and "x" (0-3) saved here, then another process
    (HOLDER) takes the store's write lock and drops x: ``order`` "drop first", before this
    process saves "y" (0-5); "drop later", after; "evict later", after, and then it makes room
    for one more byte, which takes a block the save leased (nothing else can go); "push out
    later" and "take slot later", after two saves of its own there have leased blocks 2 and 3
    (or blocks whose leases share their slots) and committed, which loses the save's leases on
    them. It commits once the save has been made. Returns the store, the save's handle and the other process's
    last words (how many blocks it kept for leases, how many leased ones it evicted)."""
    memory = {} if held == "in memory too" else {"host_bytes": 0, "device_bytes": 0}
    s = tierkv.TierKV(path, SPEC, block_tokens=BLOCK, persist="write_through", ssd_bytes="64MiB", **memory)
    try:
        s.save(toks[:2 * BLOCK], kv_slice(kv, 2 * BLOCK), session="base", pinned=True).wait()
        s.save(toks[:4 * BLOCK], kv_slice(kv, 4 * BLOCK), session="x").wait()
        p = subprocess.Popen([sys.executable, "-c", HOLDER, path, HERE, order], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert p.stdout.readline().strip() == "holding", p.stderr.read()[-2000:]
            saved = s.save(toks, kv, session="y")  # blocks 0-3 found on SSD (and leased), 4 and 5 copied
        finally:
            out, err = p.communicate("go\n", timeout=120)
        assert p.returncode == 0, err[-2000:]
    except BaseException:
        s.close()
        raise
    return s, saved, out.split()[-4:]


@contextlib.contextmanager
def _verified_and_reopened(path, toks, kv):
    """``verify`` finds no block without a value in the closed store, and the store, opened
    again (SSD only), restores session y whole: yields it."""
    from tierkv.verify import verify_store

    r = verify_store(path)
    assert (r["blocks_without_values"], r["sessions_with_unwritten_blocks"]) == (0, {})
    with _ssd_only(path, "64MiB") as s:
        assert_kv_equal(s.restore(toks, session="y").kv, kv)
        yield s


@pytest.mark.parametrize("held", ["on SSD only", "in memory too"])
def test_a_save_copies_the_blocks_a_transaction_is_deleting(tmp_path, held):
    """A save here finds blocks 2 and 3 on SSD while another process's transaction, begun
    before, has decided to delete them and will commit after the save looks. That transaction
    marked them (``leases.py``) before it looked at their leases, so the save's grant finds the
    marks and does not trust the values: it copies the blocks (or, held in memory, writes them
    again) and commits whole. Before the marks, the record was cut back before block 2 at its
    commit (1.2 % of saves in two-process soaks with leases alone, ``bench/soak.py``); before
    the commit's check, it named two blocks with no value."""
    path = str(tmp_path / "store")
    toks, kv = list(range(6 * BLOCK)), make_kv(SPEC, 6 * BLOCK)
    s, saved, said = _save_racing_a_drop(path, toks, kv, held, "drop first")
    try:
        assert said == ["kept", "0", "evicted", "0"]  # its drop came before the save's lease
        saved.wait()
        assert s.session_info("y")["tokens"] == 6 * BLOCK
        st = s.stats()
        assert (st["sessions_cut"], st["values_written_again"], st["blocks_copied_being_deleted"]) == (0, 0, 2)
        assert (st["leases_displaced"], st["marks_shared"]) == (0, 0)  # marks of these keys alone
        assert_kv_equal(s.restore(toks, session="y").kv, kv)
    finally:
        s.close()
    with _verified_and_reopened(path, toks, kv):
        pass


@pytest.mark.parametrize("order", ["push out later", "take slot later"])
def test_a_save_whose_leases_were_lost_is_cut_back_and_says_how(tmp_path, order):
    """Leases are hints: the save here leases blocks 2 and 3 and trusts their values, then two
    later saves in the other process lease the same blocks (a slot keeps a key's last two
    owners: the save's is pushed out) or other blocks whose leases share their slots (the slot
    is taken), and commit. The other process's drop of x then finds no lease on them and
    deletes them. The save's commit finds block 2 without a value and cuts its record back
    before it, and counts how its lease stood (``stats()["cuts_by_lease"]``), so a soak can
    tell lost leases from evictions that took leased blocks."""
    path = str(tmp_path / "store")
    toks, kv = list(range(6 * BLOCK)), make_kv(SPEC, 6 * BLOCK)
    s, saved, said = _save_racing_a_drop(path, toks, kv, "on SSD only", order)
    try:
        assert said == ["kept", "0", "evicted", "0"]  # no lease left to keep them for
        saved.wait()
        st = s.stats()
        assert s.session_info("y")["tokens"] == 2 * BLOCK
        assert st["sessions_cut"] == 1
        how = "pushed_out" if order == "push out later" else "taken"
        assert st["cuts_by_lease"] == {"held": 0, "pushed_out": 0, "taken": 0, "ran_out": 0} | {how: 1}
        assert_kv_equal(s.restore(toks, session="y").kv, kv_slice(kv, 2 * BLOCK))
    finally:
        s.close()


def test_marks_on_blocks_a_transaction_keeps_stay_until_its_commit(tmp_path):
    """A transaction marks every block it may delete before it looks at the block's lease, and
    keeps those a save has leased. The marks on the kept blocks guard no deletion of this
    transaction's, yet they stay until after its commit, with the rest: saves meanwhile copy
    those blocks rather than trust them. Taking them off before the commit (session 45) cut the
    copies in bf16 two-process soaks from 0.13-0.16 to 0.04-0.06 blocks a save, but those two
    runs cut back the most saves of any bf16 run with marks (0.12 and 0.13 %, against
    0.05-0.11 %): a cut costs a recompute, a copy a block written again."""
    from tierkv.leases import Leases

    path = str(tmp_path / "store")
    toks, kv = list(range(4 * BLOCK)), make_kv(SPEC, 4 * BLOCK)
    with tierkv.TierKV(path, SPEC, block_tokens=BLOCK, persist="write_through", ssd_bytes="64MiB",
                       host_bytes=0, device_bytes=0) as s:
        s.save(toks, kv, session="x").wait()
        s.flush()
        keys = list(s._sessions["x"].keys)
        other = Leases(path)  # another process's save, about to name blocks 2 and 3
        try:
            other.grant(keys[2:], other.new_owner())
            store, calls = s._ssd, []
            undoom = store.leases.undoom

            def recorded(marked):
                with store.reader() as txn:  # block 0 gone: the transaction has committed
                    calls.append((set(marked), txn.get(keys[0], db=store.blocks) is not None))
                undoom(marked)

            store.leases.undoom = recorded
            s.drop_session("x")
            s.flush()
            store.leases.undoom = undoom
            assert calls == [(set(keys), False)]
            assert other.grant(keys, other.new_owner()) == set()
            assert s.stats()["blocks_kept_for_leases"] == 2
        finally:
            other.close()


@pytest.mark.parametrize("held", ["on SSD only", "in memory too"])
def test_a_value_removed_between_a_save_and_its_commit(tmp_path, held):
    """A save here trusts the value of a block on SSD (it saw it a moment ago, unmarked) and
    does not copy it; another process's transaction then needs room with nothing left to take
    but the blocks the save leased, takes the oldest (block 2: a lease is a hint, never a reason
    to refuse a write), and commits after the look. The commit, which runs in the store's write
    transaction, checks each block the record newly names: where this process holds the block
    in memory, it writes the value again; where it holds no copy, it cuts the record back before
    the block, so the session's record never names KV that is not there. Before that check, the
    record named a block with no value: the session restored shorter than it said, ``verify``
    reported a block without a value, and, with the block in memory, the hole outlived this
    process."""
    from tierkv.verify import verify_store

    path = str(tmp_path / "store")
    toks, kv = list(range(6 * BLOCK)), make_kv(SPEC, 6 * BLOCK)
    s, saved, said = _save_racing_a_drop(path, toks, kv, held, "evict later")
    try:
        assert said == ["kept", "2", "evicted", "1"]  # 2 and 3 kept for the lease, then 2 taken
        saved.wait()
        if held == "in memory too":  # written again from memory: whole
            assert s.session_info("y")["tokens"] == 6 * BLOCK
            assert (s.stats()["sessions_cut"], s.stats()["values_written_again"]) == (0, 1)
        else:  # cut back before block 2
            assert s.session_info("y")["tokens"] == 2 * BLOCK
            assert s.lookup(toks, session="y") == 2 * BLOCK
            got = s.restore(toks, session="y")
            assert got.num_tokens == 2 * BLOCK
            assert_kv_equal(got.kv, kv_slice(kv, 2 * BLOCK))
            assert s.stats()["sessions_cut"] == 1
            assert s.stats()["vanished_blocks"] == 0  # no restore was promised them
            # the save's lease on block 2 was still there: eviction took it all the same
            assert s.stats()["cuts_by_lease"] == {"held": 1, "pushed_out": 0, "taken": 0, "ran_out": 0}
    finally:
        s.close()
    r = verify_store(path)
    assert (r["blocks_without_values"], r["sessions_with_unwritten_blocks"]) == (0, {})
    keep = 6 if held == "in memory too" else 2
    with _ssd_only(path, "64MiB") as s:
        got = s.restore(toks, session="y")
        assert got.num_tokens == keep * BLOCK
        assert_kv_equal(got.kv, kv_slice(kv, keep * BLOCK))
        s.save(toks, kv, session="y").wait()  # and the session grows again from there
        assert_kv_equal(s.restore(toks, session="y").kv, kv)


@pytest.mark.parametrize("held", ["on SSD only", "in memory too"])
def test_blocks_a_save_leased_outlive_another_processes_drop(tmp_path, held):
    """The same race, with the other process's drop made after the save here looked: the save
    leased the blocks it trusted (``leases.py``) before looking, and the other process's
    transaction, finding the lease, keeps blocks 2 and 3 as unowned blocks instead of deleting
    them when their last reference goes. The save then commits whole, with no value written
    again and no cut; the lease ends with the commit, so a later drop deletes the blocks."""
    path = str(tmp_path / "store")
    toks, kv = list(range(6 * BLOCK)), make_kv(SPEC, 6 * BLOCK)
    s, saved, said = _save_racing_a_drop(path, toks, kv, held, "drop later")
    try:
        assert said == ["kept", "2", "evicted", "0"]  # leased: 2 and 3 kept (0 and 1 are base's too)
        saved.wait()
        assert s.session_info("y")["tokens"] == 6 * BLOCK
        st = s.stats()
        assert (st["sessions_cut"], st["values_written_again"], st["blocks_copied_being_deleted"]) == (0, 0, 0)
        assert_kv_equal(s.restore(toks, session="y").kv, kv)
        from tierkv.leases import Leases

        other = Leases(path)  # another process's view: the commit took the save's leases off
        assert not any(other.held(k) for k in s._sessions["y"].keys)
        other.close()
    finally:
        s.close()
    with _verified_and_reopened(path, toks, kv) as s:
        used = s.stats()["resident_bytes"]["ssd"]
        s.drop_session("y")
        s.flush()
        assert s.stats()["resident_bytes"]["ssd"] < used  # y's own blocks 2-5 went with it
        assert s.lookup(toks) == 2 * BLOCK  # base's remain
        assert s.stats()["blocks_kept_for_leases"] == 0


@pytest.mark.parametrize("order", ["drop first", "drop later"])
def test_a_save_and_a_transaction_of_its_own_process(tmp_path, order):
    """The same two races inside one process: a write transaction of this process (a thread
    holding the store's write lock, as the writer does with a batch taken before the save
    arrived) drops x before or after the save of y looks. Marks and leases work between the two
    as between two processes (two open files, two locks; a save's lease is its own, not the
    process's): dropped first, blocks 2 and 3 are copied; dropped later, they are kept for the
    lease. Before, this process's transactions passed over its own leases, and the save was cut
    back in both orders (a two-process soak, logged, found such cuts from a process's own
    writer)."""
    import threading

    path = str(tmp_path / "store")
    toks, kv = list(range(6 * BLOCK)), make_kv(SPEC, 6 * BLOCK)
    with tierkv.TierKV(path, SPEC, block_tokens=BLOCK, persist="write_through", ssd_bytes="64MiB",
                       host_bytes=0, device_bytes=0) as s:
        s.save(toks[:2 * BLOCK], kv_slice(kv, 2 * BLOCK), session="base", pinned=True).wait()
        s.save(toks[:4 * BLOCK], kv_slice(kv, 4 * BLOCK), session="x").wait()
        holding, go, kept = threading.Event(), threading.Event(), []

        def hold():
            with s._ssd.batch() as batch:
                if order == "drop first":
                    batch.drop_session("x")
                holding.set()
                go.wait(60)
                if order == "drop later":
                    batch.drop_session("x")
                kept.append(batch.kept_for_leases)

        t = threading.Thread(target=hold)
        t.start()
        try:
            assert holding.wait(60)
            saved = s.save(toks, kv, session="y")
        finally:
            go.set()
            t.join(60)
        saved.wait()
        st = s.stats()
        assert kept == [0 if order == "drop first" else 2]
        assert (st["sessions_cut"], st["blocks_copied_being_deleted"]) == (0, 2 if order == "drop first" else 0)
        assert s.session_info("y")["tokens"] == 6 * BLOCK
        assert_kv_equal(s.restore(toks, session="y").kv, kv)
    with _ssd_only(path, "64MiB") as s:
        assert_kv_equal(s.restore(toks, session="y").kv, kv)


EXTENDER = """
import sys
sys.path.insert(0, sys.argv[2])
import tierkv
from conftest import BLOCK, make_kv, small_spec
with tierkv.TierKV(sys.argv[1], small_spec(), block_tokens=BLOCK, persist="write_through") as s:
    s.save(list(range(4 * BLOCK)), make_kv(small_spec(), 4 * BLOCK), session="x",
           pinned=sys.argv[3] == "pinned").wait()
"""


@pytest.mark.parametrize("pinned", ["pinned", "unpinned"])
def test_a_session_another_process_saved_further_is_restored_whole(tmp_path, pinned):
    """Turn 1 of a session ran in this process, turn 2 in another sharing the store (no sticky
    routing), and turn 3 lands here again: asked for more tokens than its own copy of the
    record holds, this process reads the stored record again and restores all that turn 2
    saved. Before, it restored only the prefix its own copy knew (half, here), though a lookup
    by content alone found all of it."""
    path = str(tmp_path / "store")
    toks, kv = list(range(4 * BLOCK)), make_kv(SPEC, 4 * BLOCK)
    with tierkv.TierKV(path, SPEC, block_tokens=BLOCK, persist="write_through") as s:
        s.save(toks[:2 * BLOCK], kv_slice(kv, 2 * BLOCK), session="x", pinned=pinned == "pinned").wait()
        assert s.lookup(toks, session="x") == 2 * BLOCK
        r = subprocess.run([sys.executable, "-c", EXTENDER, path, HERE, pinned],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        assert s.lookup(toks + [9999], session="x") == 4 * BLOCK
        got = s.restore(toks, session="x")
        assert got.num_tokens == 4 * BLOCK
        assert_kv_equal(got.kv, kv)
        assert s.session_info("x")["tokens"] == 4 * BLOCK
        # every block of it carries the one pin of its one pinned record, no more and no less
        assert sorted(b.pins for b in s._blocks.values()) == [int(pinned == "pinned")] * 4
        # its own copy, once fresh, serves: a shorter ask does not read the record again
        assert s.lookup(toks[:3 * BLOCK], session="x") == 3 * BLOCK
        assert s.stats()["sessions_reread"] == 1


BRANCHER = """
import sys
sys.path.insert(0, sys.argv[2])
import tierkv
from conftest import BLOCK, small_spec
from test_reliability import branch
toks, kv = branch(int(sys.argv[3]))
with tierkv.TierKV(sys.argv[1], small_spec(), block_tokens=BLOCK, persist="write_through") as s:
    s.save(toks, kv, session="x", pinned=sys.argv[4] == "pinned").wait()
"""


def branch(n: int):
    """Another branch of session "x": its first block's tokens and KV, then tokens of its own."""
    ours, theirs = kv_slice(make_kv(SPEC, 4 * BLOCK), BLOCK), make_kv(SPEC, n, seed=1)
    kv = [tuple(torch.cat([a, b.narrow(1, BLOCK, n - BLOCK)], 1) for a, b in zip(x, y))
          for x, y in zip(ours, theirs)]
    return list(range(BLOCK)) + list(range(5000, 5000 + n - BLOCK)), kv


@pytest.mark.parametrize("length,pinned", [("same", "pinned"), ("shorter", "unpinned")])
def test_a_session_another_process_saved_down_another_branch_is_restored(tmp_path, length, pinned):
    """This process saved four blocks of session "x"; another process sharing the store then
    saved "x" down another branch (a regenerated answer after the first block), as long as this
    process's copy of the record or shorter, and the next turn of that branch lands here. Its
    tokens diverge from this process's copy after one block: the stored record is asked, holds
    more of them, and is read again, so the whole branch is restored. Before, only a record
    longer than this process's copy was read again, and this restored one block."""
    path = str(tmp_path / "store")
    toks, kv = list(range(4 * BLOCK)), make_kv(SPEC, 4 * BLOCK)
    n = 4 * BLOCK if length == "same" else 3 * BLOCK
    other, other_kv = branch(n)
    with tierkv.TierKV(path, SPEC, block_tokens=BLOCK, persist="write_through") as s:
        s.save(toks, kv, session="x", pinned=pinned == "pinned").wait()
        assert s.lookup(other, session="x") == BLOCK
        r = subprocess.run([sys.executable, "-c", BRANCHER, path, HERE, str(n), pinned],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        assert s.lookup(other + [9999], session="x") == n
        got = s.restore(other, session="x")
        assert got.num_tokens == n
        assert_kv_equal(got.kv, other_kv)
        assert s.session_info("x")["tokens"] == n
        # the new record's blocks carry its one pin; the old branch's blocks none any more
        held = set(s._sessions["x"].keys)
        assert len(held) == n // BLOCK
        assert all(b.pins == (int(pinned == "pinned") if k in held else 0) for k, b in s._blocks.items())
        # this process's copy is now the stored record: asking for it again compares, reads nothing
        assert s.lookup(other + [9999], session="x") == n
        assert s.stats()["sessions_reread"] == 1


def strays(s) -> list:
    """The eviction index entries an open store's bookkeeping does not account for."""
    with s._ssd.reader() as txn:
        return s._ssd.stray_index_entries(txn)


def inject_strays(path: str, held: bytes) -> None:
    """The oldest entries of the eviction indexes, none of them accounted for: an LRU entry of a
    session with no record, of a block with no bookkeeping and of block ``held`` (referenced),
    and an expiry entry, due, of session "keep" (pinned, no TTL)."""
    from tierkv.records import lru_key, ns
    env = lmdb.open(path, subdir=True, max_dbs=8)
    lru, expiry = env.open_db(b"lru"), env.open_db(b"expiry")
    with env.begin(write=True) as txn:
        txn.put(lru_key(b"s", b"gone", 1.0), b"", db=lru)
        txn.put(lru_key(b"b", b"\x07" * len(held), 2.0), b"", db=lru)
        txn.put(lru_key(b"b", held, 3.0), b"", db=lru)
        txn.put(ns(time.time() - 60) + b"keep", b"", db=expiry)
    env.close()


def test_a_use_while_the_writer_stores_a_record_leaves_its_index_true(tmp_path, monkeypatch):
    """The writer stores the engine's own copy of a session record, whose ``last_used`` engine
    threads move on every use without the writer's lock. A use landing between the writer's
    encoding of the record and its LRU and expiry entries (made to land there here) left those
    entries at another moment than the record: dropping the session left them behind, and
    eviction then picked the LRU one forever, holding LMDB's write lock (a two-process soak,
    ``bench/soak.py``, hung after six minutes with every process waiting on it). The writer now
    works on a snapshot of the record."""
    from tierkv.batch import Batch
    path = str(tmp_path / "store")
    with _ssd_only(path, "64MiB") as s:
        real = Batch._index_session

        def used_meanwhile(batch, rec):
            mine = s._sessions.get(rec.session)
            if mine is not None:
                mine.last_used += 5.0  # a restore on another thread, as the writer runs
            real(batch, rec)

        monkeypatch.setattr(Batch, "_index_session", used_meanwhile)
        s.save(range(2 * BLOCK), make_kv(SPEC, 2 * BLOCK), session="x", ttl=3600).wait()
        monkeypatch.undo()
        assert strays(s) == []
        s.drop_session("x")
        s.flush()
        assert strays(s) == []


EVICTOR = """
import sys
sys.path.insert(0, sys.argv[2])
import tierkv
from conftest import BLOCK, make_kv, small_spec
with tierkv.TierKV(sys.argv[1], small_spec(), block_tokens=BLOCK, persist="write_through",
                   ssd_bytes="128KiB", host_bytes=0, device_bytes=0) as s:
    for i in range(16):   # 16 KiB each: the budget is passed, and eviction runs again and again
        s.save(range(1000 * (i + 1), 1000 * (i + 1) + 4 * BLOCK), make_kv(small_spec(), 4 * BLOCK),
               session=f"new{i}").wait()
"""


def test_eviction_ends_and_keeps_sessions_where_the_index_has_stray_entries(tmp_path):
    """A store written before the fix above may hold eviction index entries its bookkeeping does
    not account for. Eviction lets go of each such entry and evicts nothing for it: it ends (an
    LRU entry naming a session record that is gone made it pick that entry forever), leaves a
    referenced block alone (one with a stray LRU entry was deleted, its sessions restoring
    shorter), and keeps a session whose stray expiry entry is due (it was dropped: here a pinned
    session with no TTL)."""
    path, keep, kv = _store_with_strays(tmp_path)
    r = subprocess.run([sys.executable, "-c", EVICTOR, path, HERE], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    with _ssd_only(path, "128KiB") as s:
        got = s.restore(keep, session="keep")
        assert got.num_tokens == 4 * BLOCK
        assert_kv_equal(got.kv, kv)
        assert s.restore(range(16000, 16000 + 4 * BLOCK), session="new15").num_tokens == 4 * BLOCK
        assert strays(s) == []


def _store_with_strays(tmp_path):
    """A store holding session "keep" (pinned) and another one, and four stray index entries."""
    from tierkv.keys import as_tokens, block_keys, chain_seed
    path = str(tmp_path / "store")
    keep, kv = list(range(4 * BLOCK)), make_kv(SPEC, 4 * BLOCK)
    with _ssd_only(path, "128KiB") as s:
        s.save(keep, kv, session="keep", pinned=True).wait()
        s.save(range(500, 500 + 2 * BLOCK), kv_slice(kv, 2 * BLOCK), session="other").wait()
        held = block_keys(chain_seed(s.fingerprint, None), as_tokens(keep), BLOCK)
    inject_strays(path, held[1])
    with _ssd_only(path, "128KiB") as s:
        assert len(strays(s)) == 4
    return path, keep, kv


def test_verify_reports_and_lets_go_of_stray_index_entries(tmp_path, capsys):
    """``tierkv verify`` counts the index entries that name nothing to evict (a store written
    before the writer race's fix may hold some), and ``--repair`` lets go of them, keeping every
    session."""
    from tierkv.cli import main
    path, keep, kv = _store_with_strays(tmp_path)
    capsys.readouterr()
    assert main(["verify", path]) == 1
    assert "4 stray eviction index entries" in capsys.readouterr().out
    assert main(["verify", path, "--repair"]) == 0
    assert main(["verify", path]) == 0
    with _ssd_only(path, "128KiB") as s:
        assert strays(s) == []
        assert_kv_equal(s.restore(keep, session="keep").kv, kv)
        assert s.restore(range(500, 500 + 2 * BLOCK), session="other").num_tokens == 2 * BLOCK


WRITE_BACK = """
import os, sys
sys.path.insert(0, sys.argv[2])
import tierkv
from conftest import BLOCK, kv_slice, make_kv, small_spec
toks, kv = list(range(6 * BLOCK)), make_kv(small_spec(), 6 * BLOCK)
s = tierkv.TierKV(sys.argv[1], small_spec(), block_tokens=BLOCK, persist="write_back")
n = int(sys.argv[3])
s.save(toks[:n * BLOCK], kv_slice(kv, n * BLOCK), session="x")
s.save(range(1000 * n, 1000 * n + BLOCK), make_kv(small_spec(), BLOCK, seed=n), session="y")
s.flush()  # the records are on disk; the new blocks' values are in this process's memory only
print("saved", flush=True)
if sys.stdin.readline().strip() == "close":
    s.close()  # write-back writes them now
else:
    os._exit(0)  # stops before writing them back, as a killed process does
"""


def test_verify_tells_live_write_back_from_write_back_left_behind(tmp_path, capsys):
    """A block record with no value is, while another process holds the store open with
    write-back, a value still in that process's memory: ``verify --repair`` leaves it, and the
    session restores whole once that process writes it back. Where no process holds the store
    open, it was left by one that stopped before writing back: verify counts it as a fault, and
    ``--repair`` cuts each session using one back to the blocks before it (a session whose first
    block it is is dropped), so a session's record no longer names KV that will never come."""
    from tierkv.cli import main
    from tierkv.verify import verify_store

    path = str(tmp_path / "store")
    toks, kv = list(range(6 * BLOCK)), make_kv(SPEC, 6 * BLOCK)
    with tierkv.TierKV(path, SPEC, block_tokens=BLOCK, persist="write_through") as s:
        s.save(toks[:2 * BLOCK], kv_slice(kv, 2 * BLOCK), session="x").wait()

    def writer(n):
        p = subprocess.Popen([sys.executable, "-c", WRITE_BACK, path, HERE, str(n)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "saved", p.stderr.read()[-2000:]
        return p

    p = writer(4)  # blocks 2 and 3 of x, and y's block, unwritten
    try:
        r = verify_store(path, repair=True)
        assert r["open_elsewhere"] is True and r["blocks_without_values"] == 3
        assert r["sessions_with_unwritten_blocks"] == {"x": 2 * BLOCK, "y": 0}
        assert not r["unwritten_left_behind"] and not r["repaired"]
        capsys.readouterr()
        assert main(["verify", path]) == 0
        assert "another process has the store open" in capsys.readouterr().out
    finally:
        p.communicate("close\n", timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    with tierkv.TierKV(path, SPEC, block_tokens=BLOCK) as s:
        assert_kv_equal(s.restore(toks[:4 * BLOCK], session="x").kv, kv_slice(kv, 4 * BLOCK))
    r = verify_store(path)
    assert (r["blocks_without_values"], r["open_elsewhere"]) == (0, False)

    p = writer(6)  # blocks 4 and 5 of x, and y's new block, left unwritten
    p.communicate("die\n", timeout=120)
    capsys.readouterr()
    assert main(["verify", path]) == 1
    assert "stopped before writing them back" in capsys.readouterr().out
    r = verify_store(path, repair=True)
    assert r["unwritten_left_behind"] and r["repaired"]
    assert r["sessions_with_unwritten_blocks"] == {"x": 4 * BLOCK, "y": 0}
    assert main(["verify", path]) == 0
    r = verify_store(path)
    assert (r["blocks_without_values"], r["sessions_with_unwritten_blocks"]) == (0, {})
    with tierkv.TierKV(path, SPEC, block_tokens=BLOCK) as s:
        assert s.session_info("x")["tokens"] == 4 * BLOCK
        assert s.lookup(toks, session="x") == 4 * BLOCK
        got = s.restore(toks, session="x")
        assert got.num_tokens == 4 * BLOCK
        assert_kv_equal(got.kv, kv_slice(kv, 4 * BLOCK))
        with pytest.raises(tierkv.UnknownSessionError):
            s.session_info("y")
        s.save(toks, kv, session="x").wait()  # and the session grows again from there
        assert_kv_equal(s.restore(toks, session="x").kv, kv)


OPENER = """
import sys
sys.path.insert(0, sys.argv[2])
import tierkv
from conftest import BLOCK, small_spec
print("opening", flush=True)
with tierkv.TierKV(sys.argv[1], small_spec(), block_tokens=BLOCK) as s:
    print("opened", s.lookup(range(BLOCK), session="x"), flush=True)
"""


def test_a_store_held_alone_is_opened_by_no_other_process_meanwhile(tmp_path):
    """While ``verify --repair`` holds a store alone (it found no other process holding it open,
    and repairs), a process opening the store waits, and opens it once the repair is over: it
    cannot start saving into blocks the repair is cutting away."""
    import select

    path = str(tmp_path / "store")
    with tierkv.TierKV(path, SPEC, block_tokens=BLOCK, persist="write_through") as s:
        s.save(range(BLOCK), make_kv(SPEC, BLOCK), session="x").wait()
        with s._ssd.alone() as alone:
            assert alone is True
            p = subprocess.Popen([sys.executable, "-c", OPENER, path, HERE], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
            assert p.stdout.readline().strip() == "opening"
            assert select.select([p.stdout], [], [], 2.0)[0] == []  # waiting on the lock
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
        assert out.split() == ["opened", str(BLOCK)]


def test_nan_policy(open_store):
    kv = make_kv(SPEC, BLOCK)
    kv[1] = (kv[1][0].clone(), kv[1][1].clone())
    kv[1][0][0, 3, 2] = float("nan")
    s = open_store(SPEC)
    s.save(range(BLOCK), kv, session="nan-ok")  # default: store as is
    r = s.restore(range(BLOCK), session="nan-ok")
    assert torch.isnan(r.kv[1][0][0, 3, 2])
    strict = open_store(SPEC, path=s.path + "-strict", nan_policy="refuse")
    with pytest.raises(tierkv.SpecMismatchError, match="NaN or Inf"):
        strict.save(range(BLOCK), kv, session="nan")
    with pytest.raises(tierkv.UnknownSessionError):
        strict.session_info("nan")


def test_verify_reports_and_repairs(open_store, store_path, capsys):
    from tierkv.cli import main

    s = open_store(SPEC)
    kv = make_kv(SPEC, 3 * BLOCK)
    s.save(range(3 * BLOCK), kv, session="damaged")
    s.save(range(1000, 1000 + 2 * BLOCK), kv_slice(kv, 2 * BLOCK), session="fine")
    s.close()
    assert main(["verify", store_path]) == 0
    keys = tierkv.keys.block_keys(tierkv.keys.chain_seed(s.fingerprint, None),
                                  tierkv.keys.as_tokens(range(3 * BLOCK)), BLOCK)
    flip_byte(store_path, keys[1], -3, 0x10)
    capsys.readouterr()
    assert main(["verify", store_path]) == 1
    assert "1 bad" in capsys.readouterr().out
    assert main(["verify", store_path, "--repair"]) == 0
    assert main(["verify", store_path]) == 0
    s = open_store(SPEC)
    with pytest.raises(tierkv.UnknownSessionError):
        s.session_info("damaged")
    assert_kv_equal(s.restore(range(1000, 1000 + 2 * BLOCK), session="fine").kv, kv_slice(kv, 2 * BLOCK))


@pytest.fixture
def small_fs(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.decode().strip()}")
    yield str(mnt)
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_genuinely_full_filesystem(small_fs):
    """A 6 MiB file system under a store that believes it has 64 MiB: saves fail with
    StoreFullError once the disk is full, nothing committed is damaged, the loop goes on."""
    path = os.path.join(small_fs, "store")
    spec = small_spec(layers=8, heads=4, dim=32)
    acked = []
    with tierkv.TierKV(path, spec, block_tokens=BLOCK, ssd_bytes="64MiB", persist="write_through",
                       device_bytes=0, host_bytes=0) as s:
        full = None
        for i in range(200):
            try:
                s.save(tokens_for(i, 4 * BLOCK), make_kv(spec, 4 * BLOCK, seed=i), session=f"s{i}").wait()
                acked.append(i)
            except tierkv.StoreFullError as e:
                full = e
                break
        assert full is not None and "full" in str(full)
        assert len(acked) >= 3
        for i in acked[-3:]:  # the loop can go on: restores still work, exactly
            r = s.restore(tokens_for(i, 4 * BLOCK), session=f"s{i}")
            assert_kv_equal(r.kv, make_kv(spec, 4 * BLOCK, seed=i))
        s.drop_session(f"s{acked[0]}")
        s.flush()
    with tierkv.TierKV(path, spec, block_tokens=BLOCK, ssd_bytes="64MiB") as s:
        for i in acked[1:]:
            r = s.restore(tokens_for(i, 4 * BLOCK), session=f"s{i}")
            assert r.num_tokens == 4 * BLOCK
            assert_kv_equal(r.kv, make_kv(spec, 4 * BLOCK, seed=i))


def test_the_lease_table_takes_its_disk_blocks_up_front(small_fs):
    """The lease table (``leases.bin``) is written through a shared map. Created sparse, a page
    first written there after the file system had filled killed the process (SIGBUS): a drop
    marking its blocks (``leases.py``) in a full 6 MiB file system did. The file is allocated
    whole when created; opened where the file system has no room for it, the table lives in this
    process's memory (its own saves and writer still hand over), and the store works on."""
    from tierkv.leases import FILE_BYTES, LEASES_FILE

    path = os.path.join(small_fs, "store")
    spec = small_spec(layers=8, heads=4, dim=32)
    kv = make_kv(spec, 4 * BLOCK)
    opts = dict(block_tokens=BLOCK, ssd_bytes="64MiB", persist="write_through", device_bytes=0, host_bytes=0)
    with tierkv.TierKV(path, spec, **opts) as s:
        s.save(tokens_for(0, 4 * BLOCK), kv, session="a").wait()
        assert s._ssd.leases.shared
    assert os.stat(os.path.join(path, LEASES_FILE)).st_blocks * 512 >= FILE_BYTES  # not sparse
    os.remove(os.path.join(path, LEASES_FILE))
    fd = os.open(os.path.join(small_fs, "filler"), os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, bytes(1 << 16))
    except OSError:
        pass  # the file system is full
    finally:
        os.close(fd)
    s = tierkv.TierKV(path, spec, **opts)
    try:
        assert not s._ssd.leases.shared
        assert_kv_equal(s.restore(tokens_for(0, 4 * BLOCK), session="a").kv, kv)
        try:
            s.save(tokens_for(1, 4 * BLOCK), make_kv(spec, 4 * BLOCK, seed=1), session="b").wait()
        except tierkv.StoreFullError:
            pass
        s.drop_session("a")  # marks its blocks in the table
        try:
            s.flush()
        except tierkv.StoreFullError:
            pass
    finally:
        try:
            s.close()
        except tierkv.StoreFullError:
            pass


def test_full_policy_miss_drops_saves_quietly(open_store):
    spec = small_spec()
    blk = BLOCK * spec.bytes_per_token
    s = open_store(spec, ssd_codec="raw", persist="write_through", device_bytes=0, host_bytes=0,
                   ssd_bytes=2 * blk + 2048, full_policy="miss")
    kv = make_kv(spec, BLOCK)
    s.save(range(BLOCK), kv, session="a", pinned=True).wait()
    s.save(range(100, 100 + BLOCK), kv, session="b", pinned=True).wait()
    s.save(range(200, 200 + BLOCK), kv, session="c").wait()  # no room, nothing evictable: dropped
    s.flush()                                                 # and nothing raised
    assert s.stats()["dropped_saves"] == 1
    assert s.lookup(range(200, 200 + BLOCK), session="c") == 0
    assert_kv_equal(s.restore(range(BLOCK), session="a").kv, kv)


def test_truncated_data_file_is_refused_not_a_crash(open_store, store_path):
    s = open_store(SPEC)
    s.save(range(4 * BLOCK), make_kv(SPEC, 4 * BLOCK), session="s")
    s.close()
    data = os.path.join(store_path, "data.mdb")
    with open(data, "r+b") as f:
        f.truncate(os.path.getsize(data) // 2)
    with pytest.raises(tierkv.StoreIOError, match="truncated"):
        tierkv.TierKV(store_path, SPEC, block_tokens=BLOCK)


def test_random_flips_in_the_data_file(open_store, store_path):
    """Bytes flipped anywhere in the values' pages of data.mdb: each restore is exact or a
    shorter prefix (a counted miss); never wrong KV, never a crash."""
    s = open_store(SPEC, persist="write_through")
    kvs = {i: make_kv(SPEC, 4 * BLOCK, seed=i) for i in range(6)}
    for i, kv in kvs.items():
        s.save(range(i * 1000, i * 1000 + 4 * BLOCK), kv, session=f"s{i}").wait()
    s.close()
    data = os.path.join(store_path, "data.mdb")
    size = os.path.getsize(data)
    rng = random.Random(3)
    with open(data, "r+b") as f:
        for _ in range(40):
            pos = rng.randrange(size // 4, size)  # the first pages hold LMDB's meta and B-trees
            f.seek(pos)
            b = f.read(1)
            f.seek(pos)
            f.write(bytes([b[0] ^ 0x5A]))
    try:
        s = tierkv.TierKV(store_path, SPEC, block_tokens=BLOCK, ssd_bytes="64MiB")
    except tierkv.StoreIOError:
        return  # a damaged B-tree page: refused cleanly
    try:
        for i, kv in kvs.items():
            try:
                r = s.restore(range(i * 1000, i * 1000 + 4 * BLOCK), session=f"s{i}")
            except tierkv.TierKVError:
                continue  # a damaged record: a clean error
            assert_kv_equal(r.kv, kv_slice(kv, r.num_tokens)) if r.num_tokens else None
    finally:
        s.close()


def test_read_only_file_system(small_fs):
    """A store on a read-only file system (root ignores directory modes, a ro mount it cannot)."""
    path = os.path.join(small_fs, "store")
    tierkv.TierKV(path, SPEC, block_tokens=BLOCK, ssd_bytes="4MiB").close()
    r = subprocess.run(["mount", "-o", "remount,ro", small_fs], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot remount read-only here: {r.stderr.decode().strip()}")
    with pytest.raises(tierkv.StoreIOError, match="writable|read-only|Read-only"):
        tierkv.TierKV(os.path.join(small_fs, "new-store"), SPEC, block_tokens=BLOCK)
    with pytest.raises(tierkv.StoreIOError):
        tierkv.TierKV(path, SPEC, block_tokens=BLOCK, ssd_bytes="4MiB")


def _ssd_only(path, ssd_bytes, **settings):
    """A write-through store with no memory tiers: every save reaches SSD, every restore reads it."""
    return tierkv.TierKV(path, SPEC, block_tokens=BLOCK, persist="write_through", ssd_bytes=ssd_bytes,
                         host_bytes=0, device_bytes=0, **settings)


READER = """
import sys, time
sys.path.insert(0, sys.argv[2])
import tierkv
from conftest import BLOCK, small_spec
s = tierkv.TierKV(sys.argv[1], small_spec(), block_tokens=BLOCK, ssd_bytes="2MiB")
with s._ssd.reader():   # what a restore holds while it reads
    print("reading", flush=True)
    time.sleep(600)
"""


def test_process_killed_mid_read_does_not_pin_the_store(tmp_path):
    """A process killed while it held a read transaction (in the middle of a restore) leaves its
    slot in LMDB's reader table; until it is cleared, no page freed after that snapshot can be
    reused, so a store that evicts to stay in budget grows with every write. The surviving
    process clears dead readers and keeps the file near its budget."""
    path = str(tmp_path / "store")
    budget = 2 << 20
    with _ssd_only(path, budget) as s:
        s.save(list(range(64)), make_kv(SPEC, 64), session="first").wait()
        child = subprocess.Popen([sys.executable, "-c", READER, path, HERE], stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout.readline().strip() == "reading"
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
        n = 4096  # 1 MiB of KV per session: 40 sessions write 20x the budget
        kv = make_kv(SPEC, n)
        for i in range(40):
            s.save([i] + list(range(1, n)), kv, session=f"s{i}").wait()
        assert s.stats()["resident_bytes"]["ssd"] <= budget
        r = s.restore([39] + list(range(1, n)), session="s39")
        assert r.num_tokens == n
        assert_kv_equal(r.kv, kv)
    assert os.path.getsize(os.path.join(path, "data.mdb")) < 8 * budget


def _save_many(s, first, count, n=4096):
    """``count`` sessions of ``n`` tokens (1 MiB of KV each at n=4096), each saved durably."""
    kv = make_kv(SPEC, n)
    for i in range(first, first + count):
        s.save([i] + list(range(1, n)), kv, session=f"s{i}").wait()
    return kv


def test_reopen_with_a_lower_ssd_bytes_evicts_down_to_it(tmp_path):
    """A store reopened with a budget below what it holds (a user freeing disk space) restores
    what it holds and evicts down to the new budget at its next write. Before, LMDB's map was
    sized from the new budget alone, smaller than the file: every write failed with
    StoreFullError."""
    path = str(tmp_path / "store")
    with _ssd_only(path, "128MiB") as s:
        kv = _save_many(s, 0, 80)
    size = os.path.getsize(os.path.join(path, "data.mdb"))
    assert size > 80 << 20
    small = 4 << 20
    with _ssd_only(path, small) as s:
        r = s.restore([79] + list(range(1, 4096)), session="s79")
        assert r.num_tokens == 4096
        _save_many(s, 100, 20)
        assert s.stats()["resident_bytes"]["ssd"] <= small
        r = s.restore([119] + list(range(1, 4096)), session="s119")
        assert r.num_tokens == 4096
        assert_kv_equal(r.kv, kv)
    # LMDB does not shrink its file, but reuses the pages the evictions freed
    assert os.path.getsize(os.path.join(path, "data.mdb")) <= size + (8 << 20)


GROWER = """
import sys
sys.path.insert(0, sys.argv[2])
from test_reliability import _save_many, _ssd_only
with _ssd_only(sys.argv[1], "512MiB") as s:
    _save_many(s, 1000, 100)
print("grown", flush=True)
"""


def test_another_process_grows_the_store_past_this_ones_budget(tmp_path):
    """Two processes opened one store with different ``ssd_bytes``; the one with the larger
    budget grows the file past what the other's budget alone would map. The other still
    restores and saves. Before, LMDB refused its every new transaction (MDB_MAP_RESIZED): its
    own sessions became misses and other calls raised StoreIOError."""
    path = str(tmp_path / "store")
    with _ssd_only(path, "4MiB") as s:
        kv = _save_many(s, 0, 1)
        r = subprocess.run([sys.executable, "-c", GROWER, path, HERE], capture_output=True, text=True,
                           env=child_env(), timeout=300)
        assert r.stdout.strip() == "grown", r.stderr[-2000:]
        assert os.path.getsize(os.path.join(path, "data.mdb")) > 100 << 20
        for sid, first in (("s0", 0), ("s1050", 1050)):
            r = s.restore([first] + list(range(1, 4096)), session=sid)
            assert r.num_tokens == 4096, sid
            assert_kv_equal(r.kv, kv)
        _save_many(s, 2000, 2)
        assert s.restore([2001] + list(range(1, 4096)), session="s2001").num_tokens == 4096


LIMITED = """
import resource, sys
sys.path.insert(0, sys.argv[2])
import tierkv
from conftest import BLOCK, make_kv, small_spec
resource.setrlimit(resource.RLIMIT_AS, (40 << 30, 40 << 30))
spec = small_spec()
with tierkv.TierKV(sys.argv[1], spec, block_tokens=BLOCK, ssd_bytes="1GiB", persist="write_through") as s:
    s.save(list(range(64)), make_kv(spec, 64), session="a").wait()
    assert s.restore(list(range(64)), session="a").num_tokens == 64
    print(s._ssd.env.info()["map_size"], flush=True)
"""


def test_store_opens_under_an_address_space_limit(tmp_path):
    """Where a ulimit on address space refuses a map as large as the file system, the store
    opens with the map its budget needs."""
    path = str(tmp_path / "store")
    r = subprocess.run([sys.executable, "-c", LIMITED, path, HERE], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    st = os.statvfs(str(tmp_path))
    if st.f_blocks * st.f_frsize > 40 << 30:  # the file system's size was refused: the fallback
        assert int(r.stdout) == (1 << 30) + (1 << 30) // 4 + (64 << 20)


def test_hundreds_of_restores_in_flight(tmp_path):
    """Each restore from SSD holds a read transaction, so its view of the store stays whole while
    its blocks are read; a server may have hundreds in flight (a batch of requests, each
    prefetched on arrival), and processes sharing a store share LMDB's reader table. 300 restores
    are started while the I/O threads are held busy, then all complete in full; with LMDB's
    table of 256 slots the 257th restore raised StoreIOError."""
    path = str(tmp_path / "store")
    kv = make_kv(SPEC, 2 * BLOCK)
    toks = [[i] + list(range(1, 2 * BLOCK)) for i in range(300)]
    with tierkv.TierKV(path, SPEC, block_tokens=BLOCK, persist="write_through", host_bytes=0, device_bytes=0) as s:
        for i, t in enumerate(toks):
            s.save(t, kv, session=f"s{i}")
        s.flush()
    with tierkv.TierKV(path, SPEC, block_tokens=BLOCK, host_bytes=0, device_bytes=0) as s:
        gate = threading.Event()
        busy = [s._pool.submit(gate.wait) for _ in range(s.config.io_threads)]
        try:
            handles = [s.restore_async(t, session=f"s{i}", device="cpu") for i, t in enumerate(toks)]
        finally:
            gate.set()
        for f in busy:
            f.result()
        for h in handles:
            r = h.result()
            assert r.num_tokens == 2 * BLOCK
            assert_kv_equal(r.kv, kv)
        assert s.stats()["corrupt_blocks"] == 0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_forked_child_gets_a_clear_error_and_the_parent_goes_on(tmp_path):
    """LMDB environments and threads do not survive fork. A child forked from a process with a
    store open gets ForkedProcessError from every call, instead of reading through the parent's
    environment and waiting forever on a writer thread it does not have (a save's ``wait()``
    hung before); its ``close()`` touches nothing, and the parent goes on."""
    path = str(tmp_path / "store")
    kv = make_kv(SPEC, 2 * BLOCK)
    toks = list(range(2 * BLOCK))
    with tierkv.TierKV(path, SPEC, block_tokens=BLOCK, persist="write_through") as s:
        s.save(toks, kv, session="a").wait()
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report what each call did, then leave without any clean-up
            signal.alarm(30)
            os.close(r)
            out = []
            for call in (lambda: s.restore(toks, session="a"), lambda: s.save(toks, kv, session="b"),
                         lambda: s.lookup(toks, session="a"), s.flush, s.stats, s.close, s.close):
                try:
                    call()
                    out.append("ok")
                except tierkv.ForkedProcessError:
                    out.append("forked")
                except BaseException as e:  # noqa: BLE001 - reported to the parent
                    out.append(type(e).__name__)
            os.write(w, " ".join(out).encode())
            os._exit(0)
        os.close(w)
        _, status = os.waitpid(pid, 0)
        with os.fdopen(r) as f:
            assert f.read().split() == ["forked"] * 5 + ["ok", "ok"]
        assert status == 0
        got = s.restore(toks, session="a")
        assert_kv_equal(got.kv, kv)
        s.save(list(range(100, 100 + 2 * BLOCK)), kv, session="b").wait()
    with tierkv.TierKV(path, SPEC, block_tokens=BLOCK) as s:
        assert s.restore(list(range(100, 100 + 2 * BLOCK)), session="b").num_tokens == 2 * BLOCK


USER = """
import sys, time
sys.path.insert(0, sys.argv[2])
import tierkv
from conftest import BLOCK, small_spec
with tierkv.TierKV(sys.argv[1], small_spec(), block_tokens=BLOCK) as s:
    asked = time.time()
    print(asked, s.restore(list(range(2 * BLOCK)), session="x").num_tokens, flush=True)
"""


def test_ttl_counts_from_another_process_s_use(tmp_path):
    """A session's TTL counts from its last use by any process sharing the store: a process
    whose own copy of the record says it expired reads the record again before dropping it.
    Before, it dropped a session another process had just used."""
    path = str(tmp_path / "store")
    ttl = 5.0
    kv = make_kv(SPEC, 2 * BLOCK)
    with tierkv.TierKV(path, SPEC, block_tokens=BLOCK, persist="write_through") as s:
        s.save(list(range(2 * BLOCK)), kv, session="x", ttl=ttl).wait()
        saved = s.session_info("x")["last_used"]
        r = subprocess.run([sys.executable, "-c", USER, path, HERE], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        used, found = r.stdout.split()
        used = float(used)
        if used - saved > ttl - 0.5:  # a loaded machine: the session may have expired meanwhile
            pytest.skip("the other process started too slowly for this TTL")
        assert int(found) == 2 * BLOCK
        time.sleep(max(0.0, saved + ttl + 0.2 - time.time()))   # past the expiry this process knows of
        got = s.restore(list(range(2 * BLOCK)), session="x")
        assert got.num_tokens == 2 * BLOCK
        assert_kv_equal(got.kv, kv)
        assert s.session_info("x")["last_used"] >= used


def test_a_failed_writer_leaves_no_call_waiting(open_store):
    """The writer thread fails on a batch while more saves and a flush are queued behind it:
    each of them gets BackgroundError instead of waiting forever (before, only the failed
    batch's ops were told; a flush queued behind it never returned), and later calls are
    refused with it."""
    s = open_store(small_spec(), persist="write_through")
    gate, holding, real = threading.Event(), threading.Event(), s._apply

    def failing(ops):  # the first batch waits until more is queued behind it, then fails
        holding.set()
        gate.wait(10)
        raise RuntimeError("disk on fire")

    s._apply = failing
    kv = make_kv(small_spec(), BLOCK)
    first = s.save(range(BLOCK), kv, session="a")
    assert holding.wait(10)
    behind = s.save(range(100, 100 + BLOCK), kv, session="b")
    done = threading.Event()
    outcome = []

    def flushing():
        try:
            s.flush(timeout=30)
        except BaseException as e:  # noqa: BLE001 - what the flush raised is the result
            outcome.append(e)
        done.set()

    t = threading.Thread(target=flushing)
    t.start()
    time.sleep(0.2)  # the flush's barrier queued behind the held batch
    gate.set()
    assert done.wait(20)
    t.join()
    assert len(outcome) == 1 and isinstance(outcome[0], tierkv.BackgroundError)
    for h in (first, behind):
        with pytest.raises(tierkv.BackgroundError):
            h.wait(timeout=10)
    with pytest.raises(tierkv.BackgroundError):
        s.save(range(200, 200 + BLOCK), kv, session="c")
    s._apply = real
    with pytest.raises(tierkv.BackgroundError):  # close reports it too, and closes
        s.close()
