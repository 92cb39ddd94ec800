"""A long run of a store under churn: does anything grow that should not, and is every hit exact?

An inference server or an agent keeps one store open for days. This runs ``--threads`` threads
of random hooks against one store for ``--minutes``, over budgets small enough that every tier
and the SSD keep evicting, and closes and reopens the store every ``--reopen-every`` seconds (a
process restart, without the process). With ``--processes N``, N more processes run the same
churn on the same store directory at once, each with a store object of its own, reopened on a
schedule of its own (several server workers sharing one SSD store); with ``--kill-every S``
they are killed with SIGKILL every S seconds, wherever they are (mid-save, mid-commit,
mid-read), and new ones take their place (workers crashing and restarting). Every ``--sample-every``
seconds the main process records what a leak would show in: its resident memory, open file
descriptors and threads, LMDB's reader slots in use (all processes'), data.mdb's size, and each
tier's resident bytes. Every ``--verify``-th hit of each kind (restore, restore into a pool) is
compared with the KV saved, bit for bit: each session id has tokens of its own and every process
saves the same KV for them, so a hit is checked whatever process saved it. Each session id has
two branches, sharing their first half (an answer regenerated there): three calls in ten are on
the second, whose KV after the branch point is the first half's again (real KV differs by
position, so a restore of the wrong branch is caught), and saving one branch replaces the other.

    python bench/soak.py --minutes 10 --dir /var/tmp --out bench/results/soak.json
    python bench/soak.py --minutes 10 --dir /var/tmp --processes 1 --dtype bf16 --persist write_through \
        --out bench/results/soak_bf16_2proc.json

The KV is SmolLM2's over 2,048 tokens of standard-library source (``bench/reload.py``'s, cached
under ``--cache-dir``; ``--synthetic`` for random KV of the same shape); ``--dtype bf16`` is the
model run in bf16, whose KV the default codec compresses (byte planes + zstd). Sessions are
prefixes of it under 24 session ids.

The hooks: ``save`` (some with a TTL), ``restore``, ``restore_async`` into a ``CachePool`` with
its layers waited for in a random order, ``prefetch`` waited for or its handle dropped unread,
``lookup``, ``offload`` and ``drop_session`` of sessions other threads and processes use, and
``stats``.

A run in which no call of a process finishes for ``--stall-s`` seconds (180) is a hang: it ends
there, with every thread's stack in the JSON (``stall_stacks``) and its store left in place.

Summary (JSON ``summary``): after the first ``--warmup`` fraction of the run, the lowest and
highest of each count, and resident memory's least-squares slope in MiB per minute over the
second half; ``problems`` lists every failed check or unexpected error, in any process. No
timing target: it is a check, in bench/ because it runs for minutes.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import multiprocessing
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from typing import Any, Callable

import psutil
import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import int_at_least, machine, pyplot, write_json  # noqa: E402
from reload import TOKENS, session_kv  # noqa: E402

import tierkv  # noqa: E402
from tierkv.stats import CUT_STANDINGS  # noqa: E402

IDS = 24
BRANCH_AT = TOKENS // 2  # where a session id's two branches part
#: the counts summarised (lowest and highest after the warm-up)
KEYS = ("rss_mib", "rss_anon_mib", "fds", "threads", "lmdb_readers", "data_mdb_mib")
#: the store's own counters a run adds up (stats()); sessions_cut: records a commit cut back,
#: a block they newly named having lost its value to the other process meanwhile;
#: values_written_again: such blocks the committing process held in memory, written again;
#: blocks_kept_for_leases: blocks a transaction kept, unowned, for a save's lease;
#: leased_blocks_evicted: leased blocks eviction took, nothing else being left;
#: blocks_copied_being_deleted: blocks a save copied, a transaction having marked them (leases.py);
#: leases_displaced: other saves' leases a save wrote over in the lease table; marks_shared: keys a
#: save found marked only through its mark bucket's overflow (shared with other keys);
#: cuts_lease_*: records cut back at their commit, by how the save's lease on the block found
#: without a value stood then (stats()["cuts_by_lease"]); stale_blocks_rewritten: blocks a save
#: found held in memory as on SSD with their values gone, written again from memory
STORE_COUNTS = ("corrupt_blocks", "vanished_blocks", "sessions_reread", "sessions_cut", "values_written_again",
                "blocks_kept_for_leases", "leased_blocks_evicted", "blocks_copied_being_deleted",
                "leases_displaced", "marks_shared", *(f"cuts_lease_{how}" for how in CUT_STANDINGS),
                "stale_blocks_rewritten")


def store_counts(st: dict) -> dict[str, int]:
    """The counters of STORE_COUNTS in a store's stats(), flat."""
    flat = dict(st, **{f"cuts_lease_{how}": st["cuts_by_lease"][how] for how in CUT_STANDINGS})
    return {name: flat[name] for name in STORE_COUNTS}
