"""Restore-vs-recompute TTFT of the demo's agent session, at several context sizes.

Runs ``tierkv demo --json`` (turn 2 in a fresh process, cold SSD) ``--repeats`` times per size and
reports the median speedup, TTFTs and reload rate, with min and max.

    python bench/demo_speedup.py --sizes 4096 8000 --repeats 3 [--out bench/results/demo_speedup.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))
from common import machine, write_json  # noqa: E402

KEYS = ("recompute_ttft_s", "restore_ttft_s", "speedup", "restore_s", "reload_gbps", "reload_disk_gbps",
        "compression_ratio")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096, 8000])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--codec", default="zstd-planes")
    ap.add_argument("--out", default="bench/results/demo_speedup.json")
    args = ap.parse_args()
    results = []
    for size in args.sizes:
        runs = []
        for i in range(args.repeats):
            out = subprocess.run([sys.executable, "-m", "tierkv.cli", "demo", "--context-tokens", str(size),
                                  "--json", "--codec", args.codec], capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            assert r["tokens_identical"] and r["max_abs_logit_diff"] == 0.0
            runs.append(r)
            print(f"{size} run {i}: speedup {r['speedup']:.1f}x  restore TTFT {r['restore_ttft_s']:.3f}s  "
                  f"recompute {r['recompute_ttft_s']:.2f}s  reload {r['reload_gbps']:.2f} GB/s", flush=True)
        summary = {k: {"median": statistics.median(r[k] for r in runs), "min": min(r[k] for r in runs),
                       "max": max(r[k] for r in runs)} for k in KEYS}
        results.append({"context_tokens": size, "session_tokens": runs[0]["session_tokens"],
                        "turn2_new_tokens": runs[0]["turn2_new_tokens"], "kv_bytes": runs[0]["kv_bytes"],
                        "ssd_bytes": runs[0]["ssd_bytes"], "tokens_identical": all(r["tokens_identical"] for r in runs),
                        "summary": summary, "runs": runs})
    write_json(args.out, {"machine": machine(), "codec": args.codec, "results": results})


if __name__ == "__main__":
    main()
