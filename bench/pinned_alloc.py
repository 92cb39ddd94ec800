"""What a block's host memory costs on a GPU machine: pinned (page-locked) against plain memory.

tierkv's host tier allocates one buffer per block, pinned when CUDA is present so that copies to
and from the GPU run at the link's rate. This measures, per block-sized buffer (a 256-token
SmolLM2 block in bf16 by default): allocating it pinned the first time (torch's caching host
allocator asks the driver for new page-locked memory; every round keeps what the earlier ones
took, so each round's buffers are new), allocating it again after the first ones were freed
(served from that cache), allocating plain memory, and copying a block into each kind; then one
GPU upload of the same bytes from each kind. Then tierkv's host pool (``tierkv.hostmem``): locking
one slab, per block it holds, and taking a block from slabs already locked. Medians of
``--repeats`` rounds.

Session 25's run on an H200 cleared the kept buffers at the start of each round by mistake, so
only its first round took new memory (4.4 ms per block; the later rounds, served from torch's
cache, 0.004-0.005 ms); fixed in session 26.

    python bench/pinned_alloc.py [--block-bytes 5898240] [--blocks 64] [--repeats 5] [--out ...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import int_at_least, machine, stats_of, write_json  # noqa: E402

from tierkv.hostmem import SlabPool  # noqa: E402


def per_block(fn: Any, blocks: int) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) / blocks


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--block-bytes", type=int_at_least(1), default=256 * 30 * 2 * 3 * 64 * 2)
    ap.add_argument("--blocks", type=int_at_least(1), default=64)
    ap.add_argument("--repeats", type=int_at_least(1), default=5)
    ap.add_argument("--out", default="bench/results/pinned_alloc.json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("pinned memory needs a CUDA GPU")
    n, nb = args.block_bytes, args.blocks
    src = torch.randint(0, 255, (n,), dtype=torch.uint8)
    dev = torch.empty(n, dtype=torch.uint8, device="cuda")
    rows: dict[str, list[float]] = {}
    keep: list[torch.Tensor] = []
    for _ in range(args.repeats):
        # new page-locked memory each round: hold what earlier rounds took, so the cache is empty
        fresh = [None] * nb
        rows.setdefault("pinned alloc, new memory", []).append(per_block(
            lambda: [fresh.__setitem__(i, torch.empty(n, dtype=torch.uint8, pin_memory=True)) for i in range(nb)], nb))
        rows.setdefault("copy a block into pinned memory", []).append(per_block(
            lambda: [b.copy_(src) for b in fresh], nb))
        rows.setdefault("upload a block from pinned memory", []).append(per_block(
            lambda: ([dev.copy_(b, non_blocking=True) for b in fresh], torch.cuda.synchronize()), nb))
        keep.extend(fresh)
        del fresh
        plain = [None] * nb
        rows.setdefault("plain alloc + first write", []).append(per_block(
            lambda: [plain.__setitem__(i, torch.empty(n, dtype=torch.uint8).fill_(1)) for i in range(nb)], nb))
        rows.setdefault("copy a block into plain memory", []).append(per_block(
            lambda: [b.copy_(src) for b in plain], nb))
        rows.setdefault("upload a block from plain memory", []).append(per_block(
            lambda: ([dev.copy_(b, non_blocking=True) for b in plain], torch.cuda.synchronize()), nb))
        del plain
    # freed pinned buffers go back to torch's cache; the same sizes are then served from it
    reused = []
    del keep[:nb]
    rows["pinned alloc, reused from torch's cache"] = [per_block(
        lambda: [reused.append(torch.empty(n, dtype=torch.uint8, pin_memory=True)) for _ in range(nb)], nb)]
    del keep, reused
    # tierkv's host pool: slabs locked ahead (by its thread; timed here on this one), blocks taken
    geometry = SlabPool(n, nb * n, 1, pin=False)  # its slab size (plain memory, then dropped)
    geometry.close()
    slab_bytes, per_slab = geometry.slab_bytes, geometry.per_slab
    n_slabs = -(-nb // per_slab)
    kept_slabs: list[torch.Tensor] = []  # held across rounds: each round locks new memory
    for _ in range(args.repeats):
        rows.setdefault("pool: lock a slab, per block it holds", []).append(per_block(
            lambda: kept_slabs.extend(torch.empty(slab_bytes, dtype=torch.uint8, pin_memory=True)
                                      for _ in range(n_slabs)), n_slabs * per_slab))
    del kept_slabs
    for _ in range(args.repeats):
        pool = SlabPool(n, nb * n, nb * n, pin=True)
        pool.wait_ready(60)
        taken = []
        rows.setdefault("pool: take a block from locked slabs", []).append(per_block(
            lambda: taken.extend(pool.take() for _ in range(min(nb, pool.snapshot()["free_slots"]))), nb))
        rows.setdefault("copy a block into a pool block", []).append(per_block(
            lambda: [b.copy_(src) for b in taken], len(taken)))
        pool.close()
        del taken, pool
    results: dict[str, Any] = {"machine": machine(), "block_bytes": n, "blocks": nb, "repeats": args.repeats,
                               "per_block_s": {k: stats_of(v) for k, v in rows.items()},
                               "gbps": {k: n / statistics.median(v) / 1e9 for k, v in rows.items()}}
    for k, v in results["gbps"].items():
        print(f"  {k:<42} {statistics.median(rows[k]) * 1e3:8.3f} ms per block  {v:7.2f} GB/s")
    write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