#: counts that are not calls
NOT_CALLS = ("restored_tokens", "verified", "restore_async_cut", *STORE_COUNTS, "save_wait_timeouts")
#: budgets small enough that every tier and the SSD keep evicting
BUDGETS = dict(device_bytes="128MiB", host_bytes="256MiB", ssd_bytes="1GiB", full_policy="miss")


def _slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs."""
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0


def _readers(store: tierkv.TierKV) -> int:
    """LMDB reader-table slots in use (its ``readers()`` lists one line per slot, after a header)."""
    text = store._ssd.env.readers()
    return max(0, len([line for line in text.splitlines() if line.strip()]) - 1)


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    return dict(BUDGETS, persist=args.persist, ssd_codec=args.codec, ssd_page_cache=args.page_cache)


class Churn:
    """``threads`` threads of random hooks against one store, which ``reopen`` swaps for a new one
    between calls (the threads pause while it is closed: a call on a closed store is a problem)."""

    def __init__(self, kv: list[tuple[torch.Tensor, torch.Tensor]], spec: tierkv.KVSpec,
                 verify: int, seed: int) -> None:
        self.kv, self.spec, self.verify, self.seed = kv, spec, verify, seed
        first = [list(range(i * 100_000, i * 100_000 + TOKENS)) for i in range(IDS)]
        self.tokens = [(t, t[:BRANCH_AT] + list(range(t[0] + 50_000, t[0] + 50_000 + TOKENS - BRANCH_AT)))
                       for t in first]
        self.kvs = (kv, [tuple(torch.cat([x[:, :BRANCH_AT], x[:, :TOKENS - BRANCH_AT]], 1) for x in layer)
                         for layer in kv])
        self.gate = threading.Condition()
        self.store: tierkv.TierKV | None = None
        self.paused = self.stopping = False
        self.active = 0
        self.counts: dict[str, int] = {}
        self.problems: list[str] = []
        self._count_lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def bump(self, name: str, n: int = 1) -> None:
        with self._count_lock:
            self.counts[name] = self.counts.get(name, 0) + n

    def start(self, store: tierkv.TierKV, threads: int) -> None:
        self.store = store
        self._threads = [threading.Thread(target=self._worker, args=(w,), daemon=True) for w in range(threads)]
        for t in self._threads:
            t.start()

    def close(self) -> None:
        """Close the store, adding its counters to the run's: a block counted corrupt is a
        problem (nothing here damages a value), a vanished one is not (dropped or evicted between
        a restore's match and its read, by another thread or process); a save that waited out
        the backpressure limit is one (the writer stalled)."""
        assert self.store is not None
        st = self.store.stats()
        for name, n in store_counts(st).items():
            self.bump(name, n)
        self.bump("save_wait_timeouts", st["backpressure"]["timeouts"])
        if st["corrupt_blocks"]:
            self.problems.append(f"{st['corrupt_blocks']} blocks counted corrupt, with nothing damaged")
        if st["backpressure"]["timeouts"]:  # a save waited out the limit: the writer stalled
            self.problems.append(f"{st['backpressure']['timeouts']} saves waited out the backpressure limit")
        self.store.close()

    def reopen(self, open_store: Callable[[], tierkv.TierKV]) -> None:
        with self.gate:
            self.paused = True
            while self.active:
                self.gate.wait()
        self.close()
        self.store = open_store()
        with self.gate:
            self.paused = False
            self.gate.notify_all()

    def stop(self) -> None:
        with self.gate:
            self.stopping = True
            self.gate.notify_all()
        for t in self._threads:
            t.join()

    def _check(self, what: str, n: int, kv: list[tuple[torch.Tensor, ...]],
               saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for (k, v), got in zip(saved, kv):
            if not (torch.equal(got[0], k[:, :n]) and torch.equal(got[1], v[:, :n])):
                self.problems.append(f"{what}[:{n}] differs from the KV saved")
                return
        self.bump("verified")

    def _worker(self, w: int) -> None:
        rng = random.Random(self.seed * 100 + w)
        pool = tierkv.CachePool()
        allocate = pool.allocator(self.spec)
        hits = {"restore": 0, "restore_async": 0}
        while True:
            with self.gate:
                while self.paused and not self.stopping:
                    self.gate.wait()
                if self.stopping:
                    return
                self.active += 1
                s = self.store
            assert s is not None
            try:
                i = rng.randrange(IDS)
                q = rng.randrange(256, TOKENS + 1)
                br = int(rng.random() < 0.3)
                sid, toks, kv = f"s{i}", self.tokens[i][br][:q], self.kvs[br]
                op = rng.random()
                if op < 0.25:
                    s.save(toks, [(k[:, :q], v[:, :q]) for k, v in kv], session=sid,
                           ttl=rng.choice([None, None, 30.0]))
                    self.bump("save")
                elif op < 0.55:
                    if op < 0.45:
                        r, name = s.restore(toks, session=sid), "restore"
                    else:  # into a server's pool, each layer waited for in an order of its own
                        h, name = s.restore_async(toks, session=sid, allocate=allocate), "restore_async"
                        try:
                            for layer in rng.sample(range(len(self.kv)), len(self.kv)):
                                h.layer(layer)
                        except tierkv.BlockLoadError:  # a block dropped or evicted since the match:
                            self.bump("restore_async_cut")  # result() ends the prefix before it
                        r = h.result()
                    self.bump(name)
                    self.bump("restored_tokens", r.num_tokens)
                    if r.num_tokens:
                        hits[name] += 1
                        if hits[name] % self.verify == 0:
                            self._check(f"{name} of {sid} (branch {br})", r.num_tokens, r.kv, kv)
                elif op < 0.65:
                    h = s.prefetch(toks, session=sid)
                    if op < 0.62:
                        h.wait()
                        self.bump("prefetch")
                    else:
                        self.bump("prefetch_unread")  # its handle dropped: the blocks still land
                elif op < 0.73:
                    s.lookup(toks, session=sid)
                    self.bump("lookup")
                elif op < 0.88:  # of a session another thread or process may just have dropped
                    call, name = (s.offload, "offload") if op < 0.78 else (s.drop_session, "drop")
                    try:
                        call(sid)
                        self.bump(name)
                    except tierkv.UnknownSessionError:
                        self.bump(name + "_unknown")
                else:
                    s.stats()
                    self.bump("stats")
            except tierkv.StoreClosedError:
                self.problems.append("a call met a closed store")  # cannot happen: workers pause first
            except Exception as e:  # noqa: BLE001 - recorded; the run goes on
                self.problems.append(f"{type(e).__name__}: {e}")
            finally:
                with self.gate:
                    self.active -= 1
                    self.gate.notify_all()


class Watchdog:
    """Ends a run that hangs. Where no call of ``churn``'s finishes for ``stall_s`` seconds (a
    deadlock, or a writer that never lets go of LMDB's write lock, as one run of session 39
    found), ``on_stall`` gets every thread's stack, once. Before, such a run waited forever."""

    def __init__(self, churn: Churn, stall_s: float, on_stall: Callable[[str], None]) -> None:
        self.churn, self.stall_s, self.on_stall = churn, stall_s, on_stall
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-watchdog", daemon=True)

    def start(self) -> "Watchdog":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _calls(self) -> int:
        with self.churn._count_lock:
            return sum(v for k, v in self.churn.counts.items() if k not in NOT_CALLS)

    def _run(self) -> None:
        last, since = self._calls(), time.monotonic()
        while not self._stop.wait(0.5):
            n = self._calls()
            if n != last:
                last, since = n, time.monotonic()
            elif time.monotonic() - since >= self.stall_s:
                with tempfile.TemporaryFile("w+") as f:
                    faulthandler.dump_traceback(f, all_threads=True)
                    f.seek(0)
                    stacks = f.read()
                self.on_stall(stacks)
                return


