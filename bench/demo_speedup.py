"""Restore-vs-recompute TTFT of the demo's agent session, at several context sizes.

Runs ``tierkv demo --json`` (turn 2 in a fresh process, cold SSD) ``--repeats`` times per size and
reports the median speedup, TTFTs and reload rate, with min and max.

    python bench/demo_speedup.py --sizes 4096 8000 --repeats 3 [--out bench/results/demo_speedup.json]

``--versions A B``: directories holding a ``tierkv`` package (a checkout, or ``git archive`` of a
commit), run alternately, in an order shuffled per repeat (``--seed``), each on ``PYTHONPATH``:
whether a change in the demo's TTFT is the engine's or this machine's hour. Each run's
``restore_ttft_s - restore_s`` is the part of the turn that is not the reload (the prefill of the
new message and what overlaps it badly), reported per version as ``beyond_reload_s``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))
from common import int_at_least, machine, write_json  # noqa: E402

KEYS = ("recompute_ttft_s", "restore_ttft_s", "speedup", "restore_s", "reload_gbps", "reload_disk_gbps",
        "compression_ratio")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int_at_least(2), nargs="+", default=[4096, 8000])
    ap.add_argument("--repeats", type=int_at_least(1), default=3)
    ap.add_argument("--codec", default="zstd-planes")
    ap.add_argument("--versions", nargs="+", default=None,
                    help="tierkv trees to run alternately (default: the tierkv this Python imports)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the per-repeat order of --versions")
    ap.add_argument("--out", default="bench/results/demo_speedup.json")
    args = ap.parse_args()
    versions = [os.path.abspath(v) for v in args.versions] if args.versions else [None]
    if len(set(versions)) != len(versions):
        raise SystemExit("--versions: each tree once (their runs are reported per tree)")
    for v in versions:
        if v is not None and not os.path.isfile(os.path.join(v, "tierkv", "__init__.py")):
            raise SystemExit(f"--versions: {v} holds no tierkv package")
    rng = random.Random(args.seed)
    results = []
    for size in args.sizes:
        runs: dict[str | None, list[dict]] = {v: [] for v in versions}
        for i in range(args.repeats):
            order = list(versions)
            rng.shuffle(order)
            for v in order:
                env = dict(os.environ)
                if v is not None:
                    env["PYTHONPATH"] = v
                out = subprocess.run([sys.executable, "-m", "tierkv.cli", "demo", "--context-tokens", str(size),
                                      "--json", "--codec", args.codec], capture_output=True, text=True, check=True,
                                     env=env, cwd=v or None)  # ``-m`` puts the cwd ahead of PYTHONPATH
                r = json.loads(out.stdout.strip().splitlines()[-1])
                assert r["tokens_identical"] and r["max_abs_logit_diff"] == 0.0
                r["beyond_reload_s"] = r["restore_ttft_s"] - r["restore_s"]
                runs[v].append(r)
                print(f"{size} run {i}{'' if v is None else ' ' + v}: speedup {r['speedup']:.1f}x  restore TTFT "
                      f"{r['restore_ttft_s']:.3f}s  reload {r['restore_s']:.3f}s ({r['reload_gbps']:.2f} GB/s)  "
                      f"recompute {r['recompute_ttft_s']:.2f}s", flush=True)
        for v, mine in runs.items():
            summary = {k: {"median": statistics.median(r[k] for r in mine), "min": min(r[k] for r in mine),
                           "max": max(r[k] for r in mine)} for k in KEYS + ("beyond_reload_s",)}
            row = {"context_tokens": size, "session_tokens": mine[0]["session_tokens"],
                   "turn2_new_tokens": mine[0]["turn2_new_tokens"], "kv_bytes": mine[0]["kv_bytes"],
                   "ssd_bytes": mine[0]["ssd_bytes"], "tokens_identical": all(r["tokens_identical"] for r in mine),
                   "summary": summary, "runs": mine}
            if v is not None:
                row["version"] = v
                print(f"{size} {v}: speedup median {summary['speedup']['median']:.1f}x "
                      f"({summary['speedup']['min']:.1f}-{summary['speedup']['max']:.1f}), beyond the reload "
                      f"{summary['beyond_reload_s']['median'] * 1000:.0f} ms median")
            results.append(row)
    write_json(args.out, {"machine": machine(), "codec": args.codec, "versions": args.versions, "seed": args.seed,
                          "results": results})


if __name__ == "__main__":
    main()
