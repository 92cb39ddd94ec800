"""Where a cold restore's time goes: the engine against its own read pattern, read by read.

``bench/reload.py`` reports that tierkv's engine restores its store at 0.79-1.06x of the same
store read by its bare read pattern (``bench/read_patterns.layer_major``: the same reads from
the same number of threads, checksums included, nothing else). This script splits that gap. It
writes one store of real KV, then, round after round in a shuffled order, restores every
session cold with the engine (into preallocated tensors, as a server does) and reads it cold
with the bare pattern, timing every ``preadv`` both make (both read through ``os.preadv``). Per
method it reports:

- ``no_read_in_flight_s``: wall time during which neither thread had a read in flight, whether
  setup, bookkeeping between reads or waiting for the GIL. The kernel's readahead may still keep
  the disk busy then; the disk waits for nobody only while a read is in flight.
- ``before_first_read_s``: per session, from the restore call (the pattern: the session's
  start) to its first read, summed over the sessions: setup the disk waits on.
- ``after_last_read_s``: per session, from the end of its last read to the next session's
  start (the run's end for the last): the restore's finish (waking the caller, the result) and
  the caller's loop, during which the disk has nothing asked of it but readahead.
- ``between_reads_s``: per thread, the time from one read's return to its next read's start,
  summed over threads: the per-(block, layer) work around each read (checksums included).
- ``engine, threads not spread``: the engine with ``io_affinity="inherit"``, its I/O threads free
  to run on any CPU (the default, "spread", gives each CPUs of its own; ``tierkv.affinity``).
- ``warm``: the same runs from the page cache, with the process's user and system CPU seconds,
  where the engine's extra CPU per GiB shows without the disk in the way.

    python bench/reload_timeline.py [--size 1GiB] [--rounds 8] [--dtype fp32] [--seed 0]
                                    [--out bench/results/engine_timeline.json]

Wrapping ``os.preadv`` costs both methods the same microsecond or so per read. Figures from one
run only; this VM's speed drifts, so compare the methods within a run.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(__file__))
from ab_reload import _tokens, write_store  # noqa: E402
from common import collected, int_at_least, machine, preallocated, setup_frozen, stats_of, write_json  # noqa: E402
from read_patterns import layer_major, value_layout  # noqa: E402
from reload import TOKENS, session_kv  # noqa: E402

import numpy as np  # noqa: E402

import tierkv  # noqa: E402
from tierkv.config import TierKVConfig, parse_size  # noqa: E402
from tierkv.pagecache import make_cold  # noqa: E402

#: (thread id, start, end) of every os.preadv since the list was last cleared (before each timed run)
_reads: list[tuple[int, float, float]] = []
_real_preadv = os.preadv


def _timed_preadv(fd: int, buffers: Any, offset: int) -> int:
    start = time.perf_counter()
    try:
        return _real_preadv(fd, buffers, offset)
    finally:
        _reads.append((threading.get_ident(), start, time.perf_counter()))


def no_read_in_flight(reads: list[tuple[int, float, float]], start: float, end: float) -> float:
    """Seconds of [start, end] during which no read of ``reads`` was in flight."""
    idle, in_flight, last = 0.0, 0, start
    for t, step in sorted([(a, 1) for _, a, _ in reads] + [(b, -1) for _, _, b in reads]):
        if in_flight == 0:
            idle += t - last
        in_flight += step
        last = t
    return idle + (end - last if in_flight == 0 else 0.0)


def between_reads(reads: list[tuple[int, float, float]]) -> float:
    """Per reading thread, the gaps between one read's end and its next read's start, summed.
    The caller's thread is left out: its reads (the engine's value headers) are setup, and its
    gaps are whole sessions."""
    by_thread: dict[int, list[tuple[float, float]]] = {}
    for tid, a, b in reads:
        if tid != threading.main_thread().ident:
            by_thread.setdefault(tid, []).append((a, b))
    total = 0.0
    for spans in by_thread.values():
        spans.sort()
        total += sum(nxt[0] - cur[1] for cur, nxt in zip(spans, spans[1:]))
    return total


def first_read_after(reads: list[tuple[int, float, float]], t: float) -> float:
    return min((a for _, a, _ in reads if a >= t), default=t)


def after_last_read(reads: list[tuple[int, float, float]], starts: list[float], end: float) -> float:
    """Per session (``starts``: each one's start), the time from the end of its last read to the
    next session's start, or to ``end`` for the last session; summed."""
    total = 0.0
    for s, e in zip(starts, starts[1:] + [end]):
        last = max((b for _, a, b in reads if s <= a and b <= e), default=None)
        if last is not None:
            total += e - last
    return total


def timed_run(run: Callable[[], list[float]], total: int) -> dict[str, float]:
    """One run of ``run`` (which returns each session's start), split read by read."""
    _reads.clear()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    starts = run()
    t1 = time.perf_counter()
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    reads = list(_reads)
    return {"seconds": t1 - t0, "gbps": total / (t1 - t0) / 1e9,
            "no_read_in_flight_s": no_read_in_flight(reads, t0, t1),
            "before_first_read_s": sum(first_read_after(reads, t) - t for t in starts),
            "after_last_read_s": after_last_read(reads, starts, t1),
            "between_reads_s": between_reads(reads), "reads": len(reads),
            "user_cpu_s": cpu1.ru_utime - cpu0.ru_utime, "system_cpu_s": cpu1.ru_stime - cpu0.ru_stime}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1GiB", help="raw KV bytes in total (default 1GiB)")
    ap.add_argument("--rounds", type=int_at_least(1), default=8)
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--codec", default="zstd-planes")
    ap.add_argument("--synthetic", action="store_true", help="random KV instead of SmolLM2's")
    ap.add_argument("--seed", type=int, default=0, help="seed of the per-round method order")
    ap.add_argument("--dir", default=None, help="working directory on the disk to test (default: a temp dir)")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--out", default="bench/results/engine_timeline.json")
    args = ap.parse_args(argv)
    if not sys.platform.startswith("linux"):
        raise SystemExit("reload_timeline needs tierkv's pread reader (Linux)")
    from tierkv.cli import default_cache_dir

    spec, kv = session_kv(args.synthetic, args.cache_dir or default_cache_dir(), args.dtype)
    per = TOKENS * spec.bytes_per_token
    n = max(1, parse_size(args.size, "--size") // per)
    total = n * per
    work = tempfile.mkdtemp(prefix="tierkv-timeline-", dir=args.dir)
    store = os.path.join(work, "store")
    data = os.path.join(store, "data.mdb")
    big = dict(device_bytes=0, host_bytes=1 << 40, ssd_bytes=2 * total + (1 << 30), ssd_codec=args.codec)
    io_threads = TierKVConfig().io_threads
    from_pool = preallocated(spec, TOKENS)

    def engine(io_affinity: str = "spread") -> list[float]:
        """Restore every session; the time of each restore call."""
        calls = []
        with tierkv.TierKV(store, spec, io_affinity=io_affinity, **big) as s:
            for i in range(n):
                calls.append(time.perf_counter())
                r = s.restore_async(_tokens(i, TOKENS), session=f"s{i}", device="cpu", allocate=from_pool).result()
                if r.num_tokens != TOKENS:
                    raise SystemExit(f"restored {r.num_tokens} of {TOKENS} tokens")
        return calls

    def pattern() -> list[float]:
        """Read every session with the bare pattern, one session at a time; each one's start."""
        starts: list[float] = []
        layer_major(data, layout, io_threads, starts, into=pattern_buffer)
        return starts

    results: dict[str, Any] = {"machine": machine(), "sessions": n, "tokens_per_session": TOKENS, "raw_bytes": total,
                               "kv": ("synthetic-" if args.synthetic else "smollm2-") + args.dtype,
                               "codec": args.codec, "io_threads": io_threads, "rounds": args.rounds,
                               "seed": args.seed}
    os.preadv = _timed_preadv
    try:
        write_store(tierkv, store, spec, kv, n, args.codec)
        layout = value_layout(store, spec, [f"s{i}" for i in range(n)], **big)
        # like the engine's preallocated tensors (the pool, reserved and written above), a buffer
        # whose pages are already in place: neither method pays page faults in the timed runs
        pattern_buffer = np.ones(max(sum(v.size for v in row) for row in layout), np.uint8)
        methods: dict[str, Callable[[], list[float]]] = {
            "engine": engine, "read pattern": pattern,
            "engine, threads not spread": lambda: engine("inherit")}
        rows: dict[str, dict[str, list[float]]] = {}
        orders = []
        rng = random.Random(args.seed)
        with setup_frozen():
            for mode in ("cold", "warm"):
                if mode == "warm":
                    engine(), pattern()   # the store into the page cache
                for _ in range(args.rounds if mode == "cold" else max(3, args.rounds // 2)):
                    order = list(methods)
                    rng.shuffle(order)
                    orders.append([mode] + order)
                    for name in order:
                        if mode == "cold":
                            make_cold(data)
                        collected()
                        row = rows.setdefault(f"{name} {mode}", {})
                        for k, v in timed_run(methods[name], total).items():
                            row.setdefault(k, []).append(v)
                    print(f"  {mode} round {len(orders)}: " + ", ".join(
                        f"{name} {rows[f'{name} {mode}']['gbps'][-1]:.2f} GB/s" for name in order), flush=True)
    finally:
        os.preadv = _real_preadv
        shutil.rmtree(work, ignore_errors=True)

    results["round_orders"] = orders
    results["rows"] = {name: {k: stats_of(v) for k, v in row.items()} for name, row in rows.items()}
    for mode in ("cold", "warm"):
        # the engine's rate over another row's: the ratio of medians, and the median per round
        for key, other in (("engine_vs_pattern", "read pattern"), ("spread_vs_not_spread", "engine, threads not spread")):
            e, o = rows[f"engine {mode}"]["seconds"], rows[f"{other} {mode}"]["seconds"]
            results[f"{key}_{mode}"] = statistics.median(o) / statistics.median(e)
            results[f"{key}_{mode}_paired"] = statistics.median([b / a for a, b in zip(e, o)])
    print(f"{n} sessions x {TOKENS} tokens = {total / 2**30:.2f} GiB raw KV, {args.dtype}, {args.codec}; "
          f"medians of {args.rounds} cold rounds (per GiB of KV, ms)")
    print(f"{'':32}{'GB/s':>6}{'total':>8}{'no read':>9}{'before 1st':>11}{'after last':>11}{'between':>9}"
          f"{'user CPU':>9}{'sys CPU':>8}")
    gib = total / 2**30
    for name, row in rows.items():
        med = {k: statistics.median(v) for k, v in row.items()}
        print(f"{name:32}{med['gbps']:6.2f}" + "".join(
            f"{med[k] / gib * 1000:{w}.0f}" for k, w in (("seconds", 8), ("no_read_in_flight_s", 9),
                                                        ("before_first_read_s", 11), ("after_last_read_s", 11),
                                                        ("between_reads_s", 9),
                                                        ("user_cpu_s", 9), ("system_cpu_s", 8))))
    print(f"engine / read pattern: cold {results['engine_vs_pattern_cold']:.3f}x "
          f"(paired {results['engine_vs_pattern_cold_paired']:.3f}x), warm {results['engine_vs_pattern_warm']:.3f}x "
          f"(paired {results['engine_vs_pattern_warm_paired']:.3f}x)")
    print(f"engine, threads spread / not spread: cold {results['spread_vs_not_spread_cold']:.3f}x "
          f"(paired {results['spread_vs_not_spread_cold_paired']:.3f}x), warm {results['spread_vs_not_spread_warm']:.3f}x "
          f"(paired {results['spread_vs_not_spread_warm_paired']:.3f}x)")
    write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