def _process(args: argparse.Namespace, path: str, index: int, start: float, result: str) -> None:
    """One more process's churn on the same store (run with ``--processes``): until the main
    process's end, reopening on a schedule offset from the others'. Its counts and problems go
    to ``result`` as JSON every second and at the end, so a process killed (``--kill-every``)
    still reports what it did and found up to its last second; its open store's corrupt count is
    in them."""
    spec, kv = session_kv(args.synthetic, args.cache_dir, args.dtype)
    churn = Churn(kv, spec, args.verify, args.seed + 1000 * (index + 1))
    open_store = lambda: tierkv.TierKV(path, spec, **settings_of(args))  # noqa: E731
    reopens, done = 0, False
    proc = psutil.Process()

    def report() -> None:
        counts = dict(churn.counts)
        if not done and churn.store is not None:  # the open store's counters, not yet added
            for name, n in store_counts(churn.store.stats()).items():
                counts[name] = counts.get(name, 0) + n
        got = {"index": index, "counts": counts, "problems": list(churn.problems), "reopens": reopens}
        if done:
            got["after_close"] = {"fds": proc.num_fds(), "threads": proc.num_threads()}
        with open(result + ".tmp", "w") as f:
            json.dump(got, f)
        os.replace(result + ".tmp", result)

    def stalled(stacks: str) -> None:  # reported (the main process ends its run with it), then gone
        churn.problems.append(f"no call finished for {args.stall_s:g} s: a hang; every thread's stack:\n{stacks}")
        report()
        os._exit(1)

    try:
        churn.start(open_store(), args.threads)
        Watchdog(churn, args.stall_s, stalled).start()
        end = start + args.minutes * 60
        slot = index % max(1, args.processes)
        next_reopen = start + args.reopen_every * (1 + (slot + 1) / (args.processes + 1))
        while next_reopen < time.time():  # a process started late (after a kill) keeps the slot's phase
            next_reopen += args.reopen_every
        next_report = time.time()
        while time.time() < end and len(churn.problems) < 20:
            if time.time() >= next_reopen:
                churn.reopen(open_store)
                reopens += 1
                next_reopen += args.reopen_every
            if time.time() >= next_report:
                report()
                next_report += 1.0
            time.sleep(0.05)
        churn.stop()
        churn.close()
    except Exception as e:  # noqa: BLE001 - reported to the main process
        churn.problems.append(f"{type(e).__name__}: {e}")
    done = True
    report()


