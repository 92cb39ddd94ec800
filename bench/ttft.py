"""TTFT on the real model: recompute vs restore from each tier, with and without prefetch.

For each context size, SmolLM2 (fp32) prefills the context once; its KV is saved to a store. Then
a request arrives with the context plus a new message (16 tokens) and we time arrival → first
token, ``--repeats`` times each:

- recompute: prefill everything, no tierkv;
- device / host: the KV resident in that memory tier;
- warm SSD: on SSD, its pages in the page cache; cold SSD: on SSD, pages dropped first;
- the SSD cases once more with ``prefetch`` issued at arrival.

Every case includes ``--server-work-ms`` (default 50) of the server's own work (tokenising,
scheduling) between arrival and the prefill; a prefetch runs during it. Restores write into a
``CachePool`` sized at start-up, as a server's KV pool is.

    python bench/ttft.py [--sizes 512 2048 8000] [--repeats 3]     # -> bench/results/ttft.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import collected, int_at_least, machine, pyplot, setup_frozen, stats_of, write_json  # noqa: E402

import tierkv  # noqa: E402
from tierkv.integrations.hf import HEADROOM, CachePool, cache_to_kv, load_smollm2, prefill, restore_cache  # noqa: E402
from tierkv.pagecache import make_cold  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int_at_least(2), nargs="+", default=[512, 2048, 8000])
    ap.add_argument("--repeats", type=int_at_least(1), default=3)
    ap.add_argument("--server-work-ms", type=float, default=50.0)
    ap.add_argument("--out", default="bench/results/ttft.json")
    ap.add_argument("--json", action="store_true", help="print the JSON result")
    args = ap.parse_args(argv)
    model, tok, spec = load_smollm2()
    torch.set_num_threads(os.cpu_count() or 1)
    text = "".join(open(os.path.join(os.path.dirname(os.__file__), n), encoding="utf-8").read()
                   for n in ("argparse.py", "functools.py", "dataclasses.py"))
    all_ids = tok.encode(text, add_special_tokens=False)
    message = tok.encode("\n# Question: what does this file do?\n", add_special_tokens=False)[:16]
    # The server's KV buffers, sized at start-up (a server's KV pool): restores write into them.
    pool = CachePool()
    pool.reserve(spec, max(args.sizes) + HEADROOM)
    work = tempfile.mkdtemp(prefix="tierkv-ttft-")
    rows = []
    try:
        for size in args.sizes:
            ctx = all_ids[:size]
            _, cache = prefill(model, ctx)
            kv = [(k.clone(), v.clone()) for k, v in cache_to_kv(cache)]
            del cache
            prefill(model, message, None)  # warm-up
            res: dict[str, list[float]] = {}

            def timed(name: str, fn) -> None:
                with setup_frozen():
                    for _ in range(args.repeats):
                        t = fn()
                        res.setdefault(name, []).append(t)

            def recompute() -> float:
                collected()
                t0 = time.perf_counter()
                time.sleep(args.server_work_ms / 1000)  # the server's own work before the prefill
                prefill(model, ctx + message)
                return time.perf_counter() - t0

            def via_store(tier: str, prefetch: bool) -> float:
                path = os.path.join(work, f"s{size}")
                shutil.rmtree(path, ignore_errors=True)
                big = int(2 * size * spec.bytes_per_token) + (64 << 20)
                budgets = {"device": dict(device_bytes=big, host_bytes=big),
                           "host": dict(device_bytes=0, host_bytes=big)}.get(tier, dict(device_bytes=big, host_bytes=big))
                s = tierkv.TierKV(path, spec, ssd_bytes=4 * big, **budgets)
                try:
                    s.save(ctx, kv, session="s").wait()
                    s.flush()
                    if tier in ("warm_ssd", "cold_ssd"):
                        s.close()
                        if tier == "cold_ssd":
                            make_cold(os.path.join(path, "data.mdb"))
                        s = tierkv.TierKV(path, spec, ssd_bytes=4 * big, **budgets)
                    collected()
                    t0 = time.perf_counter()  # the request arrives
                    if prefetch:
                        s.prefetch(ctx, session="s")  # at arrival: overlaps the server's own work
                    time.sleep(args.server_work_ms / 1000)
                    c, h = restore_cache(s, ctx, model.config, session="s", pool=pool)
                    assert h.num_tokens == size
                    prefill(model, message, c)
                    return time.perf_counter() - t0
                finally:
                    s.close()

            timed("recompute", recompute)
            for tier in ("device", "host", "warm_ssd", "cold_ssd"):
                timed(tier, lambda tier=tier: via_store(tier, False))
            for tier in ("warm_ssd", "cold_ssd"):
                timed(f"{tier}+prefetch", lambda tier=tier: via_store(tier, True))
            stats = {k: stats_of(v) for k, v in res.items()}
            med = {k: v["median"] for k, v in stats.items()}
            row = {"context_tokens": size, "new_tokens": len(message), "ttft_s": stats,
                   "speedup_vs_recompute": {k: med["recompute"] / v for k, v in med.items() if k != "recompute"}}
            rows.append(row)
            print(f"{size:>6} tokens: " + "  ".join(f"{k} {v * 1000:.0f} ms" for k, v in med.items()), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results = {"machine": machine(), "model": spec.model_id, "server_work_ms": args.server_work_ms,
               "repeats": args.repeats, "rows": rows}
    write_json(args.out, results)
    plot(results, os.path.splitext(args.out)[0] + ".png")
    if args.json:
        print(json.dumps(results))


def plot(results: dict, path: str) -> None:
    """TTFT per context size and case (log scale), medians, as a PNG (matplotlib optional)."""
    plt = pyplot()
    if plt is None:
        return
    rows = results["rows"]
    cases = list(rows[0]["ttft_s"])
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(cases)
    for j, case in enumerate(cases):
        xs = [i + (j - (len(cases) - 1) / 2) * width for i in range(len(rows))]
        ax.bar(xs, [r["ttft_s"][case]["median"] * 1000 for r in rows], width, label=case,
               color="#888" if case == "recompute" else None)
    ax.set_xticks(range(len(rows)), [f"{r['context_tokens']} tokens" for r in rows])
    ax.set_yscale("log")
    ax.set_ylabel("TTFT, ms (median, log scale)")
    ax.set_title(f"Time to first token: recompute vs restore per tier ({results['model']})")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
