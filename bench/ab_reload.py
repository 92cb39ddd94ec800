"""Two versions of tierkv restoring the same store, side by side: is a change faster?

This VM's speed drifts by 2x within minutes, so comparing a bench run today with one from
yesterday says little. This script writes one store of real KV (as ``bench/reload.py`` does)
and then, round after round, restores every session with version A and with version B, each
in a fresh process (pages dropped first for ``cold``), so both see the same disk and CPU. The
order alternates (A first in even rounds, B first in odd ones; use an even ``--rounds``), so
that neither version always runs right after the other: on this VM a run's speed depends on
what ran just before it. B/A is reported two ways: the ratio of the medians, and the median of
the per-round ratios ("paired"), which cancels drift between rounds. How far apart two equal
versions land is measured by A/A runs (the same code as A and B; docs/benchmarks.md): a paired
B/A inside their spread is not a measured difference. Each
child also reports how long its ``restore_async`` calls took to return, all sessions together:
the caller's work before the reads start (lookups, header checks), which the disk waits on.

    python bench/ab_reload.py --a /path/to/old/checkout [--b .] [--dtype bf16] [--mode cold warm]
                              [--rounds 6] [--size 1GiB] [--out bench/results/ab_reload.json]

``--preallocated``: restore into tensors reserved up front (a CachePool), as a server does.
``--a`` / ``--b``: directories holding a ``tierkv`` package (a checkout, or ``git archive`` of a
commit); B defaults to this repository. The store is written by this repository's tierkv and
must be readable by both (same format version). With ``--own-stores`` each version writes a
store of its own (the same KV) and restores that one: for changes to how values are encoded.
``--codec-b``: B writes and restores with this SSD codec instead of ``--codec`` (implies
``--own-stores``): two codecs of one version, side by side (``--a . --codec raw --codec-b zstd-planes``).
``--model NAME``: random KV in another model's layout (a preset of ``tierkv calc --list``, as
``bench/reload.py --model``). ``--block-tokens N``: the stores' block size (default: the model's,
256 tokens for SmolLM2); ``--block-tokens-b M``: B's (implies ``--own-stores``): two block sizes,
side by side (``--a . --model qwen3-32b --dtype bf16 --codec raw --block-tokens-b 32``).
``--page-cache bypass``: both versions restore with ``ssd_page_cache="bypass"``;
``--page-cache-b MODE``: B's mode, if not ``--page-cache``'s (``--a . --page-cache-b bypass``: the
two modes of one version, on one store).
``--freed-first``: each child allocates and frees a few 24 MiB buffers before it opens the store,
as a process that has run a while has: glibc then serves the next large requests from its heap
(a server's bounce buffers came out in 4 KiB pages so until session 73: docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from common import int_at_least  # noqa: E402  (common imports no tierkv: a child imports its own)


def child(root: str, store: str, dtype: str, synthetic: bool, cache_dir: str, sessions: int, mode: str,
          codec: str, preallocated: bool = False, model: str | None = None, block_tokens: int | None = None,
          page_cache: str = "use", freed_first: bool = False) -> None:
    """Restore every session of ``store`` with the tierkv found in ``root``; print GB/s as JSON.
    ``mode`` "write": write the store instead. ``preallocated``: restore into one CachePool
    reserved up front (as a server does, and as the reload bench's preallocated rows), not into
    fresh tensors. ``model`` and ``block_tokens``: as the options ``--model`` and ``--block-tokens``; ``page_cache``: the restoring store's ``ssd_page_cache``.
    ``freed_first``: free a few large buffers first (``--freed-first``)."""
    sys.path.insert(0, os.path.abspath(root))
    sys.path.insert(1, HERE)
    import tierkv
    from tierkv.pagecache import drop_file_cache, resident_fraction

    if not os.path.abspath(tierkv.__file__).startswith(os.path.abspath(root) + os.sep):
        raise SystemExit(f"tierkv was imported from {tierkv.__file__}, not from {root}")
    import common
    from common import collected
    from reload import TOKENS, bench_kv

    spec, kv, block_tokens = bench_kv(synthetic, cache_dir, dtype, model, block_tokens)
    if mode == "write":
        write_store(tierkv, store, spec, kv, sessions, codec, block_tokens)
        print(json.dumps({"written": store}))
        return
    if freed_first:
        freed_large_buffers()
    big = dict(device_bytes=0, host_bytes=1 << 40, ssd_bytes=1 << 40, ssd_codec=codec, block_tokens=block_tokens,
               ssd_page_cache=page_cache)
    allocate = common.preallocated(spec, TOKENS) if preallocated else None
    if mode == "cold":
        # (the version under test may predate make_cold: its two steps, with this tree's check)
        drop_file_cache(os.path.join(store, "data.mdb"))
        left = resident_fraction(os.path.join(store, "data.mdb"))
        if left > 0.01:
            raise SystemExit(f"{left:.0%} of {store}/data.mdb stayed in the page cache after it was dropped: "
                             f"a cold read there is not cold (a file system in memory?); use --dir on the disk")
    setup = 0.0   # restore_async until it returns: the caller's work before the reads start
    blocks = 0    # blocks restored, all sessions together
    with tierkv.TierKV(store, spec, **big) as s:
        collected()   # not the first full collection of this fresh process, timed as setup
        t = time.perf_counter()
        for i in range(sessions):
            a = time.perf_counter()
            handle = s.restore_async(_tokens(i, TOKENS), session=f"s{i}", device="cpu", allocate=allocate)
            setup += time.perf_counter() - a
            r = handle.result()
            if r.num_tokens != TOKENS:
                raise SystemExit(f"{root}: restored {r.num_tokens} of {TOKENS} tokens (another store format?)")
            blocks += sum(r.sources.values())
        el = time.perf_counter() - t
        direct = s.stats().get("ssd_direct_read_bytes", 0)   # (a version before session 28 has none)
    print(json.dumps({"gbps": sessions * TOKENS * spec.bytes_per_token / el / 1e9, "seconds": el,
                      "setup_s": setup, "blocks": blocks, "direct_bytes": direct}))


def freed_large_buffers(n: int = 3, nbytes: int = 24 << 20) -> None:
    """Allocate, write and free ``n`` buffers of ``nbytes``: glibc maps each apart and, on the
    first free, raises its threshold for doing so (up to 32 MiB), so the next large requests under
    it come from its heap, in memory already faulted in as 4 KiB pages."""
    import torch

    for _ in range(n):
        x = torch.empty(nbytes, dtype=torch.uint8)
        x.fill_(1)
        del x


def write_store(tierkv: Any, store: str, spec: Any, kv: Any, sessions: int, codec: str, block_tokens: int = 256) -> None:
    """Save ``sessions`` sessions of ``kv`` into a fresh store at ``store`` (write-through)."""
    from reload import TOKENS

    per = TOKENS * spec.bytes_per_token
    with tierkv.TierKV(store, spec, persist="write_through", device_bytes=0, host_bytes=0,
                       ssd_bytes=2 * sessions * per + (1 << 30), ssd_codec=codec, block_tokens=block_tokens) as s:
        for i in range(sessions):
            s.save(_tokens(i, TOKENS), kv, session=f"s{i}")
        s.flush()


def _tokens(i: int, n: int) -> list[int]:
    return list(range(i * 100_000, i * 100_000 + n))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", required=True, help="directory holding version A's tierkv package")
    ap.add_argument("--b", default=ROOT, help="directory holding version B's tierkv package (default: this repository)")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--codec", default="zstd-planes")
    ap.add_argument("--codec-b", default=None, help="B's SSD codec, if not --codec's (implies --own-stores)")
    ap.add_argument("--mode", nargs="+", choices=("cold", "warm"), default=["cold", "warm"])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--size", default="1GiB", help="raw KV bytes in total (default 1GiB)")
    ap.add_argument("--synthetic", action="store_true", help="random KV instead of SmolLM2's")
    ap.add_argument("--model", default=None,
                    help="random KV in this model's layout instead of SmolLM2's (a preset of tierkv calc --list)")
    ap.add_argument("--block-tokens", type=int_at_least(16), default=None,
                    help="tokens per block of the stores (default: the model's; 256 for SmolLM2)")
    ap.add_argument("--block-tokens-b", type=int_at_least(16), default=None,
                    help="B's tokens per block, if not --block-tokens' (implies --own-stores)")
    ap.add_argument("--page-cache", choices=("use", "bypass"), default="use",
                    help="ssd_page_cache of the restoring stores (default: use)")
    ap.add_argument("--page-cache-b", choices=("use", "bypass"), default=None,
                    help="B's ssd_page_cache, if not --page-cache's")
    ap.add_argument("--dir", default=None, help="working directory on the disk to test (default: a temp dir)")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--out", default="bench/results/ab_reload.json")
    ap.add_argument("--own-stores", action="store_true",
                    help="each version writes and restores a store of its own (for encoder changes)")
    ap.add_argument("--preallocated", action="store_true",
                    help="restore into tensors reserved up front (a CachePool), not fresh ones")
    ap.add_argument("--freed-first", action="store_true",
                    help="each child frees a few large buffers before opening the store (a process that has run a while)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--store", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--sessions", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--write", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child, args.store, args.dtype, args.synthetic, args.cache_dir, args.sessions,
              "write" if args.write else args.mode[0], args.codec, args.preallocated, args.model, args.block_tokens,
              args.page_cache, args.freed_first)
        return {}

    codecs = {"A": args.codec, "B": args.codec_b or args.codec}
    if args.codec_b or args.block_tokens_b:
        args.own_stores = True
    import tierkv
    from reload import bench_kv, model_name

    if args.model:
        try:
            model_name(args.model)
        except argparse.ArgumentTypeError as e:
            ap.error(f"argument --model: {e}")
    from common import machine, stats_of, write_json
    from reload import TOKENS
    from tierkv.config import parse_size
    from tierkv.cli import default_cache_dir

    cache_dir = args.cache_dir or default_cache_dir()
    spec, kv, block_tokens = bench_kv(args.synthetic, cache_dir, args.dtype, args.model, args.block_tokens)
    blocks = {"A": block_tokens, "B": args.block_tokens_b or block_tokens}
    page_caches = {"A": args.page_cache, "B": args.page_cache_b or args.page_cache}
    per = TOKENS * spec.bytes_per_token
    sessions = max(1, parse_size(args.size, "--size") // per)
    work = tempfile.mkdtemp(prefix="tierkv-ab-", dir=args.dir)
    store = os.path.join(work, "store")
    versions = {"A": os.path.abspath(args.a), "B": os.path.abspath(args.b)}
    stores = {name: os.path.join(work, f"store-{name}") if args.own_stores else store for name in versions}
    rates: dict[str, list[float]] = {}
    setups: dict[str, list[float]] = {}   # ms, all sessions' restore_async calls together
    store_bytes: dict[str, int] = {}
    restored_blocks: dict[str, int] = {}  # per version: blocks a child restored, all sessions together
    direct_bytes: dict[str, int] = {}     # per version: bytes its last child read with O_DIRECT
    orders: list[tuple[str, str]] = []   # per round, which version ran first

    def run_child(name: str, mode: str) -> dict[str, Any]:
        root = versions[name]
        cmd = [sys.executable, os.path.abspath(__file__), "--a", root, "--child", root, "--store", stores[name],
               "--dtype", args.dtype, "--codec", codecs[name], "--mode", "cold" if mode == "write" else mode,
               "--sessions", str(sessions), "--cache-dir", cache_dir]
        cmd += ["--synthetic"] if args.synthetic else []
        cmd += ["--model", args.model] if args.model else []
        cmd += ["--block-tokens", str(blocks[name]), "--page-cache", page_caches[name]]
        cmd += ["--write"] if mode == "write" else []
        cmd += ["--preallocated"] if args.preallocated else []
        cmd += ["--freed-first"] if args.freed_first and mode != "write" else []
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"version {name} ({root}) failed:\n{r.stderr[-3000:]}")
        return json.loads(r.stdout.splitlines()[-1])

    try:
        if args.own_stores:
            for name in versions:
                run_child(name, "write")
        else:
            write_store(tierkv, store, spec, kv, sessions, args.codec, block_tokens)
        store_bytes = {name: os.path.getsize(os.path.join(stores[name], "data.mdb")) for name in versions}
        for rnd in range(args.rounds):
            order = ("A", "B") if rnd % 2 == 0 else ("B", "A")
            orders.append(order)
            for mode in args.mode:
                for name in order:
                    out = run_child(name, mode)
                    rates.setdefault(f"{mode} {name}", []).append(out["gbps"])
                    setups.setdefault(f"{mode} {name}", []).append(out["setup_s"] * 1e3)
                    restored_blocks[name] = out["blocks"]
                    direct_bytes[name] = out["direct_bytes"]
            print(f"  round {rnd + 1}/{args.rounds} done", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    results: dict[str, Any] = {
        "machine": machine(), "versions": versions,
        "kv": (f"{args.model}-random-" if args.model else "synthetic-" if args.synthetic else "smollm2-") + args.dtype,
        "block_tokens": blocks, "restored_blocks": restored_blocks,
        "codec": args.codec, "codec_b": codecs["B"], "sessions": sessions, "tokens_per_session": TOKENS, "raw_bytes": sessions * per,
        "page_cache": page_caches, "direct_read_bytes": direct_bytes, "rounds": args.rounds, "own_stores": args.own_stores, "preallocated": args.preallocated, "freed_first": args.freed_first,
        "round_orders": orders, "store_file_bytes": store_bytes,
        "gbps": {k: stats_of(v) for k, v in rates.items()},
        "b_over_a": {m: statistics.median(rates[f"{m} B"]) / statistics.median(rates[f"{m} A"]) for m in args.mode},
        # per round, B's rate over A's in the same round: drift between rounds cancels
        "b_over_a_paired": {m: stats_of([b / a for a, b in zip(rates[f"{m} A"], rates[f"{m} B"])]) for m in args.mode},
        # the caller's side of every restore_async before the reads start (lookups, header checks)
        "setup_ms": {k: stats_of(v) for k, v in setups.items()},
    }
    for k, v in results["gbps"].items():
        su = results["setup_ms"][k]
        print(f"  {k:8} {v['median']:6.2f} GB/s ({v['min']:.2f}-{v['max']:.2f}); restore_async returned after "
              f"{su['median']:.1f} ms in total ({su['min']:.1f}-{su['max']:.1f})")
    for m, x in results["b_over_a"].items():
        p = results["b_over_a_paired"][m]
        print(f"  {m}: B/A = {x:.2f}x (medians); per round {p['median']:.2f}x ({p['min']:.2f}-{p['max']:.2f})")
    write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