def verify_after(path: str, problems: list[str]) -> dict[str, Any]:
    """The store once every process has closed it, as ``tierkv verify`` sees it. Any damage, or a
    process still holding it open, is a problem. Blocks a killed process never wrote back are
    expected (write-back): ``--repair`` cuts their sessions back, and a second look must find
    nothing left."""
    from tierkv.verify import verify_store

    def brief(r: dict[str, Any]) -> dict[str, Any]:
        return {k: len(v) if isinstance(v, (list, dict)) else v for k, v in r.items() if k not in ("path", "bad")}

    t = time.perf_counter()
    first = verify_store(path)
    res = {"found": brief(first), "scan_s": time.perf_counter() - t}
    damage = {k: res["found"][k] for k in ("bad_blocks", "sessions_using_bad_blocks", "sessions_with_missing_blocks",
                                           "stray_index_entries") if res["found"][k]}
    if damage:
        problems.append(f"verify after the run: {damage}")
    if first["open_elsewhere"]:
        problems.append("verify after the run: another process still holds the store open")
    if first["unwritten_left_behind"]:
        verify_store(path, repair=True)
        again = verify_store(path)
        res["after_repair"] = brief(again)
        if again["blocks_without_values"] or again["sessions_with_unwritten_blocks"] or not again["blocks_checked"]:
            problems.append(f"verify after its repair: {res['after_repair']}")
    return res


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--threads", type=int_at_least(1), default=3, help="threads of hooks in each process")
    ap.add_argument("--processes", type=int, default=0, help="more processes churning the same store")
    ap.add_argument("--kill-every", type=float, default=0.0,
                    help="seconds between SIGKILLs of the other processes, each replaced by a new one (0: never)")
    ap.add_argument("--sample-every", type=float, default=5.0, help="seconds between samples")
    ap.add_argument("--stall-s", type=float, default=180.0,
                    help="seconds in which no call of a process finishes that end the run as a hang")
    ap.add_argument("--reopen-every", type=float, default=60.0, help="seconds between close and reopen")
    ap.add_argument("--verify", type=int_at_least(1), default=4, help="check every N-th hit bit for bit")
    ap.add_argument("--warmup", type=float, default=0.2, help="fraction of the run left out of the summary")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="the model's KV dtype")
    ap.add_argument("--persist", choices=("write_back", "write_through"), default="write_back")
    ap.add_argument("--codec", choices=("zstd-planes", "raw"), default="zstd-planes")
    ap.add_argument("--page-cache", choices=("use", "bypass"), default="use")
    ap.add_argument("--dir", default=None, help="working directory (default: a temp dir)")
    ap.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/tierkv"))
    ap.add_argument("--synthetic", action="store_true", help="random KV instead of SmolLM2's")
    ap.add_argument("--out", default="bench/results/soak.json")
    args = ap.parse_args(argv)

    spec, kv = session_kv(args.synthetic, args.cache_dir, args.dtype)  # cached before any child starts
    work = tempfile.mkdtemp(prefix="tierkv-soak-", dir=args.dir)
    path = os.path.join(work, "store")
    settings = settings_of(args)
    proc = psutil.Process()
    churn = Churn(kv, spec, args.verify, args.seed)
    open_store = lambda: tierkv.TierKV(path, spec, **settings)  # noqa: E731

    def sample(t0: float) -> dict[str, Any]:
        s = churn.store
        assert s is not None
        st = s.stats()
        mem = proc.memory_info()
        return {"t_s": time.monotonic() - t0, "rss_mib": mem.rss / 2**20,
                # of it, pages not backed by a file (LMDB's map of data.mdb is file-backed)
                "rss_anon_mib": (mem.rss - mem.shared) / 2**20,
                "fds": proc.num_fds(), "threads": proc.num_threads(), "lmdb_readers": _readers(s),
                "data_mdb_mib": os.path.getsize(os.path.join(path, "data.mdb")) / 2**20,
                "resident_mib": {k: v / 2**20 for k, v in st["resident_bytes"].items()},
                "host_pool_slabs": (st["host_pool"] or {}).get("slabs"),
                # this store's counters since it was opened: either above 0 is a fault
                "corrupt_blocks": st["corrupt_blocks"], "save_wait_timeouts": st["backpressure"]["timeouts"],
                "ops": dict(churn.counts)}

    out: dict[str, Any] = {"machine": machine(), "args": vars(args), "settings": settings,
                           "spec_bytes_per_token": spec.bytes_per_token, "samples": [], "reopens": 0}
    children: list[tuple[Any, str]] = []
    out["processes"] = []
    ctx = multiprocessing.get_context("spawn")

    def spawn(start: float) -> None:
        index = len(out["processes"]) + len(children)
        result = os.path.join(work, f"process{index}.json")
        p = ctx.Process(target=_process, args=(args, path, index, start, result), daemon=True)
        p.start()
        children.append((p, result))

    def collect(p: Any, result: str, killed: bool) -> None:
        """A process's last report: its problems are the run's, and a killed one's corrupt count
        (a process that closed its store reported its own as a problem already)."""
        if not os.path.exists(result):
            if not killed:
                churn.problems.append(f"a process ended without a report (exit code {p.exitcode})")
            out["processes"].append({"killed": killed, "counts": {}, "problems": []})
            return
        with open(result) as f:
            got = json.load(f)
        got["killed"] = killed
        out["processes"].append(got)
        churn.problems += [f"process {got['index']}: {x}" for x in got["problems"]]
        if killed and got["counts"].get("corrupt_blocks"):
            churn.problems.append(f"process {got['index']}: {got['counts']['corrupt_blocks']} blocks "
                                  "counted corrupt, with nothing damaged")

    def stalled(stacks: str) -> None:
        """A hang: written down with every thread's stack, the other processes killed, the run
        ended (its store left in place, to be looked at)."""
        problem = f"no call finished for {args.stall_s:g} s: a hang (every thread's stack: stall_stacks)"
        churn.problems.append(problem)
        for p, _ in list(children):
            p.kill()
        out.update(stall_stacks=stacks, store=path, ops=dict(churn.counts), problems=list(churn.problems))
        write_json(args.out, out)
        print(f"{problem}; the store: {path}\n{stacks}", file=sys.stderr, flush=True)
        os._exit(1)

    try:
        churn.start(open_store(), args.threads)  # the store exists before the other processes open it
        Watchdog(churn, args.stall_s, stalled).start()
        start = time.time()
        for _ in range(args.processes):
            spawn(start)
        t0 = time.monotonic()
        end = t0 + args.minutes * 60
        next_sample, next_reopen = t0, t0 + args.reopen_every
        next_kill = t0 + args.kill_every if args.kill_every > 0 else float("inf")
        while time.monotonic() < end and len(churn.problems) < 20:
            now = time.monotonic()
            if now >= next_sample:
                out["samples"].append(sample(t0))
                next_sample += args.sample_every
            if now >= next_reopen:
                churn.reopen(open_store)
                out["reopens"] += 1
                next_reopen += args.reopen_every
            if now >= next_kill:  # a worker crashes mid-call, whatever it was doing; a new one starts
                for p, result in children:
                    p.kill()
                    p.join()
                    collect(p, result, killed=True)
                children.clear()
                out["kills"] = out.get("kills", 0) + args.processes
                for _ in range(args.processes):
                    spawn(start)
                next_kill += args.kill_every
            time.sleep(0.05)
        churn.stop()
        out["samples"].append(sample(t0))
        churn.close()
        for p, result in children:
            p.join(timeout=300)
            if p.is_alive():
                churn.problems.append(f"a process did not finish (still running after {args.minutes:g} min + 300 s)")
                continue
            collect(p, result, killed=False)
        children.clear()
        out["after_close"] = {"fds": proc.num_fds(), "threads": proc.num_threads(),
                              "rss_mib": proc.memory_info().rss / 2**20}
        out["verify"] = verify_after(path, churn.problems)
    finally:
        for p, _ in children:
            if p.is_alive():
                p.kill()
        shutil.rmtree(work, ignore_errors=True)

    counts = churn.counts
    out["ops"] = counts
    out["problems"] = churn.problems
    steady = [x for x in out["samples"] if x["t_s"] >= args.warmup * args.minutes * 60]
    half = [x for x in out["samples"] if x["t_s"] >= 0.5 * args.minutes * 60]
    out["summary"] = {
        "samples": len(steady),
        **{f"{key}_min": min(x[key] for x in steady) for key in KEYS},
        **{f"{key}_max": max(x[key] for x in steady) for key in KEYS},
        "rss_slope_mib_per_min_second_half": _slope([x["t_s"] / 60 for x in half], [x["rss_mib"] for x in half]),
        "rss_anon_slope_mib_per_min_second_half": _slope([x["t_s"] / 60 for x in half],
                                                         [x["rss_anon_mib"] for x in half]),
        **{name: counts.get(name, 0) + sum(got["counts"].get(name, 0) for got in out.get("processes", []))
           for name in ("verified", *STORE_COUNTS, "save_wait_timeouts")},
        "problems": len(churn.problems),
    } if steady else {}
    write_json(args.out, out)
    calls = sum(v for k, v in counts.items() if k not in NOT_CALLS)
    others = sum(v for got in out.get("processes", []) for k, v in got["counts"].items() if k not in NOT_CALLS)
    print(f"{calls} calls in {args.minutes:g} min ({others} more in {len(out['processes'])} other processes, "
          f"{out.get('kills', 0)} of them killed), {out['reopens']} reopens, {len(churn.problems)} problems")
    for p in churn.problems[:20]:
        print("  problem:", p)
    for k, v in out["summary"].items():
        print(f"  {k:36s} {v:.2f}" if isinstance(v, float) else f"  {k:36s} {v}")
    _plot(out, os.path.splitext(args.out)[0] + ".png")
    return out


