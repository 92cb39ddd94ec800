"""How long `save` blocks its caller: this version of tierkv against another, side by side.

`save` returns once a session's new blocks are copied into the first memory tier; the copy is
most of what the caller waits for. Into new memory it also pays for the page faults of every
page it writes first, and this VM makes those slow. This script asks what that costs and
whether the host tier's pool of pre-faulted slabs (session 32) takes it away.

Each round runs every version in a process of its own (the order shuffled per round): it
opens a store whose host tier holds ``--host-sessions`` sessions, waits for the host pool to
be ready if the version has one (a server opens its store before its first save), then saves
``--sessions`` sessions of ``--tokens`` tokens one after another (the bench's KV, repeated to
length), each written through to SSD and flushed before the next save (untimed: so the writer
does not compete with the next save, and the blocks the host tier then evicts are already on
SSD). Per save it records the time ``save`` blocked, the copy the engine reports
(``stats()["moved"]["caller->host"]``) and the rest (issue 5's target: at most 5 ms beyond the
copy), split into two phases:

- ``growing``: the first ``--host-sessions`` saves, into a host tier not yet full: every block
  needs memory the tier has not used before;
- ``full``: the rest, each evicting as much as it adds: a long-running server's steady state,
  where freed memory can be used again.

With ``--burst`` the saves do not wait for the writer: each save after the first runs while
the writer stores the ones before (a burst of write-through saves, as a server that saves faster
than its disk; with ``--gap S``, S seconds apart, untimed, as a server between requests). A save
whose tier has run over its budget's slack then also waits for the writer (backpressure,
reported per run); the copy column is the copy alone. Each run also reports the time from its
first save until its last flush returned (``until_flushed_s``, gaps included): the writer's pace,
which a change that helps the saves may cost.

``--model NAME`` saves random KV in another model's layout (a preset of ``tierkv calc --list``,
as ``bench/reload.py --model``), in blocks of its store's size; ``--codec`` sets the store's
SSD codec (random values: ``raw``). ``--block-tokens N`` sets the store's block size (default:
the model's, 256 tokens for SmolLM2); ``--a-block-tokens M`` runs version A (``--a``, or this
version without it) with blocks of M tokens, so that two block sizes run side by side.

    python bench/save_block.py [--a DIR] [--dtype fp32|bf16] [--tokens 4096] [--sessions 12]
                               [--host-sessions 4] [--burst [--gap S]] [--model NAME] [--codec raw]
                               [--block-tokens N] [--a-block-tokens M]
                               [--rounds 5] [--dir /var/tmp] [--out ...]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(__file__))
if "--child" in sys.argv:  # a child saves with the tierkv under --child: first on the path, before any import of it
    sys.path.insert(0, os.path.abspath(sys.argv[sys.argv.index("--child") + 1]))
from common import (add_side_by_side_arguments, add_version_arguments, int_at_least, machine, run_child,  # noqa: E402
                    side_by_side, stats_of, tierkv_from, write_json)
from reload import TOKENS, model_name, model_spec, random_kv, session_kv  # noqa: E402

PHASES = ("growing", "full")


def p90(xs: list[float]) -> float:
    """The 90th percentile (nearest rank)."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, -(-9 * len(xs) // 10) - 1))]


