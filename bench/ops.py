"""Bookkeeping costs: lookup latency, store open time, per-block Python overhead.

- lookup p50/p99 for one 1M-token session (with its session id, and by content), a save of it
  again one block longer (its blocks in memory and on SSD), and the time a save of it spends
  leasing its blocks;
- lookup p50/p99 and store open time in a store of ``--sessions`` sessions (default 100,000);
- the first lookup of that session after the store is opened again;
- save and restore time per block for tiny blocks (16 tokens, 1 layer): Python's share, median
  of ``--block-rounds`` rounds.

    python bench/ops.py [--sessions 100000] [--out bench/results/ops.json]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import int_at_least, machine, write_json  # noqa: E402

import tierkv  # noqa: E402


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


def lat(xs: list[float]) -> dict[str, float]:
    return {"p50_ms": pct(xs, 50) * 1e3, "p99_ms": pct(xs, 99) * 1e3, "max_ms": max(xs) * 1e3, "n": len(xs)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sessions", type=int_at_least(1), default=100_000)
    ap.add_argument("--long-tokens", type=int_at_least(1), default=1_000_000)
    ap.add_argument("--block-rounds", type=int_at_least(1), default=7, help="rounds of the per-block save and restore")
    ap.add_argument("--out", default="bench/results/ops.json")
    args = ap.parse_args(argv)
    spec = tierkv.KVSpec.gqa("bench/tiny", 1, 1, 8, torch.bfloat16)
    work = tempfile.mkdtemp(prefix="tierkv-ops-")
    res: dict = {"machine": machine(), "spec_bytes_per_token": spec.bytes_per_token}
    try:
        # one 1M-token session
        n = args.long_tokens
        toks = torch.randint(0, 50_000, (n,))
        kv = [(torch.zeros(1, n, 8, dtype=torch.bfloat16), torch.zeros(1, n, 8, dtype=torch.bfloat16))]
        with tierkv.TierKV(os.path.join(work, "long"), spec, ssd_bytes="4GiB") as s:
            s.save(toks, kv, session="long")
            s.flush()
            for label, sid in (("with_session", "long"), ("by_content", None)):
                xs = []
                for _ in range(1000):  # a p99 of 200 samples would be the 2nd-worst one
                    t = time.perf_counter()
                    hit = s.lookup(toks, session=sid)
                    xs.append(time.perf_counter() - t)
                assert hit >= n - n % 256 - (0 if sid else 0)
                res[f"lookup_1M_{label}"] = lat(xs)
                print(f"lookup, 1M-token session, {label}: p50 {res[f'lookup_1M_{label}']['p50_ms']:.2f} ms, "
                      f"p99 {res[f'lookup_1M_{label}']['p99_ms']:.2f} ms", flush=True)
            # what a save of that session adds for its leases (tierkv/leases.py): one lease per block,
            # written before the save looks at the store, and a look at the blocks' doom marks
            # (none in versions before leases, which bench/ops.py also runs in an A/B; versions
            # before the marks take no owner)
            leases = getattr(s._ssd, "leases", None)
            if leases is not None:
                keys = s._sessions["long"].keys
                owned = hasattr(leases, "new_owner")
                xs = []
                for _ in range(200):
                    t = time.perf_counter()
                    if owned:
                        leases.grant(keys, leases.new_owner())
                    else:
                        leases.grant(keys)
                    xs.append(time.perf_counter() - t)
                res["lease_grant_1M"] = dict(lat(xs), blocks=len(keys))
                print(f"leases for the 1M-token session's {len(keys)} blocks: p50 "
                      f"{res['lease_grant_1M']['p50_ms']:.3f} ms, p99 {res['lease_grant_1M']['p99_ms']:.3f} ms", flush=True)
                # the other side: a transaction deleting those blocks marks them before it looks
                # at their leases, and unmarks them after its commit, holding the marks' lock
                # exclusively each time (grants wait meanwhile); versions before marks skip it
                if hasattr(leases, "doom"):
                    xs, ys = [], []
                    for _ in range(200):
                        t = time.perf_counter()
                        leases.doom(keys)
                        xs.append(time.perf_counter() - t)
                        t = time.perf_counter()
                        leases.undoom(keys)
                        ys.append(time.perf_counter() - t)
                    res["lease_doom_1M"], res["lease_undoom_1M"] = (dict(lat(v), blocks=len(keys)) for v in (xs, ys))
                    print(f"marks on those blocks: doom p50 {res['lease_doom_1M']['p50_ms']:.3f} ms, p99 "
                          f"{res['lease_doom_1M']['p99_ms']:.3f} ms; undoom p50 {res['lease_undoom_1M']['p50_ms']:.3f} ms, "
                          f"p99 {res['lease_undoom_1M']['p99_ms']:.3f} ms", flush=True)
        # the first lookup after the store is opened again (a restarted server or agent): the
        # session's record and its blocks' bookkeeping come from the store, not from memory
        firsts = []
        for _ in range(5):
            with tierkv.TierKV(os.path.join(work, "long"), spec, ssd_bytes="4GiB") as s:
                t = time.perf_counter()
                hit = s.lookup(toks, session="long")
                firsts.append(time.perf_counter() - t)
                assert hit >= n - n % 256
        res["lookup_1M_first_after_open"] = {"median_ms": statistics.median(firsts) * 1e3,
                                             "min_ms": min(firsts) * 1e3, "max_ms": max(firsts) * 1e3, "n": len(firsts)}
        print(f"first lookup of the 1M-token session after open: median "
              f"{res['lookup_1M_first_after_open']['median_ms']:.1f} ms", flush=True)
        # a save of that session again, one block longer each time, with write-through (its
        # blocks held in memory and on SSD; the writer idle between saves): the save's own
        # bookkeeping for a session this long, as an agent's next turn pays it; since session 46
        # it includes a look at the store for every block it holds as on SSD, in memory too
        grown = torch.randint(0, 50_000, (n + 256 * 20,))
        grown[:n] = toks
        kv_grown = [(torch.zeros(1, len(grown), 8, dtype=torch.bfloat16),) * 2]
        with tierkv.TierKV(os.path.join(work, "again"), spec, ssd_bytes="4GiB", persist="write_through") as s:
            s.save(toks, kv, session="long")
            s.flush()
            xs = []
            for r in range(1, 21):
                m = n + 256 * r
                t = time.perf_counter()
                s.save(grown[:m], [(k[:, :m], v[:, :m]) for k, v in kv_grown], session="long")
                xs.append(time.perf_counter() - t)
                s.flush()
        res["save_again_1M"] = lat(xs)
        print(f"a save of the 1M-token session again, a block longer: p50 {res['save_again_1M']['p50_ms']:.2f} ms, "
              f"max {res['save_again_1M']['max_ms']:.2f} ms", flush=True)
        # many sessions
        path = os.path.join(work, "many")
        kv1 = [(torch.zeros(1, 300, 8, dtype=torch.bfloat16), torch.zeros(1, 300, 8, dtype=torch.bfloat16))]
        t0 = time.perf_counter()
        with tierkv.TierKV(path, spec, ssd_bytes="8GiB", device_bytes=0, host_bytes=0, block_tokens=256) as s:
            for i in range(args.sessions):
                s.save([i] * 300, kv1, session=f"session-{i}")
            s.flush()
        res["create_sessions_s"] = time.perf_counter() - t0
        opens = []
        for _ in range(5):
            t = time.perf_counter()
            s = tierkv.TierKV(path, spec, ssd_bytes="8GiB", block_tokens=256)
            opens.append(time.perf_counter() - t)
            s.close()
        res["open_s"] = {"median": statistics.median(opens), "max": max(opens), "sessions": args.sessions}
        print(f"open with {args.sessions} sessions: {statistics.median(opens) * 1000:.1f} ms", flush=True)
        with tierkv.TierKV(path, spec, ssd_bytes="8GiB", block_tokens=256) as s:
            xs = []
            rng = random.Random(0)
            for _ in range(2000):
                i = rng.randrange(args.sessions)
                t = time.perf_counter()
                s.lookup([i] * 300, session=f"session-{i}")
                xs.append(time.perf_counter() - t)
            res["lookup_in_many"] = lat(xs)
            print(f"lookup in a {args.sessions}-session store: p50 {res['lookup_in_many']['p50_ms']:.3f} ms, "
                  f"p99 {res['lookup_in_many']['p99_ms']:.3f} ms", flush=True)
        # per-block overhead: tiny 16-token blocks, a fresh session of new blocks per round (the
        # writer idle: each round waits for the last one's writes)
        blocks = 4096
        small = [(torch.zeros(1, 16 * blocks, 8, dtype=torch.bfloat16),) * 2]
        saves, restores = [], []
        with tierkv.TierKV(os.path.join(work, "tiny"), spec, block_tokens=16, ssd_bytes="1GiB") as s:
            for r in range(args.block_rounds):
                toks = torch.arange(16 * blocks) + r * 16 * blocks
                t = time.perf_counter()
                s.save(toks, small, session=f"t{r}")
                saves.append(time.perf_counter() - t)
                t = time.perf_counter()
                got = s.restore(toks, session=f"t{r}")
                restores.append(time.perf_counter() - t)
                assert got.num_tokens == 16 * blocks
                s.flush()
        res["per_block_us"] = {"save": statistics.median(saves) / blocks * 1e6,
                               "restore_from_memory": statistics.median(restores) / blocks * 1e6,
                               "save_min": min(saves) / blocks * 1e6, "restore_min": min(restores) / blocks * 1e6,
                               "rounds": args.block_rounds}
        print(f"per 16-token block, median of {args.block_rounds}: save {res['per_block_us']['save']:.1f} us, "
              f"restore {res['per_block_us']['restore_from_memory']:.1f} us")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_json(args.out, res)


if __name__ == "__main__":
    main()
