"""A long run of a store under churn: does anything grow that should not?

An inference server or an agent keeps one store open for days. This runs ``--threads`` threads
of random hooks against one store for ``--minutes``, over budgets small enough that every tier
and the SSD keep evicting, and closes and reopens the store every ``--reopen-every`` seconds (a
process restart, without the process). Every ``--sample-every`` seconds it records what a
leak would show in: the process's resident memory, open file descriptors and threads, LMDB's
reader slots in use, data.mdb's size, and each tier's resident bytes. Every ``--verify``-th hit
is compared with the KV saved, bit for bit.

    python bench/soak.py --minutes 10 --dir /var/tmp --out bench/results/soak.json

The KV is SmolLM2's over 2,048 tokens of standard-library source (``bench/reload.py``'s, cached
under ``--cache-dir``; ``--synthetic`` for random KV of the same shape). Sessions are prefixes
of it under 24 session ids, each id with tokens of its own.

Summary (JSON ``summary``): after the first ``--warmup`` fraction of the run, the lowest and
highest of each count, and resident memory's least-squares slope in MiB per minute over the
second half. No timing target: it is a check, in bench/ because it runs for minutes.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from typing import Any

import psutil
import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import machine, pyplot, write_json  # noqa: E402
from reload import TOKENS, session_kv  # noqa: E402

import tierkv  # noqa: E402

IDS = 24
#: the counts summarised (lowest and highest after the warm-up)
KEYS = ("rss_mib", "rss_anon_mib", "fds", "threads", "lmdb_readers", "data_mdb_mib")


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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=3)
    ap.add_argument("--sample-every", type=float, default=5.0, help="seconds between samples")
    ap.add_argument("--reopen-every", type=float, default=60.0, help="seconds between close and reopen")
    ap.add_argument("--verify", type=int, default=4, help="check every N-th restore bit for bit")
    ap.add_argument("--warmup", type=float, default=0.2, help="fraction of the run left out of the summary")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", default=None, help="working directory (default: a temp dir)")
    ap.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/tierkv"))
    ap.add_argument("--synthetic", action="store_true", help="random KV instead of SmolLM2's")
    ap.add_argument("--out", default="bench/results/soak.json")
    args = ap.parse_args(argv)

    spec, kv = session_kv(args.synthetic, args.cache_dir)
    work = tempfile.mkdtemp(prefix="tierkv-soak-", dir=args.dir)
    path = os.path.join(work, "store")
    settings = dict(device_bytes="128MiB", host_bytes="256MiB", ssd_bytes="1GiB", full_policy="miss")
    proc = psutil.Process()
    tokens = [list(range(i * 100_000, i * 100_000 + TOKENS)) for i in range(IDS)]
    gate = threading.Condition()
    state: dict[str, Any] = {"store": None, "paused": False, "active": 0, "stop": False}
    counts: dict[str, int] = {}
    problems: list[str] = []
    count_lock = threading.Lock()

    def bump(name: str, n: int = 1) -> None:
        with count_lock:
            counts[name] = counts.get(name, 0) + n

    def worker(w: int) -> None:
        rng = random.Random(args.seed * 100 + w)
        restores = 0
        while True:
            with gate:
                while state["paused"] and not state["stop"]:
                    gate.wait()
                if state["stop"]:
                    return
                state["active"] += 1
                s = state["store"]
            try:
                i = rng.randrange(IDS)
                q = rng.randrange(256, TOKENS + 1)
                sid = f"s{i}"
                op = rng.random()
                if op < 0.3:
                    s.save(tokens[i][:q], [(k[:, :q], v[:, :q]) for k, v in kv], session=sid,
                           ttl=rng.choice([None, None, 30.0]))
                    bump("save")
                elif op < 0.6:
                    r = s.restore(tokens[i][:q], session=sid)
                    bump("restore")
                    bump("restored_tokens", r.num_tokens)
                    restores += 1
                    if r.num_tokens and restores % args.verify == 0:
                        n = r.num_tokens
                        for (k, v), (rk, rv) in zip(kv, r.kv):
                            if not (torch.equal(rk, k[:, :n]) and torch.equal(rv, v[:, :n])):
                                problems.append(f"restore of {sid}[:{n}] differs from the KV saved")
                                break
                        bump("verified")
                elif op < 0.7:
                    s.prefetch(tokens[i][:q], session=sid).wait()
                    bump("prefetch")
                elif op < 0.8:
                    s.lookup(tokens[i][:q], session=sid)
                    bump("lookup")
                elif op < 0.95:  # of a session another thread may just have dropped
                    call, name = (s.offload, "offload") if op < 0.85 else (s.drop_session, "drop")
                    try:
                        call(sid)
                        bump(name)
                    except tierkv.UnknownSessionError:
                        bump(name + "_unknown")
                else:
                    s.stats()
                    bump("stats")
            except tierkv.StoreClosedError:
                bump("closed_under_call")  # cannot happen: workers pause before close
                problems.append("a call met a closed store")
            except Exception as e:  # noqa: BLE001 - recorded; the run goes on
                problems.append(f"{type(e).__name__}: {e}")
            finally:
                with gate:
                    state["active"] -= 1
                    gate.notify_all()

    def sample(t0: float) -> dict[str, Any]:
        s = state["store"]
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
                "ops": dict(counts)}

    out: dict[str, Any] = {"machine": machine(), "args": vars(args), "settings": settings,
                           "spec_bytes_per_token": spec.bytes_per_token, "samples": [], "reopens": 0}
    try:
        state["store"] = tierkv.TierKV(path, spec, **settings)
        threads = [threading.Thread(target=worker, args=(w,), daemon=True) for w in range(args.threads)]
        t0 = time.monotonic()
        end = t0 + args.minutes * 60
        next_sample, next_reopen = t0, t0 + args.reopen_every
        for t in threads:
            t.start()
        while time.monotonic() < end and len(problems) < 20:
            now = time.monotonic()
            if now >= next_sample:
                out["samples"].append(sample(t0))
                next_sample += args.sample_every
            if now >= next_reopen:
                with gate:
                    state["paused"] = True
                    while state["active"]:
                        gate.wait()
                state["store"].close()
                state["store"] = tierkv.TierKV(path, spec, **settings)
                out["reopens"] += 1
                with gate:
                    state["paused"] = False
                    gate.notify_all()
                next_reopen += args.reopen_every
            time.sleep(0.05)
        with gate:
            state["stop"] = True
            gate.notify_all()
        for t in threads:
            t.join()
        out["samples"].append(sample(t0))
        state["store"].close()
        out["after_close"] = {"fds": proc.num_fds(), "threads": proc.num_threads(),
                              "rss_mib": proc.memory_info().rss / 2**20}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    out["ops"] = counts
    out["problems"] = problems
    steady = [x for x in out["samples"] if x["t_s"] >= args.warmup * args.minutes * 60]
    half = [x for x in out["samples"] if x["t_s"] >= 0.5 * args.minutes * 60]
    out["summary"] = {
        "samples": len(steady),
        **{f"{key}_min": min(x[key] for x in steady) for key in KEYS},
        **{f"{key}_max": max(x[key] for x in steady) for key in KEYS},
        "rss_slope_mib_per_min_second_half": _slope([x["t_s"] / 60 for x in half], [x["rss_mib"] for x in half]),
        "rss_anon_slope_mib_per_min_second_half": _slope([x["t_s"] / 60 for x in half],
                                                         [x["rss_anon_mib"] for x in half]),
        "problems": len(problems),
    } if steady else {}
    write_json(args.out, out)
    print(f"{sum(v for k, v in counts.items() if k not in ('restored_tokens',))} calls in {args.minutes:g} min, "
          f"{out['reopens']} reopens, {len(problems)} problems")
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