def child(root: str, target: str, args: argparse.Namespace) -> None:
    """Save the sessions with the tierkv found in ``root``; print each save's times as JSON."""
    import torch

    tierkv = tierkv_from(root)
    how: dict[str, Any] = {} if args.codec is None else {"ssd_codec": args.codec}
    if args.model:
        spec, how["block_tokens"] = model_spec(args.model, args.dtype)
        kv = random_kv(spec, args.tokens)
    else:
        spec, kv = session_kv(args.synthetic, args.cache_dir, args.dtype)  # the parent's --cache-dir
        reps = -(-args.tokens // TOKENS)
        kv = [(torch.cat([k] * reps, 1)[:, :args.tokens].contiguous(), torch.cat([v] * reps, 1)[:, :args.tokens].contiguous())
              for k, v in kv]
    if args.block_tokens:
        how["block_tokens"] = args.block_tokens
    per = spec.bytes_per_token * args.tokens
    saves: dict[str, list[dict[str, float]]] = {p: [] for p in PHASES}
    with tierkv.TierKV(target, spec, device="cpu", device_bytes=0, host_bytes=args.host_sessions * per,
                       ssd_bytes=(args.sessions + 1) * per + (1 << 30), persist="write_through", **how) as s:
        t = time.perf_counter()
        while (s.stats().get("host_pool") or {}).get("growing") and time.perf_counter() - t < 120:
            time.sleep(0.01)
        ready = time.perf_counter() - t
        first = time.perf_counter()
        for i in range(args.sessions):
            before = s.stats()["moved"].get("caller->host", {"seconds": 0.0})["seconds"]
            start = 10**8 + i * 10**6
            t = time.perf_counter()
            s.save(range(start, start + args.tokens), kv, session=f"s{i}")
            blocked = time.perf_counter() - t
            copy = s.stats()["moved"]["caller->host"]["seconds"] - before
            saves[PHASES[i >= args.host_sessions]].append({"blocked": blocked, "copy": copy})
            if not args.burst:
                s.flush()
            elif args.gap:
                time.sleep(args.gap)  # the server's other work between saves (it uses no CPU here)
        s.flush()
        until_flushed = time.perf_counter() - first
        waits = s.stats()["backpressure"]
        pool = s.stats().get("host_pool")
        writes = s.stats()["ssd_writes"]
        blocks = s.stats().get("resident_blocks")  # (an older version under --a may not count them)
    # the process's peak resident memory: the caller's KV, the tiers and whatever the writer held
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"resident_blocks": blocks, "saves": saves, "pool_ready_s": ready, "host_pool": pool, "bytes": per, "backpressure": waits,
                      "until_flushed_s": until_flushed, "ssd_writes": writes, "max_rss_bytes": peak}))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_side_by_side_arguments(ap, rounds=5, out="bench/results/save_block.json")
    add_version_arguments(ap)
    ap.add_argument("--tokens", type=int_at_least(1), default=4096)
    ap.add_argument("--sessions", type=int_at_least(1), default=12)
    ap.add_argument("--host-sessions", type=int_at_least(1), default=4,
                    help="sessions the host tier holds (its budget)")
    ap.add_argument("--burst", action="store_true",
                    help="do not wait for the writer between saves: every save but the first runs while "
                         "the writer works (a burst of write-through saves)")
    ap.add_argument("--gap", type=float, default=0.0,
                    help="with --burst: seconds between saves (a server's other work; the writer's time to catch up)")
    ap.add_argument("--model", type=model_name, default=None,
                    help="random KV in this model's layout instead of SmolLM2's (a preset of tierkv calc --list)")
    ap.add_argument("--codec", default=None, help="the store's SSD codec (default: tierkv's)")
    ap.add_argument("--block-tokens", type=int_at_least(16), default=None,
                    help="tokens per block of the store (default: the model's; 256 for SmolLM2)")
    ap.add_argument("--a-block-tokens", type=int_at_least(16), default=None,
                    help="version A's tokens per block (default: --block-tokens'); without --a, version A "
                         "is this version with blocks of this size")
    args = ap.parse_args(argv)
    if args.child:
        child(args.child, args.target, args)
        return {}
    if args.gap and not args.burst or args.gap < 0:
        ap.error("--gap takes seconds >= 0, with --burst (without it every save waits for the writer)")
    if not 0 < args.host_sessions < args.sessions:
        ap.error("--host-sessions must be at least 1 and fewer than --sessions")
    from tierkv.cli import default_cache_dir

    args.cache_dir = args.cache_dir or default_cache_dir()  # for the children: an older tierkv may lack it
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    a_root = args.a or (here if args.a_block_tokens else None)
    a_name = f"version A ({args.a or 'this version'}" + (f", {args.a_block_tokens}-token blocks)" if args.a_block_tokens else ")")
    versions = {"this version": here} | ({a_name: a_root} if a_root else {})
    block_tokens = {"this version": args.block_tokens, a_name: args.a_block_tokens or args.block_tokens}
    work = tempfile.mkdtemp(prefix="tierkv-saveblock-", dir=args.dir)
    target = os.path.join(work, "store")
    got: dict[str, list[dict[str, Any]]] = {v: [] for v in versions}

    def run(name: str) -> Any:
        def go() -> float:
            cmd = [sys.executable, os.path.abspath(__file__), "--child", versions[name], "--target", target,
                   "--dtype", args.dtype, "--tokens", str(args.tokens), "--sessions", str(args.sessions),
                   "--host-sessions", str(args.host_sessions)]
            cmd += ["--synthetic"] if args.synthetic else []
            cmd += ["--model", args.model] if args.model else []
            cmd += ["--codec", args.codec] if args.codec else []
            cmd += ["--block-tokens", str(block_tokens[name])] if block_tokens[name] else []
            cmd += ["--burst", "--gap", str(args.gap)] if args.burst else []
            cmd += ["--cache-dir", args.cache_dir]
            try:
                res = run_child(cmd, name)
            finally:
                shutil.rmtree(target, ignore_errors=True)
            got[name].append(res)
            return sum(x["blocked"] for p in PHASES for x in res["saves"][p])
        return go

    try:
        _, orders = side_by_side({name: run(name) for name in versions}, args.rounds, args.seed)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def per_round(name: str, phase: str, what: str) -> list[float]:
        """Each round's median over that phase's saves."""
        return [statistics.median(x[what] for x in res["saves"][phase]) for res in got[name]]

    out: dict[str, Any] = {
        "machine": machine(),
        "kv": (f"{args.model}-random-" if args.model else "synthetic-" if args.synthetic else "smollm2-") + args.dtype,
        "codec": args.codec,
        "tokens": args.tokens, "sessions": args.sessions, "host_sessions": args.host_sessions, "a": args.a,
        "block_tokens": block_tokens,
        "burst": args.burst, "gap_s": args.gap,
        "rounds": args.rounds, "seed": args.seed, "round_orders": orders,
        "bytes_per_save": got["this version"][0]["bytes"], "children": got,
        "blocked_s": {n: {p: stats_of([x["blocked"] for res in got[n] for x in res["saves"][p]]) for p in PHASES}
                      for n in versions},
        "copy_s": {n: {p: stats_of([x["copy"] for res in got[n] for x in res["saves"][p]]) for p in PHASES}
                   for n in versions},
        "beyond_copy_s": {n: {p: stats_of([x["blocked"] - x["copy"] for res in got[n] for x in res["saves"][p]])
                              for p in PHASES} for n in versions},
        "pool_ready_s": {n: stats_of([res["pool_ready_s"] for res in got[n]]) for n in versions},
        # the tail: the 90th percentile of each phase's saves, over every round
        "blocked_p90_s": {n: {p: p90([x["blocked"] for res in got[n] for x in res["saves"][p]]) for p in PHASES}
                          for n in versions},
        # all the time a run's saves blocked (every phase)
        "blocked_per_run_s": {n: stats_of([sum(x["blocked"] for p in PHASES for x in res["saves"][p]) for res in got[n]])
                              for n in versions},
        # from a run's first save until its last flush returned
        "until_flushed_s": {n: stats_of([res["until_flushed_s"] for res in got[n]]) for n in versions},
        # each run's peak resident memory (the child process's)
        "max_rss_bytes": {n: stats_of([res.get("max_rss_bytes", 0) for res in got[n]]) for n in versions},
        # time saves waited for the writer (a memory tier over its budget's slack), per run
        "backpressure_s": {n: stats_of([(res.get("backpressure") or {}).get("seconds", 0.0) for res in got[n]])
                           for n in versions},
    }
    print(f"save() of a {args.tokens}-token session ({out['bytes_per_save'] / 1e6:.0f} MB of {out['kv']}), "
          f"host tier of {args.host_sessions} sessions, {args.sessions} saves, {args.rounds} rounds; median (min-max) ms:")
    for n in versions:
        for p in PHASES:
            b, c, o = out["blocked_s"][n][p], out["copy_s"][n][p], out["beyond_copy_s"][n][p]
            print(f"  {n:40s} {p:8s} blocked {b['median'] * 1e3:7.1f} ({b['min'] * 1e3:.1f}-{b['max'] * 1e3:.1f})"
                  f"  copy {c['median'] * 1e3:7.1f}  beyond it {o['median'] * 1e3:.2f} (max {o['max'] * 1e3:.2f})")
    for n in versions:
        print(f"  {n:40s} p90 " + ", ".join(f"{p} {out['blocked_p90_s'][n][p] * 1e3:.1f}" for p in PHASES)
              + f"; all saves of a run {out['blocked_per_run_s'][n]['median'] * 1e3:.0f} ms")
    if args.burst:
        print("  waited for the writer per run, median s: "
              + ", ".join(f"{n} {out['backpressure_s'][n]['median']:.2f}" for n in versions))
    print("  peak resident memory per run, median GiB: "
          + ", ".join(f"{n} {out['max_rss_bytes'][n]['median'] / 2**30:.2f}" for n in versions))
    print("  first save until flushed, median s: "
          + ", ".join(f"{n} {out['until_flushed_s'][n]['median']:.2f}" for n in versions))
    if a_root:
        a, b = a_name, "this version"
        out["this_vs_a_per_round"], out["this_vs_a_copy_per_round"] = {}, {}
        for p in PHASES:
            ratios = [x / y for x, y in zip(per_round(a, p, "blocked"), per_round(b, p, "blocked"))]
            copies = [x / y for x, y in zip(per_round(a, p, "copy"), per_round(b, p, "copy"))]
            out["this_vs_a_per_round"][p] = stats_of(ratios)
            out["this_vs_a_copy_per_round"][p] = stats_of(copies)
            print(f"  {p}: version A's blocked time / this version's, per round: {statistics.median(ratios):.2f}x "
                  f"({min(ratios):.2f}-{max(ratios):.2f}); its copy: {statistics.median(copies):.2f}x "
                  f"({min(copies):.2f}-{max(copies):.2f})")
        totals = [x / y for x, y in zip(out["blocked_per_run_s"][a]["runs"], out["blocked_per_run_s"][b]["runs"])]
        out["this_vs_a_per_run_total"] = stats_of(totals)
        print(f"  all saves of a run: version A's / this version's, per round: {statistics.median(totals):.2f}x "
              f"({min(totals):.2f}-{max(totals):.2f})")
        flushed = [x / y for x, y in zip(out["until_flushed_s"][a]["runs"], out["until_flushed_s"][b]["runs"])]
        out["this_vs_a_until_flushed"] = stats_of(flushed)
        print(f"  first save until flushed: version A's / this version's, per round: {statistics.median(flushed):.2f}x "
              f"({min(flushed):.2f}-{max(flushed):.2f})")
    write_json(args.out, out)
    return out


if __name__ == "__main__":
    main()
