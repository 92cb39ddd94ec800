"""What a block's host memory costs on a GPU machine: pinned (page-locked) against plain memory.

tierkv's host tier allocates one buffer per block, pinned when CUDA is present so that copies to
and from the GPU run at the link's rate. This measures, per block-sized buffer (a 256-token
SmolLM2 block in bf16 by default): allocating it pinned the first time (torch's caching host
allocator asks the driver for new page-locked memory), allocating it again after the first ones
were freed (served from that cache), allocating plain memory, and copying a block into each kind;
then one GPU upload of the same bytes from each kind. Medians of ``--repeats`` rounds.

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
from common import machine, stats_of, write_json  # noqa: E402


def per_block(fn: Any, blocks: int) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) / blocks


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--block-bytes", type=int, default=256 * 30 * 2 * 3 * 64 * 2)
    ap.add_argument("--blocks", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
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
        keep.clear()
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
    results: dict[str, Any] = {"machine": machine(), "block_bytes": n, "blocks": nb, "repeats": args.repeats,
                               "per_block_s": {k: stats_of(v) for k, v in rows.items()},
                               "gbps": {k: n / statistics.median(v) / 1e9 for k, v in rows.items()}}
    for k, v in results["gbps"].items():
        print(f"  {k:<42} {statistics.median(rows[k]) * 1e3:8.3f} ms per block  {v:7.2f} GB/s")
    write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