def _plot(out: dict[str, Any], png: str) -> None:
    plt = pyplot()
    if plt is None:
        return
    xs = [x["t_s"] / 60 for x in out["samples"]]
    fig, axes = plt.subplots(3, 1, figsize=(7, 7), sharex=True)
    axes[0].plot(xs, [x["rss_mib"] for x in out["samples"]], label="resident")
    axes[0].plot(xs, [x["rss_anon_mib"] for x in out["samples"]], label="of it anonymous")
    axes[0].set_ylabel("MiB")
    axes[0].legend()
    axes[1].plot(xs, [x["fds"] for x in out["samples"]], label="open fds")
    axes[1].plot(xs, [x["threads"] for x in out["samples"]], label="threads")
    axes[1].plot(xs, [x["lmdb_readers"] for x in out["samples"]], label="LMDB readers")
    axes[1].legend()
    for tier in ("device", "host", "ssd"):
        axes[2].plot(xs, [x["resident_mib"].get(tier, 0) for x in out["samples"]], label=tier)
    axes[2].plot(xs, [x["data_mdb_mib"] for x in out["samples"]], label="data.mdb", linestyle="--")
    axes[2].set_ylabel("MiB")
    axes[2].set_xlabel("minutes")
    axes[2].legend()
    fig.suptitle("tierkv soak: store under churn, reopened every "
                 f"{out['args']['reopen_every']:g} s")
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    print(f"wrote {png}")


if __name__ == "__main__":
    main()
