"""A restore whose blocks are all in memory (a hot session on a CPU machine), against the copy alone.

On a CPU machine a session saved a moment ago sits in the device tier (a CPU pool) or the host
tier, and a restore is copies from its block payloads into the result tensors: per block, layer
and tensor one copy (a 2,048-token SmolLM2 session in 256-token blocks: 480). Side by side in a
shuffled order per round, on real KV, this times:

- ``restore``: ``TierKV.restore`` of the whole session into fresh tensors;
- ``restore into preallocated tensors``: the same into tensors reserved up front (a CachePool,
  as a server restores), so no page is faulted in;
- ``one copy per tensor``: the floor, copying the session's own 60 tensors into preallocated
  ones of the same shape: the bytes moved, nothing else.

Medians of ``--rounds``; the restore's ratio to the floor is what the engine adds.

    python bench/memory_restore.py [--dtype fp32] [--rounds 15] [--out bench/results/memory_restore.json]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from typing import Any, Callable

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import add_side_by_side_arguments, machine, preallocated, side_by_side, stats_of, write_json  # noqa: E402
from reload import TOKENS, session_kv  # noqa: E402

import tierkv  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_side_by_side_arguments(ap, rounds=15, out="bench/results/memory_restore.json")
    args = ap.parse_args(argv)
    from tierkv.cli import default_cache_dir

    spec, kv = session_kv(args.synthetic, args.cache_dir or default_cache_dir(), args.dtype)
    n = TOKENS
    nbytes = n * spec.bytes_per_token
    work = tempfile.mkdtemp(prefix="tierkv-memrestore-")
    try:
        with tierkv.TierKV(os.path.join(work, "store"), spec, device="cpu", device_bytes=4 * nbytes,
                           host_bytes=0, ssd_bytes=4 * nbytes + (1 << 30)) as s:
            s.save(range(n), kv, session="s")
            pool = preallocated(spec, n)
            floor_out = [tuple(torch.ones_like(x) for x in layer) for layer in kv]

            def restore() -> None:
                r = s.restore(range(n), session="s")
                if r.sources != {"device": -(-n // s.block_tokens)}:
                    raise SystemExit(f"not a memory hit: {r.sources}")

            def restore_pre() -> None:
                s.restore_async(range(n), session="s", allocate=pool).result()

            def floor() -> None:
                for outs, ins in zip(floor_out, kv):
                    for o, i in zip(outs, ins):
                        o.copy_(i)

            methods: dict[str, Callable[[], float | None]] = {
                "restore": restore, "restore into preallocated tensors": restore_pre, "one copy per tensor": floor}
            for f in methods.values():
                f()  # first use: the pool's and the floor's pages written, code warmed
            rows, orders = side_by_side(methods, args.rounds, args.seed)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    floor_s = rows["one copy per tensor"]
    results: dict[str, Any] = {
        "machine": machine(), "kv": ("synthetic-" if args.synthetic else "smollm2-") + args.dtype,
        "tokens": n, "bytes": nbytes, "rounds": args.rounds, "seed": args.seed, "round_orders": orders,
        "seconds": {k: stats_of(v) for k, v in rows.items()},
        "gbps": {k: nbytes / statistics.median(v) / 1e9 for k, v in rows.items()},
        "vs_floor": {k: statistics.median(floor_s) / statistics.median(v) for k, v in rows.items()},
        "vs_floor_paired": {k: statistics.median(f / x for f, x in zip(floor_s, v)) for k, v in rows.items()},
    }
    print(f"{n} tokens ({nbytes / 1e6:.0f} MB), medians of {args.rounds}:")
    for k, v in rows.items():
        print(f"  {k:<36} {statistics.median(v) * 1e3:7.2f} ms  {results['gbps'][k]:6.2f} GB/s  "
              f"{results['vs_floor'][k]:.2f}x the floor (per round {results['vs_floor_paired'][k]:.2f}x)")
    write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
